"""Export trained torch models to GGUF through eft_local.gguf_writer."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from eft_local.gguf_writer import LlamaShape, TokenizerSpec, write_llama_gguf
from training.model import Llama, gguf_tensors

QUANTIZED = ("large_base", "large_ft")


def shape_of(model: Llama) -> LlamaShape:
    """The GGUF shape of a torch model (no grouped-query attention)."""
    c = model.cfg
    return LlamaShape(n_vocab=c.n_vocab, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                      n_head_kv=c.n_head, n_ff=c.n_ff, n_ctx_train=c.n_ctx_train,
                      rope_theta=c.rope_theta, rms_eps=c.rms_eps)


def export_model(model: Llama, spec: TokenizerSpec, path: Path, name: str) -> Path:
    """Write one model as a float32 GGUF file."""
    tensors = {k: v.numpy() for k, v in gguf_tensors(model).items()}
    return write_llama_gguf(path, shape=shape_of(model), tokenizer=spec, tensors=tensors,
                            name=f"eft-local-family-{name}")


def export_family(models: dict[str, Llama], spec: TokenizerSpec, out: Path,
                  log: Callable[[str], None] = print) -> dict[str, Path]:
    """<name>.f32.gguf for every model, and <name>.gguf to ship (Q8_0 for the large ones)."""
    from eft_local.backend import quantize_gguf

    out.mkdir(parents=True, exist_ok=True)
    shipped = {}
    for name, model in models.items():
        f32 = export_model(model, spec, out / f"{name}.f32.gguf", name)
        final = out / f"{name}.gguf"
        if name in QUANTIZED:
            quantize_gguf(f32, final, kind="q8_0")
        else:
            shutil.copy2(f32, final)
        log(f"exported {final.name}: {final.stat().st_size / 1e6:.2f} MB")
        shipped[name] = final
    return shipped
