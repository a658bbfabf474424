"""``eft-local bench``: decoding speed against the strongest baseline, side by side.

Every ratio is against the largest model alone at its best: llama.cpp driven through its
low-level API with nothing around it, offloading to the GPU the layers the EFT runs offload,
in a process of its own under each OpenMP wait
setting llama.cpp runs with elsewhere (:data:`COMPETITOR_ENVS`) at 1..N threads, measured
before the decoding runs, between their repeats and after them (so that load which comes
and goes meets both sides), and the large model alone through eft-local (1..N
threads); the fastest of all is the baseline. For each model set (a preset, by default
the bundled family; with ``--realistic`` random-weight models shaped like Llama-3.2-1B and
SmolLM2-360M over two SmolLM2-135M-shaped small models) one run prints: the machine, the
load average and the schedule chosen at load (predicted and measured ratio); ms per
generated token of the large model alone at each thread count, of plain EFT under every
named schedule and the chosen one (which the live watch may change while decoding), and
of adaptive speculative EFT; time to first token on a long prompt (each model with every
thread in turn). Then the acceptance of the draft/mix coupling at temperature 1 (the race
now, the inverse-CDF draw before, against the optimum sum(min(p, q))), the sampler's cost
per step (:func:`sampler_costs`) and eft-local's per-step overhead against raw
llama-cpp-python decoding. Configurations run interleaved, ``--repeats`` times; figures
are medians. Measurements to read, not tests: nothing here asserts a speed. Only the
public API is used (:class:`~eft_local.session.Session`, its engine's public methods and
the model protocol). The command is :mod:`eft_local.cli.bench`; the realistic-size models
are :mod:`eft_local.synthetic`'s.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eft_local import sampler
from eft_local.engine import Engine
from eft_local.sampler import SamplerSettings
from eft_local.schedule import tuning
from eft_local.schedule.tuning import machine

if TYPE_CHECKING:  # the CLI imports this module lazily; the session is imported on use
    from eft_local.session import Session

SAMPLER_VOCABS = (32000, 49152, 128256, 152064)
RAW_PROMPTS = ("Tel Dilbux was born in", "Steim Driththaend works as a", "Kryn Keilnous",
               "The people of Quiburg")
"""Defaults written for the bundled family's world (eft_local/family/world.jsonl)."""

Say = Callable[[str], None]


