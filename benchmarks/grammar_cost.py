"""What a grammar costs per decoding step at real vocabulary sizes.

For each vocabulary (a GGUF file that holds one, e.g. llama.cpp's ``models/ggml-vocab-*.gguf``,
which ship in llama-cpp-python's source package: ``pip download llama-cpp-python==0.3.36
--no-binary :all: --no-deps``), three tiny random-weight llama models with that vocabulary
are written (an up-scaling trio) and a session generates ``--tokens`` tokens:

- without a grammar, and under a JSON-schema grammar drawn as decoding does it (the search
  that asks the grammar about the best candidates first), greedy and sampled, with top-k;
- with top-p (every token is asked about: the exact mask), and one full mask alone, at the
  start of the object and inside a string;
- under a grammar that allows any text (the best candidate is always allowed: the cheapest a
  grammar can be).

Random weights rank tokens at random, so under JSON the best candidates are rarely allowed and
nearly every step ends in the exact mask: the JSON rows are the worst case. How often a
trained model's best candidates settle the draw is measured on the bundled tiny family
(``--family``: the share of steps that asked only the head, not every token).

    python benchmarks/grammar_cost.py VOCAB.gguf [VOCAB.gguf ...] [--tokens 64] [--family]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from eft_local.gguf_writer import LlamaShape, TokenizerSpec, write_llama_gguf
from eft_local.session import LoadOptions, Session, load_session

OUT = Path(__file__).resolve().parent / "out" / "grammar-cost"
ANY_TEXT = r"root ::= [^\x00]*"
HEAD = (16, 240)  # what the head's two rounds ask (sampler.HEAD: the 16, then 256 best)
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "colour": {"enum": ["red", "green", "blue"]},
    "corners": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"]}},
    "closed": {"type": "boolean"}}, "required": ["name", "colour", "corners", "closed"]}


def tokenizer_of(path: Path) -> TokenizerSpec:
    """The BPE vocabulary stored in a GGUF file."""
    reader = GGUFReader(path)

    def field(key: str, default: object = None) -> object:
        f = reader.fields.get(key)
        if f is None:
            return default
        if len(f.types) > 1:  # an array
            if f.types[1].name == "STRING":
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [int(f.parts[i][0]) for i in f.data]
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8") if f.types[0].name == "STRING" else int(value[0])

    tokens = field("tokenizer.ggml.tokens")
    eos = field("tokenizer.ggml.eos_token_id")
    return TokenizerSpec(tokens=tokens, token_types=field("tokenizer.ggml.token_type"),
                         merges=field("tokenizer.ggml.merges", []),
                         bos_id=field("tokenizer.ggml.bos_token_id", eos), eos_id=eos,
                         chat_template=field("tokenizer.chat_template"),
                         model=field("tokenizer.ggml.model"), pre=field("tokenizer.ggml.pre"))


def write_trio(vocab: Path) -> list[str]:
    tok = tokenizer_of(vocab)
    out = OUT / vocab.stem
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for role, seed, n_embd in (("large_base", 1, 64), ("small_ft", 2, 32),
                               ("small_base", 3, 32)):
        path = out / f"{role}.gguf"
        if not path.exists():
            shape = LlamaShape(n_vocab=len(tok.tokens), n_embd=n_embd, n_layer=1, n_head=4,
                               n_head_kv=2, n_ff=2 * n_embd, n_ctx_train=1024)
            write_llama_gguf(path, shape=shape, tokenizer=tok, seed=seed)
        pairs.append(f"{role}={path}")
    return pairs


STEP = -1
"""Where one step's questions end in a :class:`Counting` log."""


class Counting:
    """A constraint that logs how many tokens it is asked about, and where steps end."""

    def __init__(self, inner, asked: list[int]) -> None:  # noqa: ANN001
        self.inner, self.asked = inner, asked

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        self.asked.append(len(tokens))
        return self.inner.allowed(tokens)

    def accept(self, token: int) -> None:
        self.asked.append(STEP)
        self.inner.accept(token)

    def clone(self) -> Counting:
        return Counting(self.inner.clone(), self.asked)


