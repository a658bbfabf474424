"""Pre-training and chat fine-tuning loops (torch, CPU)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from training.model import Llama
from training.tok import END, SPECIAL_TOKENS

END_ID = SPECIAL_TOKENS.index(END)
Batch = tuple[torch.Tensor, ...]  # inputs, targets, loss mask (+ a distill flag tensor)


def pack_documents(docs_ids: list[list[int]]) -> torch.Tensor:
    """One token stream: END, doc, END, doc, ... (END separates documents)."""
    stream: list[int] = []
    for ids in docs_ids:
        stream.append(END_ID)
        stream.extend(ids)
    stream.append(END_ID)
    return torch.tensor(stream, dtype=torch.long)


def pretrain_batches(stream: torch.Tensor, *, batch: int, seq: int,
                     seed: int) -> Iterator[Batch]:
    """Consecutive windows of the stream in a seeded random order, forever."""
    n = (len(stream) - 1) // seq
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            starts = order[i:i + batch] * seq
            idx = starts[:, None] + torch.arange(seq + 1)[None, :]
            chunk = stream[idx]
            yield chunk[:, :-1], chunk[:, 1:], torch.ones(batch, seq, dtype=torch.bool)


def chat_example(segments: list[tuple[list[int], float]]) -> tuple[list[int], list[float]]:
    """Concatenate (ids, weight) segments into ids and a per-token loss weight (0: none)."""
    ids: list[int] = []
    flags: list[float] = []
    for seg, trained in segments:
        ids.extend(seg)
        flags.extend([trained] * len(seg))
    return ids, flags


def chat_batches(examples: list[tuple[list[int], list[float]]], *, batch: int,
                 seed: int, distill: bool = False, weighted: bool = False) -> Iterator[Batch]:
    """Padded batches of chats; the loss covers only the flagged (assistant) tokens
    (weighted=True: a float mask, each token's loss weighed by its flag).

    distill=True marks the batches for train()'s teacher: the loss on them is the KL
    divergence from the teacher's next-token distributions instead of cross-entropy.
    """
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            rows = [examples[j] for j in order[i:i + batch]]
            width = max(len(ids) for ids, _ in rows) - 1
            x = torch.full((batch, width), END_ID, dtype=torch.long)
            y = torch.full((batch, width), END_ID, dtype=torch.long)
            m = torch.zeros((batch, width), dtype=torch.float32 if weighted else torch.bool)
            for r, (ids, flags) in enumerate(rows):
                n = len(ids) - 1
                x[r, :n] = torch.tensor(ids[:-1])
                y[r, :n] = torch.tensor(ids[1:])
                m[r, :n] = torch.tensor(flags[1:], dtype=m.dtype)
            yield (x, y, m, torch.tensor(True)) if distill else (x, y, m)


def interleave(main: Iterator[Batch], extra: Iterator[Batch], every: int) -> Iterator[Batch]:
    """Batches of main, with one batch of extra after every `every` of them (0 = never)."""
    step = 0
    while True:
        yield next(main)
        step += 1
        if every and step % every == 0:
            yield next(extra)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model: Llama, batches: Iterator[Batch], *, steps: int, lr: float,
          warmup: int = 50, weight_decay: float = 0.1, log: Callable[[str], None] = print,
          label: str = "", bf16: bool = False, probe_every: int = 0,
          probe: Callable[[], str] | None = None,
          teacher: Llama | None = None, distill_weight: float = 1.0) -> dict[str, float]:
    """AdamW on masked next-token cross-entropy; returns wall time and final loss.

    bf16=True runs the forward pass under CPU bfloat16 autocast (weights stay float32).
    Batches flagged for distillation (chat_batches(distill=True)) are scored instead by
    distill_weight * the squared distance of the model's and the frozen teacher's
    log-probability vectors, averaged over the masked positions: they hold the model to
    the teacher there. A float mask weighs each token's cross-entropy.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    t0 = time.time()
    tokens = 0
    ema = None
    for step in range(steps):
        x, y, m, *distill = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            if distill:
                assert teacher is not None, "distillation batch without a teacher"
                with torch.no_grad():
                    target = teacher(x)
        if distill:
            # Squared error of the log-probabilities (floored at -50), every token alike: EFT
            # adds and subtracts log-probs, so unlikely tokens' values matter too (a KL
            # divergence would weigh them by the teacher's tiny probabilities).
            lp = torch.log_softmax(logits[m].float(), -1).clamp(min=-50.0)
            lt = torch.log_softmax(target[m].float(), -1).clamp(min=-50.0)
            loss = (lp - lt).pow(2).sum(-1).mean() * distill_weight
        elif m.dtype != torch.bool:
            sel = m > 0
            losses = F.cross_entropy(logits[sel].float(), y[sel], reduction="none")
            loss = (losses * m[sel]).sum() / m[sel].sum()
        else:
            loss = F.cross_entropy(logits[m].float(), y[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            dt = time.time() - t0
            log(f"{label} step {step}/{steps} loss {ema:.3f} "
                f"{tokens / max(dt, 1e-9):.0f} tok/s {dt:.0f}s")
        if probe and probe_every and (step + 1) % probe_every == 0:
            model.eval()
            log(f"{label} step {step + 1} probe {probe()}")
            model.train()
    model.eval()
    return {"seconds": time.time() - t0, "loss": float(ema or 0.0), "tokens": tokens}
