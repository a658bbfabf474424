"""Export trained torch models to GGUF through eft_local.gguf_writer."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eft_local.gguf_writer import LlamaShape, TokenizerSpec, write_llama_gguf
from training.model import Config, Llama, gguf_tensors

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


def import_model(path: Path) -> Llama:
    """A torch model with the weights of a family GGUF file (Q8_0 tensors dequantized).

    The shape comes from the file; the other hyper-parameters must be the Config defaults
    (what export_model writes), so a re-export of an f32 file is byte-identical.
    """
    import gguf

    reader = gguf.GGUFReader(path)

    def meta(key: str):
        return reader.fields[f"llama.{key}"].contents()

    cfg = Config(n_vocab=int(meta("vocab_size")), n_embd=int(meta("embedding_length")),
                 n_layer=int(meta("block_count")), n_head=int(meta("attention.head_count")),
                 n_ff=int(meta("feed_forward_length")))
    stored = (meta("context_length"), meta("rope.freq_base"),
              meta("attention.layer_norm_rms_epsilon"))
    if stored != (cfg.n_ctx_train, np.float32(cfg.rope_theta), np.float32(cfg.rms_eps)):
        raise ValueError(f"{path}: hyper-parameters {stored} are not the family's")
    model = Llama(cfg)
    weights = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    params = gguf_tensors(model)
    if set(weights) != set(params):
        raise ValueError(f"{path}: tensors differ from a {cfg} llama")
    with torch.no_grad():
        for name, target in _parameters_by_gguf_name(model).items():
            value = torch.from_numpy(np.array(weights[name], dtype=np.float32))
            target.copy_(value.reshape(target.shape))
    model.eval()
    return model


def _parameters_by_gguf_name(model: Llama) -> dict[str, torch.Tensor]:
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
             "w_up": "ffn_up", "w_down": "ffn_down"}
    out = {"token_embd.weight": model.tok_emb.weight, "output_norm.weight": model.norm.weight,
           "output.weight": model.output.weight}
    for i, blk in enumerate(model.blocks):
        for attr, gname in names.items():
            out[f"blk.{i}.{gname}.weight"] = getattr(blk, attr).weight
    return out
