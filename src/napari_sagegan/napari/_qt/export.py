"""The "Export labels" dock: the ticked Labels layers to TIFF, plus a CSV of the particles.

Thin: the files are planned and written by :func:`napari_sagegan.napari.jobs.export_plan`
and :func:`~napari_sagegan.napari.jobs.export_layers` (in a worker); the dock lists the
Labels layers with a tick each (Segment's results ticked by default, masks opened from files,
generated pairs and the preview not, unless there is no result at all), finds each one's
pixel size (:func:`napari_sagegan.napari.calibration.labels_pixel_size`), asks before
replacing files and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.napari._qt.common import DockBase, notify_info, notify_warning
from napari_sagegan.napari._qt.parts import ProgressPanel, button_row, push_button
from napari_sagegan.napari.calibration import labels_pixel_size, watch_viewer
from napari_sagegan.napari.jobs import CSV_NAME, export_layers, export_plan
from napari_sagegan.napari.layers import is_result
from napari_sagegan.napari.state import viewer_state
from napari_sagegan.napari.writer import layer_scale_unit


def ask_overwrite(parent: QWidget, paths: Sequence[Path]) -> bool:
    """Ask (a dialog) whether existing files may be replaced."""
    listing = "\n".join(p.name for p in paths[:10]) + ("\n..." if len(paths) > 10 else "")
    answer = QMessageBox.question(
        parent,
        "Replace files?",
        f"{len(paths)} file(s) already exist in {paths[0].parent}:\n\n{listing}\n\nReplace them?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes


class ExportWidget(DockBase):
    """Write the ticked Labels layers to a folder as Fiji-ready TIFFs, plus one particle CSV.

    Attributes
    ----------
    confirm_overwrite : callable
        ``confirm_overwrite(existing_paths) -> bool``; a Yes/No dialog by default. Replace it
        to answer without a dialog (tests, scripts).
    layer_list : QListWidget
        One checkable row per Labels layer.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.state = viewer_state(napari_viewer)
        watch_viewer(napari_viewer, self.state)
        self.confirm_overwrite: Callable[[Sequence[Path]], bool] = lambda paths: ask_overwrite(
            self, paths
        )
        #: The user's ticks by layer name (``None``: never chosen, the default applies).
        self.choices: dict[str, bool] = {}
        self.layer_list = QListWidget()
        self.layer_list.setToolTip(
            "The Labels layers to write; Segment's results are ticked at first, masks "
            "opened from files (ground truths), generated pairs and the preview are not"
        )
        self.layer_list.setMaximumHeight(160)
        self.all_button = push_button("Tick all")
        self.none_button = push_button("Untick all")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder to write into")
        self.folder_button = QPushButton("Browse...")
        self.csv_check = QCheckBox(f"particle table ({CSV_NAME})")
        self.csv_check.setChecked(True)
        self.csv_check.setToolTip(
            "One row per particle of every layer written: sizes in pixels and, when the "
            "pixel size is known, in nm; touches_border marks particles cut by the edge"
        )
        self.export_button = QPushButton("Export ticked labels")
        self.export_button.setToolTip(
            "One uint16 TIFF per ticked Labels layer (pixel size and unit included when they "
            "are known), opened by Fiji as a label image"
        )
        self.progress = ProgressPanel()
        self.progress.cancel_button.hide()
        hint = QLabel("To save one layer: select it, then File > Save Selected Layers (.tif).")
        hint.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(self.folder_button)
        form = QFormLayout()
        form.addRow("Layers", self.layer_list)
        form.addRow("", button_row(self.all_button, self.none_button, stretch=None))
        form.addRow("Folder", row)
        form.addRow("", self.csv_check)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.export_button)
        lay.addWidget(self.progress)
        lay.addWidget(hint)
        lay.addStretch(1)
        self._busy_widgets = [self.export_button]
        self.folder_button.clicked.connect(self._folder_dialog)
        self.export_button.clicked.connect(self.export_all)
        self.all_button.clicked.connect(lambda: self.tick_all(True))
        self.none_button.clicked.connect(lambda: self.tick_all(False))
        self.layer_list.itemChanged.connect(self._item_changed)
        self.written: list[Path] = []
        for event in ("inserted", "removed", "moved", "changed"):
            getattr(self.viewer.layers.events, event).connect(self.refresh)
        self.refresh()

    # ------------------------------------------------------------------ the list
    def _labels_layers(self) -> list[Labels]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)]

    def default_ticks(self, layers: Sequence[Labels]) -> dict[str, bool]:
        """Segment's results ticked, other Labels layers not; all ticked when none is a
        result (masks opened or drawn by the user are then what there is to export)."""
        results = {layer.name: is_result(layer) for layer in layers}
        if not any(results.values()):
            return {name: True for name in results}
        return results

    def refresh(self, *_: Any) -> None:
        """List the viewer's Labels layers with their ticks (the user's, else the default)."""
        try:
            layers = self._labels_layers()
        except RuntimeError:  # deleted widget
            return
        default = self.default_ticks(layers)
        self.layer_list.blockSignals(True)
        self.layer_list.clear()
        for layer in layers:
            ticked = self.choices.get(layer.name, default[layer.name])
            item = QListWidgetItem(layer.name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if ticked else Qt.CheckState.Unchecked)
            if not is_result(layer):
                item.setToolTip("not made by Segment (opened from a file, drawn or generated)")
            self.layer_list.addItem(item)
        self.layer_list.blockSignals(False)
        names = set(default)
        self.choices = {k: v for k, v in self.choices.items() if k in names}

    def _item_changed(self, item: QListWidgetItem) -> None:
        self.choices[item.text()] = item.checkState() == Qt.CheckState.Checked

    def tick(self, name: str, ticked: bool = True) -> None:
        """Tick (or untick) the layer ``name`` in the list, as a click would."""
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            if item.text() == name:
                item.setCheckState(Qt.CheckState.Checked if ticked else Qt.CheckState.Unchecked)

    def tick_all(self, ticked: bool) -> None:
        for i in range(self.layer_list.count()):
            self.tick(self.layer_list.item(i).text(), ticked)

    def ticked(self) -> list[str]:
        """The names of the ticked layers, in the viewer's order."""
        out = []
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.text())
        return out

    def _folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export labels into")
        if path:
            self.folder_edit.setText(path)

    # ------------------------------------------------------------------ export
    def item(self, layer: Labels) -> tuple:
        """``(name, labels copy, scale, unit, pixel_size_nm, confidence)`` of a layer for
        :func:`~napari_sagegan.napari.jobs.export_layers` (``confidence``: the network's
        per-particle confidence by label, from the layer's features, or ``None``).

        The TIFF gets the layer's scale when its units are a length; else the pixel size
        known for it (set by the user, from its image, from its file) in nm.
        """
        nm = labels_pixel_size(self.viewer.layers, layer, self.state).nm
        units = getattr(layer, "units", None)
        meta = {**(layer.metadata or {})}
        if nm:
            meta["pixel_size_nm"] = nm
        scale, unit = layer_scale_unit(tuple(layer.scale), units, meta)
        # a copy: the user may keep painting while the files are written
        from napari_sagegan.napari.proofread import confidence_array

        conf = confidence_array(getattr(layer, "features", None))
        return layer.name, np.array(layer.data), scale, unit, nm, conf

    def export_all(self, folder: str | None = None) -> Any:
        """Export the ticked Labels layers into ``folder`` (default: the folder field).

        Returns the worker, or ``None`` when nothing was started (no Labels layer, none
        ticked, no folder, or overwriting declined).
        """
        folder = folder if isinstance(folder, str) and folder else self.folder_edit.text()
        folder = folder.strip()
        self.refresh()
        if not self._labels_layers():
            notify_warning(
                "There is no Labels layer to export: segment an image first (Segment widget)."
            )
            return None
        names = set(self.ticked())
        layers = [layer for layer in self._labels_layers() if layer.name in names]
        if not layers:
            notify_warning("No Labels layer is ticked: tick the layers to export in the list.")
            return None
        if not folder:
            notify_warning("Choose a folder to export into (Browse...).")
            return None
        out = Path(folder).expanduser()
        if not out.is_dir():
            notify_warning(f"The folder {out} does not exist: create it or choose another.")
            return None
        for layer in layers:
            if layer.data.ndim not in (2, 3):
                notify_warning(
                    f"The Labels layer {layer.name!r} has {layer.data.ndim} dimensions; only 2-D "
                    "images and 3-D stacks can be exported: untick, delete or split it, then "
                    "try again."
                )
                return None
        csv = self.csv_check.isChecked()
        paths = export_plan([layer.name for layer in layers], out, csv)
        existing = [p for p in paths if p.exists()]
        if existing and not self.confirm_overwrite(existing):
            notify_info("Export cancelled: no file was changed.")
            return None
        items = [self.item(layer) for layer in layers]
        self.progress.start(f"exporting {len(items)} Labels layer(s) ...")
        self.written = []
        return self.run_task(
            export_layers(items, paths, csv),
            on_yield=lambda ev: self.progress.update_progress(ev.step, ev.total, None, ev.message),
            on_return=self._on_return,
            on_done=lambda status: None,
        )

    def _on_return(self, written: list[Path]) -> None:
        self.written = list(written)
        self.progress.finish(f"wrote {len(written)} file(s) to {written[0].parent}")
        notify_info(f"exported {len(written)} file(s) to {written[0].parent}")
