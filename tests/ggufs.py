"""Tiny GGUF families the tests write themselves (random weights, milliseconds each)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from eft_local.gguf_writer import LlamaShape, TokenizerSpec, random_tensors, write_llama_gguf

CONTROL, NORMAL, UNUSED = 3, 1, 5
SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MERGES = ["h e", "l l", "o Ġ", "Ġ t", "t h", "he ll", "e r", "i n", "a n", "o n"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = 0
    out = {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tokenizer(*, pad_to: int = 0, swap: tuple[int, int] | None = None,
              extra_special: str | None = None, add_bos: bool = False,
              template: str = TEMPLATE) -> TokenizerSpec:
    """Specials, 256 byte tokens and a few merges; ``pad_to`` adds [PAD] unused tokens,
    ``swap`` exchanges two normal tokens (a mismatched vocabulary); ``add_bos``: the model
    asks for BOS in front of every prompt."""
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIALS + byte_alphabet() + merged
    types = [CONTROL] * len(SPECIALS) + [NORMAL] * (len(tokens) - len(SPECIALS))
    if extra_special:
        tokens.append(extra_special)
        types.append(CONTROL)
    if swap:
        a, b = swap
        tokens[a], tokens[b] = tokens[b], tokens[a]
    while len(tokens) < pad_to:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(UNUSED)
    return TokenizerSpec(tokens=tokens, token_types=types, merges=MERGES, bos_id=0, eos_id=1,
                         eot_id=4, add_bos=add_bos, chat_template=template)


def write_model(path: Path, *, n_embd: int = 32, n_layer: int = 1, seed: int = 0,
                n_ctx_train: int = 256, **tok_kwargs) -> Path:
    """One tiny random-weight llama model."""
    tok = tokenizer(**tok_kwargs)
    shape = LlamaShape(n_vocab=len(tok.tokens), n_embd=n_embd, n_layer=n_layer, n_head=4,
                       n_head_kv=2, n_ff=2 * n_embd, n_ctx_train=n_ctx_train)
    return write_llama_gguf(path, shape=shape, tokenizer=tok, seed=seed)


HOSTILE = ('<script>document.body.dataset.pwned="script"</script>'
           '<img src=x onerror="document.body.dataset.pwned=\'img\'">')
"""The reply of :func:`write_echo_model` by default: HTML that runs code if a page treats it
as HTML."""


def write_echo_model(path: Path, texts: tuple[str, ...] = (
        HOSTILE, '<b onmouseover="document.body.dataset.pwned=\'b\'">bold</b>'),
        seed: int = 0) -> Path:
    """A tiny model that answers every prompt with ``texts[0]`` again and again: each text
    is one token, the first the most likely at every position, the others next in order,
    every other token (end of turn included) far behind."""
    base = tokenizer()
    extra = [t.replace(" ", "Ġ") for t in texts]  # byte-level BPE: a space is Ġ
    tok = replace(base, tokens=base.tokens + extra,
                  token_types=base.token_types + [NORMAL] * len(extra))
    shape = LlamaShape(n_vocab=len(tok.tokens), n_embd=32, n_layer=1, n_head=4, n_head_kv=2,
                       n_ff=64, n_ctx_train=256)
    tensors = random_tensors(shape, seed)
    # feature 0 of the residual stream is 1 at every position: the embeddings carry it and
    # no layer writes to it; the output head reads only that feature
    tensors["token_embd.weight"][:, 0] = 1.0
    for i in range(shape.n_layer):
        tensors[f"blk.{i}.attn_output.weight"][0, :] = 0.0
        tensors[f"blk.{i}.ffn_down.weight"][0, :] = 0.0
    norm = np.zeros(shape.n_embd, dtype=np.float32)
    norm[0] = 1.0
    tensors["output_norm.weight"] = norm
    head = np.zeros((shape.n_vocab, shape.n_embd), dtype=np.float32)
    for k in range(len(extra)):
        head[len(base.tokens) + k, 0] = 40.0 - 8.0 * k
    tensors["output.weight"] = head
    return write_llama_gguf(path, shape=shape, tokenizer=tok, tensors=tensors)
