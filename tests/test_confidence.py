"""Per-particle confidence: its definition on hand-made maps, and where it goes (segment
results, the particle CSV of `sagegan segment --csv`, the Labels layer's features)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from napari_sagegan.engine.infer.confidence import particle_confidence, with_confidence
from napari_sagegan.engine.infer.postprocess import instances_from_maps
from test_tasks import disc_scene, trained_checkpoint

SHAPE = (96, 96)


def maps_with(*particles, blur=1.5, haze=0.0):
    """prob and dist maps of discs given as (centre, radius, peak probability, dist peak)."""
    prob = np.full(SHAPE, haze, np.float32)
    dist = np.zeros(SHAPE, np.float32)
    for centre, radius, p, d in particles:
        m = np.zeros(SHAPE, bool)
        rr, cc = disk(centre, radius, shape=SHAPE)
        m[rr, cc] = True
        edt = ndi.distance_transform_edt(m)
        prob[m] = p
        dist[m] = (edt / edt.max())[m] * d
    return ndi.gaussian_filter(prob, blur), dist


def test_a_clear_disc_scores_higher_than_a_faint_one():
    prob, dist = maps_with(((24, 24), 9, 0.98, 1.0), ((24, 70), 9, 0.62, 1.0))
    labels = instances_from_maps(prob, dist, threshold=0.5)
    assert labels.max() == 2
    conf = particle_confidence(labels, prob, dist, threshold=0.5)
    assert conf.shape == (3,) and np.isnan(conf[0])
    clear, faint = conf[labels[24, 24]], conf[labels[24, 70]]
    assert 0.0 <= faint < clear <= 1.0
    assert clear > 0.6 and faint < 0.4
    # the same order without a distance map (a network without a distance head)
    no_dist = particle_confidence(labels, prob, None, threshold=0.5)
    assert no_dist[labels[24, 70]] < no_dist[labels[24, 24]]


def test_a_particle_in_haze_scores_lower_than_one_on_clean_background():
    # same particle probability, but one sits in a region of middling probability: the
    # contrast across its boundary is low
    prob, dist = maps_with(((24, 24), 9, 0.95, 1.0), ((70, 70), 9, 0.95, 1.0))
    hazy = prob.copy()
    hazy[46:, 46:] = np.maximum(hazy[46:, 46:], 0.45)
    labels = instances_from_maps(prob, dist, threshold=0.5)
    conf = particle_confidence(labels, hazy, dist, threshold=0.5)
    assert conf[labels[70, 70]] < conf[labels[24, 24]] - 0.05


def test_a_fragment_without_a_centre_scores_lower():
    # a partial particle: its distance map never rises to a centre
    prob, dist = maps_with(((24, 24), 9, 0.95, 1.0), ((70, 70), 9, 0.95, 0.3))
    labels = instances_from_maps(prob, dist, threshold=0.5)
    conf = particle_confidence(labels, prob, dist, threshold=0.5)
    assert conf[labels[70, 70]] < conf[labels[24, 24]] - 0.05


def test_missing_labels_are_nan_and_bad_maps_are_refused():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 3  # ids 1 and 2 absent
    prob = np.where(labels > 0, 0.9, 0.05).astype(np.float32)
    conf = particle_confidence(labels, prob)
    assert conf.shape == (4,) and np.isnan(conf[[0, 1, 2]]).all() and 0 < conf[3] <= 1
    assert particle_confidence(np.zeros((5, 5), np.int32), np.zeros((5, 5))).shape == (1,)
    with pytest.raises(ValueError, match="shape"):
        particle_confidence(labels, prob[:10])
    with pytest.raises(ValueError, match="threshold"):
        particle_confidence(labels, prob, threshold=1.5)


def test_with_confidence_adds_a_column_by_label():
    import pandas as pd

    table = pd.DataFrame({"label": [3, 1, 7], "area_px": [1.0, 2.0, 3.0]})
    out = with_confidence(table, np.array([np.nan, 0.2, 0.5, 0.9]))
    assert list(out.columns) == ["label", "area_px", "confidence"]
    np.testing.assert_allclose(out["confidence"], [0.9, 0.2, np.nan])
    assert with_confidence(table, None) is table


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


def test_segment_result_and_csv_carry_the_confidence(tiny_model, tmp_path):
    from napari_sagegan.cli import main
    from napari_sagegan.engine.infer.segment import Segmenter

    img, truth = disc_scene()
    seg = Segmenter.load(tiny_model, device="cpu")
    res = seg.segment_sync(img, seg.default_infer_config(tile_size=64))
    n = int(res.labels.max())
    assert n == 8
    assert res.confidence.shape == (n + 1,) and np.isnan(res.confidence[0])
    assert np.all((res.confidence[1:] >= 0) & (res.confidence[1:] <= 1))
    assert res.confidence[1:].min() > 0.3  # well-separated, clear discs

    import imageio.v3 as iio

    (tmp_path / "in").mkdir()
    iio.imwrite(tmp_path / "in" / "discs.png", img)
    rc = main(
        ["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model",
         str(tiny_model), "--csv", "--tile-size", "64", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    with open(tmp_path / "out" / "discs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and "confidence" in rows[0] and "equivalent_diameter_px" in rows[0]
    got = {int(r["label"]): float(r["confidence"]) for r in rows}
    for label, value in got.items():
        assert value == pytest.approx(float(res.confidence[label]), abs=1e-5)


def test_a_stack_gets_one_confidence_per_particle(tiny_model):
    from napari_sagegan.engine.infer.segment import Segmenter

    img, _ = disc_scene()
    stack = np.stack([img, img[:, ::-1]])
    seg = Segmenter.load(tiny_model, device="cpu")
    res = seg.segment_sync(stack, seg.default_infer_config(tile_size=64))
    n = int(res.labels.max())
    assert n == 16 and res.confidence.shape == (n + 1,)
    # slice 1 is the mirror of slice 0: the same scores, in mirrored label order
    first = np.sort(res.confidence[1:9])
    second = np.sort(res.confidence[9:])
    np.testing.assert_allclose(first, second, atol=0.02)
