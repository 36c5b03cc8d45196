"""The "Segment" dock: pick an image (or all), a model and settings; run in a worker.

Thin: :meth:`SegmentWidget.arguments` gathers the values, :func:`napari_sagegan.napari.jobs.
segment_layers` (over :func:`napari_sagegan.api.segment`) does the work, and each finished
image becomes a Labels layer (:func:`napari_sagegan.napari.layers.add_result_layers`).

Earlier results are never replaced silently: "Results" chooses between adding new layers
(the default) and replacing the unedited result of the same image (a corrected one is always
kept: :func:`~napari_sagegan.napari.layers.replaceable_layer`), and the result line names
the layer written by its real name. Layers are added one per turn of the event loop.

"Folder of files" segments every micrograph of a folder into an output folder
(:func:`napari_sagegan.napari.jobs.segment_folder`: the files ``sagegan segment --csv``
writes), in the worker, without opening them in the viewer; it says how many images were
done and which failed.

"Estimate" (:func:`napari_sagegan.napari.jobs.estimate_size`, over
:func:`napari_sagegan.api.estimate_size`) shows the particle size before segmenting and
fills the particle-size field (the user may type another); an uncertain estimate is a
warning. For an image without a pixel size, a scale bar's pixel-size proposal is offered
("Use pixel size ..."), applied to the layer only when clicked. The particle-size setting
is the viewer's (:class:`~napari_sagegan.napari.state.ParticleSize`): Re-segment in
Correct and retrain uses it too.
"""

from __future__ import annotations

from typing import Any

from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.engine.config import InferConfig
from napari_sagegan.napari import jobs
from napari_sagegan.napari._qt.common import (
    ModelDock,
    notify_error,
    notify_info,
    notify_warning,
    open_all_docks,
)
from napari_sagegan.napari._qt.parts import (
    LayerCombo,
    ModelCombo,
    ProgressPanel,
    add_result,
    button_row,
    combo_box,
    device_combo,
    double_spin_box,
    folder_row,
    push_button,
    spin_box,
    status_text,
    text_label,
)
from napari_sagegan.napari.calibration import apply_pixel_size, pixel_size_of, watch_viewer
from napari_sagegan.napari.layers import (
    ADVICE_OPEN,
    ImageInput,
    image_input,
)
from napari_sagegan.napari.state import ResultLayers, TestTimeViews


