"""``sagegan evaluate``: Dice and instance F1 of predicted labels against ground truth.

Prints one row per image and the mean; ``--json`` also writes them. The work is
:func:`napari_sagegan.api.evaluate`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from napari_sagegan.cli._common import spare_inputs
from napari_sagegan.util.progress import run_to_end

KEYS = ["dice", "precision@0.5", "recall@0.5", "f1@0.5", "f1@0.5:0.9", "n_pred", "n_gt"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``sagegan`` sub-parsers."""
    e = sub.add_parser("evaluate", help="compare predicted labels with ground truth")
    e.add_argument("--pred", required=True, help="folder of predicted label images")
    e.add_argument("--gt", required=True, help="folder of ground-truth label images")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=run)
    return e


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan evaluate``; returns the exit status (0)."""
    spare_inputs([args.pred, args.gt], args.json, flag="--json")
    from napari_sagegan import api

    report = run_to_end(api.evaluate(args.pred, args.gt, out=args.json))
    rows, mean = report["per_image"], report["mean"]
    width = max(len("mean"), *(len(s) for s in rows))
    print(f"{'image':<{width}}  " + "  ".join(f"{k:>13}" for k in KEYS))
    for stem, m in list(rows.items()) + [("mean", mean)]:
        cells = (f"{m[k]:>13.4f}" if isinstance(m[k], float) else f"{m[k]:>13}" for k in KEYS)
        print(f"{stem:<{width}}  " + "  ".join(cells))
    return 0
