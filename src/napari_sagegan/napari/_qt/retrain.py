"""The "Correct and retrain" dock: fine-tune the current model on corrected layers.

Thin: the pair list is a view of the viewer's retraining set
(:class:`~napari_sagegan.napari._qt.parts.PairPicker`), :meth:`RetrainWidget.arguments`
gathers the values, and :class:`~napari_sagegan.napari.jobs.FineTune` (over
:func:`napari_sagegan.api.fine_tune`) does the work; the new model joins the viewer's
models (:class:`~napari_sagegan.napari.state.ModelStore`).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.napari import jobs
from napari_sagegan.napari._qt.common import ModelDock, notify_error, notify_info, notify_warning
from napari_sagegan.napari._qt.parts import PairPicker, ProgressPanel, device_combo, edited_text
from napari_sagegan.napari._qt.plots import CurvePlot
from napari_sagegan.napari.layers import (
    add_result_layers,
    image_input,
    source_image_name,
)


class RetrainWidget(ModelDock):
    """Fine-tune the current model on the (image, labels) pairs corrected in the viewer.

    The list shows every Labels layer whose image is open; the ones edited since Segment
    made them are ticked. Fine-tuning runs in a worker with an epoch and a time budget and
    plots the loss and the validation scores live; Cancel keeps the best model so far.
    The new model becomes the current one (the Segment widget uses it too); the previous
    one is kept ("Use previous model" swaps back). Nothing is written to disk unless
    "Save model..." is used.
    """

    training = True

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.tune: jobs.FineTune | None = None
        #: Further TrainConfig fields for scripts (e.g. ``{"augment_p": 0.0}``).
        self.train_extra: dict = {}

        self.pairs = PairPicker(
            napari_viewer, self.state.retrain_set, text=edited_text, watch_edits=True
        )
        self.pair_list = self.pairs.list
        self.pair_list.setToolTip(
            "Tick the Labels layers to learn from (edited ones are ticked for you)"
        )
        self.pair_list.setMinimumHeight(60)
        self.pair_list.setMaximumHeight(120)
        self.pair_list.setWordWrap(True)
        self.folder_edit = self.pairs.folder_edit
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(10)
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 600.0)
        self.minutes_spin.setValue(5.0)
        self.minutes_spin.setSuffix(" min")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 10000)
        self.steps_spin.setValue(10)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(0.00001, 0.01)
        self.lr_spin.setSingleStep(0.0001)
        self.lr_spin.setValue(0.0002)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 1024)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setValue(128)
        self.patch_spin.setSuffix(" px")
        self.patch_spin.setToolTip(
            "Training patch side, in pixels at the model's network scale (particles about "
            "32 px across for the bundled model)"
        )
        self.device_combo = device_combo()
        self.train_button = QPushButton("Fine-tune")
        self.progress = ProgressPanel()
        self.plot = CurvePlot()
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.resegment_button = QPushButton("Re-segment")
        self.resegment_button.setToolTip("Segment the listed images again with the current model")
        self.previous_button = QPushButton("Use previous model")
        self.save_button = QPushButton("Save model...")

        budget = QHBoxLayout()
        budget.addWidget(self.epochs_spin)
        budget.addWidget(QLabel("epochs, at most"))
        budget.addWidget(self.minutes_spin)
        form = QFormLayout()
        form.addRow("Extra pairs", self.pairs.folder_row)
        form.addRow("Budget", budget)
        form.addRow("Steps / epoch", self.steps_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Patch size", self.patch_spin)
        form.addRow("Device", self.device_combo)
        after = QHBoxLayout()
        after.addWidget(self.resegment_button)
        after.addWidget(self.previous_button)
        after.addWidget(self.save_button)
        lay = QVBoxLayout(self)
        lay.addWidget(self.pairs)
        lay.addLayout(form)
        lay.addWidget(self.train_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.model_label)
        lay.addLayout(after)
        self._busy_widgets = [
            self.train_button,
            self.resegment_button,
            self.previous_button,
            self.save_button,
        ]

        self.train_button.clicked.connect(self.start_training)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.resegment_button.clicked.connect(self.resegment)
        self.previous_button.clicked.connect(self.use_previous)
        self.save_button.clicked.connect(self._save_dialog)
        self.store.subscribe(self._refresh_model_label)
        self._refresh_model_label()

    # ------------------------------------------------------------------ pairs
    def refresh_pairs(self) -> None:
        """List the pairs again (the ticks are the viewer's retraining set)."""
        self.pairs.refresh()

    def set_checked(self, labels_name: str, checked: bool = True) -> None:
        """Tick or untick a pair by its Labels layer name."""
        self.pairs.set_checked(labels_name, checked)

    def checked_labels(self) -> list[str]:
        return self.pairs.checked_labels()

    # ------------------------------------------------------------------ training
    def train_config(self) -> Any:
        """The :class:`~napari_sagegan.engine.config.TrainConfig` set in the widget."""
        from napari_sagegan.engine.config import TrainConfig

        return TrainConfig(
            epochs=int(self.epochs_spin.value()),
            max_minutes=float(self.minutes_spin.value()),
            steps_per_epoch=int(self.steps_spin.value()),
            lr=float(self.lr_spin.value()),
            patch_size=int(self.patch_spin.value()),
            batch_size=4,
            val_fraction=0.2,
            seed=0,
            **self.train_extra,
        )

    def arguments(self) -> dict | None:
        """The widget's values as the arguments of :class:`~napari_sagegan.napari.jobs.
        FineTune`; ``None`` (and a notification) when it cannot start."""
        return self.training_arguments(
            self.pairs,
            self.store.current,
            self.train_config,
            "No training pairs. Segment an image, correct its Labels layer (paint, erase, "
            "fill), then tick it here - or choose a folder of image/mask pairs.",
        )

    def start_training(self) -> Any:
        """Fine-tune the current model (the button); returns the worker or ``None``."""
        if self.is_running:
            return None
        args = self.arguments()
        if args is None:
            return None
        self.tune = jobs.FineTune(**args)
        self.plot.clear()
        self._spe = max(1, int(self.steps_spin.value()))
        self.progress.start(f"fine-tuning {args['base'].name} ...")
        return self.run_task(
            self.tune.run(),
            on_yield=self._on_progress,
            on_return=lambda _: None,
            on_done=self._on_training_done,
        )

    def _on_progress(self, ev: Any) -> None:
        if ev.stage == "train":
            self.plot.add_step(ev.step / self._spe, float(ev.data.get("loss", float("nan"))))
        elif ev.stage == "validate":
            self.plot.add_epoch(float(ev.data["epoch"]), ev.data)
        self.progress.show(ev)

    def _on_training_done(self, status: str) -> None:
        tune = self.tune
        ckpt = tune.result() if tune is not None else None
        self.tune = None  # free the training data and the optimiser
        if status == "error" or ckpt is None:
            text = "failed" if status == "error" else "stopped before the first epoch ended"
            self.progress.finish(f"{text}; the model is unchanged")
            return
        entry = self.store.add_tuned(ckpt)
        m = entry.metrics
        score = (
            f"val Dice {m['dice']:.3f}, F1@0.5 {m['f1@0.5']:.3f}"
            if "dice" in m
            else "no validation (one image): the last model is kept"
        )
        how = "cancelled, best model kept" if status == "cancelled" else "done"
        self.progress.finish(f"{how}: {entry.name} ({score})")

    # ------------------------------------------------------------------ after training
    def _set_busy(self, busy: bool) -> None:
        super()._set_busy(busy)
        if not busy:
            self._refresh_model_label()

    def _refresh_model_label(self) -> None:
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
        :class:`~napari_sagegan.napari.state.ParticleSize`; estimated when not set)."""
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
        self.progress.start(f"re-segmenting with {self.store.current.name} ...")
        gen = jobs.segment_layers(
            self.store.current,
            inputs,
            device=self.device_combo.currentText(),
            threads=self.threads,
            **size,
        )
        return self.run_task(
            gen,
            on_yield=self._on_segment_progress,
            on_return=lambda _: None,
            on_done=lambda status: self.progress.finish(
                {"done": "re-segmented", "cancelled": "cancelled", "error": "failed"}[status]
            ),
        )

    def _on_segment_progress(self, ev: Any) -> None:
        if ev.stage == "image":
            add_result_layers(self.viewer, ev.data["result"])
        self.progress.show(ev)
