"""The "Augment (SAGE-GAN)" dock: phase 2 and synthetic training pairs.

Thin: the pair list is a view of the viewer's phase-2 training set
(:class:`~napari_sagegan.napari._qt.parts.PairPicker`), :meth:`AugmentWidget.arguments`
gathers the values, :class:`~napari_sagegan.napari.jobs.Augment` and
:func:`~napari_sagegan.napari.jobs.generate_layers` (over :func:`napari_sagegan.api.augment`
and :func:`napari_sagegan.api.generate`) do the work, and the trained generator is kept in
the viewer's state (:class:`~napari_sagegan.napari.state.Phase2`), not on the dock.

The pairs are ticked as in Correct and retrain (corrected results only, until the user
ticks others). The budget is a time: the progress shows minutes elapsed of it and the steps
done. The loss curves are named in plain words (the code's names in the tooltips). When
phase 2 does not beat the segmenter it started from, that segmenter stays the current
model and the dock says so with both scores. The layout of new masks is chosen from the
training masks (:func:`~napari_sagegan.napari.jobs.suggest_layout`: ``lattice`` only for
ordered ones). Generated pairs come with contrast limits from their grey levels, one layer
per turn of the event loop; "Delete generated" removes them in one batch of napari's.
"""

from __future__ import annotations

from typing import Any

from napari.layers import Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFormLayout, QPushButton, QWidget

