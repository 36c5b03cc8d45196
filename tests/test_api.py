"""The api: one function per capability, progress generators, pixel size and particle
diameter resolved once; and the util helpers it stands on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan import api
from napari_sagegan.io.pixel_size import PixelSize
from napari_sagegan.util.files import new_file, new_folder, staged_folder
from napari_sagegan.util.progress import Progress, relay, run_to_end


def _events(n, result="done", log=None):
    try:
        for i in range(n):
            yield Progress("x", i + 1, n)
        return result
    finally:
        if log is not None:
            log.append("closed")


def test_relay_maps_events_returns_the_result_and_closes():
    def outer():
        value = yield from relay(_events(3), lambda ev: Progress("y", ev.step * 10, 30))
        return value + "!"

    seen = []
    assert run_to_end(outer(), seen.append) == "done!"
    assert [(e.stage, e.step) for e in seen] == [("y", 10), ("y", 20), ("y", 30)]
    log = []
    gen = relay(_events(5, log=log))
    next(gen)
    gen.close()
    assert log == ["closed"]  # cancelling the relay cancels the inner generator

    def boom(ev):
        raise KeyboardInterrupt

    log = []
    with pytest.raises(KeyboardInterrupt):
        run_to_end(_events(5, log=log), boom)
    assert log == ["closed"]


def test_staged_folder_publishes_on_success_only(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as st:
        (st / "a.txt").write_text("a")
        assert not out.exists()
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "never") as st:
        (st / "b.txt").write_text("b")
        raise RuntimeError("failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no output
    with pytest.raises(ValueError, match="not empty"):
        new_folder(out, empty=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        new_folder(tmp_path / "no" / "out")
    with pytest.raises(ValueError, match="is a folder"):
        new_file(out, example="x.csv")


def test_particle_diameter_in_px_or_nm():
    known, unknown = PixelSize(0.5, "given"), PixelSize(None)
    assert api.particle_diameter(20.0, None, unknown, "a") == 20.0
    assert api.particle_diameter(None, 10.0, known, "a") == 20.0
    assert api.particle_diameter(None, None, unknown, "a") is None
    with pytest.raises(ValueError, match="once"):
        api.particle_diameter(5.0, 3.0, known, "a")
    with pytest.raises(ValueError, match="pixel size of 'plain' is unknown"):
        api.particle_diameter(None, 10.0, unknown, "plain")
    with pytest.raises(ValueError, match="positive"):
        api.particle_diameter(-1.0, None, known, "a")


def test_fit_patch_size():
    images = [np.zeros((100, 120)), np.zeros((300, 300))]
    assert api.fit_patch_size(64, images) == 64
    assert api.fit_patch_size(256, images) == 96
    assert api.fit_patch_size(256, [np.zeros((20, 20))]) == 32


@pytest.fixture(scope="module")
def tiny_model():
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.config import preset
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    torch.manual_seed(0)
    arch = preset("tiny")
    return Checkpoint.from_model(AttentionUNet(arch), arch=arch)


def test_segment_arrays_counts_tiles_over_all_images(tiny_model):
    a = disc_image((64, 64), [(20, 20), (44, 40)], radius=7, seed=0)[0]
    b = disc_image((96, 64), [(30, 30)], radius=7, seed=1)[0]
    images = [api.Micrograph("a", a, PixelSize(0.5, "metadata")), api.Micrograph("b", b)]
    events = []
    results = run_to_end(
        api.segment(images, model=tiny_model, device="cpu", infer={"tile_size": 32}),
        events.append,
    )
    tiles = [e for e in events if e.stage == "tiles"]
    total = tiles[0].total
    steps = [e.step for e in tiles]  # one count over both images (a batch of tiles a step)
    assert steps == sorted(steps) and steps[-1] == total and len(set(steps)) == len(steps)
    assert {e.total for e in tiles} == {total} and tiles[-1].data["index"] == 1
    done = [e.data["result"] for e in events if e.stage == "image"]
    assert [r.name for r in done] == ["a", "b"] and done == results
    assert results[0].labels.shape == (64, 64) and results[1].labels.shape == (96, 64)
    assert results[0].pixel_size.nm == 0.5 and not results[1].pixel_size.known
    assert results[0].report()["pixel_size_source"] == "metadata"
    with pytest.raises(ValueError, match="pixel size of 'b' is unknown"):
        run_to_end(api.segment(images, model=tiny_model, device="cpu", diameter_nm=5.0))


def test_measure_and_evaluate_arrays():
    _, lab = disc_image((64, 64), [(20, 20), (44, 40)], radius=7, seed=0)
    measured = run_to_end(api.measure([lab], pixel_size=0.5, names=["x"]))
    assert list(measured.table["file"]) == ["x", "x"] and measured.table.attrs["unit"] == "nm"
    assert measured.record["files"][0]["pixel_size_source"] == "given"
    report = run_to_end(api.evaluate([lab], [lab], names=["x"]))
    assert report["per_image"]["x"]["f1@0.5"] == 1.0 and report["mean"]["dice"] == 1.0


@pytest.fixture(scope="module")
def disc_model(tmp_path_factory):
    """The tiny disc segmenter of the GUI tests: trained, with a network scale of 32 px."""
    from test_tasks import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("disc_model"))


def test_estimate_size_before_segmenting(disc_model):
    """Issue 12: the size segment() will use, its confidence, in px and nm."""
    from test_tasks import disc_scene

    image, _ = disc_scene()  # discs 17 px across
    events = []
    est = run_to_end(
        api.estimate_size(
            api.Micrograph("discs", image, PixelSize(0.5, "layer")), model=disc_model,
            device="cpu",
        ),
        events.append,
    )  # fmt: skip
    assert isinstance(est, api.SizeEstimate) and est.name == "discs"
    assert events[0].stage == "prepare" and {e.stage for e in events[1:]} == {"scale"}
    assert est.scale.source == "network" and not est.uncertain
    assert est.diameter == pytest.approx(17, rel=0.25) and est.confidence > 0.35
    assert est.diameter_nm == pytest.approx(est.diameter * 0.5) and est.pixel_size.nm == 0.5
    assert est.scale_bar is None and est.proposed_pixel_size is None  # the pixel size is known
    assert "nm (estimated), confidence" in est.describe()
    [seg] = run_to_end(api.segment(image, model=disc_model, device="cpu"))
    assert seg.scale.diameter == pytest.approx(est.diameter)  # what segment() then uses
    with pytest.raises(ValueError, match="one image at a time"):
        run_to_end(api.estimate_size([image, image], model=disc_model, device="cpu"))


def test_estimate_size_proposes_the_scale_bar_pixel_size(disc_model, monkeypatch):
    """No pixel size: the scale bar is measured and its label read into a proposal (never
    applied); an unsure estimate says so."""
    import napari_sagegan.engine.infer.annotations as annotations
    from napari_sagegan.engine.synthetic.annotations import burn_in
    from napari_sagegan.engine.synthetic.render import make_sample

    image, labels = make_sample("sem_sparse", shape=(256, 256), seed=1)
    image, _, _ = burn_in(image, labels, np.random.default_rng(2), kinds=("scalebar",))
    est = run_to_end(api.estimate_size(image, model=disc_model, device="cpu"))
    assert not est.pixel_size.known and est.diameter_nm is None
    assert est.scale_bar.length_px == 55.0 and est.proposed_pixel_size is None  # no OCR
    assert "scale bar of 55 px found" in est.describe_scale_bar()
    assert est.uncertain and "uncertain" in est.describe()  # the tiny model is unsure here

    monkeypatch.setattr(annotations, "_ocr", lambda crop: "50 nm")  # as Tesseract reads it
    est = run_to_end(api.estimate_size(image, model=disc_model, device="cpu"))
    assert est.scale_bar.text == "50 nm" and est.scale_bar.length_nm == 50.0
    assert est.proposed_pixel_size == pytest.approx(50 / 55) and not est.pixel_size.known
    assert "pixel size 0.9091 nm (not applied" in est.describe_scale_bar()
    est = run_to_end(api.estimate_size(image, model=disc_model, device="cpu", pixel_size=2.0))
    assert est.scale_bar is None and est.pixel_size.nm == 2.0
