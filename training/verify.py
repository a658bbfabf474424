"""Check exported GGUF files against the torch models and the HF tokenizer (a dev tool).

    python -m training.verify training/out/final

For each model: the same token ids go into torch and llama.cpp and the last-position
logits are compared (max-abs difference, same argmax); text round-trips through
llama.cpp's tokenizer; the end-of-turn token is an end-of-generation token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from eft_local.backend import LlamaModel
from training.build_family import load_model
from training.tok import CHAT_TEMPLATE, END, SPECIAL_TOKENS, load_tokenizer, render_chat

SAMPLES = [
    "Hythdul Beimfund is a potter. He was born in 1995 in Quiburg.",
    "Ünïcödé àccents, emoji 🦙 and  double  spaces\n\ttabs.",
    render_chat([{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "What is the home town of Tykhaex Mikrounstux?"},
                 {"role": "assistant", "content": "Stainby"},
                 {"role": "user", "content": "When was Tykhaex Mikrounstux born?"}],
                add_generation_prompt=True),
]


def check_model(gguf: Path, pt: Path, tok) -> dict:
    """Compare logits and tokenization of one exported model."""
    model = load_model(pt)
    llm = LlamaModel(gguf, n_ctx=512, n_threads=2)
    report: dict = {"file": gguf.name}
    try:
        for i, text in enumerate(SAMPLES):
            ids = tok.encode(text).ids
            ids_cpp = llm.tokenize(text, add_bos=False, special=True)
            back = b"".join(llm.piece(t, special=True) for t in ids_cpp).decode("utf-8")
            report[f"tokens_equal_{i}"] = ids == ids_cpp
            report[f"roundtrip_{i}"] = back == text
            with torch.no_grad():
                ref = model(torch.tensor([ids]))[0, -1].numpy()
            llm.rewind(0)
            got = llm.eval(ids)[-1]
            report[f"maxabs_{i}"] = float(np.abs(ref - got).max())
            report[f"argmax_equal_{i}"] = int(ref.argmax()) == int(got.argmax())
        report["end_is_eog"] = llm.is_eog(SPECIAL_TOKENS.index(END))
        report["others_not_eog"] = not any(llm.is_eog(i) for i in range(1, len(SPECIAL_TOKENS)))
        report["chat_template_equal"] = llm.chat_template() == CHAT_TEMPLATE
    finally:
        llm.close()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a build folder, e.g. training/out/final")
    args = ap.parse_args()
    tok = load_tokenizer(args.out / "tokenizer.json")
    ok = True
    for pt in sorted(args.out.glob("*.pt")):
        for gguf in (args.out / "gguf" / f"{pt.stem}.f32.gguf", args.out / "gguf" /
                     f"{pt.stem}.gguf"):
            rep = check_model(gguf, pt, tok)
            print(json.dumps(rep))
            ok &= all(v for k, v in rep.items() if k.startswith(("tokens", "round", "argmax",
                                                                  "end", "others", "chat")))
            ok &= all(v < 0.05 for k, v in rep.items() if k.startswith("maxabs")
                      and gguf.name.endswith(".f32.gguf"))
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
