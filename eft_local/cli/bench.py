"""``eft-local bench``: decoding speed against the strongest baseline, side by side.

The measurements are :mod:`eft_local.bench`'s; this module is the command around them.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from eft_local import bench as b
from eft_local import limits
from eft_local.synthetic import realistic_paths


@click.command("bench")
@click.argument("preset", required=False)
@click.option("--model", "-m", "models", multiple=True, metavar="ROLE=PATH",
              help="Benchmark these models instead of a preset.")
@click.option("--max-tokens", default=32, show_default=True, help="Tokens per prompt.")
@click.option("--repeats", default=3, show_default=True, help="Interleaved repeats.")
@click.option("--threads", type=int, default=None, help="Thread budget (default: all CPUs).")
@click.option("--gpu-layers", type=click.IntRange(-1, limits.N_GPU_LAYERS_MAX),
              help="Layers to offload to the GPU (-1: all; default all if supported); the "
                   "llama.cpp-alone baseline offloads the same.")
@click.option("--prompt-tokens", default=500, show_default=True,
              help="Prompt length for time to first token (0: skip).")
@click.option("--realistic", is_flag=True,
              help="Also measure 1B/360M/135M-shaped random-weight models (written once).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("benchmarks/out"),
              show_default=True, help="Where the realistic-size models are written once.")
@click.option("--retune", is_flag=True, help="Measure the schedules again (ignore the cache).")
@click.option("--skip-family", is_flag=True, help="Only the realistic sizes.")
@click.option("--agreeing", is_flag=True,
              help="Also measure the realistic shapes built to predict the next token id, "
                   "so that drafts are often accepted (written once).")
def bench(preset: str | None, models: tuple[str, ...], max_tokens: int, repeats: int,
          threads: int | None, gpu_layers: int | None, prompt_tokens: int, realistic: bool,
          cache_dir: Path, retune: bool, skip_family: bool, agreeing: bool) -> None:
    """Speed of plain and speculative EFT against the large model alone at its best."""
    say = click.echo
    if retune:
        b.forget_schedules()
    n = threads or os.cpu_count() or 1
    say(b.machine_line(n))
    if not skip_family:
        s = b.open_base(say, preset, models, n, 512, gpu_layers=gpu_layers)
        try:
            large = next((r for r in s.engine.roles if r.startswith("large")), None) or max(
                s.models, key=lambda r: b.model_bytes(s.models[r]))
            prompts = b.bench_prompts(s)
            b.model_set(say, f"preset {s.preset.name}", s, large, prompts, n_threads=n,
                        max_tokens=max_tokens, repeats=repeats, prompt_tokens=prompt_tokens)
            say("\n## draft/mix coupling at temperature 1: positions, mean sum(min(p, q)), "
                "agreement of the race (now) and of the inverse-CDF draw (before), each with "
                "its fraction of the optimum")
            b.print_coupling(say, f"preset {s.preset.name}, drafter {s.draft_role()}",
                             b.session_pairs(s, prompts, max_tokens))
            b.print_coupling(say, "synthetic Zipf rows, vocab 49152", b.synthetic_pairs())
            say(f"\n## per-step overhead against raw llama-cpp-python (median of {repeats})")
            small = next((m for r, m in s.models.items() if r.startswith("small")), None)
            if small is not None:
                b.overhead(say, Path(small.path), n, repeats, gpu_layers=gpu_layers)
        finally:
            s.close()
    if realistic:
        b.realistic_sets(say, realistic_paths(cache_dir), "random weights, Q8_0", n_threads=n,
                         max_tokens=max_tokens // 2, repeats=repeats,
                         prompt_tokens=prompt_tokens, gpu_layers=gpu_layers)
    if agreeing:
        b.realistic_sets(say, realistic_paths(cache_dir / "agreeing", agreeing=True),
                         "random weights built to predict the next token id, Q8_0",
                         n_threads=n, max_tokens=max_tokens, repeats=repeats, prompt_tokens=0,
                         gpu_layers=gpu_layers)
    say("\n## sampler: one Engine.choose step over 3 models, synthetic rows (ms, median)")
    for vocab, shape, label, ms in b.sampler_costs():
        say(f"vocab {vocab:7d} {shape:5} {label:17} {ms:7.3f}")
    say(f"\npeak RSS {b.peak_rss() / 2**20:.0f} MiB; load average now {b.load_average()}")
