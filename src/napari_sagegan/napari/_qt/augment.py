"""The "Augment (SAGE-GAN)" dock: phase 2 and synthetic training pairs.

Thin: the pair list is a view of the viewer's phase-2 training set
(:class:`~napari_sagegan.napari._qt.parts.PairPicker`), :meth:`AugmentWidget.arguments`
gathers the values, :class:`~napari_sagegan.napari.jobs.Augment` and
:func:`~napari_sagegan.napari.jobs.generate_pairs` (over :func:`napari_sagegan.api.augment`
and :func:`napari_sagegan.api.generate`) do the work, and the trained generator is kept in
the viewer's state (:class:`~napari_sagegan.napari.state.Phase2`), not on the dock.
"""

from __future__ import annotations

from typing import Any

from napari.layers import Labels
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
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
from napari_sagegan.napari._qt.parts import ModelCombo, PairPicker, ProgressPanel, device_combo
from napari_sagegan.napari._qt.plots import TermPlot
from napari_sagegan.napari.layers import (
    PREVIEW_NAME,
    SYNTH_PREFIX,
    is_synthetic,
    synthetic_layer_data,
)

#: The dock that "Add to retraining set" opens when none shows the retraining set.
RETRAIN_DOCK = ("napari-sagegan", "Correct and retrain")


