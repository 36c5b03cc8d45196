"""The "Correct and retrain" dock widget: fine-tune the current model on corrected layers."""

from __future__ import annotations

from typing import Any

from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.napari import tasks as _tasks
from napari_sagegan.napari._qt.common import (
    CurvePlot,
    DockBase,
    ProgressPanel,
    notify_error,
    notify_info,
    notify_warning,
)
from napari_sagegan.napari._qt.segment import DEVICES, add_result_layers

_ROLE_LABELS = Qt.ItemDataRole.UserRole


class RetrainWidget(DockBase):
    """Fine-tune the current model on the (image, labels) pairs corrected in the viewer.

    The list shows every Labels layer whose image is open; the ones edited since Segment
    made them are ticked. Fine-tuning runs in a worker with an epoch and a time budget and
    plots the loss and the validation scores live; Cancel keeps the best model so far.
    The new model becomes the current one (the Segment widget uses it too); the previous
    one is kept ("Use previous model" swaps back). Nothing is written to disk unless
    "Save model..." is used.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        _tasks.warm_up(training=True)  # imports now, not inside the worker (GUI stalls)
        self.store = _tasks.model_store(napari_viewer)
        #: Torch threads while the GUI is open: all cores but one (see _tasks.gui_threads).
        self.threads: int | None = _tasks.gui_threads()
        self.tune: _tasks.FineTune | None = None
        #: Further TrainConfig fields for scripts (e.g. ``{"augment_p": 0.0}``).
        self.train_extra: dict = {}

        self.pair_list = QListWidget()
        self.pair_list.setToolTip(
            "Tick the Labels layers to learn from (edited ones are ticked for you)"
        )
        self.pair_list.setMinimumHeight(60)
        self.pair_list.setMaximumHeight(120)
        self.pair_list.setWordWrap(True)
        self.refresh_button = QPushButton("Refresh")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("optional: folder of image + mask files")
        self.folder_edit.setToolTip(
            "Extra pairs from disk: each mask named like its image (a.tif + a_mask.tif)"
        )
        self.folder_button = QPushButton("Browse...")
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
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.train_button = QPushButton("Fine-tune")
        self.progress = ProgressPanel()
        self.plot = CurvePlot()
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.resegment_button = QPushButton("Re-segment")
        self.resegment_button.setToolTip("Segment the listed images again with the current model")
        self.previous_button = QPushButton("Use previous model")
        self.save_button = QPushButton("Save model...")

        pairs_head = QHBoxLayout()
        pairs_head.addWidget(QLabel("Training pairs"), 1)
        pairs_head.addWidget(self.refresh_button)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.folder_button)
        budget = QHBoxLayout()
        budget.addWidget(self.epochs_spin)
        budget.addWidget(QLabel("epochs, at most"))
        budget.addWidget(self.minutes_spin)
        form = QFormLayout()
        form.addRow("Extra pairs", folder_row)
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
        lay.addLayout(pairs_head)
        lay.addWidget(self.pair_list)
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

        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(300)
        self._refresh_timer.timeout.connect(self.refresh_pairs)
        self.refresh_button.clicked.connect(self.refresh_pairs)
        self.folder_button.clicked.connect(self._folder_dialog)
        self.train_button.clicked.connect(self.start_training)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.resegment_button.clicked.connect(self.resegment)
        self.previous_button.clicked.connect(self.use_previous)
        self.save_button.clicked.connect(self._save_dialog)
        layers = napari_viewer.layers
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self._schedule_refresh)
        for layer in layers:
            self._watch(layer)
        self.store.subscribe(self._refresh_model_label)
        self.refresh_pairs()
        self._refresh_model_label()

    # ------------------------------------------------------------------ pairs
    def _watch(self, layer: Any) -> None:
        if isinstance(layer, Labels):
            layer.events.paint.connect(self._schedule_refresh)
            layer.events.data.connect(self._schedule_refresh)

    def _on_inserted(self, event: Any) -> None:
        self._watch(event.value)
        self._schedule_refresh()

    def _schedule_refresh(self, *_: Any) -> None:
        try:
            self._refresh_timer.start()
        except RuntimeError:  # deleted widget
            pass

    def candidate_pairs(self) -> list[tuple[Labels, Image | None, bool | None]]:
        """``(labels layer, its image layer or None, edited)`` for every Labels layer."""
        out = []
        for layer in self.viewer.layers:
            if not isinstance(layer, Labels):
                continue
            name = _tasks.source_image_name(layer)
            image = self.viewer.layers[name] if name and name in self.viewer.layers else None
            if image is not None and not isinstance(image, Image):
                image = None
            out.append((layer, image, _tasks.is_edited(layer)))
        return out

    def refresh_pairs(self) -> None:
        """List the pairs; keep the user's ticks, tick the newly edited layers."""
        ticked = {
            self.pair_list.item(i).data(_ROLE_LABELS): self.pair_list.item(i).checkState()
            for i in range(self.pair_list.count())
        }
        self.pair_list.clear()
        for labels, image, edited in self.candidate_pairs():
            if image is None:
                continue
            note = {True: "  (edited)", False: "", None: ""}[edited]
            text = labels.name + note
            if not labels.name.startswith(image.name):
                text += f"  (image: {image.name})"
            item = QListWidgetItem(text)
            item.setToolTip(f"Labels layer {labels.name!r} on image {image.name!r}")
            item.setData(_ROLE_LABELS, labels.name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            state = Qt.CheckState.Checked if edited else Qt.CheckState.Unchecked
            if labels.name in ticked and not (edited and ticked[labels.name] != state):
                state = ticked[labels.name]
            item.setCheckState(state)
            self.pair_list.addItem(item)

    def set_checked(self, labels_name: str, checked: bool = True) -> None:
        """Tick or untick a pair by its Labels layer name."""
        for i in range(self.pair_list.count()):
            item = self.pair_list.item(i)
            if item.data(_ROLE_LABELS) == labels_name:
                item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)

    def checked_labels(self) -> list[str]:
        return [
            self.pair_list.item(i).data(_ROLE_LABELS)
            for i in range(self.pair_list.count())
            if self.pair_list.item(i).checkState() == Qt.CheckState.Checked
        ]

    def _folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of image + mask pairs")
        if path:
            self.folder_edit.setText(path)

    def gather_pairs(self) -> list[_tasks.TrainingPair] | None:
        """The ticked pairs, checked; ``None`` (and a notification) when one is unusable."""
        pairs = []
        for name in self.checked_labels():
            if name not in self.viewer.layers:
                continue
            labels = self.viewer.layers[name]
            image_name = _tasks.source_image_name(labels)
            if image_name not in self.viewer.layers:
                continue
            image = self.viewer.layers[image_name]
            pair = _tasks.TrainingPair(f"{name!r} on {image.name!r}", image.data, labels.data)
            try:
                _tasks.check_image_data(image.name, image.data, rgb=image.rgb)
                _tasks.check_pair(pair)
            except ValueError as err:
                notify_error(str(err))
                return None
            pairs.append(pair)
        return pairs

    # ------------------------------------------------------------------ training
    def train_config(self) -> Any:
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

    def start_training(self) -> Any:
        """Fine-tune the current model (the button); returns the worker or ``None``."""
        if self.is_running:
            return None
        self.refresh_pairs()
        pairs = self.gather_pairs()
        if pairs is None:
            return None
        folder = self.folder_edit.text().strip() or None
        if not pairs and folder is None:
            notify_warning(
                "No training pairs. Segment an image, correct its Labels layer (paint, erase, "
                "fill), then tick it here - or choose a folder of image/mask pairs."
            )
            return None
        base = self.store.current
        try:
            base.check_available()
        except FileNotFoundError as err:
            notify_error(str(err))
            return None
        self.tune = _tasks.FineTune(
            base,
            pairs,
            self.train_config(),
            folder=(folder, None) if folder else None,
            device=self.device_combo.currentText(),
            threads=self.threads,
        )
        self.plot.clear()
        self._spe = max(1, int(self.steps_spin.value()))
        self.progress.start(f"fine-tuning {base.name} ...")
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
        self.progress.update_progress(ev.step, ev.total, ev.eta_s, ev.message)

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
        """Segment the images of the ticked pairs again with the current model."""
        if self.is_running:
            return None
        names = []
        for labels_name in self.checked_labels() or [
            self.pair_list.item(i).data(_ROLE_LABELS) for i in range(self.pair_list.count())
        ]:
            if labels_name in self.viewer.layers:
                image = _tasks.source_image_name(self.viewer.layers[labels_name])
                if image in self.viewer.layers and image not in names:
                    names.append(image)
        if not names:
            notify_warning("No image to re-segment: segment an image first (Segment widget).")
            return None
        try:
            inputs = [_tasks.image_input(self.viewer.layers[n]) for n in names]
            self.store.current.check_available()
        except (ValueError, FileNotFoundError) as err:
            notify_error(str(err))
            return None
        self.progress.start(f"re-segmenting with {self.store.current.name} ...")
        gen = _tasks.segment_images(
            self.store.current,
            inputs,
            device=self.device_combo.currentText(),
            threads=self.threads,
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
        self.progress.update_progress(ev.step, ev.total, ev.eta_s, ev.message)