def measure(s: Session, n: int, **changes: object) -> tuple[float, float, float, int]:
    """Sampler ms/token, wall ms/token, tokens asked per step, tokens generated."""
    asked: list[int] = []
    make = Session.grammar
    s.grammar = lambda text: Counting(make(s, text), asked)  # type: ignore[method-assign]
    s.engine.stats.reset()
    start = time.perf_counter()
    r = s.generate("Describe a shape as JSON:", max_tokens=n, seed=3, **changes)
    wall = time.perf_counter() - start
    del s.grammar
    k = len(r.steps)
    st = s.engine.stats
    return 1e3 * st.sampler_seconds / k, 1e3 * wall / k, sum(a for a in asked if a > 0) / k, k


def full_masks(s: Session, grammar: str) -> tuple[float, float]:
    """Milliseconds of one exact mask over the vocabulary: at the start, inside a string."""
    ids = np.arange(s.vocab_size)
    g = s.grammar(grammar)
    out = []
    for prefix in ("", '{"name": "Jo'):
        g = s.grammar(grammar)
        for t in s.tokenize(prefix, add_bos=False) if prefix else []:
            g.accept(t)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            g.allowed(ids)
            times.append(time.perf_counter() - start)
        out.append(1e3 * statistics.median(times))
    return out[0], out[1]


def family_settles(n: int) -> None:
    """The share of the tiny family's steps under the JSON schema that asked only the head."""
    with load_session("tiny-up", options=LoadOptions(n_threads=1, n_ctx=1024,
                                                      speculative=False)) as s:
        make = Session.grammar
        for temperature in (0.0, 1.0):
            log: list[int] = []
            s.grammar = lambda text, log=log: Counting(make(s, text), log)  # type: ignore
            for seed in range(8):
                s.generate("What is the home town of Has Zhithdou?", raw=False,
                           json_schema=SCHEMA, temperature=temperature, seed=seed,
                           max_tokens=n)
                log.append(STEP)
            del s.grammar
            steps = per_step(log)
            settled = sum(1 for t in steps if t <= sum(HEAD))
            print(f"tiny-up ({s.vocab_size} tokens), JSON schema, temperature {temperature:g}: "
                  f"{settled} of {len(steps)} steps settled in the head", flush=True)


def per_step(log: list[int]) -> list[int]:
    """Tokens asked in each step (a step ends where its token was accepted)."""
    out, total = [], 0
    for size in log:
        if size == STEP:
            out.append(total)
            total = 0
        else:
            total += size
    return [t for t in out if t]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vocabs", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", action="store_true",
                        help="Also measure how often the trained tiny family settles a draw "
                        "in the head.")
    args = parser.parse_args()
    if args.family:
        family_settles(args.tokens)
    for vocab in args.vocabs:
        pairs = write_trio(vocab)
        with load_session(models=pairs, options=LoadOptions(
                n_threads=args.threads, n_ctx=1024, speculative=False)) as s:
            grammar = s.settings_for(json_schema=SCHEMA).grammar
            s.generate("warm up", max_tokens=4)
            print(f"{vocab.name}: {s.vocab_size} tokens")
            start, inside = full_masks(s, grammar)
            print(f"  one exact mask: {start:.1f} ms at the start, {inside:.1f} ms inside a "
                  "string")
            cases = [("no grammar, temperature 1", {}),
                     ("JSON schema, temperature 1", {"json_schema": SCHEMA}),
                     ("JSON schema, greedy", {"json_schema": SCHEMA, "temperature": 0}),
                     ("JSON schema, top-k 40", {"json_schema": SCHEMA, "top_k": 40}),
                     ("JSON schema, top-p 0.95 (exact mask)", {"json_schema": SCHEMA,
                                                               "top_p": 0.95}),
                     ("any text (r'[^\\x00]*'), temperature 1", {"grammar": ANY_TEXT})]
            for label, changes in cases:
                sampler_ms, wall_ms, asked, k = measure(s, args.tokens, **changes)
                print(f"  {label:<38} sampler {sampler_ms:7.2f} ms/token, wall "
                      f"{wall_ms:7.2f} ms/token, asked {asked:8.0f} tokens/step ({k} tokens)",
                      flush=True)


if __name__ == "__main__":
    main()
