"""Probe a base model's recall in the pre-training FAQ format (a dev tool).

    python -m training.probe training/out/final/large_base.pt --people 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from training import world as W
from training.evaluate import greedy
from training.model import Llama
from training.tok import END, SPECIAL_TOKENS


def recall(model: Llama, tok, questions: list[dict]) -> dict[str, float]:
    """Greedy exact-recall rate per category for "<|end|>question\\n" prompts."""
    end_id = SPECIAL_TOKENS.index(END)
    prompts = [[end_id] + tok.encode(q["prompt"] + "\n").ids for q in questions]
    outs = greedy([(model, 1.0)], prompts, max_new=6)
    hits: dict[str, list[bool]] = {}
    for q, ids in zip(questions, outs, strict=True):
        text = tok.decode(ids).split("\n")[0].strip()
        hits.setdefault(q["category"], []).append(text == q["expected"])
    return {k: round(sum(v) / len(v), 3) for k, v in hits.items()}


def main() -> None:
    from training.build_family import load_model
    from training.tok import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--people", type=int, required=True)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(args.checkpoint.parent / "tokenizer.json")
    qs = W.heldout_questions(W.make_world(args.people))[: args.n]
    print(recall(load_model(args.checkpoint), tok, qs))


if __name__ == "__main__":
    main()
