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
from qtpy.QtWidgets import QFormLayout, QPushButton, QWidget

from napari_sagegan.napari import jobs
from napari_sagegan.napari._qt.common import notify_error, notify_info, notify_warning
from napari_sagegan.napari._qt.parts import (
    ModelCombo,
    button_row,
    combo_box,
    double_spin_box,
    score_text,
    spin_box,
    text_label,
)
from napari_sagegan.napari._qt.plots import TermPlot
from napari_sagegan.napari._qt.training import TrainingDock
from napari_sagegan.napari.layers import (
    PREVIEW_NAME,
    SYNTH_PREFIX,
    is_synthetic,
    synthetic_layer_data,
)

#: The dock that "Add to retraining set" opens when none shows the retraining set.
RETRAIN_DOCK = ("napari-sagegan", "Correct and retrain")


class AugmentWidget(TrainingDock):
    """Train SAGE-GAN phase 2 on the viewer's (image, labels) pairs, then generate pairs.

    Training runs in a worker with a time budget, per-term loss curves and a live preview
    layer (``G(mask)`` for a fixed mask and latent); Cancel keeps the best so far. The phase-2
    segmenter becomes the current model (shared with Segment and Retrain). "Generate" adds
    N synthetic pairs as Image + Labels layers named ``SAGE-GAN synth NN``; "Add to
    retraining set" ticks the ones still open in the viewer's retraining set (shown by the
    Correct-and-retrain dock, opened if needed).
    """

    job = jobs.Augment
    training_set = "augment_set"
    plot_class = TermPlot
    train_text = "Train phase 2"
    patch_max = 512
    start_words = "SAGE-GAN phase 2 from {base} ..."
    no_pairs = (
        "No training pairs. Open an image with its Labels layer (named '<image> labels', or "
        "made by Segment), tick it here - or choose a folder of pairs."
    )

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        #: Further GanConfig fields for scripts and tests (e.g. tiny networks).
        self.gan_extra: dict = {}

        self.pair_list.setMaximumHeight(110)
        self.pair_list.setToolTip("Tick the (image, labels) pairs to learn from")
        self.model_combo = ModelCombo(self.store)
        self.model_combo.setToolTip("The phase-1 segmenter that phase 2 starts from")
        self.minutes_spin = double_spin_box(0.05, 600.0, 10.0, suffix=" min")
        self.layout_combo = combo_box(
            ["real", "paste", "lattice"],
            "New masks: real = transformed training masks; paste = real particles placed "
            "at random; lattice = hexagonal/square lattices fitted to the training masks",
        )
        self.n_spin = spin_box(1, 500, 8)
        self.status = text_label()
        self.generate_button = QPushButton("Generate pairs")
        self.retrain_button = QPushButton("Add to retraining set")
        self.delete_button = QPushButton("Delete generated")

        form = self.training_form(
            ("Segmenter", self.model_combo), ("Time budget", self.minutes_spin)
        )
        gen_form = QFormLayout()
        gen_form.addRow("Layout", self.layout_combo)
        gen_form.addRow("Pairs", self.n_spin)
        after = button_row(self.generate_button, self.retrain_button, self.delete_button)
        self.training_layout(form, self.status, gen_form, after)
        self._busy_widgets = [self.train_button, self.generate_button]

        self.generate_button.clicked.connect(self.start_generate)
        self.retrain_button.clicked.connect(self.add_to_retraining)
        self.delete_button.clicked.connect(self.delete_generated)
        self.state.phase2.subscribe(self.refresh_buttons)
        self.refresh_buttons()

    # ------------------------------------------------------------------ training
    def config(self) -> Any:
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

    def base_model(self) -> Any:
        """The phase-1 segmenter chosen."""
        return self.model_combo.entry()

    def show_training_event(self, ev: Any) -> None:
        if ev.stage == "train":
            self.plot.add(float(ev.step), ev.data)
        elif ev.stage == "preview" and "image" in ev.data:
            self._show_preview(ev.data["image"])
        elif ev.stage == "validate":
            self.status.setText(ev.message)

    def _show_preview(self, image: Any) -> None:
        if PREVIEW_NAME in self.viewer.layers:
            self.viewer.layers[PREVIEW_NAME].data = image
        else:
            self.viewer.add_image(
                image, name=PREVIEW_NAME, colormap="gray", contrast_limits=(-1, 1)
            )

    def trained(self, task: Any, result: Any) -> str:
        seg_ckpt, gen_ckpt = result
        self.state.phase2.set_generator(gen_ckpt, task.source_labels())
        entry = self.store.add_tuned(seg_ckpt)
        ssim = gen_ckpt["metrics"].get("ssim")
        return f"segmenter {entry.name} ({score_text(seg_ckpt['metrics'])})" + (
            f"; generator SSIM {ssim:.3f}" if ssim is not None else ""
        )

    # ------------------------------------------------------------------ generated pairs
    def refresh_buttons(self) -> None:
        """Enable "Generate pairs" only when phase 2 has a generator."""
        try:
            self.generate_button.setEnabled(
                self.state.phase2.generator is not None and not self.is_running
            )
        except RuntimeError:  # deleted widget
            pass

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
        return self.run_with_progress(
            gen, "generating pairs ...", on_return=self._add_pairs, done="pairs added"
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
