"""Tiny GGUF families the tests write themselves (random weights, milliseconds each)."""

from __future__ import annotations

from pathlib import Path

from eft_local.gguf_writer import LlamaShape, TokenizerSpec, write_llama_gguf

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
