"""The parts the docks are composed of: progress panel, pair picker, model and device choosers.

- :class:`ProgressPanel`: a progress bar with a real total, an ETA line and Cancel.
- :class:`PairPicker`: the list of (image, labels) training pairs of the viewer, a view of
  one :class:`~napari_sagegan.napari.state.TrainingSet`, plus an optional folder of pairs.
- :class:`ModelCombo`: the models of the viewer's
  :class:`~napari_sagegan.napari.state.ModelStore`.
- :class:`LayerCombo`: the viewer's layers of one kind, following them and the layer
  selected in the layer list.
- :func:`device_combo`: ``auto | cpu | cuda | mps``.
- :func:`spin_box`, :func:`double_spin_box`, :func:`combo_box`, :func:`push_button`,
  :func:`text_label`, :func:`button_row`: the docks' fields, buttons, status lines and
  rows, each set up in one call.
- :func:`score_text`, :func:`status_text`: a model's validation scores, a task's end.
- :func:`add_result`: a segmentation result into the viewer, with the line naming its layer.
- :func:`folder_row`: a folder field with its Browse button.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.napari.layers import (
    PairCandidate,
    add_result_layers,
    candidate_pairs,
    is_edited,
    source_image_name,
)
from napari_sagegan.napari.state import ModelEntry, ModelStore, TrainingSet

__all__ = [
    "DEVICES",
    "add_result",
    "LayerCombo",
    "ModelCombo",
    "PairPicker",
    "ProgressPanel",
    "button_row",
    "combo_box",
    "device_combo",
    "double_spin_box",
    "format_eta",
    "push_button",
    "score_text",
    "spin_box",
    "status_text",
    "text_label",
]

#: The devices offered (see :func:`napari_sagegan.engine.device.resolve_device`).
DEVICES = ("auto", "cpu", "cuda", "mps")

_ROLE = Qt.ItemDataRole.UserRole


def format_eta(seconds: float | None) -> str:
    """``"ETA 1 min 05 s"`` style text; empty when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"ETA {s} s"
    if s < 3600:
        return f"ETA {s // 60} min {s % 60:02d} s"
    return f"ETA {s // 3600} h {(s % 3600) // 60:02d} min"


def combo_box(items: tuple[str, ...] | list[str] = (), tooltip: str | None = None) -> QComboBox:
    """A chooser of ``items`` (more can be added later)."""
    combo = QComboBox()
    combo.addItems(list(items))
    if tooltip:
        combo.setToolTip(tooltip)
    return combo


def device_combo(tooltip: str | None = None) -> QComboBox:
    """A chooser of ``auto | cpu | cuda | mps``."""
    return combo_box(DEVICES, tooltip)


def ask_csv_path(parent: QWidget, title: str) -> str | None:
    """A CSV file name from a save dialog (``.csv`` added when missing); ``None``: cancelled."""
    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getSaveFileName(parent, title, "", "CSV (*.csv)")
    if not path:
        return None
    return path if path.lower().endswith(".csv") else path + ".csv"


def push_button(text: str, tooltip: str | None = None) -> QPushButton:
    """A button with its tooltip."""
    button = QPushButton(text)
    if tooltip:
        button.setToolTip(tooltip)
    return button


def text_label() -> QLabel:
    """An empty, word-wrapped label for status and result lines."""
    label = QLabel("")
    label.setWordWrap(True)
    return label


def _set_number_field(box: Any, low: float, high: float, value: float, **options: Any) -> None:
    step, suffix = options.get("step"), options.get("suffix")
    special, tooltip = options.get("special"), options.get("tooltip")
    box.setRange(low, high)
    if step is not None:
        box.setSingleStep(step)
    box.setValue(value)
    if suffix:
        box.setSuffix(suffix)
    if special:
        box.setSpecialValueText(special)
    if tooltip:
        box.setToolTip(tooltip)


