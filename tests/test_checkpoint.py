import pickle

import pytest
import torch

from napari_sagegan.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_segmenter,
    save_checkpoint,
)
from napari_sagegan.engine.nets.attention_unet import AttentionUNet


def _model(arch):
    torch.manual_seed(1)
    return AttentionUNet(arch).eval()


def test_round_trip_rebuilds_identical_model(tmp_path, tiny_arch):
    model = _model(tiny_arch)
    path = save_checkpoint(
        tmp_path / "m.pt", model, arch=tiny_arch, seed=7, epoch=3, metrics={"f1@0.5": 0.5}
    )
    loaded, ckpt = load_segmenter(path)
    assert ckpt["seed"] == 7 and ckpt["epoch"] == 3 and ckpt["metrics"]["f1@0.5"] == 0.5
    assert loaded.config == tiny_arch
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary files left


def test_half_precision_storage_is_smaller_and_close(tmp_path, tiny_arch):
    model = _model(tiny_arch)
    full = save_checkpoint(tmp_path / "f.pt", model, arch=tiny_arch)
    half = save_checkpoint(tmp_path / "h.pt", model, arch=tiny_arch, half=True)
    assert half.stat().st_size < full.stat().st_size
    loaded, _ = load_segmenter(half)
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=5e-2)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-sagegan", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    # a raw pickle (not a torch zip file) with code is refused as well
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_foreign_and_wrong_kind(tmp_path, tiny_arch):
    good = save_checkpoint(tmp_path / "m.pt", _model(tiny_arch), arch=tiny_arch)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save(_model(tiny_arch).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_checkpoint(tmp_path / "bare.pt")
    save_checkpoint(tmp_path / "g.pt", _model(tiny_arch), arch=tiny_arch, kind="generator")
    with pytest.raises(CheckpointError, match="'generator' model"):
        load_checkpoint(tmp_path / "g.pt", kind="segmenter")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_architecture(tmp_path, tiny_arch):
    path = save_checkpoint(tmp_path / "m.pt", _model(tiny_arch), arch=tiny_arch)
    ckpt = torch.load(path, weights_only=True)
    ckpt["arch"]["base_channels"] = 8
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_segmenter(tmp_path / "bad.pt")


def test_failed_save_leaves_previous_file_intact(tmp_path, tiny_arch):
    path = save_checkpoint(tmp_path / "m.pt", _model(tiny_arch), arch=tiny_arch, epoch=1)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, _model(tiny_arch), arch=tiny_arch, extra={"x": lambda: 0}, epoch=2)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