from napari_sagegan.napari import jobs
from napari_sagegan.napari._qt.common import notify_error, notify_info, notify_warning
from napari_sagegan.napari._qt.parts import (
    ModelCombo,
    button_row,
    combo_box,
    double_spin_box,
    edited_text,
    score_text,
    spin_box,
    text_label,
)
from napari_sagegan.napari._qt.plots import TermPlot
from napari_sagegan.napari._qt.training import TrainingDock
from napari_sagegan.napari.layers import PREVIEW_NAME, SYNTH_PREFIX, is_synthetic

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

    #: Shortest time between two updates of the preview layer (ms).
    PREVIEW_MS = 1000

    job = jobs.Augment
    training_set = "augment_set"
    picker = {"text": edited_text}
    plot_class = TermPlot
    train_text = "Train phase 2"
    patch_max = 512
    start_words = "SAGE-GAN phase 2 from {base} ..."
    no_pairs = (
        "No training pairs ticked. Tick the (image, labels) pairs to learn from (corrected "
        "results are ticked for you; masks opened from files are listed, unticked), or "
        "choose a folder of pairs."
    )

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        #: Further GanConfig fields for scripts and tests (e.g. tiny networks).
        self.gan_extra: dict = {}

        self.pair_list.setMaximumHeight(110)
        self.pair_list.setWordWrap(True)
        self.pair_list.setToolTip(
            "Tick the (image, labels) pairs to learn from (corrected results are ticked for "
            "you; raw results, duplicates, masks from files and generated pairs are not)"
        )
        self.model_combo = ModelCombo(self.store)
        self.model_combo.setToolTip("The phase-1 segmenter that phase 2 starts from")
        self.minutes_spin = double_spin_box(0.05, 600.0, 10.0, suffix=" min")
        self.layout_combo = combo_box(
            ["real", "paste", "lattice"],
            "New masks: real = transformed training masks; paste = real particles placed "
            "at random; lattice = hexagonal/square lattices at the training masks' spacing "
            "(for ordered assemblies: on a dispersed sample it over-fills the field). Chosen "
            "from the training masks after phase 2",
        )
        self.layout_label = text_label()
        self.layout_label.setVisible(False)
        self.layout_advice: tuple[str, str] | None = None
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
        gen_form.addRow("", self.layout_label)
        gen_form.addRow("Pairs", self.n_spin)
        after = button_row(self.generate_button, self.retrain_button, self.delete_button)
        self.training_layout(form, self.status, gen_form, after)
        self._busy_widgets = [self.train_button, self.generate_button, self.delete_button]

        self._preview_image: Any = None
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(self.PREVIEW_MS)
        self._preview_timer.timeout.connect(self._draw_preview)
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
        """Show ``G(mask)`` at most once per :attr:`PREVIEW_MS` (each update redraws the
        canvas); the latest image is shown when the pause ends."""
        self._preview_image = image
        if not self._preview_timer.isActive():
            self._draw_preview()

    def _draw_preview(self) -> None:
        image, self._preview_image = self._preview_image, None
        if image is None:
            return
        self._preview_timer.start()  # the next one waits
        if PREVIEW_NAME in self.viewer.layers:
            self.viewer.layers[PREVIEW_NAME].data = image
        else:
            self.viewer.add_image(
                image, name=PREVIEW_NAME, colormap="gray", contrast_limits=(-1, 1)
            )

    def trained(self, task: Any, result: Any) -> str:
        """Keep the generator; the segmenter only when phase 2 beat its starting point."""
        seg_ckpt, gen_ckpt = result
        self.state.phase2.set_generator(gen_ckpt, task.source_labels())
        self.show_layout_advice(task.layout or jobs.suggest_layout(task.source_labels()))
        ssim = gen_ckpt["metrics"].get("ssim")
        gen = f"; generator SSIM {ssim:.3f}" if ssim is not None else ""
        if task.improved() is False:
            if task.best_f1 is None:
                return (
                    "phase 2 stopped before its first validation; the starting segmenter "
                    f"{task.base.name} is kept{gen}"
                )
            return (
                f"phase 2 did not improve on the starting segmenter (F1 {task.best_f1:.3f} vs "
                f"{task.start_f1:.3f}); kept it ({task.base.name}){gen}"
            )
        entry = self.store.add_tuned(seg_ckpt)
        score = score_text(seg_ckpt["metrics"]) or "no validation images: the last one"
        return f"segmenter {entry.name} ({score}){gen}"

    def show_layout_advice(self, advice: tuple[str, str]) -> None:
        """Choose the layout that suits the training masks and say why."""
        self.layout_advice = advice
        layout, reason = advice
        self.layout_combo.setCurrentText(layout)
        self.layout_label.setText(reason)
        self.layout_label.setVisible(bool(reason))

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
        layout = self.layout_combo.currentText()
        advice = self.layout_advice
        if layout == "lattice" and advice is not None and advice[0] != "lattice":
            notify_warning(f"Layout 'lattice': {advice[1]}.")
        n = int(self.n_spin.value())
        gen = jobs.generate_layers(
            phase2.generator,
            phase2.source_labels,
            n,
            start=phase2.n_made + 1,
            layout=layout,
            seed=phase2.n_made,
            device=self.device_combo.currentText(),
            threads=self.threads,
        )
        return self.run_with_progress(
            gen, f"generating {n} pairs ...", on_return=self._add_pairs, done="pairs added"
        )

    def _add_pairs(self, layer_data: list) -> None:
        """Queue the generated layers (made in the worker), one per turn of the event loop."""
        n = len(layer_data) // 2
        start = self.state.phase2.made(n)
        for data, kwargs, kind in layer_data:
            self.later(self._add_layer, data, kwargs, kind)
        self.later(
            notify_info,
            f"added {n} synthetic pairs ({SYNTH_PREFIX} {start:02d}-"
            f"{self.state.phase2.n_made:02d}); delete the ones you do not want, then 'Add to "
            "retraining set'",
        )

    def _add_layer(self, data: Any, kwargs: dict, kind: str) -> None:
        (self.viewer.add_image if kind == "image" else self.viewer.add_labels)(data, **kwargs)

    def generated_labels(self) -> list[str]:
        return [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and is_synthetic(layer)
        ]

    def delete_generated(self) -> int:
        """Remove every generated pair (and the preview) from the viewer; returns how many
        layers go.

        One layer per turn of the event loop, the top one first, inside one napari batch
        (``begin_batch`` / ``end_batch`` of the layer list): napari then cleans its scene
        graph (a full garbage collection, ~0.5 s here) once for all, not once per layer.
        """
        layers = self.viewer.layers
        doomed = [ly for ly in layers if is_synthetic(ly) or ly.name == PREVIEW_NAME]
        if not doomed or self.is_running:
            return 0
        self._set_busy(True)
        layers.events.begin_batch()

        def remove(layer: Any) -> None:
            if layer in layers:
                layers.remove(layer)

        def end() -> None:
            layers.events.end_batch()
            self._set_busy(False)

        for layer in reversed(doomed):
            self.later(remove, layer)
        self.later(end)
        return len(doomed)

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
