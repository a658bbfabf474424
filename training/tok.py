"""The family's byte-level BPE tokenizer and chat template."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eft_local.gguf_writer import TokenizerSpec

END = "<|end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [END, SYSTEM, USER, ASSISTANT]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Python twin of CHAT_TEMPLATE (used for training text).

    Only assistant turns end with END; system and user turns end with a newline.
    """
    text = "".join(f"<|{m['role']}|>\n{m['content']}"
                   + (f"{END}\n" if m["role"] == "assistant" else "\n") for m in messages)
    return text + (f"{ASSISTANT}\n" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE whose first ids are SPECIAL_TOKENS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, s
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved with Tokenizer.save."""
    return Tokenizer.from_file(str(path))


def tokenizer_spec(tok: Tokenizer) -> TokenizerSpec:
    """The GGUF description of the tokenizer (gpt2 BPE, control-typed special tokens)."""
    import json

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]
    end_id = SPECIAL_TOKENS.index(END)
    return TokenizerSpec(
        tokens=tokens, token_types=types, merges=merges,
        bos_id=end_id, eos_id=end_id, eot_id=end_id, pad_id=end_id,
        add_bos=False, chat_template=CHAT_TEMPLATE,
        # "gpt-2" is llama.cpp's exact GPT-2 split regex, the one ByteLevel(use_regex=True)
        # uses; "default" splits digits and punctuation differently (" 1995" -> " ", "1995").
        pre="gpt-2",
    )
