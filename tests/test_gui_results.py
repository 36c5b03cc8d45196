"""Issue 16, items 3-7 and the folder batch, in a real napari viewer (Xvfb): results are
never replaced silently, layers are added without freezing the window, the Augment dock's
defaults and words, docks that fit a laptop screen, the image box on the selected layer,
the time limit said, and a folder of files segmented as ``sagegan segment --csv`` does."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
import tifffile

from conftest import disc_image
from napari_sagegan.napari import jobs, layers
from napari_sagegan.napari.state import viewer_state
from test_tasks import disc_scene, trained_checkpoint
from test_widgets_segment import TIMEOUT, make_widget, notifications, run_and_wait

pytestmark = pytest.mark.gui


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture
def messages():
    return notifications()


def _wait(qtbot, widget, worker):
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running and not widget.pending, timeout=TIMEOUT)


# --------------------------------------------------------------------------- item 3


def test_results_are_never_replaced_silently(make_napari_viewer, qtbot, tiny_model):
    from test_widgets_retrain import make_retrain

    viewer = make_napari_viewer()
    img, _ = disc_scene()
    viewer.add_image(img, name="discs")
    widget = make_widget(viewer, tiny_model)
    assert widget.results_combo.currentText() == "add new layers"
    run_and_wait(qtbot, widget)
    first = viewer.layers["discs labels"]
    # the user corrects the first result: one particle erased
    corrected = np.where(first.data == 1, 0, first.data).astype(first.data.dtype)
    first.data = corrected
    assert layers.is_edited(first)

    # "replace unedited results": the corrected layer is still kept, the result is new
    widget.results_combo.setCurrentText("replace unedited results")
    assert viewer_state(viewer).results.replace
    run_and_wait(qtbot, widget)
    second = viewer.layers["discs labels [1]"]
    assert np.array_equal(first.data, corrected)
    line = widget.result_label.text()
    assert line.startswith("discs labels [1]: 8 particles (particle diameter ~ ")
    assert line.endswith("  (new layer; 'discs labels' kept)")
    # now an unedited result exists: the next run refreshes it in place, and says so
    widget.threshold_spin.setValue(0.6)
    run_and_wait(qtbot, widget)
    assert [ly.name for ly in viewer.layers] == ["discs", "discs labels", "discs labels [1]"]
    assert viewer.layers["discs labels [1]"] is second and layers.is_edited(second) is False
    assert widget.result_label.text().startswith("discs labels [1]: 8 particles")
    assert "replaced the earlier, unedited result" in widget.result_label.text()
    assert np.array_equal(first.data, corrected)

    # Re-segment follows the viewer's setting: replace mode refreshes "[1]" again ...
    retrain = make_retrain(viewer)
    retrain.pairs.refresh()
    assert retrain.checked_labels() == ["discs labels"]  # the corrected one
    _wait(qtbot, retrain, retrain.resegment())
    assert len(viewer.layers) == 3 and viewer.layers["discs labels [1]"] is second
    assert "replaced the earlier, unedited result" in retrain.result_label.text()
    # ... and "add new layers" (chosen in Segment) adds one, named as napari named it
    widget.results_combo.setCurrentText("add new layers")
    _wait(qtbot, retrain, retrain.resegment())
    assert viewer.layers[-1].name == "discs labels [2]"
    assert retrain.result_label.text().startswith("discs labels [2]: 8 particles")
    assert np.array_equal(first.data, corrected)


def test_replaceable_layer_never_picks_edited_foreign_or_synthetic():
    from types import SimpleNamespace

    class Labels(SimpleNamespace):  # the layer kind is read from the class name
        pass

    data = np.zeros((8, 8), np.uint16)
    data[2:4, 2:4] = 1
    made = {layers.META_KEY: {"image": "a", "digest": layers.labels_digest(data)}}
    plain = Labels(name="a labels", data=data.copy(), metadata={})  # opened from a file
    edited = Labels(name="a labels [1]", data=data * 2, metadata=made)  # painted since
    synth = Labels(name="a labels [2]", data=data.copy(), metadata={
        layers.META_KEY: {**made[layers.META_KEY], "synthetic": True}})  # fmt: skip
    other = Labels(name="a labels [3]", data=data.copy(), metadata={
        layers.META_KEY: {**made[layers.META_KEY], "image": "b"}})  # fmt: skip
    fresh = Labels(name="a labels [4]", data=data.copy(), metadata=made)
    small = Labels(name="a labels [5]", data=data[:4].copy(), metadata=made)
    stack = [plain, edited, synth, other]
    assert layers.replaceable_layer(stack, "a labels", "labels", data, "a") is None
    found = layers.replaceable_layer(stack + [fresh, small], "a labels", "labels", data, "a")
    assert found is fresh


# --------------------------------------------------------------------------- item 4


def test_heavy_work_in_the_worker_and_one_layer_per_turn(
    make_napari_viewer, qtbot, tiny_model, monkeypatch
):
    """Fingerprints, label dtypes and particle tables are made in the worker; the finished
    images reach the viewer one per turn of the event loop; the pair list hashes a layer
    again only after it changed."""
    from qtpy.QtCore import QTimer

    from napari_sagegan.napari._qt import parts
    from test_widgets_retrain import make_retrain

    hashed_in: list[str] = []
    real_digest = jobs.labels_digest

    def digest(data):
        hashed_in.append(threading.current_thread().name)
        return real_digest(data)

    monkeypatch.setattr(jobs, "labels_digest", digest)
    checks: list[str] = []
    real_is_edited = parts.is_edited
    monkeypatch.setattr(parts, "is_edited", lambda ly: checks.append(ly.name) or
                        real_is_edited(ly))  # fmt: skip

    viewer = make_napari_viewer()
    for i in range(3):
        viewer.add_image(disc_scene(seed=10 + i)[0], name=f"im{i}")
    widget = make_widget(viewer, tiny_model)
    retrain = make_retrain(viewer)
    widget.all_images.setChecked(True)
    turns = [0]
    ticker = QTimer()
    ticker.setInterval(1)
    ticker.timeout.connect(lambda: turns.__setitem__(0, turns[0] + 1))
    at_insert: list[int] = []
    viewer.layers.events.inserted.connect(lambda e: at_insert.append(turns[0]))
    ticker.start()
    run_and_wait(qtbot, widget)
    ticker.stop()
    assert [ly.name for ly in viewer.layers][3:] == [f"im{i} labels" for i in range(3)]
    assert len(hashed_in) == 3 and "MainThread" not in hashed_in
    assert all(viewer.layers[f"im{i} labels"].data.dtype == np.uint16 for i in range(3))
    assert len(at_insert) == 3 and at_insert[0] < at_insert[1] < at_insert[2]  # turns between

    # the pair list: each new Labels layer hashed once, not once per refresh
    qtbot.waitUntil(lambda: retrain.pair_list.count() == 3, timeout=3000)
    for _ in range(3):
        viewer.add_image(np.zeros((8, 8), np.uint8), name="other")
        retrain.pairs.refresh()
    assert sorted(checks) == sorted(set(checks)) and len(checks) == 3
    layer = viewer.layers["im1 labels"]
    layer.data = np.where(layer.data == 1, 0, layer.data).astype(layer.data.dtype)  # an edit
    qtbot.waitUntil(lambda: retrain.checked_labels() == ["im1 labels"], timeout=3000)
    assert checks.count("im1 labels") == 2 and len(checks) == 4


def test_plots_redraw_a_few_times_a_second(qtbot):
    from napari_sagegan.napari._qt.plots import CurvePlot, TermPlot

    class Counting(CurvePlot):
        paints = 0

        def paintEvent(self, event):  # noqa: N802
            Counting.paints += 1
            super().paintEvent(event)

    plot = Counting()
    qtbot.addWidget(plot)
    plot.resize(300, 200)
    plot.show()
    qtbot.waitExposed(plot)
    qtbot.wait(50)
    before = Counting.paints
    t0 = time.perf_counter()
    for i in range(200):  # 200 training steps in well under a second
        plot.add_step(i / 10, 1.0 / (i + 1))
        if i % 10 == 0:
            qtbot.wait(5)
    elapsed = time.perf_counter() - t0
    qtbot.wait(2 * CurvePlot.REDRAW_MS)
    painted = Counting.paints - before
    assert len(plot.step_loss) == 200  # no point dropped
    assert 1 <= painted <= 2 + elapsed * 1000 / CurvePlot.REDRAW_MS
    # the phase-2 legend is in plain words; the code's names are in the tooltips
    terms = TermPlot()
    qtbot.addWidget(terms)
    terms.resize(320, 220)
    terms.grab()  # paints it
    tips = [tip for _, tip in terms._legend]
    assert len(tips) == 8 and tips[0].startswith("image realism (adv_img):")
    assert not any(tip.split(" (")[0] in ("adv_img", "id_mask") for tip in tips)
    assert "segmentation, real (id_mask)" in terms.toolTip()


# --------------------------------------------------------------------------- item 5


def _augment_dock(viewer, tiny_model, **extra):
    from napari_sagegan.napari._qt.augment import AugmentWidget

    widget = AugmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Augment (SAGE-GAN)")
    widget.threads = 1
    widget.store.add_file(tiny_model)
    widget.model_combo.setCurrentText(tiny_model.name)
    widget.device_combo.setCurrentText("cpu")
    widget.patch_spin.setValue(32)
    widget.gan_extra = dict(
        steps_per_epoch=2, freeze_epochs=0, gen_base_channels=4, gen_depth=2, z_dim=8,
        disc_base_channels=4, preview_every=1, **extra,
    )  # fmt: skip
    return widget


def test_augment_ticks_says_time_and_keeps_an_unimproved_segmenter(
    make_napari_viewer, qtbot, tiny_model, messages
):
    viewer = make_napari_viewer()
    # a few particles in one corner, the rest empty: a dispersed sample, not a lattice
    img, truth = disc_image((128, 128), centres=((20, 20), (20, 40), (40, 20), (44, 44)),
                            radius=7, seed=3)  # fmt: skip
    viewer.add_image(img, name="discs")
    seg = make_widget(viewer, tiny_model)
    run_and_wait(qtbot, seg)  # a raw result: listed, not ticked
    viewer.add_image(img, name="copy")
    viewer.add_labels(truth, name="copy labels")  # a mask opened by hand: not ticked
    corrected = viewer.layers["discs labels"]
    seg.results_combo.setCurrentText("add new layers")
    run_and_wait(qtbot, seg)  # a duplicate result: not ticked
    corrected.data = np.where(truth == 1, 0, truth).astype(corrected.data.dtype)  # ticked
    widget = _augment_dock(viewer, tiny_model, epochs=100_000, select_after=100_000)
    qtbot.waitUntil(lambda: widget.pair_list.count() == 3, timeout=3000)
    assert widget.checked_labels() == ["discs labels"]
    assert "(edited)" in widget.pair_list.item(0).text()
    widget.set_checked("copy labels")  # a second pair: one of them validates

    widget.minutes_spin.setValue(0.05)  # 3 s: the time ends the run
    bars: list[str] = []
    worker = widget.start_training()
    worker.yielded.connect(lambda ev: ev.stage == "train" and bars.append(
        (widget.progress.bar.format(), widget.progress.status.text())))  # fmt: skip
    base = widget.store.current
    _wait(qtbot, widget, worker)
    assert bars and all(" of 3 s" in bar for bar, _ in bars)
    assert all("2000000" not in text and re.search(r"^\d+ steps?, epoch \d+, loss ", text)
               for _, text in bars)  # fmt: skip
    status = widget.progress.status.text()
    assert status.startswith("stopped at the 3-second limit after ")
    assert " of " not in status.split(":")[0]  # no "of 200000 steps"
    # select_after keeps phase 2 from being selected: the starting segmenter stays
    assert "phase 2 did not improve on the starting segmenter (F1 " in status
    assert "; kept it (tiny.pt)" in status
    assert widget.store.current is base and seg.model_combo.currentText() == "tiny.pt"
    # four particles in a corner are far from a lattice: 'real' is chosen, and why is said
    assert widget.layout_combo.currentText() == "real"
    assert "dispersed" in widget.layout_label.text()

    # generated images get contrast limits from their grey levels, not 0-255
    widget.layout_combo.setCurrentText("lattice")
    widget.n_spin.setValue(2)
    _wait(qtbot, widget, widget.start_generate())
    assert any("Layout 'lattice'" in text and "over-fill" in text for _, text in messages())
    image = viewer.layers["SAGE-GAN synth 01"]
    lo, hi = np.percentile(image.data, (0.5, 99.5))
    assert tuple(image.contrast_limits) == pytest.approx((lo, hi))
    assert hi - lo < 255 and image.data.min() <= lo < hi <= image.data.max()
    assert viewer.layers["SAGE-GAN synth 01 labels"].data.dtype == np.uint16


def test_phase2_improvement_and_layout_rules():
    """The job's reading of phase 2's validations, and the layout rule on real samples."""
    from napari_sagegan.engine.synthetic.render import make_sample
    from napari_sagegan.util.progress import Progress

    def validate(epoch, f1, improved):
        return Progress("validate", 0, 1, data={"epoch": epoch, "val_f1@0.5": f1,
                                                "improved": improved})  # fmt: skip

    for events, improved, best in (
        ([validate(0, 0.5, True), validate(1, 0.4, False), validate(2, 0.45, False)], False,
         0.45),
        ([validate(0, 0.5, True), validate(1, 0.4, False), validate(2, 0.6, True)], True, 0.6),
        ([validate(0, None, True), validate(1, None, True)], None, None),
    ):  # fmt: skip
        task = jobs.Augment(None, [], None)
        for ev in events:
            task.watch(ev)
        assert task.improved() is improved and task.best_f1 == best

    ordered = [make_sample("tem_hex", shape=(256, 256), seed=s)[1] for s in (0, 1)]
    dispersed = [make_sample("tem_dispersed", shape=(256, 256), seed=s)[1] for s in (0, 1)]
    assert jobs.suggest_layout(ordered)[0] == "lattice"
    layout, why = jobs.suggest_layout(dispersed)
    assert layout == "real" and "dispersed" in why


# --------------------------------------------------------------------------- item 6


def test_all_docks_fit_a_laptop_screen(make_napari_viewer, qtbot):
    from napari_sagegan.napari._qt.common import DOCKS, PLUGIN, open_all_docks

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-sagegan", "sem_agglomerate")
    window = viewer.window._qt_window
    # one above the other (napari's default), all the docks fit: each scrolls
    for name in DOCKS:
        viewer.window.add_plugin_dock_widget(PLUGIN, name)
    qtbot.wait(10)
    assert window.minimumSizeHint().height() <= 768 and window.minimumSizeHint().width() <= 1366
    # "Open all docks as tabs": one dock area, one tab each (the docks open included)
    docks = open_all_docks(viewer)
    assert list(docks) == list(DOCKS)
    wrapped = viewer.window._wrapped_dock_widgets  # "Segment (napari-sagegan)": dock
    first = next(dw for key, dw in wrapped.items() if key.startswith("Segment"))
    assert len(window.tabifiedDockWidgets(first)) == len(DOCKS) - 1
    assert window.minimumSizeHint().height() <= 768
    for name, dock in docks.items():
        assert dock.scroll_area is not None and dock.body.layout() is not None, name
        assert dock.minimumSizeHint().height() <= 700, name
        assert dock.scroll_area.sizeHint().height() <= 700, name
    for name in ("Segment", "Correct and retrain", "Augment (SAGE-GAN)"):
        assert docks[name].body.sizeHint().height() <= 700, name  # no need to scroll


# --------------------------------------------------------------------------- item 7


def test_image_box_follows_the_selected_layer(make_napari_viewer):
    from napari.layers import Image

    from napari_sagegan.napari._qt.parts import LayerCombo

    viewer = make_napari_viewer()
    for name in ("a", "b", "c"):
        viewer.add_image(np.zeros((8, 8), np.uint8), name=name)
    viewer.add_labels(np.zeros((8, 8), np.uint16), name="b labels")
    viewer.layers.selection.active = viewer.layers["b labels"]  # its image is "b"
    combo = LayerCombo(viewer, Image)
    assert combo.currentText() == "b"  # not the first layer
    viewer.layers.selection.active = viewer.layers["a"]  # the user selects another image
    assert combo.currentText() == "a"
    viewer.layers.selection.active = viewer.layers["b labels"]  # not an image: unchanged
    assert combo.currentText() == "a"
    viewer.add_image(np.zeros((8, 8), np.uint8), name="d")  # new layers are selected
    assert combo.currentText() == "d"


def test_fine_tune_says_it_hit_the_time_limit(make_napari_viewer, qtbot, tiny_model):
    from test_widgets_retrain import make_retrain

    viewer = make_napari_viewer()
    image, truth = disc_scene(seed=8, dark=False)
    viewer.add_image(image, name="im")
    viewer.add_labels(truth, name="im labels")
    seg = make_widget(viewer, tiny_model)
    retrain = make_retrain(viewer, epochs=1000, steps=5)
    retrain.minutes_spin.setValue(0.1)  # 6 s for 5000 steps
    retrain.set_checked("im labels")
    assert seg.store.current.name == "tiny.pt"
    _wait(qtbot, retrain, retrain.start_training())
    status = retrain.progress.status.text()
    head = status.split(":")[0]
    assert head.startswith("stopped at the 6-second limit after ") and head.endswith(
        " of 5000 steps"
    )
    steps = int(head.split(" after ")[1].split(" of ")[0])
    assert 0 < steps < 5000 and "fine-tuned 1" in status


# --------------------------------------------------------------------------- folder batch


def _write_folder(folder):
    folder.mkdir()
    for i in range(3):
        img, _ = disc_image((96, 96), centres=((24, 24), (70, 60), (30, 72)), radius=7,
                            seed=20 + i)  # fmt: skip
        tifffile.imwrite(folder / f"img{i}.tif", img)
    (folder / "broken.tif").write_bytes(b"not a TIFF at all")
    return sorted(p.name for p in folder.iterdir())


def test_segment_a_folder_as_the_command_line_does(
    make_napari_viewer, qtbot, tiny_model, tmp_path, messages
):
    import torch

    from napari_sagegan.cli import main

    folder, out = tmp_path / "raw", tmp_path / "out"
    inputs = _write_folder(folder)
    viewer = make_napari_viewer()
    widget = make_widget(viewer, tiny_model)
    widget.threads = torch.get_num_threads()  # as the command line, for identical numbers
    widget.folder_box.setChecked(True)
    assert widget.run_folder() is None  # no folders chosen yet: said, not started
    assert "Choose an input folder" in messages()[-1][1]
    widget.input_edit.setText(str(folder))
    widget.output_edit.setText(str(folder))
    _wait(qtbot, widget, widget.run_folder())
    assert "output folder is the input folder" in messages()[-1][1]
    assert sorted(p.name for p in folder.iterdir()) == inputs  # nothing written there

    widget.output_edit.setText(str(out))
    seen = []
    worker = widget.run_folder()
    worker.yielded.connect(lambda ev: seen.append(ev))
    _wait(qtbot, widget, worker)
    assert len(viewer.layers) == 0  # nothing opened in the viewer
    report = widget.folder_report
    assert [name for name, _ in report.done] == ["img0.tif", "img1.tif", "img2.tif"]
    assert [name for name, _ in report.failed] == ["broken.tif"]
    status = widget.progress.status.text()
    assert status.startswith("3 of 4 images segmented (") and "1 failed" in status
    assert "broken.tif: failed: " in widget.result_label.text()
    assert any("1 image(s) could not be segmented (broken.tif)" in t for _, t in messages())
    tiles = [ev for ev in seen if ev.stage == "tiles"]
    assert tiles and all(ev.total == 4 for ev in tiles) and tiles[-1].eta_s is not None
    fractions = [ev.data["fraction"] for ev in tiles]
    assert fractions == sorted(fractions) and 2 < fractions[-1] <= 4

    # the same files as `sagegan segment --csv` on the readable images
    cli_out = tmp_path / "cli"
    good = [str(folder / f"img{i}.tif") for i in range(3)]
    assert main(["segment", *good, "--out", str(cli_out), "--csv", "--model",
                 str(tiny_model), "--device", "cpu",
                 "--tile-size", str(widget.tile_spin.value())]) == 0  # fmt: skip
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.name for p in cli_out.iterdir())
    assert {"img0.tif", "img0.csv", "img0.summary.json", "segment_report.json"} <= set(written)
    for i in range(3):
        assert np.array_equal(
            tifffile.imread(out / f"img{i}.tif"), tifffile.imread(cli_out / f"img{i}.tif")
        )
        assert (out / f"img{i}.csv").read_text() == (cli_out / f"img{i}.csv").read_text()
    ours = json.loads((out / "segment_report.json").read_text())
    theirs = json.loads((cli_out / "segment_report.json").read_text())
    assert ours["images"] == theirs["images"] and ours["format"] == theirs["format"]
    assert ours["model"] == theirs["model"] == str(tiny_model)
    assert [f["file"] for f in ours["failed"]] == ["broken.tif"] and not ours["cancelled"]


def test_cancelling_a_folder_keeps_the_images_done(make_napari_viewer, qtbot, tiny_model, tmp_path):
    folder, out = tmp_path / "raw", tmp_path / "out"
    _write_folder(folder)
    viewer = make_napari_viewer()
    widget = make_widget(viewer, tiny_model)
    widget.input_edit.setText(str(folder))
    widget.output_edit.setText(str(out))
    worker = widget.run_folder()
    # cancel as soon as the second image (img0.tif, after broken.tif) is written
    worker.yielded.connect(
        lambda ev: ev.stage == "image" and "result" in ev.data and widget.cancel()
    )
    _wait(qtbot, widget, worker)
    status = widget.progress.status.text()
    assert status.startswith("cancelled: 1 image segmented, 1 failed -> ")
    assert sorted(p.name for p in out.iterdir()) == [
        "img0.csv", "img0.summary.json", "img0.tif", "segment_report.json"]  # fmt: skip
    report = json.loads((out / "segment_report.json").read_text())
    assert [e["file"] for e in report["images"]] == ["img0.tif"] and report["cancelled"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left
