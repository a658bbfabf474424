"""Write the bundled evaluation text for ``eft-local explore``: fresh documents of the
family's world (same people and facts, phrasings drawn with a seed the training never used),
separated by ``<|end|>`` as in pre-training.

    python -m training.heldout_text            # writes eft_local/family/heldout.txt
"""

from __future__ import annotations

import random
from pathlib import Path

from training import world as W

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "eft_local" / "family" / "heldout.txt"
SEED = 20261128  # not a training seed: these exact documents were never trained on
N_DOCUMENTS = 56


def heldout_text(n_documents: int = N_DOCUMENTS, seed: int = SEED) -> str:
    """``n_documents`` documents about held-out people, joined by the document separator."""
    world = W.make_world(300, seed=0)
    rng = random.Random(seed)
    people = rng.sample(world.heldout_people, n_documents)
    return "<|end|>".join(W.pretrain_document(p, rng) for p in people) + "<|end|>"


if __name__ == "__main__":
    OUT.write_text(heldout_text(), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
