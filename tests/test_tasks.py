"""The Qt-free glue between layers and the engine (napari_sagegan.napari.tasks).

Also home of the tiny trained model shared by the GUI tests (``tiny_model`` fixture): a real
segmenter trained for a few seconds on synthetic discs, saved with SegmenterTrainer.save.
"""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.engine.analysis.metrics import evaluate_pair
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
from napari_sagegan.engine.infer.tiling import n_tiles
from napari_sagegan.napari import tasks as _tasks

# --------------------------------------------------------------------------- shared model

ARCH = ArchConfig(base_channels=8, depth=2, dropout=0.1)
INFER = InferConfig(tile_size=64, min_size=5)
#: Eight well-separated discs of radius 8 in a 128 x 128 image: the known answer is 8.
CENTRES = ((20, 20), (20, 62), (20, 104), (64, 34), (64, 92), (106, 20), (106, 64), (106, 106))
_CACHE: dict[str, Path] = {}


def disc_scene(seed: int = 5, shape=(128, 128), centres=CENTRES, radius: int = 8, dark=True):
    """A test image with well-separated discs and its labels."""
    return disc_image(shape, centres=centres, radius=radius, seed=seed, dark=dark)


def toy_pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(10, 54, 2)) for _ in range(3)]
        img, lab = disc_image((64, 64), centres, radius=int(rng.integers(5, 8)), seed=100 + i)
        images.append(img)
        labels.append(lab)
    return images, labels


