"""The Correct-and-retrain dock widget in a real napari viewer (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sagegan.engine.analysis.metrics import evaluate_pair
from napari_sagegan.engine.checkpoint import load_segmenter
from test_tasks import disc_scene, trained_checkpoint
from test_widgets_segment import TIMEOUT, make_widget, notifications, run_and_wait

pytestmark = pytest.mark.gui


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture
def messages():
    return notifications()


def make_retrain(viewer, **spins):
    from napari_sagegan.napari._qt.retrain import RetrainWidget

    widget = RetrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Correct and retrain")
    widget.device_combo.setCurrentText("cpu")
    widget.epochs_spin.setValue(spins.get("epochs", 3))
    widget.steps_spin.setValue(spins.get("steps", 8))
    widget.lr_spin.setValue(0.003)
    widget.patch_spin.setValue(64)
    widget.train_extra = {"augment_p": 0.0, "min_instance_area": 5}
    return widget


def wait(qtbot, widget, worker):
    """Wait until the widget's task ended (its finished handler, connected before the start,
    has run: waiting on worker.finished here could miss a task that ends at once)."""
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)


def test_retrain_on_a_corrected_layer(make_napari_viewer, qtbot, tiny_model, tmp_path):
    viewer = make_napari_viewer()
    # bright particles: the disc model was trained on dark ones and misses them
    image, truth = disc_scene(seed=7, dark=False)
    viewer.add_image(image, name="bright", scale=(0.5, 0.5))
    seg = make_widget(viewer, tiny_model)
    retrain = make_retrain(viewer)
    run_and_wait(qtbot, seg)
    layer = viewer.layers["bright labels"]
    before = evaluate_pair(layer.data, truth)
    qtbot.waitUntil(lambda: retrain.pair_list.count() == 1, timeout=3000)
    assert retrain.checked_labels() == []  # not edited yet

    layer.data = truth.astype(layer.data.dtype)  # the user's correction
    qtbot.waitUntil(lambda: retrain.checked_labels() == ["bright labels"], timeout=3000)
    assert "(edited)" in retrain.pair_list.item(0).text()

    base = retrain.store.current
    wait(qtbot, retrain, retrain.start_training())
    tuned = retrain.store.current
    assert tuned.name == "fine-tuned 1" and retrain.store.previous is base
    changed = [
        not torch.equal(v.float(), base.ckpt["state_dict"][k].float())
        for k, v in tuned.ckpt["state_dict"].items()
        if v.is_floating_point()
    ]
    assert any(changed)
    assert len(retrain.plot.step_loss) == 24 and len(retrain.plot.epoch_loss) == 3
    assert seg.model_combo.currentText() == "fine-tuned 1"  # shared with Segment

    wait(qtbot, retrain, retrain.resegment())
    # the corrected layer is kept; the new segmentation comes beside it
    assert np.array_equal(viewer.layers["bright labels"].data, truth)
    new = viewer.layers["bright labels [1]"]
    after = evaluate_pair(new.data, truth)
    assert after["dice"] > before["dice"] + 0.3 and after["f1@0.5"] > before["f1@0.5"]
    assert tuple(new.scale) == (0.5, 0.5)

    saved = retrain.save_model(str(tmp_path / "tuned.pt"))
    model, _ = load_segmenter(saved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tuned.ckpt["state_dict"][k].float()), k

    retrain.use_previous()  # roll back
    assert retrain.store.current is base and seg.model_combo.currentText() == "tiny.pt"
    assert "previous: fine-tuned 1" in retrain.model_label.text()


def test_cancel_keeps_the_best_model_so_far(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    image, truth = disc_scene(seed=8, dark=False)
    viewer.add_image(image, name="im")
    viewer.add_labels(truth, name="im labels")  # painted by hand: listed, ticked by the user
    seg = make_widget(viewer, tiny_model)
    retrain = make_retrain(viewer, epochs=100, steps=3)
    # no warm-up over the long budget (the few-shot recipe's), so that three epochs suffice
    retrain.train_extra["recipe"] = "none"
    retrain.set_checked("im labels")
    base = seg.store.current

    # Cancel during the first epoch: nothing to keep, the model is unchanged
    worker = retrain.start_training()
    worker.yielded.connect(lambda ev: ev.stage == "train" and retrain.cancel())
    wait(qtbot, retrain, worker)
    assert retrain.store.current is base
    assert "before the first epoch ended" in retrain.progress.status.text()
    assert retrain.train_button.isEnabled()

    # Cancel after three epochs: the best model so far (better than the base on the
    # held-out part by then) becomes the current one
    worker = retrain.start_training()
    assert retrain.start_training() is None  # a second click does nothing
    worker.yielded.connect(
        lambda ev: ev.stage == "validate" and ev.data["epoch"] >= 3 and retrain.cancel()
    )
    wait(qtbot, retrain, worker)
    assert retrain.store.current.name == "fine-tuned 1"
    assert retrain.store.current.ckpt["epoch"] == 3
    assert retrain.progress.status.text().startswith("cancelled, best model kept")
    # with both scores on the held-out part (issue 14)
    assert "kept the fine-tuned model: fine-tuned F1@0.5" in retrain.progress.status.text()
    assert retrain.train_button.isEnabled() and retrain.previous_button.isEnabled()


def test_bad_training_inputs_are_reported(make_napari_viewer, qtbot, messages, tiny_model):
    viewer = make_napari_viewer()
    retrain = make_retrain(viewer)
    assert retrain.start_training() is None  # no layers at all
    assert "No training pairs" in messages()[-1][1]

    image, truth = disc_scene()
    viewer.add_image(image, name="a")
    viewer.add_labels(truth[:64, :64], name="a labels")  # does not cover its image
    viewer.add_image(image, name="b")
    viewer.add_labels(np.zeros_like(truth), name="b labels")  # nothing painted
    retrain.refresh_pairs()
    retrain.set_checked("a labels")
    assert retrain.start_training() is None
    assert messages()[-1][0] == "error" and "shape (64, 64)" in messages()[-1][1]
    retrain.set_checked("a labels", False)
    retrain.set_checked("b labels")
    assert retrain.start_training() is None
    assert "no particle" in messages()[-1][1] and "paint" in messages()[-1][1]
    # an error inside the worker (a folder that does not exist) becomes a notification
    retrain.store.add_file(tiny_model)
    retrain.set_checked("b labels", False)
    retrain.folder_edit.setText(str(tiny_model.parent / "missing"))
    wait(qtbot, retrain, retrain.start_training())
    assert messages()[-1][0] == "error" and "does not exist" in messages()[-1][1]
    assert retrain.progress.status.text() == "failed; the model is unchanged"
    assert retrain.store.current.name == "tiny.pt" and retrain.train_button.isEnabled()


def test_resegment_uses_the_segment_docks_particle_size(
    make_napari_viewer, qtbot, tiny_model, messages
):
    """Issue 12: Re-segment segments at the particle size set in Segment (the viewer's
    setting), in px or in nm, and refuses nm on an image without a pixel size."""
    from napari_sagegan.napari.state import viewer_state

    viewer = make_napari_viewer()
    image, truth = disc_scene()  # discs 17 px across
    viewer.add_image(image, name="discs", scale=(0.5, 0.5), units="nm")
    viewer.add_labels(truth, name="discs labels")
    seg = make_widget(viewer, tiny_model)
    retrain = make_retrain(viewer)

    def resegment():
        seen = []
        worker = retrain.resegment()
        assert worker is not None
        worker.yielded.connect(lambda ev: ev.stage == "image" and seen.append(ev.data["result"]))
        wait(qtbot, retrain, worker)
        (result,) = seen
        return result

    seg.diameter_spin.setValue(17.0)  # px
    assert viewer_state(viewer).particle_size.value == 17.0
    result = resegment()
    assert result.scale.source == "user" and result.scale.diameter == 17.0
    assert result.n_particles == 8 and evaluate_pair(result.labels, truth)["f1@0.5"] == 1.0
    seg.diameter_unit.setCurrentText("nm")
    seg.diameter_spin.setValue(8.5)  # nm: 17 px at 0.5 nm / px
    result = resegment()
    assert result.scale.source == "user" and result.scale.diameter == 17.0
    # the test-time views set in Segment: the particles' confidences are the views' maps'
    from napari_sagegan.engine.infer.segment import Segmenter
    from napari_sagegan.util.progress import run_to_end

    one = np.asarray(result.features["confidence"])
    seg.tta_combo.setCurrentIndex(3)
    assert viewer_state(viewer).views.views == 8
    result = resegment()
    engine = Segmenter.load(str(tiny_model), device="cpu")
    want = run_to_end(engine.segment(image, engine.default_infer_config(diameter=17.0, tta=8)))
    np.testing.assert_allclose(result.features["confidence"], want.confidence[1:], atol=1e-6)
    assert np.abs(np.asarray(result.features["confidence"]) - one).max() > 1e-4
    seg.tta_combo.setCurrentIndex(0)
    seg.diameter_spin.setValue(0.0)  # auto: estimated, as in Segment
    result = resegment()
    assert result.scale.source in ("network", "estimate")

    # nm on an image without a pixel size: said, not started
    viewer.layers.clear()
    viewer.add_image(image, name="plain")
    viewer.add_labels(truth, name="plain labels")
    retrain.refresh_pairs()
    seg.diameter_spin.setValue(8.5)
    assert retrain.resegment() is None and not retrain.is_running
    assert messages()[-1][0] == "error" and "pixel size of 'plain' is unknown" in messages()[-1][1]
