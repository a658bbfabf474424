"""Decode schedules: their shapes, predicted costs, the measured choice and its cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.presets import preset_from_paths
from eft_local.sampler import SamplerSettings
from eft_local.schedule import shapes as S
from eft_local.schedule import tuning
from eft_local.session import LoadOptions, Session
from tests import ggufs
from tests.fakes import FakeModel, decode, decoding

SIZES = {"large_base": 1200.0, "small_ft": 160.0, "small_base": 160.0}
COSTS = {"large_base": {1: 0.080, 2: 0.058}, "small_ft": {1: 0.010, 2: 0.007},
         "small_base": {1: 0.010, 2: 0.007}}


def test_named_schedules_and_their_predicted_costs() -> None:
    lanes = S.named("lanes", SIZES, 2)
    first = S.named("large-first", SIZES, 2)
    seq = S.named("sequential", SIZES, 2)
    assert lanes.describe() == "large_base + small_ft,small_base"
    assert first.describe() == "large_base | small_ft + small_base"
    assert seq.describe() == "large_base | small_ft | small_base"
    assert S.predict(lanes, COSTS, 2) == pytest.approx(0.080)  # each lane on one thread
    assert S.predict(first, COSTS, 2) == pytest.approx(0.058 + 0.010)
    assert S.predict(seq, COSTS, 2) == pytest.approx(0.058 + 0.007 + 0.007)
    best = min(S.candidates(SIZES, 2), key=lambda s: S.predict(s, COSTS, 2))
    assert best.describe() == first.describe()
    with pytest.raises(EftError, match="unknown schedule 'fast'"):
        S.named("fast", SIZES, 2)


def test_candidates_are_the_named_schedules() -> None:
    """Issue 18: every run chose a named schedule and every other split timed lost
    (benchmarks/custom_splits.py, docs/benchmarks.md): only the named ones are candidates."""
    found = S.candidates(SIZES, 2)
    assert [s.name for s in found] == list(S.NAMES)
    assert len({tuple(sorted(map(str, s.stages))) for s in found}) == len(found)
    assert all(sorted(s.roles()) == sorted(SIZES) for s in found)
    assert all(len(stage) <= 2 for s in found for stage in s.stages)  # never more lanes


def test_costs_are_measured_at_the_thread_counts_the_schedules_use() -> None:
    assert S.thread_counts(3, 2) == [2, 1]
    assert S.thread_counts(3, 16) == [16, 8, 5]  # not 1..16: lanes of 1, 2 or 3 models
    assert S.thread_counts(2, 1) == [1] and S.thread_counts(1, 8) == [8]
    for n in (2, 3, 7, 16):
        used = {threads for s in S.candidates(SIZES, n) for _, threads in s.threads(n)}
        inactive = {threads for s in S.candidates(SIZES, n)
                    for _, threads in s.threads(n, ("large_base", "small_ft"))}
        assert used | inactive <= set(S.thread_counts(len(SIZES), n)), n


def test_the_split_enumeration_kept_as_evidence_covers_every_split_once() -> None:
    """benchmarks/custom_splits.py times every split against the named schedules."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "custom_splits.py"
    spec = importlib.util.spec_from_file_location("custom_splits", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = mod.splits(sorted(SIZES, key=lambda r: -SIZES[r]), 2)
    assert len({mod.key(s) for s in found}) == len(found)
    assert all(sorted(s.roles()) == sorted(SIZES) for s in found)
    assert all(len(stage) <= 2 for s in found for stage in s.stages)  # never more lanes
    # one stage of two lanes (3 ways), a model then two lanes (3), three stages (1)
    assert len(found) == 7
    assert {mod.key(s) for s in S.candidates(SIZES, 2)} <= {mod.key(s) for s in found}


def test_inactive_models_free_their_threads() -> None:
    lanes = S.named("lanes", SIZES, 2)
    assert list(lanes.threads(2)) == [((("large_base",), ("small_ft", "small_base")), 1)]
    assert list(lanes.threads(2, ("large_base",))) == [((("large_base",),), 2)]


class Threaded(FakeModel):
    """A fake that records the thread count of every evaluation."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.threads = 0
        self.seen: list[tuple[int, int]] = []  # (tokens, threads)

    def set_threads(self, n: int) -> None:
        self.threads = n

    def decode(self, parts, out=None):  # noqa: ANN001, ANN201 - FakeModel.decode's
        self.seen.append((sum(len(p.tokens) for p in parts), self.threads))
        return super().decode(parts, out)


def threaded_engine(schedule: S.Schedule, n_threads: int = 2,
                    models: dict[str, Threaded] | None = None) -> Engine:
    """An engine over three thread-recording fakes (``models``, else new ones)."""
    if models is None:
        models = {r: Threaded(seed=i + 1, size=int(SIZES[r])) for i, r in enumerate(SIZES)}
    return Engine(models, template_role="small_ft", allowed=np.ones(48, dtype=bool),
                  n_threads=n_threads, schedule=schedule)


def test_prompts_use_every_thread_in_turn_and_steps_the_schedule() -> None:
    engine = threaded_engine(S.named("lanes", SIZES, 2))
    models = engine.models
    w = np.array([1.0, 1.0, -1.0], dtype=np.float32)
    decode(engine, list(range(2, 30)), w, SamplerSettings(seed=1), max_tokens=4)
    engine.close()
    for role, model in models.items():
        assert model.seen[0] == (28, 2)  # the prompt: the whole budget
        assert set(model.seen[1:]) == {(1, 1)}, role  # steps: one lane each, one thread


def trio_paths(tmp_path: Path) -> dict[str, Path]:
    return {"large_base": ggufs.write_model(tmp_path / "large.gguf", seed=1, n_embd=64),
            "small_ft": ggufs.write_model(tmp_path / "ft.gguf", seed=2),
            "small_base": ggufs.write_model(tmp_path / "base.gguf", seed=3)}


def session(paths: dict[str, Path], **options: object) -> Session:
    preset = preset_from_paths([f"{r}={p}" for r, p in paths.items()])
    return Session(preset, options=LoadOptions(n_threads=2, **options))  # type: ignore[arg-type]


def test_schedule_measured_at_load_then_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tuning, "CLEAR_MARGIN", 0.0)  # any margin is clear: cached at once
    paths = trio_paths(tmp_path)
    said: list[str] = []
    preset = preset_from_paths([f"{r}={p}" for r, p in paths.items()])
    with Session(preset, options=LoadOptions(n_threads=2), progress=said.append) as s:
        t = s.tuning
        assert t is not None and not t.cached
        assert s.engine.schedule == t.schedule
        assert set(t.costs) == set(paths) and all(set(c) == {1, 2} for c in t.costs.values())
        assert t.measured == t.trials[t.schedule.describe()][1]
        assert len(t.trials) == len(S.NAMES)  # the named schedules, each timed
        assert t.measured == min(m for _, m in t.trials.values())  # the fastest won
        assert any("measuring decode schedules" in m for m in said)
        stats = s.stats()
        assert stats["schedule"] == t.schedule.name
        assert stats["schedule_measured_ratio"] == pytest.approx(t.alone / t.measured)
        sizer = s.speculator.sizer  # adaptive speculation starts from the measured costs
        assert sizer.verify[1] == t.measured
        drafter = s.draft_role()
        for n in tuning.BLOCKS:  # every other model's block, the drafter's last token
            assert sizer.verify[n] == pytest.approx(
                t.costs[drafter][2] + sum(t.blocks[r][n] for r in paths if r != drafter))
    assert tuning.cache_path().is_file()
    with session(paths) as again:
        assert again.tuning is not None and again.tuning.cached
        assert again.tuning.schedule == t.schedule
    paths["small_base"].write_bytes(paths["small_base"].read_bytes())  # new mtime: measure
    with session(paths) as changed:
        assert changed.tuning is not None and not changed.tuning.cached


def measured(steps_ms: dict[S.Schedule, float]) -> tuning.Tuning:
    """A Tuning as :func:`tuning.tune` makes it, from step times given by hand."""
    best = min(steps_ms, key=lambda s: steps_ms[s])
    return tuning.Tuning(schedule=best, predicted=0.01, measured=steps_ms[best] / 1e3,
                         alone=0.03, alone_threads=2, costs=COSTS,
                         blocks={r: {n: 0.01 for n in tuning.BLOCKS} for r in COSTS},
                         trials={s.describe(): (0.01, ms / 1e3) for s, ms in steps_ms.items()})


def test_a_choice_within_the_noise_is_measured_again_until_clear(monkeypatch) -> None:
    """Issue 26: one noisy measurement used to decide the schedule for good. A choice less
    than CLEAR_MARGIN ahead of the runner-up is measured again at the next loads, each
    schedule keeping its fastest time; after MEASUREMENTS the choice is kept."""
    seq = S.named("sequential", SIZES, 2)
    runs = [measured({A: 10.0, B: 10.5, seq: 20.0}),  # lanes by 5%: not clear
            measured({A: 12.0, B: 9.5, seq: 20.0}),  # large-first now; 10 vs 9.5: 5%
            measured({A: 11.0, B: 9.9, seq: 19.0})]  # third and last measurement
    calls = []
    monkeypatch.setattr(tuning, "tune", lambda engine, say=None: calls.append(1) or runs.pop(0))
    engine = threaded_engine(A)
    said: list[str] = []
    first = tuning.tuned(engine, say=said.append)
    assert (first.schedule, first.measurements, first.settled()) == (A, 1, False)
    second = tuning.tuned(engine, say=said.append)
    assert (second.schedule, second.measurements, second.cached) == (B, 2, False)
    assert second.trials == {A.describe(): (0.01, 0.010), B.describe(): (0.01, 0.0095),
                             seq.describe(): (0.01, 0.020)}  # the fastest of each
    assert second.measured == 0.0095 and second.margin() == pytest.approx(0.010 / 0.0095 - 1)
    assert said == ["note: measuring decode schedules again (2 of at most 3): lanes was 5% "
                    "faster than the next, within the 10% of noise"]
    third = tuning.tuned(engine)
    assert (third.schedule, third.measurements, third.settled()) == (B, 3, True)
    assert third.trials[seq.describe()] == (0.01, 0.019)
    kept = tuning.tuned(engine)
    assert kept.cached and kept.schedule == B and len(calls) == 3
    engine.close()


def test_a_choice_with_a_clear_margin_is_kept_at_once(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(tuning, "tune", lambda engine, say=None: calls.append(1) or measured(
        {A: 10.0, B: 12.0}))  # 20% ahead
    engine = threaded_engine(A)
    assert tuning.tuned(engine).settled()
    again = tuning.tuned(engine)
    assert again.cached and again.schedule == A and again.measurements == 1
    assert len(calls) == 1
    assert tuning.tuned(engine, retune=True).measurements == 1 and len(calls) == 2
    engine.close()


def test_named_schedule_overrides_measurement(tmp_path: Path) -> None:
    paths = trio_paths(tmp_path)
    with session(paths, schedule="large-first") as s:
        assert s.tuning is None and s.engine.schedule.name == "large-first"
        assert s.stats()["schedule_stages"] == "large_base | small_ft + small_base"
    with session(paths, parallel=False) as s:
        assert s.engine.schedule.name == "sequential"
    with pytest.raises(EftError, match="invalid schedule 'fastest'"):
        LoadOptions(schedule="fastest")


def test_a_broken_cache_is_measured_again(tmp_path: Path) -> None:
    paths = trio_paths(tmp_path)
    tuning.cache_path().parent.mkdir(parents=True)
    tuning.cache_path().write_text("{not json")
    with session(paths) as s:
        assert s.tuning is not None and not s.tuning.cached


def test_the_cache_key_changes_with_everything_the_costs_depend_on(monkeypatch) -> None:
    """Issue 18: the key named the CPU, the threads and the files, so costs measured on the
    CPU were reused after the models moved to a GPU (or to another context, batch size or
    llama.cpp build)."""
    from eft_local import backend

    def models(**change: object) -> dict[str, FakeModel]:
        out = {}
        for i, role in enumerate(SIZES):
            out[role] = FakeModel(seed=i + 1)
            out[role].n_gpu_layers, out[role].n_batch = 0, 512  # type: ignore[attr-defined]
        for attr, value in change.items():
            setattr(out["small_ft"], attr, value)
        return out

    base = tuning.cache_key(models(), 2)
    assert tuning.cache_key(models(), 2) == base
    for change in ({"n_gpu_layers": -1}, {"n_gpu_layers": 12}, {"n_ctx": 512},
                   {"n_batch": 64}):
        assert tuning.cache_key(models(**change), 2) != base, change
    assert tuning.cache_key(models(), 3) != base
    assert "llama-cpp-python" in backend.build_info()
    monkeypatch.setattr(backend, "build_info", lambda: "llama-cpp-python 9.9; CUDA : ARCHS = 90")
    assert tuning.cache_key(models(), 2) != base


def test_costs_measured_on_the_cpu_are_not_reused_with_gpu_layers(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from eft_local import backend

    monkeypatch.setattr(tuning, "CLEAR_MARGIN", 0.0)  # any margin is clear: cached at once
    paths = trio_paths(tmp_path)
    with session(paths, n_gpu_layers=0) as s:
        assert s.tuning is not None and not s.tuning.cached
    with session(paths, n_gpu_layers=0) as s:
        assert s.tuning is not None and s.tuning.cached
    monkeypatch.setattr(backend.library, "supports_gpu_offload", lambda: True)  # Metal on
    with session(paths, n_gpu_layers=1) as s:  # 1 of 2 layers (output included): partial
        assert s.tuning is not None and not s.tuning.cached
        assert all(m.n_gpu_layers == 1 and not m.offloaded for m in s.models.values())


def test_a_layer_count_is_whole_offload_only_with_the_output_layer() -> None:
    from eft_local.backend import fully_offloaded

    assert fully_offloaded(-1, 16) and fully_offloaded(17, 16) and fully_offloaded(99, 16)
    assert not fully_offloaded(16, 16)  # llama.cpp keeps one layer on the CPU then
    assert not fully_offloaded(0, 16) and not fully_offloaded(3, 16)


def test_fully_offloaded_models_are_neither_thread_tuned_nor_watched(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Issue 18: with every layer on the GPU, CPU thread splits barely matter; load used to
    sweep 1..N threads per model and the watch kept probing while decoding."""
    from eft_local import backend

    paths = trio_paths(tmp_path)
    monkeypatch.setattr(backend.library, "supports_gpu_offload", lambda: True)

    def no_sweep(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("CPU threads measured with every model on the GPU")

    monkeypatch.setattr(tuning, "decode_costs", no_sweep)
    monkeypatch.setattr(tuning, "step_seconds", no_sweep)
    said: list[str] = []
    preset = preset_from_paths([f"{r}={p}" for r, p in paths.items()])
    with Session(preset, options=LoadOptions(n_threads=2), progress=said.append) as s:
        assert all(m.n_gpu_layers == -1 and m.offloaded for m in s.models.values())
        assert s.tuning is None and s.engine.watch is None
        assert s.engine.schedule.name == "sequential"
        stats = s.stats()
        assert "offloaded to the GPU" in stats["schedule_reason"]
        assert "schedule_probes" not in stats
        s.generate("hello there", max_tokens=6)
        assert s.engine.watch is None and s.engine.schedule.name == "sequential"
    assert not any("measuring decode schedules" in m for m in said)
    assert any("offloaded to the GPU" in m for m in said)
    assert not tuning.cache_path().exists()
    with session(paths, schedule="lanes") as s:  # a named schedule is still obeyed
        assert s.engine.schedule.name == "lanes"


# -- choosing again while decoding ---------------------------------------------------------
A, B = S.named("lanes", SIZES, 2), S.named("large-first", SIZES, 2)


def feed(watch, seconds: float, n: int) -> list:
    return [x for x in (watch.observe(seconds) for _ in range(n)) if x is not None]


def test_watch_moves_to_a_faster_schedule_when_the_current_one_slows_down() -> None:
    from eft_local.schedule.watch import Watch

    w = Watch([A, B], {A.describe(): 0.010, B.describe(): 0.012}, window=8, probe=4)
    assert feed(w, 0.011, 8) == []  # within the slack of B's 12 ms: no probe
    assert feed(w, 0.020, 8) == [B]  # a window at 20 ms: try B
    assert w.current is B and w.probes == 1
    assert feed(w, 0.012, 4) == [B]  # B measured faster: stay
    assert w.switches == 1 and w.expected(A) == pytest.approx(0.020)


def test_watch_goes_back_when_the_probe_is_not_clearly_faster() -> None:
    from eft_local.schedule.watch import Watch

    w = Watch([A, B], {A.describe(): 0.010, B.describe(): 0.012}, window=8, probe=4,
              every=16)
    assert feed(w, 0.010, 16) == [B]  # probed every 16 steps anyway
    assert feed(w, 0.0099, 4) == [A]  # 1% faster is noise: back to A
    assert w.current is A and w.switches == 0
    w.models(("large_base",))  # other models evaluated: nothing known about them yet
    assert w.expected(A) is None and feed(w, 0.010, 8) == [B]


def test_decoding_switches_schedules_without_changing_the_tokens() -> None:
    from eft_local.schedule.watch import Watch

    def run(watch: Watch | None) -> tuple[list[int], set[str]]:
        engine = threaded_engine(A)
        engine.watch = watch
        used = set()
        w = np.array([1.0, 1.5, -1.5], dtype=np.float32)
        out = []
        for step in decoding(engine, list(range(2, 12)), w, SamplerSettings(seed=3),
                             max_tokens=40):
            out.append(step.token)
            used.add(engine.schedule.describe())
        engine.close()
        return out, used

    plain, used = run(None)
    assert used == {A.describe()}
    # fake models take microseconds: A "measured at load" at 1 ns per step is always slower
    watched, used = run(Watch([A, B], {A.describe(): 1e-9, B.describe(): 1e-9}, window=4,
                              probe=3))
    assert watched == plain and used == {A.describe(), B.describe()}


def test_schedule_trials_time_the_whole_step_sampler_included(tmp_path: Path,
                                                             monkeypatch) -> None:
    """A trial step is timed around evaluation and the sampler. On a clock that only the
    two advance (evaluation 5 ms, the sampler 20 ms), the median step is exactly 25 ms;
    the sampler outside the timed part would give 5 ms. (It used to sleep 20 ms in the
    sampler and expect the real median to grow by 15 ms, which a busy machine can break.)"""
    from types import SimpleNamespace

    paths = trio_paths(tmp_path)
    clock = [0.0]
    monkeypatch.setattr(tuning, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    with session(paths, schedule="sequential") as s:
        evaluate_each, choose = Engine.evaluate_each, Engine.choose

        def timed_evaluate(self, *args, **kwargs):
            clock[0] += 0.005
            return evaluate_each(self, *args, **kwargs)

        def timed_choose(self, *args, **kwargs):
            clock[0] += 0.020
            return choose(self, *args, **kwargs)

        monkeypatch.setattr(Engine, "evaluate_each", timed_evaluate)
        monkeypatch.setattr(Engine, "choose", timed_choose)
        assert tuning.step_seconds(s.engine, A) == pytest.approx(0.025)


def test_engines_sharing_models_each_get_their_thread_counts() -> None:
    """bench's sessions share loaded models: each engine used to remember the count it had
    set, so after another engine set 1 thread, "2 threads" decoded on 1."""
    two = threaded_engine(S.named("sequential", SIZES, 2))
    models = two.models
    one = threaded_engine(S.named("sequential", SIZES, 1), 1, models)
    for engine in (two, one, two):
        for model in models.values():
            model.seen.clear()
        engine.evaluate_each(0, [5])
        assert {t for m in models.values() for _, t in m.seen} == {engine.n_threads}
    two.close()
    one.close()


def test_watch_checks_less_often_while_nothing_changes() -> None:
    from eft_local.schedule.watch import Watch

    w = Watch([A, B], {A.describe(): 0.010, B.describe(): 0.012}, window=8, probe=2,
              every=16, most=64)
    gaps, steps = [], 0
    for _ in range(400):
        steps += 1
        if w.observe(0.012 if w.current is B else 0.010) is B:
            gaps.append(steps)
            steps = 0
    assert gaps[:4] == [16, 2 + 32, 2 + 64, 2 + 64] and w.switches == 0


def test_speculative_blocks_and_drafts_use_every_thread() -> None:
    """Blocks are short prompts: on 2 cores a 1B model verified 8 tokens in 114 ms on 2
    threads and 221 ms on 1; they used to run in the decode lanes, one thread each."""
    engine = threaded_engine(S.named("lanes", SIZES, 2))
    models = engine.models
    w = np.array([1.0, 1.0, -1.0], dtype=np.float32)
    decode(engine, list(range(2, 12)), w, SamplerSettings(seed=1), max_tokens=12, draft_k=4,
           draft_role="small_ft")
    engine.close()
    blocks = [t for r in ("large_base", "small_base") for n, t in models[r].seen[1:] if n > 1]
    drafts = models["small_ft"].seen[1:]
    assert blocks and set(blocks) == {2}
    assert drafts and {t for _, t in drafts} == {2}


def test_a_probe_left_unfinished_goes_back_to_the_schedule_it_left() -> None:
    """Speculative blocks do not feed the watch: a probe begun in plain steps used to stay
    on the probed schedule through every later block."""
    from eft_local.schedule.watch import Watch

    w = Watch([A, B], {A.describe(): 0.010, B.describe(): 0.012}, window=4, probe=6,
              every=4)
    assert feed(w, 0.010, 4) == [B] and w.current is B  # probing B
    assert w.settle() is A and w.current is A
    assert feed(w, 0.010, 3) == []  # a fresh window, no half probe carried over
    engine = threaded_engine(A)
    engine.watch = Watch([A, B], {A.describe(): 1e-9, B.describe(): 1e-9}, window=2,
                         probe=50)
    weights = np.array([1.0, 1.0, -1.0], dtype=np.float32)
    decode(engine, list(range(2, 8)), weights, SamplerSettings(seed=1), max_tokens=6)
    assert engine.schedule == B  # mid-probe when plain decoding stopped
    decode(engine, list(range(2, 8)), weights, SamplerSettings(seed=1), max_tokens=6,
           draft_k=3, draft_role="small_ft")
    engine.close()
    assert engine.schedule == A
