"""Layer adapters: napari layers <-> arrays, metadata and training pairs (no Qt, no napari).

Layers are read through their plain attributes (``name``, ``data``, ``scale``,
``translate``, ``units``, ``rgb``, ``metadata``, ``source``), so everything here can be
tested without a viewer, and the docks (:mod:`napari_sagegan.napari._qt`) only hand layers
in and layer-data tuples out.

- Inputs: :func:`image_input` (an image layer, checked, with its geometry and pixel size),
  :func:`layer_pixel_size`.
- Fingerprints: :func:`labels_digest`, :func:`is_edited`, :func:`source_image_name`,
  :func:`is_synthetic`, :func:`is_result`: which Labels layer belongs to which image, whether
  Segment made it, and whether the user corrected it.
- Training pairs: :class:`TrainingPair`, :func:`candidate_pairs`, :func:`pairs_from_layers`.
- Outputs: :class:`LayerResult` (a segmentation as layer-data tuples),
  :func:`add_result_layers` (replacing only an unedited result of the same image, when
  asked: :func:`replaceable_layer`) and :func:`synthetic_layer_data` (generated pairs);
  :func:`display_labels` / :func:`display_limits` prepare them in the worker so napari has
  less to do on the main thread.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_sagegan.io.export import short_unit

#: Key of this plugin's entry in a layer's ``metadata``.
META_KEY = "napari_sagegan"

#: Suffix of the Labels layer made from an image: ``f"{image.name}{LABELS_SUFFIX}"``.
LABELS_SUFFIX = " labels"

#: Name prefix of generated pairs.
SYNTH_PREFIX = "SAGE-GAN synth"

#: Name of the live phase-2 preview layer.
PREVIEW_NAME = "SAGE-GAN preview"

#: What to do when there is no image: completes several messages.
ADVICE_OPEN = (
    "open a grayscale micrograph first (File > Open, or File > Open Sample > napari-sagegan)"
)


# --------------------------------------------------------------------------- inputs


def layer_pixel_size(layer: Any) -> float | None:
    """nm per pixel of a layer, or ``None`` when unknown.

    The layer's evidence, in order, goes to the one resolver
    (:func:`napari_sagegan.io.pixel_size.resolve_pixel_size`): ``metadata["pixel_size_nm"]``
    (set by this plugin's reader), the scale when the layer's units are lengths (napari's
    default unit, the pixel, says nothing), and the header of the TIFF the layer was opened
    from (napari's own TIFF reader, which this plugin leaves plain TIFFs to, drops the
    ImageJ, OME, FEI and Zeiss pixel sizes; the file still has them).
    """
    if layer is None:
        return None
    from napari_sagegan.io.pixel_size import from_scale, resolve_pixel_size

    units = getattr(layer, "units", None)
    scale = from_scale(getattr(layer, "scale", None), units[-1]) if units else None
    path = getattr(getattr(layer, "source", None), "path", None)
    tiff = path if path and str(path).lower().endswith((".tif", ".tiff")) else None
    return resolve_pixel_size(getattr(layer, "metadata", None) or None, scale, tiff).nm


@dataclass
class ImageInput:
    """One image layer's data and geometry, read on the main thread.

    Attributes
    ----------
    name : str
        Layer name.
    data : array-like
        ``(Y, X)`` or ``(Z, Y, X)`` (NumPy, memmap or dask; only tiles are read at a time).
    scale, translate : tuple of float
        Pixel size and offset per axis, world units (copied to the Labels layer).
    units : tuple or None
        The layer's units per axis (napari >= 0.6), copied to the Labels layer.
    pixel_size_nm : float or None
        nm per pixel when known (:func:`layer_pixel_size`): a particle diameter in nm
        becomes pixels.
    """

    name: str
    data: Any
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    units: tuple | None = None
    pixel_size_nm: float | None = None

    @property
    def unit(self) -> str | None:
        """The short length unit of the Y-X axes (``"nm"``, ...) or ``None`` (pixels)."""
        return short_unit(self.units[-1]) if self.units else None


def check_image_data(name: str, data: Any, *, rgb: bool = False) -> tuple[int, ...]:
    """Check that an image layer can be segmented; return its shape.

    Raises
    ------
    ValueError
        An RGB layer, fewer than 2 or more than 3 axes, or non-numeric data; the message
        says what to do.
    """
    shape = tuple(int(s) for s in getattr(data, "shape", ()))
    if rgb:
        raise ValueError(
            f"the layer {name!r} is an RGB(A) colour image {shape}; EM images are grayscale: "
            "convert it first (right-click the layer > Split RGB, then segment one channel)"
        )
    if len(shape) > 3:
        raise ValueError(
            f"the layer {name!r} has {len(shape)} dimensions {shape}; napari-sagegan segments "
            "a 2-D image (Y, X) or a 3-D stack (Z, Y, X): split the channels or time points "
            "first (right-click the layer > Split Stack)"
        )
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"the layer {name!r} is not an image (shape {shape})")
    kind = np.dtype(getattr(data, "dtype", np.float32)).kind
    if kind not in "uifb":
        raise ValueError(f"the layer {name!r} holds {data.dtype} values, not a grayscale image")
    return shape


def image_input(layer: Any) -> ImageInput:
    """Read an image layer into an :class:`ImageInput` (main thread), checking it first.

    A multiscale layer contributes its full-resolution level.
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    check_image_data(layer.name, data, rgb=bool(getattr(layer, "rgb", False)))
    units = getattr(layer, "units", None)
    return ImageInput(
        name=str(layer.name),
        data=data,
        scale=tuple(float(s) for s in layer.scale),
        translate=tuple(float(t) for t in layer.translate),
        units=tuple(units) if units is not None else None,
        pixel_size_nm=layer_pixel_size(layer),
    )


# --------------------------------------------------------------------------- fingerprints


def _meta(layer: Any) -> dict:
    return (getattr(layer, "metadata", None) or {}).get(META_KEY) or {}


def labels_digest(data: Any) -> str:
    """A short fingerprint of a label array (shape, dtype and every value).

    Stored in a Labels layer's metadata when it is made, so that an edit (paint, erase,
    fill, undo back to the original) is recognised by comparing fingerprints, without
    keeping a copy of the segmentation.
    """
    arr = np.ascontiguousarray(np.asarray(data))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def is_edited(layer: Any) -> bool | None:
    """Whether a Labels layer made by this plugin was changed since it was made.

    Returns ``None`` for a Labels layer that this plugin did not make (e.g. opened from a
    file or drawn from scratch).
    """
    meta = _meta(layer)
    if "digest" not in meta:
        return None
    return labels_digest(layer.data) != meta["digest"]


def source_image_name(labels_layer: Any) -> str | None:
    """Name of the image a Labels layer belongs to.

    From this plugin's metadata when present, else from the naming convention
    ``"<image> labels"`` (napari's `` [1]`` de-duplication suffix ignored).
    """
    meta = _meta(labels_layer)
    if meta.get("image"):
        return str(meta["image"])
    name = re.sub(r" \[\d+\]$", "", str(labels_layer.name))
    if name.endswith(LABELS_SUFFIX):
        return name[: -len(LABELS_SUFFIX)]
    return None


def is_synthetic(layer: Any) -> bool:
    """A layer made by :func:`synthetic_layer_data` (a generated pair)."""
    return bool(_meta(layer).get("synthetic"))


def is_result(layer: Any) -> bool:
    """A Labels layer that Segment made (corrected since or not): neither a generated pair,
    nor a mask opened from a file or drawn by hand, nor the phase-2 preview."""
    return (
        _kind(layer) == "labels"
        and "digest" in _meta(layer)
        and not is_synthetic(layer)
        and layer.name != PREVIEW_NAME
    )


def _kind(layer: Any) -> str:
    """``"labels"``, ``"image"`` or another napari layer type, from the class name."""
    return type(layer).__name__.lower()


# --------------------------------------------------------------------------- pairs


@dataclass
class TrainingPair:
    """An image and its (corrected) labels, 2-D or 3-D, from the viewer or a folder;
    ``diameter``: the particle size (px) the user set for its image (``None``: not set, the
    labels' median diameter is used; :func:`napari_sagegan.api.fine_tune`)."""

    name: str
    image: Any
    labels: Any
    diameter: float | None = None


@dataclass
class PairCandidate:
    """A Labels layer that could be trained on, with the image it belongs to.

    Attributes
    ----------
    labels : Labels layer
    image : Image layer or None
        ``None`` when its image is not open (or is not an Image layer).
    edited : bool or None
        See :func:`is_edited`.
    synthetic : bool
        A generated pair (:func:`is_synthetic`).
    """

    labels: Any
    image: Any
    edited: bool | None
    synthetic: bool

    @property
    def name(self) -> str:
        return str(self.labels.name)


def _by_name(layers: Iterable[Any]) -> dict[str, Any]:
    return {str(layer.name): layer for layer in layers}


def candidate_pairs(
    layers: Iterable[Any], edited: Callable[[Any], bool | None] = is_edited
) -> list[PairCandidate]:
    """Every Labels layer of ``layers`` (the preview excepted) with its image, in order.

    ``edited(layer)`` tells whether a layer was corrected (default :func:`is_edited`, which
    hashes the layer's data; a view that follows paint events can pass a cached one).
    """
    layers = list(layers)
    named = _by_name(layers)
    out = []
    for layer in layers:
        if _kind(layer) != "labels" or layer.name == PREVIEW_NAME:
            continue
        image = named.get(source_image_name(layer) or "")
        if image is not None and _kind(image) != "image":
            image = None
        out.append(PairCandidate(layer, image, edited(layer), is_synthetic(layer)))
    return out


def check_pair(pair: TrainingPair) -> None:
    """Check that a pair can be trained on.

    Raises
    ------
    ValueError
        Shapes that differ, more than 3 dimensions, or labels without any particle; the
        message names the layers and says what to do.
    """
    ishape = tuple(np.shape(pair.image))
    lshape = tuple(np.shape(pair.labels))
    if len(ishape) not in (2, 3):
        raise ValueError(
            f"{pair.name}: the image has shape {ishape}; training needs 2-D images (Y, X) or "
            "3-D stacks (Z, Y, X)"
        )
    if ishape != lshape:
        raise ValueError(
            f"{pair.name}: the labels have shape {lshape} but the image has shape {ishape}; "
            "the Labels layer must cover its image pixel for pixel (segment the image again "
            "to get a matching Labels layer)"
        )
    if not np.any(np.asarray(pair.labels)):
        raise ValueError(
            f"{pair.name}: the labels contain no particle (every pixel is background); paint "
            "the particles (or untick this pair) before fine-tuning"
        )


def pairs_from_layers(
    layers: Iterable[Any],
    labels_names: Sequence[str],
    size: Any = None,
) -> list[TrainingPair]:
    """The checked training pairs of the named Labels layers (main thread).

    Names no longer in ``layers``, or whose image is not open, are skipped. ``size`` (the
    viewer's :class:`~napari_sagegan.napari.state.ParticleSize`, optional) gives each pair
    the particle diameter set in the Segment dock, in pixels of its image
    (:meth:`~napari_sagegan.napari.state.ParticleSize.pixels`).

    Raises
    ------
    ValueError
        A pair that cannot be trained on (:func:`check_image_data`,
        :func:`napari_sagegan.engine.data.pairs.check_pairs`); the message names it.
    """
    named = _by_name(layers)
    pairs = []
    for name in labels_names:
        labels = named.get(name)
        if labels is None:
            continue
        image = named.get(source_image_name(labels) or "")
        if image is None or _kind(image) != "image":
            continue
        diameter = None if size is None else size.pixels(layer_pixel_size(image))
        pair = TrainingPair(f"{name!r} on {image.name!r}", image.data, labels.data, diameter)
        check_image_data(image.name, image.data, rgb=bool(getattr(image, "rgb", False)))
        check_pair(pair)
        pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- outputs

LayerData = tuple[Any, dict, str]

#: Labels up to this id are shown as uint16, leaving room to paint new particles.
UINT16_LABELS_MAX = 60_000


def display_labels(labels: Any) -> np.ndarray:
    """Instance labels in the dtype napari draws without re-mapping them on the main thread.

    napari maps (u)int32/64 labels into a uint8/uint16 texture on the main thread every time
    it draws a new layer or slice (about 0.3 s for 2048 x 2048 here); uint8/uint16 labels go
    to the texture as they are. So labels whose largest id is under
    :data:`UINT16_LABELS_MAX` become uint16 (call this in the worker: it copies), others
    stay int32.
    """
    arr = np.asarray(labels)
    if arr.dtype == np.uint16:
        return arr
    top = int(arr.max()) if arr.size else 0
    low = int(arr.min()) if arr.size else 0
    if 0 <= low and top <= UINT16_LABELS_MAX:
        return arr.astype(np.uint16)
    return arr.astype(np.int32, copy=False)


def display_limits(image: Any, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Contrast limits from the ``low`` / ``high`` percentiles of ``image`` (worker thread).

    A generated image spans a few dozen grey levels (e.g. 116-142); napari's default limits
    for uint8 data are 0-255, which shows it as a flat grey.
    """
    arr = np.asarray(image)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr.ravel()
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(finite, (low, high)))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


@dataclass
class LayerResult:
    """The segmentation of one image, ready to become layers.

    Attributes
    ----------
    image : ImageInput
        The image it came from (name and geometry).
    labels : np.ndarray
        Instance labels, same shape as the image (uint16 when the ids fit, else int32:
        :func:`display_labels`).
    features : pandas.DataFrame
        One row per particle (see :func:`napari_sagegan.io.export.particle_table`).
    attention : np.ndarray or None
        The last attention gate's map in [0, 1].
    model : str
        Name of the model used.
    device : str
        The device actually used, e.g. ``"cpu (1 thread)"``.
    scale : ScaleInfo or None
        The particle diameter used and how the image was resampled for the network.
    digest : str or None
        :func:`labels_digest` of ``labels``, computed in the worker (``None``: computed
        when the layer is made).
    """

    image: ImageInput
    labels: np.ndarray
    features: Any
    attention: np.ndarray | None
    model: str
    device: str
    scale: Any = None
    digest: str | None = None

    @property
    def n_particles(self) -> int:
        return int(len(self.features))

    @property
    def labels_name(self) -> str:
        return f"{self.image.name}{LABELS_SUFFIX}"

    def metadata(self) -> dict:
        """The ``metadata`` of the Labels layer (source image, model, fingerprint, and the
        pixel size when known: ``pixel_size_nm``, ``unit``)."""
        out: dict[str, Any] = {
            META_KEY: {
                "image": self.image.name,
                "model": self.model,
                "device": self.device,
                "digest": self.digest or labels_digest(self.labels),
            }
        }
        if self.image.pixel_size_nm:
            out.update(pixel_size_nm=float(self.image.pixel_size_nm), unit="nm")
        return out

    def geometry(self) -> dict:
        """``scale``, ``translate`` (and ``units``) of the image, for the new layers."""
        out: dict[str, Any] = {"scale": self.image.scale, "translate": self.image.translate}
        if self.image.units is not None:
            out["units"] = self.image.units
        return out

    def describe(self, layer_name: str | None = None) -> str:
        """One line for the user: ``"<name> labels: 8 particles (17 px = 8.5 nm (given))"``;
        ``layer_name``: the name the layer really has (napari may have added `` [1]``)."""
        line = f"{layer_name or self.labels_name}: {self.n_particles} particles"
        if self.scale is not None and self.scale.diameter is not None:
            line += f" ({self.scale.describe(self.image.pixel_size_nm)})"
        return line

    def layer_data(self) -> list[LayerData]:
        """napari layer-data tuples: the Labels layer, then the attention map if any."""
        out: list[LayerData] = [
            (
                self.labels,
                {
                    "name": self.labels_name,
                    "features": self.features,
                    "metadata": self.metadata(),
                    **self.geometry(),
                },
                "labels",
            )
        ]
        if self.attention is not None:
            out.append(
                (
                    self.attention,
                    {
                        "name": f"{self.image.name} attention",
                        "colormap": "inferno",
                        "blending": "additive",
                        "opacity": 0.6,
                        "contrast_limits": (0.0, 1.0),
                        **self.geometry(),
                    },
                    "image",
                )
            )
        return out


def _base_name(name: Any) -> str:
    """A layer name without napari's `` [1]`` de-duplication suffix."""
    return re.sub(r" \[\d+\]$", "", str(name))


def replaceable_layer(layers: Iterable[Any], name: str, kind: str, data: Any, image: str) -> Any:
    """The layer a new result may replace, or ``None``: the top-most ``kind`` layer named
    ``name`` (or ``name [n]``) of the same shape, made by this plugin from ``image`` and,
    for Labels, never edited (:func:`is_edited` is ``False``; masks opened from files,
    generated pairs and corrected results are never replaced)."""
    found = None
    shape = tuple(np.shape(data))
    for layer in layers:
        if _kind(layer) != kind or _base_name(layer.name) != name:
            continue
        if tuple(np.shape(layer.data)) != shape or is_synthetic(layer):
            continue
        if kind == "labels" and (
            _meta(layer).get("image") != image or is_edited(layer) is not False
        ):
            continue
        found = layer
    return found


def add_result_layers(viewer: Any, result: LayerResult, *, replace: bool = True) -> list:
    """Add (or refresh) the layers of one segmentation result; main thread only.

    With ``replace``, the top-most Labels layer of the same image that this plugin made and
    nobody edited (:func:`replaceable_layer`) is updated in place, and so is its attention
    map; an edited one is always kept. Otherwise, or when there is none to replace, the
    result gets new layers (napari adds `` [1]`` to a name already taken), so no correction
    is ever overwritten. Returns the layers (their ``name`` is the real one).
    """
    layers = []
    for data, kwargs, kind in result.layer_data():
        old = (
            replaceable_layer(viewer.layers, kwargs["name"], kind, data, result.image.name)
            if replace
            else None
        )
        if old is not None:
            old.data = data
            for key in ("features", "metadata", "scale", "translate", "units"):
                if key in kwargs:
                    setattr(old, key, kwargs[key])
            layers.append(old)
        elif kind == "labels":
            layers.append(viewer.add_labels(data, **kwargs))
        else:
            layers.append(viewer.add_image(data, **kwargs))
    return layers


def synthetic_layer_data(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], start: int = 1
) -> list[LayerData]:
    """Image + Labels layer tuples for generated pairs, numbered from ``start``.

    Named ``"SAGE-GAN synth 01"`` / ``"SAGE-GAN synth 01 labels"``, with metadata linking
    each Labels layer to its image (so the pair lists offer them as training pairs). The
    images' contrast limits come from their grey levels (:func:`display_limits`), the
    labels are in their display dtype (:func:`display_labels`): call this in the worker.
    """
    out = []
    for i, (image, labels) in enumerate(pairs, start):
        name = f"{SYNTH_PREFIX} {i:02d}"
        meta = {META_KEY: {"image": name, "synthetic": True}}
        kwargs = {"name": name, "metadata": meta, "colormap": "gray"}
        out.append((image, {**kwargs, "contrast_limits": display_limits(image)}, "image"))
        labels_kwargs = {"name": f"{name} labels", "metadata": dict(meta)}
        out.append((display_labels(labels), labels_kwargs, "labels"))
    return out
