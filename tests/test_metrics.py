"""Metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sagegan.engine.analysis.metrics import (
    dice,
    evaluate_pair,
    iou_matrix,
    match_instances,
    mean_metrics,
)


@pytest.fixture
def squares() -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4 ground-truth squares; a prediction with one exact copy, one copy shifted by one
    column and one extra 2x2 blob. Label values deliberately non-consecutive."""
    gt = np.zeros((16, 20), np.int32)
    gt[2:6, 2:6] = 1  # G1, 16 px
    gt[2:6, 10:14] = 2  # G2, 16 px
    pred = np.zeros((16, 20), np.uint16)
    pred[2:6, 2:6] = 7  # exact copy of G1: IoU 1
    pred[2:6, 11:15] = 3  # G2 shifted right by 1: overlap 4x3 = 12, union 16 + 16 - 12 = 20
    pred[10:12, 10:12] = 100  # false positive, 4 px
    return pred, gt


def test_iou_matrix_by_hand(squares):
    pred, gt = squares
    iou, pred_ids, gt_ids = iou_matrix(pred, gt)
    np.testing.assert_array_equal(pred_ids, [3, 7, 100])
    np.testing.assert_array_equal(gt_ids, [1, 2])
    expected = np.array([[0.0, 12 / 20], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(iou, expected)


def test_counts_precision_recall_f1_by_hand(squares):
    pred, gt = squares
    m = match_instances(pred, gt)
    assert (m["n_pred"], m["n_gt"]) == (3, 2)
    # t = 0.5 and 0.6: both squares match (IoU 1 and 0.6), the blob is a false positive
    for t in (0.5, 0.6):
        assert (m["tp"][t], m["fp"][t], m["fn"][t]) == (2, 1, 0)
    assert m["precision"][0.5] == pytest.approx(2 / 3)
    assert m["recall"][0.5] == pytest.approx(1.0)
    assert m["f1"][0.5] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # 0.8
    # t = 0.7 .. 0.9: only the exact copy matches
    for t in (0.7, 0.8, 0.9):
        assert (m["tp"][t], m["fp"][t], m["fn"][t]) == (1, 2, 1)
    assert m["precision"][0.9] == pytest.approx(1 / 3)
    assert m["recall"][0.9] == pytest.approx(1 / 2)
    assert m["f1"][0.9] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))  # 0.4
    assert m["f1_mean"] == pytest.approx((0.8 + 0.8 + 0.4 + 0.4 + 0.4) / 5)


def test_dice_and_evaluate_pair_by_hand(squares):
    pred, gt = squares
    # |P| = 16 + 16 + 4 = 36, |G| = 32, |P & G| = 16 + 12 = 28
    assert dice(pred, gt) == pytest.approx(2 * 28 / (36 + 32))
    row = evaluate_pair(pred, gt)
    assert list(row) == [
        "dice",
        "precision@0.5",
        "recall@0.5",
        "f1@0.5",
        "f1@0.5:0.9",
        "f1@0.6",
        "f1@0.7",
        "f1@0.8",
        "f1@0.9",
        "n_pred",
        "n_gt",
    ]
    assert row["dice"] == pytest.approx(56 / 68)
    assert row["f1@0.5"] == pytest.approx(0.8)
    assert row["f1@0.6"] == pytest.approx(0.8)
    assert row["f1@0.7"] == pytest.approx(0.4)
    assert row["f1@0.5:0.9"] == pytest.approx(0.56)
    assert (row["n_pred"], row["n_gt"]) == (3, 2)


def test_hungarian_beats_greedy():
    """Strips of one row: gt X = [0, 10), Y = [10, 20); pred B = [0, 3), A = [3, 15).

    IoU(A, X) = 7 / 15 = 0.467, IoU(A, Y) = 5 / 17 = 0.294, IoU(B, X) = 3 / 10 = 0.3.
    Greedy (best IoU first) takes A-X and leaves B alone: 1 match at t = 0.25. The one-to-one
    optimum is A-Y and B-X: 2 matches.
    """
    gt = np.zeros((1, 20), np.int32)
    gt[0, 0:10], gt[0, 10:20] = 1, 2
    pred = np.zeros((1, 20), np.int32)
    pred[0, 0:3], pred[0, 3:15] = 1, 2
    iou, _, _ = iou_matrix(pred, gt)
    np.testing.assert_allclose(iou, [[3 / 10, 0], [7 / 15, 5 / 17]])
    m = match_instances(pred, gt, thresholds=(0.25,))
    assert (m["tp"][0.25], m["fp"][0.25], m["fn"][0.25]) == (2, 0, 0)


