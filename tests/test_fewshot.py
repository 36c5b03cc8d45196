"""Few-shot fine-tuning (issue 14): every correction trains, thresholds are re-calibrated on
the user's validation parts, and a fine-tune never leaves a worse model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan import api
from napari_sagegan.api.train import few_shot_recipe
from napari_sagegan.engine.checkpoint import Checkpoint
from napari_sagegan.engine.config import TrainConfig
from napari_sagegan.engine.data.pairs import FEW_PAIRS, prepare_pairs
from napari_sagegan.engine.train.segmenter import SegmenterTrainer
from test_tasks import ARCH, INFER, trained_checkpoint

GRID = tuple((y, x) for y in range(14, 128, 25) for x in range(14, 128, 25))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The tiny disc model (dark discs), trained once per session."""
    return trained_checkpoint(tmp_path_factory.mktemp("base"))


def scene(seed, *, dark=True, narrow=False, shape=(128, 128)):
    """Discs on a grid; ``narrow``: blurred discs whose labels draw them smaller than they
    look (another lab's convention: the base model's particles come out too wide)."""
    img, lab = disc_image(shape, centres=GRID, radius=6, seed=seed, dark=dark)
    if narrow:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img.astype(np.float32), 2.0).astype(np.uint8)
        lab = disc_image(shape, centres=GRID, radius=4, seed=seed, dark=dark)[1]
    return img, lab


