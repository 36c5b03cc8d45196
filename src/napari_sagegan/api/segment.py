"""Segment micrographs: :func:`segment`, and :func:`estimate_size` (the particle size
:func:`segment` would use, found before segmenting); see :mod:`napari_sagegan.api` for the
map.

The pixel size and the particle diameter of every image are resolved here, once.

Why ~700 lines: the inputs (arrays, paths, EM files), their pixel size and diameter, the
staged output folder, the per-image report (``segment_report.json``) and the size estimate
share these resolutions; splitting them would resolve a pixel size in two places again.
:mod:`napari_sagegan.api.distributed` reuses the same helpers per image on its workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.io.pixel_size import PixelSize, resolve_pixel_size
from napari_sagegan.util.progress import EtaClock, Progress, relay
from napari_sagegan.util.units import nm_to_px

PathLike = str | os.PathLike
#: ``segment_report.json`` identification.
REPORT_FORMAT, REPORT_VERSION, REPORT_NAME = "sagegan-segment-report", 1, "segment_report.json"


def output_names(stems: Any, csv: bool = False) -> list[str]:
    """The files :func:`segment` writes into ``out`` for inputs of these stems (file names
    without their extension): ``<stem>.tif``, with ``csv`` ``<stem>.csv`` and
    ``<stem>.summary.json``, and :data:`REPORT_NAME`."""
    names = [REPORT_NAME]
    for stem in stems:
        names.append(f"{stem}.tif")
        if csv:
            names += [f"{stem}.csv", f"{stem}.summary.json"]
    return names


_DIAMETER_SOURCES = {"user": "given", "estimate": "estimated", "network": "estimated"}


# --------------------------------------------------------------------------- inputs


@dataclass
class Micrograph:
    """One image to segment: its data (or its file) and its pixel size.

    Attributes
    ----------
    name : str
        Shown to the user (a file name, a layer name).
    data : array-like or None
        ``(Y, X)`` or ``(Z, Y, X)``; ``None`` for a file not read yet (:attr:`path`).
    pixel_size : PixelSize
        nm per pixel and where it came from (unknown by default).
    path : Path or None
        The file it is read from.
    """

    name: str
    data: Any = None
    pixel_size: PixelSize = field(default_factory=lambda: PixelSize(None))
    path: Path | None = None


def particle_diameter(
    diameter: float | None, diameter_nm: float | None, pixel_size: PixelSize, name: str
) -> float | None:
    """The particle diameter of one image in pixels: given in px, or in nm with its pixel
    size; ``None`` to estimate it.

    Raises
    ------
    ValueError
        Both or a non-positive value given; nm without a known pixel size.
    """
    if diameter is not None and diameter_nm is not None:
        raise ValueError(
            "give the particle diameter once: in pixels (--diameter) or in nm (--diameter-nm)"
        )
    for what, value in (("in pixels", diameter), ("in nm", diameter_nm)):
        if value is not None and not value > 0:
            raise ValueError(f"the particle diameter {what} must be positive, got {value}")
    if diameter_nm is None:
        return float(diameter) if diameter is not None else None
    if not pixel_size.known:
        raise ValueError(
            f"the particle diameter is in nm, but the pixel size of {name!r} is unknown: give "
            "the pixel size (--pixel-size NM), the diameter in px (--diameter), or open the "
            "image with its calibration"
        )
    return max(1.0, nm_to_px(diameter_nm, pixel_size.nm))


def _micrographs(
    images: Any, pixel_size: float | PixelSize | None, channel: int | None = None
) -> list[Micrograph]:
    """Files, folders, arrays and :class:`Micrograph` s as a list of Micrographs (files not
    read yet, their headers checked: declared size, channels); ``pixel_size`` overrides
    every one."""
    from napari_sagegan.io.em import EM_SUFFIXES
    from napari_sagegan.io.images import IMAGE_SUFFIXES, list_images, probe_image

    if isinstance(images, (str, os.PathLike, np.ndarray, Micrograph)):
        images = [images]
    out: list[Micrograph] = []
    for i, item in enumerate(images):
        if isinstance(item, Micrograph):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            for f in list_images([item], IMAGE_SUFFIXES + EM_SUFFIXES):
                if f.suffix.lower() not in EM_SUFFIXES:  # EM readers have no header-only mode
                    probe_image(f, channel=channel)
                out.append(Micrograph(f.name, None, PixelSize(None), f))
        else:
            out.append(Micrograph(f"image {i + 1}", item))
    if not out:
        raise ValueError("there is no image to segment: give image files, folders or arrays")
    for m in out:
        em = m.path is not None and m.path.suffix.lower() in EM_SUFFIXES
        header = m.path if m.path is not None and not em else None
        m.pixel_size = resolve_pixel_size(m.pixel_size, header, override=pixel_size)
    return out


def _read(m: Micrograph, channel: int | None = None) -> Any:
    """The image of ``m`` (its file read now, ``channel`` taken from a multi-channel one);
    refused, naming it, when none of its pixels is finite."""
    from napari_sagegan.io.em import EM_SUFFIXES, read_em
    from napari_sagegan.io.images import read_image

    if m.data is not None:
        with _named(m.name):
            from napari_sagegan.engine.infer.segment import reference_slice

            reference_slice(m.data)  # a finite pixel somewhere, else refused with its name
        return m.data
    if m.path.suffix.lower() in EM_SUFFIXES:
        data, meta = read_em(m.path, channel=channel)
        if not m.pixel_size.known:
            m.pixel_size = PixelSize.from_meta(meta, m.path.name)
        return data
    return read_image(m.path, channel=channel)


@contextlib.contextmanager
def _named(name: str):
    """Put the image's name into the engine's "holds no finite value" refusal."""
    from napari_sagegan.engine.data.intensity import NoFiniteValue

    try:
        yield
    except NoFiniteValue:
        raise NoFiniteValue(name) from None


def describe_nonfinite(name: str, n: int, total: int) -> str:
    """``"12 340 pixels (1.2 %) of X were not finite (NaN/inf); treated as missing"``, or
    ``""`` when ``n`` is 0."""
    if not n:
        return ""
    share = 100.0 * n / max(total, 1)
    count = f"{n:,}".replace(",", " ")
    pixels = "pixel" if n == 1 else "pixels"
    verb = "was" if n == 1 else "were"
    return (
        f"{count} {pixels} ({share:.2g} %) of {name} {verb} not finite (NaN/inf); treated as "
        "missing (background in the labels)"
    )


def _segmenter(model: Any, device: str):
    """A Segmenter from a path / ``"default"`` / checkpoint, or the Segmenter given."""
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.infer.segment import Segmenter

    if isinstance(model, Segmenter):
        return model
    ckpt = Checkpoint.load(model, kind="segmenter")
    return Segmenter(ckpt.build(), device=device, checkpoint=ckpt)


# --------------------------------------------------------------------------- segment


@dataclass
class Segmented:
    """The segmentation of one image.

    Attributes
    ----------
    name : str
        The image's name (file name for a file).
    labels : numpy.ndarray or None
        int32 instance labels, the image's shape (``None`` when not kept, see
        :func:`segment`).
    n_particles : int
        Particles found (ids are consecutive and unique across the slices of a stack).
    scale : ScaleInfo or None
        The particle diameter used and the resampling factor.
    pixel_size : PixelSize
        The image's pixel size and its source.
    config : InferConfig
        The settings used (thresholds, tiles, the diameter in px).
    attention : numpy.ndarray or None
        The last attention gate's map (``with_attention``).
    device : str
        The device used.
    path : Path or None
        The input file.
    extra : SegmentResult
        The engine's result (``confidence``, ``excluded`` when it has them).
    scale_bar : ScaleBarReading or None
        For an image without a pixel size on which a scale bar was found: the bar's length
        and, when its label was read, the pixel size it proposes (for the user to confirm;
        never applied).
    n_pixels : int
        Pixels of the image (every slice of a stack).
    """

    name: str
    labels: np.ndarray | None
    n_particles: int
    scale: Any
    pixel_size: PixelSize
    config: Any
    attention: np.ndarray | None = None
    device: str = "cpu"
    path: Path | None = None
    extra: Any = None
    scale_bar: Any = None
    n_pixels: int = 0

    @property
    def excluded(self) -> list[dict[str, Any]]:
        """The burned-in annotations found and left out (see ``SegmentResult.excluded``)."""
        return list(getattr(self.extra, "excluded", None) or [])

    def describe_excluded(self) -> str:
        """One line naming the annotations left out (``""`` when none)."""
        return describe_annotations(self.excluded)

    @property
    def nonfinite(self) -> int:
        """Pixels that were NaN or infinite: missing, background in :attr:`labels`."""
        return int(getattr(self.extra, "nonfinite", 0) or 0)

    def describe_nonfinite(self) -> str:
        """One line saying how many pixels were not finite (``""`` when none)."""
        return describe_nonfinite(self.name, self.nonfinite, self.n_pixels)

    @property
    def unsure(self) -> int | None:
        """Particles left out because the network's confidence in them was under
        ``config.min_confidence`` (``None`` where not counted: block by block)."""
        n = getattr(self.extra, "unsure", None)
        return None if n is None else int(n)

    def describe_unsure(self, keep: str = "sagegan segment --min-confidence 0") -> str:
        """One line saying how many unsure particles were left out and how to ``keep``
        them (``""`` when none)."""
        n = self.unsure
        if not n:
            return ""
        return (
            f"{self.name}: {n} particle{'s' if n != 1 else ''} the network was unsure of "
            f"(confidence under {self.config.min_confidence:g}) left out ({keep} keeps them)"
        )

    @property
    def confidence(self) -> np.ndarray | None:
        """Per-particle confidence in [0, 1] indexed by label (``confidence[label]``), see
        :mod:`napari_sagegan.engine.infer.confidence`; ``None`` when not computed."""
        return getattr(self.extra, "confidence", None)

    def report(self) -> dict[str, Any]:
        """This image's entry of ``segment_report.json``."""
        s, res = self.scale, self.extra
        diameter = s.diameter if s is not None else None
        confidence = s.confidence if s is not None else None
        excluded = list(res.excluded) if res is not None else []
        return {
            "file": self.path.name if self.path is not None else self.name,
            "diameter_px": float(diameter) if diameter is not None else None,
            "diameter_source": _DIAMETER_SOURCES.get(s.source, "none")
            if diameter is not None
            else "none",
            "confidence": float(confidence) if confidence is not None else None,
            "resample_factor": float(s.factor) if s is not None else 1.0,
            "threshold": float(self.config.threshold),
            "seed_threshold": float(self.config.seed_threshold),
            "tta_views": int(self.config.tta),
            "min_confidence": float(self.config.min_confidence),
            "unsure_left_out": self.unsure,
            "n_particles": int(self.n_particles),
            "pixel_size_nm": self.pixel_size.nm,
            "pixel_size_source": self.pixel_size.source if self.pixel_size.known else None,
            "excluded": excluded,
            "nonfinite_pixels": self.nonfinite,
        }


