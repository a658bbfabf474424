"""Torch-side greedy evaluation of single models and EFT mixes (a dev tool).

A mix is a list of (model, weight); each step takes the argmax of the weighted sum
of the models' log_softmax rows, which is greedy EFT decoding.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from training.model import Llama
from training.tok import END, SPECIAL_TOKENS, render_chat
from training.world import DECLINE_SENTENCE

END_ID = SPECIAL_TOKENS.index(END)
Mix = list[tuple[Llama, float]]


@torch.no_grad()
def greedy(mix: Mix, prompts: list[list[int]], *, max_new: int = 16) -> list[list[int]]:
    """Greedy continuations of each prompt (prompts of equal length are batched)."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for idxs in by_len.values():
        seq = torch.tensor([prompts[i] for i in idxs], dtype=torch.long)
        done = torch.zeros(len(idxs), dtype=torch.bool)
        for _ in range(max_new):
            score = sum(w * torch.log_softmax(m(seq)[:, -1].float(), -1) for m, w in mix)
            nxt = score.argmax(-1)
            for r, i in enumerate(idxs):
                if not done[r]:
                    out[i].append(int(nxt[r]))
            done |= nxt == END_ID
            if bool(done.all()):
                break
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return out


def score(mix: Mix, tok, questions: list[dict], *, max_new: int = 16) -> dict[str, float]:
    """Format compliance, exact accuracy and decline rate per category."""
    prompts = [tok.encode(render_chat([{"role": "user", "content": q["prompt"]}],
                                      add_generation_prompt=True)).ids for q in questions]
    outs = greedy(mix, prompts, max_new=max_new)
    stats: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for q, ids in zip(questions, outs, strict=True):
        ok_format = bool(ids) and ids[-1] == END_ID and END_ID not in ids[:-1]
        text = tok.decode([t for t in ids if t != END_ID], skip_special_tokens=False).strip()
        cat = q["category"]
        counts[cat] += 1
        stats["format"] += ok_format
        stats["acc"] += ok_format and text == q["expected"]
        stats[f"acc_{cat}"] += ok_format and text == q["expected"]
        stats[f"decline_{cat}"] += text == DECLINE_SENTENCE
    n = len(questions)
    res = {"format": stats["format"] / n, "acc": stats["acc"] / n}
    for cat, c in counts.items():
        res[f"acc_{cat}"] = stats[f"acc_{cat}"] / c
        res[f"decline_{cat}"] = stats[f"decline_{cat}"] / c
    return res


def standard_mixes(m: dict[str, Llama]) -> dict[str, Mix]:
    """The mixes of the paper figure: single models, EFT up/down, beta and lambda sweeps."""
    sb, lb, sf = m["small_base"], m["large_base"], m["small_ft"]
    mixes: dict[str, Mix] = {
        "small_ft": [(sf, 1.0)],
        "large_ft": [(m["large_ft"], 1.0)],
        "large_base": [(lb, 1.0)],
        "eft_up": [(lb, 1.0), (sf, 1.0), (sb, -1.0)],
        "eft_down": [(sb, 1.0), (m["large_ft"], 1.0), (lb, -1.0)],
    }
    for beta in (0.5, 1.5, 2.0):
        mixes[f"up_beta{beta}"] = [(lb, 1.0), (sf, beta), (sb, -beta)]
    if "small_ft_alt" in m:
        alt = m["small_ft_alt"]
        mixes["small_ft_alt"] = [(alt, 1.0)]
        for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
            mixes[f"lambda{lam}"] = [(lb, 1.0), (sf, lam), (alt, 1.0 - lam), (sb, -1.0)]
    return mixes
