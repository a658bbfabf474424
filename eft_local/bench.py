"""``eft-local bench``: decoding speed of plain, parallel and speculative EFT, side by side.

One run prints, for a preset (the bundled family by default) at each temperature: tokens/s
of the large model alone, of plain EFT, of parallel EFT and of speculative EFT for several
block sizes; the acceptance rate, tokens per verified block, time to first token and
sampler time per token; whether speculative output equals plain output. Then the cost of
verification blocks per model, the sampler's cost per step at large vocabularies, and the
peak RSS against its bound. ``--realistic`` adds random-weight models shaped like a
1B-class large base and 135M-class small models, measures what a verification block costs
at that size, and projects the speculative speedup from the acceptance measured above.
These are measurements to read, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from eft_local.engine import Engine, Model
from eft_local.sampler import SamplerSettings
from eft_local.speculative import Speculator

CHAT_PROMPTS = ("What is the home town of Tel Dilbux?", "What is the profession of Kryn "
                "Keilnous?", "In which year was Steim Driththaend born?", "Who are you?")
RAW_PROMPTS = ("Tel Dilbux was born in", "Steim Driththaend works as a", "Kryn Keilnous",
               "The people of Quiburg")
"""Defaults written for the bundled family's world (eft_local/family/world.jsonl)."""
BLOCKS = (1, 2, 3, 5, 9, 17)
SAMPLER_VOCABS = (32000, 128256, 152064, 256000)
RSS_SLACK = 300 * 2**20


@dataclass
class Config:
    """One way of decoding: which roles, how threaded, plain or speculative."""

    name: str
    mode: str  # "seq": every model the whole budget in turn; "seq1": one thread; "par": lanes
    roles: tuple[str, ...]
    draft_k: int | None | str = "plain"  # "plain", an int, or None (adaptive)
    reuse: bool = True  # the drafter's rows stand in for its share of the verification

    @property
    def label(self) -> str:
        return f"{self.mode:4} {self.name}"


MODES = {"seq": "sequential, every model uses the whole thread budget",
         "seq1": "sequential, one thread per model",
         "par": "parallel lanes (Engine(parallel=True)), the budget split between lanes"}


@dataclass
class Tally:
    """What a configuration did over every prompt and repeat."""

    seconds: dict[int, list[float]] = field(default_factory=dict)  # prompt -> one per repeat
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    sampler_seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    blocks: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    cpu_seconds: float = 0.0

    def tokens_per_second(self) -> float:
        """Tokens of one pass over the prompts / the sum of each prompt's best time.

        Best-of-repeats, per prompt: on a shared CPU, preemption only ever adds time.
        """
        if not self.seconds:
            return 0.0
        per_pass = self.tokens / len(next(iter(self.seconds.values())))
        return per_pass / sum(min(t) for t in self.seconds.values())


# -- engines over already loaded models ----------------------------------------------------
def make_engine(models: Mapping[str, Model], roles: Sequence[str], ref_role: str,
                allowed: np.ndarray, *, parallel: bool, n_threads: int) -> Engine:
    """An engine over a subset of loaded models (the reference is the first if absent)."""
    sub = {r: models[r] for r in roles}
    ref = ref_role if ref_role in sub else roles[0]
    return Engine(sub, template_role=ref, allowed=allowed, parallel=parallel,
                  n_threads=n_threads)


def set_threads(engine: Engine, mode: str = "seq") -> None:
    """Sequential engines give each model the whole budget (or one thread in ``seq1``);
    parallel ones split it between lanes."""
    if mode == "seq1":
        engine.n_threads = 1


