"""The "Measure" dock widget: particle table, size / spacing histograms (with the fitted
log-normal law), g(r), colouring, and the summary across images (its own tab,
:class:`~napari_sagegan.napari._qt.summary.SummaryPanel`).

Thin: every number comes from :func:`napari_sagegan.api.measure`, run in a worker thread
(:class:`~napari_sagegan.napari._qt.common.DockBase`); the widget only gathers its inputs
(:meth:`MeasureWidget.parameters`), shows the result and writes the CSV
(:func:`napari_sagegan.io.tables.write_measurements`). The image follows the Labels choice
to the image the labels were made from, the pixel size is that image's
(:func:`napari_sagegan.napari.calibration.labels_pixel_size`), and a choice that does not
fit (another shape, another source, another pixel size, none) is a warning in the dock.

Why ~570 lines: choosing the layers safely (following, warning, keeping a typed pixel size
for the image) is half of the dock; the rest is one view each of the result (status, table,
plots, colours, CSV).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QSortFilterProxyModel, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QPushButton,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan import api
from napari_sagegan.io.pixel_size import PixelSize
from napari_sagegan.napari._qt.common import DockBase
from napari_sagegan.napari._qt.parts import (
    ask_csv_path,
    button_row,
    combo_box,
    double_spin_box,
    text_label,
)
from napari_sagegan.napari._qt.summary import SummaryPanel, TableModel
from napari_sagegan.napari.calibration import (
    apply_pixel_size,
    image_name_of,
    labels_pixel_size,
    pixel_size_of,
    source_image,
    watch_viewer,
)
from napari_sagegan.napari.state import viewer_state
from napari_sagegan.util.progress import run_to_end

if TYPE_CHECKING:  # pragma: no cover
    from napari_sagegan.engine.analysis.measure import Measurements

_NO_IMAGE = "(none)"
#: Properties bounded to [0, 1]: coloured on that fixed range so images compare.
_UNIT_RANGE = ("psi6", "psi4", "circularity", "solidity")
_NAN_COLOUR = (0.5, 0.5, 0.5, 1.0)


class MeasureWidget(DockBase):
    """Measure the particles of a Labels layer, in nm when the pixel size is known."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.state = viewer_state(napari_viewer)
        watch_viewer(napari_viewer, self.state)
        #: The last result, or ``None``.
        self.result: Measurements | None = None
        self._result_layer: Labels | None = None
        self._result_image: Image | None = None
        self._result_source: str | None = None
        self._original_colormaps: dict[int, Any] = {}

        self.labels_combo = combo_box(tooltip="The Labels layer to measure (0 = background)")
        self.image_combo = combo_box(
            tooltip="The micrograph the labels were made from (chosen with them): each "
            "particle's mean intensity, and the pixel size"
        )
        self.pixel_size = double_spin_box(
            0.0,
            1e6,
            0.0,
            decimals=4,
            suffix=" nm",
            special="unknown: pixels",
            tooltip="nm per pixel of the labels' image: filled in from the image it was made "
            "from (its file or the value set for it), else from the labels. A value typed "
            "here is kept for that image, in every dock. 0 measures in pixels",
        )
        self.warning = text_label()
        self.warning.setStyleSheet("color: #e8a33d;")
        self.warning.setVisible(False)
        self.include_border = QCheckBox("include particles touching the border in statistics")
        self.measure_button = QPushButton("Measure")
        self.status = text_label()

        self.table_model = TableModel()
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
        self.summary = SummaryPanel(self)
        self.tabs.addTab(self.summary, "Summary")

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
        form.addRow("", self.warning)
        colour_row = button_row(self.colour_combo, self.colour_button, self.reset_button, stretch=0)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.include_border)
        layout.addWidget(self.measure_button)
        layout.addWidget(self.status)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(colour_row)
        layout.addWidget(self.export_button)
        self._busy_widgets = [self.measure_button, self.summary.run_button]

        self.measure_button.clicked.connect(lambda: self.run())
        self.colour_button.clicked.connect(lambda: self.colour_by(self.colour_combo.currentText()))
        self.reset_button.clicked.connect(self.reset_colours)
        self.export_button.clicked.connect(self._export_dialog)
        self.labels_combo.currentTextChanged.connect(self._labels_chosen)
        self.image_combo.currentTextChanged.connect(self._image_chosen)
        self.pixel_size.editingFinished.connect(self.set_pixel_size)
        self.pixel_size.valueChanged.connect(lambda *_: self._check_choice())
        self.state.pixel_sizes.subscribe(self._pixel_sizes_changed)
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
        if self.labels_combo.currentText() != before[0]:
            self._labels_chosen()
        elif self.image_combo.currentText() != before[1]:
            self._image_chosen()
        else:
            self._check_choice()

    def _labels_chosen(self, *args: Any) -> None:
        """The Labels choice changed: the image follows (:meth:`_pick_linked_image`), and
        the pixel size with it."""
        self._pick_linked_image()
        self._fill_pixel_size()

    def _image_chosen(self, *args: Any) -> None:
        self._fill_pixel_size()

    def _pick_linked_image(self) -> None:
        """Select the image the chosen Labels layer was made from: its metadata, or its name
        (``<image> labels``, ``<image> ground truth``;
        :func:`~napari_sagegan.napari.calibration.image_name_of`). For labels of unknown
        origin, keep the
        chosen image if it has their shape, else take the one image that has it (none when
        several do: their pixel sizes may differ)."""
        labels = self.labels_layer()
        if labels is None:
            return
        target = self._linked_image_name(labels)
        if target is None:
            current = self.image_layer()
            if current is not None and current.data.shape == labels.data.shape:
                return
            same = [
                ly.name
                for ly in self.viewer.layers
                if isinstance(ly, Image) and ly.data.shape == labels.data.shape
            ]
            target = same[0] if len(same) == 1 else _NO_IMAGE
        self.image_combo.blockSignals(True)
        self.image_combo.setCurrentText(target)
        self.image_combo.blockSignals(False)

    def _linked_image_name(self, labels: Labels) -> str | None:
        """The open Image layer ``labels`` were made from, or ``None``."""
        image = source_image(self.viewer.layers, labels)
        return image.name if image is not None else None

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

    def _known_pixel_size(self) -> PixelSize:
        """The pixel size of the chosen labels: of the image they were made from (set by the
        user or read from its file), else their own, else the chosen image's."""
        labels = self.labels_layer()
        found = labels_pixel_size(self.viewer.layers, labels, self.state)
        if not found.known and labels is not None:
            image = self.image_layer()
            if image is not None and image.data.shape == labels.data.shape:
                found = pixel_size_of(image, self.state)
        return found

    def _fill_pixel_size(self, *args: Any) -> None:
        """Show the pixel size of the chosen layers (0, i.e. pixels, when none is known).

        Called when the choice of layers changes (or a pixel size is set for an image in
        any dock), so a value typed in stays until then.
        """
        found = self._known_pixel_size()
        self.pixel_size.blockSignals(True)
        self.pixel_size.setValue(found.nm or 0.0)
        self.pixel_size.blockSignals(False)
        self._check_choice()

    def _pixel_sizes_changed(self) -> None:
        try:
            self._fill_pixel_size()
        except RuntimeError:  # deleted widget
            pass

    def pixel_size_target(self) -> str | None:
        """The layer a pixel size typed here is kept for: the labels' own image when it is
        open, else the chosen image of the labels' shape, else the Labels layer itself."""
        labels = self.labels_layer()
        if labels is None:
            return None
        linked = self._linked_image_name(labels)
        if linked is not None:
            return linked
        image = self.image_layer()
        if image is not None and image.data.shape == labels.data.shape:
            return image.name
        return labels.name

    def set_pixel_size(self, nm: float | None = None) -> bool:
        """Keep the pixel size in the field (or ``nm``) for the labels' image, for every
        dock (:func:`~napari_sagegan.napari.calibration.apply_pixel_size`): the image and
        the layers made from it get that scale. ``0`` forgets a value set before."""
        if nm is not None:
            self.pixel_size.setValue(float(nm))
        target = self.pixel_size_target()
        if target is None:
            return False
        value = self.pixel_size.value()
        known = self._known_pixel_size().nm or 0.0
        if abs(value - known) <= 1e-9 * max(value, known, 1e-12):
            return True  # unchanged (focus left the field): nothing to record
        try:
            apply_pixel_size(self.viewer.layers, target, value or None, self.state)
        except ValueError as err:
            self._error(err)
            return False
        return True

    def _check_choice(self) -> list[str]:
        """Warn in the dock when the chosen image does not belong to the labels: another
        shape, another source image, another pixel size, or no pixel size at all. Returns
        the warnings shown."""
        labels, image = self.labels_layer(), self.image_layer()
        warnings: list[str] = []
        if labels is not None:
            source = image_name_of(labels)
            if image is not None and image.data.shape != labels.data.shape:
                warnings.append(
                    f"the image {image.name!r} has shape {image.data.shape} but the labels "
                    f"{labels.data.shape}: choose the image they were made from, or none"
                )
            elif image is not None and source and image.name != source:
                warnings.append(
                    f"{labels.name!r} was made from {source!r}, not from {image.name!r}: the "
                    "intensities are those of another image"
                )
            if image is not None and image.data.shape == labels.data.shape:
                px_image = pixel_size_of(image, self.state).nm
                px = self.pixel_size.value()
                if px_image and px and abs(px_image - px) > 1e-3 * px:
                    warnings.append(
                        f"the pixel size used ({px:.4g} nm) is not that of {image.name!r} "
                        f"({px_image:.4g} nm): check which one is right"
                    )
            if not self.pixel_size.value() > 0:
                warnings.append(
                    "pixel size unknown: sizes in pixels; type it above (it is kept for the "
                    "image, in every dock)"
                )
        self.warning.setText("\n".join(f"\u26a0 {w}" for w in warnings))
        self.warning.setVisible(bool(warnings))
        return warnings

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
        image = self.image_layer()
        source = self.pixel_size_source()
        if blocking:
            try:
                (result,) = run_to_end(api.measure(**kwargs)).measurements
            except ValueError as err:
                self._error(err)
                return None
            self._show(result, layer, image, source)
            return result
        self.status.setText(f"measuring {layer.name}...")
        self.run_task(
            api.measure(**kwargs),
            on_yield=lambda ev: None,
            on_return=lambda measured: self._show(measured.measurements[0], layer, image, source),
            on_done=lambda status: status == "error" and self.status.setText("failed"),
        )
        return None

    def pixel_size_source(self) -> str:
        """Where the pixel size in the field comes from, for the summary JSON: the layer or
        file that gave it, ``"given"`` (typed here) or ``"none"``."""
        px = self.pixel_size.value()
        if not px > 0:
            return "none"
        known = self._known_pixel_size()
        if known.nm is not None and abs(known.nm - px) <= 1e-9 * px:
            return known.describe()
        return "given"

    def _error(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"error: {err}")
        show_error(f"Measure: {err}")

    # ----------------------------------------------------------------- results
    def _show(
        self,
        result: Measurements,
        layer: Labels | None,
        image: Image | None = None,
        source: str | None = None,
    ) -> None:
        self.result = result
        self._result_layer = layer
        self._result_image = image
        self._result_source = source
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
        if s.get(f"lognormal_median_{u}") is not None:
            lines.append(
                f"log-normal fit: median {s[f'lognormal_median_{u}']:.3g} {u}, "
                f"geometric std {s['lognormal_gsd']:.3g}"
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
            from napari_sagegan.engine.infer.confidence import with_confidence
            from napari_sagegan.napari.proofread import confidence_array

            # the network's per-particle confidence (Segment's) stays for Proofread
            table = with_confidence(result.table, confidence_array(layer.features))
            layer.features = table.assign(index=table["label"].to_numpy())
        self._plot(result)

    def _plot(self, result: Measurements) -> None:
        t, u = result.table, result.unit
        self.figure.clear()
        ax_size, ax_nn, ax_rdf = self.figure.subplots(3, 1)
        sized = t if result.summary["border_particles_in_size_statistics"] else t[~t.touches_border]
        d = sized[f"equivalent_diameter_{u}"].to_numpy(float)
        if d.size:
            _, edges, _ = ax_size.hist(d, bins="auto", color="tab:blue", label="particles")
            median = result.summary.get(f"lognormal_median_{u}")
            gsd = result.summary.get("lognormal_gsd")
            if median is not None and gsd is not None and gsd > 1.0:
                from napari_sagegan.engine.analysis.measure import lognormal_pdf

                # the density as particle counts per bin of the histogram
                x = np.linspace(max(edges[0], 1e-9), edges[-1], 200)
                counts = lognormal_pdf(x, median, gsd) * d.size * float(np.diff(edges).mean())
                ax_size.plot(
                    x,
                    counts,
                    color="tab:red",
                    label=f"log-normal: median {median:.3g} {u}, GSD {gsd:.3g}",
                )
                ax_size.legend(fontsize="small")
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
        image = self._result_image
        write_measurements(
            path,
            self.result,
            labels_name=layer.name if layer is not None else None,
            image_name=image.name if image is not None else None,
            pixel_size_source=self._result_source,
        )
        return Path(path)

    def _export_dialog(self) -> None:
        path = ask_csv_path(self, "Export particle table")
        if path is None:
            return
        try:
            self.export_csv(path)
        except (OSError, ValueError) as err:
            self._error(err)
            return
        from napari.utils.notifications import show_info

        show_info(f"wrote {path}")
