"""Several conversations at once (issue 23): slots and continuous batching, measured.

At the 1B + 2 x 135M random-weight Q8_0 shapes (``eft_local.synthetic``, written once into
benchmarks/out/), 2 threads, greedy, prompts of token ids (that vocabulary spells no text).
Each invocation runs ``--rounds`` rounds; inside a round the configurations alternate, so
load that comes and goes meets both sides of a ratio. Printed per round, then the median and
the range over the rounds:

- ``concurrent``: ``eft-local serve -np 4``; 4 streaming clients at once against the same 4
  requests one at a time (same server): aggregate completion tokens/s, and whether each
  greedy text equals the one-at-a-time text;
- ``joining``: requests that arrive while another streams 256 tokens: the median time to
  first token of 3 of them against the median of 3 such prompts to the idle server plus 3
  of the stream's steps;
- ``llama-server``: llama.cpp's own ``llama-server -np 4 -c 4x...`` serving the 1B file alone
  (at its best of ``-t 1`` and ``-t --threads``) against ``eft-local serve -np 4`` serving
  that file alone (the one-model formula), 4 clients at once: aggregate tokens/s (skipped in
  one line without the binary:
  ``$EFT_LOCAL_LLAMA_SERVER`` or ~/.cache/eft-local-llama-server/bin/llama-server);
- ``batch``: 32 prompts of ``generate --input -np``'s engine path (:meth:`Session.run_many`
  on one loaded session, token-id prompts), 4 at once against 1 at a time: wall time,
  identical greedy output.

    python benchmarks/parallel.py [--rounds 3] [--tokens 64] [--skip concurrent,...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from eft_local.session import LoadOptions, load_session
from eft_local.synthetic import realistic_paths

OUT = Path(__file__).resolve().parent / "out"
ROLES = {"large_base": "large_1b", "small_ft": "small_ft", "small_base": "small_base"}
CLIENT = httpx.Client(timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int, n: int = 32) -> list[int]:
    """A prompt of ``n`` ordinary token ids, different for each ``i``."""
    return [(97 * i + 31 * k) % 40000 + 100 for k in range(n)]


class Server:
    """A serving process on a loopback port, waited for until ``/health`` answers."""

    def __init__(self, argv: list[str], port: int, health: str = "/health") -> None:
        self.port = port
        self.log = Path(tempfile.mkdtemp()) / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{argv[0]} ended: {self.log.read_text()[-2000:]}")
            try:
                if CLIENT.get(self.url + health).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{argv[0]} did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def eft_serve(models: dict[str, Path], *, slots: int, threads: int) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "eft_local", "serve", "--port", str(port), "--threads",
            str(threads), "-np", str(slots), "--n-ctx", "512", "-t", "0"]
    for role, path in models.items():
        argv += ["-m", f"{role}={path}"]
    if len(models) == 1:
        argv += ["--formula", next(iter(models))]
    return Server(argv, port)


def llama_server(path: Path, binary: Path, *, slots: int, threads: int) -> Server:
    port = free_port()
    return Server([str(binary), "-m", str(path), "--port", str(port), "-np", str(slots),
                   "-c", str(512 * slots), "-t", str(threads), "--no-webui"], port)


def complete(url: str, ids: list[int], tokens: int, *, times: list[float] | None = None
             ) -> tuple[str, int]:
    """One streamed greedy completion of token ids: its text and completion tokens; with
    ``times``, the arrival time of every streamed piece."""
    body = {"prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    text, used = [], 0
    with CLIENT.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices", []):
                if choice.get("text"):
                    text.append(choice["text"])
                    if times is not None:
                        times.append(time.perf_counter())
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
    return "".join(text), used


def at_once(url: str, prompts: list[list[int]], tokens: int) -> tuple[float, list[str]]:
    """All ``prompts`` at once: aggregate tokens/s and the texts."""
    results: list[Any] = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = complete(url, prompts[i], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return sum(n for _, n in results) / seconds, [t for t, _ in results]


def one_at_a_time(url: str, prompts: list[list[int]], tokens: int
                  ) -> tuple[float, list[str]]:
    start = time.perf_counter()
    results = [complete(url, p, tokens) for p in prompts]
    seconds = time.perf_counter() - start
    return sum(n for _, n in results) / seconds, [t for t, _ in results]


def warm_up(server: Server) -> None:
    """llama.cpp sets up its buffers for each new batch shape on first use: let the first
    prompt, single-token steps and batched steps of every size happen before any timing."""
    complete(server.url, prompt(90, 128), 2)
    at_once(server.url, [prompt(91 + i) for i in range(4)], 4)


def concurrent(server: Server, tokens: int, first: str) -> dict[str, Any]:
    prompts = [prompt(i) for i in range(4)]
    if first == "at once":
        together, texts = at_once(server.url, prompts, tokens)
        alone, want = one_at_a_time(server.url, prompts, tokens)
    else:
        alone, want = one_at_a_time(server.url, prompts, tokens)
        together, texts = at_once(server.url, prompts, tokens)
    return {"at_once_tps": together, "one_at_a_time_tps": alone,
            "ratio": together / alone, "same_texts": sum(a == b for a, b in zip(
                texts, want, strict=True)), "first": first}


def joining(server: Server, tries: int = 3) -> dict[str, Any]:
    """First token of a request that arrives while another streams 256 tokens: the median
    of ``tries`` such requests (each a new 128-token prompt, none cached), against the
    median first token of ``tries`` other such prompts to the idle server."""
    alone_firsts: list[float] = []
    for k in range(tries):
        cold: list[float] = []
        start = time.perf_counter()
        complete(server.url, prompt(60 + k, 128), 2, times=cold)  # not cached either
        alone_firsts.append(cold[0] - start)  # its prompt's evaluation (and one step)
    stream_times: list[float] = []
    streamer = threading.Thread(target=complete, args=(server.url, prompt(51), 256),
                                kwargs={"times": stream_times})
    streamer.start()
    firsts: list[float] = []
    for k in range(tries):
        while len(stream_times) < 16 + 40 * k:
            time.sleep(0.005)
        got: list[float] = []
        start = time.perf_counter()
        complete(server.url, prompt(50 + 20 * (k + 1), 128), 2, times=got)
        firsts.append(got[0] - start)
    streamer.join()
    gaps = [b - a for a, b in zip(stream_times, stream_times[1:], strict=False)]
    step = statistics.median(gaps)
    first, alone_first = statistics.median(firsts), statistics.median(alone_firsts)
    return {"first_token_s": first, "alone_first_token_s": alone_first, "step_s": step,
            "bound_s": alone_first + 3 * step, "within": first <= alone_first + 3 * step,
            "streamer_tokens": len(stream_times)}


def batch(paths: dict[str, Path], threads: int, n: int = 32) -> dict[str, Any]:
    """32 prompts, 4 at once against 1 at a time, through one loaded session: the engine
    path of ``generate --input -np`` (:meth:`Session.run_many`); prompts of token ids, since
    this vocabulary spells no text for ``generate --input`` to tokenize."""
    models = [f"{role}={path}" for role, path in paths.items()]
    with load_session(models=models, options=LoadOptions(n_seq=4, n_threads=threads,
                                                         n_ctx=512)) as s:
        def jobs() -> list[tuple[int, Any]]:
            return [(i, (lambda i=i: s.prepare(prompt(i, 24), temperature=0,
                                               max_tokens=32))) for i in range(n)]

        list(s.run_many(jobs()[:4], parallel=4))  # warm up every batch shape
        list(s.run_many(jobs()[:1], parallel=1))
        seconds, texts = {}, {}
        for width in (1, 4):
            start = time.perf_counter()
            texts[width] = {i: r.text for i, r in s.run_many(jobs(), parallel=width)}
            seconds[width] = time.perf_counter() - start
    return {"one_s": seconds[1], "four_s": seconds[4], "ratio": seconds[1] / seconds[4],
            "same_texts": sum(texts[1][i] == texts[4][i] for i in texts[1])}


def summary(name: str, rounds: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rounds]
    return (f"{name} {key}: median {statistics.median(values):.3f} "
            f"(range {min(values):.3f}-{max(values):.3f}, {len(values)} rounds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated: concurrent, joining, "
                    "llama-server, batch")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = realistic_paths(OUT, names=tuple(ROLES.values()))
    paths = {role: files[name] for role, name in ROLES.items()}
    binary = Path(os.environ.get("EFT_LOCAL_LLAMA_SERVER") or
                  Path.home() / ".cache/eft-local-llama-server/bin/llama-server")
    if "llama-server" not in skip and not binary.is_file():
        print(f"llama-server: skipped (no binary at {binary})")
        skip.add("llama-server")
    results: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        if not {"concurrent", "joining"} <= skip:
            server = eft_serve(paths, slots=4, threads=args.threads)
            try:
                warm_up(server)
                if "concurrent" not in skip:
                    results.setdefault("concurrent", []).append(concurrent(
                        server, args.tokens, "at once" if r % 2 else "one at a time"))
                    print(f"round {r + 1} concurrent: {results['concurrent'][-1]}",
                          flush=True)
                if "joining" not in skip:
                    results.setdefault("joining", []).append(joining(server))
                    print(f"round {r + 1} joining: {results['joining'][-1]}", flush=True)
            finally:
                server.stop()
        if "llama-server" not in skip:
            pair: dict[str, float] = {}
            llama_threads = sorted({1, args.threads})  # llama-server at its best -t
            sides = [("eft", args.threads)] + [("llama", t) for t in llama_threads]
            for side, threads in (sides if r % 2 == 0 else sides[::-1]):
                one = (eft_serve({"large_base": paths["large_base"]}, slots=4,
                                 threads=threads) if side == "eft" else
                       llama_server(paths["large_base"], binary, slots=4, threads=threads))
                try:
                    tps = at_once(one.url, [prompt(i) for i in range(4)], args.tokens)[0]
                    pair[side] = max(pair.get(side, 0.0), tps)
                    pair[f"{side}_t{threads}"] = tps
                finally:
                    one.stop()
            results.setdefault("llama-server", []).append(
                {"eft_tps": pair["eft"], "llama_server_tps": pair["llama"],
                 "ratio": pair["eft"] / pair["llama"],
                 **{k: v for k, v in pair.items() if "_t" in k}})
            print(f"round {r + 1} llama-server: {results['llama-server'][-1]}", flush=True)
        if "batch" not in skip:
            results.setdefault("batch", []).append(batch(paths, args.threads))
            print(f"round {r + 1} batch: {results['batch'][-1]}", flush=True)
    print()
    for name, key in (("concurrent", "ratio"), ("concurrent", "at_once_tps"),
                      ("concurrent", "one_at_a_time_tps"), ("joining", "first_token_s"),
                      ("joining", "bound_s"), ("llama-server", "ratio"),
                      ("llama-server", "eft_tps"), ("llama-server", "llama_server_tps"),
                      ("batch", "ratio")):
        if results.get(name):
            print(summary(name, results[name], key))
    for name, n in (("concurrent", 4), ("batch", 32)):
        if results.get(name):
            print(f"{name}: greedy texts equal to one at a time, per round: "
                  f"{[r['same_texts'] for r in results[name]]} of {n}")
    if results.get("joining"):
        print(f"joining: within its prompt + 3 steps in every round: "
              f"{all(r['within'] for r in results['joining'])}")


if __name__ == "__main__":
    main()
