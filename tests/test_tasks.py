"""The Qt-free napari side: layer adapters (napari.layers), the per-viewer state
(napari.state) and the jobs the docks run (napari.jobs, over napari_sagegan.api).

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
from napari_sagegan import api
from napari_sagegan.api.train import _training_pairs
from napari_sagegan.engine.analysis.metrics import evaluate_pair
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
from napari_sagegan.engine.infer.tiling import n_tiles
from napari_sagegan.napari import jobs, layers, state

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
    """A stand-in for a napari Image layer: the plain attributes napari.layers reads."""
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
        layers.image_input(rgb)
    four_d = _layer("movie", np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="4 dimensions.*Split Stack"):
        layers.image_input(four_d)
    with pytest.raises(ValueError, match="not an image"):
        layers.image_input(_layer("line", np.zeros(16, np.uint8)))
    ok = layers.image_input(_layer("em", np.zeros((3, 16, 16)), scale=(2.0, 0.5, 0.5)))
    assert ok.scale == (2.0, 0.5, 0.5) and ok.unit is None


def test_edits_are_recognised_by_fingerprint():
    _, lab = disc_scene()
    layer = SimpleNamespace(
        name="a labels", data=lab.copy(), metadata={layers.META_KEY: {"image": "a"}}
    )
    assert layers.is_edited(layer) is None  # no fingerprint: not made by the plugin
    layer.metadata[layers.META_KEY]["digest"] = layers.labels_digest(lab)
    assert layers.is_edited(layer) is False
    layer.data[0, 0] = 99  # paint one pixel
    assert layers.is_edited(layer) is True
    layer.data[0, 0] = 0  # undo
    assert layers.is_edited(layer) is False
    # the image is found from the metadata, else from the "<image> labels" convention
    assert layers.source_image_name(layer) == "a"
    plain = SimpleNamespace(name="b labels [1]", metadata={})
    assert layers.source_image_name(plain) == "b"
    assert layers.source_image_name(SimpleNamespace(name="mask", metadata={})) is None


def test_training_pairs_are_checked():
    img, lab = disc_scene()
    layers.check_pair(layers.TrainingPair("ok", img, lab))
    with pytest.raises(ValueError, match="shape .* but the image has shape"):
        layers.check_pair(layers.TrainingPair("crop", img, lab[:, :100]))
    with pytest.raises(ValueError, match="no particle"):
        layers.check_pair(layers.TrainingPair("empty", img, np.zeros_like(lab)))
    with pytest.raises(ValueError, match="2-D images"):
        layers.check_pair(layers.TrainingPair("4d", img[None, None], lab[None, None]))
    stack = layers.TrainingPair("stack", np.stack([img, img]), np.stack([lab, lab]))
    images, labels = _training_pairs([stack, layers.TrainingPair("2d", img, lab)], None, "")
    assert len(images) == len(labels) == 3 and all(im.shape == img.shape for im in images)
    assert api.fit_patch_size(256, [np.zeros((64, 100)), np.zeros((300, 300))]) == 64
    assert api.fit_patch_size(256, [np.zeros((20, 20))]) == 32


# --------------------------------------------------------------------------- models


def test_model_store_selects_rolls_back_and_forgets_widgets():
    store = state.ModelStore()
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


def test_one_state_per_viewer_dropped_with_it():
    class Viewer:  # any weak-referenceable object stands in for a napari viewer
        pass

    a, b = Viewer(), Viewer()
    assert state.viewer_state(a) is state.viewer_state(a)
    assert state.viewer_state(a).models is not state.viewer_state(b).models
    n = len(state._STATES)
    del a
    gc.collect()
    assert len(state._STATES) == n - 1


def test_training_sets_and_phase2_live_in_the_viewer_state():
    def labels(name, **meta):
        return SimpleNamespace(name=name, data=np.ones((4, 4), np.int32), metadata={
            layers.META_KEY: meta} if meta else {})  # fmt: skip

    class Labels(SimpleNamespace):  # the layer kind is read from the class name
        pass

    class Image(SimpleNamespace):
        pass

    viewer_layers = [
        Image(name="a", data=np.zeros((4, 4), np.uint8), metadata={}),
        Labels(**vars(labels("a labels"))),
        Image(name="s", metadata={}),
        Labels(**vars(labels("s labels", image="s", synthetic=True))),
        Labels(**vars(labels("orphan labels"))),  # its image is not open: not listed
    ]
    candidates = layers.candidate_pairs(viewer_layers)
    assert [c.name for c in candidates] == ["a labels", "s labels", "orphan labels"]
    st = state.ViewerState()
    rows = st.augment_set.rows(candidates)  # as fine-tuning: only corrected ones ticked
    assert [(c.name, t) for c, t in rows] == [("a labels", False), ("s labels", False)]
    assert [(c.name, t) for c, t in st.retrain_set.rows(candidates)] == [
        ("a labels", False), ("s labels", False)]  # fmt: skip

    calls = []

    class View:
        def changed(self):
            calls.append(1)

    view = View()
    st.retrain_set.subscribe(view.changed)
    assert st.retrain_set.n_subscribers == 1
    st.retrain_set.choose(["s labels"])  # another dock ticks generated pairs
    assert calls == [1] and st.retrain_set.ticked() == ["s labels"]
    st.retrain_set.choose("s labels")  # no change: no call
    assert calls == [1]
    assert dict((c.name, t) for c, t in st.retrain_set.rows(candidates))["s labels"] is True
    del view
    gc.collect()
    assert st.retrain_set.n_subscribers == 0

    assert st.phase2.generator is None and st.phase2.n_made == 0
    st.phase2.set_generator({"kind": "generator"}, [np.zeros((4, 4))])
    assert st.phase2.made(3) == 1 and st.phase2.made(2) == 4 and st.phase2.n_made == 5
    pairs = layers.pairs_from_layers(viewer_layers, ["a labels", "orphan labels", "gone"])
    assert [p.name for p in pairs] == ["'a labels' on 'a'"]


def test_missing_default_model_says_what_to_do(monkeypatch, tmp_path):
    import napari_sagegan.engine.checkpoint as ckpt

    monkeypatch.setattr(
        ckpt, "default_model_path", lambda kind="segmenter": tmp_path / "default.pt"
    )
    entry = state.ModelStore().current
    with pytest.raises(FileNotFoundError, match="Load model"):
        entry.check_available()


def test_model_entry_save_round_trip(tiny_model, tmp_path):
    from napari_sagegan.engine.checkpoint import load_segmenter

    store = state.ModelStore()
    entry = store.add_file(tiny_model)
    assert entry.name == "tiny.pt" and store.current is entry
    out = entry.save(tmp_path / "copy")  # the suffix is added
    assert out.name == "copy.pt"
    model, ckpt = load_segmenter(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, entry.ckpt["state_dict"][k].float()), k
    # the saved copy keeps the model's (calibrated) operating point
    original = load_segmenter(tiny_model)[1]
    assert ckpt["infer"] == original["infer"]
    assert ckpt["extra"]["calibration"]["threshold"] == ckpt["infer"]["threshold"]


# --------------------------------------------------------------------------- segmentation


def test_segment_images_counts_particles_with_progress(tiny_model):
    img, lab = disc_scene()
    stack = np.stack([img, disc_scene(seed=6)[0]])
    entry = state.ModelEntry("tiny", str(tiny_model))
    inputs = [
        layers.image_input(_layer("a", img, scale=(0.5, 0.5), translate=(10.0, 20.0))),
        layers.image_input(_layer("z", stack, scale=(3.0, 0.5, 0.5))),
    ]
    events, results = _drain(
        jobs.segment_layers(entry, inputs, device="cpu", infer={"tile_size": 64})
    )
    tiles = [e for e in events if e.stage == "tiles"]
    seg = entry.segmenter("cpu")
    config = seg.default_infer_config(tile_size=64)
    (plan_a, n_a), (plan_z, n_z) = (seg.plan(i.data, config) for i in inputs)
    total = n_a + n_z
    # the model works at a network scale: each image is resampled to it, tiles cut to match
    factor = plan_a.factor
    per_slice = n_tiles((128, 128), max(8, round(64 / factor)), INFER.overlap_for(64), 1)
    # plus one step per rung of the network's particle-size ladder (once per image / stack)
    rungs = seg.ladder_steps((128, 128), plan_a, config)
    assert rungs > 0 and rungs == seg.ladder_steps((128, 128), plan_z, config)
    assert per_slice > 1 and n_a == per_slice + rungs and n_z == 2 * per_slice + rungs
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
    assert kwargs["metadata"][layers.META_KEY]["digest"] == layers.labels_digest(data)
    assert list(kwargs["features"]["index"]) == sorted(np.unique(a.labels)[1:].tolist())


def test_segment_images_refuses_an_empty_request(tiny_model):
    with pytest.raises(ValueError, match="no image to segment"):
        next(jobs.segment_layers(state.ModelEntry("t", str(tiny_model)), []))


# --------------------------------------------------------------------------- fine-tuning


def test_fine_tune_cancel_keeps_the_best_and_changes_the_weights(tiny_model):
    images, labels = toy_pairs(4, seed=3)
    pairs = [
        layers.TrainingPair(f"p{i}", im, lab) for i, (im, lab) in enumerate(zip(images, labels))
    ]
    config = TrainConfig(
        patch_size=64, batch_size=2, epochs=50, steps_per_epoch=3, lr=3e-3, seed=0, augment_p=0.0
    )
    base = state.ModelEntry("tiny", str(tiny_model))
    tune = jobs.FineTune(base, pairs, config, device="cpu", threads=1)
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
    store = state.ModelStore()
    entry = store.add_tuned(ckpt)
    img, lab = disc_scene()
    _, res = _drain(entry.segmenter("cpu").segment(img))
    assert res.labels.shape == img.shape


def test_extra_pairs_are_read_from_a_folder(tmp_path):
    import tifffile

    from napari_sagegan.io.images import read_pairs

    img, lab = disc_scene()
    tifffile.imwrite(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "a_mask.tif", (lab > 0).astype(np.uint8) * 255)  # binary mask
    tifffile.imwrite(tmp_path / "b.tif", img)  # no mask: skipped with a warning
    with pytest.warns(UserWarning, match="1 of 2 images"):
        pairs = read_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a.tif"]
    assert np.array_equal(pairs[0].image, img)
    assert pairs[0].labels.max() == 8  # the binary mask became 8 particles
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pairs(tmp_path / "missing")
