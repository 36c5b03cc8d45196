"""The EMPS training split (../shared/data/emps-train) and its fixed held-out subset.

Every benchmark uses the same split: a seeded 20 % of the 366 pairs is held out and never
trained or tuned on. The images are never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_sagegan.engine.data.pairs import split_indices
from napari_sagegan.engine.infer import scale
from napari_sagegan.io.images import find_pairs, read_image, read_labels

EMPS = Path(
    os.environ.get(
        "SAGEGAN_EMPS", Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"
    )
)
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 2026


def available() -> bool:
    return (EMPS / "images").is_dir() and (EMPS / "masks").is_dir()


def load(limit: int | None = None):
    """Return (train_pairs, holdout_pairs): lists of (stem, image, labels)."""
    if not available():
        raise SystemExit(f"EMPS data not found at {EMPS}; set SAGEGAN_EMPS")
    pairs = find_pairs(EMPS / "images", EMPS / "masks")
    train_idx, hold_idx = split_indices(len(pairs), HOLDOUT_FRACTION, HOLDOUT_SEED)

    def get(idx):
        idx = sorted(idx)[:limit] if limit else sorted(idx)
        return [(pairs[i][0].stem, read_image(pairs[i][0]), read_labels(pairs[i][1])) for i in idx]

    return get(train_idx), get(hold_idx)


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter of the instances, pixels (0 without any)."""
    return scale.median_diameter(labels) or 0.0
