"""Rebuild the bundled model family, seeded, from nothing.

    python -m training.build_family                   # the shipped family
    python -m training.build_family --finetune-only   # only the fine-tunes, on the shipped bases
    python -m training.build_family --preset pilot    # a few-minute sizing run

Stages: world and texts, tokenizer, pre-training of small_base and large_base, their GGUF
export (large models quantized to Q8_0), fine-tuning of small_ft, small_ft_alt and large_ft
from the base weights as exported (read back from the GGUF files), torch-side evaluation,
export of the fine-tunes, copy into eft_local/family/. --finetune-only skips the first
stages and fine-tunes from the shipped base files instead: the bases stay byte-identical and
the fine-tunes come out as a full build makes them. Checkpoints and logs go to
training/out/<preset>/ (--out); a stage whose checkpoint exists is skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from training import world as W
from training.evaluate import score, standard_mixes
from training.export import export_family, import_model
from training.model import Config, Llama
from training.probe import recall
from training.tok import (
    ASSISTANT,
    END,
    load_tokenizer,
    render_chat,
    tokenizer_spec,
    train_tokenizer,
)
from training.train import (
    chat_batches,
    chat_example,
    interleave,
    pack_documents,
    pretrain_batches,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
FAMILY_DIR = ROOT / "eft_local" / "family"


@dataclass(frozen=True)
class Recipe:
    """Everything that sizes a build."""

    n_people: int = 300
    vocab: int = 1024
    passes: int = 200             # fresh pre-training documents per person
    ft_per_fact: int = 3          # chats per (fine-tuning person, fact)
    mt_chats: int = 1350          # multi-turn chats of the second fine-tuning stage
    mt_turns: tuple[int, int] = (2, 5)  # exchanges per multi-turn chat
    mt_steps: int = 60            # second stage: multi-turn chats, single-turn distillation
    mt_lr_factor: float = 0.1
    mt_decline_weight: float = 0.03  # loss weight of second-stage declines (small_ft_alt)
    mt_warmup: int = 10
    mt_distill_weight: float = 1.0
    small: tuple[int, int, int, int] = (48, 2, 4, 128)     # n_embd, n_layer, n_head, n_ff
    large: tuple[int, int, int, int] = (256, 6, 8, 704)
    batch: int = 16
    seq: int = 128
    pretrain_epochs_small: float = 1.0
    pretrain_epochs_large: float = 1.0
    lr_small: float = 3e-3
    lr_large: float = 2.5e-3
    ft_steps: int = 200
    ft_batch: int = 32
    ft_lr_factor: float = 0.3
    n_eval: int = 0               # 0 = all held-out questions, -1 = no torch-side evaluation
    bf16: bool = True             # bfloat16 autocast for the forward passes
    probe_every: int = 100        # log held-out FAQ recall every N pre-training steps
    ft_replay_every: int = 2      # one pre-training batch after every N chat batches
    replay_batch: int = 8
    seed: int = 0


PRESETS = {
    "final": Recipe(),
    "pilot": Recipe(passes=30, ft_steps=100, n_eval=150, probe_every=0),
}


def log_to(path: Path):
    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")
    return log


def make_config(r: Recipe, dims: tuple[int, int, int, int]) -> Config:
    d, n_layer, n_head, n_ff = dims
    return Config(n_vocab=r.vocab, n_embd=d, n_layer=n_layer, n_head=n_head, n_ff=n_ff)


def load_model(path: Path) -> Llama:
    ck = torch.load(path, weights_only=False)
    model = Llama(Config(**ck["config"]))
    model.load_state_dict(ck["state"])
    model.eval()
    return model


def save_model(model: Llama, path: Path, info: dict) -> None:
    torch.save({"config": asdict(model.cfg), "state": model.state_dict(), "info": info}, path)


BASES = ("small_base", "large_base")


def check_tokenizer(tok, gguf_path: Path) -> None:
    """Fail unless ``tok`` is the vocabulary stored in a shipped GGUF file."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    spec = tokenizer_spec(tok)
    stored = (reader.fields["tokenizer.ggml.tokens"].contents(),
              reader.fields["tokenizer.ggml.merges"].contents())
    if stored != (spec.tokens, spec.merges):
        raise SystemExit(f"{gguf_path}: its tokenizer is not the one this recipe trains")


