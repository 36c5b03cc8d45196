"""The "Augment (SAGE-GAN)" dock widget: phase 2 and synthetic training pairs."""

from __future__ import annotations

import math
from typing import Any

from napari.layers import Image, Labels
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import (
    QApplication,
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
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.napari import gan_tasks as _gan_tasks
from napari_sagegan.napari import tasks as _tasks
from napari_sagegan.napari._qt.common import (
    DockBase,
    ProgressPanel,
    notify_error,
    notify_info,
    notify_warning,
)
from napari_sagegan.napari._qt.segment import DEVICES

_ROLE = Qt.ItemDataRole.UserRole
TERMS = ("adv_img", "adv_mask", "id_mask", "rec_mask", "rec_img", "id_img", "d_img", "d_mask")


class TermPlot(QWidget):
    """Live per-term loss curves (log scale, one colour per term), drawn with QPainter."""

    COLORS = [QColor(c) for c in ("#5aa0ff", "#ff9f40", "#50c878", "#e05a5a", "#b07cff",
                                   "#ffd24d", "#40d0d0", "#c0c0c0")]  # fmt: skip

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.clear()

    def clear(self) -> None:
        self.series: dict[str, list[tuple[float, float]]] = {k: [] for k in TERMS}
        self.update()

    def add(self, step: float, data: dict) -> None:
        for k in TERMS:
            v = data.get(k)
            if v is not None and math.isfinite(v) and v > 0:
                self.series[k].append((step, math.log10(v)))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        fg = self.palette().windowText().color()
        h = p.fontMetrics().height()
        area = QRectF(36, 2 * h + 6, self.width() - 44, self.height() - 2 * h - 12)
        if area.width() < 20 or area.height() < 20:
            return
        p.setPen(QPen(fg, 1))
        p.drawRect(area)
        pts = [pt for s in self.series.values() for pt in s]
        if pts:
            x_max = max(x for x, _ in pts) or 1.0
            lo, hi = min(y for _, y in pts), max(y for _, y in pts)
            hi = hi if hi - lo > 1e-9 else lo + 1.0

            def point(x: float, y: float) -> QPointF:
                return QPointF(
                    area.left() + area.width() * x / x_max,
                    area.bottom() - area.height() * (y - lo) / (hi - lo),
                )

            for s, color in zip(self.series.values(), self.COLORS):
                if not s:
                    continue
                path = QPainterPath(point(*s[0]))
                for x, y in s[1:]:
                    path.lineTo(point(x, y))
                p.setPen(QPen(color, 1.5))
                p.drawPath(path)
            p.setPen(QPen(fg, 1))
            p.drawText(QPointF(2, area.top() + h), f"1e{hi:.0f}")
            p.drawText(QPointF(2, area.bottom()), f"1e{lo:.0f}")
        x = 4.0
        for i, (k, color) in enumerate(zip(TERMS, self.COLORS)):
            if i == 4:
                x = 4.0
            row = h if i < 4 else 2 * h
            p.setPen(QPen(color, 3))
            p.drawLine(QPointF(x, row - h / 3), QPointF(x + 10, row - h / 3))
            p.setPen(QPen(fg, 1))
            p.drawText(QPointF(x + 13, row), k)
            x += 13 + p.fontMetrics().horizontalAdvance(k) + 10
        p.end()


class AugmentWidget(DockBase):
    """Train SAGE-GAN phase 2 on the viewer's (image, labels) pairs, then generate pairs.

    Training runs in a worker with a time budget, per-term loss curves and a live preview
    layer (``G(mask)`` for a fixed mask and latent); Cancel keeps the best so far. The phase-2
    segmenter becomes the current model (shared with Segment and Retrain). "Generate" adds
    N synthetic pairs as Image + Labels layers named ``SAGE-GAN synth NN``; "Add to
    retraining set" ticks the ones still open in the Correct-and-retrain widget.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        _tasks.warm_up(training=True)
        self.store = _tasks.model_store(napari_viewer)
        self.threads: int | None = _tasks.gui_threads()
        self.task: _gan_tasks.Augment | None = None
        self.gen_ckpt: dict | None = None
        self.source_labels: list = []
        self._n_made = 0
        #: Further GanConfig fields for scripts and tests (e.g. tiny networks).
        self.gan_extra: dict = {}

        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(110)
        self.pair_list.setToolTip("Tick the (image, labels) pairs to learn from")
        self.refresh_button = QPushButton("Refresh")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("optional: folder of image + mask files")
        self.folder_button = QPushButton("Browse...")
        self.model_combo = QComboBox()
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
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.train_button = QPushButton("Train phase 2")
        self.progress = ProgressPanel()
        self.plot = TermPlot()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.generate_button = QPushButton("Generate pairs")
        self.generate_button.setEnabled(False)
        self.retrain_button = QPushButton("Add to retraining set")
        self.delete_button = QPushButton("Delete generated")

        head = QHBoxLayout()
        head.addWidget(QLabel("Training pairs"), 1)
        head.addWidget(self.refresh_button)
        folder = QHBoxLayout()
        folder.addWidget(self.folder_edit, 1)
        folder.addWidget(self.folder_button)
        form = QFormLayout()
        form.addRow("Extra pairs", folder)
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
        lay.addLayout(head)
        lay.addWidget(self.pair_list)
        lay.addLayout(form)
        lay.addWidget(self.train_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.status)
        lay.addLayout(gen_form)
        lay.addLayout(after)
        self._busy_widgets = [self.train_button, self.generate_button]

        self.refresh_button.clicked.connect(self.refresh_pairs)
        self.folder_button.clicked.connect(self._folder_dialog)
        self.train_button.clicked.connect(self.start_training)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.generate_button.clicked.connect(self.start_generate)
        self.retrain_button.clicked.connect(self.add_to_retraining)
        self.delete_button.clicked.connect(self.delete_generated)
        napari_viewer.layers.events.inserted.connect(self.refresh_pairs)
        napari_viewer.layers.events.removed.connect(self.refresh_pairs)
        self.store.subscribe(self._refresh_models)
        self._refresh_models()
        self.refresh_pairs()

    # ------------------------------------------------------------------ inputs
    def _refresh_models(self) -> None:
        try:
            self.model_combo.clear()
            for entry in self.store.entries:
                self.model_combo.addItem(entry.name)
            self.model_combo.setCurrentText(self.store.current.name)
        except RuntimeError:  # deleted widget
            pass

    def _entry(self) -> _tasks.ModelEntry:
        name = self.model_combo.currentText()
        for entry in self.store.entries:
            if entry.name == name:
                return entry
        return self.store.current

    def refresh_pairs(self, *_: Any) -> None:
        """List (labels, image) pairs; real ones ticked, generated ones not."""
        try:
            ticked = {
                self.pair_list.item(i).data(_ROLE): self.pair_list.item(i).checkState()
                for i in range(self.pair_list.count())
            }
            self.pair_list.clear()
        except RuntimeError:
            return
        for layer in self.viewer.layers:
            if not isinstance(layer, Labels) or layer.name == _gan_tasks.PREVIEW_NAME:
                continue
            image_name = _tasks.source_image_name(layer)
            if not image_name or image_name not in self.viewer.layers:
                continue
            item = QListWidgetItem(layer.name)
            item.setData(_ROLE, layer.name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            default = (
                Qt.CheckState.Unchecked if _gan_tasks.is_synthetic(layer) else Qt.CheckState.Checked
            )
            item.setCheckState(ticked.get(layer.name, default))
            self.pair_list.addItem(item)

    def checked_labels(self) -> list[str]:
        return [
            self.pair_list.item(i).data(_ROLE)
            for i in range(self.pair_list.count())
            if self.pair_list.item(i).checkState() == Qt.CheckState.Checked
        ]

    def _folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of image + mask pairs")
        if path:
            self.folder_edit.setText(path)

    def gather_pairs(self) -> list[_tasks.TrainingPair] | None:
        pairs = []
        for name in self.checked_labels():
            if name not in self.viewer.layers:
                continue
            labels = self.viewer.layers[name]
            image = self.viewer.layers[_tasks.source_image_name(labels)]
            if not isinstance(image, Image):
                continue
            pair = _tasks.TrainingPair(f"{name!r} on {image.name!r}", image.data, labels.data)
            try:
                _tasks.check_image_data(image.name, image.data, rgb=image.rgb)
                _tasks.check_pair(pair)
            except ValueError as err:
                notify_error(str(err))
                return None
            pairs.append(pair)
        return pairs

    def gan_config(self) -> Any:
        from napari_sagegan.engine.train.gan import GanConfig

        values = dict(
            max_minutes=float(self.minutes_spin.value()),
            epochs=100_000,
            patch_size=int(self.patch_spin.value()),
        )
        values.update(self.gan_extra)
        return GanConfig.short(**values)

    # ------------------------------------------------------------------ training
    def start_training(self) -> Any:
        """Train phase 2 (the button); returns the worker or ``None``."""
        if self.is_running:
            return None
        self.refresh_pairs()
        pairs = self.gather_pairs()
        if pairs is None:
            return None
        folder = self.folder_edit.text().strip() or None
        if not pairs and folder is None:
            notify_warning(
                "No training pairs. Open an image with its Labels layer (named '<image> "
                "labels', or made by Segment), tick it here - or choose a folder of pairs."
            )
            return None
        base = self._entry()
        try:
            base.check_available()
        except FileNotFoundError as err:
            notify_error(str(err))
            return None
        self.task = _gan_tasks.Augment(
            base,
            pairs,
            self.gan_config(),
            folder=(folder, None) if folder else None,
            device=self.device_combo.currentText(),
            threads=self.threads,
        )
        self.plot.clear()
        self.progress.start(f"SAGE-GAN phase 2 from {base.name} ...")
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
        self.progress.update_progress(ev.step, ev.total, ev.eta_s, ev.message)

    def _show_preview(self, image: Any) -> None:
        name = _gan_tasks.PREVIEW_NAME
        if name in self.viewer.layers:
            self.viewer.layers[name].data = image
        else:
            self.viewer.add_image(image, name=name, colormap="gray", contrast_limits=(-1, 1))

    def _on_training_done(self, status: str) -> None:
        task = self.task
        result = task.result() if task is not None else None
        if status == "error" or result is None:
            text = "failed" if status == "error" else "stopped before the first validation"
            self.progress.finish(f"{text}; nothing changed")
            self.task = None
            return
        seg_ckpt, self.gen_ckpt = result
        self.source_labels = task.source_labels()
        self.task = None
        entry = self.store.add_tuned(seg_ckpt)
        m = seg_ckpt["metrics"]
        score = f"val Dice {m['dice']:.3f}, F1@0.5 {m['f1@0.5']:.3f}" if "dice" in m else ""
        ssim = self.gen_ckpt["metrics"].get("ssim")
        how = "cancelled, best kept" if status == "cancelled" else "done"
        self.progress.finish(
            f"{how}: segmenter {entry.name} ({score})"
            + (f"; generator SSIM {ssim:.3f}" if ssim is not None else "")
        )
        self.generate_button.setEnabled(True)

    # ------------------------------------------------------------------ pairs
    def start_generate(self) -> Any:
        """Generate N pairs with the trained generator (the button); returns the worker."""
        if self.is_running:
            return None
        if self.gen_ckpt is None:
            notify_warning("Train phase 2 first: there is no generator yet")
            return None
        gen = _gan_tasks.generate_pairs(
            self.gen_ckpt,
            self.source_labels,
            int(self.n_spin.value()),
            layout=self.layout_combo.currentText(),
            seed=self._n_made,
            device=self.device_combo.currentText(),
            threads=self.threads,
        )
        self.progress.start("generating pairs ...")
        return self.run_task(
            gen,
            on_yield=lambda ev: self.progress.update_progress(
                ev.step, ev.total, ev.eta_s, ev.message
            ),
            on_return=self._add_pairs,
            on_done=lambda status: self.progress.finish(
                "pairs added" if status == "done" else status
            ),
        )

    def _add_pairs(self, pairs: list) -> None:
        start = self._n_made + 1
        for data, kwargs, kind in _gan_tasks.synthetic_layer_data(pairs, start):
            if kind == "image":
                self.viewer.add_image(data, **kwargs)
            else:
                self.viewer.add_labels(data, **kwargs)
        self._n_made += len(pairs)
        notify_info(
            f"added {len(pairs)} synthetic pairs ({_gan_tasks.SYNTH_PREFIX} "
            f"{start:02d}-{self._n_made:02d}); delete the ones you do not want, then "
            "'Add to retraining set'"
        )

    def generated_labels(self) -> list[str]:
        return [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and _gan_tasks.is_synthetic(layer)
        ]

    def delete_generated(self) -> None:
        """Remove every generated pair (and the preview) from the viewer."""
        for layer in list(self.viewer.layers):
            if _gan_tasks.is_synthetic(layer) or layer.name == _gan_tasks.PREVIEW_NAME:
                self.viewer.layers.remove(layer)

    def _retrain_widget(self) -> Any:
        from napari_sagegan.napari._qt.retrain import RetrainWidget

        for w in QApplication.allWidgets():
            if isinstance(w, RetrainWidget) and w.viewer is self.viewer:
                return w
        try:
            _dock, widget = self.viewer.window.add_plugin_dock_widget(
                "napari-sagegan", "Correct and retrain"
            )
            return widget
        except Exception:  # noqa: BLE001 (plugin not registered, no window)
            return None

    def add_to_retraining(self) -> list[str]:
        """Tick the generated pairs still open in the Correct-and-retrain widget."""
        names = self.generated_labels()
        if not names:
            notify_warning("No generated pairs to add: generate some first")
            return []
        retrain = self._retrain_widget()
        if retrain is None:
            notify_error("Open the 'Correct and retrain' widget first")
            return []
        retrain.refresh_pairs()
        for name in names:
            retrain.set_checked(name, True)
        notify_info(f"{len(names)} generated pairs ticked in 'Correct and retrain'")
        return names