def test_matching_keeps_the_pair_above_threshold():
    """A matching that maximises the summed IoU would lose the only true positive.

    gt X: 10x10 square (100 px); gt Y: 4x4 square (16 px) right of it. pred B covers X's
    four left columns (40 px), pred A covers X's six right columns plus all of Y (76 px).
    IoU(A, X) = 60 / 116 = 0.517, IoU(A, Y) = 16 / 76 = 0.211, IoU(B, X) = 40 / 100 = 0.4.
    Max-sum picks A-Y + B-X (0.611 > 0.517) and has no pair >= 0.5; A-X is a true positive.
    """
    gt = np.zeros((12, 16), np.int32)
    gt[0:10, 0:10] = 1
    gt[0:4, 10:14] = 2
    pred = np.zeros_like(gt)
    pred[0:10, 0:4] = 1
    pred[0:10, 4:10] = 2
    pred[0:4, 10:14] = 2
    iou, _, _ = iou_matrix(pred, gt)
    np.testing.assert_allclose(iou, [[0.4, 0], [60 / 116, 16 / 76]])
    m = match_instances(pred, gt, thresholds=(0.5, 0.2))
    assert m["tp"][0.5] == 1
    assert m["tp"][0.2] == 2  # at t = 0.2 both weak pairs count


def test_empty_cases():
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 4
    both = evaluate_pair(empty, empty)
    assert both["dice"] == 1.0
    assert both["precision@0.5"] == both["recall@0.5"] == both["f1@0.5:0.9"] == 1.0
    only_pred = match_instances(one, empty)
    assert (only_pred["tp"][0.5], only_pred["fp"][0.5], only_pred["fn"][0.5]) == (0, 1, 0)
    assert only_pred["precision"][0.5] == only_pred["recall"][0.5] == only_pred["f1"][0.5] == 0
    only_gt = evaluate_pair(empty, one)
    assert only_gt["dice"] == 0.0
    assert only_gt["precision@0.5"] == only_gt["recall@0.5"] == only_gt["f1@0.5"] == 0.0
    assert (only_gt["n_pred"], only_gt["n_gt"]) == (0, 1)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"prediction shape \(8, 8\) differs from ground truth"):
        evaluate_pair(np.zeros((8, 8), int), np.zeros((8, 9), int))
    with pytest.raises(ValueError, match="differs from ground truth shape"):
        dice(np.zeros((4, 4), int), np.zeros((4, 4, 1), int))


def test_bad_labels_and_thresholds_raise():
    with pytest.raises(ValueError, match="non-integer"):
        iou_matrix(np.full((4, 4), 0.5), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="negative"):
        iou_matrix(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        match_instances(np.zeros((4, 4), int), np.zeros((4, 4), int), thresholds=(0.0,))


def test_binary_masks_are_one_instance_each_and_3d_works():
    gt = np.zeros((4, 8, 8), bool)
    gt[1:3, 1:4, 1:4] = True
    gt[1:3, 5:8, 5:8] = True  # a second blob, but a 0/1 mask is one instance
    m = match_instances(gt, gt.astype(np.uint8))
    assert (m["n_pred"], m["n_gt"], m["tp"][0.9]) == (1, 1, 1)
    labels = gt.astype(np.int64)
    labels[:, 5:, 5:] *= 2**40  # a huge label value takes the np.unique path
    row = evaluate_pair(labels, labels)
    assert (row["n_pred"], row["f1@0.9"], row["dice"]) == (2, 1.0, 1.0)


def test_mean_metrics():
    rows = [
        {"name": "a.tif", "dice": 0.5, "f1@0.5": 1.0, "n_gt": 3, "ok": True},
        {"name": "b.tif", "dice": 1.0, "f1@0.5": 0.0, "n_gt": 5, "ok": False},
        {"dice": np.float32(0.0)},
    ]
    assert mean_metrics(rows) == pytest.approx({"dice": 0.5, "f1@0.5": 0.5, "n_gt": 4.0})
    assert mean_metrics([]) == {}