def config(**kw):
    base = dict(
        patch_size=64, batch_size=4, epochs=2, steps_per_epoch=4, lr=1e-3, seed=0,
        augment_p=0.0, min_instance_area=5, val_fraction=0.2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _overlaps(a, b):
    ay, ax, ah, aw = a
    by, bx, bh, bw = b
    return ay < by + bh and by < ay + ah and ax < bx + bw and bx < ax + aw


# --------------------------------------------------------------------------- 1. hold-out


def test_few_pairs_hold_out_a_band_of_every_image_and_no_patch_crosses_it():
    images, labels = zip(*(scene(s) for s in (1, 2)))
    cfg = config(scale_jitter=2.0, fg_bias=0.5)
    trainer = SegmenterTrainer(images, labels, cfg, arch=ARCH, device="cpu", infer=INFER)
    pairs = trainer.pairs
    # both images train (a part of each), and a band of each validates
    assert [r["source"] for r in pairs.train_regions] == [0, 1]
    assert [r["source"] for r in pairs.val_regions] == [0, 1]
    assert len(trainer.train_images) == 2 and len(trainer.val_images) == 2
    margin = cfg.patch_size // 2
    for t, v in zip(pairs.train_regions, pairs.val_regions):
        (ty, tx, th, tw), (vy, _vx, vh, _vw) = t["box"], v["box"]
        assert vy - (ty + th) >= margin  # the gap between them is at least half a patch
        full = vy + vh
        assert 0.15 <= vh / full <= 0.25  # about 20 % of the image is held out
    assert "training on 2 images" in pairs.describe()
    assert "validating on their held-out 20 %" in pairs.describe()
    # many patches, zoomed and shifted: none touches a validation pixel, both images train
    trainer.sampler.windows = []
    for _ in range(60):
        trainer.sampler.sample(8)
    seen = set()
    for i, y0, x0, h, w in trainer.sampler.windows:
        region = pairs.train_regions[i]
        seen.add(region["source"])
        val_box = pairs.val_regions[region["source"]]["box"]
        assert h > 0 and w > 0
        assert not _overlaps((y0, x0, h, w), val_box)
        ty, tx, th, tw = region["box"]
        assert y0 >= ty and x0 >= tx and y0 + h <= ty + th and x0 + w <= tx + tw
    assert seen == {0, 1}
    assert len(trainer.sampler.windows) == 480


def test_many_pairs_keep_the_whole_image_split():
    images, labels = zip(*(scene(s) for s in range(FEW_PAIRS)))
    pairs = prepare_pairs(images, labels, val_fraction=0.2, seed=0, holdout="auto")
    assert pairs.parts == 0 and len(pairs.val_images) == 2 and len(pairs.train_images) == 6
    few = prepare_pairs(images[:3], labels[:3], val_fraction=0.2, seed=0, holdout="auto")
    assert few.parts == 0.2 and len(few.train_images) == 3 and few.val_images == []
    forced = prepare_pairs(images[:3], labels[:3], val_fraction=0.2, seed=0, holdout="images")
    assert forced.parts == 0 and len(forced.val_images) == 1


# --------------------------------------------------------------------------- 2-4. fine_tune


def _drain(gen):
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return events, stop.value


def _narrow_fine_tune(base_model, seeds, out=None, **kw):
    """Fine-tune the disc model on narrow-labelled scenes ``seeds``; ``(events, trained)``."""
    torch.manual_seed(0)
    pairs = [(f"narrow{s}", *scene(s, narrow=True)) for s in seeds]
    cfg = config(epochs=3, lr=3e-3, **kw)
    return _drain(api.fine_tune(pairs, init=base_model, config=cfg, out=out, device="cpu"))


def test_fine_tune_recalibrates_and_saves_the_thresholds(base_model, tmp_path):
    out = tmp_path / "tuned.pt"
    events, trained = _narrow_fine_tune(base_model, (3, 4), out)
    trainer = trained.trainer
    assert trainer.config.recipe == "few-shot" and trainer.config.rehearsal == 4
    prepare = [e.message for e in events if e.stage == "prepare"]
    assert any("training on 2 images" in m and "held-out 20 %" in m for m in prepare)
    assert any("; the starting model scores F1@0.5" in m for m in prepare)
    outcome = trained.result.decision
    assert outcome is not None and set(outcome) >= {"kept", "base", "base_recalibrated"}
    saved = Checkpoint.load(out)
    # the saved thresholds are the ones chosen on the validation parts...
    assert saved.infer["threshold"] == outcome["thresholds"]["threshold"]
    assert saved.infer["seed_threshold"] == outcome["thresholds"]["seed_threshold"]
    assert saved["extra"]["calibration"]["threshold"] == saved.infer["threshold"]
    # ... and where the labels are narrower than the base model draws, not the base's
    base = Checkpoint.load(base_model).infer
    assert (saved.infer["threshold"], saved.infer["seed_threshold"]) != (
        base.get("threshold", 0.5),
        base.get("seed_threshold", 0.5),
    )
    # the kept model scores what the decision says, and at least what the base scored
    kept = {"fine-tuned": "fine_tuned", "starting model": "base", "blended": "blended"}.get(
        outcome["kept"], "base_recalibrated"
    )
    assert saved["metrics"]["f1@0.5"] == pytest.approx(outcome[kept]["f1@0.5"])
    assert saved["metrics"]["f1@0.5"] >= outcome["base"]["f1@0.5"]
    # the re-calibrated candidate: the starting weights at thresholds chosen on validation
    recal = trainer.recalibrated
    start = Checkpoint.load(base_model).build().state_dict()
    assert all(torch.equal(v.float(), start[k].float()) for k, v in recal["state"].items())
    if outcome["kept"] == "starting model, re-calibrated":
        assert saved.infer["threshold"] == recal["infer"].threshold


def test_one_particle_is_noise_two_are_evidence():
    from napari_sagegan.engine.train.segmenter import SCALE_MARGIN, decision_margin

    # one particle moves F1 by about 1/n: a replacement must be better by more than that
    assert decision_margin(2) == pytest.approx(0.5)
    assert decision_margin(10) == pytest.approx(0.1)
    assert decision_margin(0) == pytest.approx(1.0)  # nothing to decide on: keep
    assert decision_margin(10_000) == SCALE_MARGIN  # never below the floor


def test_a_replacement_beats_the_starting_model_by_the_margin_of_the_band(base_model, tmp_path):
    from napari_sagegan.engine.train.segmenter import DICE_MARGIN, DICE_SLACK

    torch.manual_seed(0)
    pairs = [(f"narrow{s}", *scene(s, narrow=True)) for s in (11, 12)]
    events, trained = _drain(
        api.fine_tune(pairs, init=base_model, config=config(epochs=3, lr=3e-3), device="cpu")
    )
    outcome = trained.result.decision
    # the particles counted are those of the validation parts, each once
    val = trained.trainer.val_labels
    n = sum(len(set(np.unique(lab)) - {0}) for lab in val)
    assert outcome["validation_particles"] == n > 0
    margin = outcome["margin"]
    assert margin == pytest.approx(max(0.02, 1.0 / n))

    def clearly_better(m, than):  # more particles right, or better outlines of as many
        f1, dice = m["f1@0.5"] - than["f1@0.5"], m["dice"] - than["dice"]
        return (f1 > margin and dice >= -DICE_SLACK) or (f1 >= 0 and dice > DICE_MARGIN)

    base = outcome["base"]
    if outcome["kept"] == "starting model":  # neither replacement was clearly better
        assert not clearly_better(outcome["fine_tuned"], base)
        assert not clearly_better(outcome["base_recalibrated"], base)
    else:
        key = {"fine-tuned": "fine_tuned", "blended": "blended"}.get(
            outcome["kept"], "base_recalibrated"
        )
        assert clearly_better(outcome[key], base)
    said = [e.message for e in events if e.stage == "choose"][-1]
    assert f"({n} particles: a replacement must score F1@0.5 more than {margin:.2f}" in said
    # the fine-tuned weights stay at hand whichever model is kept
    assert trained.trainer.fine_tuned is not None
    assert set(trained.trainer.fine_tuned) == {"state", "infer", "target_diameter"}


def test_blend_states_interpolates_the_weights_and_keeps_the_counters():
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet
    from napari_sagegan.engine.train.segmenter import blend_states

    torch.manual_seed(0)
    a, b = AttentionUNet(ARCH).state_dict(), AttentionUNet(ARCH).state_dict()
    b = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in b.items()}
    mixed = blend_states(a, b, 0.25)
    assert mixed.keys() == a.keys()
    for k, v in mixed.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * a[k] + 0.25 * b[k])
        else:  # batch-norm step counters: the fine-tuned model's
            assert torch.equal(v, b[k])
    other = AttentionUNet(ARCH.replace(base_channels=ARCH.base_channels * 2)).state_dict()
    assert blend_states(a, other, 0.5) is None  # not the same network: no blend