class AugmentWidget(ModelDock):
    """Train SAGE-GAN phase 2 on the viewer's (image, labels) pairs, then generate pairs.

    Training runs in a worker with a time budget, per-term loss curves and a live preview
    layer (``G(mask)`` for a fixed mask and latent); Cancel keeps the best so far. The phase-2
    segmenter becomes the current model (shared with Segment and Retrain). "Generate" adds
    N synthetic pairs as Image + Labels layers named ``SAGE-GAN synth NN``; "Add to
    retraining set" ticks the ones still open in the viewer's retraining set (shown by the
    Correct-and-retrain dock, opened if needed).
    """

    training = True

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.task: jobs.Augment | None = None
        #: Further GanConfig fields for scripts and tests (e.g. tiny networks).
        self.gan_extra: dict = {}

        self.pairs = PairPicker(napari_viewer, self.state.augment_set)
        self.pair_list = self.pairs.list
        self.pair_list.setMaximumHeight(110)
        self.pair_list.setToolTip("Tick the (image, labels) pairs to learn from")
        self.folder_edit = self.pairs.folder_edit
        self.model_combo = ModelCombo(self.store)
        self.model_combo.setToolTip("The phase-1 segmenter that phase 2 starts from")
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.05, 600.0)
        self.minutes_spin.setValue(10.0)
        self.minutes_spin.setSuffix(" min")
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 512)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setValue(128)
        self.patch_spin.setSuffix(" px")
        self.layout_combo = QComboBox()
        self.layout_combo.addItems(["real", "paste", "lattice"])
        self.layout_combo.setToolTip(
            "New masks: real = transformed training masks; paste = real particles placed "
            "at random; lattice = hexagonal/square lattices fitted to the training masks"
        )
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 500)
        self.n_spin.setValue(8)
        self.device_combo = device_combo()
        self.train_button = QPushButton("Train phase 2")
        self.progress = ProgressPanel()
        self.plot = TermPlot()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.generate_button = QPushButton("Generate pairs")
        self.retrain_button = QPushButton("Add to retraining set")
        self.delete_button = QPushButton("Delete generated")

        form = QFormLayout()
        form.addRow("Extra pairs", self.pairs.folder_row)
        form.addRow("Segmenter", self.model_combo)
        form.addRow("Time budget", self.minutes_spin)
        form.addRow("Patch size", self.patch_spin)
        form.addRow("Device", self.device_combo)
        gen_form = QFormLayout()
        gen_form.addRow("Layout", self.layout_combo)
        gen_form.addRow("Pairs", self.n_spin)
        after = QHBoxLayout()
        after.addWidget(self.generate_button)
        after.addWidget(self.retrain_button)
        after.addWidget(self.delete_button)
        lay = QVBoxLayout(self)
        lay.addWidget(self.pairs)
        lay.addLayout(form)
        lay.addWidget(self.train_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.status)
        lay.addLayout(gen_form)
        lay.addLayout(after)
        self._busy_widgets = [self.train_button, self.generate_button]

        self.train_button.clicked.connect(self.start_training)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.generate_button.clicked.connect(self.start_generate)
        self.retrain_button.clicked.connect(self.add_to_retraining)
        self.delete_button.clicked.connect(self.delete_generated)
        self.state.phase2.subscribe(self._refresh_generator)
        self._refresh_generator()

    # ------------------------------------------------------------------ inputs
    def refresh_pairs(self, *_: Any) -> None:
        """List (labels, image) pairs; real ones ticked, generated ones not."""
        self.pairs.refresh()

    def checked_labels(self) -> list[str]:
        return self.pairs.checked_labels()

    def gan_config(self) -> Any:
        """The :class:`~napari_sagegan.engine.config.GanConfig` set in the widget: a short
        schedule (:meth:`~napari_sagegan.engine.config.GanConfig.short`) whose segmenter
        training (``config.train``) has the widget's budget and patch size."""
        from napari_sagegan.engine.config import GanConfig

        values: dict[str, Any] = {
            "max_minutes": float(self.minutes_spin.value()),
            "epochs": 100_000,
            "patch_size": int(self.patch_spin.value()),
        }
        values.update(self.gan_extra)
        return GanConfig.short(**values)  # TrainConfig fields go into config.train

    def arguments(self) -> dict | None:
        """The widget's values as the arguments of :class:`~napari_sagegan.napari.jobs.
        Augment`; ``None`` (and a notification) when it cannot start."""
        return self.training_arguments(
            self.pairs,
            self.model_combo.entry(),
            self.gan_config,
            "No training pairs. Open an image with its Labels layer (named '<image> "
            "labels', or made by Segment), tick it here - or choose a folder of pairs.",
        )

    # ------------------------------------------------------------------ training
    def start_training(self) -> Any:
        """Train phase 2 (the button); returns the worker or ``None``."""
        if self.is_running:
            return None
        args = self.arguments()
        if args is None:
            return None
        self.task = jobs.Augment(**args)
        self.plot.clear()
        self.progress.start(f"SAGE-GAN phase 2 from {args['base'].name} ...")
        return self.run_task(
            self.task.run(),
            on_yield=self._on_progress,
            on_return=lambda _: None,
            on_done=self._on_training_done,
        )

    def _on_progress(self, ev: Any) -> None:
        if ev.stage == "train":
            self.plot.add(float(ev.step), ev.data)
        elif ev.stage == "preview" and "image" in ev.data:
            self._show_preview(ev.data["image"])
        elif ev.stage == "validate":
            self.status.setText(ev.message)
        self.progress.show(ev)

    def _show_preview(self, image: Any) -> None:
        if PREVIEW_NAME in self.viewer.layers:
            self.viewer.layers[PREVIEW_NAME].data = image
        else:
            self.viewer.add_image(
                image, name=PREVIEW_NAME, colormap="gray", contrast_limits=(-1, 1)
            )

    def _on_training_done(self, status: str) -> None:
        task, self.task = self.task, None  # free the training data and the optimisers
        result = task.result() if task is not None else None
        if status == "error" or result is None:
            text = "failed" if status == "error" else "stopped before the first validation"
            self.progress.finish(f"{text}; nothing changed")
            return
        seg_ckpt, gen_ckpt = result
        self.state.phase2.set_generator(gen_ckpt, task.source_labels())
        entry = self.store.add_tuned(seg_ckpt)
        m = seg_ckpt["metrics"]
        score = f"val Dice {m['dice']:.3f}, F1@0.5 {m['f1@0.5']:.3f}" if "dice" in m else ""
        ssim = gen_ckpt["metrics"].get("ssim")
        how = "cancelled, best kept" if status == "cancelled" else "done"
        self.progress.finish(
            f"{how}: segmenter {entry.name} ({score})"
            + (f"; generator SSIM {ssim:.3f}" if ssim is not None else "")
        )

    # ------------------------------------------------------------------ generated pairs
    def _refresh_generator(self) -> None:
        try:
            self.generate_button.setEnabled(
                self.state.phase2.generator is not None and not self.is_running
            )
        except RuntimeError:  # deleted widget
            pass

    def _set_busy(self, busy: bool) -> None:
        super()._set_busy(busy)
        if not busy:
            self._refresh_generator()

    def start_generate(self) -> Any:
        """Generate N pairs with the trained generator (the button); returns the worker."""
        if self.is_running:
            return None
        phase2 = self.state.phase2
        if phase2.generator is None:
            notify_warning("Train phase 2 first: there is no generator yet")
            return None
        gen = jobs.generate_pairs(
            phase2.generator,
            phase2.source_labels,
            int(self.n_spin.value()),
            layout=self.layout_combo.currentText(),
            seed=phase2.n_made,
            device=self.device_combo.currentText(),
            threads=self.threads,
        )
        self.progress.start("generating pairs ...")
        return self.run_task(
            gen,
            on_yield=self.progress.show,
            on_return=self._add_pairs,
            on_done=lambda status: self.progress.finish(
                "pairs added" if status == "done" else status
            ),
        )

    def _add_pairs(self, pairs: list) -> None:
        start = self.state.phase2.made(len(pairs))
        for data, kwargs, kind in synthetic_layer_data(pairs, start):
            if kind == "image":
                self.viewer.add_image(data, **kwargs)
            else:
                self.viewer.add_labels(data, **kwargs)
        notify_info(
            f"added {len(pairs)} synthetic pairs ({SYNTH_PREFIX} "
            f"{start:02d}-{self.state.phase2.n_made:02d}); delete the ones you do not want, "
            "then 'Add to retraining set'"
        )

    def generated_labels(self) -> list[str]:
        return [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and is_synthetic(layer)
        ]

    def delete_generated(self) -> None:
        """Remove every generated pair (and the preview) from the viewer."""
        for layer in list(self.viewer.layers):
            if is_synthetic(layer) or layer.name == PREVIEW_NAME:
                self.viewer.layers.remove(layer)

    def _show_retraining_set(self) -> bool:
        """Whether a dock shows the retraining set (the Correct-and-retrain dock is opened
        when none does)."""
        if self.state.retrain_set.n_subscribers:
            return True
        try:
            self.viewer.window.add_plugin_dock_widget(*RETRAIN_DOCK)
        except Exception:  # noqa: BLE001 (plugin not registered, no window)
            return False
        return bool(self.state.retrain_set.n_subscribers)

    def add_to_retraining(self) -> list[str]:
        """Tick the generated pairs still open in the viewer's retraining set."""
        names = self.generated_labels()
        if not names:
            notify_warning("No generated pairs to add: generate some first")
            return []
        if not self._show_retraining_set():
            notify_error("Open the 'Correct and retrain' widget first")
            return []
        self.state.retrain_set.choose(names, True)
        notify_info(f"{len(names)} generated pairs ticked in 'Correct and retrain'")
        return names
