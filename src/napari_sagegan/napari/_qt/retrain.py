"""The "Correct and retrain" dock: fine-tune the current model on corrected layers.

Thin: the pair list is a view of the viewer's retraining set
(:class:`~napari_sagegan.napari._qt.parts.PairPicker`), :meth:`RetrainWidget.arguments`
gathers the values, and :class:`~napari_sagegan.napari.jobs.FineTune` (over
:func:`napari_sagegan.api.fine_tune`) does the work; the new model joins the viewer's
models (:class:`~napari_sagegan.napari.state.ModelStore`).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QFileDialog, QLabel, QPushButton, QWidget

from napari_sagegan.napari import jobs
from napari_sagegan.napari._qt.common import notify_error, notify_info, notify_warning
from napari_sagegan.napari._qt.parts import (
    add_result,
    button_row,
    double_spin_box,
    edited_text,
    push_button,
    score_text,
    spin_box,
    text_label,
)
from napari_sagegan.napari._qt.plots import CurvePlot
from napari_sagegan.napari._qt.training import TrainingDock
from napari_sagegan.napari.layers import image_input, source_image_name


class RetrainWidget(TrainingDock):
    """Fine-tune the current model on the (image, labels) pairs corrected in the viewer.

    The list shows every Labels layer whose image is open; the ones edited since Segment
    made them are ticked. Fine-tuning runs in a worker with an epoch and a time budget and
    plots the loss and the validation scores live; Cancel keeps the best model so far.
    The new model becomes the current one (the Segment widget uses it too); the previous
    one is kept ("Use previous model" swaps back). Nothing is written to disk unless
    "Save model..." is used.
    """

    job = jobs.FineTune
    training_set = "retrain_set"
    picker = {"text": edited_text, "watch_edits": True}
    plot_class = CurvePlot
    train_text = "Fine-tune"
    patch_max = 1024
    start_words = "fine-tuning {base} ..."
    no_pairs = (
        "No training pairs. Segment an image, correct its Labels layer (paint, erase, fill), "
        "then tick it here - or choose a folder of image/mask pairs."
    )
    unchanged = "the model is unchanged"
    too_early = "stopped before the first epoch ended"
    cancelled_kept = "cancelled, best model kept"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        #: Further TrainConfig fields for scripts (e.g. ``{"augment_p": 0.0}``).
        self.train_extra: dict = {}

        self.pair_list.setToolTip(
            "Tick the Labels layers to learn from (edited ones are ticked for you)"
        )
        self.pair_list.setMinimumHeight(60)
        self.pair_list.setMaximumHeight(120)
        self.pair_list.setWordWrap(True)
        self.epochs_spin = spin_box(1, 1000, 10)
        self.minutes_spin = double_spin_box(0.1, 600.0, 5.0, suffix=" min")
        self.steps_spin = spin_box(1, 10000, 10)
        self.lr_spin = double_spin_box(0.00001, 0.01, 0.0002, decimals=5, step=0.0001)
        self.patch_spin.setToolTip(
            "Training patch side, in pixels at the model's network scale (particles about "
            "32 px across for the bundled model)"
        )
        self.model_label = text_label()
        self.result_label = text_label()
        self.resegment_button = push_button(
            "Re-segment",
            "Segment the images of the ticked pairs again with the current model; the "
            "corrected layers are kept ('Results' in Segment: new layers, or replace the "
            "unedited ones)",
        )
        self.previous_button = QPushButton("Use previous model")
        self.save_button = QPushButton("Save model...")

        budget = button_row(self.epochs_spin, QLabel("epochs, at most"), self.minutes_spin)
        form = self.training_form(
            ("Budget", budget),
            ("Steps / epoch", self.steps_spin),
            ("Learning rate", self.lr_spin),
        )
        after = button_row(self.resegment_button, self.previous_button, self.save_button)
        self.training_layout(form, self.model_label, after, self.result_label)
        self._busy_widgets = [
            self.train_button,
            self.resegment_button,
            self.previous_button,
            self.save_button,
        ]
        self.resegment_button.clicked.connect(self.resegment)
        self.previous_button.clicked.connect(self.use_previous)
        self.save_button.clicked.connect(self._save_dialog)
        self.store.subscribe(self.refresh_buttons)
        self.refresh_buttons()

    # ------------------------------------------------------------------ training
    def config(self) -> Any:
        """The :class:`~napari_sagegan.engine.config.TrainConfig` set in the widget."""
        from napari_sagegan.engine.config import TrainConfig

        values = dict(
            epochs=int(self.epochs_spin.value()),
            max_minutes=float(self.minutes_spin.value()),
            steps_per_epoch=int(self.steps_spin.value()),
            lr=float(self.lr_spin.value()),
            patch_size=int(self.patch_spin.value()),
            batch_size=4,
            val_fraction=0.2,
            seed=0,
        )
        return TrainConfig(**{**values, **self.train_extra})

    def base_model(self) -> Any:
        """The current model (the one fine-tuned)."""
        return self.store.current

    def show_training_event(self, ev: Any) -> None:
        if ev.stage == "train":
            spe = max(1, int(self.task.config.steps_per_epoch)) if self.task else 1
            self.plot.add_step(ev.step / spe, float(ev.data.get("loss", float("nan"))))
        elif ev.stage == "validate":
            self.plot.add_epoch(float(ev.data["epoch"]), ev.data)

    def trained(self, task: Any, ckpt: Any) -> str:
        """Keep the new model, unless it does not beat the starting model on the validation
        parts: then the starting model stays (with re-calibrated thresholds when they alone
        are better), and the line says so with both scores."""
        decision = task.decision()
        said = task.decision_text()
        self.result_label.setText("\n".join(t for t in (task.used, said) if t))
        if decision is not None and decision["kept"] == "starting model":
            return f"{self.store.current.name} stays the current model; {said}"
        kept = decision["kept"] if decision else "fine-tuned"
        kind = kept if kept in ("fine-tuned", "blended") else "re-calibrated"
        entry = self.store.add_tuned(ckpt, kind)
        score = score_text(entry.metrics) or "no validation: the last model is kept"
        return f"{entry.name} ({score})" + (f"; {said}" if said else "")

    # ------------------------------------------------------------------ after training
    def refresh_buttons(self) -> None:
        """Show the current and previous model; enable "Use previous model" if there is one."""
        try:
            prev = self.store.previous.name if self.store.previous else "none"
            self.model_label.setText(
                f"Current model: {self.store.current.name}  ·  previous: {prev}"
            )
            self.previous_button.setEnabled(self.store.previous is not None and not self.is_running)
        except RuntimeError:  # deleted widget
            pass

    def use_previous(self) -> None:
        """Swap back to the previous model (and forth again)."""
        try:
            entry = self.store.use_previous()
        except ValueError as err:
            notify_warning(str(err))
            return
        notify_info(f"current model: {entry.name}")

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the current model", f"{self.store.current.name}.pt", "Model (*.pt)"
        )
        if path:
            self.save_model(path)

    def save_model(self, path: str) -> Any:
        """Write the current model as a checkpoint file; returns the path or ``None``."""
        try:
            out = self.store.current.save(path)
        except (OSError, ValueError) as err:
            notify_error(f"cannot save the model: {err}")
            return None
        notify_info(f"model saved to {out}")
        return out

    def resegment(self) -> Any:
        """Segment the images of the ticked pairs again with the current model, at the
        particle size set in the Segment dock (the viewer's
        :class:`~napari_sagegan.napari.state.ParticleSize`; estimated when not set). The
        new layers follow the viewer's "Results" setting
        (:class:`~napari_sagegan.napari.state.ResultLayers`); corrected layers are kept."""
        if self.is_running:
            return None
        names = []
        for labels_name in self.checked_labels() or self.pairs.names():
            if labels_name in self.viewer.layers:
                image = source_image_name(self.viewer.layers[labels_name])
                if image in self.viewer.layers and image not in names:
                    names.append(image)
        if not names:
            notify_warning("No image to re-segment: segment an image first (Segment widget).")
            return None
        try:
            inputs = [image_input(self.viewer.layers[n]) for n in names]
            # the particle size set in Segment (the viewer's setting), checked here
            size = self.state.particle_size.arguments(inputs)
            self.store.current.check_available()
        except (ValueError, FileNotFoundError) as err:
            notify_error(str(err))
            return None
        self.result_label.setText("")
        return self.run_with_progress(
            jobs.segment_layers(
                self.store.current,
                inputs,
                device=self.device_combo.currentText(),
                threads=self.threads,
                infer={"tta": self.state.views.views},  # the Segment dock's test-time views
                **size,
            ),
            f"re-segmenting with {self.store.current.name} ...",
            on_yield=self._show_result,
            done="re-segmented",
        )

    def _show_result(self, ev: Any) -> None:
        if ev.stage == "image":
            self.later(self._add_result, ev.data["result"])

    def _add_result(self, result: Any) -> None:
        """One re-segmented image into the viewer (one turn of the event loop)."""
        line = add_result(self.viewer, result, replace=self.state.results.replace)
        text = self.result_label.text()
        self.result_label.setText((text + "\n" if text else "") + line)
