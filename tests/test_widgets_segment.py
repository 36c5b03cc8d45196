"""The Segment dock widget in a real napari viewer (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sagegan.engine.analysis.metrics import evaluate_pair
from napari_sagegan.napari.state import viewer_state
from test_tasks import disc_scene, trained_checkpoint

pytestmark = pytest.mark.gui

TIMEOUT = 20_000  # ms


def notifications():
    """A function returning the notifications shown since this call, as (severity, text)."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    def get():
        return [(str(r.severity), r.message) for r in notification_manager.records[start:]]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture
def messages():
    return notifications()


def make_widget(viewer, model=None):
    from napari_sagegan.napari._qt.segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    if model is not None:
        assert widget.load_model(str(model))
    widget.device_combo.setCurrentText("cpu")
    widget.tile_spin.setValue(64)
    return widget


def run_and_wait(qtbot, widget):
    worker = widget.run()
    assert worker is not None
    # the widget's own finished handler (connected before the start) clears is_running;
    # waiting on worker.finished here could miss a task that ends at once
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    return worker


def test_segment_counts_particles_and_measures_them(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    img, lab = disc_scene()
    viewer.add_image(img, name="discs", scale=(0.5, 0.5), translate=(10, 20), units="nm")
    widget = make_widget(viewer, tiny_model)
    assert widget.model_combo.currentText() == "tiny.pt"
    run_and_wait(qtbot, widget)
    layer = viewer.layers["discs labels"]
    assert len(np.unique(layer.data)) - 1 == 8  # the known answer
    assert evaluate_pair(layer.data, lab)["f1@0.5"] == 1.0
    assert tuple(layer.scale) == (0.5, 0.5) and tuple(layer.translate) == (10, 20)
    table = layer.features
    assert len(table) == 8 and {"area_px", "area_nm2", "equivalent_diameter_nm"} <= set(table)
    np.testing.assert_allclose(table["area_nm2"], table["area_px"] * 0.25)
    assert widget.device_label.text().startswith("used: cpu")
    bar = widget.progress.bar
    assert bar.maximum() > 1 and bar.value() == bar.maximum()
    assert "8 particles" in widget.result_label.text()
    assert widget.run_button.isEnabled()
    # a second run adds a new layer by default (issue 16.3: nothing replaced silently), and
    # the result line names the layer napari really made
    first = layer
    widget.threshold_spin.setValue(0.6)
    run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["discs", "discs labels", "discs labels [1]"]
    assert viewer.layers["discs labels"] is first and np.array_equal(first.data, layer.data)
    assert widget.result_label.text().startswith("discs labels [1]: 8 particles")
    assert "'discs labels' kept" in widget.result_label.text()


def test_test_time_views_are_the_ones_chosen_in_the_dock(make_napari_viewer, qtbot, tiny_model):
    from napari_sagegan.engine.infer.segment import Segmenter
    from napari_sagegan.util.progress import run_to_end

    viewer = make_napari_viewer()
    img, lab = disc_scene()
    viewer.add_image(img, name="discs")
    widget = make_widget(viewer, tiny_model)
    assert widget.ready_arguments()["infer"]["tta"] == 1  # none by default: the fast path
    widget.tta_combo.setCurrentIndex(3)
    widget.attention_check.setChecked(True)  # maps to compare (the labels may not change)
    views = viewer_state(viewer).views
    assert views.views == 8 and widget.ready_arguments()["infer"]["tta"] == 8
    # one setting per viewer: set elsewhere, the dock shows it; nonsense is refused
    views.set(4)
    assert widget.tta_combo.currentText() == "4"
    with pytest.raises(ValueError, match="one of"):
        views.set(3)
    views.set("8 (most accurate)")
    assert widget.tta_combo.currentIndex() == 3
    run_and_wait(qtbot, widget)
    layer = viewer.layers["discs labels"]
    # the maps of the engine with the eight views and the dock's other settings, not one's
    seg = Segmenter.load(str(tiny_model), device="cpu")
    cfg = seg.default_infer_config(tile_size=64, tta=8, threshold=widget.threshold_spin.value())
    want = run_to_end(seg.segment(img, cfg, with_attention=True))
    att = np.asarray(viewer.layers["discs attention"].data)
    np.testing.assert_allclose(att, want.attention, atol=1e-5)
    one = run_to_end(seg.segment(img, cfg.replace(tta=1), with_attention=True))
    assert np.abs(att - one.attention).max() > 1e-3
    np.testing.assert_array_equal(layer.data, want.labels)
    assert evaluate_pair(layer.data, lab)["f1@0.5"] == 1.0


def test_batch_over_three_layers(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    a, _ = disc_scene(seed=1)
    b, _ = disc_scene(seed=2)
    stack = np.stack([disc_scene(seed=3)[0], disc_scene(seed=4)[0]])
    viewer.add_image(a, name="a")
    viewer.add_image(b, name="b", scale=(2.0, 2.0))
    viewer.add_image(stack, name="stack", scale=(5.0, 1.5, 1.5), translate=(0, 3, 4))
    widget = make_widget(viewer)
    widget.tile_spin.setValue(256)
    assert widget.load_model(str(tiny_model))
    assert widget.tile_spin.value() == 256  # tiling is the machine's: a model keeps it
    widget.all_images.setChecked(True)
    assert not widget.image_combo.isEnabled()
    run_and_wait(qtbot, widget)
    for name, scale, n in (("a", (1, 1), 8), ("b", (2, 2), 8), ("stack", (5, 1.5, 1.5), 16)):
        layer = viewer.layers[f"{name} labels"]
        image = viewer.layers[name]
        assert layer.data.shape == image.data.shape
        assert tuple(layer.scale) == scale and tuple(layer.translate) == tuple(image.translate)
        assert len(layer.features) == n, name
    assert len(viewer.layers) == 6


def test_second_click_and_cancel_stop_at_the_next_tile(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    big = np.tile(disc_scene()[0], (4, 4))  # 512 x 512 -> 81 tiles of 64 px
    viewer.add_image(big, name="big")
    widget = make_widget(viewer, tiny_model)
    widget.all_images.setChecked(False)
    seen = []
    worker = widget.run()
    worker.yielded.connect(lambda ev: (seen.append(ev), widget.cancel()))
    assert not widget.run_button.isEnabled()
    assert widget.run() is None  # a second click does not start a second job
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert 1 <= len(seen) <= 3 and seen[-1].step < seen[-1].total
    assert "big labels" not in viewer.layers
    assert widget.run_button.isEnabled() and widget.worker is None
    assert widget.progress.status.text().startswith("cancelled")


def test_closing_the_dock_stops_the_worker(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    viewer.add_image(np.tile(disc_scene()[0], (4, 4)), name="big")
    widget = make_widget(viewer, tiny_model)
    worker = widget.run()
    qtbot.waitUntil(lambda: widget.progress.bar.maximum() > 1, timeout=TIMEOUT)
    viewer.window.remove_dock_widget(widget)  # the dock's "x" button
    assert not worker.is_running and worker.abort_requested
    qtbot.wait(50)
    assert "big labels" not in viewer.layers
    widget.deleteLater()


def test_bad_inputs_are_reported_not_crashed(make_napari_viewer, qtbot, messages, monkeypatch):
    import napari_sagegan.engine.checkpoint as ckpt

    # as in an installation without the bundled model (checked before the widget opens)
    monkeypatch.setattr(
        ckpt, "default_model_path", lambda kind="segmenter": ckpt.Path("/nonexistent.pt")
    )
    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    assert widget.run() is None  # no layers at all
    assert "no image layer" in messages()[-1][1] and "File > Open" in messages()[-1][1]
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="photo", rgb=True)
    widget.image_combo.setCurrentText("photo")
    assert widget.run() is None
    assert "RGB" in messages()[-1][1] and messages()[-1][0] == "error"
    viewer.add_image(np.zeros((2, 2, 32, 32), np.uint8), name="movie")
    widget.image_combo.setCurrentText("movie")
    assert widget.run() is None
    assert "4 dimensions" in messages()[-1][1]
    # batch: the good image runs, the bad ones are named in warnings
    viewer.add_image(disc_scene()[0], name="good")
    widget.all_images.setChecked(True)
    assert widget.run() is None  # the bundled default model is missing here
    assert "not installed" in messages()[-1][1] and "Load model" in messages()[-1][1]
    assert [ly.name for ly in viewer.layers] == ["photo", "movie", "good"]
    # a bad model file is refused with a reason; the current model stays
    bad = ckpt.Path(viewer.layers["good"].name)  # not a file
    assert widget.load_model(str(bad)) is False
    assert "cannot use this model" in messages()[-1][1].lower()
    assert widget.store.current is viewer_state(viewer).models.entries[0]


def test_closing_the_viewer_stops_the_worker(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    viewer.add_image(np.tile(disc_scene()[0], (4, 4)), name="big")
    widget = make_widget(viewer, tiny_model)
    worker = widget.run()
    qtbot.waitUntil(lambda: widget.progress.bar.maximum() > 1, timeout=TIMEOUT)
    viewer.close()
    assert worker.abort_requested and not worker.is_running
    qtbot.wait(50)  # late signals reach no deleted widget


def test_widgets_and_samples_open_from_the_plugin_menus(make_napari_viewer):
    from napari_sagegan.napari._qt.export import ExportWidget
    from napari_sagegan.napari._qt.retrain import RetrainWidget
    from napari_sagegan.napari._qt.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.open_sample("napari-sagegan", "sem_agglomerate")
    assert [ly.name for ly in viewer.layers] == ["SEM agglomerate", "SEM agglomerate ground truth"]
    kinds = {"Segment": SegmentWidget, "Correct and retrain": RetrainWidget}
    kinds["Export labels"] = ExportWidget
    widgets = {}
    for name, cls in kinds.items():
        _, widget = viewer.window.add_plugin_dock_widget("napari-sagegan", name)
        assert isinstance(widget, cls)
        widgets[name] = widget
    assert widgets["Segment"].image_combo.currentText() == "SEM agglomerate"
    # the ground truth is offered as a training pair, unticked
    retrain = widgets["Correct and retrain"]
    assert retrain.pair_list.count() == 1 and retrain.checked_labels() == []
    # both model widgets share the viewer's model store
    assert widgets["Segment"].store is retrain.store


def test_particle_size_in_nm_is_honoured_and_shown(make_napari_viewer, qtbot, tiny_model, messages):
    viewer = make_napari_viewer()
    img, lab = disc_scene()  # discs 17 px across
    viewer.add_image(img, name="discs", scale=(0.5, 0.5), units="nm")
    widget = make_widget(viewer, tiny_model)
    widget.diameter_spin.setValue(8.5)  # nm, i.e. 17 px
    widget.diameter_unit.setCurrentText("nm")
    run_and_wait(qtbot, widget)
    (result,) = widget.results
    assert result.scale.source == "user" and result.scale.diameter == 17.0
    assert "17 px = 8.5 nm (given)" in widget.result_label.text()
    assert evaluate_pair(viewer.layers["discs labels"].data, lab)["f1@0.5"] == 1.0
    # automatic: the estimate is shown
    widget.diameter_spin.setValue(0)
    run_and_wait(qtbot, widget)
    assert "(estimated)" in widget.result_label.text()
    # nm on an uncalibrated image: said, not started
    viewer.add_image(img, name="plain")
    widget.image_combo.setCurrentText("plain")
    widget.diameter_spin.setValue(8.5)
    assert widget.run() is None and not widget.is_running
    assert any("pixel size of 'plain' is unknown" in text for _, text in messages())


def test_estimate_fills_the_particle_size(make_napari_viewer, qtbot, tiny_model, messages):
    """Issue 12: "Estimate" shows the size before segmenting (px and nm, its confidence)
    and fills the field; Segment then uses it as the given size."""
    from napari_sagegan import api
    from napari_sagegan.engine.synthetic.render import make_sample
    from napari_sagegan.io.pixel_size import PixelSize
    from napari_sagegan.util.progress import run_to_end

    image, _ = make_sample("tem_dispersed", shape=(256, 256), seed=1)  # ~18 px particles
    viewer = make_napari_viewer()
    viewer.add_image(image, name="tem", scale=(0.5, 0.5), units="nm")
    widget = make_widget(viewer, tiny_model)
    assert widget.diameter_spin.value() == 0  # auto
    worker = widget.estimate_size()
    assert worker is not None and not widget.estimate_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    expected = run_to_end(
        api.estimate_size(api.Micrograph("tem", image, PixelSize(0.5)), model=tiny_model,
                          device="cpu", infer=widget._infer())
    )  # fmt: skip
    est = widget.estimate
    assert est is not None and est.diameter == pytest.approx(expected.diameter)
    assert est.diameter == pytest.approx(18, rel=0.25) and not est.uncertain
    assert widget.diameter_unit.currentText() == "px"
    assert widget.diameter_spin.value() == pytest.approx(round(est.diameter, 1))
    assert viewer_state(viewer).particle_size.value == widget.diameter_spin.value()
    text = widget.size_label.text()
    assert "px = " in text and "nm (estimated), confidence" in text
    assert widget.progress.status.text() == "estimated" and widget.estimate_button.isEnabled()
    assert widget.pixel_size_button.isHidden()  # the pixel size is known
    assert not any(sev == "warning" for sev, _ in messages())
    # in nm, the field is filled in nm
    widget.diameter_unit.setCurrentText("nm")
    assert widget.estimate_size() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert widget.diameter_spin.value() == pytest.approx(round(est.diameter * 0.5, 1))
    # the user may type another size; Segment uses what the field says
    widget.diameter_unit.setCurrentText("px")
    widget.diameter_spin.setValue(20.0)
    run_and_wait(qtbot, widget)
    (result,) = widget.results
    assert result.scale.source == "user" and result.scale.diameter == 20.0


def test_estimate_warns_and_offers_the_scale_bar_pixel_size(
    make_napari_viewer, qtbot, tiny_model, messages, monkeypatch
):
    """An uncertain estimate is a warning; a scale bar's pixel size is offered and set on
    the layer only when the user confirms; after segmenting, the annotations left out are
    said."""
    import napari_sagegan.engine.infer.annotations as annotations
    from napari_sagegan.engine.synthetic.annotations import burn_in
    from napari_sagegan.engine.synthetic.render import make_sample
    from napari_sagegan.napari.layers import layer_pixel_size

    image, labels = make_sample("sem_sparse", shape=(256, 256), seed=1)
    image, _, _ = burn_in(image, labels, np.random.default_rng(2), kinds=("scalebar",))
    monkeypatch.setattr(annotations, "_ocr", lambda crop: "50 nm")  # as Tesseract reads it
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="sem")
    widget = make_widget(viewer, tiny_model)
    widget.estimate_size()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert widget.estimate.uncertain  # the tiny disc model is unsure on this image
    warned = [text for sev, text in messages() if sev == "warning"]
    assert len(warned) == 1 and "uncertain" in warned[0] and warned[0].startswith("Sem:")
    assert "uncertain" in widget.size_label.text()
    assert "scale bar of 55 px found, labelled 50 nm" in widget.size_label.text()
    assert (
        not widget.pixel_size_button.isHidden() and "0.9091 nm" in widget.pixel_size_button.text()
    )
    assert tuple(layer.scale) == (1.0, 1.0) and layer_pixel_size(layer) is None  # not yet
    widget.pixel_size_button.click()  # the user confirms
    assert layer_pixel_size(layer) == pytest.approx(50 / 55)
    assert tuple(layer.scale) == pytest.approx((50 / 55, 50 / 55))
    assert widget.pixel_size_button.isHidden()
    # segmenting reports the annotations left out
    widget.diameter_spin.setValue(32.0)
    run_and_wait(qtbot, widget)
    assert "annotations left out: scale bar (55 px)" in widget.result_label.text()


def test_the_minimum_confidence_comes_from_the_model_and_what_it_leaves_out_is_said(
    make_napari_viewer, qtbot, tiny_model, tmp_path
):
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.infer.segment import Segmenter

    ck = Checkpoint.load(tiny_model).to_dict()
    ck["infer"] = {**dict(ck.get("infer") or {}), "min_confidence": 0.3}
    cut_model = Checkpoint.from_dict(ck).save(tmp_path / "cut.pt")
    viewer = make_napari_viewer()
    img, _lab = disc_scene()
    viewer.add_image(img, name="discs")
    widget = make_widget(viewer, cut_model)
    assert widget.confidence_spin.value() == pytest.approx(0.3)  # the model's calibration
    assert widget.ready_arguments()["infer"]["min_confidence"] == pytest.approx(0.3)
    # above the median confidence of these discs: some are left out, and the dock says so
    seg = Segmenter.load(str(cut_model), device="cpu")
    full = seg.segment_sync(img, seg.default_infer_config(tile_size=64, min_confidence=0.0))
    cut = round(float(np.median(full.confidence[1:])) + 0.005, 2)
    n_low = int((full.confidence[1:] < cut).sum())
    assert 0 < n_low < 8
    widget.tile_spin.setValue(64)
    widget.confidence_spin.setValue(cut)
    run_and_wait(qtbot, widget)
    layer = viewer.layers["discs labels"]
    assert len(np.unique(layer.data)) - 1 == 8 - n_low
    assert f"{n_low} particle" in widget.result_label.text()
    assert "unsure" in widget.result_label.text()
    assert "a minimum confidence of 0 keeps them" in widget.result_label.text()