def spin_box(
    low: int,
    high: int,
    value: int,
    *,
    step: int | None = None,
    suffix: str = "",
    tooltip: str | None = None,
) -> QSpinBox:
    """An integer field from ``low`` to ``high`` showing ``value`` (``suffix``: e.g. ``" px"``)."""
    box = QSpinBox()
    _set_number_field(box, low, high, value, step=step, suffix=suffix, tooltip=tooltip)
    return box


def double_spin_box(
    low: float,
    high: float,
    value: float,
    *,
    decimals: int | None = None,
    step: float | None = None,
    suffix: str = "",
    special: str | None = None,
    tooltip: str | None = None,
) -> QDoubleSpinBox:
    """A decimal field from ``low`` to ``high`` showing ``value``; ``special`` is the text
    shown at ``low`` (e.g. ``"auto"``)."""
    box = QDoubleSpinBox()
    if decimals is not None:
        box.setDecimals(decimals)  # before the range and value, which it rounds
    _set_number_field(
        box, low, high, value, step=step, suffix=suffix, special=special, tooltip=tooltip
    )
    return box


def button_row(*widgets: QWidget, stretch: int | None = None) -> QHBoxLayout:
    """A row of ``widgets`` (buttons, fields); ``stretch`` is the index of the one that
    takes the spare width."""
    row = QHBoxLayout()
    for i, w in enumerate(widgets):
        row.addWidget(w, 1 if i == stretch else 0)
    return row


def status_text(status: str, done: str = "done") -> str:
    """A task's end (``status``: ``done``, ``cancelled`` or ``error``) in words: ``done``,
    ``"cancelled"`` or ``"failed"``."""
    return {"done": done, "cancelled": "cancelled", "error": "failed"}[status]


def score_text(metrics: dict) -> str:
    """``"val Dice 0.812, F1@0.5 0.700"``; empty without validation scores."""
    if "dice" not in metrics:
        return ""
    return f"val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"


class ProgressPanel(QWidget):
    """A progress bar with a real total, an ETA / status line and a Cancel button."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setFormat("%v / %m")
        self.bar.setTextVisible(False)  # no "0 / 1" before anything ran
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop at the next tile or training step")
        self.status = text_label()
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.status)

    def start(self, text: str) -> None:
        self.bar.setRange(0, 0)  # busy until the first event gives a total
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.status.setText(text)
        self.cancel_button.setEnabled(True)

    def update_progress(
        self,
        step: int,
        total: int | None,
        eta_s: float | None,
        text: str,
        bar_text: str | None = None,
    ):
        """Show ``step`` of ``total`` (the bar reads ``bar_text`` if given, else
        "step / total"), the ETA and ``text``."""
        if total:
            self.bar.setRange(0, int(total))
            self.bar.setValue(min(int(step), int(total)))
        self.bar.setFormat(bar_text.replace("%", "%%") if bar_text else "%v / %m")
        eta = format_eta(eta_s)
        self.status.setText(f"{text}  ·  {eta}" if eta else text)

    def show_time(self, elapsed_s: float, budget_s: float, text: str) -> None:
        """Time-based progress, for a run its time budget ends: the bar reads "1.2 of
        10 min" and the line ``text`` with the time left."""
        budget_s = max(float(budget_s), 1e-3)
        elapsed_s = min(max(float(elapsed_s), 0.0), budget_s)
        unit, scale = ("min", 60.0) if budget_s >= 120 else ("s", 1.0)
        done = f"{elapsed_s / scale:.1f}" if unit == "min" else f"{elapsed_s:.0f}"
        self.update_progress(
            round(1000 * elapsed_s / budget_s),
            1000,
            budget_s - elapsed_s,
            text,
            bar_text=f"{done} of {budget_s / scale:g} {unit}",
        )

    def show(self, ev: Any) -> None:
        """Show one progress event (step / total, ETA and message)."""
        self.update_progress(ev.step, ev.total, ev.eta_s, ev.message)

    def finish(self, text: str) -> None:
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
            self.bar.setTextVisible(False)
        self.cancel_button.setEnabled(False)
        self.status.setText(text)

    def finish_status(self, status: str, done: str = "done") -> None:
        """Finish with a task's end in words (:func:`status_text`)."""
        self.finish(status_text(status, done))


