"""What a remote large role costs: EFT with ``large_base`` behind an engine on loopback
against all-local EFT, at the realistic 1B shape (issue 15).

Writes (once) the random-weight Llama-3.2-1B-shaped large base and the two SmolLM2-135M-
shaped small models (``eft_local.synthetic``, Q8_0, vocabulary 49,152), starts
``eft-local serve -m large_base=1B`` (and llama.cpp's llama-server where its binary is
present) as child processes, and decodes the same token-id prompts at temperature 1 with:

- all-local plain EFT (the default, measured schedule) and adaptive speculative EFT;
- the exact protocol (``/eft/rows``): remote requests while the small models evaluate (the
  default), or before them (``--schedule sequential``);
- the OpenAI protocol (``/v1/completions`` of the same eft-local server) and llama-server's
  ``/completion``, each at K = 20, 100, 1000 log-probs per position;
- speculative decoding with a fixed block of 4 over the exact and the OpenAI (K 100)
  protocols, on the shapes built to predict the next token id (where drafts are accepted),
  against all-local speculative decoding of the same models.

Each configuration: ms per token after the first (median over the prompts), bytes per
token both ways, milliseconds per request and the part the engine did not spend
computing, tokens per remote request. ``--runs`` whole rounds, configurations interleaved;
the table gives each configuration's median over the rounds and the spread (min-max), the
load average before each round, and the ratio to all-local plain EFT. Raw numbers go to
``benchmarks/out/remote.json``.

    python benchmarks/remote.py [--runs 3] [--tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eft_local.sampler import SamplerSettings  # noqa: E402
from eft_local.session import LoadOptions, Session, load_session  # noqa: E402
from eft_local.synthetic import realistic_paths  # noqa: E402
from tests import remotehelp  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
NAMES = ("large_1b", "small_ft", "small_base")


def session(large: str, small: dict[str, Path], threads: int, **options: object) -> Session:
    """Up-scaling with ``large`` (file or URL); end tokens masked so runs have one length."""
    s = load_session(models=[f"large_base={large}", f"small_ft={small['small_ft']}",
                             f"small_base={small['small_base']}"],
                     options=LoadOptions(n_threads=threads, n_ctx=512, **options),  # type: ignore[arg-type]
                     sampling=SamplerSettings(temperature=1.0, seed=1))
    allowed = s.engine.allowed.copy()
    eog = s.report.vocabs[s.preset.template_role].eog
    allowed[[t for t in eog if t < allowed.size]] = False
    s.engine.allowed = allowed
    return s


def prompts(n: int, width: int) -> list[list[int]]:
    """Token-id prompts (the random vocabulary spells no text)."""
    return [[(37 * i + 11 * j) % min(4000, width - 10) + 2 for i in range(16)]
            for j in range(n)]


def decode(s: Session, prompt: list[int], tokens: int) -> tuple[float, list[int], dict]:
    """One cold generation: ms per token after the first, the tokens, remote statistics."""
    for model in s.models.values():
        model.rewind(0)
    s.engine.stats.reset()
    first, out = None, []
    for chunk in s.stream(prompt, max_tokens=tokens):
        if chunk.step is not None:
            out.append(chunk.step.token)
            first = first or time.perf_counter()
    ms = 1e3 * (time.perf_counter() - first) / max(1, len(out) - 1) if first else float("nan")
    stats = s.stats()
    net = stats.get("remote", {}).get("large_base", {})
    if stats.get("drafted_tokens"):
        net = {**net, "drafted": stats["drafted_tokens"], "accepted": stats["accepted_tokens"]}
    return ms, out, net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    plain = realistic_paths(args.out, NAMES)
    agreeing = realistic_paths(args.out / "agreeing", NAMES, agreeing=True)
    cache = args.out / "remote-cache"
    threads = str(args.threads)
    servers = {"plain": remotehelp.eft_serve(
                   ["-m", f"large_base={plain['large_1b']}", "--max-logprobs", "1000",
                    "--n-ctx", "512"], cache),
               "agreeing": remotehelp.eft_serve(
                   ["-m", f"large_base={agreeing['large_1b']}", "--max-logprobs", "1000",
                    "--n-ctx", "512"], cache)}
    for remote in servers.values():  # the thread budget of the local runs, not one thread
        remote.argv[remote.argv.index("--threads") + 1] = threads
    binary = remotehelp.llama_server_binary()
    if binary is not None:
        servers["llama-server"] = remotehelp.llama_server(binary, plain["large_1b"], cache)
        servers["llama-server"].argv[servers["llama-server"].argv.index("-t") + 1] = threads
        servers["llama-server"].argv[servers["llama-server"].argv.index("-c") + 1] = "512"
    for remote in servers.values():
        # the tests' children wait passively (OMP_WAIT_POLICY); these run as eft-local and
        # llama-server run by default, as this process does
        remote.env.pop("OMP_WAIT_POLICY", None)
        remote.start(timeout=600)
    n = args.threads
    url, spec_url = servers["plain"].url, servers["agreeing"].url
    make: dict[str, Callable[[], Session]] = {
        "all-local, plain EFT": lambda: session(str(plain["large_1b"]), plain, n,
                                                speculative=False),
        "exact, remote while local evaluates": lambda: session(url, plain, n,
                                                               speculative=False),
        "exact, remote first (--schedule sequential)": lambda: session(
            url, plain, n, speculative=False, schedule="sequential"),
        **{f"openai, top {k}": (lambda k=k: session(f"{url}#api=openai&top_k={k}", plain, n,
                                                    speculative=False)) for k in args.ks},
        "agreeing: all-local, speculative k=4": lambda: session(
            str(agreeing["large_1b"]), agreeing, n, draft_k=4),
        "agreeing: all-local, plain EFT": lambda: session(
            str(agreeing["large_1b"]), agreeing, n, speculative=False),
        "agreeing: exact, speculative k=4": lambda: session(spec_url, agreeing, n, draft_k=4),
        "agreeing: openai top 100, speculative k=4": lambda: session(
            f"{spec_url}#api=openai&top_k=100", agreeing, n, draft_k=4),
    }
    if binary is not None:
        ls = servers["llama-server"].url
        make.update({f"llama-server, top {k}": (lambda k=k: session(
            f"{ls}#api=llama-server&top_k={k}", plain, n, speculative=False))
            for k in args.ks})
    results: dict[str, list[dict]] = {label: [] for label in make}
    loads = []
    try:
        sessions = {label: build() for label, build in make.items()}
        width = next(iter(sessions.values())).engine.width
        ps = prompts(args.prompts, width)
        for s in sessions.values():  # warm up: schedules measured, caches and pools ready
            decode(s, ps[0], 4)
        for run in range(args.runs):
            loads.append(os.getloadavg()[0])
            print(f"run {run + 1}: load average {loads[-1]:.2f}", file=sys.stderr)
            for label, s in sessions.items():
                runs = [decode(s, p, args.tokens) for p in ps]
                results[label].append({
                    "ms_per_token": statistics.median(r[0] for r in runs),
                    "tokens": [r[1] for r in runs], "network": [r[2] for r in runs]})
        for s in sessions.values():
            s.close()
    finally:
        for remote in servers.values():
            remote.stop()
    report(results, loads, args)


def report(results: dict[str, list[dict]], loads: list[float], args: argparse.Namespace
           ) -> None:
    """The table (markdown) on stdout and every number in remote.json."""
    def med(label: str) -> float:
        return statistics.median(r["ms_per_token"] for r in results[label])

    base = {"": med("all-local, plain EFT"),
            "agreeing: ": med("agreeing: all-local, plain EFT")}
    print(f"1B-shaped large_base + 2 x 135M-shaped small models, Q8_0, vocabulary 49152; "
          f"{args.threads} threads; {args.runs} runs of {args.prompts} prompts x "
          f"{args.tokens} tokens at temperature 1; load average before each run: "
          + ", ".join(f"{x:.2f}" for x in loads))
    print("\n| configuration | ms/token, median (min-max) | x all-local plain | KiB/token | "
          "ms/request (not computing) | tokens/request | same tokens as all-local |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        ms = [r["ms_per_token"] for r in runs]
        group = "agreeing: " if label.startswith("agreeing") else ""
        nets = [net for r in runs for net in r["network"] if "requests" in net]
        ref = results["agreeing: all-local, speculative k=4" if "speculative" in label and group
                      else ("agreeing: all-local, plain EFT" if group else
                            "all-local, plain EFT")]
        same = all(a["tokens"] == b["tokens"] for a, b in zip(runs, ref, strict=True))

        def net(key: str, nets: list = nets) -> float:
            return statistics.median(float(x[key]) for x in nets) if nets else float("nan")

        print(f"| {label} | {statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f}) | "
              f"{base[group] / statistics.median(ms):.2f} | "
              + (f"{net('bytes_per_token') / 1024:.1f} | {net('ms_per_request'):.1f} "
                 f"({net('network_ms_per_request'):.1f}) | {net('tokens_per_request'):.2f}"
                 if nets else "- | - | -")
              + f" | {'yes' if same else 'no'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "remote.json").write_text(json.dumps(
        {"loads": loads, "args": {k: str(v) for k, v in vars(args).items()},
         "results": results}, indent=1))


if __name__ == "__main__":
    main()