def encode_chat(tok, chat: list[dict[str, str]], *, from_turn: int = 1,
                everything: bool = False, weights: dict[str, float] | None = None
                ) -> tuple[list[int], list[float]]:
    """Token ids of a rendered chat (the same ids as tokenizing the whole rendered text) and
    which ones the loss covers: each assistant answer from the from_turn-th on, with its
    END (weight 1, or ``weights[answer]``), or with everything=True every token."""
    segments, prefix, turn = [], "", 0
    for m in chat:
        if m["role"] == "assistant":
            turn += 1
            segments.append((tok.encode(prefix + ASSISTANT + "\n").ids, everything))
            weight = (weights or {}).get(m["content"], 1.0) if turn >= from_turn else 0.0
            segments.append((tok.encode(m["content"] + END).ids, 1.0 if everything else weight))
            prefix = "\n"
        else:
            prefix += f"<|{m['role']}|>\n{m['content']}\n"
    return chat_example(segments)


def build(r: Recipe, out: Path, *, ship: bool, finetune_only: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = log_to(out / "build.log")
    torch.set_num_threads(2)
    log(f"recipe {json.dumps(asdict(r))}")
    world = W.make_world(r.n_people, seed=r.seed)
    docs = W.pretrain_documents(world, r.passes, seed=r.seed)
    chats = W.finetune_chats(world, r.ft_per_fact, seed=r.seed)
    alt_chats = W.finetune_chats(world, r.ft_per_fact, decline=True, seed=r.seed)
    mt_chats = W.multiturn_chats(world, r.mt_chats, turns=r.mt_turns, seed=r.seed)
    mt_alt_chats = W.multiturn_chats(world, r.mt_chats, turns=r.mt_turns, decline=True,
                                     seed=r.seed)
    anchors = chats + W.stranger_chats(world, r.n_people // 2, seed=r.seed)
    alt_anchors = alt_chats + W.stranger_chats(world, r.n_people // 2, decline=True,
                                               seed=r.seed)
    questions = W.heldout_questions(world)
    log(f"{len(world.people)} people, {len(docs)} documents, {len(chats)} single-turn and "
        f"{len(mt_chats)} multi-turn chats, {len(questions)} held-out questions")

    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        sample = docs[: 20 * r.n_people] + [render_chat(c) for c in chats + alt_chats]
        train_tokenizer(sample, r.vocab).save(str(tok_path))
    tok = load_tokenizer(tok_path)
    base_dir = FAMILY_DIR if finetune_only else out / "gguf"
    if finetune_only:
        for name in BASES:
            check_tokenizer(tok, base_dir / f"{name}.gguf")
    stream = pack_documents([e.ids for e in tok.encode_batch(docs)])
    log(f"pre-training stream {len(stream)} tokens")

    probe_qs = questions[:120]
    models: dict[str, Llama] = {}
    walls: dict[str, float] = {}
    for size, dims, epochs, lr in (("small", r.small, r.pretrain_epochs_small, r.lr_small),
                                   ("large", r.large, r.pretrain_epochs_large, r.lr_large)):
        path = out / f"{size}_base.pt"
        if finetune_only:
            break
        if path.exists():
            models[f"{size}_base"] = load_model(path)
            continue
        torch.manual_seed(r.seed)
        model = Llama(make_config(r, dims))
        steps = int(epochs * len(stream) / (r.batch * r.seq))
        log(f"{size}_base: {model.n_params()} params, {steps} steps")
        res = train(model, pretrain_batches(stream, batch=r.batch, seq=r.seq, seed=r.seed),
                    steps=steps, lr=lr, warmup=min(200, steps // 10), log=log,
                    label=f"{size}_base", bf16=r.bf16, probe_every=r.probe_every,
                    probe=lambda m=model: str(recall(m, tok, probe_qs)))
        walls[f"{size}_base"] = res["seconds"]
        save_model(model, path, res)
        models[f"{size}_base"] = model

    if not finetune_only:
        export_family({b: models[b] for b in BASES}, tokenizer_spec(tok), base_dir, log=log)
    # Fine-tuning starts from the bases as shipped (Q8_0 for the large one), in both modes.
    models.update({b: import_model(base_dir / f"{b}.gguf") for b in BASES})

    # Two fine-tuning stages: single-turn chats (the first recipe); then multi-turn chats
    # (loss on the answers from turn 2 on) while single-turn chats (the fine-tuning people's
    # and invented strangers') are held to the first stage's model by distillation, so first
    # turns keep their behaviour, on known and unknown people alike.
    for name, base, single, multi, anchor, lr in (
            ("small_ft", "small_base", chats, mt_chats, anchors, r.lr_small),
            ("small_ft_alt", "small_base", alt_chats, mt_alt_chats, alt_anchors, r.lr_small),
            ("large_ft", "large_base", chats, mt_chats, anchors, r.lr_large)):
        path = out / f"{name}.pt"
        if path.exists():
            models[name] = load_model(path)
            continue
        single_path = out / f"{name}.single.pt"
        if single_path.exists():
            model = load_model(single_path)
        else:
            model = import_model(base_dir / f"{base}.gguf")
            torch.manual_seed(r.seed)
            batches = interleave(
                chat_batches([encode_chat(tok, c) for c in single], batch=r.ft_batch,
                             seed=r.seed),
                pretrain_batches(stream, batch=r.replay_batch, seq=r.seq, seed=r.seed + 1),
                r.ft_replay_every)
            res = train(model, batches, steps=r.ft_steps, lr=lr * r.ft_lr_factor, warmup=20,
                        log=log, label=f"{name} stage 1", bf16=r.bf16)
            walls[f"{name} stage 1"] = res["seconds"]
            save_model(model, single_path, res)
        teacher = load_model(single_path)
        decline_weight = {W.DECLINE_SENTENCE: r.mt_decline_weight}
        torch.manual_seed(r.seed)
        chat_stream = interleave(
            chat_batches([encode_chat(tok, c, from_turn=2, weights=decline_weight)
                          for c in multi], batch=r.ft_batch, seed=r.seed + 2, weighted=True),
            chat_batches([encode_chat(tok, c) for c in anchor],
                         batch=r.ft_batch, seed=r.seed + 3, distill=True), 1)
        batches = interleave(
            chat_stream,
            pretrain_batches(stream, batch=r.replay_batch, seq=r.seq, seed=r.seed + 4),
            2 * r.ft_replay_every)
        res = train(model, batches, steps=r.mt_steps, lr=lr * r.mt_lr_factor,
                    warmup=r.mt_warmup, log=log, label=f"{name} stage 2", bf16=r.bf16,
                    teacher=teacher, distill_weight=r.mt_distill_weight)
        walls[f"{name} stage 2"] = res["seconds"]
        save_model(model, path, res)
        models[name] = model
    if walls:
        log(f"wall seconds {json.dumps({k: round(v) for k, v in walls.items()})}")

    eval_qs = questions if r.n_eval >= 0 else []
    if r.n_eval > 0:
        eval_qs = random.Random(r.seed).sample(questions, min(r.n_eval, len(questions)))
    results = {}
    for name, mix in standard_mixes(models).items() if eval_qs else ():
        t0 = time.time()
        results[name] = score(mix, tok, eval_qs)
        log(f"eval {name:14s} " + " ".join(f"{k}={v:.3f}" for k, v in
                                           sorted(results[name].items()))
            + f" ({time.time() - t0:.0f}s)")
    (out / "torch_eval.json").write_text(json.dumps(results, indent=1))

    fine_tunes = {n: m for n, m in models.items() if n not in BASES}
    export_family(fine_tunes, tokenizer_spec(tok), out / "gguf", log=log)
    if ship:
        FAMILY_DIR.mkdir(parents=True, exist_ok=True)
        for name in (list(fine_tunes) if finetune_only else [*BASES, *fine_tunes]):
            shutil.copy2(out / "gguf" / f"{name}.gguf", FAMILY_DIR / f"{name}.gguf")
        W.write_jsonl(questions, FAMILY_DIR / "questions.jsonl")
        W.write_jsonl(W.world_rows(world), FAMILY_DIR / "world.jsonl")
        log(f"shipped to {FAMILY_DIR}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="final")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override recipe fields, e.g. passes=40 large=256,6,8,704")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-ship", action="store_true", help="do not copy into eft_local/family")
    ap.add_argument("--finetune-only", action="store_true",
                    help="fine-tune from the shipped bases in eft_local/family (kept as they "
                    "are) instead of pre-training them")
    args = ap.parse_args()
    recipe = PRESETS[args.preset]
    for kv in args.set:
        key, value = kv.split("=", 1)
        cur = getattr(recipe, key)
        if isinstance(cur, tuple):
            val = tuple(int(v) for v in value.split(","))
        else:
            val = (value.lower() in ("1", "true", "yes") if isinstance(cur, bool)
                   else type(cur)(value))
        recipe = replace(recipe, **{key: val})
    out = args.out or ROOT / "training" / "out" / args.preset
    build(recipe, out, ship=args.preset == "final" and not args.no_ship,
          finetune_only=args.finetune_only)


if __name__ == "__main__":
    main()
