"""The Correct-and-retrain dock after a few-shot fine-tune (issue 14): it says which model it
kept, with the new and the starting model's scores on the held-out parts."""

from __future__ import annotations

import pytest
import torch

from test_fewshot import scene
from test_widgets_retrain import make_retrain, tiny_model, wait  # noqa: F401  (fixture)
from test_widgets_segment import make_widget

pytestmark = pytest.mark.gui


def _number(text, after):
    """The number after ``after`` in ``text``."""
    return float(text.split(after, 1)[1].split(",")[0].split()[0].rstrip(")"))


def test_the_dock_reports_both_scores_and_keeps_the_better_model(
    make_napari_viewer,
    qtbot,
    tiny_model,  # noqa: F811
):
    viewer = make_napari_viewer()
    # labels drawn narrower than the base model draws the particles: new thresholds help
    image, labels = scene(3, narrow=True)
    viewer.add_image(image, name="im")
    viewer.add_labels(labels, name="im labels")
    seg = make_widget(viewer, tiny_model)
    retrain = make_retrain(viewer, epochs=2, steps=3)
    retrain.set_checked("im labels")
    base = seg.store.current

    wait(qtbot, retrain, retrain.start_training())
    status = retrain.progress.status.text()
    said = retrain.result_label.text()
    assert "fine-tuned F1@0.5" in said and "starting model F1@0.5" in said
    assert said.splitlines()[-1] in status
    # what was used for what
    assert said.startswith("training on 1 image (") and "held-out 20 %" in said.splitlines()[0]
    said = said.splitlines()[-1]
    current = retrain.store.current
    if said.startswith("kept the fine-tuned model"):
        assert current.name == "fine-tuned 1"
        assert _number(said, "fine-tuned F1@0.5") >= _number(said, "starting model F1@0.5")
    elif said.startswith("kept the blended model"):  # halfway between the two
        assert current.name == "blended 1" and retrain.store.previous is base
        assert _number(said, "weights) F1@0.5") >= _number(said, "starting model F1@0.5")
        state, old = current.ckpt["state_dict"], base.ckpt["state_dict"]
        assert any(not torch.equal(v, old[k]) for k, v in state.items())
    else:  # the starting model's weights with the thresholds chosen on the held-out part
        assert said.startswith("kept the starting model with re-calibrated thresholds")
        assert current.name == "re-calibrated 1" and retrain.store.previous is base
        state = current.ckpt["state_dict"]
        assert all(torch.equal(v, base.ckpt["state_dict"][k]) for k, v in state.items())
        assert current.ckpt["infer"]["threshold"] != base.ckpt["infer"]["threshold"]

    # a fine-tune that wrecks the model: the current model stays, both scores are shown
    before = retrain.store.current
    retrain.lr_spin.setValue(0.01)
    retrain.train_extra = {"augment_p": 0.0, "min_instance_area": 5, "lr": 0.5}
    wait(qtbot, retrain, retrain.start_training())
    status = retrain.progress.status.text()
    assert retrain.store.current is before
    assert f"{before.name} stays the current model" in status
    assert "kept the starting model" in status
    assert "fine-tuned F1@0.5" in status and "starting model F1@0.5" in status
