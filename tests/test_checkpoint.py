import pickle

import pytest
import torch

from napari_sagegan.engine.checkpoint import Checkpoint, CheckpointError, load_segmenter
from napari_sagegan.engine.nets.attention_unet import AttentionUNet


def save_checkpoint(path, model, **kw):
    return Checkpoint.from_model(model, **kw).save(path)


def load_checkpoint(path, kind="segmenter"):
    return Checkpoint.load(path, kind=kind)


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


def test_target_diameter_is_the_models_and_old_files_keep_theirs(tmp_path, tiny_arch):
    from napari_sagegan.engine.checkpoint import default_model_path, target_diameter_of
    from napari_sagegan.engine.config import TrainConfig

    model = _model(tiny_arch)
    new = Checkpoint.from_model(model, arch=tiny_arch, train=TrainConfig(target_diameter=24.0))
    loaded = Checkpoint.load(new.save(tmp_path / "m.pt"))
    assert loaded.target_diameter == 24.0 and loaded["target_diameter"] == 24.0
    # files written before the entry existed: the train dict is read (None: own scale)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["target_diameter"]
    torch.save(payload, tmp_path / "old.pt")
    assert Checkpoint.load(tmp_path / "old.pt").target_diameter == 24.0
    assert target_diameter_of({"train": {"target_diameter": None}}) is None
    assert target_diameter_of({}) is None
    if default_model_path().is_file():
        assert Checkpoint.load("default").target_diameter == 32.0


def test_every_kind_builds_from_its_arch(tmp_path):
    from napari_sagegan.engine.nets.generator import GeneratorConfig, StyleUNetGenerator

    cfg = GeneratorConfig(base_channels=4, depth=2, z_dim=8, w_dim=8, mapping_layers=1)
    gen = StyleUNetGenerator(cfg).eval()
    path = Checkpoint.from_model(gen, kind="generator", arch=cfg).save(tmp_path / "g.pt")
    ckpt = Checkpoint.load(path, kind="generator")
    rebuilt = ckpt.build()
    assert isinstance(rebuilt, StyleUNetGenerator) and rebuilt.config == cfg
    with pytest.raises(FileNotFoundError, match="no bundled sagegan-gan model"):
        Checkpoint.load("default", kind="sagegan-gan")  # only segmenter and generator are
