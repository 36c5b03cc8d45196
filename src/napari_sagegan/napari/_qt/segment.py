"""The "Segment" dock: pick an image (or all), a model and settings; run in a worker.

Thin: :meth:`SegmentWidget.arguments` gathers the values, :func:`napari_sagegan.napari.jobs.
segment_layers` (over :func:`napari_sagegan.api.segment`) does the work, and each finished
image becomes a Labels layer (:func:`napari_sagegan.napari.layers.add_result_layers`).
"""

from __future__ import annotations

from typing import Any

from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
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
from napari_sagegan.napari._qt.parts import LayerCombo, ModelCombo, ProgressPanel, device_combo
from napari_sagegan.napari.layers import ADVICE_OPEN, ImageInput, add_result_layers, image_input


class SegmentWidget(ModelDock):
    """Segment the selected image layer (2-D or 3-D), or every open image, into particles.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (given by napari when the widget is opened from the Plugins menu).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.image_combo.setToolTip("The image layer to segment (2-D image or 3-D stack)")
        self.all_images = QCheckBox("all open images (one Labels layer each)")
        self.model_combo = ModelCombo(self.store)
        self.model_combo.setToolTip(
            "The segmenter: the bundled default, a model file, or one fine-tuned here"
        )
        self.load_button = QPushButton("Load...")
        self.load_button.setToolTip("Load a model file (.pt) written by napari-sagegan")
        self.device_combo = device_combo("auto: CUDA GPU, then Apple MPS, then the CPU")
        self.device_label = QLabel("used: -")
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 4096)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setValue(512)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Images are processed in overlapping tiles of this size")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.05, 0.95)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setValue(0.5)
        self.threshold_spin.setToolTip("Particle probability threshold")
        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 100000.0)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSpecialValueText("auto")
        self.diameter_spin.setToolTip(
            "Typical particle diameter, if you know it; 0 estimates it for each image. The "
            "image is resampled so its particles come out at the size the network works at"
        )
        self.diameter_unit = QComboBox()
        self.diameter_unit.addItems(["px", "nm"])
        self.diameter_unit.setToolTip("nm needs the image's pixel size (scale or file metadata)")
        self.split_check = QCheckBox("split touching particles")
        self.split_check.setChecked(True)
        self.attention_check = QCheckBox("show attention map")
        self.run_button = QPushButton("Segment")
        self.progress = ProgressPanel()
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)

        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.load_button)
        device_row = QHBoxLayout()
        device_row.addWidget(self.device_combo)
        device_row.addWidget(self.device_label, 1)
        diameter_row = QHBoxLayout()
        diameter_row.addWidget(self.diameter_spin, 1)
        diameter_row.addWidget(self.diameter_unit)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("", self.all_images)
        form.addRow("Model", model_row)
        form.addRow("Device", device_row)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Threshold", self.threshold_spin)
        form.addRow("Particle size", diameter_row)
        form.addRow("", self.split_check)
        form.addRow("", self.attention_check)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.run_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.result_label)
        lay.addStretch(1)
        self._busy_widgets = [self.run_button, self.load_button, self.model_combo]

        self.run_button.clicked.connect(self.run)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.load_button.clicked.connect(self._load_dialog)
        self.model_combo.activated.connect(self._model_chosen)
        self.all_images.toggled.connect(lambda on: self.image_combo.setEnabled(not on))
        self.apply_model_settings()

    # ------------------------------------------------------------------ models
    def _model_chosen(self, index: int) -> None:
        entry = self.model_combo.entry()
        if not self.check_model(entry):
            self.model_combo.refresh()  # show the current model again
            return
        self.store.select(entry)
        self.apply_model_settings()

    def apply_model_settings(self) -> None:
        """Show the current model's recommended tile size, threshold and split setting."""
        entry = self.store.current
        try:
            entry.check_available()
            infer = entry.load().get("infer") or {}
        except (OSError, ValueError):
            return
        if "tile_size" in infer:
            self.tile_spin.setValue(int(infer["tile_size"]))
        if "threshold" in infer:
            self.threshold_spin.setValue(float(infer["threshold"]))
        if "split" in infer:
            self.split_check.setChecked(bool(infer["split"]))

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load a napari-sagegan model", "", "PyTorch checkpoint (*.pt *.pth)"
        )
        if path:
            self.load_model(path)

    def load_model(self, path: str) -> bool:
        """Load a model file and make it the current model; a bad file is reported."""
        try:
            entry = self.store.add_file(path)
        except (OSError, ValueError) as err:
            notify_error(f"cannot use this model: {err}")
            return False
        self.apply_model_settings()
        notify_info(f"model {entry.name} loaded")
        return True

    # ------------------------------------------------------------------ arguments
    def _inputs(self) -> list[ImageInput]:
        """The image layers to segment, checked; bad ones are reported and skipped."""
        if self.all_images.isChecked():
            layers = self.image_combo.layers()
        else:
            layers = [self.image_combo.layer()] if self.image_combo.layer() else []
        if not layers:
            notify_warning(f"There is no image layer to segment: {ADVICE_OPEN}.")
            return []
        inputs, problems = [], []
        for layer in layers:
            try:
                inputs.append(image_input(layer))
            except ValueError as err:
                problems.append(str(err))
        for text in problems:
            (notify_warning if inputs else notify_error)(text)
        return inputs

    def arguments(self) -> dict | None:
        """The widget's values as the arguments of :func:`~napari_sagegan.napari.jobs.
        segment_layers`; ``None`` (and a notification) when it cannot start."""
        inputs = self._inputs()
        if not inputs:
            return None
        diameter = float(self.diameter_spin.value())
        in_nm = diameter > 0 and self.diameter_unit.currentText() == "nm"
        if in_nm:
            unknown = [im.name for im in inputs if not im.pixel_size_nm]
            if unknown:
                notify_error(
                    f"The particle size is in nm, but the pixel size of {unknown[0]!r} is "
                    "unknown: give the size in px, or open the image with its calibration."
                )
                return None
        entry = self.store.current
        if not self.check_model(entry):
            return None
        return {
            "entry": entry,
            "images": inputs,
            "device": self.device_combo.currentText(),
            "infer": {
                "tile_size": int(self.tile_spin.value()),
                "threshold": float(self.threshold_spin.value()),
                "split": bool(self.split_check.isChecked()),
            },
            "diameter": max(diameter, 1.0) if diameter > 0 and not in_nm else None,
            "diameter_nm": diameter if in_nm else None,
            "with_attention": self.attention_check.isChecked(),
            "threads": self.threads,
        }

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Start segmenting (the button); returns the worker, or ``None`` if not started."""
        if self.is_running:
            return None
        args = self.arguments()
        if args is None:
            return None
        self._n_done = 0
        inputs = args["images"]
        what = inputs[0].name if len(inputs) == 1 else f"{len(inputs)} images"
        self.progress.start(f"segmenting {what} with {args['entry'].name} ...")
        self.result_label.setText("")
        return self.run_task(
            jobs.segment_layers(**args),
            on_yield=self._on_progress,
            on_return=self._on_return,
            on_done=self._on_done,
        )

    def _on_progress(self, ev: Any) -> None:
        if ev.data.get("device"):
            used = str(ev.data["device"]).replace("(1 threads)", "(1 thread)")
            self.device_label.setText(f"used: {used}")
        if ev.stage == "image":
            result = ev.data["result"]
            add_result_layers(self.viewer, result)
            self._n_done += 1
            text = self.result_label.text()
            self.result_label.setText((text + "\n" if text else "") + result.describe())
        self.progress.show(ev)

    def _on_return(self, results: list) -> None:
        self.results = results

    def _on_done(self, status: str) -> None:
        kept = f" ({self._n_done} finished image(s) kept)" if self._n_done else ""
        text = {"done": "done", "cancelled": "cancelled", "error": "failed"}[status]
        self.progress.finish(text + (kept if status != "done" else ""))
