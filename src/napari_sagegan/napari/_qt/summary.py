"""The Measure dock's "Summary" tab: one row per segmented image, pooled rows, CSV export;
and :class:`TableModel`, the read-only table view of a DataFrame both tabs use.

Thin: the rows come from :func:`napari_sagegan.napari.summary.summarise` (in the Measure
dock's worker), the file from :func:`napari_sagegan.io.tables.write_summary_table`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from qtpy.QtWidgets import QPushButton, QTableView, QVBoxLayout, QWidget

from napari_sagegan.napari._qt.parts import ask_csv_path, button_row, text_label
from napari_sagegan.napari.summary import POOLED_SOURCE


class TableModel(QAbstractTableModel):
    """A read-only view of a pandas DataFrame (sorts on the raw values)."""

    def __init__(self, table: Any = None) -> None:
        super().__init__()
        self._table = table

    def set_table(self, table: Any) -> None:
        self.beginResetModel()
        self._table = table
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if self._table is None or parent.isValid() else len(self._table)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if self._table is None or parent.isValid() else self._table.shape[1]

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if self._table is None or not index.isValid():
            return None
        value = self._table.iat[index.row(), index.column()]
        if role == Qt.ItemDataRole.UserRole:
            try:
                number = float(value)
            except (TypeError, ValueError):
                return str(value)
            return -math.inf if math.isnan(number) else number
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (float, np.floating)):
            return f"{value:.4g}"
        return str(value) if str(value) != "<NA>" else ""

    def headerData(  # noqa: N802
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if role != Qt.ItemDataRole.DisplayRole or self._table is None:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return str(self._table.columns[section])
        return str(section + 1)


class SummaryPanel(QWidget):
    """Summarise every segmented image of the viewer (a tab of the Measure dock).

    Attributes
    ----------
    table : pandas.DataFrame or None
        The last summary (see :func:`napari_sagegan.napari.summary.summarise`).
    """

    def __init__(self, dock: Any) -> None:
        """``dock``: the Measure dock (its worker, viewer, state and border setting)."""
        super().__init__(dock)
        self.dock = dock
        self.table: Any = None
        self.run_button = QPushButton("Summarise all segmented images")
        self.run_button.setToolTip(
            "Measure every Labels layer made by Segment (or every Labels layer when there is "
            "none), each with its own pixel size: count, D10 / D50 / D90, mean and std of "
            "the equivalent diameter, its log-normal fit, number density; then all pooled"
        )
        self.export_button = QPushButton("Export summary CSV...")
        self.export_button.setEnabled(False)
        self.status = text_label()
        self.model = TableModel()
        proxy = QSortFilterProxyModel(self)
        proxy.setSourceModel(self.model)
        proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.view = QTableView()
        self.view.setModel(proxy)
        self.view.setSortingEnabled(True)
        lay = QVBoxLayout(self)
        lay.addLayout(button_row(self.run_button, self.export_button, stretch=None))
        lay.addWidget(self.status)
        lay.addWidget(self.view, 1)
        self.run_button.clicked.connect(lambda: self.run())
        self.export_button.clicked.connect(self._export_dialog)

    def run(self, *, blocking: bool = False) -> Any:
        """Summarise the viewer's segmented images: in the dock's worker, or here when
        ``blocking`` (returns the table then)."""
        from napari_sagegan.napari.summary import summarise, summary_items
        from napari_sagegan.util.progress import run_to_end

        dock = self.dock
        if dock.is_running:
            return None
        items = summary_items(dock.viewer.layers, dock.state)
        if not items:
            dock._error(ValueError("there is no Labels layer to summarise: segment first"))
            self.status.setText("no Labels layer to summarise")
            return None
        border = dock.include_border.isChecked()
        if blocking:
            try:
                table = run_to_end(summarise(items, include_border=border))
            except ValueError as err:
                dock._error(err)
                return None
            self._show(table)
            return table
        self.status.setText(f"summarising {len(items)} Labels layer(s)...")
        dock.run_task(
            summarise(items, include_border=border),
            on_yield=lambda ev: self.status.setText(f"{ev.step}/{ev.total}: {ev.message}"),
            on_return=self._show,
            on_done=lambda status: status == "error" and self.status.setText("failed"),
        )
        return None

    def _show(self, table: Any) -> None:
        self.table = table
        self.model.set_table(table)
        self.view.resizeColumnsToContents()
        self.export_button.setEnabled(True)
        pooled = table["pixel_size_source"].eq(POOLED_SOURCE)
        n_images = int((~pooled).sum())
        unknown = table["pixel_size_nm"].isna() & ~pooled
        line = f"{n_images} image(s) summarised"
        if unknown.any():
            names = ", ".join(table.loc[unknown, "labels"].astype(str))
            line += f"; pixel size unknown (sizes in px) for: {names}"
        self.status.setText(line)

    def export_csv(self, path: str | Path) -> Path:
        """Write the summary table to ``path`` (CSV, atomically)."""
        from napari_sagegan.io.tables import write_summary_table

        if self.table is None:
            raise ValueError("nothing to export yet: press Summarise first")
        return write_summary_table(path, self.table)

    def _export_dialog(self) -> None:
        path = ask_csv_path(self, "Export summary table")
        if path is None:
            return
        try:
            self.export_csv(path)
        except (OSError, ValueError) as err:
            self.dock._error(err)
            return
        from napari.utils.notifications import show_info

        show_info(f"wrote {path}")
