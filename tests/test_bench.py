"""eft-local bench: runs end to end on tiny models and reports against the large model."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from eft_local import bench, synthetic
from eft_local.cli.main import main
from eft_local.schedule.shapes import NAMES


def test_coupling_of_identical_rows_is_perfect_and_the_race_beats_inverse_cdf() -> None:
    pairs = bench.synthetic_pairs(vocab=3000, n=30)
    best, race, inverse = bench.coupling(pairs, seeds=10)
    assert 0 < inverse < race <= best + 0.05
    best, race, inverse = bench.coupling([(p, p) for p, _ in pairs[:5]], seeds=5)
    assert np.isclose(best, 1.0, atol=1e-5) and race == inverse == 1.0


def test_bench_end_to_end(family, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SAMPLER_VOCABS", (1000,))
    result = CliRunner().invoke(main, ["bench", *family.trio(), "--repeats", "1",
                                       "--max-tokens", "4", "--prompt-tokens", "16",
                                       "--threads", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "load average" in out and "machine:" in out
    assert "large_base alone, 1 thread(s)" in out and "large_base alone, 2 thread(s)" in out
    assert "plain EFT, auto (" in out and "x best large alone" in out
    # every schedule and speculative decoding give plain auto's tokens (a "NO" is a bug)
    same = [same for label, (_ms, _x, _acc, same) in decoding_rows(out.splitlines()).items()
            if label.startswith(("plain EFT, ", "speculative EFT, "))]
    assert same == ["yes"] * (len(NAMES) + 2), same  # each named schedule, auto, speculative
    assert "speculative / plain (auto)" in out and "the live watch probed" in out
    assert "blocks of median" in out and "block costs measured again" in out
    # the baseline: llama.cpp alone in processes of its own, each OpenMP setting, 1..N threads
    for how in bench.COMPETITOR_ENVS:
        for t in (1, 2):
            assert f"llama.cpp alone, own process, {how}, {t} thread(s):" in out
    assert "llama.cpp alone at its best (above)" in out
    assert "speculative decoding: costs measured at load" in out and "x plain" in out
    assert "time to first token" in out and "overhead per step" in out
    assert "vocab    1000 zipf  T=1" in out


def test_bench_runs_models_whose_vocabulary_cannot_spell_its_prompts(tmp_path, monkeypatch
                                                                      ) -> None:
    """Random-weight models with token texts t0, t1, ... (as --realistic writes them) used
    to fail with "empty prompt" under -m: their tokenizer cannot spell the text prompts."""
    from eft_local.gguf_writer import LlamaShape, write_llama_gguf

    v = 300
    tok = synthetic.realistic_tokenizer(v)
    shape = LlamaShape(n_vocab=v, n_embd=32, n_layer=2, n_head=4, n_head_kv=2, n_ff=64,
                       n_ctx_train=256)
    paths = {role: write_llama_gguf(tmp_path / f"{role}.gguf", shape=shape, tokenizer=tok,
                                    seed=i, name=role)
             for i, role in enumerate(("large_base", "small_ft", "small_base"))}
    monkeypatch.setattr(bench, "SAMPLER_VOCABS", (1000,))
    result = CliRunner().invoke(main, ["bench", *[f"-m{r}={p}" for r, p in paths.items()],
                                       "--repeats", "1", "--max-tokens", "4",
                                       "--prompt-tokens", "16", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "plain EFT, sequential" in result.output


def test_agreeing_models_predict_the_next_token_id(tmp_path) -> None:
    """bench --agreeing: models of any width built by next_token_tensors put most of their
    probability on token t + 1 after t, so a drafter and its targets agree."""
    from eft_local.backend import LlamaModel
    from eft_local.gguf_writer import LlamaShape, write_llama_gguf

    v = 512
    tok = synthetic.realistic_tokenizer(v)
    for seed, width in ((1, 64), (2, 128)):
        shape = LlamaShape(n_vocab=v, n_embd=width, n_layer=2, n_head=4, n_head_kv=2,
                           n_ff=2 * width, n_ctx_train=256)
        path = write_llama_gguf(tmp_path / f"m{seed}.gguf", shape=shape, tokenizer=tok,
                                tensors=synthetic.next_token_tensors(shape, seed), name="m")
        model = LlamaModel(str(path), n_ctx=64, n_threads=1)
        try:
            tokens = list(range(100, 120))
            rows = model.eval(tokens, all_logits=True)
        finally:
            model.close()
        p = np.exp(rows - rows.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        assert (rows.argmax(axis=1) == np.array(tokens) + 1).all()
        assert np.median(p[np.arange(len(tokens)), np.array(tokens) + 1]) > 0.5
    plain = write_llama_gguf(tmp_path / "plain.gguf", shape=shape, tokenizer=tok, name="p")
    model = LlamaModel(str(plain), n_ctx=64, n_threads=1)
    try:  # the random weights alone do not: the construction is what agrees
        assert (model.eval(tokens, all_logits=True).argmax(axis=1)
                != np.array(tokens) + 1).mean() > 0.9
    finally:
        model.close()


def test_the_baseline_offloads_the_layers_the_eft_runs_offload(family, monkeypatch) -> None:
    """Issue 18: llama.cpp alone was loaded with n_gpu_layers=0 while the EFT sessions
    offloaded every layer: on Metal or CUDA the ratio compared GPU EFT with CPU llama.cpp.
    ``--gpu-layers`` (and the default, all where supported) reaches the baseline: the
    processes of its own and the in-process overhead line."""
    import subprocess

    from eft_local import backend

    monkeypatch.setattr(backend.library, "supports_gpu_offload", lambda: True)  # a GPU build
    monkeypatch.setattr(bench, "SAMPLER_VOCABS", (1000,))
    argvs: list[list[str]] = []
    real_run = subprocess.run

    def spy_run(cmd, *args, **kwargs):
        argvs.append(list(cmd[3:]))  # after python -c CODE: path, threads, prompt, layers
        return real_run(cmd, *args, **kwargs)

    layers: list[int] = []
    real_speed = backend.raw_speed

    def spy_speed(*args, **kwargs):
        layers.append(kwargs.get("n_gpu_layers", 0))
        return real_speed(*args, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", spy_run)
    monkeypatch.setattr(backend.tools, "raw_speed", spy_speed)
    result = CliRunner().invoke(main, ["bench", *family.trio(), "--repeats", "1",
                                       "--max-tokens", "3", "--prompt-tokens", "0",
                                       "--threads", "1", "--gpu-layers", "1"])
    assert result.exit_code == 0, result.output
    assert "(1 GPU layers, as in the EFT runs)" in result.output
    assert argvs and all(argv[-1] == "1" for argv in argvs)  # every llama.cpp-alone run
    assert layers and set(layers) == {1}  # the overhead line's raw decodes


def test_raw_speed_loads_the_layers_it_is_given(tmp_path, monkeypatch) -> None:
    from eft_local import backend

    seen: list[int] = []

    class Loaded(Exception):
        pass

    def fake_load(path, *, vocab_only: bool, n_gpu_layers: int):
        seen.append(n_gpu_layers)
        raise Loaded

    monkeypatch.setattr(backend.model, "_load_model", fake_load)
    for n in (0, -1, 7):
        with pytest.raises(Loaded):
            backend.raw_speed(tmp_path / "m.gguf", n_threads=1, n_gpu_layers=n)
    assert seen == [0, -1, 7]


def test_the_baseline_runs_between_the_repeats_of_the_eft_rows(family, monkeypatch) -> None:
    """Issue 18 (why reruns differ): llama.cpp alone was timed only before and after the
    decoding table, so load that came or went in between flattered or hurt the ratio. Its
    runs now stand between the table's repeats too."""
    import subprocess

    monkeypatch.setattr(bench, "SAMPLER_VOCABS", (1000,))
    n_envs = len(bench.COMPETITOR_ENVS)  # each OpenMP setting at 1 thread
    events: list[str] = []
    real_run, real_decode = subprocess.run, bench.decode_once

    def spy_run(cmd, *args, **kwargs):
        if bench._COMPETITOR_CODE in cmd:
            events.append("rival")
        return real_run(cmd, *args, **kwargs)

    def spy_decode(runner, *args, **kwargs):
        events.append("eft")
        return real_decode(runner, *args, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", spy_run)
    monkeypatch.setattr(bench, "decode_once", spy_decode)
    result = CliRunner().invoke(main, ["bench", *family.trio(), "--repeats", "3",
                                       "--max-tokens", "2", "--prompt-tokens", "0",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "between its repeats" in result.output
    assert events[:n_envs] == ["rival"] * n_envs  # before the table
    runs = "".join("r" if e == "rival" else "e" for e in events[n_envs:])
    # warm-up and repeat 1, the baseline, repeat 2, the baseline, repeat 3, the baseline
    # after the table (then the overhead line's decodes)
    m = re.fullmatch(rf"(e+)(r{{{n_envs}}})(e+)(r{{{n_envs}}})(e+)(r{{{n_envs}}})(e*)", runs)
    assert m is not None, runs
    assert len(m[3]) == len(m[5]) < len(m[1])


def fake_runner(label: str, ms: list[float], outputs: list[list[int]], *,
                alone_threads: int | None = None, accepted: int = 0, drafted: int = 0,
                remote: list[dict] | None = None) -> bench.Runner:
    """A Runner with its measurements set by hand (no model); the session has what
    print_decoding reads of it."""
    session = SimpleNamespace(
        engine=SimpleNamespace(watch=None, schedule=SimpleNamespace(name="lanes")),
        speculator=SimpleNamespace(block_sizes=[2, 4, 4], plain_generations=1, remeasured=0,
                                   sizer=SimpleNamespace(alpha=0.75)))
    return bench.Runner(label, session, alone_threads=alone_threads, ms=ms,  # type: ignore[arg-type]
                        accepted=accepted, drafted=drafted, outputs=outputs,
                        remote=remote or [])


def decoding_rows(lines: list[str]) -> dict[str, tuple[float, float, str, str]]:
    """print_decoding's table: label -> (ms/token, x best, accept, same tokens as plain)."""
    rows = {}
    for line in lines:
        m = re.fullmatch(r"(.{48}) +([\d.]+) +([\d.]+) +(\S+) (\S+)", line)
        if m:
            rows[m[1].strip()] = (float(m[2]), float(m[3]), m[4], m[5])
    return rows


def test_decoding_table_ratios_and_same_tokens_on_known_runs() -> None:
    """Issue 26: the ratio column is the baseline's ms over the row's (the baseline: the
    fastest median of the large model alone here and llama.cpp alone's best configuration by
    its median), and "same tokens as plain" compares each row's tokens with plain auto's."""
    same, other = [[5, 6, 7], [8, 9]], [[5, 6, 7], [8, 10]]
    runners = [
        fake_runner("large_base alone, 1 thread(s)", [30.0, 20.0, 40.0], same, alone_threads=1),
        fake_runner("large_base alone, 2 thread(s)", [25.0], other, alone_threads=2),
        fake_runner("plain EFT, lanes", [80.0, 50.0, 60.0], other),
        fake_runner("plain EFT, sequential", [50.0], same),
        fake_runner("plain EFT, auto (sequential at load, watched)", [40.0], same,
                    remote=[{"large_base": {"ms_per_request": v, "network_ms_per_request": 1.0,
                                            "bytes_per_token": 2048.0,
                                            "tokens_per_request": 1.0}}
                            for v in (10.0, 30.0, 20.0)]),
        fake_runner("speculative EFT, adaptive, auto schedule", [16.0], same,
                    accepted=3, drafted=4)]
    rival = bench.Competitor()
    for decode in (0.030, 0.010, 0.020):  # median 20 ms: the best configuration by median
        rival.add("a", decode, None)
    for decode in (0.005, 0.050, 0.060):  # the fastest single run, but median 50 ms
        rival.add("b", decode, None)
    assert rival.best_decode() == (0.020, "a")
    lines: list[str] = []
    medians = bench.print_decoding(lines.append, runners, rival)
    assert medians["plain EFT, lanes"] == 60.0 and medians["large_base alone, 1 thread(s)"] == 30
    rows = decoding_rows(lines)
    assert rows == {  # the baseline: llama.cpp alone's 20 ms, under the 25 ms here
        "llama.cpp alone at its best (above)": (20.0, 1.0, "-", "-"),
        "large_base alone, 1 thread(s)": (30.0, 0.67, "-", "-"),
        "large_base alone, 2 thread(s)": (25.0, 0.8, "-", "-"),
        "plain EFT, lanes": (60.0, 0.33, "-", "NO"),
        "plain EFT, sequential": (50.0, 0.4, "-", "yes"),
        "plain EFT, auto (sequential at load, watched)": (40.0, 0.5, "-", "yes"),
        "speculative EFT, adaptive, auto schedule": (16.0, 1.25, "0.75", "yes")}
    assert "speculative / plain (auto): 2.500x" in lines
    assert any("large_base over the network: 20.00 ms per request (1.00 ms not computing), "
               "2.0 KiB per token, 1.00 tokens per request" in line for line in lines)
    assert "3 blocks of median 4 drafts; 1 generation(s) handed to plain" in "\n".join(lines)
    lines.clear()  # without llama.cpp alone: the large model alone here at its best, 25 ms
    bench.print_decoding(lines.append, runners)
    rows = decoding_rows(lines)
    assert "llama.cpp alone at its best (above)" not in rows
    assert rows["large_base alone, 2 thread(s)"][1] == 1.0
    assert rows["plain EFT, auto (sequential at load, watched)"][1] == 0.62  # 25 / 40
    assert rows["speculative EFT, adaptive, auto schedule"][1] == 1.56  # 25 / 16
