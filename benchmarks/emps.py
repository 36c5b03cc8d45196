"""The EMPS training split (../shared/data/emps-train) and its fixed held-out subsets.

Two fixed splits, never trained or tuned on:

* :func:`load`: a seeded 20 % of the 366 pairs (random images; the split of the first
  benchmarks and of the bundled model's first training runs);
* :func:`load_lso`, *leave-source-out*: whole articles held out (``sources.csv`` names each
  image's article), so that the numbers say what happens on a lab the model has never
  seen. The validation articles are those all of whose images lie in the seeded 20 % above:
  45 images from 44 articles that neither the bundled model nor any image of their articles
  was ever trained on. Everything else (321 images) may be trained on.

The images are never copied into the repository.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
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


def articles() -> dict[str, str]:
    """Image id -> article (DOI) of every EMPS image, from sources.csv."""
    with open(EMPS / "sources.csv", newline="") as fh:
        return {row["id"]: row["doi"] for row in csv.DictReader(fh)}


def lso_validation_ids() -> set[str]:
    """Ids of the leave-source-out validation images (see the module docstring)."""
    pairs = find_pairs(EMPS / "images", EMPS / "masks")
    _train, hold_idx = split_indices(len(pairs), HOLDOUT_FRACTION, HOLDOUT_SEED)
    held = {pairs[i][0].stem for i in hold_idx}
    by_article: dict[str, list[str]] = defaultdict(list)
    for stem, doi in articles().items():
        by_article[doi].append(stem)
    return {s for stems in by_article.values() if all(x in held for x in stems) for s in stems}


def fewshot_articles(n_articles: int) -> list[str]:
    """The first ``n_articles`` articles (by DOI) with 3 or more images outside the
    leave-source-out validation: the few-shot episodes of benchmarks/bench_fewshot.py, and
    what ``scripts/campaign.py --exclude-fewshot`` keeps out of a base model's training."""
    val_ids = lso_validation_ids()
    count: dict[str, int] = defaultdict(int)
    for stem, doi in articles().items():
        if stem not in val_ids:
            count[doi] += 1
    return [a for a in sorted(count) if count[a] >= 3][: max(0, int(n_articles))]


def load_lso(limit: int | None = None):
    """Return (train_pairs, validation_pairs) of the leave-source-out split, as lists of
    ``(stem, image, labels)``; ``limit`` keeps the first images of each (quick runs)."""
    if not available():
        raise SystemExit(f"EMPS data not found at {EMPS}; set SAGEGAN_EMPS")
    pairs = find_pairs(EMPS / "images", EMPS / "masks")
    val_ids = lso_validation_ids()
    out: tuple[list, list] = ([], [])
    for ip, mp in pairs:
        part = out[1] if ip.stem in val_ids else out[0]
        if limit is None or len(part) < limit:
            part.append((ip.stem, read_image(ip), read_labels(mp)))
    return out
