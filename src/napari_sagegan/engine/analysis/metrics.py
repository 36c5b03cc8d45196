"""Segmentation metrics: foreground Dice and instance precision / recall / F1.

The instance metrics follow the evaluation in ``docs/method.md``: the IoU between every
predicted and every ground-truth instance, a one-to-one Hungarian matching, and a pair counts
as a true positive at threshold ``t`` when its IoU is at least ``t``.

Label images are used as given: every distinct non-zero value is one instance (values need not
be consecutive, any integer dtype works, a boolean or 0/1 mask is one instance). Label a binary
mask (``scipy.ndimage.label``) before calling these functions if its connected components are
meant. Every function works for 2-D and 3-D arrays alike.

Matching, precisely. At each threshold ``t`` the matching maximises the *number* of pairs
with IoU >= t, and among those matchings the summed IoU (``linear_sum_assignment`` on the
cost ``-[IoU >= t] - IoU / (2 min(n_pred, n_gt))``, as StarDist's ``matching`` does). A single
matching that maximises the summed IoU over all pairs can trade a pair above ``t`` for two
weak pairs below it and so miss a true positive; for ``t >= 0.5`` and non-overlapping labels
the result equals that of any sensible matching, because an instance then has at most one
partner with IoU >= 0.5.

Empty cases. ``precision = TP / n_pred`` and ``recall = TP / n_gt``; with no prediction and no
ground truth, precision, recall, F1 and Dice are all 1 (nothing to find, nothing wrongly
found); with only one of them empty, precision, recall and F1 are 0 (``F1 = 2 TP / (2 TP + FP +
FN)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Real
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "dice",
    "evaluate_pair",
    "iou_matrix",
    "match_instances",
    "mean_metrics",
    "size_ratios",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


# --------------------------------------------------------------------------------------------
# input checks and label compaction
# --------------------------------------------------------------------------------------------
def _as_labels(labels: Any, name: str) -> np.ndarray:
    """Return ``labels`` as a non-negative integer array (bool -> 0/1)."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise ValueError(
                f"{name} holds negative label values (min {arr.min()}); label images must use "
                "0 for background and positive integers for particles"
            )
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
            raise ValueError(
                f"{name} is a {arr.dtype} image with non-integer values; expected a label image "
                "(0 = background, 1, 2, ... = particles). Threshold and label a probability "
                "map first."
            )
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} holds negative label values (min {arr.min()})")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")


def _check_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_labels(pred, "prediction")
    g = _as_labels(gt, "ground truth")
    if p.shape != g.shape:
        raise ValueError(
            f"prediction shape {p.shape} differs from ground truth shape {g.shape}; "
            "compare a prediction with the mask of the same image (same size, same axes)"
        )
    return p, g


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the label values to consecutive codes.

    Returns
    -------
    codes : np.ndarray, shape (labels.size,), intp
        0 for background, ``k`` for the ``k``-th smallest non-zero label value.
    ids : np.ndarray, shape (n,)
        The original non-zero label values, ascending (``ids[k - 1]`` has code ``k``).
    """
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, labels.dtype)
    top = int(flat.max())
    if top <= max(4 * flat.size, 1 << 16):  # a look-up table is cheap: O(size), no sort
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.intp)
        lut[~present] = 0
        return lut[flat], np.flatnonzero(present).astype(labels.dtype)
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.intp)
    if ids[0] == 0:
        return inverse, ids[1:]
    return inverse + 1, ids


def _sparse_iou(
    pred: np.ndarray, gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (pred, gt) pair, from the joint histogram of label pairs.

    Returns
    -------
    rows, cols : np.ndarray, shape (k,)
        0-based indices into ``pred_ids`` / ``gt_ids`` of the ``k`` overlapping pairs.
    iou : np.ndarray, shape (k,), float64
        Their IoU, in (0, 1].
    pred_ids, gt_ids : np.ndarray
        Label values of the predicted and ground-truth instances.
    """
    cp, pred_ids = _compact(pred)
    cg, gt_ids = _compact(gt)
    n_p, n_g = len(pred_ids), len(gt_ids)
    area_p = np.bincount(cp, minlength=n_p + 1)
    area_g = np.bincount(cg, minlength=n_g + 1)
    both = (cp > 0) & (cg > 0)
    joint = cp[both].astype(np.int64) * (n_g + 1) + cg[both]
    pairs, inter = np.unique(joint, return_counts=True)
    rows, cols = np.divmod(pairs, n_g + 1)
    union = area_p[rows] + area_g[cols] - inter
    iou = inter / union
    return rows - 1, cols - 1, iou, pred_ids, gt_ids


