"""Faults in training and in model files: non-finite numbers, divergence, damaged checkpoints,
an existing --out that must not be replaced by a worse model, flags out of range."""

from __future__ import annotations

import math
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.cli import main
from napari_sagegan.engine.checkpoint import Checkpoint, CheckpointError, load_segmenter
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
from napari_sagegan.engine.data.pairs import TrainingPairs, fill_nonfinite
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.engine.train.loop import TrainingDiverged
from napari_sagegan.engine.train.segmenter import SegmenterTrainer

ARCH = ArchConfig(base_channels=8, depth=2, dropout=0.1)
INFER = InferConfig(tile_size=64, min_size=5)


def toy_set(n, seed=0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(12, 52, 2)) for _ in range(3)]
        img, lab = disc_image((64, 64), centres, radius=6, seed=seed * 100 + i)
        images.append(img)
        labels.append(lab)
    return images, labels


def _config(**kw):
    base = dict(
        patch_size=64,
        batch_size=2,
        epochs=1,
        steps_per_epoch=3,
        lr=3e-3,
        val_fraction=0.25,
        seed=0,
        augment_p=0.0,
        min_instance_area=5,
        target_diameter=None,
        calibrate=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _fingerprint(path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns


def _write_pairs(root, images, labels):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (img, lab) in enumerate(zip(images, labels)):
        iio.imwrite(root / "images" / f"im{i}.png", img)
        iio.imwrite(root / "masks" / f"im{i}.png", lab.astype(np.uint16))
    return root / "images", root / "masks"


def _train_args(images, masks, out, *extra):
    return [
        "train", "--images", str(images), "--masks", str(masks), "--out", str(out),
        "--epochs", "1", "--steps-per-epoch", "2", "--patch-size", "64", "--batch-size", "2",
        "--target-diameter", "0", "--no-calibrate", "--preset", "tiny", "--device", "cpu",
        "--val-fraction", "0.25", *extra,
    ]  # fmt: skip


def _one_error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("sagegan: error: "), err
    assert all(ln.startswith("sagegan: ") for ln in lines), err  # no traceback
    return lines[-1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A model trained well enough to beat a fresh one, its validation scores, and the
    pairs (arrays and folders) it was trained on."""
    root = tmp_path_factory.mktemp("faults")
    images, labels = toy_set(8)
    folders = _write_pairs(root, images, labels)
    path = root / "good.pt"
    trainer = SegmenterTrainer(
        images, labels, _config(epochs=2, steps_per_epoch=8, batch_size=4), arch=ARCH,
        out=path, device="cpu", infer=INFER,
    )  # fmt: skip
    for _ in trainer.run():
        pass
    assert trainer.best_metrics["dice"] > 0.5  # a real model, to be beaten
    return {"path": path, "metrics": trainer.best_metrics, "arrays": (images, labels),
            "folders": folders, "root": root}  # fmt: skip


# --------------------------------------------------------------------------- NaN pixels


def test_a_nan_pixel_in_a_training_image_does_not_poison_training():
    images, labels = toy_set(4)
    images = [im.astype(np.float32) for im in images]
    images[0][30, 30] = np.nan
    images[1][5, 7] = np.inf
    # the hazard: resampled to the network scale, one NaN pixel becomes a blob of them
    raw = TrainingPairs(images[:1], labels[:1], [], []).at_scale(16.0).train_images[0]
    assert np.isnan(raw).sum() > 1
    trainer = SegmenterTrainer(
        images, labels, _config(steps_per_epoch=4, target_diameter=16.0), arch=ARCH,
        device="cpu", infer=INFER,
    )  # fmt: skip
    assert all(np.isfinite(im).all() for im in trainer.train_images + trainer.val_images)
    assert trainer.train_images[0].shape != images[0].shape  # resampled
    events = list(trainer.run())
    losses = [e.data["loss"] for e in events if e.stage == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert trainer.skipped_steps == 0
    assert _finite(trainer.best_state) and _finite(trainer.model.state_dict())
    assert trainer.best_metrics and math.isfinite(trainer.best_metrics["dice"])


def test_fill_nonfinite_uses_the_finite_median():
    img = np.array([[1.0, 2.0, np.nan], [4.0, -np.inf, 6.0]], np.float32)
    out = fill_nonfinite(img)
    assert np.isfinite(out).all() and out[0, 2] == out[1, 1] == np.median([1, 2, 4, 6])
    assert np.isnan(img[0, 2])  # the user's array is not changed
    clean = np.ones((4, 4), np.uint8)
    assert fill_nonfinite(clean) is clean
    with pytest.raises(ValueError, match="no finite value"):
        fill_nonfinite(np.full((4, 4), np.nan))


# --------------------------------------------------------------------------- divergence


def test_non_finite_steps_are_undone_and_counted_then_training_stops(tmp_path):
    images, labels = toy_set(4)
    trainer = SegmenterTrainer(
        images, labels, _config(steps_per_epoch=30), arch=ARCH, out=tmp_path / "m.pt",
        device="cpu", infer=INFER,
    )  # fmt: skip
    x, fg, dist = trainer.sampler.sample(2)
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    trainer.sampler.sample = lambda n: (bad, fg, dist)  # every batch holds a NaN
    before = _state(trainer.model)
    trainer.model.train()
    trainer._step_bad = False
    trainer.train_step(1)
    assert trainer._step_bad  # the step was skipped...
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ...weights and BN stats kept
    trainer.max_nonfinite_steps = 5  # (20 by default)
    with pytest.raises(TrainingDiverged, match="5 steps in a row.*lower the learning rate"):
        for _ in trainer.run():
            pass
    assert trainer.skipped_steps == 5
    assert not (tmp_path / "m.pt").exists()  # nothing non-finite written


def test_phase_2_undoes_non_finite_steps_too(tmp_path):
    import test_gan

    torch.set_num_threads(1)
    tr = test_gan._trainer(tmp_path, epochs=1, steps_per_epoch=10)
    x, fg, dist = tr.sampler.sample(2)
    x[0, 0, 2, 2] = float("nan")
    tr.sampler.sample = lambda n: (x, fg, dist)
    nets = (tr.S, tr.G, tr.D_img, tr.D_mask)
    before = [_state(m) for m in nets]
    tr._step_bad = False
    tr.optimize((x, fg, dist), epoch=1)
    assert tr._step_bad
    for m, b in zip(nets, before):
        assert all(torch.equal(b[k], v) for k, v in m.state_dict().items())
    tr.max_nonfinite_steps = 3
    with pytest.raises(TrainingDiverged):
        for _ in tr.run():
            pass
    assert tr.skipped_steps == 3
    for name in ("segmenter.pt", "generator.pt"):  # the phase-1 baseline, finite
        Checkpoint.load(tmp_path / name, kind=None)


def test_nan_validation_scores_and_non_finite_weights_never_count_as_best(tmp_path):
    images, labels = toy_set(4)
    trainer = SegmenterTrainer(images, labels, _config(), arch=ARCH, device="cpu", infer=INFER)
    assert not trainer.beats({"f1@0.5": float("nan"), "dice": 0.9})
    state = _state(trainer.model)
    state[next(k for k in state if k.endswith("weight"))][0] = float("inf")
    assert not trainer.keep_best({"f1@0.5": 0.9, "dice": 0.9}, state)
    assert trainer.best_state is not state and _finite(trainer.best_state)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        trainer.save(tmp_path / "m.pt", state=state, epoch=1, metrics={})
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("lr", ["1e6", "inf", "nan", "0", "-1"])
def test_a_bad_learning_rate_stops_cleanly_and_leaves_out_alone(good, tmp_path, capsys, lr):
    images, masks = good["folders"]
    out = tmp_path / "model.pt"
    out.write_bytes(good["path"].read_bytes())
    before = _fingerprint(out)
    args = _train_args(images, masks, out, "--lr", lr, "--steps-per-epoch", "4")
    capsys.readouterr()
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    if lr == "1e6":
        assert "training diverged" in line and "--lr" in line and "1e+06" in line
    else:
        assert "--lr (the learning rate) must be a positive finite number" in line
    assert _fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary files


def test_divergence_without_an_existing_out_writes_nothing(good, tmp_path, capsys):
    images, masks = good["folders"]
    out = tmp_path / "new.pt"
    assert main(_train_args(images, masks, out, "--lr", "1e6", "--steps-per-epoch", "4")) == 2
    assert "training diverged" in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- replacing --out


def test_a_worse_model_does_not_replace_a_better_out_and_overwrite_does(good, tmp_path, capsys):
    images, masks = good["folders"]
    out = tmp_path / "model.pt"
    out.write_bytes(good["path"].read_bytes())
    before = _fingerprint(out)
    # a fresh tiny model after two steps at a very low rate: no match for the good one
    worse = _train_args(images, masks, out, "--lr", "1e-7")
    capsys.readouterr()
    assert main(worse) == 0
    captured = capsys.readouterr()
    assert f"kept the existing {out}" in captured.out and "--overwrite" in captured.out
    old_f1 = f"f1@0.5 {good['metrics']['f1@0.5']:.3f}"
    assert old_f1 in captured.out  # both numbers are given
    assert captured.out.count("f1@0.5 ") == 2
    assert _fingerprint(out) == before
    # the same run with --overwrite replaces it
    assert main([*worse, "--overwrite"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes() != before[0]
    assert Checkpoint.load(out).arch["base_channels"] == 4  # the new (tiny) model


def test_a_better_model_replaces_a_worse_out(good, tmp_path):
    images, labels = good["arrays"]
    out = tmp_path / "model.pt"
    torch.manual_seed(3)
    Checkpoint.from_model(AttentionUNet(ARCH), arch=ARCH, infer=INFER).save(out)  # untrained
    trainer = SegmenterTrainer(
        images, labels, _config(lr=1e-4), init=good["path"], out=out, device="cpu", infer=INFER
    )
    events = list(trainer.run())
    scored = [e for e in events if e.stage == "prepare" and "existing_metrics" in e.data]
    old = scored[-1].data["existing_metrics"]
    result = trainer.result()
    assert result.kept is None and result.checkpoint == out
    assert trainer.best_metrics["f1@0.5"] > old["f1@0.5"]
    assert Checkpoint.load(out).metrics["f1@0.5"] == pytest.approx(trainer.best_metrics["f1@0.5"])


def test_an_out_that_is_not_a_model_is_refused_before_training(good, tmp_path, capsys):
    images, masks = good["folders"]
    out = tmp_path / "notes.pt"
    out.write_text("my notes, not a model\n")
    before = _fingerprint(out)
    assert main(_train_args(images, masks, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and "not a usable segmenter" in line and "--overwrite" in line
    assert _fingerprint(out) == before
    # a generator checkpoint is not a model of the same kind either
    Checkpoint.from_model(AttentionUNet(ARCH), kind="generator", arch=ARCH).save(out)
    with pytest.raises(CheckpointError, match="not a usable segmenter"):
        SegmenterTrainer(*good["arrays"], _config(), arch=ARCH, out=out, device="cpu")
    # asked for, it is replaced
    assert main([*_train_args(images, masks, out), "--overwrite"]) == 0
    assert Checkpoint.load(out).kind == "segmenter"


def test_ctrl_c_before_the_first_save_does_not_announce_the_old_file(
    good, tmp_path, capsys, monkeypatch
):
    images, masks = good["folders"]
    out = tmp_path / "model.pt"
    out.write_bytes(good["path"].read_bytes())
    before = _fingerprint(out)

    def interrupted(self, epoch):
        raise KeyboardInterrupt  # the user's Ctrl-C during the first step

    monkeypatch.setattr(SegmenterTrainer, "train_step", interrupted)
    assert main(_train_args(images, masks, out)) == 130
    err = capsys.readouterr().err
    assert "best model so far" not in err and "left as it was" in err
    assert _fingerprint(out) == before
    new = tmp_path / "new.pt"
    assert main(_train_args(images, masks, new)) == 130
    assert "nothing written" in capsys.readouterr().err and not new.exists()


# --------------------------------------------------------------------------- damaged files


def _saved(tmp_path, name="m.pt", **kw):
    torch.manual_seed(0)
    model = AttentionUNet(ARCH)
    return Checkpoint.from_model(model, arch=ARCH, **kw).save(tmp_path / name)


def _overwrite_inside_largest_entry(path, n=8192, seed=0):
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    n = min(n, info.file_size)
    rng = np.random.default_rng(seed)
    # finite float32 values: only the checksum can tell
    data[start : start + n] = rng.normal(0, 0.1, n // 4).astype(np.float32).tobytes()[:n]
    path.write_bytes(bytes(data))
    return info.filename


def test_damaged_checkpoints_raise_one_checkpoint_error_naming_the_file(tmp_path):
    cases = {}
    for value, name in ((float("nan"), "nan.pt"), (float("inf"), "inf.pt")):
        path = _saved(tmp_path, name)
        payload = torch.load(path, weights_only=True)
        key = next(k for k in payload["state_dict"] if k.endswith("weight"))
        payload["state_dict"][key].view(-1)[3] = value
        torch.save(payload, path)
        cases[path] = "NaN or infinite"
    rot = _saved(tmp_path, "rot.pt")
    entry = _overwrite_inside_largest_entry(rot)
    cases[rot] = f"{entry!r} fails its checksum"
    text = tmp_path / "text.pt"
    text.write_text("hello world\n")  # the unpickler says KeyError: 101
    cases[text] = "not a PyTorch checkpoint"
    k = tmp_path / "k.pt"
    k.write_bytes(b"K")  # the unpickler says IndexError
    cases[k] = "not a PyTorch checkpoint"
    full = _saved(tmp_path, "full.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full[: len(full) * 2 // 3])
    cases[cut] = "damaged"
    missing = _saved(tmp_path, "missing.pt")
    payload = torch.load(missing, weights_only=True)
    del payload["state_dict"][next(iter(payload["state_dict"]))]
    torch.save(payload, missing)
    cases[missing] = "do not fit"
    shapes = _saved(tmp_path, "shapes.pt")
    payload = torch.load(shapes, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][key] = torch.zeros(3, 3)
    torch.save(payload, shapes)
    cases[shapes] = "do not fit"
    wrong = _saved(tmp_path, "wrong.pt")
    payload = torch.load(wrong, weights_only=True)
    payload["arch"] = "not a dict"
    torch.save(payload, wrong)
    cases[wrong] = "damaged or incomplete"
    for path, needle in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_segmenter(path)
        message = str(info.value)
        assert str(path) in message and needle in message, (path.name, message)
        assert "\n" not in message
    # the untouched file of the same making loads and is finite
    model, ckpt = load_segmenter(_saved(tmp_path, "ok.pt"))
    assert _finite(model.state_dict()) and ckpt.source.endswith("ok.pt")


def test_damaged_models_exit_2_in_segment(tmp_path, capsys):
    path = _saved(tmp_path, "nan.pt")
    payload = torch.load(path, weights_only=True)
    next(iter(payload["state_dict"].values())).view(-1)[0] = float("nan")
    torch.save(payload, path)
    img, _ = disc_image()
    iio.imwrite(tmp_path / "a.png", img)
    out = tmp_path / "labels"
    assert main(["segment", str(tmp_path / "a.png"), "--out", str(out), "--model", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "NaN or infinite" in line and not out.exists()


def test_non_finite_checkpoints_are_refused_for_init_and_resume(good, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    payload = torch.load(good["path"], weights_only=True)
    next(iter(payload["state_dict"].values())).view(-1)[0] = float("inf")
    torch.save(payload, bad)
    images, labels = good["arrays"]
    for kw in ({"init": bad}, {"resume": bad}):
        with pytest.raises(CheckpointError, match="NaN or infinite") as info:
            SegmenterTrainer(images, labels, _config(), device="cpu", **kw)
        assert str(bad) in str(info.value)
    f_images, f_masks = good["folders"]
    out = tmp_path / "out.pt"
    for flag in ("--init", "--resume"):
        assert main(_train_args(f_images, f_masks, out, flag, str(bad))) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(bad) in line and "NaN or infinite" in line
        assert not out.exists()


def test_non_finite_weights_are_never_written(tmp_path):
    path = _saved(tmp_path)
    before = _fingerprint(path)
    ckpt = Checkpoint.load(path)
    next(iter(ckpt.state_dict.values())).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to write"):
        ckpt.save(path)
    assert _fingerprint(path) == before


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--epochs", "-3"], "--epochs must be at least 1"),
        (["--steps-per-epoch", "-1"], "--steps-per-epoch must be a positive number"),
        (["--max-minutes", "0"], "--max-minutes must be a positive number"),
        (["--max-minutes", "-5"], "--max-minutes must be a positive number"),
        (["--max-minutes", "nan"], "--max-minutes must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--patch-size", "8"], "--patch-size must be between 16 and 1024"),
        (["--patch-size", "100000"], "--patch-size must be between 16 and 1024"),
        (["--seed", "-1"], "--seed must be a whole number of 0 or more"),
    ],
)
def test_training_flags_out_of_range_are_refused(good, tmp_path, capsys, flags, needle):
    images, masks = good["folders"]
    out = tmp_path / "m.pt"
    assert main([*_train_args(images, masks, out), *flags]) == 2
    assert needle in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_the_api_refuses_the_same_values():
    for bad in (
        dict(epochs=0),
        dict(lr=float("inf")),
        dict(lr=0.0),
        dict(steps_per_epoch=-1),
        dict(max_minutes=0.0),
        dict(batch_size=0),
        dict(patch_size=100_000),
        dict(weight_decay=float("nan")),
        dict(val_every=0),
    ):
        with pytest.raises(ValueError, match="must"):
            TrainConfig(**bad)
    assert TrainConfig(steps_per_epoch=0).steps_per_epoch == 0  # 0 stays "one pass"


def test_augment_flags_are_refused_too(good, tmp_path, capsys):
    images, masks = good["folders"]
    args = ["augment", "--images", str(images), "--masks", str(masks), "--seg", "default",
            "--out", str(tmp_path / "aug")]  # fmt: skip
    for flags, needle in (
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--max-minutes", "0"], "--max-minutes must be a positive number"),
        (["--patch-size", "100000"], "--patch-size must be between"),
    ):
        assert main([*args, *flags]) == 2
        assert needle in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "aug").exists()


def test_out_of_memory_names_the_flags_of_the_command(good, tmp_path, capsys, monkeypatch):
    from napari_sagegan import api

    def no_memory(*args, **kwargs):
        raise MemoryError
        yield  # a generator, like the real one

    monkeypatch.setattr(api, "fine_tune", no_memory)
    images, masks = good["folders"]
    assert main(_train_args(images, masks, tmp_path / "m.pt")) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "--patch-size" in err and "--tile-size" not in err