def _plain_text(candidate: PairCandidate) -> tuple[str, str]:
    return candidate.name, ""


def edited_text(candidate: PairCandidate) -> tuple[str, str]:
    """``(text, tooltip)`` of a pair: its name, ``(edited)``, and its image when not obvious."""
    labels, image = candidate.labels, candidate.image
    text = labels.name + ("  (edited)" if candidate.edited else "")
    if not labels.name.startswith(image.name):
        text += f"  (image: {image.name})"
    return text, f"Labels layer {labels.name!r} on image {image.name!r}"


class PairPicker(QWidget):
    """The viewer's training pairs, ticked as in a :class:`TrainingSet`, and a folder.

    A view of ``training_set``: the rows are the Labels layers whose image is open
    (:func:`~napari_sagegan.napari.layers.candidate_pairs`), ticked by the set's rule; a
    tick by the user is recorded in the set, and a change of the set (another dock ticking
    pairs) is shown at once. The list follows the layers (added, removed, renamed,
    painted): it is refreshed 300 ms after the last change, so adding or removing many
    layers, or a burst of strokes, lists them once; whether a layer was edited is kept per
    layer and computed again only after that layer changed (hashing every Labels layer on
    every change stalled the GUI).

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    training_set : TrainingSet
    text : callable, optional
        ``text(candidate) -> (text, tooltip)`` of a row (default: the layer name).
    watch_edits : bool
        Kept for compatibility: the list always follows edits (the ticks depend on them).

    Attributes
    ----------
    list : QListWidget
    refresh_button, folder_button : QPushButton
    folder_edit : QLineEdit
        An optional folder of image + mask files; see :meth:`folder`.
    folder_row : QHBoxLayout
        The folder field and its button, for the dock's form.
    """

    def __init__(
        self,
        viewer: Any,
        training_set: TrainingSet,
        *,
        text: Callable[[PairCandidate], tuple[str, str]] | None = None,
        watch_edits: bool = False,
        title: str = "Training pairs",
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.training_set = training_set
        self._text = text or _plain_text
        self._own_change = False
        self._edited: dict[int, tuple[Any, bool | None]] = {}  # id(layer) -> (layer, edited)
        self.list = QListWidget()
        self.refresh_button = QPushButton("Refresh")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("optional: folder of image + mask files")
        self.folder_edit.setToolTip(
            "Extra pairs from disk: each mask named like its image (a.tif + a_mask.tif)"
        )
        self.folder_button = QPushButton("Browse...")
        self.folder_row = QHBoxLayout()
        self.folder_row.addWidget(self.folder_edit, 1)
        self.folder_row.addWidget(self.folder_button)
        head = QHBoxLayout()
        head.addWidget(QLabel(title), 1)
        head.addWidget(self.refresh_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(head)
        lay.addWidget(self.list)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.refresh)
        self.refresh_button.clicked.connect(self.refresh_all)
        self.folder_button.clicked.connect(self._folder_dialog)
        self.list.itemChanged.connect(self._item_changed)
        layers = viewer.layers
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self._on_removed)
        for layer in layers:
            self._watch(layer)
        training_set.subscribe(self.refresh)
        self.refresh()

    # ------------------------------------------------------------------ following layers
    def _watch(self, layer: Any) -> None:
        if type(layer).__name__ == "Labels":
            layer.events.paint.connect(self._on_edit)
            layer.events.data.connect(self._on_edit)
        layer.events.name.connect(self.schedule_refresh)

    def _on_inserted(self, event: Any) -> None:
        self._watch(event.value)
        self.schedule_refresh()

    def _on_removed(self, event: Any) -> None:
        self._edited.pop(id(event.value), None)
        self.schedule_refresh()

    def _on_edit(self, event: Any) -> None:
        self._edited.pop(id(getattr(event, "source", None)), None)
        self.schedule_refresh()

    def edited(self, layer: Any) -> bool | None:
        """:func:`~napari_sagegan.napari.layers.is_edited`, kept until the layer changes."""
        hit = self._edited.get(id(layer))
        if hit is not None and hit[0] is layer:
            return hit[1]
        value = is_edited(layer)
        self._edited[id(layer)] = (layer, value)
        return value

    def schedule_refresh(self, *_: Any) -> None:
        """Refresh soon (once after a burst of paint strokes)."""
        try:
            self._timer.start()
        except RuntimeError:  # deleted widget
            pass

    # ------------------------------------------------------------------ the rows
    def refresh_all(self, *_: Any) -> None:
        """Look at every layer again (the Refresh button), then list the pairs."""
        self._edited.clear()
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """List the pairs with the training set's ticks."""
        if self._own_change:
            return
        try:
            self._timer.stop()
        except RuntimeError:  # the widget was deleted; the state outlives it
            return
        rows = self.training_set.rows(candidate_pairs(self.viewer.layers, self.edited))
        try:
            self.list.blockSignals(True)
        except RuntimeError:  # the widget was deleted; the state outlives it
            return
        try:
            self.list.clear()
            for candidate, ticked in rows:
                text, tip = self._text(candidate)
                item = QListWidgetItem(text)
                if tip:
                    item.setToolTip(tip)
                item.setData(_ROLE, candidate.name)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(Qt.CheckState.Checked if ticked else Qt.CheckState.Unchecked)
                self.list.addItem(item)
        finally:
            self.list.blockSignals(False)

    def _item_changed(self, item: QListWidgetItem) -> None:
        self._own_change = True  # the list shows it already
        try:
            checked = item.checkState() == Qt.CheckState.Checked
            self.training_set.choose(item.data(_ROLE), checked)
        finally:
            self._own_change = False

    def names(self) -> list[str]:
        """The Labels layer names listed."""
        return [self.list.item(i).data(_ROLE) for i in range(self.list.count())]

    def checked_labels(self) -> list[str]:
        """The Labels layer names ticked, in the list's order."""
        return [
            self.list.item(i).data(_ROLE)
            for i in range(self.list.count())
            if self.list.item(i).checkState() == Qt.CheckState.Checked
        ]

    def set_checked(self, labels_name: str, checked: bool = True) -> None:
        """Tick or untick a listed pair by its Labels layer name (as a click would)."""
        state = Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(_ROLE) == labels_name:
                item.setCheckState(state)

    # ------------------------------------------------------------------ folder
    def folder(self) -> str | None:
        """The folder of extra pairs, or ``None``."""
        return self.folder_edit.text().strip() or None

    def _folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of image + mask pairs")
        if path:
            self.folder_edit.setText(path)


