"""Write llama-architecture GGUF files (float32) with the `gguf` package.

This is the one module of the project that writes GGUF models: the bundled family's
export and the tests' tiny random-weight models both go through write_llama_gguf.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eft_local.files import atomic_path

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
_FILE_TYPE_ALL_F32 = 0


@dataclass(frozen=True)
class LlamaShape:
    """Hyper-parameters of a llama model as llama.cpp reads them."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class TokenizerSpec:
    """A gpt2-style BPE vocabulary as stored in GGUF metadata."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    eot_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    model: str = "gpt2"
    pre: str = "default"


def _check(shape: LlamaShape, tok: TokenizerSpec) -> None:
    for field in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
        if getattr(shape, field) <= 0:
            raise ValueError(f"LlamaShape.{field} must be positive, got {getattr(shape, field)}")
    if shape.n_embd % shape.n_head or shape.head_dim % 2:
        raise ValueError(f"n_embd={shape.n_embd} must split into n_head={shape.n_head} "
                         "heads of even size")
    if shape.n_head % shape.n_head_kv:
        raise ValueError(f"n_head={shape.n_head} is not a multiple of "
                         f"n_head_kv={shape.n_head_kv}")
    if len(tok.tokens) != shape.n_vocab:
        raise ValueError(f"tokenizer has {len(tok.tokens)} tokens, shape.n_vocab is "
                         f"{shape.n_vocab}; they must be equal")
    if len(tok.token_types) != len(tok.tokens):
        raise ValueError(f"{len(tok.token_types)} token types for {len(tok.tokens)} tokens")
    for key in ("bos_id", "eos_id", "eot_id", "pad_id"):
        value = getattr(tok, key)
        if value is not None and not 0 <= value < shape.n_vocab:
            raise ValueError(f"TokenizerSpec.{key}={value} is outside [0, {shape.n_vocab})")


def expected_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> torch-layout shape [out, in] for a llama model."""
    d, kv = shape.n_embd, shape.n_head_kv * shape.head_dim
    out: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (shape.n_vocab, d),
        "output_norm.weight": (d,),
        "output.weight": (shape.n_vocab, d),
    }
    for i in range(shape.n_layer):
        out.update({
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (d, d),
            f"blk.{i}.attn_k.weight": (kv, d),
            f"blk.{i}.attn_v.weight": (kv, d),
            f"blk.{i}.attn_output.weight": (d, d),
            f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.ffn_gate.weight": (shape.n_ff, d),
            f"blk.{i}.ffn_up.weight": (shape.n_ff, d),
            f"blk.{i}.ffn_down.weight": (d, shape.n_ff),
        })
    return out


def random_tensors(shape: LlamaShape, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights: unit norms, matrices scaled by 1/sqrt(fan_in).

    With this scaling each logit has a standard deviation of about 1, so the
    distributions are neither flat nor one-hot.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shp in expected_shapes(shape).items():
        if len(shp) == 1:
            out[name] = np.ones(shp, dtype=np.float32)
        elif name == "token_embd.weight":
            out[name] = rng.standard_normal(shp, dtype=np.float32)
        else:
            out[name] = rng.standard_normal(shp, dtype=np.float32) / np.float32(np.sqrt(shp[1]))
    return out


def _checked_tensors(shape: LlamaShape,
                     tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    want = expected_shapes(shape)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"tensor names do not match the shape: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    out = {}
    for name, shp in want.items():
        arr = np.ascontiguousarray(np.asarray(tensors[name], dtype=np.float32))
        if arr.shape != shp:
            raise ValueError(f"tensor {name} has shape {arr.shape}, expected {shp}")
        if not np.isfinite(arr).all():
            raise ValueError(f"tensor {name} holds non-finite values")
        out[name] = arr
    return out


def _add_metadata(writer, shape: LlamaShape, tok: TokenizerSpec, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_file_type(_FILE_TYPE_ALL_F32)

    writer.add_tokenizer_model(tok.model)
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    writer.add_token_merges(tok.merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    if tok.eot_id is not None:
        writer.add_eot_token_id(tok.eot_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    if tok.chat_template is not None:
        writer.add_chat_template(tok.chat_template)


def write_llama_gguf(path: str | os.PathLike, *, shape: LlamaShape, tokenizer: TokenizerSpec,
                     tensors: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                     name: str = "eft-local-test") -> Path:
    """Write a float32 llama GGUF file and return its path.

    tensors maps GGUF names ("token_embd.weight", "blk.0.attn_q.weight", ...,
    "output_norm.weight", "output.weight") to float32 arrays in torch layout
    [out, in]; None writes seeded random weights. The file is written to a temporary
    name in the same folder and renamed, so a reader never sees half a file.
    """
    import gguf

    _check(shape, tokenizer)
    arrays = _checked_tensors(shape, random_tensors(shape, seed) if tensors is None else tensors)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, mode=0o644) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_metadata(writer, shape, tokenizer, name)
        for tname, arr in arrays.items():
            writer.add_tensor(tname, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dest