def test_batchnorm_statistics_are_measured_again_on_the_patches():
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet
    from napari_sagegan.engine.train.segmenter import reestimate_batchnorm

    torch.manual_seed(0)
    net = AttentionUNet(ARCH)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}  # fmt: skip
    batch = torch.randn(4, 1, 32, 32) * 3 + 5  # far from the fresh statistics (0, 1)
    reestimate_batchnorm(net, lambda: (batch,), batches=3)
    assert not net.training
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the first batch norm sees the first convolution of this batch: its mean, exactly
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        want = conv(batch).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # restored
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in weights.items())  # weights unchanged


def test_the_blend_is_a_candidate_of_the_never_worse_choice(base_model, tmp_path):
    out = tmp_path / "blend.pt"
    events, trained = _narrow_fine_tune(base_model, (11, 12), out)
    trainer, outcome = trained.trainer, trained.result.decision
    assert outcome["blend"] == 0.5 and set(outcome["blended"]) >= {"f1@0.5", "dice"}
    # the candidate is the halfway point of the starting and the fine-tuned weights, its
    # batch-norm statistics measured again on training patches...
    base = Checkpoint.load(base_model).build().state_dict()
    tuned = trainer.fine_tuned["state"]
    stats = ("running_mean", "running_var")
    remeasured = 0
    for k, v in trainer.blended["state"].items():
        halfway = (base[k].float() + tuned[k].float()) / 2 if v.is_floating_point() else None
        if k.endswith(stats):
            assert torch.isfinite(v).all()
            remeasured += not torch.allclose(v, halfway, atol=1e-4)
        elif halfway is not None:
            torch.testing.assert_close(v, halfway)
    assert remeasured > 0
    # ... at its own thresholds, chosen on the validation parts and scored there
    net = Checkpoint.load(base_model).build()
    net.load_state_dict(trainer.blended["state"])
    from napari_sagegan.engine.train.loop import validate_segmenter

    again = validate_segmenter(net, trainer.val_images, trainer.val_labels,
                               trainer.blended["infer"], device="cpu")  # fmt: skip
    assert again["f1@0.5"] == pytest.approx(outcome["blended"]["f1@0.5"])
    said = [e.message for e in events if e.stage == "choose"][-1]
    assert "blended (0.5 of the way from the starting to the fine-tuned weights) F1@0.5 " in said
    saved = Checkpoint.load(out)
    if outcome["kept"] == "blended":  # what is saved is the blend, at its thresholds
        assert said.startswith("kept the blended model")
        w = saved.build().state_dict()
        for k, v in trainer.blended["state"].items():
            torch.testing.assert_close(w[k].float(), v.float())
        assert saved.infer["threshold"] == trainer.blended["infer"].threshold
    # without a blend, no such candidate
    _e, plain = _narrow_fine_tune(base_model, (11, 12), blend=0.0)
    assert "blended" not in plain.result.decision and plain.trainer.blended is None
    with pytest.raises(ValueError, match="blend must be in"):
        TrainConfig(blend=1.0)