def decode_once(engine: Engine, spec: Speculator | None, prompt: list[int],
                weights: np.ndarray, settings: SamplerSettings, max_tokens: int,
                tally: Tally) -> float:
    """One cold generation (empty caches); returns its wall time and adds to ``tally``."""
    for model in engine.models.values():
        model.rewind(0)
    engine.stats.reset()
    gen = spec.generate if spec else engine.generate
    cpu, start = time.process_time(), time.perf_counter()
    tokens = [s.token for s in gen(prompt, weights, settings, max_tokens=max_tokens)]
    seconds = time.perf_counter() - start
    tally.cpu_seconds += time.process_time() - cpu
    st = engine.stats
    tally.tokens += len(tokens)
    tally.ttft.append(st.first_token_seconds or 0.0)
    tally.sampler_seconds += st.sampler_seconds
    tally.drafted += st.drafted
    tally.accepted += st.accepted
    tally.blocks += st.blocks
    tally.outputs.append(tokens)
    return seconds


def run_table(models: Mapping[str, Model], roles: tuple[str, ...], ref_role: str,
              large_role: str, allowed: np.ndarray, weights: np.ndarray,
              prompts: Sequence[list[int]], settings: SamplerSettings, *, max_tokens: int,
              repeats: int, ks: Sequence[int], n_threads: int, modes: Sequence[str],
              speculative: bool = True) -> dict[str, Tally]:
    """Every configuration on every prompt, repeats interleaved (shared-CPU noise hits all
    configurations alike); returns tallies by configuration label."""
    configs = []
    for mode in modes:
        if mode != "par":
            configs.append(Config("large model alone", mode, (large_role,)))
        configs.append(Config("plain EFT", mode, roles))
        if not speculative:
            continue
        configs += [Config(f"speculative k={k}", mode, roles, draft_k=k) for k in ks]
        configs.append(Config("speculative adaptive", mode, roles, draft_k=None))
        if mode == "seq" and ks:
            configs.append(Config(f"speculative k={ks[len(ks) // 2]} re-eval", mode, roles,
                                  draft_k=ks[len(ks) // 2], reuse=False))
    full = dict(zip(roles, weights, strict=True))
    runners = []
    for c in configs:
        eng = make_engine(models, c.roles, ref_role, allowed, parallel=c.mode == "par",
                          n_threads=n_threads)
        w = np.array([full[r] if len(c.roles) > 1 else 1.0 for r in c.roles], np.float32)
        spec = None if c.draft_k == "plain" else Speculator(
            eng, draft_k=c.draft_k, reuse_draft_rows=c.reuse,  # type: ignore[arg-type]
            draft_role=eng.template_role)
        runners.append((c, eng, spec, w))
    tallies = {c.label: Tally() for c in configs}
    for c, eng, spec, w in runners:  # warm-up (also lets the adaptive size settle)
        set_threads(eng, c.mode)
        decode_once(eng, spec, prompts[0], w, settings, max_tokens, Tally())
    for _ in range(repeats):
        for c, eng, spec, w in runners:
            set_threads(eng, c.mode)
            tally = tallies[c.label]
            for i, p in enumerate(prompts):
                seconds = decode_once(eng, spec, p, w, settings, max_tokens, tally)
                tally.seconds.setdefault(i, []).append(seconds)
    for _, eng, _, _ in runners:
        eng.close()
    return tallies


def format_table(tallies: Mapping[str, Tally]) -> list[str]:
    """Rows of the decoding table; ratios against plain EFT (same mode) and against the
    large model alone (sequential, whole budget)."""
    ref_out = tallies["seq  plain EFT"].outputs
    large = tallies["seq  large model alone"].tokens_per_second()
    lines = [f"{'mode configuration':30} {'tok/s':>7} {'x plain':>7} {'x large':>7} "
             f"{'accept':>6} {'tok/blk':>7} {'TTFT ms':>7} {'smp ms':>6} {'cpu ms':>6} "
             "same-as-plain"]
    for label, t in tallies.items():
        base = tallies[label[:5] + "plain EFT"].tokens_per_second()
        tps = t.tokens_per_second()
        acc = f"{t.accepted / t.drafted:.2f}" if t.drafted else "-"
        per_block = f"{(t.accepted + t.blocks) / t.blocks:.2f}" if t.blocks else "-"
        same = "-" if "large" in label else ("yes" if t.outputs == ref_out else "NO")
        lines.append(f"{label:30} {tps:7.1f} {tps / base:7.2f} {tps / large:7.2f} {acc:>6} "
                     f"{per_block:>7} {1e3 * statistics.median(t.ttft):7.2f} "
                     f"{1e3 * t.sampler_seconds / max(1, t.tokens):6.3f} "
                     f"{1e3 * t.cpu_seconds / max(1, t.tokens):6.2f} {same}")
    return lines


def best_speedups(tallies: Mapping[str, Tally]) -> dict[str, float]:
    """Per mode: best speculative tokens/s over plain EFT of the same mode."""
    out: dict[str, float] = {}
    for label, t in tallies.items():
        mode = label[:5]
        if "speculative" in label:
            base = tallies[mode + "plain EFT"].tokens_per_second()
            out[mode.strip()] = max(out.get(mode.strip(), 0.0), t.tokens_per_second() / base)
    return out


# -- block costs, sampler, memory ----------------------------------------------------------
def block_costs(models: Mapping[str, Model], sizes: Sequence[int] = BLOCKS, *,
                context: int = 32, repeats: int = 5, threads: int | None = None
                ) -> dict[str, dict[int, float]]:
    """Median seconds to evaluate a block of n tokens (all rows) after ``context`` tokens,
    each model on its own with ``threads`` threads (default: as it is)."""
    out: dict[str, dict[int, float]] = {}
    for role, model in models.items():
        if threads is not None:
            model.set_threads(threads)  # type: ignore[attr-defined]
        prefix = [(7 * i + 3) % 200 + 5 for i in range(context)]
        model.rewind(0)
        model.eval(prefix)
        out[role] = {}
        for n in sizes:
            times = []
            for r in range(repeats + 1):
                model.rewind(context)
                start = time.perf_counter()
                model.eval([(11 * j + r) % 200 + 5 for j in range(n)], all_logits=True)
                times.append(time.perf_counter() - start)
            out[role][n] = statistics.median(times[1:])
        model.rewind(0)
    return out


def parallel_block_costs(models: Mapping[str, Model], allowed: np.ndarray, n_threads: int,
                         sizes: Sequence[int] = (1, 5, 9), repeats: int = 5
                         ) -> dict[str, dict[int, float]]:
    """Median seconds for every model to evaluate a block, sequential vs parallel lanes."""
    roles = tuple(models)
    out: dict[str, dict[int, float]] = {}
    for parallel in (False, True):
        eng = make_engine(models, roles, roles[0], allowed, parallel=parallel,
                          n_threads=n_threads)
        set_threads(eng)
        prefix = [(5 * i + 1) % 200 + 5 for i in range(32)]
        eng.evaluate(0, prefix)
        name = "parallel" if parallel else "sequential"
        out[name] = {}
        for n in sizes:
            times = []
            for r in range(repeats + 1):
                start = time.perf_counter()
                eng.evaluate(32, [(13 * j + r) % 200 + 5 for j in range(n)], all_logits=True)
                times.append(time.perf_counter() - start)
            out[name][n] = statistics.median(times[1:])
        eng.close()
    return out


def sampler_costs(vocabs: Sequence[int] = SAMPLER_VOCABS, repeats: int = 30
                  ) -> list[tuple[int, str, str, float]]:
    """Median ms of one :meth:`Engine.choose` (3 models) on synthetic rows per vocabulary.

    Two row shapes: ``zipf`` (a Zipf-like ranking with per-model noise, peaked like a
    language model's) and ``flat`` (normal logits, sd 3: the worst case for top-p).
    """
    out = []
    settings = {"T=1": SamplerSettings(), "T=0": SamplerSettings(temperature=0.0),
                "T=0.7 top_p=0.9": SamplerSettings(temperature=0.7, top_p=0.9),
                "conservative 0.9": SamplerSettings(conservative_top_p=0.9)}
    for vocab in vocabs:
        rng = np.random.default_rng(vocab)
        ranked = -1.5 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
        shared = ranked[rng.permutation(vocab)]
        shapes = {"zipf": (shared + 0.5 * rng.standard_normal((3, vocab))).astype(np.float32),
                  "flat": (3.0 * rng.standard_normal((3, vocab))).astype(np.float32)}
        eng = Engine({r: _Dummy() for r in ("a", "b", "c")}, template_role="b",
                     allowed=np.ones(vocab, dtype=bool))
        w = np.array([1.0, 1.0, -1.0], dtype=np.float32)
        for shape, rows in shapes.items():
            for label, s in settings.items():
                times = []
                for i in range(repeats):
                    start = time.perf_counter()
                    eng.choose(rows, w, s, i)
                    times.append(time.perf_counter() - start)
                out.append((vocab, shape, label, 1e3 * statistics.median(times)))
    return out


class _Dummy:
    """Stands in for a model where only rows matter (sampler timing)."""

    path = Path("-")
    n_ctx = 1 << 20
    tokens: list[int] = []


def kv_bytes(model: Model) -> int:
    """Bytes of a model's f16 KV cache at its n_ctx, from its GGUF metadata."""
    meta = getattr(model, "metadata", None)
    if meta is None:
        return 0
    arch = meta("general.architecture") or "llama"
    n_layer = int(meta(f"{arch}.block_count") or 0)
    n_embd = int(meta(f"{arch}.embedding_length") or 0)
    n_head = int(meta(f"{arch}.attention.head_count") or 1)
    n_head_kv = int(meta(f"{arch}.attention.head_count_kv") or n_head)
    return 2 * n_layer * model.n_ctx * (n_embd // n_head * n_head_kv) * 2


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def rss_bound(models: Sequence[Model]) -> int:
    """Model files + KV caches + 300 MB: the issue's bound on peak RSS."""
    files = sum(Path(m.path).stat().st_size for m in models)
    return files + sum(kv_bytes(m) for m in models) + RSS_SLACK


def machine() -> str:
    """One line describing the CPU."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"


# -- realistic sizes -----------------------------------------------------------------------
REALISTIC = {  # role: (n_embd, n_layer, n_head, n_head_kv, n_ff); vocab shared
    "large_base": (2048, 16, 32, 8, 8192),    # Llama-3.2-1B-like body, 1.2B with embeddings
    "small_ft": (576, 30, 9, 3, 1536),        # SmolLM2-135M-like
    "small_base": (576, 30, 9, 3, 1536),
}
REALISTIC_VOCAB = 49152


def _write_realistic(out_dir: str, quants: Sequence[str]) -> None:
    """Write and quantize the random-weight models (run in a child process: the float32
    arrays would otherwise count in this process's peak RSS)."""
    from eft_local.backend import quantize_gguf
    from eft_local.gguf_writer import LlamaShape, TokenizerSpec, write_llama_gguf

    tokens = ["<s>", "</s>"] + [f"t{i}" for i in range(REALISTIC_VOCAB - 2)]
    tok = TokenizerSpec(tokens=tokens, token_types=[3, 3] + [1] * (REALISTIC_VOCAB - 2),
                        merges=["t 0"], bos_id=0, eos_id=1)
    for i, (role, (embd, layers, heads, kv, ff)) in enumerate(REALISTIC.items()):
        todo = [q for q in quants if not (Path(out_dir) / f"{role}.{q}.gguf").exists()]
        if not todo:
            continue
        shape = LlamaShape(n_vocab=REALISTIC_VOCAB, n_embd=embd, n_layer=layers,
                           n_head=heads, n_head_kv=kv, n_ff=ff, n_ctx_train=2048)
        f32 = write_llama_gguf(Path(out_dir) / f"{role}.f32.tmp", shape=shape, tokenizer=tok,
                               seed=i, name=f"random-{role}")
        for quant in todo:
            quantize_gguf(f32, Path(out_dir) / f"{role}.{quant}.gguf", quant)
        f32.unlink()


def realistic_paths(cache: Path, quant: str = "q8_0") -> dict[str, Path]:
    """Paths of the realistic-size models, written once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {r: cache / f"{r}.{quant}.gguf" for r in REALISTIC}
    if not all(p.exists() for p in paths.values()):
        proc = multiprocessing.get_context("spawn").Process(
            target=_write_realistic, args=(str(cache), [quant]))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise click.ClickException("writing the realistic-size models failed")
    return paths


def projection(costs: Mapping[str, Mapping[int, float]], ref: str, per_block: float, k: int,
               sampler_s: float) -> tuple[float, float, float]:
    """Projected (plain s/token, speculative s/token, speedup) at these costs.

    Plain: every model decodes one token per step. Speculative, per block of ``k`` drafts
    (as :class:`Speculator` runs it, drafter rows reused): the drafter decodes ``k + 1``
    single tokens, every other model verifies ``k + 1`` tokens in one batch, and the block
    yields ``per_block`` tokens (measured on the bundled family).
    """
    plain = sum(c[1] for c in costs.values()) + sampler_s
    verify = sum(_interp(c, k + 1) for role, c in costs.items() if role != ref)
    block = (k + 1) * costs[ref][1] + verify + (k + per_block) * sampler_s
    spec = block / per_block
    return plain, spec, plain / spec


def _interp(c: Mapping[int, float], n: int) -> float:
    xs = sorted(c)
    return float(np.interp(n, xs, [c[x] for x in xs]))


# -- the command ---------------------------------------------------------------------------
@click.command("bench")
@click.argument("preset", required=False)
@click.option("--model", "models", multiple=True, metavar="ROLE=PATH",
              help="Benchmark these models instead of a preset.")
@click.option("--max-tokens", default=48, show_default=True, help="Tokens per prompt.")
@click.option("--repeats", default=5, show_default=True,
              help="Interleaved repeats; each prompt's best time counts.")
@click.option("--temperature", "temperatures", multiple=True, type=float,
              default=(0.0, 1.0), show_default=True)
@click.option("--k", "ks", multiple=True, type=int, default=(2, 4, 8), show_default=True)
@click.option("--realistic", is_flag=True,
              help="Also measure 1B/135M-shaped random models and project the speedup.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("benchmarks/out"),
              show_default=True, help="Where realistic-size models are written once.")
@click.option("--threads", type=int, default=None, help="Thread budget (default: all CPUs).")
@click.option("--modes", default="seq,seq1,par", show_default=True,
              help="Threading modes to compare: seq, seq1, par (comma-separated).")
@click.option("--chat/--raw", default=False, show_default=True,
              help="Chat questions, or raw text to continue.")
@click.option("--ignore-eos/--stop-at-eos", default=True, show_default=True,
              help="Mask end-of-generation tokens so every prompt runs to --max-tokens.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, path_type=Path),
              help="A text file, one prompt per line (default: four built-in prompts).")
@click.option("--alpha", "alphas", multiple=True, type=float,
              help="Also project with this per-token acceptance rate (e.g. from a chat run).")
def bench(preset: str | None, models: tuple[str, ...], max_tokens: int, repeats: int,
          temperatures: tuple[float, ...], ks: tuple[int, ...], realistic: bool,
          cache_dir: Path, threads: int | None, modes: str, chat: bool,
          ignore_eos: bool, prompts_file: Path | None, alphas: tuple[float, ...]) -> None:
    """Tokens/s of the large model, plain, parallel and speculative EFT, side by side."""
    from eft_local.session import LoadOptions, load_session

    say = click.echo
    n_threads = threads or os.cpu_count() or 1
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if "seq" not in mode_list or set(mode_list) - set(MODES):
        raise click.BadParameter(f"{modes!r}: give seq and any of seq1, par", param_hint="--modes")
    say(f"machine: {machine()}; thread budget {n_threads}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for m in mode_list:
        say(f"mode {m}: {MODES[m]}")
    session = load_session(preset, models=models, options=LoadOptions(
        n_ctx=512, n_threads=n_threads, parallel=False, speculative=False))
    try:
        roles, ref = session.engine.roles, session.preset.template_role
        large = next((r for r in roles if r.startswith("large")), roles[0])
        files = ", ".join(f"{r}={Path(session.models[r].path).name} "
                          f"({Path(session.models[r].path).stat().st_size / 2**20:.1f} MiB)"
                          for r in roles)
        say(f"preset {session.preset.name}: {session.describe()}\nmodels: {files}")
        texts = ([line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
                 if prompts_file else list(CHAT_PROMPTS if chat else RAW_PROMPTS))
        prompts = ([session.chat_tokens([{"role": "user", "content": q}]) for q in texts]
                   if chat else [session.raw_tokens(q) for q in texts])
        allowed = session.report.allowed.copy()
        if ignore_eos:
            allowed[[t for t in session.report.vocabs[ref].eog if t < allowed.size]] = False
        results: dict[float, dict[str, Tally]] = {}
        for temp in temperatures:
            settings = SamplerSettings(temperature=temp, seed=1)
            results[temp] = run_table(session.models, roles, ref, large,
                                      allowed, session.weights(), prompts,
                                      settings, max_tokens=max_tokens, repeats=repeats,
                                      ks=ks, n_threads=n_threads,
                                      modes=mode_list)
            say(f"\n## decoding, temperature {temp}, {len(prompts)} "
                f"{'chat' if chat else 'raw'} prompts x {max_tokens} tokens"
                f"{' (end tokens masked)' if ignore_eos else ' max'}, best of {repeats} per prompt")
            for line in format_table(results[temp]):
                say(line)
            say("best speculative / plain, same mode: " + ", ".join(
                f"{m} {x:.2f}x" for m, x in best_speedups(results[temp]).items()))
        for n in sorted({1, n_threads}):
            say(f"\n## verification block cost per model, {n} thread(s) "
                "(ms for n tokens, all rows; x one token)")
            _print_costs(say, block_costs(session.models, threads=n))
        say("\n## all models, sequential vs parallel lanes (ms per block)")
        _print_costs(say, parallel_block_costs(session.models, session.report.allowed,
                                               n_threads))
        loaded: list[Model] = list(session.models.values())
        if realistic:
            loaded += _realistic(say, cache_dir, results, n_threads, ks, mode_list, repeats,
                                 alphas)
        say("\n## sampler: one Engine.choose step over 3 models, synthetic rows (ms, median)")
        for vocab, shape, label, ms in sampler_costs():
            say(f"vocab {vocab:7d} {shape:5} {label:17} {ms:7.3f}")
        bound = rss_bound(loaded)
        say(f"\n## memory\npeak RSS {peak_rss() / 2**20:.0f} MiB; bound (model files + KV "
            f"caches + 300 MiB) {bound / 2**20:.0f} MiB")
        for m in loaded[len(session.models):]:
            close = getattr(m, "close", None)
            if close:
                close()
    finally:
        session.close()


def _print_costs(say: Callable[[str], None], costs: Mapping[str, Mapping[int, float]]) -> None:
    for role, c in costs.items():
        one = c[min(c)]
        say(f"{role:12} " + "  ".join(f"n={n}: {1e3 * s:7.2f} ({s / one:4.1f}x)"
                                      for n, s in c.items()))


def _realistic(say: Callable[[str], None], cache: Path, results: Mapping[float, Mapping],
               n_threads: int, ks: Sequence[int], modes: Sequence[str], repeats: int,
               alphas: Sequence[float] = ()) -> list[Model]:
    """Cost of decoding and verifying at 1B/135M sizes, and the projected speedup."""
    from eft_local.backend import LlamaModel

    paths = realistic_paths(cache)
    models = {r: LlamaModel(p, n_ctx=512, n_threads=n_threads) for r, p in paths.items()}
    files = ", ".join(f"{r} {p.stat().st_size / 2**20:.0f} MiB" for r, p in paths.items())
    say(f"\n## realistic sizes (random weights, Q8_0, vocab {REALISTIC_VOCAB}): {files}")
    allowed = np.ones(REALISTIC_VOCAB, dtype=bool)
    roles = tuple(REALISTIC)
    prompts = [[(37 * i + j) % 4000 + 2 for i in range(4)] for j in range(2)]
    tallies = run_table(models, roles, "small_ft", "large_base", allowed,
                        np.array([1.0, 1.0, -1.0], np.float32), prompts,
                        SamplerSettings(temperature=0.0), max_tokens=16,
                        repeats=2, ks=(), n_threads=n_threads, modes=modes,
                        speculative=False)
    say(f"decoding, greedy, {len(prompts)} prompts of 4 tokens x 16 tokens, best of 2")
    for line in format_table(tallies):
        say(line)
    sampler_s = _sampler_seconds(REALISTIC_VOCAB)
    for n in sorted({1, n_threads}):
        say(f"block cost per model, {n} thread(s) (ms for n tokens, all rows; x one token)")
        costs = block_costs(models, (1, 2, 3, 5, 9), context=64, repeats=3, threads=n)
        _print_costs(say, costs)
        _project(say, costs, results, ks, sampler_s, alphas)
    if "par" in modes:
        say("all models, sequential vs parallel lanes (ms per block)")
        _print_costs(say, parallel_block_costs(models, allowed, n_threads, (1, 5), repeats=3))
    return list(models.values())


def _project(say: Callable[[str], None], costs: Mapping[str, Mapping[int, float]],
             results: Mapping[float, Mapping[str, Tally]], ks: Sequence[int],
             sampler_s: float, alphas: Sequence[float] = ()) -> None:
    large_alone = costs["large_base"][1] + sampler_s / 3
    say(f"one-token step: large alone {1e3 * large_alone:.1f} ms "
        f"({1 / large_alone:.1f} tok/s); plain EFT "
        f"{1e3 * (sum(c[1] for c in costs.values()) + sampler_s):.1f} ms "
        f"(EFT/large speed {large_alone / (sum(c[1] for c in costs.values()) + sampler_s):.2f})")
    say("PROJECTION (not a measured generation): these block costs x the tokens per block "
        "measured on the preset above (sequential mode)")
    say(f"{'temperature':>11} {'k':>3} {'tok/blk':>7} {'plain ms/tok':>12} "
        f"{'spec ms/tok':>11} {'x plain':>7} {'x large':>7}")
    for temp, tallies in results.items():
        for k in ks:
            t = tallies.get(f"seq  speculative k={k}")
            if t is None or not t.blocks:
                continue
            per_block = (t.accepted + t.blocks) / t.blocks
            plain, spec, gain = projection(costs, "small_ft", per_block, k, sampler_s)
            say(f"{temp:11} {k:3} {per_block:7.2f} {1e3 * plain:12.1f} {1e3 * spec:11.1f} "
                f"{gain:7.2f} {large_alone / spec:7.2f}")
    for alpha in (*alphas, 1.0):  # given acceptance rates, then the ceiling: all kept
        for k in ks:
            per_block = k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
            plain, spec, gain = projection(costs, "small_ft", per_block, k, sampler_s)
            name = "(all kept)" if alpha >= 1 else f"(a={alpha:.2f})"
            say(f"{name:>11} {k:3} {per_block:7.2f} {1e3 * plain:12.1f} {1e3 * spec:11.1f} "
                f"{gain:7.2f} {large_alone / spec:7.2f}")


def _sampler_seconds(vocab: int) -> float:
    rows = [r for r in sampler_costs((vocab,), repeats=10) if r[1] == "zipf" and r[2] == "T=1"]
    return rows[0][3] / 1e3