# -- one configuration, measured -----------------------------------------------------------
@dataclass
class Runner:
    """A session over shared, already loaded models, decoding one way."""

    label: str
    session: Session
    alone_threads: int | None = None  # set for "large model alone" rows
    ms: list[float] = field(default_factory=list)  # per generated token, decode only
    accepted: int = 0
    drafted: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    remote: list[dict] = field(default_factory=list)  # per run: Session.remote_stats()

    def median_ms(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")


def network(runner: Runner) -> dict[str, str]:
    """Per remote role, medians over the runs: waiting and network time per request, bytes
    per token, tokens per request."""
    roles = {role for run in runner.remote for role in run}
    out = {}
    for role in sorted(roles):
        runs = [run[role] for run in runner.remote if role in run]

        def med(key: str, runs: list = runs) -> float:
            return statistics.median(float(x[key]) for x in runs)

        out[role] = (f"{med('ms_per_request'):.2f} ms per request ("
                     f"{med('network_ms_per_request'):.2f} ms not computing), "
                     f"{med('bytes_per_token') / 1024:.1f} KiB per token, "
                     f"{med('tokens_per_request'):.2f} tokens per request")
    return out


def model_bytes(model: object) -> int:
    """A local model's file size; 0 for a remote one."""
    return 0 if getattr(model, "remote", False) else Path(model.path).stat().st_size  # type: ignore[attr-defined]


def decode_once(runner: Runner, prompt: list[int], max_tokens: int) -> None:
    """One cold generation (every cache emptied first) through ``Session.stream``; adds the
    decode time per token after the first (time to first token is measured apart)."""
    s = runner.session
    for model in s.models.values():
        model.rewind(0)
    s.engine.stats.reset()
    first = None
    tokens = []
    for chunk in s.stream(prompt, max_tokens=max_tokens):
        if chunk.step is not None:
            tokens.append(chunk.step.token)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if first is not None and len(tokens) > 1:
        runner.ms.append(1e3 * (end - first) / (len(tokens) - 1))
    stats = s.engine.stats
    runner.accepted += stats.accepted
    runner.drafted += stats.drafted
    runner.outputs.append(tokens)
    runner.remote.append(s.remote_stats().get("remote", {}))


def derived(base: Session, *, formula: str | None = None, **options: object) -> Session:
    """A session over ``base``'s loaded models with other load options (same knobs)."""
    from eft_local.session import LoadOptions, Session

    preset = base.preset if formula is None else base.preset.with_formula(formula)
    opts = LoadOptions(n_ctx=base.options.n_ctx, **options)
    s = Session(preset, models=base.models, report=base.report,
                options=opts, sampling=base.sampling)
    s.engine.allowed = base.engine.allowed
    return s


# -- the competitor: llama.cpp alone, in a process of its own ---------------------------------
COMPETITOR_ENVS = {"libgomp default": {"GOMP_SPINCOUNT": "300000"},
                   "OMP_WAIT_POLICY=active": {"OMP_WAIT_POLICY": "active"}}
"""OpenMP settings llama.cpp runs under elsewhere: libgomp's default for an unset wait
policy (300,000 spins before a waiting worker sleeps) and spinning without end. OpenMP
reads them once per process, so each runs in a process of its own."""
_COMPETITOR_CODE = (
    "import json, sys\n"
    "from eft_local.backend import raw_speed\n"
    "d, p = raw_speed(sys.argv[1], n_threads=int(sys.argv[2]), n_tokens=24, "
    "prompt_tokens=int(sys.argv[3]), n_gpu_layers=int(sys.argv[4]))\n"
    "print(json.dumps([d, p]))\n")


@dataclass
class Competitor:
    """llama.cpp alone: each configuration's runs, and the best configuration by the median
    of its runs (the best of many runs of one configuration would flatter it)."""

    runs: dict[str, list[float]] = field(default_factory=dict)
    prompts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, how: str, decode: float, prefill: float | None) -> None:
        self.runs.setdefault(how, []).append(decode)
        if prefill is not None:
            self.prompts.setdefault(how, []).append(prefill)

    @staticmethod
    def _best(found: dict[str, list[float]]) -> tuple[float, str]:
        if not found:
            return float("inf"), ""
        how = min(found, key=lambda k: statistics.median(found[k]))
        return statistics.median(found[how]), how

    def best_decode(self) -> tuple[float, str]:
        """Seconds per token of the best configuration, and which it was ("" if none)."""
        return self._best(self.runs)

    def best_prefill(self) -> tuple[float, str]:
        """Seconds per prompt of the best configuration, and which it was ("" if none)."""
        return self._best(self.prompts)


def competitor(say: Say, path: Path, n_threads: int, prompt_tokens: int,
               best: Competitor | None = None, *, n_gpu_layers: int = 0) -> Competitor:
    """llama.cpp alone on ``path`` through its low-level API (:func:`backend.raw_speed`)
    under every :data:`COMPETITOR_ENVS` setting at 1..N threads, each in a fresh process,
    with ``n_gpu_layers`` offloaded (those of the EFT runs it is compared with); a prompt of
    ``prompt_tokens`` is timed with every thread. Prints one line per run."""
    best = best or Competitor()
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for label, extra in COMPETITOR_ENVS.items():
        for t in range(1, n_threads + 1):
            prompt = prompt_tokens if t == n_threads else 0
            argv = [str(path), str(t), str(prompt), str(n_gpu_layers)]
            out = subprocess.run([sys.executable, "-c", _COMPETITOR_CODE, *argv],
                                 env=base_env | extra, capture_output=True, text=True,
                                 timeout=600)
            if out.returncode != 0:
                say(f"  llama.cpp alone, {label}, {t} thread(s): failed "
                    f"({out.stderr.strip().splitlines()[-1:]})")
                continue
            decode, prefill = json.loads(out.stdout.strip().splitlines()[-1])
            how = f"llama.cpp alone, own process, {label}, {t} thread(s)"
            best.add(how, decode, prefill)
            say(f"  {how}: {1e3 * decode:.2f} ms/token"
                + (f", {prompt}-token prompt {prefill:.2f} s" if prefill is not None else ""))
    return best


