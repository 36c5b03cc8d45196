"""Calibrated operating point: thresholds chosen so that particle sizes are unbiased."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_sagegan.engine.analysis.metrics import size_ratios
from napari_sagegan.engine.infer.calibrate import choose_operating_point, evaluate_point
from napari_sagegan.util.progress import run_to_end


def blurred_discs(seed, n=6, r=8, shape=(96, 96), blur=3.0):
    """Disc labels and a probability map whose 0.5 level is too wide (blurred, then lifted)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    k = 0
    for _ in range(200):
        cy, cx = rng.integers(r + 2, shape[0] - r - 2, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = ndi.binary_dilation(disc, iterations=3)
        if (lab[grown] > 0).any():
            continue
        k += 1
        lab[disc] = k
        if k == n:
            break
    prob = ndi.gaussian_filter((lab > 0).astype(np.float32), blur)
    prob = np.clip(prob * 1.6, 0, 1)  # an over-confident, recall-leaning map
    dist = ndi.distance_transform_edt(lab > 0) / r
    return prob.astype(np.float32), dist.astype(np.float32), lab


def test_the_chosen_threshold_makes_sizes_unbiased():
    data = [blurred_discs(s) for s in range(4)]
    maps = [(p, d) for p, d, _ in data]
    gts = [g for _, _, g in data]
    base = evaluate_point(maps, gts, 0.5, 0.5, [5] * 4)
    assert base["size_bias"] > 1.05  # too wide at 0.5
    point = run_to_end(choose_operating_point(maps, gts, [5] * 4))
    assert point.threshold > 0.5
    assert point.size_bias == pytest.approx(1.0, abs=0.03)
    assert point.f1 >= base["f1"]
    assert point.baseline["threshold"] == 0.5
    assert point.baseline["size_bias"] == pytest.approx(base["size_bias"])
    # the reported bias is what segmenting at that point gives
    from napari_sagegan.engine.infer.postprocess import instances_from_maps

    lab = instances_from_maps(maps[0][0], maps[0][1], threshold=point.threshold,
                              seed_threshold=point.seed_threshold, min_size=5)  # fmt: skip
    assert abs(float(np.median(size_ratios(lab, gts[0]))) - 1) <= 0.05
    d = point.to_dict()
    assert set(d) >= {"threshold", "seed_threshold", "f1@0.5", "size_bias", "baseline"}
    # clear discs only: no cut changes F1, so a model's current cut is kept, and none added
    assert point.min_confidence == 0.0
    kept = run_to_end(choose_operating_point(maps, gts, [5] * 4, start_confidence=0.1))
    assert kept.min_confidence == 0.1 and kept.f1 == pytest.approx(point.f1)


def test_calibration_refuses_empty_or_mismatched_input():
    p, d, g = blurred_discs(0)
    with pytest.raises(ValueError, match="at least one labelled image"):
        run_to_end(choose_operating_point([], [], []))
    with pytest.raises(ValueError, match="no labelled particle"):
        run_to_end(choose_operating_point([(p, d)], [np.zeros_like(g)], [5]))


def test_size_ratios_measure_linear_size():
    gt = np.zeros((40, 40), np.int32)
    gt[10:20, 10:20] = 1  # 100 px
    pred = np.zeros_like(gt)
    pred[9:21, 9:21] = 3  # 144 px: 1.2x in linear size
    assert size_ratios(pred, gt) == pytest.approx([1.2])
    assert size_ratios(np.zeros_like(gt), gt).size == 0
    with pytest.raises(ValueError):
        size_ratios(pred, gt, iou=0.3)


def with_faint_false_blobs(seed, n=4, r=6):
    """``blurred_discs`` plus ``n`` faint blobs (sure by probability, 0.9, but with no centre in
    the distance map) where the labels have no particle: the network's unsure ones."""
    prob, dist, lab = blurred_discs(seed)
    rng = np.random.default_rng(100 + seed)
    yy, xx = np.mgrid[: prob.shape[0], : prob.shape[1]]
    placed = 0
    for _ in range(500):
        cy, cx = rng.integers(r + 2, prob.shape[0] - r - 2, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (ndi.binary_dilation(lab > 0, iterations=6) & blob).any():
            continue
        prob[blob] = 0.9
        dist[blob] = 0.15
        lab_blocked = ndi.binary_dilation(blob, iterations=6)
        lab = np.where(lab_blocked & (lab == 0), 0, lab)  # (labels unchanged: no particle)
        placed += 1
        if placed == n:
            break
    return prob, dist, lab


def test_the_minimum_confidence_is_calibrated_after_the_thresholds():
    data = [with_faint_false_blobs(s) for s in range(3)]
    maps = [(p, d) for p, d, _ in data]
    gts = [g for _, _, g in data]
    point = run_to_end(choose_operating_point(maps, gts, [5] * 3))
    # the faint blobs are false particles at the chosen threshold; the cut removes them
    at = evaluate_point(maps, gts, point.threshold, point.seed_threshold, [5] * 3)
    assert point.threshold < 0.9 and at["f1"] < 0.95
    assert point.min_confidence > 0 and point.f1 > at["f1"] + 0.1
    assert point.size_bias == pytest.approx(1.0, abs=0.03)
    cut = evaluate_point(maps, gts, point.threshold, point.seed_threshold, [5] * 3,
                         point.min_confidence)  # fmt: skip
    assert cut["f1"] == pytest.approx(point.f1)
    assert point.infer_overrides()["min_confidence"] == point.min_confidence
    assert point.to_dict()["min_confidence"] == point.min_confidence
    assert "confidence" in point.describe()
    # thresholds alone when asked; and a current cut as good as any is kept (ties: no change)
    alone = run_to_end(choose_operating_point(maps, gts, [5] * 3, min_confidences=(0.0,)))
    assert alone.min_confidence == 0.0 and alone.threshold == point.threshold
    again = run_to_end(
        choose_operating_point(
            maps, gts, [5] * 3, start=(point.threshold, point.seed_threshold),
            start_confidence=point.min_confidence,
        )
    )  # fmt: skip
    assert again.min_confidence == point.min_confidence
    assert again.baseline["min_confidence"] == point.min_confidence
    assert again.baseline["f1@0.5"] == pytest.approx(point.f1)