def iou_matrix(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every predicted and every ground-truth instance.

    Computed from the joint histogram of (pred, gt) label pairs in one pass over the pixels,
    never by comparing full-size masks pair by pair.

    Parameters
    ----------
    pred, gt : array_like of int, same shape (2-D or 3-D)
        Label images, 0 = background.

    Returns
    -------
    iou : np.ndarray, shape (n_pred, n_gt), float64
        ``iou[i, j]`` = |P_i & G_j| / |P_i | G_j|, 0 where the instances do not overlap.
    pred_ids : np.ndarray, shape (n_pred,)
        Label value of row ``i`` (ascending).
    gt_ids : np.ndarray, shape (n_gt,)
        Label value of column ``j`` (ascending).
    """
    p, g = _check_pair(pred, gt)
    rows, cols, iou, pred_ids, gt_ids = _sparse_iou(p, g)
    dense = np.zeros((len(pred_ids), len(gt_ids)), np.float64)
    dense[rows, cols] = iou
    return dense, pred_ids, gt_ids


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------
def _count_matches(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, n_p: int, n_g: int) -> int:
    """Largest one-to-one matching among the candidate pairs (ties broken by summed IoU).

    The bipartite graph of candidate pairs is split into connected components; a component
    with one edge is matched directly, larger ones by ``linear_sum_assignment``.
    """
    if len(rows) == 0:
        return 0
    graph = coo_matrix(
        (np.ones(len(rows)), (rows, n_p + cols)), shape=(n_p + n_g, n_p + n_g)
    ).tocsr()
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[rows]
    edges_per_comp = np.bincount(edge_comp)
    single = edges_per_comp[edge_comp] == 1
    tp = int(np.count_nonzero(single))
    if tp == len(rows):
        return tp
    order = np.argsort(edge_comp[~single], kind="stable")
    r, c, v = rows[~single][order], cols[~single][order], iou[~single][order]
    starts = np.flatnonzero(np.r_[True, np.diff(edge_comp[~single][order]) != 0])
    for start, stop in zip(starts, np.r_[starts[1:], len(r)]):
        ur, ri = np.unique(r[start:stop], return_inverse=True)
        uc, ci = np.unique(c[start:stop], return_inverse=True)
        scale = 2.0 * min(len(ur), len(uc))
        cost = np.zeros((len(ur), len(uc)))
        cost[ri, ci] = -1.0 - v[start:stop] / scale
        sel_r, sel_c = linear_sum_assignment(cost)
        tp += int(np.count_nonzero(cost[sel_r, sel_c] < 0))
    return tp


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    ts = tuple(float(t) for t in thresholds)
    if not ts:
        raise ValueError("give at least one IoU threshold, e.g. (0.5,)")
    bad = [t for t in ts if not 0.0 < t <= 1.0]
    if bad:
        raise ValueError(f"IoU thresholds must be in (0, 1], got {bad[0]}")
    return ts


def _ratio(num: int, den: int, other_empty: bool) -> float:
    if den > 0:
        return num / den
    return 1.0 if other_empty else 0.0


def match_instances(
    pred: Any, gt: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """Match predicted to ground-truth instances one-to-one and count hits per IoU threshold.

    At each threshold ``t`` a one-to-one (Hungarian) matching maximises the number of pairs
    with IoU >= t, ties broken by the summed IoU; those pairs are the true positives. See the
    module docstring for why the matching is done per threshold and for the empty cases.

    Parameters
    ----------
    pred, gt : array_like of int, same shape (2-D or 3-D)
        Label images, 0 = background; each distinct non-zero value is one instance.
    thresholds : sequence of float
        IoU thresholds in (0, 1].

    Returns
    -------
    dict
        ``"tp"``, ``"fp"``, ``"fn"`` : dict[float, int], counts per threshold;
        ``"precision"``, ``"recall"``, ``"f1"`` : dict[float, float] per threshold;
        ``"f1_mean"`` : float, mean F1 over the thresholds;
        ``"n_pred"``, ``"n_gt"`` : int, number of instances.

    Raises
    ------
    ValueError
        If the shapes differ, the labels are not integers >= 0, or a threshold is outside
        (0, 1].
    """
    ts = _check_thresholds(thresholds)
    p, g = _check_pair(pred, gt)
    rows, cols, iou, pred_ids, gt_ids = _sparse_iou(p, g)
    n_p, n_g = len(pred_ids), len(gt_ids)
    out: dict[str, Any] = {k: {} for k in ("tp", "fp", "fn", "precision", "recall", "f1")}
    for t in ts:
        keep = iou >= t
        tp = _count_matches(rows[keep], cols[keep], iou[keep], n_p, n_g)
        fp, fn = n_p - tp, n_g - tp
        out["tp"][t], out["fp"][t], out["fn"][t] = tp, fp, fn
        out["precision"][t] = _ratio(tp, n_p, other_empty=n_g == 0)
        out["recall"][t] = _ratio(tp, n_g, other_empty=n_p == 0)
        out["f1"][t] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    out["f1_mean"] = float(np.mean([out["f1"][t] for t in ts]))
    out["n_pred"], out["n_gt"] = n_p, n_g
    return out


def size_ratios(pred: Any, gt: Any, iou: float = 0.5) -> np.ndarray:
    """Linear size ratios ``sqrt(area_pred / area_gt)`` of the instances matched at ``iou``.

    For ``iou >= 0.5`` every instance has at most one partner above the threshold, so the
    pairs need no assignment. The median of the returned ratios over a data set is the
    *size bias* the project reports: 1.0 means unbiased diameters, 1.1 means particles come
    out 10 % too wide.

    Parameters
    ----------
    pred, gt : array_like of int, same shape (2-D or 3-D)
        Label images, 0 = background.
    iou : float
        Matching threshold in [0.5, 1].

    Returns
    -------
    np.ndarray, shape (n_matched,), float64
    """
    if not 0.5 <= float(iou) <= 1.0:
        raise ValueError(f"size_ratios matches at IoU >= 0.5 (unique pairs), got {iou}")
    p, g = _check_pair(pred, gt)
    cp, pred_ids = _compact(p)
    cg, gt_ids = _compact(g)
    area_p = np.bincount(cp, minlength=len(pred_ids) + 1)
    area_g = np.bincount(cg, minlength=len(gt_ids) + 1)
    rows, cols, ious, _, _ = _sparse_iou(p, g)
    keep = ious >= float(iou)
    return np.sqrt(area_p[rows[keep] + 1] / area_g[cols[keep] + 1]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------
def dice(pred: Any, gt: Any) -> float:
    """Foreground Dice coefficient of ``pred > 0`` against ``gt > 0``.

    ``Dice = 2 |P & G| / (|P| + |G|)``; 1.0 when both are empty.

    Parameters
    ----------
    pred, gt : array_like, same shape
        Label images or binary masks (any value > 0 is foreground).

    Returns
    -------
    float
        Dice in [0, 1].
    """
    p, g = _check_pair(pred, gt)
    p, g = p > 0, g > 0
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / total


def evaluate_pair(pred: Any, gt: Any) -> dict[str, float]:
    """All the metrics the project reports, for one image, as a flat dict.

    Parameters
    ----------
    pred, gt : array_like of int, same shape (2-D or 3-D)
        Predicted and ground-truth label images (0 = background).

    Returns
    -------
    dict[str, float]
        ``dice``, ``precision@0.5``, ``recall@0.5``, ``f1@0.5``, ``f1@0.5:0.9`` (mean F1 over
        IoU 0.5, 0.6, 0.7, 0.8, 0.9), ``f1@0.6`` ... ``f1@0.9``, ``n_pred``, ``n_gt``.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    p, g = _check_pair(pred, gt)
    m = match_instances(p, g, DEFAULT_THRESHOLDS)
    row: dict[str, float] = {
        "dice": dice(p, g),
        "precision@0.5": m["precision"][0.5],
        "recall@0.5": m["recall"][0.5],
        "f1@0.5": m["f1"][0.5],
        "f1@0.5:0.9": m["f1_mean"],
    }
    for t in DEFAULT_THRESHOLDS[1:]:
        row[f"f1@{t:g}"] = m["f1"][t]
    row["n_pred"] = m["n_pred"]
    row["n_gt"] = m["n_gt"]
    return row


def mean_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean over images of every numeric entry of per-image metric dicts.

    Parameters
    ----------
    rows : sequence of dict
        One dict per image (e.g. from :func:`evaluate_pair`). Non-numeric values (names,
        paths) and booleans are skipped; a key missing from some rows is averaged over the
        rows that have it.

    Returns
    -------
    dict[str, float]
        Key order of first appearance; empty when ``rows`` is empty.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, Real | np.number):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
