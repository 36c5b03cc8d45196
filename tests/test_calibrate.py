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
