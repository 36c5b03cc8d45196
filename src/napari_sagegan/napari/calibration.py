"""The pixel size of each layer: read once, written into the layers, shared by every dock.

A micrograph's pixel size (nm per pixel) must reach every layer made from it, the
measurements and the exported files. Three places can know it, in this order of trust:

1. what the user set for the image (:class:`~napari_sagegan.napari.state.PixelSizes`,
   ``state.pixel_sizes``: typed once in Segment or Measure, or the scale bar's proposal);
2. the layer itself: ``metadata["pixel_size_nm"]``, a scale in a length unit
   (:func:`~napari_sagegan.napari.layers.layer_pixel_size`);
3. the file the layer was opened from (``layer.source.path``): napari's own TIFF reader
   drops the ImageJ, OME, FEI and Zeiss calibrations, but the file still has them.

Why the widgets read TIFF calibrations instead of this plugin's reader claiming ``*.tif``:
napari (0.9, npe2) picks readers by file-name pattern alone; two readers for one pattern
make it ask the user to choose a reader for every TIFF (``MultipleReaderError`` and the
reader dialog), unless a preference is saved. So napari keeps reading TIFFs, and
:func:`watch_viewer` writes the file's pixel size into each layer as it is added (its
``scale``, ``units`` and ``metadata``), from the moment a dock of this plugin is open.

Qt-free: layers are read and changed through their plain attributes (``name``, ``data``,
``scale``, ``units``, ``metadata``, ``source``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from napari_sagegan.io.pixel_size import PixelSize
from napari_sagegan.napari.layers import layer_pixel_size, source_image_name
from napari_sagegan.util.units import check_pixel_size

#: ``metadata["pixel_size_source"]`` of a pixel size the user set.
GIVEN = "given"


def _kind(layer: Any) -> str:
    return type(layer).__name__.lower()


def _tiff_path(layer: Any) -> str | None:
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path and str(path).lower().endswith((".tif", ".tiff")) else None


def _scale_says_length(layer: Any) -> bool:
    """The layer's scale is a length (its last unit is not napari's default, the pixel)."""
    from napari_sagegan.io.export import short_unit

    units = getattr(layer, "units", None)
    return bool(units) and short_unit(units[-1]) is not None


def set_layer_pixel_size(layer: Any, nm: float, source: str = GIVEN) -> None:
    """Give ``layer`` the pixel size ``nm``: the scale of its last two axes in nm (units nm)
    and ``metadata`` ``pixel_size_nm``, ``unit`` and ``pixel_size_source``.

    Other axes (Z of a stack) keep their scale.

    Raises
    ------
    ValueError
        ``nm`` is not a positive number.
    """
    nm = check_pixel_size(nm)
    if nm is None:
        raise ValueError("a pixel size in nm per pixel is needed")
    nd = layer.ndim
    scale = tuple(float(s) for s in layer.scale)
    layer.scale = scale[: nd - 2] + (nm, nm)
    with contextlib.suppress(AttributeError, ValueError, TypeError):  # napari < 0.6: no units
        layer.units = tuple(layer.units[: nd - 2]) + ("nm", "nm")
    layer.metadata = {
        **(layer.metadata or {}),
        "pixel_size_nm": nm,
        "unit": "nm",
        "pixel_size_source": source,
    }


def pixel_size_of(layer: Any, state: Any = None) -> PixelSize:
    """The pixel size of one layer: what the user set for it, else the layer's own
    (metadata, scale, the TIFF it was opened from); ``PixelSize(None)`` when unknown."""
    if layer is None:
        return PixelSize(None)
    given = state.pixel_sizes.get(layer.name) if state is not None else None
    if given:
        return PixelSize(given, GIVEN)
    nm = layer_pixel_size(layer)
    if nm is None:
        return PixelSize(None)
    meta = getattr(layer, "metadata", None) or {}
    source = meta.get("pixel_size_source") or meta.get("source") or "layer"
    return PixelSize(nm, str(source))


#: Name endings of the layers that belong to an image (``"<image> ground truth"``).
_BELONGS = (" ground truth", " attention")


def image_name_of(layer: Any) -> str | None:
    """Name of the image a layer belongs to: :func:`source_image_name` (this plugin's
    metadata, ``"<image> labels"``), or the name ``"<image> ground truth"`` /
    ``"<image> attention"``."""
    name = source_image_name(layer)
    if name:
        return name
    for ending in _BELONGS:
        if str(layer.name).endswith(ending):
            return str(layer.name)[: -len(ending)]
    return None


def source_image(layers: Iterable[Any], labels: Any) -> Any:
    """The Image layer a Labels layer belongs to (:func:`image_name_of`), or ``None``."""
    name = image_name_of(labels) if labels is not None else None
    if not name:
        return None
    for layer in layers:
        if layer.name == name and _kind(layer) == "image":
            return layer
    return None


def labels_pixel_size(layers: Iterable[Any], labels: Any, state: Any = None) -> PixelSize:
    """The pixel size of a Labels layer: the one of the image it was made from (set by the
    user or known from its file), else its own.

    The image comes first: a pixel size set for an image after segmenting it is meant for
    its labels as well.
    """
    layers = list(layers)
    image = source_image(layers, labels)
    found = pixel_size_of(image, state)
    if found.known:
        return found
    return pixel_size_of(labels, state)


def linked_layers(layers: Iterable[Any], image: Any) -> list[Any]:
    """The image layer and every layer that belongs to it (Labels made from it, its ground
    truth, attention map: :func:`image_name_of`) of its size."""
    out = [image]
    for layer in layers:
        if layer is image or layer.ndim != image.ndim:
            continue
        made = image_name_of(layer) == image.name
        if made and tuple(layer.data.shape[-2:]) == tuple(image.data.shape[-2:]):
            out.append(layer)
    return out


def apply_pixel_size(
    layers: Iterable[Any], name: str, nm: float | None, state: Any, source: str = GIVEN
) -> list[Any]:
    """Set the pixel size of layer ``name`` (an image, or a Labels layer without its image)
    for every dock: recorded in ``state.pixel_sizes`` and written into the layer and the
    layers made from it (:func:`linked_layers`). ``nm`` ``None`` or 0 forgets what was set
    (the layers keep their scale).

    Returns
    -------
    list
        The layers changed.

    Raises
    ------
    ValueError
        No such layer, or a pixel size that is not a positive number.
    """
    layers = list(layers)
    layer = next((ly for ly in layers if ly.name == name), None)
    if layer is None:
        raise ValueError(f"there is no layer {name!r}: choose an open image")
    if not nm or nm <= 0:
        state.pixel_sizes.set(name, None)
        return []
    nm = check_pixel_size(nm)
    targets = linked_layers(layers, layer)
    for target in targets:
        set_layer_pixel_size(target, nm, source)
    state.pixel_sizes.set(name, nm)
    return targets


def calibrate_from_file(layer: Any, layers: Iterable[Any] = ()) -> float | None:
    """Write the pixel size of the TIFF a layer was opened from into the layer (and into
    the layers made from it), when the layer itself says nothing (scale in pixels).

    Returns
    -------
    float or None
        The pixel size written, ``None`` when nothing was changed.
    """
    if _kind(layer) not in ("image", "labels") or layer.ndim < 2 or _scale_says_length(layer):
        return None
    if (getattr(layer, "metadata", None) or {}).get("pixel_size_nm"):
        return None
    path = _tiff_path(layer)
    if path is None:
        return None
    from napari_sagegan.io.pixel_size import resolve_pixel_size

    found = resolve_pixel_size(path)  # the header only; an unreadable file says nothing
    if not found.known:
        return None
    for target in linked_layers(list(layers) or [layer], layer):
        if target is layer or not _scale_says_length(target):
            set_layer_pixel_size(target, found.nm, found.source)
    return found.nm


def watch_viewer(viewer: Any, state: Any) -> None:
    """Calibrate the viewer's layers from their files now and each layer added later.

    Called by every dock when it opens; connects once per viewer (``state.pixel_sizes.
    watching``). A layer that was the first in the viewer gets the view reset, since its
    size in the world changed after napari fitted the camera to it.
    """
    for layer in list(viewer.layers):
        calibrate_from_file(layer, viewer.layers)
    if state.pixel_sizes.watching:
        return
    state.pixel_sizes.watching = True

    def inserted(event: Any) -> None:
        layer = getattr(event, "value", None)
        if layer is None:
            return
        if calibrate_from_file(layer, viewer.layers) is not None and len(viewer.layers) == 1:
            with contextlib.suppress(Exception):  # a viewer without a canvas
                viewer.reset_view()

    viewer.layers.events.inserted.connect(inserted)