def trained_checkpoint(folder: Path) -> Path:
    """Train the tiny disc segmenter once per session (about 6 s on one thread)."""
    if "path" not in _CACHE:
        from napari_sagegan.engine.train.segmenter import SegmenterTrainer

        torch.set_num_threads(1)
        images, labels = toy_pairs(8)
        config = TrainConfig(
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
        trainer = SegmenterTrainer(images, labels, config, arch=ARCH, device="cpu", infer=INFER)
        for _ in trainer.run():
            pass
        path = folder / "tiny.pt"
        trainer.save(path, state=trainer.best_state, epoch=6, metrics=trainer.best_metrics)
        _CACHE["path"] = path
    return _CACHE["path"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


def _layer(name, data, scale=None, translate=None, units=None, rgb=False):
    """A stand-in for a napari Image layer: the plain attributes _tasks reads."""
    nd = np.ndim(data) - (1 if rgb else 0)
    return SimpleNamespace(
        name=name,
        data=data,
        scale=scale or (1.0,) * nd,
        translate=translate or (0.0,) * nd,
        units=units,
        rgb=rgb,
        multiscale=False,
        metadata={},
    )


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


# --------------------------------------------------------------------------- inputs


def test_bad_image_layers_are_refused_with_advice():
    rgb = _layer("photo", np.zeros((16, 16, 3), np.uint8), rgb=True)
    with pytest.raises(ValueError, match="RGB.*Split RGB"):
        _tasks.image_input(rgb)
    four_d = _layer("movie", np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="4 dimensions.*Split Stack"):
        _tasks.image_input(four_d)
    with pytest.raises(ValueError, match="not an image"):
        _tasks.image_input(_layer("line", np.zeros(16, np.uint8)))
    ok = _tasks.image_input(_layer("em", np.zeros((3, 16, 16)), scale=(2.0, 0.5, 0.5)))
    assert ok.scale == (2.0, 0.5, 0.5) and ok.unit is None


def test_edits_are_recognised_by_fingerprint():
    _, lab = disc_scene()
    layer = SimpleNamespace(
        name="a labels", data=lab.copy(), metadata={_tasks.META_KEY: {"image": "a"}}
    )
    assert _tasks.is_edited(layer) is None  # no fingerprint: not made by the plugin
    layer.metadata[_tasks.META_KEY]["digest"] = _tasks.labels_digest(lab)
    assert _tasks.is_edited(layer) is False
    layer.data[0, 0] = 99  # paint one pixel
    assert _tasks.is_edited(layer) is True
    layer.data[0, 0] = 0  # undo
    assert _tasks.is_edited(layer) is False
    # the image is found from the metadata, else from the "<image> labels" convention
    assert _tasks.source_image_name(layer) == "a"
    plain = SimpleNamespace(name="b labels [1]", metadata={})
    assert _tasks.source_image_name(plain) == "b"
    assert _tasks.source_image_name(SimpleNamespace(name="mask", metadata={})) is None


def test_training_pairs_are_checked():
    img, lab = disc_scene()
    _tasks.check_pair(_tasks.TrainingPair("ok", img, lab))
    with pytest.raises(ValueError, match="shape .* but the image has shape"):
        _tasks.check_pair(_tasks.TrainingPair("crop", img, lab[:, :100]))
    with pytest.raises(ValueError, match="no particle"):
        _tasks.check_pair(_tasks.TrainingPair("empty", img, np.zeros_like(lab)))
    with pytest.raises(ValueError, match="2-D images"):
        _tasks.check_pair(_tasks.TrainingPair("4d", img[None, None], lab[None, None]))
    stack = _tasks.TrainingPair("stack", np.stack([img, img]), np.stack([lab, lab]))
    images, labels = _tasks.split_slices([stack, _tasks.TrainingPair("2d", img, lab)])
    assert len(images) == len(labels) == 3 and all(im.shape == img.shape for im in images)
    assert _tasks.suggest_patch_size([(64, 100), (300, 300)]) == 64
    assert _tasks.suggest_patch_size([(20, 20)]) == 32


# --------------------------------------------------------------------------- models


def test_model_store_selects_rolls_back_and_forgets_widgets():
    store = _tasks.ModelStore()
    assert store.current.source == "default" and store.previous is None
    with pytest.raises(ValueError, match="no previous model"):
        store.use_previous()

    calls = []

    class Listener:
        def changed(self):
            calls.append(1)

    listener = Listener()
    store.subscribe(listener.changed)
    tuned = store.add_tuned({"arch": ARCH.to_dict(), "state_dict": {}})
    assert store.current is tuned and store.previous is store.entries[0]
    assert store.use_previous() is store.entries[0] and store.previous is tuned
    assert len(calls) == 2
    del listener
    gc.collect()
    store.use_previous()  # a deleted widget is no longer called
    assert len(calls) == 2 and store.current is tuned
    for i in range(12):
        store.add_tuned({"arch": ARCH.to_dict(), "state_dict": {}, "i": i})
    assert len(store.entries) == store.MAX_ENTRIES
    assert store.entries[0].source == "default"


def test_one_store_per_viewer_dropped_with_it():
    class Viewer:  # any weak-referenceable object stands in for a napari viewer
        pass

    a, b = Viewer(), Viewer()
    assert _tasks.model_store(a) is _tasks.model_store(a)
    assert _tasks.model_store(a) is not _tasks.model_store(b)
    n = len(_tasks._STORES)
    del a
    gc.collect()
    assert len(_tasks._STORES) == n - 1


def test_missing_default_model_says_what_to_do(monkeypatch, tmp_path):
    import napari_sagegan.engine.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "default_model_path", lambda: tmp_path / "default.pt")
    entry = _tasks.ModelStore().current
    with pytest.raises(FileNotFoundError, match="Load model"):
        entry.check_available()


def test_model_entry_save_round_trip(tiny_model, tmp_path):
    from napari_sagegan.engine.checkpoint import load_segmenter

    store = _tasks.ModelStore()
    entry = store.add_file(tiny_model)
    assert entry.name == "tiny.pt" and store.current is entry
    out = entry.save(tmp_path / "copy")  # the suffix is added
    assert out.name == "copy.pt"
    model, ckpt = load_segmenter(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, entry.ckpt["state_dict"][k].float()), k
    assert ckpt["infer"] == INFER.to_dict()


# --------------------------------------------------------------------------- segmentation


def test_segment_images_counts_particles_with_progress(tiny_model):
    img, lab = disc_scene()
    stack = np.stack([img, disc_scene(seed=6)[0]])
    entry = _tasks.ModelEntry("tiny", str(tiny_model))
    inputs = [
        _tasks.image_input(_layer("a", img, scale=(0.5, 0.5), translate=(10.0, 20.0))),
        _tasks.image_input(_layer("z", stack, scale=(3.0, 0.5, 0.5))),
    ]
    events, results = _drain(
        _tasks.segment_images(entry, inputs, device="cpu", overrides={"tile_size": 64})
    )
    tiles = [e for e in events if e.stage == "tiles"]
    seg = entry.segmenter("cpu")
    config = seg.default_infer_config(tile_size=64)
    (plan_a, n_a), (plan_z, n_z) = (seg.plan(i.data, config) for i in inputs)
    total = n_a + n_z
    # the model works at a network scale: each image is resampled to it, tiles cut to match
    factor = plan_a.factor
    per_slice = n_tiles((128, 128), max(8, round(64 / factor)), INFER.overlap, 1)
    assert per_slice > 1 and n_a == per_slice and n_z == 2 * per_slice  # 1 image + 2 slices
    steps = [e.step for e in tiles]  # one event per batch of tiles
    assert all(e.total == total for e in tiles) and steps[-1] == total
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert tiles[-1].eta_s == pytest.approx(0.0, abs=1e-6)
    assert tiles[0].data["device"].startswith("cpu")
    done = [e.data["result"] for e in events if e.stage == "image"]
    assert done == results and [r.labels_name for r in results] == ["a labels", "z labels"]
    a, z = results
    assert a.n_particles == 8 and len(np.unique(a.labels)) == 9
    assert evaluate_pair(a.labels, lab)["f1@0.5"] == 1.0
    assert z.n_particles == 16 and set(z.features["slice"]) == {0, 1}
    data, kwargs, kind = a.layer_data()[0]
    assert kind == "labels" and kwargs["scale"] == (0.5, 0.5)
    assert kwargs["translate"] == (10.0, 20.0)
    assert kwargs["metadata"][_tasks.META_KEY]["digest"] == _tasks.labels_digest(data)
    assert list(kwargs["features"]["index"]) == sorted(np.unique(a.labels)[1:].tolist())


def test_segment_images_refuses_an_empty_request(tiny_model):
    with pytest.raises(ValueError, match="no image to segment"):
        next(_tasks.segment_images(_tasks.ModelEntry("t", str(tiny_model)), []))


# --------------------------------------------------------------------------- fine-tuning


def test_fine_tune_cancel_keeps_the_best_and_changes_the_weights(tiny_model):
    images, labels = toy_pairs(4, seed=3)
    pairs = [
        _tasks.TrainingPair(f"p{i}", im, lab) for i, (im, lab) in enumerate(zip(images, labels))
    ]
    config = TrainConfig(
        patch_size=64, batch_size=2, epochs=50, steps_per_epoch=3, lr=3e-3, seed=0, augment_p=0.0
    )
    base = _tasks.ModelEntry("tiny", str(tiny_model))
    tune = _tasks.FineTune(base, pairs, config, device="cpu", threads=1)
    gen = tune.run()
    stages = [next(gen).stage for _ in range(3)]
    assert stages == ["prepare", "prepare", "train"]
    assert tune.result() is None  # no epoch ended yet: nothing to keep
    seen = []
    while len(seen) < 2:  # two epochs, then Cancel
        ev = next(gen)
        if ev.stage == "validate":
            seen.append(ev)
    gen.close()
    ckpt = tune.result()
    assert ckpt is not None and ckpt["epoch"] == 2 and ckpt["kind"] == "segmenter"
    assert ckpt["metrics"] == tune.trainer.best_metrics and "dice" in ckpt["metrics"]
    changed = [
        not torch.equal(v.float(), base.load()["state_dict"][k].float())
        for k, v in ckpt["state_dict"].items()
        if v.is_floating_point()
    ]
    assert any(changed)
    # the result is a usable model
    store = _tasks.ModelStore()
    entry = store.add_tuned(ckpt)
    img, lab = disc_scene()
    _, res = _drain(entry.segmenter("cpu").segment(img))
    assert res.labels.shape == img.shape


def test_extra_pairs_are_read_from_a_folder(tmp_path):
    import tifffile

    img, lab = disc_scene()
    tifffile.imwrite(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "a_mask.tif", (lab > 0).astype(np.uint8) * 255)  # binary mask
    tifffile.imwrite(tmp_path / "b.tif", img)  # no mask: skipped with a warning
    with pytest.warns(UserWarning, match="1 of 2 images"):
        pairs = _tasks.folder_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a.tif"]
    assert np.array_equal(pairs[0].image, img)
    assert pairs[0].labels.max() == 8  # the binary mask became 8 particles
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _tasks.folder_pairs(tmp_path / "missing")
