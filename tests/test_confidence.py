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


def test_drop_unsure_leaves_out_the_low_particles_and_numbers_the_rest_again():
    from napari_sagegan.engine.infer.confidence import drop_unsure

    lab = np.zeros((8, 12), np.int32)
    lab[1:3, 1:3], lab[1:3, 5:7], lab[5:7, 1:3], lab[5:7, 8:11] = 1, 2, 3, 4
    conf = np.array([np.nan, 0.9, 0.2, 0.6, 0.1], np.float32)
    out, kept, removed = drop_unsure(lab, conf, 0.5)
    assert removed == 2
    assert sorted(np.unique(out)) == [0, 1, 2]  # numbered 1..n again, in order
    assert (out[lab == 1] == 1).all() and (out[lab == 3] == 2).all()
    assert (out[(lab == 2) | (lab == 4)] == 0).all()
    np.testing.assert_allclose(kept[1:], [0.9, 0.6])
    assert np.isnan(kept[0])
    same, conf_same, none = drop_unsure(lab, conf, 0.0)  # 0: nothing left out
    assert none == 0 and same is lab and np.array_equal(conf_same, conf, equal_nan=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_unsure(lab, conf, 1.0)


def test_segment_leaves_out_particles_under_the_minimum_confidence(tiny_model):
    from napari_sagegan.engine.config import InferConfig
    from napari_sagegan.engine.infer.segment import Segmenter

    img, _ = disc_scene()
    seg = Segmenter.load(tiny_model, device="cpu")
    full = seg.segment_sync(img, seg.default_infer_config(tile_size=64, min_confidence=0.0))
    scores = full.confidence[1:]
    cut = float(np.median(scores)) + 1e-4
    res = seg.segment_sync(img, seg.default_infer_config(tile_size=64, min_confidence=cut))
    low = np.flatnonzero(scores < cut) + 1
    assert 0 < low.size < scores.size and full.unsure == 0
    assert res.unsure == low.size
    assert int(res.labels.max()) == scores.size - low.size
    assert set(np.unique(res.labels)) == set(range(scores.size - low.size + 1))
    assert (res.confidence[1:] >= cut).all()
    # the particles kept are the same pixels as before; the others are background now
    assert not res.labels[np.isin(full.labels, low)].any()
    kept = (full.labels > 0) & ~np.isin(full.labels, low)
    assert np.array_equal(res.labels > 0, kept)
    with pytest.raises(ValueError, match="min_confidence"):
        InferConfig(min_confidence=-0.1)


def test_the_minimum_confidence_chosen_on_the_whole_pipeline_is_its_best_cut(tiny_model):
    from napari_sagegan.engine.analysis.metrics import evaluate_pair
    from napari_sagegan.engine.infer.calibrate import calibrate, choose_min_confidence
    from napari_sagegan.engine.infer.segment import Segmenter
    from napari_sagegan.util.progress import run_to_end

    seg = Segmenter.load(tiny_model, device="cpu")
    scenes = [disc_scene(seed=s) for s in (5, 6)]
    images, truths = [i for i, _ in scenes], [t for _, t in scenes]
    config = seg.default_infer_config(tile_size=64)
    cuts = (0.0, 0.3, 0.6, 0.9)
    point = run_to_end(
        calibrate(seg, images, truths, config=config, confidence_on="found",
                  min_confidences=cuts)
    )  # fmt: skip
    assert set(point.confidence_scores) == {"0", "0.3", "0.6", "0.9"}
    best = max(point.confidence_scores.values())
    assert point.confidence_scores[f"{point.min_confidence:g}"] == best
    # each score is what segmenting with that cut gives (the size found, as at inference)
    at = config.replace(threshold=point.threshold, seed_threshold=point.seed_threshold)
    for c in cuts:
        f1 = np.mean([
            evaluate_pair(seg.segment_sync(im, at.replace(min_confidence=c)).labels, t)["f1@0.5"]
            for im, t in zip(images, truths)
        ])  # fmt: skip
        assert point.confidence_scores[f"{c:g}"] == pytest.approx(f1, abs=1e-4)
    assert point.confidence_scores["0.9"] < point.confidence_scores["0"]  # cuts real particles
    # labels made by hand: a false particle of low confidence, the cut that removes it wins
    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6], lab[10:14, 10:14] = 1, 2
    gt = np.where(lab == 1, 1, 0).astype(np.int32)
    conf = np.array([np.nan, 0.8, 0.2], np.float32)
    c, scores = choose_min_confidence([lab], [conf], [gt], (0.0, 0.1, 0.5, 0.9))
    assert c == 0.5 and scores["0.5"] == 1.0 and scores["0"] < 1.0 and scores["0.9"] == 0.0
    # a start as good as the best is kept
    assert choose_min_confidence([lab], [conf], [gt], (0.0, 0.5), start=0.3)[0] == 0.3
    with pytest.raises(ValueError, match="confidence_on"):
        run_to_end(calibrate(seg, images, truths, config=config, confidence_on="maybe"))


def test_sagegan_segment_min_confidence_is_counted_in_the_report(tiny_model, tmp_path, capsys):
    import json

    import imageio.v3 as iio

    from napari_sagegan.cli import main

    img, _ = disc_scene()
    (tmp_path / "in").mkdir()
    iio.imwrite(tmp_path / "in" / "discs.png", img)
    base = ["segment", str(tmp_path / "in"), "--model", str(tiny_model), "--tile-size", "64",
            "--device", "cpu"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "all"), "--min-confidence", "0"]) == 0
    full = json.loads((tmp_path / "all" / "segment_report.json").read_text())["images"][0]
    assert full["min_confidence"] == 0.0 and full["unsure_left_out"] == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "sure"), "--min-confidence", "0.95"]) == 0
    sure = json.loads((tmp_path / "sure" / "segment_report.json").read_text())["images"][0]
    assert sure["min_confidence"] == 0.95
    assert sure["unsure_left_out"] == full["n_particles"] - sure["n_particles"] > 0
    err = capsys.readouterr().err
    assert f"{sure['unsure_left_out']} particle" in err and "--min-confidence 0 keeps" in err
    assert main([*base, "--out", str(tmp_path / "bad"), "--min-confidence", "1"]) == 2
    assert "min_confidence" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_model_file_with_a_setting_this_version_removed_still_loads(tiny_model, tmp_path):
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.infer.segment import Segmenter

    ck = Checkpoint.load(tiny_model).to_dict()
    ck["infer"] = {**dict(ck.get("infer") or {}), "vote_window": 0.5, "min_confidence": 0.2}
    path = Checkpoint.from_dict(ck).save(tmp_path / "old.pt")
    seg = Segmenter.load(str(path), device="cpu")
    cfg = seg.default_infer_config()
    assert cfg.min_confidence == 0.2  # the settings it knows are used
    with pytest.raises(ValueError, match="vote_window"):
        seg.default_infer_config(vote_window=0.5)  # asked for by name: refused
