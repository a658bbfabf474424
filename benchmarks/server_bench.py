"""Server overhead: tokens/s through ``eft-local serve`` vs in-process generation.

Starts ``eft-local serve`` as a child process on a loopback port and, in this process, a
session on the same preset with the same options. Then, interleaved (one request to the
server, the same generation in process, repeated), it measures:

- tokens/s: completion tokens over wall time, prompt evaluation included, server requests
  streamed over HTTP (SSE) and timed at the client, in-process runs timed around
  ``Session.complete``; the ratio server / in-process (target >= 0.95);
- time to the first streamed token (client side) and the in-process equivalent;
- the second turn of a long chat resent in full: tokens the server evaluated (its
  ``timings.prompt_n``) against the prompt length, and the time of that turn against the
  same prompt sent cold (after an unrelated prompt has replaced the cache).

    python benchmarks/server_bench.py [--preset tiny-up] [--rounds 5] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from eft_local.sampler import SamplerSettings
from eft_local.session import LoadOptions, load_session

PROMPTS = [
    "Has Zhithdou was born in",
    "The profession of Tova Brint is",
    "Question: Where was Has Zhithdou born?\nAnswer:",
    "In the year 1996,",
]
QUESTIONS = [
    "What is the home town of Has Zhithdou?", "In which year was Has Zhithdou born?",
    "What is the profession of Has Zhithdou?", "Which town does Tova Brint come from?",
    "In which year was Tova Brint born?", "What is the profession of Tova Brint?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(preset: str, port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "eft_local", "serve", preset, "--port", str(port), "--threads",
         str(threads)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if CLIENT.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


CLIENT = httpx.Client(timeout=300)
"""One connection pool for every request, as a real client keeps."""


def via_server(url: str, prompt: str, seed: int, max_tokens: int, stream: bool = True
               ) -> tuple[int, float, float]:
    """(completion tokens, seconds, seconds to the first token) of one request (streamed:
    timed to the first text; else the first token is not seen: 0)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed,
            "temperature": 1.0, "stream": stream}
    start = time.perf_counter()
    if not stream:
        out = CLIENT.post(url + "/v1/completions", json=body).json()
        return out["usage"]["completion_tokens"], time.perf_counter() - start, 0.0
    body["stream_options"] = {"include_usage": True}
    first = None
    tokens = 0
    with CLIENT.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data["choices"] and data["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - start, first or 0.0


def in_process(session, prompt: str, seed: int, max_tokens: int) -> tuple[int, float, float]:
    session.update(sampling=SamplerSettings(temperature=1.0, seed=seed))
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in session.complete(prompt, raw=True, max_tokens=max_tokens):
        if chunk.step is not None:
            tokens += 1
        if chunk.text and first is None:
            first = time.perf_counter() - start
    return tokens, time.perf_counter() - start, first or 0.0


def chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    out = CLIENT.post(url + "/v1/chat/completions", json=body).json()
    out["seconds"] = time.perf_counter() - start
    return out


def long_chat(url: str) -> None:
    """Build a chat of several exchanges, then time its resent second-to-last turn."""
    history: list[dict[str, str]] = []
    for question in QUESTIONS[:-1]:
        history.append({"role": "user", "content": question})
        reply = chat(url, history, 24)
        history.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    history.append({"role": "user", "content": QUESTIONS[-1]})
    warm = chat(url, history, 1)
    chat(url, [{"role": "user", "content": "Where was Tova Brint born? " * 3}], 1)  # evict
    cold = chat(url, history, 1)
    t = warm["timings"]
    print(f"long chat, turn {len(QUESTIONS)} resent in full: prompt "
          f"{warm['usage']['prompt_tokens']} tokens, evaluated {t['prompt_n']} "
          f"(re-used {t['cache_n']}); "
          f"{1e3 * warm['seconds']:.1f} ms vs {1e3 * cold['seconds']:.1f} ms cold "
          f"(evaluated {cold['timings']['prompt_n']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-up")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.preset, port, args.threads)
    try:
        session = load_session(args.preset, options=LoadOptions(n_threads=args.threads))
        served = {"tokens": 0, "seconds": 0.0, "first": []}
        whole = {"tokens": 0, "seconds": 0.0, "first": []}
        local = {"tokens": 0, "seconds": 0.0, "first": []}
        for i, prompt in enumerate(PROMPTS[:2]):  # warm-up, both sides
            via_server(url, prompt, i, 8)
            in_process(session, prompt, i, 8)
        for r in range(args.rounds):
            for i, prompt in enumerate(PROMPTS):
                seed = 100 * r + i
                for side, result in (
                        (served, via_server(url, prompt, seed, args.max_tokens)),
                        (local, in_process(session, prompt, seed, args.max_tokens)),
                        (whole, via_server(url, prompt, seed, args.max_tokens, False))):
                    tokens, seconds, first = result
                    side["tokens"] += tokens
                    side["seconds"] += seconds
                    side["first"].append(first)
        rate_s = served["tokens"] / served["seconds"]
        rate_w = whole["tokens"] / whole["seconds"]
        rate_l = local["tokens"] / local["seconds"]
        print(f"preset {args.preset}, {args.threads} threads, {args.rounds} rounds x "
              f"{len(PROMPTS)} prompts, max {args.max_tokens} tokens, temperature 1")
        print(f"in-process: {local['tokens']} tokens, {rate_l:.1f} tokens/s, first token "
              f"{1e3 * statistics.median(local['first']):.1f} ms (median)")
        print(f"server:     {served['tokens']} tokens, {rate_s:.1f} tokens/s, first token "
              f"{1e3 * statistics.median(served['first']):.1f} ms (median, streamed, client "
              "side)")
        print(f"server, not streamed: {whole['tokens']} tokens, {rate_w:.1f} tokens/s")
        print(f"ratio server / in-process: streamed {rate_s / rate_l:.3f}, not streamed "
              f"{rate_w / rate_l:.3f}")
        session.close()
        long_chat(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
