"""Where a joining request's first token goes: the server's own ``timings`` (prompt_ms,
predicted_ms) for 3 prompts to the idle server and 3 that join a 256-token stream, on the
shapes and server of benchmarks/parallel.py (``serve -np 4``, 2 threads).

    python benchmarks/join_timings.py
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel as P  # noqa: E402

from eft_local.synthetic import realistic_paths  # noqa: E402


def timed(url: str, ids: list[int]) -> tuple[float, dict[str, float]]:
    """Seconds to the first streamed text, and the answer's timings."""
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start, first, timings = time.perf_counter(), 0.0, {}
    with P.CLIENT.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if not first and any(c.get("text") for c in data.get("choices", [])):
                first = time.perf_counter() - start
            timings = data.get("timings") or timings
    return first, {k: round(v, 1) for k, v in timings.items()
                   if k in ("prompt_n", "prompt_ms", "predicted_ms")}


def main() -> None:
    files = realistic_paths(P.OUT, names=tuple(P.ROLES.values()))
    server = P.eft_serve({r: files[n] for r, n in P.ROLES.items()}, slots=4, threads=2)
    try:
        P.warm_up(server)
        for k in range(3):
            print("alone", timed(server.url, P.prompt(60 + k, 128)), flush=True)
        times: list[float] = []
        streamer = threading.Thread(target=P.complete, args=(server.url, P.prompt(51), 256),
                                    kwargs={"times": times})
        streamer.start()
        for k in range(3):
            while len(times) < 16 + 40 * k:
                time.sleep(0.005)
            print("join", timed(server.url, P.prompt(70 + 20 * k, 128)), flush=True)
        streamer.join()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