class ModelCombo(QComboBox):
    """The models of a :class:`ModelStore`, showing its current model after every change."""

    def __init__(self, store: ModelStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.store = store
        store.subscribe(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        try:
            self.blockSignals(True)
        except RuntimeError:  # the widget was deleted; the store outlives it
            return
        try:
            self.clear()
            for entry in self.store.entries:
                self.addItem(entry.name)
            self.setCurrentIndex(self.store.entries.index(self.store.current))
        finally:
            self.blockSignals(False)

    def entry(self) -> ModelEntry:
        """The model chosen (the current one when the choice is gone)."""
        index = self.currentIndex()
        if 0 <= index < len(self.store.entries):
            return self.store.entries[index]
        return self.store.current


class LayerCombo(QComboBox):
    """The names of the viewer's layers of one kind, kept up to date (selection kept).

    It starts on the layer selected in the layer list (for an Image choice with a Labels
    layer selected: that layer's image), not the first one, and, with ``follow``, moves
    to a layer of its kind when the user selects it in the layer list.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    kind : type
        The layer class listed (``napari.layers.Image``, ``Labels``).
    extra : list of str
        Entries listed first (e.g. ``"(none)"``).
    on_refresh : callable, optional
        Called after every refresh (the list changed, or the layers were renamed).
    follow : bool
        Follow the layer selected in the layer list (when it is of this kind).
    """

    def __init__(
        self,
        viewer: Any,
        kind: type,
        *,
        extra: tuple[str, ...] = (),
        on_refresh: Callable[[], None] | None = None,
        follow: bool = True,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        self.extra = list(extra)
        self.on_refresh = on_refresh
        for event in ("inserted", "removed", "reordered", "moved", "changed"):
            emitter = getattr(viewer.layers.events, event, None)
            if emitter is not None:
                emitter.connect(self.refresh)
        selection = getattr(viewer.layers, "selection", None)
        if follow and selection is not None:
            selection.events.active.connect(self._follow_active)
        self.refresh()

    def _selected_name(self) -> str | None:
        """The name of the selected layer if it is of this kind, or, for a selected Labels
        layer, of the image it was made from; else ``None``."""
        selection = getattr(self.viewer.layers, "selection", None)
        active = getattr(selection, "active", None)
        if active is None:
            return None
        if isinstance(active, self.kind):
            return str(active.name)
        image = source_image_name(active) if type(active).__name__ == "Labels" else None
        if image and image in self.viewer.layers:
            if isinstance(self.viewer.layers[image], self.kind):
                return image
        return None

    def _follow_active(self, *_: Any) -> None:
        try:
            active = self.viewer.layers.selection.active
            if isinstance(active, self.kind) and self.findText(active.name) >= 0:
                self.setCurrentText(active.name)
        except RuntimeError:  # the widget was deleted; the viewer outlives it
            pass

    def layers(self) -> list[Any]:
        """The listed layers, in the viewer's order."""
        return [layer for layer in self.viewer.layers if isinstance(layer, self.kind)]

    def refresh(self, *_: Any) -> None:
        try:
            current = self.currentText()
        except RuntimeError:  # the widget was deleted; the viewer outlives it
            return
        names = self.extra + [layer.name for layer in self.layers()]
        if current not in names:
            selected = self._selected_name()  # start on the selected layer, not the first
            current = selected if selected in names else current
        self.blockSignals(True)
        try:
            self.clear()
            self.addItems(names)
            if current in names:
                self.setCurrentText(current)
        finally:
            self.blockSignals(False)
        if self.on_refresh is not None:
            self.on_refresh()

    def layer(self) -> Any:
        """The chosen layer, or ``None``."""
        name = self.currentText()
        layers = self.viewer.layers
        if name and name in layers and isinstance(layers[name], self.kind):
            return layers[name]
        return None


def add_result(viewer: Any, result: Any, *, replace: bool) -> str:
    """Add one segmentation result to the viewer
    (:func:`~napari_sagegan.napari.layers.add_result_layers`) and return the line that
    names the layer written by its real name (napari adds `` [1]`` to a name taken) and
    says whether an earlier, unedited result was replaced or kept."""
    before = {id(layer) for layer in viewer.layers}
    labels = add_result_layers(viewer, result, replace=replace)[0]
    line = result.describe(labels.name)
    if id(labels) in before:
        return line + "  (replaced the earlier, unedited result)"
    if labels.name != result.labels_name:
        return line + f"  (new layer; {result.labels_name!r} kept)"
    return line


def folder_row(placeholder: str, tooltip: str, title: str) -> tuple[QLineEdit, QHBoxLayout]:
    """A folder field and its "Browse..." button (a folder dialog titled ``title``)."""
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    edit.setToolTip(tooltip)
    button = QPushButton("Browse...")

    def browse() -> None:
        path = QFileDialog.getExistingDirectory(edit, title, edit.text())
        if path:
            edit.setText(path)

    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    row.addWidget(button)
    return edit, row
