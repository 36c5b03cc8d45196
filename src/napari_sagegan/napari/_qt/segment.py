"""The "Segment" dock widget: pick an image (or all), a model and settings; run in a worker."""

from __future__ import annotations

from typing import Any

from napari.layers import Image, Labels
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

from napari_sagegan.napari import tasks as _tasks
from napari_sagegan.napari._qt.common import (
    DockBase,
    ProgressPanel,
    notify_error,
    notify_info,
    notify_warning,
)

DEVICES = ("auto", "cpu", "cuda", "mps")


def add_result_layers(viewer: Any, result: _tasks.LayerResult) -> list:
    """Add (or refresh) the layers of one segmentation result; main thread only.

    An existing Labels layer of the same name that this plugin made and nobody edited is
    updated in place; an edited one is kept, and the new result gets a new layer (napari
    adds `` [1]`` to its name), so no correction is ever overwritten.
    """
    layers = []
    for data, kwargs, kind in result.layer_data():
        name = kwargs["name"]
        old = viewer.layers[name] if name in viewer.layers else None
        reuse = False
        if old is not None and kind == "labels" and isinstance(old, Labels):
            reuse = _tasks.is_edited(old) is False and old.data.shape == data.shape
        elif old is not None and kind == "image" and isinstance(old, Image):
            reuse = old.data.shape == data.shape
        if reuse:
            old.data = data
            for key in ("features", "metadata", "scale", "translate"):
                if key in kwargs:
                    setattr(old, key, kwargs[key])
            layers.append(old)
        elif kind == "labels":
            layers.append(viewer.add_labels(data, **kwargs))
        else:
            layers.append(viewer.add_image(data, **kwargs))
    return layers


class SegmentWidget(DockBase):
    """Segment the selected image layer (2-D or 3-D), or every open image, into particles.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (given by napari when the widget is opened from the Plugins menu).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        _tasks.warm_up(training=False)  # imports now, not inside the worker (GUI stalls)
        self.store = _tasks.model_store(napari_viewer)
        #: Torch threads while the GUI is open: all cores but one (see _tasks.gui_threads).
        self.threads: int | None = _tasks.gui_threads()

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image layer to segment (2-D image or 3-D stack)")
        self.all_images = QCheckBox("all open images (one Labels layer each)")
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "The segmenter: the bundled default, a model file, or one fine-tuned here"
        )
        self.load_button = QPushButton("Load...")
        self.load_button.setToolTip("Load a model file (.pt) written by napari-sagegan")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("auto: CUDA GPU, then Apple MPS, then the CPU")
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
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("", self.all_images)
        form.addRow("Model", model_row)
        form.addRow("Device", device_row)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Threshold", self.threshold_spin)
        diameter_row = QHBoxLayout()
        diameter_row.addWidget(self.diameter_spin, 1)
        diameter_row.addWidget(self.diameter_unit)
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
        for ev in ("inserted", "removed", "reordered"):
            getattr(napari_viewer.layers.events, ev).connect(self._refresh_images)
        self.store.subscribe(self._refresh_models)
        self._refresh_images()
        self._refresh_models()
        self.apply_model_settings()

    # ------------------------------------------------------------------ choices
    def _refresh_images(self, *_: Any) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def _refresh_models(self) -> None:
        try:
            self.model_combo.blockSignals(True)
        except RuntimeError:  # the widget was deleted; the store outlives it
            return
        self.model_combo.clear()
        for entry in self.store.entries:
            self.model_combo.addItem(entry.name)
        self.model_combo.setCurrentIndex(self.store.entries.index(self.store.current))
        self.model_combo.blockSignals(False)

    def _model_chosen(self, index: int) -> None:
        entry = self.store.entries[index]
        try:
            entry.check_available()
        except FileNotFoundError as err:
            notify_error(str(err))
            self._refresh_models()  # show the current model again
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

    def infer_overrides(self) -> dict:
        """The settings that replace the model's recommended inference settings."""
        out = {
            "tile_size": int(self.tile_spin.value()),
            "threshold": float(self.threshold_spin.value()),
            "split": bool(self.split_check.isChecked()),
        }
        diameter = float(self.diameter_spin.value())
        if diameter > 0:
            key = "diameter_nm" if self.diameter_unit.currentText() == "nm" else "diameter"
            out[key] = max(diameter, 1.0) if key == "diameter" else diameter
        return out

    # ------------------------------------------------------------------ running
    def _inputs(self) -> list[_tasks.ImageInput]:
        """The image layers to segment, checked; bad ones are reported and skipped."""
        if self.all_images.isChecked():
            layers = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        else:
            name = self.image_combo.currentText()
            layers = [self.viewer.layers[name]] if name in self.viewer.layers else []
        if not layers:
            notify_warning(f"There is no image layer to segment: {_tasks._ADVICE_OPEN}.")
            return []
        inputs, problems = [], []
        for layer in layers:
            try:
                inputs.append(_tasks.image_input(layer))
            except ValueError as err:
                problems.append(str(err))
        for text in problems:
            (notify_warning if inputs else notify_error)(text)
        return inputs

    def run(self) -> Any:
        """Start segmenting (the button); returns the worker, or ``None`` if not started."""
        if self.is_running:
            return None
        inputs = self._inputs()
        if not inputs:
            return None
        overrides = self.infer_overrides()
        if "diameter_nm" in overrides:
            unknown = [im.name for im in inputs if not im.pixel_size_nm]
            if unknown:
                notify_error(
                    f"The particle size is in nm, but the pixel size of {unknown[0]!r} is "
                    "unknown: give the size in px, or open the image with its calibration."
                )
                return None
        entry = self.store.current
        try:
            entry.check_available()
        except FileNotFoundError as err:
            notify_error(str(err))
            return None
        self._n_done = 0
        gen = _tasks.segment_images(
            entry,
            inputs,
            device=self.device_combo.currentText(),
            overrides=overrides,
            with_attention=self.attention_check.isChecked(),
            threads=self.threads,
        )
        what = inputs[0].name if len(inputs) == 1 else f"{len(inputs)} images"
        self.progress.start(f"segmenting {what} with {entry.name} ...")
        self.result_label.setText("")
        return self.run_task(
            gen, on_yield=self._on_progress, on_return=self._on_return, on_done=self._on_done
        )

    def _on_progress(self, ev: Any) -> None:
        if ev.data.get("device"):
            used = str(ev.data["device"]).replace("(1 threads)", "(1 thread)")
            self.device_label.setText(f"used: {used}")
        if ev.stage == "image":
            result = ev.data["result"]
            add_result_layers(self.viewer, result)
            self._n_done += 1
            line = f"{result.labels_name}: {result.n_particles} particles"
            if result.scale is not None and result.scale.diameter is not None:
                line += f" ({result.scale.describe(result.image.pixel_size_nm)})"
            self.result_label.setText(
                (self.result_label.text() + "\n" if self.result_label.text() else "") + line
            )
        self.progress.update_progress(ev.step, ev.total, ev.eta_s, ev.message)

    def _on_return(self, results: list) -> None:
        self.results = results

    def _on_done(self, status: str) -> None:
        kept = f" ({self._n_done} finished image(s) kept)" if self._n_done else ""
        text = {"done": "done", "cancelled": "cancelled", "error": "failed"}[status]
        self.progress.finish(text + (kept if status != "done" else ""))