def runners_for(base: Session, large: str, n_threads: int, *, speculative: bool = True
                ) -> list[Runner]:
    """Large alone at 1..N threads, plain EFT under each schedule, adaptive speculative."""
    from eft_local.schedule.shapes import NAMES

    out = [Runner(f"{large} alone, {t} thread(s)",
                  derived(base, formula=large, n_threads=t, schedule="sequential",
                          speculative=False), alone_threads=t)
           for t in range(1, n_threads + 1)]
    for name in NAMES:
        out.append(Runner(f"plain EFT, {name}",
                          derived(base, n_threads=n_threads, schedule=name, speculative=False)))
    out.append(Runner(f"plain EFT, auto ({base.engine.schedule.name} at load, watched)",
                      derived(base, n_threads=n_threads, schedule="auto", speculative=False)))
    if speculative:
        out.append(Runner("speculative EFT, adaptive, auto schedule",
                          derived(base, n_threads=n_threads, schedule="auto")))
    return out


def measure_decoding(base: Session, large: str, prompts: Sequence[list[int]],
                     n_threads: int, max_tokens: int, repeats: int,
                     between: Callable[[], object] | None = None) -> list[Runner]:
    """Interleaved decode runs of every configuration (:func:`runners_for`); ``between``
    (the baseline's runs) is called before each repeat but the first."""
    runners = runners_for(base, large, n_threads)
    for r in runners:  # warm-up
        decode_once(r, prompts[0], max(4, max_tokens // 4))
        r.ms.clear()
        r.outputs.clear()
        r.accepted = r.drafted = 0
    for i in range(repeats):
        if i and between is not None:
            between()
        for r in runners:
            for p in prompts:
                decode_once(r, p, max_tokens)
    for r in runners:
        r.session.engine.close()
    return runners


def print_decoding(say: Say, runners: Sequence[Runner], rival: Competitor | None = None
                   ) -> dict[str, float]:
    """The table of :func:`measure_decoding`'s runs; returns label -> median ms/token. The
    baseline is the fastest of the large model alone in this process and ``rival``."""
    best = min(r.median_ms() for r in runners if r.alone_threads)
    plain = next(r for r in runners if r.label.startswith("plain EFT, auto"))
    say(f"{'configuration':48} {'ms/token':>9} {'x best large alone':>18} {'accept':>7} "
        "same tokens as plain")
    decode, how = rival.best_decode() if rival is not None else (0.0, "")
    if how:
        best = min(best, 1e3 * decode)
        say(f"{'llama.cpp alone at its best (above)':48} {1e3 * decode:9.2f} "
            f"{best / (1e3 * decode):18.2f}       - -")
    for r in runners:
        acc = f"{r.accepted / r.drafted:.2f}" if r.drafted else "-"
        same = "-" if r.alone_threads else ("yes" if r.outputs == plain.outputs else "NO")
        say(f"{r.label[:48]:48} {r.median_ms():9.2f} {best / r.median_ms():18.2f} {acc:>7} {same}")
    for r in runners:
        for role, net in network(r).items():
            say(f"  {r.label[:46]}: {role} over the network: {net}")
    spec = next((r for r in runners if r.label.startswith("speculative")), None)
    if spec is not None:
        say(f"speculative / plain (auto): {plain.median_ms() / spec.median_ms():.3f}x")
        sp = spec.session.speculator
        sizes = sp.block_sizes
        say(f"{spec.label}, since load: {len(sizes)} blocks of median "
            f"{statistics.median(sizes) if sizes else 0:g} drafts; "
            f"{sp.plain_generations} generation(s) handed to plain decoding; block costs "
            f"measured again {sp.remeasured} time(s); acceptance estimate {sp.sizer.alpha:.2f}")
    for r in (plain, spec):
        w = None if r is None else r.session.engine.watch
        if r is not None and w is not None:
            say(f"{r.label}: the live watch probed {w.probes} time(s), switched {w.switches}, "
                f"ended on {r.session.engine.schedule.name}")
    return {r.label: r.median_ms() for r in runners}


def speculation_costs(say: Say, s: Session, alphas: Sequence[float] = (
        0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)) -> None:
    """Speculative decoding's costs as measured at load (one drafted token; verifying
    blocks of 2, 4 and 8 tokens) and what the block sizer's model makes of them at each
    per-token acceptance: the best block size and its ms per token against a plain step.
    Random-weight models cannot show a real acceptance; this shows the one it takes."""
    t = s.tuning
    if t is None or s.speculator.sizer.draft_step is None:
        return
    sizer = s.speculator.sizer  # started from the load-time costs; read, not changed
    say(f"\n### speculative decoding: costs measured at load, drafter {s.draft_role()}")
    say(f"plain step {1e3 * t.measured:.1f} ms; drafted token {1e3 * sizer.draft_step:.2f} ms; "
        "verifying a block of " + ", ".join(f"{n}: {1e3 * v:.1f} ms"
                                            for n, v in sorted(sizer.verify.items()) if n > 1))
    say(f"{'acceptance per drafted token':30} {'best block':>10} {'ms/token':>9} "
        f"{'x plain':>8}")
    for a in alphas:
        k = max(range(sizer.k_max + 1), key=lambda k: sizer.rate(k, a))
        say(f"{a:30.2f} {k:10d} {1e3 / sizer.rate(k, a):9.1f} "
            f"{sizer.rate(k, a) * t.measured:8.2f}")


def first_token_table(say: Say, base: Session, large: str, n_tokens: int, n_threads: int,
                      repeats: int, rival: Competitor | None = None) -> None:
    """Seconds to evaluate an ``n_tokens`` prompt: the large model alone with every thread,
    and every model with every thread in turn (what eft-local does); against the fastest of
    the large model alone here and ``rival``."""
    eng = base.engine
    prompt = [(37 * i) % max(1, min(4000, eng.width - 10)) + 5 for i in range(n_tokens)]
    ways = {f"{large} alone, {n_threads} thread(s), this process": (large,),
            "EFT, each model with every thread in turn": eng.roles}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for label, roles in ways.items():
            for model in eng.models.values():
                model.rewind(0)
            start = time.perf_counter()
            eng.evaluate_each(0, prompt, roles=roles, prefill=True)
            times[label].append(time.perf_counter() - start)
    alone = statistics.median(next(iter(times.values())))
    say(f"{'prompt of ' + str(n_tokens) + ' tokens':48} {'seconds':>9} {'x large alone':>14}")
    prefill, how = rival.best_prefill() if rival is not None else (0.0, "")
    if how:
        alone = min(alone, prefill)
        say(f"{'llama.cpp alone at its best (above)':48} {prefill:9.2f} {prefill / alone:14.2f}")
    for label, ts in times.items():
        say(f"{label:48} {statistics.median(ts):9.2f} {statistics.median(ts) / alone:14.2f}")


# -- coupling: how often the draft equals the mix's draw -----------------------------------
def coupling(pairs: Sequence[tuple[np.ndarray, np.ndarray]], seeds: int = 40
             ) -> tuple[float, float, float]:
    """Mean over positions of sum(min(p, q)) (the best any coupling can do), and of the
    agreement of the race (:func:`sampler.race`, now) and of the inverse-CDF draw in token
    order (before), each over ``seeds`` seeds; ``pairs`` are (mix, draft) log-prob rows."""
    optimum, race, inverse = [], [], []
    for pos, (lp, lq) in enumerate(pairs):
        p, q = np.exp(lp), np.exp(lq)
        optimum.append(float(np.minimum(p, q).sum()))
        race.append(np.mean([sampler.race(p, s, pos) == sampler.race(q, s, pos)
                             for s in range(seeds)]))
        inverse.append(np.mean([sampler.draw(lp, u) == sampler.draw(lq, u) for u in
                                (sampler.uniform_for(s, pos) for s in range(seeds))]))
    return float(np.mean(optimum)), float(np.mean(race)), float(np.mean(inverse))


def session_pairs(session: Session, prompts: Sequence[list[int]], max_tokens: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mix, drafter) log-prob rows at every step of plain generations at temperature 1."""
    s = session
    eng: Engine = s.engine
    w = s.weights()
    drafter = eng.index(s.draft_role())
    settings = SamplerSettings(temperature=1.0, seed=5)
    pairs = []
    for prompt in prompts:
        for model in eng.models.values():
            model.rewind(0)
        request = s.prepare(prompt, sampling=settings, max_tokens=max_tokens, diagnostics=True)
        plain = replace(request, plan=replace(request.plan, drafter=None))
        for chunk in s.run(plain):
            if chunk.step is not None:
                rows = eng.last[0]  # type: ignore[index]
                pairs.append((eng.distribution(rows, w, settings),
                              eng.model_logprobs(rows, drafter)))
    return pairs


def synthetic_pairs(vocab: int = 49152, n: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """Realistic-shaped rows: a Zipf-like ranking shared by three models with per-model
    noise; the mix is large + ft - base, the draft is ft."""
    rng = np.random.default_rng(vocab)
    ranked = -1.5 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    out = []
    for _ in range(n):
        shared = ranked[rng.permutation(vocab)]
        rows = (shared + 0.5 * rng.standard_normal((3, vocab))).astype(np.float32)
        mix = sampler.mix_logits(rows, np.array([1.0, 1.0, -1.0], np.float32))
        out.append((mix, sampler.log_softmax(rows[1])))
    return out


def print_coupling(say: Say, label: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
                   ) -> None:
    best, race, inverse = coupling(pairs)
    say(f"{label:44} {len(pairs):5d} {best:8.3f} {race:6.3f} ({race / best:.2f}) "
        f"{inverse:8.3f} ({inverse / best:.2f})")


# -- sampler and per-step overhead ---------------------------------------------------------
def sampler_costs(vocabs: Sequence[int] | None = None, repeats: int = 30
                  ) -> list[tuple[int, str, str, float]]:
    """Median ms of one :meth:`Engine.choose` (3 models) on synthetic rows per vocabulary.

    Two row shapes: ``zipf`` (a Zipf-like ranking with per-model noise, peaked like a
    language model's) and ``flat`` (normal logits, sd 3: the worst case for top-p).
    """
    out = []
    settings = {"T=1": SamplerSettings(), "T=0": SamplerSettings(temperature=0.0),
                "T=0.7 top_p=0.9": SamplerSettings(temperature=0.7, top_p=0.9),
                "conservative 0.9": SamplerSettings(conservative_top_p=0.9),
                "penalties n=64": SamplerSettings(
                    repeat_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5,
                    dry_multiplier=0.8, dry_sequence_breakers=()),
                "penalties n=4096": SamplerSettings(
                    repeat_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5,
                    dry_multiplier=0.8, dry_sequence_breakers=(), repeat_last_n=-1,
                    dry_penalty_last_n=-1)}
    for vocab in vocabs or SAMPLER_VOCABS:
        rng = np.random.default_rng(vocab)
        ranked = -1.5 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
        shared = ranked[rng.permutation(vocab)]
        shapes = {"zipf": (shared + 0.5 * rng.standard_normal((3, vocab))).astype(np.float32),
                  "flat": (3.0 * rng.standard_normal((3, vocab))).astype(np.float32)}
        eng = Engine({r: _Dummy() for r in ("a", "b", "c")}, template_role="b",
                     allowed=np.ones(vocab, dtype=bool))
        w = np.array([1.0, 1.0, -1.0], dtype=np.float32)
        loop = rng.integers(0, vocab, 32).tolist()  # text that loops: what DRY meets
        history = rng.integers(0, vocab, 2048).tolist() + loop * 64
        for shape, rows in shapes.items():
            for label, s in settings.items():
                times = []
                for i in range(repeats):
                    start = time.perf_counter()
                    eng.choose(rows, w, s, i, history=history)
                    times.append(time.perf_counter() - start)
                out.append((vocab, shape, label, 1e3 * statistics.median(times)))
    return out


class _Dummy:
    """Stands in for a model where only rows matter (sampler timing)."""

    path = Path("-")
    n_ctx = 1 << 20
    tokens: list[int] = []


def overhead(say: Say, path: Path, n_threads: int, repeats: int, n_tokens: int = 48, *,
             gpu_layers: int | None = None) -> None:
    """Per-step cost of eft-local around three copies of one model (sequential, every
    thread) against three raw llama-cpp-python decodes of the same file (as offloaded)."""
    from eft_local.backend import raw_decode_seconds
    from eft_local.session import LoadOptions, load_session

    s = load_session(models=[f"{r}={path}" for r in ("large_base", "small_ft", "small_base")],
                     options=LoadOptions(n_ctx=256, n_threads=n_threads, schedule="sequential",
                                         speculative=False, n_gpu_layers=gpu_layers))
    layers = getattr(s.models["large_base"], "n_gpu_layers", 0)
    try:
        allowed = s.engine.allowed.copy()
        allowed[list(s.report.vocabs[s.preset.template_role].eog)] = False
        s.engine.allowed = allowed
        runner = Runner("three copies", s)
        prompt = bench_prompts(s)[0]
        eft, raw = [], []
        for _ in range(repeats):
            runner.ms.clear()
            decode_once(runner, prompt, n_tokens)
            eft.append(runner.median_ms())
            raw.append(1e3 * raw_decode_seconds(path, n_threads=n_threads, n_tokens=n_tokens,
                                                n_gpu_layers=layers))
        e, r = statistics.median(eft), statistics.median(raw)
        say(f"{path.name}, {n_threads} thread(s): eft-local {e:.3f} ms/token with three "
            f"copies; raw llama-cpp-python {r:.3f} ms/token each; overhead per step "
            f"{e - 3 * r:.3f} ms")
    finally:
        s.close()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


# -- realistic sizes -----------------------------------------------------------------------
REALISTIC = {"1B + 2 x 135M": ("large_1b", "small_ft", "small_base"),
             "360M + 2 x 135M": ("large_360m", "small_ft", "small_base")}
"""The realistic model sets: a large base over two small models, shapes of
:data:`eft_local.synthetic.SHAPES`."""


def bench_prompts(s: Session) -> list[list[int]]:
    """:data:`RAW_PROMPTS` as tokens; token-id prompts when the vocabulary cannot spell
    them (random-weight models whose tokens are not text)."""
    prompts = [s.raw_tokens(q) for q in RAW_PROMPTS]
    if all(len(p) > 1 for p in prompts):
        return prompts
    width = s.engine.width
    return [[(37 * i + j) % max(1, min(4000, width - 10)) + 2 for i in range(8)]
            for j in range(2)]


def model_set(say: Say, title: str, base: Session, large: str, prompts: Sequence[list[int]],
              *, n_threads: int, max_tokens: int, repeats: int, prompt_tokens: int) -> None:
    """Everything measured on one set of loaded models."""
    s = base
    files = ", ".join(f"{r}={m.describe()}" if getattr(m, "remote", False) else
                      f"{r}={Path(m.path).name} ({model_bytes(m) / 2**20:.0f} MiB)"
                      for r, m in s.models.items())
    say(f"\n## {title}: {s.describe()}\nmodels: {files}")
    t = s.tuning
    if t is not None:
        say(f"chosen at load: {t.summary()}")
        say("schedules timed at load (ms/step predicted, measured): " + "; ".join(
            f"{k} {1e3 * p:.1f} {1e3 * m:.1f}" for k, (p, m) in t.trials.items()))
    else:
        say(f"schedule at load: {s.engine.schedule.name} ({s.schedule_reason})")
    path = Path(s.models[large].path)
    layers = getattr(s.models[large], "n_gpu_layers", 0)
    rival = None
    if getattr(s.models[large], "remote", False):  # its engine is the baseline: the
        say(f"\n### the baseline: {large} alone through its engine (the rows '{large} "
            "alone' below); no llama.cpp-alone run here")
        runners = measure_decoding(base, large, prompts, n_threads, max_tokens, repeats)
    else:
        say(f"\n### the baseline: llama.cpp alone on {path.name} ({layers} GPU layers, as in "
            "the EFT runs), before the table, between its repeats and after it")
        rival = competitor(say, path, n_threads, prompt_tokens, n_gpu_layers=layers)
        runners = measure_decoding(
            base, large, prompts, n_threads, max_tokens, repeats,
            between=lambda: competitor(say, path, n_threads, 0, rival, n_gpu_layers=layers))
        competitor(say, path, n_threads, prompt_tokens, rival, n_gpu_layers=layers)
        (decode, how), (prefill, prefill_how) = rival.best_decode(), rival.best_prefill()
        say(f"baseline, the best configuration by the median of its runs: "
            f"{1e3 * decode:.2f} ms/token ({how})"
            + (f"; {prefill:.2f} s per prompt ({prefill_how})" if prefill_how else ""))
    say(f"\n### decoding, temperature 1, {len(prompts)} prompts x {max_tokens} tokens (end "
        f"tokens masked), {repeats} interleaved repeats, median ms per token after the first")
    print_decoding(say, runners, rival)
    if t is not None:
        speculation_costs(say, base)
    if prompt_tokens:
        say(f"\n### time to first token, median of {repeats}")
        first_token_table(say, base, large, prompt_tokens, n_threads, repeats, rival)


def realistic_sets(say: Say, paths: dict[str, Path], kind: str, *, n_threads: int,
                   max_tokens: int, repeats: int, prompt_tokens: int,
                   gpu_layers: int | None = None) -> None:
    """:func:`model_set` for each of :data:`REALISTIC` over the models at ``paths``."""
    for title, (large_shape, ft, base) in REALISTIC.items():
        pairs = [f"large_base={paths[large_shape]}", f"small_ft={paths[ft]}",
                 f"small_base={paths[base]}"]
        s = open_base(say, None, pairs, n_threads, 1024, gpu_layers=gpu_layers)
        try:
            prompts = [[(37 * i + j) % 4000 + 2 for i in range(8)] for j in range(2)]
            model_set(say, f"realistic {title} ({kind})", s, "large_base", prompts,
                      n_threads=n_threads, max_tokens=max_tokens, repeats=repeats,
                      prompt_tokens=prompt_tokens)
        finally:
            s.close()


def open_base(say: Say, preset: str | None, models: Sequence[str], n_threads: int,
              n_ctx: int, *, gpu_layers: int | None = None) -> Session:
    """The measured session; end-of-generation tokens masked so runs have equal length."""
    from eft_local.session import LoadOptions, load_session

    s = load_session(preset, models=models, options=LoadOptions(
        n_ctx=n_ctx, n_threads=n_threads, schedule="auto", n_gpu_layers=gpu_layers),
        progress=say, sampling=SamplerSettings(temperature=1.0, seed=1))
    allowed = s.engine.allowed.copy()
    eog = s.report.vocabs[s.preset.template_role].eog
    allowed[[t for t in eog if t < allowed.size]] = False
    s.engine.allowed = allowed
    return s


def load_average() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line(n_threads: int) -> str:
    """The first line of a run: the machine, the thread budget and the load average."""
    return f"machine: {machine()}; thread budget {n_threads}; load average {load_average()}"


def forget_schedules() -> None:
    """Delete every cached schedule choice (``bench --retune``): each set is measured again."""
    tuning.cache_path().unlink(missing_ok=True)