class SegmentWidget(ModelDock):
    """Segment the selected image layer (2-D or 3-D), or every open image, into particles."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.image_combo.setToolTip("The image layer to segment (2-D image or 3-D stack)")
        self.pixel_size_spin = double_spin_box(
            0.0,
            1e6,
            0.0,
            decimals=4,
            suffix=" nm",
            special="unknown",
            tooltip="nm per pixel of the chosen image: read from its file when it records "
            "one; type it once for an image that has none (kept for that image and its "
            "labels, in every dock)",
        )
        self.all_images = QCheckBox("all open images (one Labels layer each)")
        self.model_combo = ModelCombo(self.store)
        self.model_combo.setToolTip(
            "The segmenter: the bundled default, a model file, or one fine-tuned here"
        )
        self.load_button = push_button(
            "Load...", "Load a model file (.pt) written by napari-sagegan"
        )
        self.device_combo = device_combo("auto: CUDA GPU, then Apple MPS, then the CPU")
        self.device_label = QLabel("used: -")
        self.tile_spin = spin_box(
            64,
            4096,
            InferConfig().tile_size,
            step=64,
            suffix=" px",
            tooltip="Memory per tile: images are processed in overlapping tiles of at most "
            "this side squared in pixels, shaped to the image (1024: the float32 default; "
            "1280 where the network computes in bfloat16, the same memory). Lower it if "
            "segmenting runs out of memory",
        )
        self.threshold_spin = double_spin_box(
            0.05, 0.95, 0.5, decimals=2, step=0.05, tooltip="Particle probability threshold"
        )
        self.confidence_spin = double_spin_box(
            0.0,
            0.95,
            0.0,
            decimals=2,
            step=0.05,
            tooltip="Leave out the particles the network is less sure of than this (their "
            "confidence, 0-1, is a column of the particle table); 0 keeps every particle. "
            "Set from the model's calibration when a model is chosen",
        )
        self.diameter_spin = double_spin_box(
            0.0,
            100000.0,
            0.0,
            decimals=1,
            special="auto",
            tooltip="Typical particle diameter, if you know it; 0 estimates it for each image. "
            "The image is resampled so its particles come out at the size the network works at",
        )
        self.diameter_unit = combo_box(
            ["px", "nm"], "nm needs the image's pixel size (scale or file metadata)"
        )
        self.estimate_button = push_button(
            "Estimate",
            "Find the particle size of the image now (the network's own estimate, with its "
            "confidence) and put it in the field; type another if you know better",
        )
        self.size_label = text_label()
        self.size_label.setVisible(False)  # until there is an estimate to show
        self.pixel_size_button = push_button(
            "", "Set the image layer's pixel size to the one its scale bar gives"
        )
        self.pixel_size_button.setVisible(False)
        self.estimate: Any = None  # the last SizeEstimate
        self.split_check = QCheckBox("split touching particles")
        self.split_check.setChecked(True)
        self.attention_check = QCheckBox("show attention map")
        self.tta_combo = combo_box(
            ["1 (fastest)", "2", "4", "8 (most accurate)"],
            "Test-time augmentation: the network's maps are averaged over this many views of "
            "each tile (mirror images, transposes), one network pass each: fewer missed and "
            "false particles for more time (docs/benchmarks.md)",
        )
        self.results_combo = combo_box(
            ResultLayers.MODES,
            "What a new segmentation does to an earlier result of the same image: add new "
            "layers (nothing is replaced), or replace the result layer nobody edited. A "
            "corrected layer is never replaced",
        )
        self.run_button = QPushButton("Segment")
        self.progress = ProgressPanel()
        self.result_label = text_label()
        self.docks_button = push_button(
            "Open all docks as tabs",
            "Open all the plugin's docks as tabs of one dock area (fits a laptop screen)",
        )
        # a folder of files, segmented into an output folder (nothing opened in the viewer)
        self.folder_box = QGroupBox("Folder of files (written to disk, not opened)")
        self.folder_box.setCheckable(True)
        self.folder_box.setChecked(False)
        self.folder_box.setToolTip(
            "Segment every micrograph of a folder, as `sagegan segment --csv`: labels "
            "<name>.tif, particle tables <name>.csv and segment_report.json in the output "
            "folder, with the settings above"
        )
        self.input_edit, input_row = folder_row(
            "folder of micrographs", "The images to segment (not sub-folders)", "Input folder"
        )
        self.output_edit, output_row = folder_row(
            "output folder", "Where the label TIFFs, tables and report go", "Output folder"
        )
        self.folder_button = push_button(
            "Segment folder", "Segment every image of the input folder into the output folder"
        )
        self._folder_inner = QWidget()
        folder_form = QFormLayout(self._folder_inner)
        folder_form.setContentsMargins(0, 0, 0, 0)
        folder_form.addRow("Input", input_row)
        folder_form.addRow("Output", output_row)
        folder_form.addRow("", self.folder_button)
        box_lay = QVBoxLayout(self.folder_box)
        box_lay.addWidget(self._folder_inner)
        self._folder_inner.setVisible(False)
        self.folder_box.toggled.connect(self._folder_inner.setVisible)

        model_row = button_row(self.model_combo, self.load_button, stretch=0)
        device_row = button_row(self.device_combo, self.device_label, stretch=1)
        diameter_row = button_row(
            self.diameter_spin, self.diameter_unit, self.estimate_button, stretch=0
        )
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Pixel size", self.pixel_size_spin)
        form.addRow("", self.all_images)
        form.addRow("Model", model_row)
        form.addRow("Device", device_row)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Threshold", self.threshold_spin)
        form.addRow("Min. confidence", self.confidence_spin)
        form.addRow("Particle size", diameter_row)
        form.addRow("", self.size_label)
        form.addRow("", self.pixel_size_button)
        form.addRow("", self.split_check)
        form.addRow("", self.attention_check)
        form.addRow("Test-time views", self.tta_combo)
        form.addRow("Results", self.results_combo)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.run_button)
        lay.addWidget(self.folder_box)
        lay.addWidget(self.progress)
        lay.addWidget(self.result_label)
        lay.addStretch(1)
        lay.addWidget(self.docks_button)
        self._busy_widgets = [
            self.run_button,
            self.load_button,
            self.model_combo,
            self.estimate_button,
            self.pixel_size_button,
            self.folder_button,
        ]

        self.results = []
        self.folder_report: Any = None
        self.result_layers = self.state.results
        self.results_combo.setCurrentText(self.result_layers.mode)
        self.results_combo.currentTextChanged.connect(self.result_layers.set)
        self.result_layers.subscribe(self._show_result_mode)
        self.views = self.state.views
        self._show_views()
        self.tta_combo.currentTextChanged.connect(self.views.set)
        self.views.subscribe(self._show_views)
        self.docks_button.clicked.connect(lambda: open_all_docks(self.viewer))
        self.folder_button.clicked.connect(self.run_folder)
        self.run_button.clicked.connect(self.run)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.load_button.clicked.connect(self._load_dialog)
        self.model_combo.activated.connect(self._model_chosen)
        self.all_images.toggled.connect(lambda on: self.image_combo.setEnabled(not on))
        self.estimate_button.clicked.connect(self.estimate_size)
        self.pixel_size_button.clicked.connect(self.apply_pixel_size)
        self.particle_size = self.state.particle_size
        self._show_particle_size()
        self.diameter_spin.valueChanged.connect(self._particle_size_edited)
        self.diameter_unit.currentTextChanged.connect(self._particle_size_edited)
        self.particle_size.subscribe(self._show_particle_size)
        self.apply_model_settings()
        self.store.subscribe(self._current_model_changed)
        watch_viewer(napari_viewer, self.state)
        self.image_combo.currentTextChanged.connect(self._show_pixel_size)
        for event in ("inserted", "removed"):
            getattr(napari_viewer.layers.events, event).connect(self._show_pixel_size)
        self.pixel_size_spin.editingFinished.connect(self.set_pixel_size)
        self.state.pixel_sizes.subscribe(self._show_pixel_size)
        self._show_pixel_size()

    # ------------------------------------------------------------------ models
    def _model_chosen(self, index: int) -> None:
        entry = self.model_combo.entry()
        if not self.check_model(entry):
            self.model_combo.refresh()  # show the current model again
            return
        self.store.select(entry)
        self.apply_model_settings()

    def _current_model_changed(self) -> None:
        """Another model became current (fine-tuned, swapped back in another dock): show
        its settings (its calibrated threshold)."""
        if self.store.current is not self._settings_of:
            try:
                self.apply_model_settings()
            except RuntimeError:  # deleted widget
                pass

    def apply_model_settings(self) -> None:
        """Show the current model's recommended threshold and split setting (tiling is the
        machine's, not the model's: see ``InferConfig.tile_size``)."""
        entry = self.store.current
        self._settings_of = entry
        try:
            entry.check_available()
            infer = entry.load().get("infer") or {}
        except (OSError, ValueError):
            return
        if "threshold" in infer:
            self.threshold_spin.setValue(float(infer["threshold"]))
        # every model has one: 0 (every particle kept) for a model calibrated without it
        self.confidence_spin.setValue(float(infer.get("min_confidence", 0.0)))
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

    # ------------------------------------------------------------------ pixel size
    def _show_pixel_size(self, *_: Any) -> None:
        """Show the chosen image's pixel size (set for it, or from its layer or file)."""
        try:
            layer = self.image_combo.layer()
            self.pixel_size_spin.blockSignals(True)
            self.pixel_size_spin.setValue(pixel_size_of(layer, self.state).nm or 0.0)
            self.pixel_size_spin.blockSignals(False)
        except RuntimeError:  # deleted widget
            pass

    def set_pixel_size(self, nm: float | None = None) -> bool:
        """Keep the pixel size in the field (or ``nm``) for the chosen image, in every dock:
        the image and the layers made from it get that scale (0 forgets it)."""
        layer = self.image_combo.layer()
        if nm is not None:
            self.pixel_size_spin.setValue(float(nm))
        if layer is None:
            return False
        value = self.pixel_size_spin.value()
        known = pixel_size_of(layer, self.state).nm or 0.0
        if abs(value - known) <= 1e-9 * max(value, known, 1e-12):
            return True  # unchanged (focus left the field): nothing to record
        try:
            apply_pixel_size(self.viewer.layers, layer.name, value or None, self.state)
        except ValueError as err:
            notify_error(str(err))
            return False
        return True

    # ------------------------------------------------------------------ particle size
    def _particle_size_edited(self, *_: Any) -> None:
        self.particle_size.set(self.diameter_spin.value(), self.diameter_unit.currentText())

    def _show_particle_size(self) -> None:
        """Show the viewer's particle-size setting (changed here or in another dock)."""
        try:
            for w in (self.diameter_spin, self.diameter_unit):
                w.blockSignals(True)
            self.diameter_unit.setCurrentText(self.particle_size.unit)
            self.diameter_spin.setValue(self.particle_size.value)
        except RuntimeError:  # deleted widget
            return
        finally:
            for w in (self.diameter_spin, self.diameter_unit):
                try:
                    w.blockSignals(False)
                except RuntimeError:
                    pass

    def estimate_size(self) -> Any:
        """Estimate the particle size of the selected image (the button); returns the
        worker, or ``None`` if not started."""
        if self.is_running:
            return None
        inputs = self._inputs(selected=True)
        entry = self.store.current
        if not inputs or not self.check_model(entry):
            return None
        image = inputs[0]
        self.estimate = None
        self.pixel_size_button.setVisible(False)
        self.size_label.setText("")
        self.size_label.setVisible(False)
        return self.run_with_progress(
            jobs.estimate_size(
                entry,
                image,
                device=self.device_combo.currentText(),
                infer=self._infer(),
                threads=self.threads,
            ),
            f"estimating the particle size of {image.name} ...",
            on_yield=self._on_event,
            on_return=self._on_estimate,
            done="estimated",
        )

    def _on_estimate(self, est: Any) -> None:
        """Show the estimate, fill the field with it and offer the scale bar's pixel size."""
        self.estimate = est
        lines = []
        if est.diameter is None:
            lines.append(f"{est.name}: {est.describe()}; type the particle size if you know it")
        else:
            if self.diameter_unit.currentText() == "nm" and est.diameter_nm is not None:
                self.particle_size.set(round(est.diameter_nm, 1), "nm")
            else:
                self.particle_size.set(round(est.diameter, 1), "px")
            lines.append(f"{est.name}: {est.describe()}")
            if est.uncertain:
                notify_warning(
                    f"{est.name}: the particle size estimate ({est.diameter:.3g} px, confidence "
                    f"{est.confidence:.2f}) is uncertain: check the outlines after segmenting, "
                    "or type the typical particle diameter you know"
                )
        if est.scale_bar is not None:
            lines.append(est.describe_scale_bar())
            px = est.proposed_pixel_size
            if px:
                self.pixel_size_button.setText(f"Use pixel size {px:.4g} nm (from the scale bar)")
                self.pixel_size_button.setVisible(True)
        self.size_label.setText("\n".join(lines))
        self.size_label.setVisible(True)

    def apply_pixel_size(self) -> bool:
        """Set the estimated image layer's pixel size to its scale bar's (the button): the
        layer (and the Labels layers made from it) get that scale in nm."""
        est = self.estimate
        px = est.proposed_pixel_size if est is not None else None
        if not px or est.name not in self.viewer.layers:
            notify_warning("There is no scale-bar pixel size to apply: press Estimate first.")
            return False
        apply_pixel_size(self.viewer.layers, est.name, px, self.state, source="scale bar")
        self.pixel_size_button.setVisible(False)
        notify_info(f"{est.name}: pixel size set to {px:.4g} nm (from its scale bar)")
        return True

    # ------------------------------------------------------------------ arguments
    def _inputs(self, selected: bool = False) -> list[ImageInput]:
        """The image layers to segment (``selected``: the chosen one, even with "all open
        images"), checked; bad ones are reported and skipped."""
        if self.all_images.isChecked() and not selected:
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
        try:
            size = self.particle_size.arguments(inputs)
        except ValueError as err:
            notify_error(str(err))
            return None
        entry = self.store.current
        if not self.check_model(entry):
            return None
        return {
            "entry": entry,
            "images": inputs,
            "device": self.device_combo.currentText(),
            "infer": self._infer(),
            **size,
            "with_attention": self.attention_check.isChecked(),
            "threads": self.threads,
        }

    def _infer(self) -> dict:
        return {
            "tile_size": int(self.tile_spin.value()),
            "threshold": float(self.threshold_spin.value()),
            "min_confidence": float(self.confidence_spin.value()),
            "split": bool(self.split_check.isChecked()),
            "tta": self.views.views,
        }

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Start segmenting (the button); returns the worker, or ``None`` if not started."""
        args = self.ready_arguments()
        if args is None:
            return None
        self._n_done = 0
        inputs = args["images"]
        what = inputs[0].name if len(inputs) == 1 else f"{len(inputs)} images"
        gen = jobs.segment_layers(**args)
        self.result_label.setText("")
        return self.run_with_progress(
            gen,
            f"segmenting {what} with {args['entry'].name} ...",
            on_yield=self._on_event,
            on_return=self._on_return,
            on_done=self._on_done,
        )

    def _show_views(self) -> None:
        try:
            self.tta_combo.blockSignals(True)
            self.tta_combo.setCurrentIndex(TestTimeViews.CHOICES.index(self.views.views))
            self.tta_combo.blockSignals(False)
        except RuntimeError:  # deleted widget
            pass

    def _show_result_mode(self) -> None:
        try:
            self.results_combo.blockSignals(True)
            self.results_combo.setCurrentText(self.result_layers.mode)
            self.results_combo.blockSignals(False)
        except RuntimeError:  # deleted widget
            pass

    def _add_line(self, line: str) -> None:
        text = self.result_label.text()
        self.result_label.setText((text + "\n" if text else "") + line)

    def _on_event(self, ev: Any) -> None:
        """Show the device used; queue each finished image for the viewer (the progress
        panel shows ``ev``)."""
        if ev.data.get("device"):
            used = str(ev.data["device"]).replace("(1 threads)", "(1 thread)")
            self.device_label.setText(f"used: {used}")
        if ev.stage == "image":
            notes = [ev.data.get("annotations"), ev.data.get("unsure")]
            self.later(self._add_result, ev.data["result"], "; ".join(filter(None, notes)))

    def _add_result(self, result: Any, annotations: str | None) -> None:
        """One finished image into the viewer (one turn of the event loop); ``annotations``:
        what was left out of it (burned-in annotations, unsure particles)."""
        line = add_result(self.viewer, result, replace=self.result_layers.replace)
        self._n_done += 1
        self._add_line(line + (f"; {annotations}" if annotations else ""))
        scale = result.scale
        if scale is not None and scale.uncertain:
            notify_warning(
                f"{result.image.name}: the particle size was uncertain (confidence "
                f"{scale.confidence:.2f}): check the outlines, or set the particle size "
                "(Estimate, or type it) and segment again"
            )

    def _on_return(self, results: list) -> None:
        self.results = results

    def _on_done(self, status: str) -> None:
        kept = f" ({self._n_done} finished image(s) kept)" if self._n_done else ""
        self.progress.finish(status_text(status) + (kept if status != "done" else ""))

    # ------------------------------------------------------------------ folder of files
    def folder_arguments(self) -> dict | None:
        """The arguments of :func:`~napari_sagegan.napari.jobs.segment_folder`; ``None``
        (and a notification) when they are incomplete."""
        folder = self.input_edit.text().strip()
        out = self.output_edit.text().strip()
        if not folder or not out:
            notify_warning(
                "Choose an input folder of micrographs and an output folder (Browse...)."
            )
            return None
        entry = self.store.current
        if not self.check_model(entry):
            return None
        size = self.particle_size
        return {
            "entry": entry,
            "folder": folder,
            "out": out,
            "device": self.device_combo.currentText(),
            "infer": self._infer(),
            "diameter": None if size.auto or size.unit != "px" else max(size.value, 1.0),
            "diameter_nm": None if size.auto or size.unit != "nm" else size.value,
            "threads": self.threads,
        }

    def run_folder(self) -> Any:
        """Segment the input folder into the output folder (the button); returns the
        worker, or ``None`` if not started."""
        if self.is_running:
            return None
        args = self.folder_arguments()
        if args is None:
            return None
        self._folder_counts = {"done": 0, "failed": []}
        self.folder_report = None
        self.result_label.setText("")
        return self.run_with_progress(
            jobs.segment_folder(**args),
            f"segmenting the images of {args['folder']} with {args['entry'].name} ...",
            on_yield=self._on_folder_event,
            on_return=self._on_folder_return,
            on_done=self._on_folder_done,
        )

    def _on_folder_event(self, ev: Any) -> None:
        if ev.data.get("device"):
            used = str(ev.data["device"]).replace("(1 threads)", "(1 thread)")
            self.device_label.setText(f"used: {used}")
        if ev.stage != "image":
            return
        if "error" in ev.data:
            self._folder_counts["failed"].append((ev.data["image"], ev.data["error"]))
            self._add_line(f"{ev.data['image']}: failed: {ev.data['error']}")
        else:
            self._folder_counts["done"] += 1
            r = ev.data["result"]
            line = f"{r.name}: {r.n_particles} particles"
            if r.scale is not None and r.scale.diameter is not None:
                line += f" ({r.scale.describe(r.pixel_size.nm)})"
            self._add_line(line)

    def _on_folder_return(self, report: Any) -> None:
        self.folder_report = report

    def _on_folder_done(self, status: str) -> None:
        report, counts = self.folder_report, self._folder_counts
        failed = counts["failed"]
        if report is not None:
            text = report.describe()
        else:  # cancelled (the job's report is not returned): the counts seen
            done = counts["done"]
            text = f"{done} image{'s' if done != 1 else ''} segmented"
            text += f", {len(failed)} failed" if failed else ""
            text += f" -> {self.output_edit.text().strip()}" if done or failed else ""
        if status == "cancelled":
            text = f"cancelled: {text} (the images done are written, with their report)"
        elif status == "error":
            text = "failed: nothing was written"
        self.progress.finish(text)
        if failed and status != "error":
            names = ", ".join(name for name, _ in failed[:3]) + (", ..." if len(failed) > 3 else "")
            notify_warning(
                f"{len(failed)} image(s) could not be segmented ({names}); the reasons are in "
                "the dock and in segment_report.json"
            )