def test_a_fine_tune_that_is_worse_keeps_the_old_model(base_model, tmp_path):
    # a learning rate so high that a few steps wreck the model
    pairs = [(f"p{s}", *scene(s)) for s in (5, 6)]
    out = tmp_path / "worse.pt"
    events, trained = _drain(
        api.fine_tune(
            pairs,
            init=base_model,
            config=config(lr=0.5, epochs=1, steps_per_epoch=3),
            out=out,
            device="cpu",
        )  # fmt: skip
    )
    outcome = trained.result.decision
    assert outcome["kept"].startswith("starting model")
    best_base = max(outcome["base"]["f1@0.5"], outcome["base_recalibrated"]["f1@0.5"])
    assert outcome["fine_tuned"]["f1@0.5"] < best_base
    # said with both numbers
    said = [e.message for e in events if e.stage == "choose"][-1]
    assert said.startswith("kept the starting model")
    assert f"fine-tuned F1@0.5 {outcome['fine_tuned']['f1@0.5']:.3f}" in said
    assert f"starting model F1@0.5 {outcome['base']['f1@0.5']:.3f}" in said
    # what was written (and what the result holds) is the starting model's weights
    base_state = Checkpoint.load(base_model).build().state_dict()
    saved = Checkpoint.load(out).build().state_dict()
    assert all(torch.equal(base_state[k], saved[k]) for k in base_state)
    kept = trained.result.model.state_dict()
    assert all(torch.equal(base_state[k], kept[k]) for k in base_state)


def test_the_recipe_warms_up_decays_and_freezes_the_encoder(base_model):
    pairs = [(f"p{s}", *scene(s)) for s in (7, 8)]
    # freezing the encoder is an option the recipe leaves to the user (off by default)
    cfg = config(epochs=5, steps_per_epoch=4, lr=1e-3, freeze_encoder=0.3)
    gen = api.fine_tune(pairs, init=base_model, config=cfg, device="cpu")
    start = Checkpoint.load(base_model).build().state_dict()
    lrs = []
    trainer = None
    for ev in gen:
        if "trainer" in ev.data:
            trainer = ev.data["trainer"]
        if ev.stage == "train":
            lrs.append(ev.data["lr"])
            if ev.step == 5:  # 25 % of 20 steps: the encoder is still frozen
                enc = {
                    k: v
                    for k, v in trainer.model.state_dict().items()
                    if k.startswith("encoder") and "running" not in k and "num_batches" not in k
                }  # noqa: E501
                assert all(torch.equal(v.cpu(), start[k]) for k, v in enc.items())
                dec = [k for k in start if k.startswith("decoder") and "weight" in k]
                assert any(
                    not torch.equal(trainer.model.state_dict()[k].cpu(), start[k]) for k in dec
                )
    assert trainer.config.schedule == "cosine" and trainer.config.freeze_encoder == 0.3
    assert few_shot_recipe(config(), 2).freeze_encoder == 0
    assert lrs[0] < 0.5 * cfg.lr  # warm-up
    assert max(lrs) == pytest.approx(cfg.lr, rel=0.1)
    assert lrs[-1] < 0.2 * cfg.lr  # cosine decay to the end
    assert len(trainer.pairs.extra_images) == 4  # rehearsal pairs mixed in
    # no recipe when asked not to, and none for a new model
    none = SegmenterTrainer(
        [p[1] for p in pairs], [p[2] for p in pairs], cfg.replace(recipe="none"),
        init=base_model, device="cpu",
    )  # fmt: skip
    assert none.config.schedule == "plateau" and not none.pairs.extra_images


def test_cli_fine_tune_says_what_was_used_and_which_model_it_kept(base_model, tmp_path, capsys):
    import tifffile

    from napari_sagegan.cli import main

    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for s in (3, 4):
        img, lab = scene(s, narrow=True)
        tifffile.imwrite(tmp_path / "images" / f"im{s}.tif", img)
        tifffile.imwrite(tmp_path / "masks" / f"im{s}.tif", lab.astype(np.uint16))
    out = tmp_path / "tuned.pt"
    rc = main([
        "train", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
        "--out", str(out), "--init", str(base_model), "--epochs", "2", "--steps-per-epoch", "3",
        "--patch-size", "64", "--batch-size", "4", "--lr", "0.001", "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr()
    said = text.out + text.err
    assert "training on 2 images (" in said and "validating on their held-out 20 %" in said
    assert "(few-shot recipe)" in said
    assert "; the starting model scores F1@0.5" in said
    line = next(x for x in text.out.splitlines() if x.startswith("sagegan: kept the"))
    # the labels draw particles narrower than the base model: new thresholds alone win here
    # or the fine-tuned model does; either way both numbers are given
    assert "fine-tuned F1@0.5" in line and "starting model F1@0.5" in line
    assert Checkpoint.load(out).infer["threshold"] != Checkpoint.load(base_model).infer["threshold"]