def describe_annotations(items: list[Any]) -> str:
    """One line naming burned-in annotations (``SegmentResult.excluded`` dicts or
    :class:`~napari_sagegan.engine.infer.annotations.Annotation` s), ``""`` when none."""
    if not items:
        return ""
    from napari_sagegan.engine.infer.annotations import Annotation, describe

    found = [
        a
        if isinstance(a, Annotation)
        else Annotation(str(a["kind"]), tuple(a.get("bbox", (0, 0, 0, 0))), a.get("length_px"))
        for a in items
    ]
    return describe(found)


def _scale_bar(data: Any, pixel_size: PixelSize, excluded: list[dict[str, Any]] | None) -> Any:
    """The scale-bar pixel-size proposal of an image without a pixel size (a stack: its
    middle slice), or ``None``; only looked for when the segmenter left a bar out (or, with
    ``excluded=None``, always)."""
    if pixel_size.known:
        return None
    if excluded is not None and not any(e.get("kind") == "scalebar" for e in excluded):
        return None
    from napari_sagegan.engine.infer.annotations import scale_bar_pixel_size

    shape = tuple(getattr(data, "shape", ()))
    if len(shape) not in (2, 3):
        return None
    ref = data if len(shape) == 2 else data[shape[0] // 2]
    return scale_bar_pixel_size(np.asarray(ref))


def segment(
    images: Any,
    *,
    model: Any = "default",
    device: str = "auto",
    diameter: float | None = None,
    diameter_nm: float | None = None,
    pixel_size: float | PixelSize | None = None,
    infer: dict[str, Any] | None = None,
    with_attention: bool = False,
    out: PathLike | None = None,
    csv: bool = False,
    keep_labels: bool = True,
    channel: int | None = None,
) -> Generator[Progress, None, list[Segmented]]:
    """Segment micrographs into instance labels.

    Parameters
    ----------
    images : path, array, Micrograph or a sequence of them
        Image files (TIFF, PNG, JPEG, BMP, DM3/DM4, EMD, SER, MRC), folders of them, arrays
        ``(Y, X)`` / ``(Z, Y, X)``, or :class:`Micrograph` s (a napari layer's data and
        pixel size). Files are read one at a time.
    model : path, ``"default"``, Checkpoint or Segmenter
        The segmenter (``"default"``: the bundled model).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    diameter, diameter_nm : float, optional
        Typical particle diameter in pixels, or in nm (needs each image's pixel size); by
        default estimated per image.
    pixel_size : float or PixelSize, optional
        nm per pixel of every image, overriding what the files or layers say.
    infer : dict, optional
        :class:`~napari_sagegan.engine.config.InferConfig` fields replacing the model's
        recommended settings (``tile_size``, ``threshold``, ``split``, ``auto_scale``...;
        ``None`` values are ignored).
    with_attention : bool
        Also return the attention map.
    out : path, optional
        Folder to write ``<stem>.tif`` (labels, calibrated when the pixel size is known),
        with ``csv`` ``<stem>.csv`` (the particle table of
        :func:`napari_sagegan.engine.analysis.measure.measure` plus each particle's network
        ``confidence``) + ``<stem>.summary.json``, and ``segment_report.json``.
    keep_labels : bool
        Keep every image's labels in the result (``False`` with ``out`` saves memory).
    channel : int, optional
        The channel to segment in multi-channel files (an ImageJ ``CYX`` hyperstack, a TIFF
        with several samples per pixel that are not RGB, one of R, G, B); such files are
        refused without it. Arrays are used as given.

    Non-finite pixels (NaN, +-inf, e.g. the margin left by drift correction) are missing:
    left out of the normalisation and the particle size, filled for the network and
    background in the labels; each result counts them (:attr:`Segmented.nonfinite`, the
    report's ``nonfinite_pixels``). An image with no finite pixel is refused, naming it.

    Yields
    ------
    Progress
        ``prepare`` (the device), ``tiles`` after every tile (``step`` / ``total`` over all
        images when they are all in memory, else over the current image; ``data``:
        ``image``, ``index``, ``n_images``, ``image_step``, ``image_total``, ``device``),
        then ``image`` after each image with ``data["result"]`` (a :class:`Segmented`).

    Returns
    -------
    list of Segmented
    """
    from napari_sagegan.io.layout import check_channel
    from napari_sagegan.util.files import staged_folder

    channel = check_channel(channel)
    items = _micrographs(images, pixel_size, channel)
    if out is not None:
        out = _check_outputs(items, out, model, csv)
    _check_diameters(items, diameter, diameter_nm)

    seg = _segmenter(model, device)
    config = seg.default_infer_config(**(infer or {}))
    if seg.target_diameter is None and (diameter or diameter_nm):
        warnings.warn(
            "this model was trained at its images' own scale (no network scale): the "
            "particle diameter is ignored; retrain it with `sagegan train` to use one",
            stacklevel=2,
        )
    n = len(items)
    yield Progress(
        "prepare", 0, n, message=f"segmenting {n} image(s) on {seg.device_name}",
        data={"device": seg.device_name},
    )  # fmt: skip

    def plane_config(m: Micrograph) -> Any:
        return _plane_config(config, m, diameter, diameter_nm)

    in_memory = all(m.data is not None for m in items)
    plans = None
    if in_memory:
        plans = []
        for m in items:
            with _named(m.name):
                plans.append(seg.plan(_read(m), plane_config(m)))
    total = sum(k for _, k in plans) if plans else None
    clock = EtaClock(total)
    results: list[Segmented] = []
    with staged_folder(out) if out is not None else contextlib.nullcontext() as staging:
        done = 0
        for i, m in enumerate(items):
            data = _read(m, channel)
            cfg = plane_config(m)
            with _named(m.name):
                info, n_image = plans[i] if plans else seg.plan(data, cfg)

            def overall(ev: Progress, m=m, i=i, done=done) -> Progress:
                step = done + ev.step if plans else ev.step
                prefix = f"{m.name} ({i + 1}/{n}): " if n > 1 else ""
                return Progress(
                    "tiles", step, total if plans else ev.total,
                    eta_s=clock.eta(step) if plans else ev.eta_s, message=prefix + ev.message,
                    data={"image": m.name, "index": i, "n_images": n, "image_step": ev.step,
                          "image_total": ev.total, "device": seg.device_name},
                )  # fmt: skip

            with _named(m.name):
                res = yield from relay(
                    seg.segment(data, cfg, with_attention=with_attention, scale=info), overall
                )
            done += n_image
            result = _segmented(m, res, cfg, data)
            if staging is not None:
                _write_segmented(staging, result, data, csv)
                if not keep_labels:
                    result.labels = None
            results.append(result)
            yield Progress(
                "image", i + 1, n, message=f"{m.name}: {result.n_particles} particles",
                data={"result": result, "device": seg.device_name},
            )  # fmt: skip
        if staging is not None:
            write_report(staging, model, [r.report() for r in results])
    return results


def _check_outputs(items: list[Micrograph], out: PathLike, model: Any, csv: bool) -> Path:
    """``out`` checked as the output folder of these inputs (returned as a Path): inputs of
    the same stem refused (their outputs would overwrite each other), the folder writable,
    no output that would overwrite an input or the model file."""
    from napari_sagegan.util.files import new_folder, refuse_overwriting_inputs

    stems = [Path(m.name).stem for m in items]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(
            f"several inputs share the name {dupes[0]!r}; their outputs would overwrite "
            "each other: rename them or segment them separately"
        )
    out = new_folder(out)
    inputs = [m.path for m in items if m.path is not None]
    if isinstance(model, (str, os.PathLike)):
        inputs.append(model)  # "default" does not exist as a path: skipped
    refuse_overwriting_inputs(
        [out / n for n in output_names(stems, csv)], inputs, folder=out
    )  # `segment raw/*.tif --out raw` would write the labels over the micrographs
    return out


def _check_diameters(
    items: list[Micrograph], diameter: float | None, diameter_nm: float | None
) -> None:
    """Refuse bad diameter values, and a diameter in nm for an image without a pixel size
    (an EM file's is read now)."""
    particle_diameter(diameter, diameter_nm, PixelSize(1.0), "")  # refuse bad values first
    if diameter_nm is not None:
        for m in items:
            if m.path is not None and not m.pixel_size.known:
                m.pixel_size = resolve_pixel_size(m.path)  # an EM file: read it now
            particle_diameter(None, diameter_nm, m.pixel_size, m.name)


def _plane_config(
    config: Any, m: Micrograph, diameter: float | None, diameter_nm: float | None
) -> Any:
    """``config`` with the particle diameter of ``m`` in pixels (when given)."""
    d = particle_diameter(diameter, diameter_nm, m.pixel_size, m.name)
    return dataclasses.replace(config, diameter=d) if d else config


def _segmented(m: Micrograph, res: Any, cfg: Any, data: Any) -> Segmented:
    """The :class:`Segmented` of ``m`` from the engine's ``SegmentResult``."""
    return Segmented(
        m.name, res.labels, int(res.labels.max()), res.scale, m.pixel_size, cfg,
        res.attention, res.device, m.path, res,
        _scale_bar(data, m.pixel_size, res.excluded),
        int(np.prod(np.shape(data))),
    )  # fmt: skip


def write_report(folder: PathLike, model: Any, entries: list[dict[str, Any]], **extra: Any) -> Path:
    """Write ``folder/segment_report.json`` atomically: the format, the model (its path, or
    ``"memory"``), the per-image ``entries`` (:meth:`Segmented.report`) and ``extra`` keys."""
    from napari_sagegan.io.tables import write_json

    source = model if isinstance(model, (str, os.PathLike)) else "memory"
    return write_json(
        Path(folder) / REPORT_NAME,
        {"format": REPORT_FORMAT, "version": REPORT_VERSION, "model": str(source),
         "images": entries, **extra},
    )  # fmt: skip


# --------------------------------------------------------------------------- estimate


@dataclass
class SizeEstimate:
    """The particle size :func:`segment` would use for one image, found before segmenting.

    Attributes
    ----------
    name : str
        The image's name.
    scale : ScaleInfo
        The diameter (pixels), its source (``"estimate"`` / ``"network"`` / ``"none"``), the
        resampling factor, the confidence and the alternatives (see
        :class:`~napari_sagegan.engine.infer.scale.ScaleInfo`).
    pixel_size : PixelSize
        The image's pixel size used for the diameter in nm (unknown: ``pixel_size.nm`` is
        ``None``).
    scale_bar : ScaleBarReading or None
        Only when the pixel size is unknown and a scale bar was found: its length in pixels,
        its label (read with Tesseract when installed) and the pixel size it proposes
        (``scale_bar.pixel_size_nm``, ``None`` unless the label was read). A proposal for
        the user to confirm; it is never applied.
    device : str
        The device used.
    """

    name: str
    scale: Any
    pixel_size: PixelSize
    scale_bar: Any = None
    device: str = "cpu"

    @property
    def diameter(self) -> float | None:
        """The particle diameter in pixels (``None``: none found, or the model has no
        network scale)."""
        return self.scale.diameter

    @property
    def diameter_nm(self) -> float | None:
        """The particle diameter in nm when the pixel size is known."""
        d = self.scale.diameter
        return d * self.pixel_size.nm if d is not None and self.pixel_size.known else None

    @property
    def confidence(self) -> float | None:
        return self.scale.confidence

    @property
    def uncertain(self) -> bool:
        """The estimate's confidence is low: check it, or give the size."""
        return bool(self.scale.uncertain)

    @property
    def proposed_pixel_size(self) -> float | None:
        """nm per pixel read from the image's scale bar (to confirm), or ``None``."""
        return getattr(self.scale_bar, "pixel_size_nm", None)

    def describe(self) -> str:
        """One line, e.g. ``"particle diameter ~ 42 px = 21 nm (estimated), confidence
        0.81; image resampled x0.76"``."""
        return self.scale.describe(self.pixel_size.nm)

    def describe_scale_bar(self) -> str:
        """One line about the scale bar of an image without a pixel size (``""``: none)."""
        return describe_scale_bar(self.scale_bar)


def describe_scale_bar(reading: Any) -> str:
    """One line about a :class:`~napari_sagegan.engine.infer.annotations.ScaleBarReading`:
    the bar's length, its label and the pixel size it proposes (``""`` for ``None``)."""
    if reading is None:
        return ""
    line = f"scale bar of {reading.length_px:.0f} px found"
    if reading.pixel_size_nm:
        return line + (
            f", labelled {reading.length_nm:g} nm: pixel size {reading.pixel_size_nm:.4g} nm "
            "(not applied: confirm it)"
        )
    if reading.text:
        return line + f"; its label ({reading.text.strip()!r}) gives no length"
    return line + "; its label was not read (install Tesseract OCR to read it)"


def estimate_size(
    image: Any,
    *,
    model: Any = "default",
    device: str = "auto",
    pixel_size: float | PixelSize | None = None,
    infer: dict[str, Any] | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, SizeEstimate]:
    """The particle size :func:`segment` would use for one image, without segmenting it.

    The classical estimate is a first guess; with the model's ``scale_search`` the network
    then finds the size on a ladder of scales (a central crop; a stack: its middle slice),
    with a confidence. When the image has no pixel size, a burned-in scale bar is measured
    and its label read (OCR, when Tesseract is installed) into a pixel-size *proposal*
    (:attr:`SizeEstimate.scale_bar`), never applied.

    Parameters
    ----------
    image : path, array or Micrograph
        One image file, a ``(Y, X)`` / ``(Z, Y, X)`` array, or a :class:`Micrograph`.
    model : path, ``"default"``, Checkpoint or Segmenter
        The segmenter (``"default"``: the bundled model).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    pixel_size : float or PixelSize, optional
        nm per pixel, overriding what the file or the Micrograph says.
    infer : dict, optional
        :class:`~napari_sagegan.engine.config.InferConfig` fields replacing the model's
        settings (as for :func:`segment`; a ``diameter`` is ignored: this is the estimate).
    channel : int, optional
        The channel of a multi-channel file (as for :func:`segment`).

    Yields
    ------
    Progress
        ``prepare`` (the device), then ``scale`` per rung of the network's scale ladder.

    Returns
    -------
    SizeEstimate

    Raises
    ------
    ValueError
        Several images given, or an image that is not 2-D / 3-D grayscale.
    """
    from napari_sagegan.io.layout import check_channel

    channel = check_channel(channel)
    items = _micrographs(image, pixel_size, channel)
    if len(items) != 1:
        raise ValueError(
            f"estimate the particle size of one image at a time, got {len(items)} images"
        )
    (m,) = items
    seg = _segmenter(model, device)
    overrides = {**(infer or {}), "diameter": None, "auto_scale": True}
    config = seg.default_infer_config(**overrides)
    config = dataclasses.replace(config, diameter=None)
    yield Progress(
        "prepare", 0, 1, message=f"estimating the particle size of {m.name} on {seg.device_name}",
        data={"device": seg.device_name},
    )  # fmt: skip
    data = _read(m, channel)

    def tagged(ev: Progress) -> Progress:
        return Progress(
            "scale", ev.step, ev.total, ev.eta_s, ev.message,
            {**ev.data, "image": m.name, "device": seg.device_name},
        )  # fmt: skip

    with _named(m.name):
        info = yield from relay(seg.estimate_scale(data, config), tagged)
    return SizeEstimate(m.name, info, m.pixel_size, _scale_bar(data, m.pixel_size, None),
                        seg.device_name)  # fmt: skip


def _write_segmented(folder: Path, r: Segmented, image: Any, csv: bool) -> None:
    from napari_sagegan.io.export import write_labels_tiff

    stem, px = Path(r.name).stem, r.pixel_size.nm
    # Fiji-ready labels, calibrated when the pixel size is known (a stack's Z stays a slice)
    write_labels_tiff(
        folder / f"{stem}.tif", r.labels, scale=(px, px) if px else None, unit="nm" if px else None
    )
    if csv:
        from napari_sagegan.engine.analysis.measure import measure as measure_labels
        from napari_sagegan.engine.infer.confidence import with_confidence
        from napari_sagegan.io.tables import write_measurements

        m = measure_labels(r.labels, np.asarray(image), px)
        m.table = with_confidence(m.table, r.confidence)  # a last column: the order is kept
        write_measurements(
            folder / f"{stem}.csv", m, pixel_size_source=r.pixel_size.source if px else None
        )
