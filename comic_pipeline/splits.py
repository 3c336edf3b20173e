"""Book-level splits: which of train / val / test a comic belongs to (DESIGN §1, comic_splits).

The rule hashes the comic id alone, so a comic keeps its split whenever it arrives and whatever
other comics exist; task generation, the COMICS scoring and the audits all split with it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from comic_pipeline.schema import SPLITS


def assign_splits(comic_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  salt: str = "comic-splits-v1") -> dict[str, str]:
    """comic id -> "train" | "val" | "test" by a stable hash of the id alone.

    A comic keeps its split whenever it arrives, whichever other comics exist.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions {fractions} must be {len(SPLITS)} non-negative numbers "
                         f"({', '.join(SPLITS)}) with a positive sum")
    bounds = np.cumsum(fractions) / sum(fractions)  # (3,) upper bound of each split in [0, 1)
    splits = {}
    for comic_id in comic_ids:
        if not isinstance(comic_id, str) or not comic_id:
            raise ValueError(f"comic id {comic_id!r} must be a non-empty string")
        digest = hashlib.sha256(f"{salt}\x00{comic_id}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
        splits[comic_id] = SPLITS[min(int(np.searchsorted(bounds, unit, side="right")), len(SPLITS) - 1)]
    return splits
