"""The "Proofread particles" dock: fix instances by clicking, least sure particles first.

Thin: the label operations are :mod:`napari_sagegan.napari.proofread`'s (pure NumPy, tested
without Qt); this dock turns clicks on the selected Labels layer into them
(``layer.mouse_drag_callbacks``), writes each edit through ``Labels.data_setitem`` inside
``block_history`` (the way napari paints: the layer counts as edited for Correct and
retrain, and ``Ctrl+Z`` undoes it too), keeps the particle table (``layer.features``) in
step, and runs the network's maps for "Add" in a worker.

Modes (one at a time; clicking a mode again turns it off):

- **Delete**: click a particle.
- **Merge**: click two touching particles (the first keeps its label).
- **Split**: click two points inside one particle: a watershed cuts it between them.
- **Add**: click a missed particle: it is grown from the network's maps around the click
  (probability above the "grow above" level, bounded by the distance map and one particle
  diameter), or from the image intensity (a local Otsu threshold).

"Next low-confidence particle" centres the view on the next particle by ascending network
confidence and selects it; "Undo" reverts the last operation of this dock.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFormLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_sagegan.io.export import short_unit
from napari_sagegan.napari import proofread as ops
from napari_sagegan.napari._qt.common import ModelDock, notify_error, notify_info
from napari_sagegan.napari._qt.parts import (
    button_row,
    combo_box,
    device_combo,
    double_spin_box,
    push_button,
    text_label,
)
from napari_sagegan.napari.layers import source_image_name

#: The modes and what the dock asks the user to do in each.
HINTS = {
    "delete": "Click a particle to delete it.",
    "merge": "Click two touching particles to merge them.",
    "split": "Click two points inside one particle to split it between them.",
    "add": "Click a missed particle to add it.",
}
#: "Add" sources.
GROW_SOURCES = ("network maps", "image intensity")
#: Operations "Undo" remembers.
UNDO_DEPTH = 50


class ProofreadWidget(ModelDock):
    """Proofread the selected Labels layer: delete, merge, split, add; next low-confidence.

    The methods the buttons and clicks call take points in the layer's data coordinates
    (``(row, col)``, or ``(z, row, col)`` for a stack), so scripts and tests drive the dock
    without a mouse: :meth:`delete_at`, :meth:`merge_at`, :meth:`split_at`, :meth:`add_at`,
    :meth:`next_low_confidence`, :meth:`undo`; :meth:`click` is what a click in a mode does.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.target = text_label()
        self.mode_buttons: dict[str, QPushButton] = {}
        self.mode_group = QButtonGroup(self)
        self.mode_group.setExclusive(False)
        for mode in HINTS:
            button = push_button(mode.capitalize(), HINTS[mode])
            button.setCheckable(True)
            self.mode_buttons[mode] = button
            self.mode_group.addButton(button)
            button.toggled.connect(lambda on, m=mode: self._mode_toggled(m, on))
        self.grow_combo = combo_box(
            GROW_SOURCES,
            "Add grows the clicked particle from the network's maps (the current model, on "
            "a crop around the click) or from the image intensity (a local threshold)",
        )
        self.grow_spin = double_spin_box(
            0.0, 0.95, 0.0, decimals=2, step=0.05, special="auto",
            tooltip="Add keeps the pixels whose particle probability is above this level; "
            "auto: halfway between the local background and the probability at the click",
        )  # fmt: skip
        self.device_combo = device_combo("Where the network runs for Add")
        self.next_button = push_button(
            "Next low-confidence particle",
            "Centre the view on the next particle by ascending network confidence and "
            "select it (the least sure first)",
        )
        self.undo_button = push_button("Undo", "Revert the last operation of this dock")
        self.skip_border_check = QCheckBox("skip particles cut by the image border")
        self.skip_border_check.setChecked(True)
        self.skip_border_check.setToolTip(
            "They are partial (so the network is less sure of them) and left out of the size "
            "statistics: visit the others first"
        )
        self.status = text_label()

        form = QFormLayout()
        form.addRow("Add from", self.grow_combo)
        form.addRow("grow above", self.grow_spin)
        form.addRow("Device", self.device_combo)
        lay = QVBoxLayout(self)
        lay.addWidget(self.target)
        lay.addLayout(button_row(*self.mode_buttons.values()))
        lay.addLayout(form)
        lay.addLayout(button_row(self.next_button, self.undo_button))
        lay.addWidget(self.skip_border_check)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self._busy_widgets = [self.mode_buttons["add"]]

        self.mode: str | None = None
        self._pending: list[tuple[int, ...]] = []
        self._undo: list[tuple[Any, int | None, ops.Edit, Any]] = []
        self._visited: dict[int, tuple[float, int]] = {}
        self._hooked: Any = None  # weakref to the layer holding our mouse callback
        self._last: Any = None  # weakref to the last Labels layer proofread
        self.next_button.clicked.connect(lambda: self.next_low_confidence())
        self.undo_button.clicked.connect(lambda: self.undo())
        napari_viewer.layers.selection.events.active.connect(self._on_active)
        self._on_active()

    # ------------------------------------------------------------------ target layer
    def labels_layer(self) -> Labels | None:
        """The Labels layer proofread: the selected one, else the last one used."""
        active = self.viewer.layers.selection.active
        if isinstance(active, Labels):
            self._last = weakref.ref(active)
            return active
        layer = self._last() if self._last is not None else None
        return layer if layer is not None and layer in self.viewer.layers else None

    def image_layer(self, labels: Labels) -> Image | None:
        """The image the Labels layer was made from, when it is open."""
        name = source_image_name(labels)
        layers = self.viewer.layers
        if name and name in layers and isinstance(layers[name], Image):
            return layers[name]
        return None

    def _on_active(self, *_: Any) -> None:
        try:
            layer = self.labels_layer()
            self.target.setText(
                f"Proofreading: {layer.name}" if layer is not None else "Select a Labels layer."
            )
        except RuntimeError:  # the widget was deleted; the viewer outlives it
            return
        self._pending = []
        self._hook(layer if self.mode else None)

    # ------------------------------------------------------------------ modes and clicks
    def set_mode(self, mode: str | None) -> None:
        """Turn a mode on (``"delete"``, ``"merge"``, ``"split"``, ``"add"``) or off."""
        if mode is not None and mode not in HINTS:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(HINTS)}")
        for m, button in self.mode_buttons.items():
            button.blockSignals(True)
            button.setChecked(m == mode)
            button.blockSignals(False)
        self.mode = mode
        self._pending = []
        layer = self.labels_layer()
        if mode is not None and layer is not None:
            layer.mode = "pan_zoom"  # a click must not paint
        self._hook(layer if mode else None)
        self.status.setText(HINTS[mode] if mode else "")

    def _mode_toggled(self, mode: str, on: bool) -> None:
        self.set_mode(mode if on else None)

    def _hook(self, layer: Labels | None) -> None:
        old = self._hooked() if self._hooked is not None else None
        if old is not None and old is not layer and self._on_mouse in old.mouse_drag_callbacks:
            old.mouse_drag_callbacks.remove(self._on_mouse)
        self._hooked = None
        if layer is not None:
            if self._on_mouse not in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.append(self._on_mouse)
            self._hooked = weakref.ref(layer)

    def _on_mouse(self, layer: Labels, event: Any) -> None:
        if getattr(event, "type", "mouse_press") != "mouse_press":
            return
        if getattr(event, "button", 1) != 1 or self.mode is None:
            return
        try:
            point = tuple(float(v) for v in layer.world_to_data(event.position))
            self.click(point)
        except RuntimeError as err:  # the dock was closed: drop the hook
            if "deleted" in str(err):
                layer.mouse_drag_callbacks.remove(self._on_mouse)
            else:
                raise

    def click(self, point: tuple[float, ...]) -> Any:
        """What a click at ``point`` (data coordinates) does in the current mode."""
        if self.mode == "delete":
            return self.delete_at(point)
        if self.mode == "add":
            return self.add_at(point)
        if self.mode in ("merge", "split"):
            self._pending.append(tuple(point))
            if len(self._pending) < 2:
                layer = self.labels_layer()
                found = self._label(layer, point) if layer is not None else 0
                if not found:
                    self._pending = []
                    self.status.setText("No particle there: " + HINTS[self.mode].lower())
                else:
                    second = (
                        "the particle to merge into it"
                        if self.mode == "merge"
                        else ("a second point inside it")
                    )
                    self.status.setText(f"Particle {found} chosen: click {second}.")
                return None
            first, second = self._pending[:2]
            self._pending = []
            if self.mode == "merge":
                return self.merge_at(first, second)
            return self.split_at(first, second)
        return None

    # ------------------------------------------------------------------ operations
    def _plane(self, layer: Labels, point: tuple[float, ...]) -> tuple[int | None, np.ndarray]:
        data = layer.data
        if not isinstance(data, np.ndarray):
            raise ValueError(
                f"the Labels layer {layer.name!r} is not held in memory (a lazy array): "
                "proofreading edits a NumPy label image"
            )
        if data.ndim == 2:
            return None, data
        if data.ndim == 3:
            z = int(round(float(point[0])))
            if not 0 <= z < data.shape[0]:
                raise ValueError(f"slice {z} is outside the stack (0-{data.shape[0] - 1})")
            return z, data[z]
        raise ValueError(
            f"the Labels layer {layer.name!r} has {data.ndim} dimensions; proofreading works "
            "on 2-D labels and 3-D stacks"
        )

    def _label(self, layer: Labels, point: tuple[float, ...]) -> int:
        _, plane = self._plane(layer, point)
        return ops.label_at(plane, point)

    def _need_layer(self) -> Labels | None:
        layer = self.labels_layer()
        if layer is None:
            notify_error("Select a Labels layer to proofread (segment an image first)")
        return layer

    def _run(self, make: Any) -> ops.Edit | None:
        """``make(layer, z, plane) -> Edit``, applied; bad input is one notification."""
        layer = self._need_layer()
        if layer is None:
            return None
        try:
            edit, z = make(layer)
        except ValueError as err:
            notify_error(str(err))
            self.status.setText(str(err)[:1].upper() + str(err)[1:])
            return None
        self.apply(layer, z, edit)
        return edit

    def apply(self, layer: Labels, z: int | None, edit: ops.Edit, *, remember: bool = True):
        """Write ``edit`` into ``layer`` (slice ``z``), refresh its table, remember it."""
        before = layer.features
        with layer.block_history():
            layer.data_setitem(edit.indices(() if z is None else (z,)), edit.values())
        plane = layer.data if z is None else layer.data[z]
        units = getattr(layer, "units", None)
        unit = short_unit(units[-1]) if units else None
        layer.features = ops.refresh_features(
            before, plane, edit, tuple(layer.scale), unit, slice_index=z
        )
        if remember:
            self._undo.append((weakref.ref(layer), z, edit, before))
            del self._undo[:-UNDO_DEPTH]
        self.status.setText(edit.what[:1].upper() + edit.what[1:] + ".")

    def delete_at(self, point: tuple[float, ...]) -> ops.Edit | None:
        """Delete the particle under ``point``."""

        def make(layer):
            z, plane = self._plane(layer, point)
            return ops.delete_particle(plane, ops.label_at(plane, point)), z

        return self._run(make)

    def merge_at(self, first: tuple[float, ...], second: tuple[float, ...]) -> ops.Edit | None:
        """Merge the particle under ``second`` into the one under ``first``."""

        def make(layer):
            z, plane = self._plane(layer, first)
            if z is not None and int(round(float(second[0]))) != z:
                raise ValueError("click both particles in the same slice")
            a, b = ops.label_at(plane, first), ops.label_at(plane, second)
            return ops.merge_particles(plane, a, b), z

        return self._run(make)

    def split_at(self, first: tuple[float, ...], second: tuple[float, ...]) -> ops.Edit | None:
        """Split the particle under ``first`` between ``first`` and ``second``."""

        def make(layer):
            z, plane = self._plane(layer, first)
            label = ops.label_at(plane, first)
            new = int(np.max(layer.data)) + 1  # unique in a whole stack
            return ops.split_particle(plane, label, [first, second], new_label=new), z

        return self._run(make)

    def add_at(self, point: tuple[float, ...], *, blocking: bool = False) -> Any:
        """Add the missed particle at ``point``.

        From the network's maps (the current model on a crop around the click, in a worker;
        ``blocking`` runs it here and returns the edit) or from the image intensity (at
        once). Returns the edit, the worker, or ``None`` when nothing could be added.
        """
        layer = self._need_layer()
        if layer is None:
            return None
        image = self.image_layer(layer)
        if image is None:
            notify_error(
                f"Open the image of {layer.name!r} (Add grows the particle from the image "
                "or from the network's view of it)"
            )
            return None
        try:
            z, plane = self._plane(layer, point)
            if tuple(np.shape(image.data)) != tuple(layer.data.shape):
                raise ValueError(
                    f"the image {image.name!r} has shape {np.shape(image.data)} but the labels "
                    f"{tuple(layer.data.shape)}: they must match pixel for pixel"
                )
            size = self.state.particle_size
            fallback = size.value if not size.auto and size.unit == "px" else None
            d = ops.typical_diameter(plane, fallback)
            box = ops.window(point, int(max(3 * d, 32)), plane.shape)
            crop = np.asarray(image.data[box] if z is None else image.data[z][box])
            occupied = plane[box] != 0
            y, x = (int(round(float(v))) for v in point[-2:])
            local = (y - box[0].start, x - box[1].start)
        except ValueError as err:
            notify_error(str(err))
            return None
        ref = weakref.ref(layer)

        def added(result: tuple[np.ndarray, float]) -> ops.Edit | None:
            target = ref()
            if target is None or target not in self.viewer.layers:
                return None
            region, conf = result

            def make(_layer):
                _z, now = self._plane(target, point)
                new = int(np.max(target.data)) + 1
                return ops.add_particle(now, region, box, new_label=new, confidence=conf), _z

            self._last = weakref.ref(target)
            return self._run(make)

        if self.grow_combo.currentText() == GROW_SOURCES[1]:
            try:
                region = ops.grow_from_image(crop, local, occupied, max_radius=d)
            except ValueError as err:
                notify_error(str(err))
                return None
            return added((region, float("nan")))
        entry = self.store.current
        if not self.check_model(entry):
            return None
        gen = ops.grow_job(
            entry, crop, local, occupied, d, threshold=float(self.grow_spin.value()) or None,
            device=self.device_combo.currentText(), threads=self.threads,
        )  # fmt: skip
        if blocking:
            from napari_sagegan.util.progress import run_to_end

            try:
                return added(run_to_end(gen))
            except ValueError as err:
                notify_error(str(err))
                return None
        self.status.setText("Growing the particle from the network's maps ...")
        return self.run_task(
            gen,
            on_yield=lambda ev: None,
            on_return=added,
            on_done=lambda status: (
                None
                if status == "done"
                else self.status.setText(
                    "Add failed: see the notification." if status == "error" else "Add cancelled."
                )
            ),
        )

    # ------------------------------------------------------------------ review
    def next_low_confidence(self) -> int | None:
        """Centre the view on the next particle by ascending confidence and select it.

        Returns its label (``None``: no particle has a confidence, e.g. a layer not made by
        Segment). After the last one it starts again from the lowest.
        """
        layer = self._need_layer()
        if layer is None:
            return None
        features = layer.features
        skip = ops.border_labels(layer.data) if self.skip_border_check.isChecked() else ()
        order = ops.low_confidence_order(features, skip)
        if not order:
            notify_info(
                f"The particles of {layer.name!r} have no network confidence: segment the "
                "image with the Segment widget to get one"
                if not ops.low_confidence_order(features)
                else f"Every scored particle of {layer.name!r} touches the image border"
            )
            return None
        key = id(layer)
        found = ops.next_low_confidence(features, self._visited.get(key), skip)
        wrapped = found is None
        if wrapped:
            found = order[0]
        label, conf = found
        self._visited[key] = (conf, label)
        row = features[features["label"] == label].iloc[0]
        centre = [float(row["centroid_y_px"]), float(row["centroid_x_px"])]
        if layer.data.ndim == 3:
            centre.insert(0, float(row["slice"]) if "slice" in row else 0.0)
        world = np.asarray(layer.data_to_world(centre), float)
        diameter = float(row.get("equivalent_diameter_px", 0.0) or 0.0)
        if diameter > 0:
            # about ten diameters across the view: "fit the whole layer" (reset_view) tells
            # the zoom of a view as wide as the layer's extent
            self.viewer.reset_view()
            side = float(np.max(np.ptp(np.asarray(layer.extent.world, float)[:, -2:], axis=0)))
            px = float(np.mean(np.abs(layer.scale[-2:])))
            fit = float(self.viewer.camera.zoom)
            self.viewer.camera.zoom = max(fit, fit * side / (10.0 * diameter * px))
        self.viewer.camera.center = tuple(world[-2:])
        if layer.data.ndim == 3:
            self.viewer.dims.set_point(0, world[0])
        layer.selected_label = label
        rank = order.index((label, conf)) + 1
        text = f"Particle {label}: confidence {conf:.2f} ({rank} of {len(order)}, lowest first)"
        self.status.setText(("From the lowest again. " if wrapped else "") + text)
        return label

    def undo(self) -> ops.Edit | None:
        """Revert the last operation of this dock (its pixels, and the particle table)."""
        while self._undo:
            ref, z, edit, features = self._undo.pop()
            layer = ref()
            if layer is None or layer not in self.viewer.layers:
                continue
            back = edit.inverse()
            with layer.block_history():
                layer.data_setitem(back.indices(() if z is None else (z,)), back.values())
            layer.features = features
            self.status.setText(back.what[:1].upper() + back.what[1:] + ".")
            return back
        self.status.setText("Nothing to undo.")
        return None

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self._hook(None)
        super().closeEvent(event)
