"""The "Export labels" dock: every Labels layer to TIFF, plus a CSV of the particles.

Thin: the files are planned and written by :func:`napari_sagegan.napari.jobs.export_plan`
and :func:`~napari_sagegan.napari.jobs.export_layers` (in a worker); the dock gathers the
layers, asks before replacing files and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.io.export import short_unit
from napari_sagegan.napari._qt.common import DockBase, notify_info, notify_warning
from napari_sagegan.napari._qt.parts import ProgressPanel
from napari_sagegan.napari.jobs import CSV_NAME, export_layers, export_plan


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
    """Write every Labels layer to a folder as Fiji-ready TIFFs, plus one particle CSV.

    Attributes
    ----------
    confirm_overwrite : callable
        ``confirm_overwrite(existing_paths) -> bool``; a Yes/No dialog by default. Replace it
        to answer without a dialog (tests, scripts).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.confirm_overwrite: Callable[[Sequence[Path]], bool] = lambda paths: ask_overwrite(
            self, paths
        )
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder to write into")
        self.folder_button = QPushButton("Browse...")
        self.csv_check = QCheckBox(f"particle table ({CSV_NAME})")
        self.csv_check.setChecked(True)
        self.export_button = QPushButton("Export all labels")
        self.export_button.setToolTip(
            "One uint16 TIFF per Labels layer (pixel size and unit included when the layer "
            "has a scale), opened by Fiji as a label image"
        )
        self.progress = ProgressPanel()
        self.progress.cancel_button.hide()
        hint = QLabel("To save one layer: select it, then File > Save Selected Layers (.tif).")
        hint.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(self.folder_button)
        form = QFormLayout()
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
        self.written: list[Path] = []

    def _folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export labels into")
        if path:
            self.folder_edit.setText(path)

    def export_all(self, folder: str | None = None) -> Any:
        """Export every Labels layer into ``folder`` (default: the folder field).

        Returns the worker, or ``None`` when nothing was started (no Labels layer, no
        folder, or overwriting declined).
        """
        folder = folder if isinstance(folder, str) and folder else self.folder_edit.text()
        folder = folder.strip()
        layers = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
        if not layers:
            notify_warning(
                "There is no Labels layer to export: segment an image first (Segment widget)."
            )
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
                    "images and 3-D stacks can be exported: delete or split it, then try again."
                )
                return None
        csv = self.csv_check.isChecked()
        paths = export_plan([layer.name for layer in layers], out, csv)
        existing = [p for p in paths if p.exists()]
        if existing and not self.confirm_overwrite(existing):
            notify_info("Export cancelled: no file was changed.")
            return None
        items = []
        for layer in layers:
            units = getattr(layer, "units", None)
            unit = short_unit(units[-1]) if units else None
            # a copy: the user may keep painting while the files are written
            items.append((layer.name, np.array(layer.data), tuple(layer.scale), unit))
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
