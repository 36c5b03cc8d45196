"""Training learns a toy problem, fine-tunes, resumes, and stops when asked."""

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.engine.checkpoint import Checkpoint
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.engine.train.segmenter import SegmenterTrainer

ARCH = ArchConfig(base_channels=8, depth=2, dropout=0.1)


def toy_set(n, seed=0, dark=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(10, 54, 2)) for _ in range(3)]
        img, lab = disc_image(
            (64, 64), centres, radius=int(rng.integers(5, 8)), seed=seed * 100 + i, dark=dark
        )
        out.append((img, lab))
    return [p[0] for p in out], [p[1] for p in out]


def _config(**kw):
    base = dict(
        patch_size=64,
        batch_size=4,
        epochs=6,
        steps_per_epoch=10,
        lr=3e-3,
        val_fraction=0.25,
        seed=0,
        augment_p=0.0,
        min_instance_area=5,
    )
    base.update(kw)
    return TrainConfig(**base)


INFER = InferConfig(tile_size=64, min_size=5)


def test_training_learns_a_toy_problem(tmp_path):
    images, labels = toy_set(8)
    trainer = SegmenterTrainer(
        images, labels, _config(), arch=ARCH, out=tmp_path / "m.pt", device="cpu", infer=INFER
    )
    before = trainer.validate()
    events = list(trainer.run())
    vals = [e for e in events if e.stage == "validate"]
    assert len(vals) == 6
    assert all(np.isfinite(e.data["loss"]) for e in events if e.stage == "train")
    best = trainer.best_metrics
    assert best["f1@0.5"] > before["f1@0.5"] + 0.3
    assert best["f1@0.5"] >= 0.6 and best["dice"] >= 0.7
    # the checkpoint on disk holds the best model and reproduces its score
    ckpt = Checkpoint.load(tmp_path / "m.pt")
    assert ckpt["metrics"]["f1@0.5"] == pytest.approx(best["f1@0.5"])
    seg = Segmenter.load(tmp_path / "m.pt", device="cpu")
    # after training the operating point is calibrated on the validation images and the
    # checkpoint carries it: the segmenter's defaults are the calibrated thresholds
    cal = ckpt["extra"]["calibration"]
    assert seg.default_infer_config(tile_size=INFER.tile_size) == INFER.replace(
        threshold=cal["threshold"], seed_threshold=cal["seed_threshold"]
    )  # tiling is the machine's: the stored one is not used
    assert cal["f1@0.5"] >= cal["baseline"]["f1@0.5"]
    assert [e for e in events if e.stage == "calibrate"][-1].data == cal
    # progress events carry a total and an ETA
    train_ev = [e for e in events if e.stage == "train"]
    assert train_ev[-1].step == train_ev[-1].total == 60
    assert train_ev[0].eta_s is not None


def test_fine_tuning_adapts_to_inverted_contrast(tmp_path):
    # a model trained on dark particles, fine-tuned on a handful of bright-particle images
    images, labels = toy_set(8)
    trainer = SegmenterTrainer(images, labels, _config(), arch=ARCH, device="cpu", infer=INFER)
    list(trainer.run())
    base = tmp_path / "base.pt"
    trainer.save(base, state=trainer.best_state, epoch=6, metrics=trainer.best_metrics)

    bright_imgs, bright_labs = toy_set(5, seed=3, dark=False)
    # whole-image validation: a band of these 3-disc images would hold too few particles
    tuner = SegmenterTrainer(
        bright_imgs, bright_labs, _config(epochs=6, holdout="images"), init=base, device="cpu",
        infer=INFER,
    )  # fmt: skip
    assert tuner.arch == ARCH
    before = tuner.validate()
    list(tuner.run())
    # the dark-particle model fails on bright particles; 60 steps on 4 images fix that
    assert before["dice"] < 0.5
    assert tuner.best_metrics["dice"] > before["dice"] + 0.3
    assert tuner.best_metrics["dice"] >= 0.8


def test_time_budget_and_cancel_keep_the_best(tmp_path):
    images, labels = toy_set(6)
    trainer = SegmenterTrainer(
        images,
        labels,
        _config(epochs=1000, max_minutes=0.05),
        arch=ARCH,
        out=tmp_path / "m.pt",
        device="cpu",
        infer=INFER,
    )
    gen = trainer.run()
    result = None
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        result = stop.value
    assert result.stopped_by == "time"
    assert (tmp_path / "m.pt").exists()

    # cancel: close the generator after a few steps; the best state stays usable
    trainer2 = SegmenterTrainer(images, labels, _config(), arch=ARCH, device="cpu", infer=INFER)
    gen = trainer2.run()
    for _ in range(12):  # past the first validation (10 steps per epoch)
        next(gen)
    gen.close()
    model = trainer2.best_model()
    x = torch.zeros(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.isfinite(model(x)).all()


def test_resume_continues_from_the_checkpoint(tmp_path):
    images, labels = toy_set(6)
    t1 = SegmenterTrainer(
        images,
        labels,
        _config(epochs=2),
        arch=ARCH,
        out=tmp_path / "m.pt",
        device="cpu",
        infer=INFER,
    )
    list(t1.run())
    saved = Checkpoint.load(tmp_path / "m.pt")
    t2 = SegmenterTrainer(
        images,
        labels,
        _config(epochs=4),
        resume=tmp_path / "m.pt",
        out=tmp_path / "m.pt",
        device="cpu",
        infer=INFER,
    )
    assert t2.start_epoch == saved["epoch"] and t2.step == saved["step"]
    events = [e for e in t2.run() if e.stage == "validate"]
    assert [e.data["epoch"] for e in events] == list(range(saved["epoch"] + 1, 5))


def test_bad_training_input():
    images, labels = toy_set(3)
    with pytest.raises(ValueError, match="no particles"):
        SegmenterTrainer(images, [np.zeros_like(lab) for lab in labels], _config(), arch=ARCH)
    with pytest.raises(ValueError, match="differs from mask shape"):
        SegmenterTrainer([images[0][:, :50]], [labels[0]], _config(), arch=ARCH)
    with pytest.raises(ValueError, match="no image/mask pairs"):
        SegmenterTrainer([], [], _config(), arch=ARCH)


def test_init_from_a_generator_checkpoint_is_refused(tmp_path):
    model = AttentionUNet(ARCH)
    Checkpoint.from_model(model, arch=ARCH, kind="generator").save(tmp_path / "g.pt")
    images, labels = toy_set(3)
    with pytest.raises(ValueError, match="'segmenter' model is needed"):
        SegmenterTrainer(images, labels, _config(), init=tmp_path / "g.pt")
