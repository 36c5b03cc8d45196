"""Sizes follow the user (issue 14): a particle diameter the user set brings a training pair
to the network scale instead of its labels' median diameter, through prepare_pairs, the
trainer, api.fine_tune, ``sagegan train --diameter`` and the docks' pairs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import disc_image
from napari_sagegan import api
from napari_sagegan.engine.checkpoint import Checkpoint
from napari_sagegan.engine.data.pairs import FEW_PAIRS, prepare_pairs
from napari_sagegan.engine.infer.scale import median_diameter
from test_fewshot import base_model, config, scene  # noqa: F401  (base_model: a fixture)

TARGET = 32.0


def _side(pairs_at_scale, i):
    return pairs_at_scale.train_images[i].shape[0]


def test_a_given_diameter_resamples_the_pair_not_its_labels():
    (a, la), (b, lb) = scene(1), scene(2)
    by_labels = median_diameter(lb, min_area=4)
    assert 10 < by_labels < 16  # discs of radius 6
    pairs = prepare_pairs(
        [a, b], [la, lb], val_fraction=0.0, seed=0, diameters=[24.0, None]
    ).at_scale(TARGET)
    assert _side(pairs, 0) == round(128 * TARGET / 24.0)  # the size given: x1.33
    assert abs(_side(pairs, 1) - 128 * TARGET / by_labels) <= 1  # its labels: x2.4
    assert pairs.n_sized == 1
    assert "1 image brought to the network scale by the particle size you set" in (pairs.describe())
    plain = prepare_pairs([a, b], [la, lb], val_fraction=0.0, seed=0).at_scale(TARGET)
    assert _side(plain, 0) == _side(plain, 1) == _side(pairs, 1)
    assert plain.n_sized == 0 and "size you set" not in plain.describe()


def test_diameters_follow_their_images_through_a_whole_image_split():
    images, labels = zip(*(scene(s) for s in range(FEW_PAIRS)))
    given = [10.0 + i for i in range(FEW_PAIRS)]
    pairs = prepare_pairs(images, labels, val_fraction=0.25, seed=3, diameters=given)
    assert len(pairs.val_images) == 2 and pairs.parts == 0
    index = {id(im): i for i, im in enumerate(images)}
    for ims, ds in ((pairs.val_images, pairs.val_diameters),):
        assert [given[index[id(im)]] for im in ims] == list(ds)
    # the training images are copies (missing pixels filled): match them by content
    for im, d in zip(pairs.train_images, pairs.train_diameters):
        i = next(k for k, ref in enumerate(images) if np.array_equal(ref, im))
        assert d == given[i]
    scaled = pairs.at_scale(TARGET)
    for im, d in zip(scaled.val_images, pairs.val_diameters):
        assert im.shape[0] == round(128 * TARGET / d)


def test_a_band_held_out_of_a_sized_image_is_cut_at_that_size():
    img, lab = scene(4)
    pairs = prepare_pairs([img], [lab], val_fraction=0.2, seed=0, holdout="parts", diameters=[16.0])
    scaled = pairs.at_scale(TARGET)
    (t,), (v,) = scaled.train_regions, scaled.val_regions
    assert t["box"][1] == 0 and t["box"][3] == v["box"][3] == 256  # 128 px x 32 / 16


@pytest.mark.parametrize(
    ("diameters", "match"),
    [
        ([12.0], "1 particle diameters for 2 training images"),
        ([12.0, 0.5], "training image 1 is 0.5"),
        ([float("nan"), None], "training image 0 is nan"),
    ],
)
def test_bad_diameters_are_refused_with_what_to_give(diameters, match):
    (a, la), (b, lb) = scene(1), scene(2)
    with pytest.raises(ValueError, match=match):
        prepare_pairs([a, b], [la, lb], val_fraction=0.0, seed=0, diameters=diameters)


def test_fine_tune_brings_the_pairs_to_scale_by_the_size_the_user_set(base_model):  # noqa: F811
    pairs = [(f"p{s}", *scene(s)) for s in (5, 6)]
    gen = api.fine_tune(
        pairs, init=base_model, config=config(epochs=1, steps_per_epoch=1), device="cpu",
        diameter=20.0,
    )  # fmt: skip
    trainer, messages = None, []
    for ev in gen:
        trainer = ev.data.get("trainer", trainer)
        messages.append(ev.message)
    own = trainer._pairs_own_scale
    assert own.train_diameters == (20.0, 20.0)
    # each image's band and training part together span it at 32 / 20 of its width
    assert {r["box"][3] for r in trainer.pairs.train_regions} == {round(128 * TARGET / 20.0)}
    assert any("2 images brought to the network scale by the particle size you set" in m
               for m in messages)  # fmt: skip


def test_a_pair_keeps_its_own_size_over_the_common_one():
    from napari_sagegan.api.train import _training_pairs
    from napari_sagegan.napari.layers import TrainingPair

    img, lab = scene(1)
    stack = TrainingPair("stack", np.stack([img, img]), np.stack([lab, lab]), diameter=9.0)
    given: list = []
    images, _ = _training_pairs([stack, ("plain", img, lab)], None, "", None, given, 30.0)
    assert len(images) == 3 and given == [9.0, 9.0, 30.0]


def test_the_dock_size_reaches_each_pair_in_its_image_pixels():
    from napari_sagegan.napari.layers import META_KEY, pairs_from_layers
    from napari_sagegan.napari.state import ParticleSize

    class Layer:
        def __init__(self, name, data, kind, **meta):
            self.name, self.data, self.metadata = name, data, meta
            self.scale, self.translate, self.units = (1.0, 1.0), (0.0, 0.0), None
            self._kind = kind

    img, lab = disc_image((64, 64))
    image = type("Image", (Layer,), {})("im", img, "image", pixel_size_nm=0.5)
    labels = type("Labels", (Layer,), {})("im labels", lab, "labels", **{META_KEY: {"image": "im"}})
    size = ParticleSize()
    assert pairs_from_layers([image, labels], ["im labels"], size)[0].diameter is None
    size.set(7.0, "px")
    assert pairs_from_layers([image, labels], ["im labels"], size)[0].diameter == 7.0
    size.set(5.0, "nm")  # 5 nm at 0.5 nm per pixel
    assert pairs_from_layers([image, labels], ["im labels"], size)[0].diameter == 10.0
    image.metadata = {}  # no pixel size: the labels decide
    assert size.pixels(None) is None
    assert pairs_from_layers([image, labels], ["im labels"], size)[0].diameter is None


def test_cli_refuses_a_diameter_below_one_pixel(tmp_path, capsys):
    from napari_sagegan.cli import main

    (tmp_path / "im").mkdir()
    (tmp_path / "m").mkdir()
    rc = main(["train", "--images", str(tmp_path / "im"), "--masks", str(tmp_path / "m"),
               "--out", str(tmp_path / "x.pt"), "--diameter", "0.5", "--epochs", "1"])  # fmt: skip
    assert rc != 0
    err = capsys.readouterr().err
    assert "--diameter is the typical particle diameter in pixels" in err
    assert not (tmp_path / "x.pt").exists()


def _fine_tune(base, out, pairs, **kw):
    from test_fewshot import _drain

    return _drain(
        api.fine_tune(
            pairs,
            init=base,
            config=config(epochs=1, steps_per_epoch=2),
            out=out,
            device="cpu",
            **kw,
        )  # fmt: skip
    )


def test_the_network_scale_is_rechosen_only_when_clearly_better(base_model, tmp_path):  # noqa: F811
    from napari_sagegan.engine.train import segmenter as segmod

    pairs = [(f"p{s}", *scene(s)) for s in (9, 10)]
    events, trained = _fine_tune(base_model, tmp_path / "a.pt", pairs)
    outcome = trained.result.decision
    assert set(outcome["by_scale"]) == {
        f"{name} x{s:g}"
        for name in ("starting model", "starting model, re-calibrated", "blended", "fine-tuned")
        for s in segmod.SCALE_CHOICES
    }
    at_own = max(
        outcome[k]["f1@0.5"]
        for k in ("base", "base_recalibrated", "fine_tuned", "blended")
        if k in outcome
    )
    best_other = max(m["f1@0.5"] for m in outcome["by_scale"].values())
    # the margin is more than one validation particle's worth of F1
    n = outcome["validation_particles"]
    assert n > 0 and outcome["margin"] == pytest.approx(max(segmod.SCALE_MARGIN, 1 / n))
    if outcome["scale"] == 1.0:  # no other scale beat the model's own by the margin
        kept = {"starting model": "base", "fine-tuned": "fine_tuned", "blended": "blended"}.get(
            outcome["kept"], "base_recalibrated"
        )
        own = outcome[kept]
        for m in outcome["by_scale"].values():  # none clearly better
            f1, dice = m["f1@0.5"] - own["f1@0.5"], m["dice"] - own["dice"]
            assert f1 <= outcome["margin"] or dice < -segmod.DICE_SLACK
            assert f1 < 0 or dice <= segmod.DICE_MARGIN
        assert Checkpoint.load(tmp_path / "a.pt").target_diameter == TARGET
    else:
        assert best_other > at_own + outcome["margin"]


def test_a_rechosen_network_scale_is_saved_and_said(base_model, tmp_path, monkeypatch):  # noqa: F811
    from napari_sagegan.engine.train import segmenter as segmod

    # any other scale wins: the plumbing
    monkeypatch.setattr(segmod, "decision_margin", lambda n: -1.0)
    monkeypatch.setattr(segmod, "DICE_SLACK", 1.0)
    monkeypatch.setattr(segmod, "DICE_MARGIN", -1.0)
    pairs = [(f"p{s}", *scene(s)) for s in (9, 10)]
    events, trained = _fine_tune(base_model, tmp_path / "b.pt", pairs, overwrite=True)
    outcome = trained.result.decision
    scale = outcome["scale"]
    assert scale in segmod.SCALE_CHOICES
    saved = Checkpoint.load(tmp_path / "b.pt")
    assert saved.target_diameter == pytest.approx(TARGET * scale)
    assert outcome["target_diameter"] == pytest.approx(TARGET * scale)
    said = [e.message for e in events if e.stage == "choose"][-1]
    assert f"network scale {TARGET * scale:g} px" in said and "so that scale is kept" in said
    assert outcome["kept"] != "starting model"  # a model at another scale is a new model
    # the calibration on record is that of the thresholds kept (none for the starting
    # model's own thresholds)
    cal = saved.extra.get("calibration")
    if outcome["kept"] == "starting model, re-scaled":
        assert cal is None
    else:
        assert cal is None or cal["threshold"] == saved.infer["threshold"]
    # and the kept model segments at that scale: its particles are resampled to it
    from napari_sagegan.engine.infer.segment import Segmenter

    assert Segmenter.load(tmp_path / "b.pt").target_diameter == pytest.approx(TARGET * scale)
