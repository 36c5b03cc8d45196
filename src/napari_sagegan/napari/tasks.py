"""Qt-free glue between napari layers and the engine.

The dock widgets (:mod:`napari_sagegan.napari._qt`) gather values and run the generators
defined here in a worker thread; this module turns layer data into engine calls and engine
results into layer-data tuples and particle tables. It never imports Qt or napari: layers are
read through their plain attributes (``data``, ``scale``, ``translate``, ``units``, ``rgb``,
``metadata``), so everything here can be tested without a viewer.

- :class:`ModelEntry` / :class:`ModelStore`: the models a viewer knows (bundled default,
  files, fine-tuned ones), the current one and the previous one for roll-back; one store per
  viewer (:func:`model_store`).
- :func:`segment_images`: tiled inference over one or several images, yielding progress with
  an overall total and ETA; returns one :class:`LayerResult` per image.
- :class:`FineTune`: fine-tune the current model on (image, labels) pairs; Cancel keeps the
  best model so far (:meth:`FineTune.result`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.io.export import particle_table, short_unit
from napari_sagegan.util.progress import EtaClock, Progress

#: Key of this plugin's entry in a layer's ``metadata``.
META_KEY = "napari_sagegan"

#: Suffix of the Labels layer made from an image: ``f"{image.name}{LABELS_SUFFIX}"``.
LABELS_SUFFIX = " labels"

_ADVICE_OPEN = (
    "open a grayscale micrograph first (File > Open, or File > Open Sample > napari-sagegan)"
)


# --------------------------------------------------------------------------- inputs


def layer_pixel_size(layer: Any) -> float | None:
    """nm per pixel of a layer: ``metadata["pixel_size_nm"]``, else its scale when its
    units are lengths (napari's default unit, the pixel, gives ``None``)."""
    if layer is None:
        return None
    value = (getattr(layer, "metadata", None) or {}).get("pixel_size_nm")
    if value:
        return float(value)
    units = getattr(layer, "units", None)
    value = None
    if units:
        try:
            import pint

            quantity = (float(layer.scale[-1]) * units[-1]).to("nm")
            value = float(quantity.magnitude)
        except (ImportError, AttributeError, TypeError, ValueError, pint.DimensionalityError):
            value = None
    if value is not None and math.isfinite(value) and value > 0:
        return value
    return _source_tiff_pixel_size(layer)


def _source_tiff_pixel_size(layer: Any) -> float | None:
    """Pixel size from the metadata of the TIFF a layer was opened from.

    napari's own TIFF reader (which this plugin leaves plain TIFFs to) drops the ImageJ, OME,
    FEI and Zeiss pixel sizes; the file still has them.
    """
    path = getattr(getattr(layer, "source", None), "path", None)
    if not path or not str(path).lower().endswith((".tif", ".tiff")):
        return None
    from napari_sagegan.io.em import tiff_pixel_size

    try:
        value = tiff_pixel_size(path)["pixel_size"]
    except (OSError, ValueError):
        return None
    return float(value) if value else None


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
        nm per pixel when known (layer metadata, scale with length units, or the metadata
        of the TIFF the layer was opened from): a particle diameter in nm becomes pixels.
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
    meta = (getattr(layer, "metadata", None) or {}).get(META_KEY)
    if not meta or "digest" not in meta:
        return None
    return labels_digest(layer.data) != meta["digest"]


def source_image_name(labels_layer: Any) -> str | None:
    """Name of the image a Labels layer belongs to.

    From this plugin's metadata when present, else from the naming convention
    ``"<image> labels"`` (napari's `` [1]`` de-duplication suffix ignored).
    """
    meta = (getattr(labels_layer, "metadata", None) or {}).get(META_KEY) or {}
    if meta.get("image"):
        return str(meta["image"])
    name = re.sub(r" \[\d+\]$", "", str(labels_layer.name))
    if name.endswith(LABELS_SUFFIX):
        return name[: -len(LABELS_SUFFIX)]
    return None


# --------------------------------------------------------------------------- models


@dataclass(eq=False)
class ModelEntry:
    """A segmenter the user can pick: the bundled default, a file or a fine-tuned model.

    Attributes
    ----------
    name : str
        What the user sees (``"bundled default"``, the file name, ``"fine-tuned 1"``).
    source : str
        ``"default"``, a checkpoint path, or ``"memory"`` for a model not saved yet.
    ckpt : dict or None
        The loaded checkpoint (``arch``, ``state_dict``, ``infer``, ``metrics``, ...);
        loaded on first use by :meth:`load` (in the worker thread).
    """

    name: str
    source: str
    ckpt: dict | None = None
    _segmenters: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> dict:
        """The checkpoint dict, read from disk on first use.

        Raises
        ------
        FileNotFoundError, napari_sagegan.engine.checkpoint.CheckpointError
            Missing file (the bundled default not installed) or an unusable file.
        """
        with self._lock:
            if self.ckpt is None:
                from napari_sagegan.engine.checkpoint import load_checkpoint

                self.ckpt = load_checkpoint(self.source, kind="segmenter")
            return self.ckpt

    def segmenter(self, device: str = "auto"):
        """A :class:`~napari_sagegan.engine.infer.segment.Segmenter` on ``device`` (cached)."""
        from napari_sagegan.engine.checkpoint import build_segmenter
        from napari_sagegan.engine.infer.segment import Segmenter

        ckpt = self.load()
        with self._lock:
            seg = self._segmenters.get(device)
            if seg is None:
                seg = Segmenter(build_segmenter(ckpt), device=device, checkpoint=ckpt)
                self._segmenters[device] = seg
            return seg

    @property
    def metrics(self) -> dict[str, float]:
        """The checkpoint's stored validation metrics (empty until loaded)."""
        return dict((self.ckpt or {}).get("metrics") or {})

    def check_available(self) -> None:
        """Raise ``FileNotFoundError`` when the model file is missing (cheap, main thread)."""
        if self.ckpt is not None or self.source == "memory":
            return
        from napari_sagegan.engine.checkpoint import resolve_model_path

        try:
            resolve_model_path(self.source)
        except FileNotFoundError as err:
            if self.source == "default":
                raise FileNotFoundError(
                    "the bundled default model is not installed in this copy of "
                    "napari-sagegan; load a model file (Load model...) or train one with "
                    "`sagegan train`"
                ) from err
            raise

    def save(self, path: str | os.PathLike) -> Path:
        """Write this model as a napari-sagegan checkpoint file (atomically)."""
        from napari_sagegan.engine.checkpoint import build_segmenter, save_checkpoint
        from napari_sagegan.engine.config import ArchConfig

        ckpt = self.load()
        path = Path(path).expanduser()
        if path.suffix == "":
            path = path.with_suffix(".pt")
        return save_checkpoint(
            path,
            build_segmenter(ckpt),
            arch=ArchConfig.from_dict(dict(ckpt["arch"])),
            train=ckpt.get("train"),
            infer=ckpt.get("infer"),
            seed=int(ckpt.get("seed", 0)),
            epoch=int(ckpt.get("epoch", 0)),
            step=int(ckpt.get("step", 0)),
            metrics=ckpt.get("metrics"),
            extra=ckpt.get("extra"),
        )


class ModelStore:
    """The models known to one viewer, the current one and the previous one.

    Plain Python (no Qt): widgets subscribe with :meth:`subscribe` and are called back
    after every change. The previous model is kept for comparison and roll-back
    (:meth:`use_previous`). At most :attr:`MAX_ENTRIES` models are kept in memory; the
    oldest ones that are neither current nor previous are dropped first.
    """

    MAX_ENTRIES = 8

    def __init__(self) -> None:
        self.entries: list[ModelEntry] = [ModelEntry("bundled default", "default")]
        self.current: ModelEntry = self.entries[0]
        self.previous: ModelEntry | None = None
        self._listeners: list[Callable[[], Callable[[], None] | None]] = []
        self._n_tuned = 0

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change.

        A bound method is held weakly: a closed widget is not kept alive by the store.
        """
        ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else None
        self._listeners.append(ref if ref is not None else (lambda: callback))

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._listeners = [r for r in self._listeners if r() not in (None, callback)]

    def _changed(self) -> None:
        alive = []
        for ref in list(self._listeners):
            cb = ref()
            if cb is not None:
                alive.append(ref)
                cb()
        self._listeners = alive

    def select(self, entry: ModelEntry) -> None:
        """Make ``entry`` the current model (the current one becomes the previous one)."""
        if entry not in self.entries:
            self.entries.append(entry)
        if entry is not self.current:
            self.previous, self.current = self.current, entry
        self._trim()
        self._changed()

    def add_file(self, path: str | os.PathLike) -> ModelEntry:
        """Load a checkpoint file (validated now) and make it current."""
        from napari_sagegan.engine.checkpoint import load_checkpoint

        path = Path(path).expanduser()
        for entry in self.entries:
            if entry.source == str(path):
                entry.ckpt = None  # the file may have changed: read it again
                entry._segmenters.clear()
                entry.load()
                self.select(entry)
                return entry
        entry = ModelEntry(path.name, str(path), load_checkpoint(path, kind="segmenter"))
        self.select(entry)
        return entry

    def add_tuned(self, ckpt: dict) -> ModelEntry:
        """Register a fine-tuned model (kept in memory) and make it current."""
        self._n_tuned += 1
        entry = ModelEntry(f"fine-tuned {self._n_tuned}", "memory", ckpt)
        self.select(entry)
        return entry

    def use_previous(self) -> ModelEntry:
        """Swap the current and the previous model (roll-back, and back again)."""
        if self.previous is None:
            raise ValueError("there is no previous model to go back to")
        self.current, self.previous = self.previous, self.current
        self._changed()
        return self.current

    def _trim(self) -> None:
        keep = {id(self.current), id(self.previous)}
        while len(self.entries) > self.MAX_ENTRIES:
            for i, entry in enumerate(self.entries):
                if id(entry) not in keep and entry.source != "default":
                    del self.entries[i]
                    break
            else:
                break


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_store(viewer: Any) -> ModelStore:
    """The :class:`ModelStore` of ``viewer`` (created on first use, dropped with the viewer)."""
    store = _STORES.get(viewer)
    if store is None:
        store = ModelStore()
        _STORES[viewer] = store
    return store


def gui_threads() -> int:
    """Torch threads for work running beside the napari window: all cores but one.

    On a 2-core laptop that is 1 thread, which leaves a core to the event loop.
    """
    import torch

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Limit torch's intra-op threads to ``n`` while the block runs (``None``: unchanged).

    Used while a viewer is open: on a 2-core laptop, one compute thread leaves the other
    core to the event loop, which keeps the GUI responsive.
    """
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warm_up(training: bool = False) -> None:
    """Import what the engine would otherwise import lazily inside a worker thread.

    Python holds the import lock and, in parts, the GIL while it imports: a worker that
    imports scikit-image submodules, or runs its first optimiser step (torch imports its
    compiler stack then, about 2 s), stalls the GUI. The widgets call this when they open,
    so that cost is paid once, while the dock appears, not in the middle of a run.
    """
    import importlib

    for name in (
        "pandas",
        "scipy.ndimage",
        "skimage.measure",
        "skimage.segmentation",
        "skimage.morphology",
        "torch.nn.utils.fusion",
        "napari_sagegan.engine.infer.segment",
        "napari_sagegan.engine.infer.postprocess",
        "napari_sagegan.engine.infer.tiling",
        "napari_sagegan.engine.data.pairs",
    ):
        importlib.import_module(name)
    if training:
        for name in (
            "skimage.exposure",
            "skimage.filters",
            "napari_sagegan.engine.data.augment",
            "napari_sagegan.engine.train.losses",
            "napari_sagegan.engine.analysis.metrics",
            "napari_sagegan.engine.train.segmenter",
        ):
            importlib.import_module(name)
        import torch

        # the first Adam step imports torch's compiler modules: do it on a 1-value tensor
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([param], lr=1e-3)
        (param * 2).sum().backward()
        optimizer.step()


# --------------------------------------------------------------------------- segmentation


@dataclass
class LayerResult:
    """The segmentation of one image, ready to become layers.

    Attributes
    ----------
    image : ImageInput
        The image it came from (name and geometry).
    labels : np.ndarray
        int32 instance labels, same shape as the image.
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
    """

    image: ImageInput
    labels: np.ndarray
    features: Any
    attention: np.ndarray | None
    model: str
    device: str
    scale: Any = None

    @property
    def n_particles(self) -> int:
        return int(len(self.features))

    @property
    def labels_name(self) -> str:
        return f"{self.image.name}{LABELS_SUFFIX}"

    def metadata(self) -> dict:
        """The ``metadata`` of the Labels layer (source image, model, fingerprint)."""
        return {
            META_KEY: {
                "image": self.image.name,
                "model": self.model,
                "device": self.device,
                "digest": labels_digest(self.labels),
            }
        }

    def geometry(self) -> dict:
        """``scale``, ``translate`` (and ``units``) of the image, for the new layers."""
        out: dict[str, Any] = {"scale": self.image.scale, "translate": self.image.translate}
        if self.image.units is not None:
            out["units"] = self.image.units
        return out

    def layer_data(self) -> list[tuple[Any, dict, str]]:
        """napari layer-data tuples: the Labels layer, then the attention map if any."""
        out: list[tuple[Any, dict, str]] = [
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


def config_for_image(config: Any, image: ImageInput, diameter_nm: float | None) -> Any:
    """``config`` with a particle diameter given in nm turned into this image's pixels."""
    if not diameter_nm:
        return config
    if not image.pixel_size_nm:
        raise ValueError(
            f"the particle diameter is in nm, but the pixel size of {image.name!r} is unknown: "
            "give the diameter in px, or open the image with its calibration"
        )
    import dataclasses

    return dataclasses.replace(config, diameter=max(1.0, diameter_nm / image.pixel_size_nm))


def segment_images(
    entry: ModelEntry,
    images: Sequence[ImageInput],
    *,
    device: str = "auto",
    overrides: dict | None = None,
    with_attention: bool = False,
    threads: int | None = None,
) -> Generator[Progress, None, list[LayerResult]]:
    """Segment one or several images with a model; meant to run in a worker thread.

    Parameters
    ----------
    entry : ModelEntry
        The model (loaded here if needed).
    images : sequence of ImageInput
        2-D images or 3-D stacks.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    overrides : dict, optional
        :class:`~napari_sagegan.engine.config.InferConfig` fields that replace the model's
        recommended settings (``tile_size``, ``threshold``, ``split``, ...).
    with_attention : bool
        Also return the attention map.
    threads : int, optional
        Torch threads while running (see :func:`torch_threads`).

    Yields
    ------
    Progress
        ``stage="tiles"`` after every tile: ``step`` / ``total`` over all images, ``eta_s``,
        ``data["device"]``; then ``stage="image"`` after each image with
        ``data["result"]`` (a :class:`LayerResult`), so finished images survive a Cancel.

    Returns
    -------
    list of LayerResult
    """
    if not images:
        raise ValueError(f"there is no image to segment: {_ADVICE_OPEN}")
    with torch_threads(threads):
        seg = entry.segmenter(device)
        overrides = dict(overrides or {})
        diameter_nm = overrides.pop("diameter_nm", None)
        config = seg.default_infer_config(**overrides)
        configs = [config_for_image(config, im, diameter_nm) for im in images]
        # each image's particle size is estimated first: the tile counts depend on it
        plans = [seg.plan(im.data, c) for im, c in zip(images, configs)]
        total = sum(n for _, n in plans)
        clock = EtaClock(total)
        done = 0
        results: list[LayerResult] = []
        for i, (im, c, (plan, n_image)) in enumerate(zip(images, configs, plans)):
            gen = seg.segment(im.data, c, with_attention=with_attention, scale=plan)
            try:
                while True:
                    try:
                        ev = next(gen)
                    except StopIteration as stop:
                        res = stop.value
                        break
                    step = done + ev.step
                    prefix = f"{im.name} ({i + 1}/{len(images)}): " if len(images) > 1 else ""
                    yield Progress(
                        "tiles",
                        step,
                        total,
                        eta_s=clock.eta(step),
                        message=prefix + ev.message,
                        data={"image": im.name, "device": seg.device_name},
                    )
            finally:
                gen.close()
            done += n_image
            table = particle_table(res.labels, im.scale, im.unit)
            result = LayerResult(
                image=im,
                labels=res.labels,
                features=table,
                attention=res.attention,
                model=entry.name,
                device=res.device,
                scale=res.scale,
            )
            results.append(result)
            yield Progress(
                "image",
                done,
                total,
                eta_s=clock.eta(done),
                message=f"{im.name}: {result.n_particles} particles",
                data={"result": result, "device": seg.device_name},
            )
    return results


# --------------------------------------------------------------------------- training


@dataclass
class TrainingPair:
    """An image and its (corrected) labels, 2-D or 3-D, from the viewer or a folder."""

    name: str
    image: Any
    labels: Any


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


def folder_pairs(images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None):
    """Read the (image, mask) pairs of a folder (masks beside the images by default)."""
    from napari_sagegan.io.images import find_pairs, read_image, read_labels

    out = []
    for img_path, mask_path in find_pairs(images_dir, masks_dir or images_dir):
        out.append(TrainingPair(img_path.name, read_image(img_path), read_labels(mask_path)))
    return out


def split_slices(pairs: Sequence[TrainingPair]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Flatten pairs into 2-D training images and labels (a stack gives one per slice)."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for p in pairs:
        im, lab = np.asarray(p.image), np.asarray(p.labels)
        if im.ndim == 2:
            images.append(im)
            labels.append(lab.astype(np.int32, copy=False))
        else:
            images.extend(list(im))
            labels.extend(list(lab.astype(np.int32, copy=False)))
    return images, labels


def suggest_patch_size(shapes: Sequence[tuple[int, ...]], wanted: int = 256) -> int:
    """A training patch side no larger than the smallest image (multiple of 16, >= 32)."""
    smallest = min(min(s[-2:]) for s in shapes)
    side = min(int(wanted), int(smallest))
    return max(32, 16 * math.ceil(side / 16))


def gather_pairs(
    pairs: Sequence[TrainingPair],
    folder: tuple[str, str | None] | None,
    advice: str,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The viewer's pairs plus a folder's, checked, as 2-D (image, labels) lists (stacks are
    split into slices). ``advice`` completes the error when there is no pair at all."""
    pairs = list(pairs)
    if folder is not None:
        pairs += folder_pairs(*folder)
    if not pairs:
        raise ValueError(f"no training pairs: {advice}")
    for p in pairs:
        check_pair(p)
    return split_slices(pairs)


class FineTune:
    """Fine-tune a model on corrected pairs; meant to run in a worker thread.

    Parameters
    ----------
    base : ModelEntry
        The model to start from (usually the store's current model).
    pairs : sequence of TrainingPair
        From the viewer (checked with :func:`check_pair` before the worker starts).
    config : TrainConfig
        Budget (``epochs``, ``max_minutes``, ``steps_per_epoch``), ``lr``, ``patch_size``...
    folder : (images_dir, masks_dir) or None
        Extra pairs read from disk in the worker.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    threads : int, optional
        Torch threads while running (see :func:`torch_threads`).

    Notes
    -----
    Nothing is written to disk: the best weights stay in memory (:meth:`result`) until the
    user saves them.
    """

    def __init__(
        self,
        base: ModelEntry,
        pairs: Sequence[TrainingPair],
        config: Any,
        *,
        folder: tuple[str, str | None] | None = None,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.base = base
        self.pairs = list(pairs)
        self.config = config
        self.folder = folder
        self.device = device
        self.threads = threads
        self.trainer = None

    def run(self) -> Generator[Progress, None, dict | None]:
        """Yield ``prepare``, then the trainer's ``train`` / ``validate`` events.

        Returns the fine-tuned checkpoint dict (see :meth:`result`).
        """
        from napari_sagegan.engine.train.segmenter import SegmenterTrainer

        with torch_threads(self.threads):
            yield Progress("prepare", 0, None, message="loading the model and the pairs")
            base = self.base.load()
            images, labels = gather_pairs(
                self.pairs,
                self.folder,
                "correct a Labels layer made by Segment (paint, erase, fill), tick it in the "
                "list, or choose a folder of image/mask pairs",
            )
            config = self.config
            if config.patch_size > min(min(im.shape) for im in images):
                config = config.replace(patch_size=suggest_patch_size([im.shape for im in images]))
            self.trainer = SegmenterTrainer(images, labels, config, init=base, device=self.device)
            yield Progress(
                "prepare",
                1,
                None,
                message=(
                    f"{len(images)} training images, "
                    f"{len(self.trainer.val_images)} for validation, on "
                    f"{self.trainer.device_name}"
                ),
                data={"device": self.trainer.device_name},
            )
            yield from self.trainer.run()
        return self.result()

    def result(self) -> dict | None:
        """The best model so far as a checkpoint dict, also after a Cancel.

        ``None`` when training stopped before any model was kept (no epoch ended).
        """
        tr = self.trainer
        if tr is None or not tr.history:
            return None
        epoch = int(tr.history[-1]["epoch"])
        return {
            "format": "napari-sagegan",
            "format_version": 1,
            "kind": "segmenter",
            "arch": tr.arch.to_dict(),
            "train": tr.config.to_dict(),
            "infer": tr.infer.to_dict(),
            "seed": int(tr.config.seed),
            "epoch": epoch,
            "step": int(tr.step),
            "metrics": {k: float(v) for k, v in tr.best_metrics.items()},
            "state_dict": {k: v.detach().cpu().clone() for k, v in tr.best_state.items()},
            "optimizer": None,
            "extra": {"history": list(tr.history), "base_model": self.base.name},
        }
