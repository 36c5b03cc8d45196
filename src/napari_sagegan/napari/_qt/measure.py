"""The "Measure" dock widget: particle table, size / spacing histograms, g(r), colouring.

Thin: every number comes from :func:`napari_sagegan.api.measure`, run in a worker thread
(:class:`~napari_sagegan.napari._qt.common.DockBase`); the widget only gathers its inputs
(:meth:`MeasureWidget.parameters`), shows the result and writes the CSV
(:func:`napari_sagegan.io.tables.write_measurements`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QPushButton,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan import api
from napari_sagegan.napari._qt.common import DockBase
from napari_sagegan.napari._qt.parts import button_row, combo_box, double_spin_box, text_label
from napari_sagegan.napari.layers import layer_pixel_size
from napari_sagegan.util.progress import run_to_end

if TYPE_CHECKING:  # pragma: no cover
    from napari_sagegan.engine.analysis.measure import Measurements

_NO_IMAGE = "(none)"
#: Properties bounded to [0, 1]: coloured on that fixed range so images compare.
_UNIT_RANGE = ("psi6", "psi4", "circularity", "solidity")
_NAN_COLOUR = (0.5, 0.5, 0.5, 1.0)


class _TableModel(QAbstractTableModel):
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


class MeasureWidget(DockBase):
    """Measure the particles of a Labels layer, in nm when the pixel size is known."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        #: The last result, or ``None``.
        self.result: Measurements | None = None
        self._result_layer: Labels | None = None
        self._original_colormaps: dict[int, Any] = {}

        self.labels_combo = combo_box(tooltip="The Labels layer to measure (0 = background)")
        self.image_combo = combo_box(
            tooltip="Optional: the micrograph, for each particle's mean intensity"
        )
        self.pixel_size = double_spin_box(
            0.0,
            1e6,
            0.0,
            decimals=4,
            suffix=" nm",
            special="unknown: pixels",
            tooltip="nm per pixel; filled in from the layers' metadata or scale when they "
            "carry it. 0 measures in pixels",
        )
        self.include_border = QCheckBox("include particles touching the border in statistics")
        self.measure_button = QPushButton("Measure")
        self.status = text_label()

        self.table_model = _TableModel()
        proxy = QSortFilterProxyModel(self)
        proxy.setSourceModel(self.table_model)
        proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.table_view = QTableView()
        self.table_view.setModel(proxy)
        self.table_view.setSortingEnabled(True)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 6), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(360)

        self.tabs = QTabWidget()
        self.tabs.addTab(self.table_view, "Table")
        self.tabs.addTab(self.canvas, "Plots")

        self.colour_combo = combo_box(
            tooltip="Colour the particles by this property (grey: undefined)"
        )
        self.colour_button = QPushButton("Colour")
        self.reset_button = QPushButton("Reset colours")
        self.export_button = QPushButton("Export CSV...")
        for b in (self.colour_button, self.reset_button, self.export_button):
            b.setEnabled(False)

        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        form.addRow("Image", self.image_combo)
        form.addRow("Pixel size", self.pixel_size)
        colour_row = button_row(self.colour_combo, self.colour_button, self.reset_button, stretch=0)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.include_border)
        layout.addWidget(self.measure_button)
        layout.addWidget(self.status)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(colour_row)
        layout.addWidget(self.export_button)
        self._busy_widgets = [self.measure_button]

        self.measure_button.clicked.connect(lambda: self.run())
        self.colour_button.clicked.connect(lambda: self.colour_by(self.colour_combo.currentText()))
        self.reset_button.clicked.connect(self.reset_colours)
        self.export_button.clicked.connect(self._export_dialog)
        self.labels_combo.currentTextChanged.connect(self._fill_pixel_size)
        self.labels_combo.currentTextChanged.connect(
            lambda *_: self.image_combo.currentText() == _NO_IMAGE and self._pick_linked_image()
        )
        self.image_combo.currentTextChanged.connect(self._fill_pixel_size)
        for event in ("inserted", "removed", "moved", "changed"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        self._refresh_layers()

    # ----------------------------------------------------------------- inputs
    def _refresh_layers(self, event: Any = None) -> None:
        before = (self.labels_combo.currentText(), self.image_combo.currentText())
        for combo, kind, extra in (
            (self.labels_combo, Labels, []),
            (self.image_combo, Image, [_NO_IMAGE]),
        ):
            current = combo.currentText()
            names = extra + [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        if self.image_combo.currentText() == _NO_IMAGE:
            self._pick_linked_image()
        if (self.labels_combo.currentText(), self.image_combo.currentText()) != before:
            self._fill_pixel_size()

    def _pick_linked_image(self, *args: Any) -> None:
        """Select the image a Labels layer was made from (``<image> labels``, ``<image>
        ground truth``), when no image is chosen yet: its pixel size and grey values."""
        name = self.labels_combo.currentText()
        for ending in (" labels", " ground truth"):
            stem = name[: -len(ending)] if name.endswith(ending) else None
            if stem and self._layer(stem, Image) is not None:
                self.image_combo.setCurrentText(stem)
                return

    def _layer(self, name: str, kind: type) -> Any:
        if name and name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            return self.viewer.layers[name]
        return None

    def labels_layer(self) -> Labels | None:
        """The chosen Labels layer."""
        return self._layer(self.labels_combo.currentText(), Labels)

    def image_layer(self) -> Image | None:
        """The chosen Image layer, or ``None``."""
        return self._layer(self.image_combo.currentText(), Image)

    def _fill_pixel_size(self, *args: Any) -> None:
        """Take the pixel size from the chosen layers (0, i.e. pixels, when they have none).

        Called when the choice of layers changes, so a value typed in stays until then.
        """
        value = layer_pixel_size(self.labels_layer()) or layer_pixel_size(self.image_layer())
        self.pixel_size.setValue(value or 0.0)

    def parameters(self) -> dict[str, Any]:
        """The arguments of :func:`napari_sagegan.api.measure` set in the widget.

        Raises
        ------
        ValueError
            No Labels layer, or an image whose shape differs from the labels'.
        """
        labels = self.labels_layer()
        if labels is None:
            raise ValueError("no Labels layer to measure: segment an image or open a mask first")
        data = np.asarray(labels.data)
        image = self.image_layer()
        pixels = None
        if image is not None:
            pixels = np.asarray(image.data)
            if pixels.shape != data.shape:
                raise ValueError(
                    f"image {image.name!r} has shape {pixels.shape} but labels {labels.name!r} "
                    f"have shape {data.shape}; choose the matching image or none"
                )
        px = self.pixel_size.value()
        return {
            "labels": [data],
            "images": [pixels] if pixels is not None else None,
            "pixel_size": px if px > 0 else None,
            "names": [labels.name],
            "include_border": self.include_border.isChecked(),
        }

    # ----------------------------------------------------------------- running
    def run(self, *, blocking: bool = False) -> Measurements | None:
        """Measure the chosen layer: in a worker thread, or here when ``blocking``.

        Returns the result when ``blocking``; otherwise it arrives in :attr:`result`.
        """
        if self.is_running:
            return None
        try:
            kwargs = self.parameters()
        except ValueError as err:
            self._error(err)
            return None
        layer = self.labels_layer()
        if blocking:
            try:
                (result,) = run_to_end(api.measure(**kwargs)).measurements
            except ValueError as err:
                self._error(err)
                return None
            self._show(result, layer)
            return result
        self.status.setText(f"measuring {layer.name}...")
        self.run_task(
            api.measure(**kwargs),
            on_yield=lambda ev: None,
            on_return=lambda measured: self._show(measured.measurements[0], layer),
            on_done=lambda status: status == "error" and self.status.setText("failed"),
        )
        return None

    def _error(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"error: {err}")
        show_error(f"Measure: {err}")

    # ----------------------------------------------------------------- results
    def _show(self, result: Measurements, layer: Labels | None) -> None:
        self.result = result
        self._result_layer = layer
        self.table_model.set_table(result.table)
        s = result.summary
        u = result.unit
        lines = [f"{s['n_particles']} particles ({s['n_touching_border']} touching the border)"]
        mean = s.get(f"equivalent_diameter_{u}_mean")
        if mean is not None:
            lines.append(
                f"diameter {mean:.3g} \u00b1 {s[f'equivalent_diameter_{u}_std']:.2g} {u}, "
                f"D50 {s[f'equivalent_diameter_{u}_d50']:.3g} {u}"
            )
        if s.get(f"nn_distance_{u}_mean") is not None:
            lines.append(f"nearest neighbour {s[f'nn_distance_{u}_mean']:.3g} {u}")
        if s.get("psi6_global") is not None:
            lines.append(
                f"psi6 {s['psi6_global']:.2f} (local {s['psi6_local_mean']:.2f}), "
                f"psi4 {s['psi4_global']:.2f}, coordination {s['coordination_mean']:.2f}"
            )
        if result.pixel_size is None:
            lines.append("pixel size unknown: measurements in pixels")
        self.status.setText("\n".join(lines))
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        numeric = [
            c
            for c in result.table.columns
            if c not in ("label", "slice")
            and is_numeric_dtype(result.table[c])
            and not is_bool_dtype(result.table[c])
        ]
        current = self.colour_combo.currentText()
        self.colour_combo.clear()
        self.colour_combo.addItems(numeric)
        self.colour_combo.setCurrentText(current if current in numeric else "psi6")
        for b in (self.colour_button, self.reset_button, self.export_button):
            b.setEnabled(True)
        if layer is not None and layer.ndim == 2 and len(result.table):
            layer.features = result.table.assign(index=result.table["label"].to_numpy())
        self._plot(result)

    def _plot(self, result: Measurements) -> None:
        t, u = result.table, result.unit
        self.figure.clear()
        ax_size, ax_nn, ax_rdf = self.figure.subplots(3, 1)
        sized = t if result.summary["border_particles_in_size_statistics"] else t[~t.touches_border]
        d = sized[f"equivalent_diameter_{u}"].to_numpy(float)
        if d.size:
            ax_size.hist(d, bins="auto", color="tab:blue")
        ax_size.set_xlabel(f"equivalent diameter ({u})")
        ax_size.set_ylabel("particles")
        nn = t[f"nn_distance_{u}"].to_numpy(float)[t["nn_edge_ok"].to_numpy(bool)]
        nn = nn[np.isfinite(nn)]
        if nn.size:
            ax_nn.hist(nn, bins="auto", color="tab:orange")
        ax_nn.set_xlabel(f"nearest-neighbour distance ({u})")
        ax_nn.set_ylabel("particles")
        ax_rdf.plot(result.rdf_r, result.rdf_g, color="tab:green")
        ax_rdf.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax_rdf.set_xlabel(f"r ({u})")
        ax_rdf.set_ylabel("g(r)")
        self.canvas.draw_idle()

    # ----------------------------------------------------------------- colour
    def colour_by(self, prop: str) -> None:
        """Colour the measured Labels layer's particles by a table column (viridis).

        Particles where the property is undefined (e.g. psi6 at the border) are grey.
        In a stack, a label is coloured by its mean over the slices.
        """
        from matplotlib import colormaps
        from napari.utils.colormaps import DirectLabelColormap

        layer = self._result_layer
        if self.result is None or layer is None or layer not in self.viewer.layers:
            self._error(ValueError("measure a Labels layer first"))
            return
        t = self.result.table
        if prop not in t.columns:
            self._error(ValueError(f"no property {prop!r} in the table"))
            return
        values = (
            t.assign(_v=t[prop].astype(float)).groupby("label")["_v"].mean()
        )  # one value per label (a stack may repeat labels)
        finite = values[np.isfinite(values.to_numpy())]
        if prop in _UNIT_RANGE:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        cmap = colormaps["viridis"]
        colours: dict[int | None, Any] = {None: np.array(_NAN_COLOUR), 0: np.zeros(4)}
        for label, v in values.items():
            colours[int(label)] = (
                np.array(cmap((v - lo) / span)) if np.isfinite(v) else np.array(_NAN_COLOUR)
            )
        self._original_colormaps.setdefault(id(layer), layer.colormap)
        layer.colormap = DirectLabelColormap(color_dict=colours)
        self.status.setText(
            self.status.text().split("\ncoloured by")[0]
            + f"\ncoloured by {prop}: {lo:.3g} (purple) to {hi:.3g} (yellow)"
        )

    def reset_colours(self) -> None:
        """Give the measured Labels layer back the colours it had before :meth:`colour_by`."""
        layer = self._result_layer
        if layer is not None and id(layer) in self._original_colormaps:
            layer.colormap = self._original_colormaps.pop(id(layer))

    # ----------------------------------------------------------------- export
    def export_csv(self, path: str | Path) -> Path:
        """Write the table to ``path`` and the summary to ``<stem>.summary.json`` beside it."""
        from napari_sagegan.io.tables import write_measurements

        if self.result is None:
            raise ValueError("nothing to export yet: press Measure first")
        layer = self._result_layer
        image = self.image_layer()
        write_measurements(
            path,
            self.result,
            labels_name=layer.name if layer is not None else None,
            image_name=image.name if image is not None else None,
            pixel_size_source="widget",
        )
        return Path(path)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export particle table", "", "CSV (*.csv)")
        if not path:
            return
        if not path.lower().endswith(".csv"):
            path += ".csv"
        try:
            self.export_csv(path)
        except (OSError, ValueError) as err:
            self._error(err)
            return
        from napari.utils.notifications import show_info

        show_info(f"wrote {path}")
