"""lm-evaluation-harness against ``eft-local serve``: multiple choice on the family's questions.

Runs the real harness (``lm-eval[api]``, its ``local-completions`` model, which scores each
choice with ``/v1/completions``, ``echo: true``, ``logprobs: 1``, ``max_tokens: 1`` and sums
``token_logprobs[ctxlen:-1]``) over a local task made from ``eft_local/family/questions.jsonl``:
each question's context is ``"{prompt}\\n"`` and its choices are the expected answer and
``--choices - 1`` other answers of the same category (town, profession, year), drawn with a
fixed seed. The tokenizer is the server's own (``tokenizer_backend=remote``: ``/tokenize``,
``/detokenize``, ``/tokenizer_info``), so everything runs offline.

The harness lives in its own virtual environment (about 760 MB; not the project's, not the
test extra), created on first use under ``benchmarks/out/``::

    python benchmarks/harness_mc.py                    # tiny-up, tiny-large-ft, tiny-small-ft
    python benchmarks/harness_mc.py --limit 60 --presets tiny-up

Scores go to stdout and ``benchmarks/out/harness/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
QUESTIONS = ROOT / "eft_local" / "family" / "questions.jsonl"
REQUIREMENT = "lm-eval[api]>=0.4.9,<0.5"
TASK = "eft_family_mc"


def ensure_venv(venv: Path) -> Path:
    """The harness's ``lm_eval`` command, installing it into ``venv`` when missing."""
    command = venv / "bin" / "lm_eval"
    if command.exists():
        return command
    print(f"creating {venv} and installing {REQUIREMENT} (about 760 MB)", file=sys.stderr)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", REQUIREMENT], check=True)
    return command


def write_task(folder: Path, n_choices: int, seed: int) -> Path:
    """The multiple-choice data set and the harness's task file; returns the folder."""
    questions = [json.loads(line) for line in QUESTIONS.read_text("utf-8").splitlines()
                 if line.strip()]
    answers: dict[str, list[str]] = {}
    for q in questions:
        answers.setdefault(q["category"], [])
        if q["expected"] not in answers[q["category"]]:
            answers[q["category"]].append(q["expected"])
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "family_mc.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for q in questions:
            others = [a for a in answers[q["category"]] if a != q["expected"]]
            choices = [q["expected"], *rng.sample(others, n_choices - 1)]
            rng.shuffle(choices)
            out.write(json.dumps({"id": q["id"], "prompt": q["prompt"], "choices": choices,
                                  "gold": choices.index(q["expected"])}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}\\n"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"eft-local serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("eft-local serve did not become ready")


def run_preset(preset: str, lm_eval: Path, task_dir: Path, out: Path, *, limit: int | None,
               threads: int) -> dict:
    """Serve ``preset`` (this tree's code) on a loopback port, run the harness against it,
    return its scores."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "eft_local", "serve", preset, "--host",
                               "127.0.0.1", "--port", str(port), "--threads", str(threads)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, server)
        args = ",".join([f"model={preset}", f"base_url={url}/v1/completions",
                         "tokenizer_backend=remote", "tokenized_requests=True",
                         "num_concurrent=1", "max_retries=1"])
        command = [str(lm_eval), "--model", "local-completions", "--model_args", args,
                   "--tasks", TASK, "--include_path", str(task_dir),
                   "--output_path", str(out / preset)]
        if limit:
            command += ["--limit", str(limit)]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    found = sorted((out / preset).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(found[-1].read_text("utf-8"))["results"][TASK]
    return {"preset": preset, "acc": result["acc,none"], "stderr": result.get("acc_stderr,none"),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+",
                        default=["tiny-up", "tiny-large-ft", "tiny-small-ft"])
    parser.add_argument("--limit", type=int, help="Only the first N questions.")
    parser.add_argument("--choices", type=int, default=4, help="Choices per question.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the distractors.")
    parser.add_argument("--threads", type=int, default=2, help="Threads of eft-local serve.")
    parser.add_argument("--venv", type=Path, default=OUT / "lm-eval-venv")
    parser.add_argument("--out", type=Path, default=OUT / "harness")
    args = parser.parse_args()
    lm_eval = ensure_venv(args.venv)
    task_dir = write_task(args.out / "task", args.choices, args.seed)
    rows = []
    for preset in args.presets:
        row = run_preset(preset, lm_eval, task_dir, args.out, limit=args.limit,
                         threads=args.threads)
        rows.append(row)
        print(f"{preset}: acc {row['acc']:.3f} (+- {row['stderr'] or 0:.3f}) "
              f"in {row['seconds']:.0f} s", flush=True)
    (args.out / "results.json").write_text(json.dumps(
        {"choices": args.choices, "seed": args.seed, "limit": args.limit, "rows": rows},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
