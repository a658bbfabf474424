"""Random-weight GGUF models with the shapes of real ones, for benchmarks (``bench
--realistic`` and ``--agreeing``, benchmarks/*.py): written once, quantized to Q8_0.

Their costs are those of any model of their shape; ``agreeing`` models
(:func:`next_token_tensors`) also agree with each other as a drafter and its targets do.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eft_local.errors import EftError

if TYPE_CHECKING:
    from eft_local.gguf_writer import LlamaShape, TokenizerSpec

SHAPES = {  # name: (n_embd, n_layer, n_head, n_head_kv, n_ff); vocabulary shared
    "large_1b": (2048, 16, 32, 8, 8192),    # Llama-3.2-1B-like body
    "large_360m": (960, 32, 15, 5, 2560),   # SmolLM2-360M-like
    "small_ft": (576, 30, 9, 3, 1536),      # SmolLM2-135M-like
    "small_base": (576, 30, 9, 3, 1536),
}
REALISTIC_VOCAB = 49152


PEAK = 18.0
"""Logit boost of token ``t + 1`` after token ``t`` in the ``--agreeing`` models."""
LAYER_SCALE = 0.05
"""Scale of their layers' output projections: the residual stays close to the embedding."""


def next_token_tensors(shape: LlamaShape, seed: int) -> dict[str, np.ndarray]:
    """Random weights for a model that predicts token ``t + 1`` after ``t`` (mod the
    vocabulary) with high probability: quiet layers, and an output matrix holding each
    token's embedding in the row of the next token. Models of any width built this way agree
    with each other often, as a drafter and its targets do, at the same compute cost as
    random models of their shape."""
    from eft_local.gguf_writer import random_tensors

    t = random_tensors(shape, seed)
    for name in t:
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            t[name] *= np.float32(LAYER_SCALE)
    embd = t["token_embd.weight"]
    t["output.weight"] += np.roll(embd, 1, axis=0) * np.float32(PEAK / shape.n_embd)
    return t


def realistic_tokenizer(n_vocab: int) -> TokenizerSpec:
    """Token texts t0, t1, ... after <s> and </s>: a vocabulary that spells no text."""
    from eft_local.gguf_writer import TokenizerSpec

    return TokenizerSpec(tokens=["<s>", "</s>"] + [f"t{i}" for i in range(n_vocab - 2)],
                         token_types=[3, 3] + [1] * (n_vocab - 2), merges=["t 0"], bos_id=0,
                         eos_id=1)


def _write_realistic(out_dir: str, names: Sequence[str], agreeing: bool = False) -> None:
    """Write and quantize the random-weight models to Q8_0 (in a child process: the
    float32 arrays would otherwise count in this process's peak RSS); ``agreeing``: the
    models of :func:`next_token_tensors`."""
    from eft_local.backend import quantize_gguf
    from eft_local.gguf_writer import LlamaShape, write_llama_gguf

    v = REALISTIC_VOCAB
    tok = realistic_tokenizer(v)
    for i, name in enumerate(SHAPES):
        dst = Path(out_dir) / f"{name}.q8_0.gguf"
        if name not in names or dst.exists():
            continue
        embd, layers, heads, kv, ff = SHAPES[name]
        shape = LlamaShape(n_vocab=v, n_embd=embd, n_layer=layers, n_head=heads, n_head_kv=kv,
                           n_ff=ff, n_ctx_train=2048)
        f32 = write_llama_gguf(Path(out_dir) / f"{name}.f32.tmp", shape=shape, tokenizer=tok,
                               seed=i, name=f"random-{name}",
                               tensors=next_token_tensors(shape, i) if agreeing else None)
        quantize_gguf(f32, dst, "q8_0")
        f32.unlink()


def realistic_paths(cache: Path, names: Sequence[str] = tuple(SHAPES),
                    agreeing: bool = False) -> dict[str, Path]:
    """Paths of the realistic-size models ``names``, written once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {name: cache / f"{name}.q8_0.gguf" for name in names}
    missing = [n for n, p in paths.items() if not p.exists()]
    if missing:
        proc = multiprocessing.get_context("spawn").Process(
            target=_write_realistic, args=(str(cache), missing, agreeing))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise EftError(f"writing the realistic-size models into {cache} failed")
    return paths
