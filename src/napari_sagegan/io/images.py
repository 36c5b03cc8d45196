"""Read micrographs and label images, and pair them by name.

Qt-free and torch-free: the ``sagegan`` command line and training on folders use it.
Why ~570 lines: reading, pairing and listing share the readers' rules (suffixes, what a
mask is); what a header says (axes, channels, declared size) is in
:mod:`napari_sagegan.io.layout`.

Conventions
-----------
- Micrographs are grayscale. An RGB(A) file whose colour channels are equal (the usual way a
  grayscale figure is saved) is read as that single channel, alpha dropped; a genuinely
  coloured image is refused with a ``ValueError`` (or one channel is taken: ``channel=N``).
- A 2-D image is returned as ``(Y, X)``; a TIFF stack as ``(Z, Y, X)``. The stored dtype
  (uint8, uint16, float, ...) is kept: normalisation is the engine's job.
- A TIFF's axes come from tifffile (``series.axes``, ImageJ / OME metadata included): depth,
  time, angle or unnamed axes make a stack; channels (``C``) and samples per pixel that are
  not an RGB photograph (``S``) are ambiguous and refused unless ``channel=N`` picks one
  (see :mod:`napari_sagegan.io.layout`).
- Every file's declared size is checked from its header before decoding
  (:func:`~napari_sagegan.io.layout.check_decoded_size`): a tiny file declaring billions
  of pixels, or a PNG decompression bomb, is refused with the declared shape and bytes.
- An image with no finite pixel (all NaN / inf) is refused, naming the file; single
  non-finite pixels are kept as they are (the engine treats them as missing).
- Label images hold 0 for background and 1, 2, ... for particles. A binary mask is split into
  connected components with 4-connectivity (``connectivity=1``): two particles that touch
  only at a corner become two instances, which is what a microscopist drawing a mask means.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_sagegan.io.layout import (
    ImageRefused,
    Layout,
    check_channel,
    check_decoded_size,
    dims,
    pillow_header,
    tiff_layout,
)

#: File suffixes recognised as images when listing folders (case-insensitive).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

_TIFF_SUFFIXES = (".tif", ".tiff")
_JPEG_SUFFIXES = (".jpg", ".jpeg")
#: JPEG stores colour as luma + chroma; a grey picture saved as RGB JPEG may decode with
#: R, G, B a grey level or two apart. Such files are still accepted as grayscale.
_JPEG_TOLERANCE = 2
#: A mask matches an image whose stem is the mask's stem minus one of these endings.
_MASK_STEM_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels")
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- reading


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` when it is an existing file; a clear error otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: check the path and the file name")
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not an image file")
    return p


def _load_tiff(path: Path, channel: int | None, what: str) -> tuple[np.ndarray, str | None]:
    """Read the first series of a TIFF, its layout checked from the header first.

    Returns the data with singleton axes dropped, the chosen channel taken and any samples
    axis moved last, and what that samples axis is (``"colour"``, ``"alpha"`` or ``None``).
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("the file holds no image")
        series = tif.series[0]
        layout = tiff_layout(path, series, channel, what)
        check_decoded_size(path, layout.stored, series.dtype, _plane_of(layout))
        data = series.asarray()
    if layout.planes > 1:
        raise ImageRefused(
            f"{path}: expected a 2-D image or a 3-D stack (Z, Y, X), got shape "
            f"{layout.stored} (axes {layout.axes})"
        )
    return layout.apply(data), layout.samples


def _plane_of(layout: Layout) -> tuple[int, int]:
    return layout.shape[layout.axes.index("Y")], layout.shape[layout.axes.index("X")]


def _load_other(path: Path, channel: int | None, what: str) -> tuple[np.ndarray, str | None]:
    """Read PNG / JPEG / BMP (and anything else Pillow reads) through imageio, the header's
    declared size checked first; a channel choice takes one sample."""
    import warnings

    import imageio.v3 as iio
    from PIL import Image

    pillow_header(path)
    with warnings.catch_warnings():  # the size was checked above
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        data = np.asarray(iio.imread(path, plugin="pillow"))
    has_samples = data.ndim == 3 and data.shape[-1] in (2, 3, 4)
    if channel is not None:
        n = data.shape[-1] if has_samples else 1
        if channel >= n:
            raise ImageRefused(
                f"{path} has {'a single channel' if n == 1 else f'{n} channels'} (shape "
                f"{dims(data.shape)}); there is no channel {channel}: "
                + (f"choose one of 0-{n - 1}" if n > 1 else "leave --channel out for this file")
            )
        return (np.ascontiguousarray(data[..., channel]) if has_samples else data), None
    if not has_samples:
        return data, None
    return data, "colour" if data.shape[-1] >= 3 else "alpha"


def _single_channel(data: np.ndarray, colour: bool, path: Path, what: str) -> np.ndarray:
    """Reduce a trailing samples axis to one grey channel, refusing real colour."""
    if not colour:  # grey + alpha: the grey value is the first sample
        return np.ascontiguousarray(data[..., 0])
    r, g, b = data[..., 0], data[..., 1], data[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):
        return np.ascontiguousarray(r)
    if path.suffix.lower() in _JPEG_SUFFIXES and np.issubdtype(data.dtype, np.integer):
        rgb = data[..., :3].astype(np.int32)
        spread = rgb.max(axis=-1) - rgb.min(axis=-1)
        if int(spread.max()) <= _JPEG_TOLERANCE:
            return np.rint(rgb.mean(axis=-1)).astype(data.dtype)
    if what == "image":
        raise ValueError(
            f"{path} is a colour image (its R, G, B channels differ); EM images are "
            "grayscale: convert it to grayscale first, or choose one channel with --channel N "
            "(0-2)"
        )
    raise ValueError(
        f"{path} is a colour mask (its R, G, B channels differ); expected a grayscale label "
        "image (0 = background, 1, 2, ... = particles) or a binary mask: save the mask as a "
        "single-channel image"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_array(path: str | os.PathLike, what: str, channel: int | None = None) -> np.ndarray:
    p = existing_file(path)
    channel = check_channel(channel)
    is_tiff = p.suffix.lower() in _TIFF_SUFFIXES
    try:
        load = _load_tiff if is_tiff else _load_other
        data, samples = load(p, channel, what)
    except (FileNotFoundError, MemoryError, ImageRefused):
        raise
    except Exception as exc:  # any decoder failure: truncated, corrupt, not an image
        raise ValueError(f"cannot read {p} as an image: {_reason(exc)}") from exc
    if samples is not None:
        data = _single_channel(data, samples == "colour", p, what)
    # Only a TIFF holds stacks: any other 3-D result (an odd channel count) is refused.
    if not (data.ndim == 2 or (data.ndim == 3 and is_tiff)):
        raise ValueError(
            f"{p}: expected a 2-D image or a 3-D stack (Z, Y, X), got shape {data.shape}"
        )
    if what == "image":
        require_finite(data, p)
    return data


def require_finite(data: np.ndarray, name: str | os.PathLike) -> None:
    """Refuse an image none of whose pixels is finite (all NaN or infinite), naming it.

    Integer images always pass without a look; a float image with at least one finite
    pixel passes (the others are missing pixels, which the engine leaves out).

    Raises
    ------
    ValueError
        ``"<name> holds no finite value (every pixel is NaN or infinite) ..."``.
    """
    if np.dtype(data.dtype).kind not in "fc" or np.isfinite(data).any():
        return
    raise ValueError(
        f"{name} holds no finite value (every pixel is NaN or infinite): there is nothing "
        "to segment or measure in it; check the file or the step that wrote it"
    )


def probe_image(path: str | os.PathLike, *, channel: int | None = None) -> tuple[int, ...]:
    """Check that ``path`` looks like a readable 2-D image or 3-D stack without decoding it.

    Reads only the file header (TIFF series / Pillow header), so a batch job can refuse a
    bad input before it starts: a damaged header, a declared size too large to decode here,
    channels to choose from without a ``channel``, a ``channel`` that is not there. Returns
    the stored shape (a samples axis included).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_image`, for what a header can tell.
    """
    p = existing_file(path)
    channel = check_channel(channel)
    is_tiff = p.suffix.lower() in _TIFF_SUFFIXES
    try:
        if is_tiff:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if not tif.series:
                    raise ValueError("the file holds no image")
                series = tif.series[0]
                layout = tiff_layout(p, series, channel, "image")
                check_decoded_size(p, layout.stored, series.dtype, _plane_of(layout))
            if layout.planes > 1:
                raise ImageRefused(
                    f"{p}: expected a 2-D image or a 3-D stack (Z, Y, X), got shape "
                    f"{layout.stored} (axes {layout.axes})"
                )
            return layout.stored
        (h, w), mode = pillow_header(p)
    except (FileNotFoundError, MemoryError, ImageRefused):
        raise
    except Exception as exc:
        raise ValueError(f"cannot read {p} as an image: {_reason(exc)}") from exc
    bands = 1 if mode in ("1", "L", "I", "F", "P") or mode.startswith("I;16") else len(mode)
    if channel and mode not in ("P", "PA") and channel >= bands:  # a palette: RGB(A)
        raise ImageRefused(
            f"{p} has {'a single channel' if bands == 1 else f'{bands} channels'} (mode "
            f"{mode}, {w} x {h} pixels); there is no channel {channel}"
        )
    return (h, w) if bands == 1 else (h, w, bands)


def read_image(path: str | os.PathLike, *, channel: int | None = None) -> np.ndarray:
    """Read a grayscale micrograph (or TIFF stack) as stored.

    PNG, JPEG and BMP are read with imageio (Pillow), TIFF with tifffile (first series,
    its axes from ``series.axes``). The declared size is checked before decoding: more than
    2**31 pixels per plane, or more bytes than the memory available, is refused.

    Parameters
    ----------
    path : str or PathLike
        Image file.
    channel : int, optional
        The channel to read from a multi-channel file: a TIFF whose channels (``C``) or
        samples per pixel (``S``) are not an RGB photograph (an ImageJ ``CYX`` hyperstack,
        5 detector samples...), which is refused without one; or one of R, G, B of a
        colour image. ``0`` is accepted for a single-channel image.

    Returns
    -------
    numpy.ndarray
        ``(Y, X)`` for an image, ``(Z, Y, X)`` for a TIFF stack (axes Z, T, A, I or Q:
        depth, time, tilt angle, unnamed); dtype as stored (uint8, uint16, float32, ...).
        RGB(A) files with equal colour channels give the single channel (alpha dropped);
        grey + alpha gives the grey channel.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a readable image (truncated, corrupt, another format), declares a
        size too large to decode here, is a colour image, has channels to choose from
        (without ``channel``) or not the one chosen, has more than three axes, or holds no
        finite value.
    """
    return _read_array(path, "image", channel)


def as_instance_labels(mask: np.ndarray, *, source: str = "the mask") -> np.ndarray:
    """Turn a 2-D mask into an int32 instance label map.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(Y, X)``: boolean, binary (0 and one other value, e.g. 0/255 or 0/1) or an instance
        label map (0 = background, several positive ids). Float masks must hold integers.
    source : str
        Name used in error messages (e.g. the file name).

    Returns
    -------
    numpy.ndarray
        ``(Y, X)`` int32. A binary mask becomes its 4-connected components 1..N; an instance
        map keeps its ids (renumbered 1..N only if they do not fit in int32).

    Raises
    ------
    ValueError
        The mask is not 2-D, holds negative or non-integer values.
    """
    from skimage.measure import label as connected_components

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(
            f"{source}: expected a 2-D label image (Y, X), got shape {mask.shape}; save one "
            "mask per image"
        )
    if mask.dtype == bool:
        return connected_components(mask, connectivity=1).astype(np.int32)
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"{source}: expected integer labels, got dtype {mask.dtype}")
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.floor(mask)):
            raise ValueError(
                f"{source} holds non-integer values; expected integer labels (0 = background, "
                "1, 2, ... = particles) or a binary mask"
            )
    if mask.size == 0:
        raise ValueError(f"{source} is empty (shape {mask.shape})")
    if mask.min() < 0:
        raise ValueError(f"{source} holds negative values; labels must be 0 or positive")
    nonzero = mask[mask != 0]
    if nonzero.size == 0 or nonzero.min() == nonzero.max():  # binary (or empty) mask
        return connected_components(mask != 0, connectivity=1).astype(np.int32)
    if nonzero.max() > _INT32_MAX:
        from skimage.segmentation import relabel_sequential

        mask = relabel_sequential(mask.astype(np.uint64))[0]
    return mask.astype(np.int32)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a particle mask as an instance label map.

    Parameters
    ----------
    path : str or PathLike
        Mask file (PNG, TIFF, ...): an instance label image (0 = background, 1..N =
        particles) or a binary mask (0 and one other value, or boolean). RGB masks with
        equal channels are read as one channel.

    Returns
    -------
    numpy.ndarray
        ``(Y, X)`` int32. A binary mask is split into its 4-connected components
        (``skimage.measure.label(connectivity=1)``); an instance map keeps its ids.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unreadable file, colour mask, not 2-D, negative or non-integer values.
    """
    p = Path(path).expanduser()
    return as_instance_labels(_read_array(p, "mask"), source=str(p))


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read a label image or a TIFF stack of them: ``(Y, X)`` or ``(Z, Y, X)`` int32.

    Each slice is read as by :func:`read_labels` (a binary mask becomes its 4-connected
    components, slice by slice).
    """
    p = Path(path).expanduser()
    data = _read_array(p, "mask")
    if data.ndim == 2:
        return as_instance_labels(data, source=str(p))
    return np.stack([as_instance_labels(s, source=f"{p} slice {z}") for z, s in enumerate(data)])


# --------------------------------------------------------------------------- listing


def _image_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted, hidden files skipped."""
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in suffixes
    )


def _existing_folder(folder: str | os.PathLike, what: str) -> Path:
    p = Path(folder).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} folder {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"{what} folder {p} is a file, not a folder")
    return p


def _by_stem(files: list[Path], folder: Path, what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out:
            raise ValueError(
                f"two {what} files in {folder} share the name {f.stem!r} ({out[f.stem].name} "
                f"and {f.name}); keep one of them"
            )
        out[f.stem] = f
    return out


def _examples(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(repr(s) for s in names[:n])
    return shown + (", ..." if len(names) > n else "")


def find_pairs(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike
) -> list[tuple[Path, Path]]:
    """Pair the images of one folder with the masks of another by file name.

    A mask matches an image when its stem (file name without extension) equals the image's
    stem, optionally followed by ``_mask``, ``_masks``, ``_label`` or ``_labels``; the
    extensions may differ (``a.png`` with ``a.tif``). The two folders may be the same one
    (``a.tif`` beside ``a_mask.tif``). Images without a mask are skipped with a
    ``UserWarning`` saying how many; masks without an image are ignored.

    Parameters
    ----------
    images_dir, masks_dir : str or PathLike
        Folders (not searched recursively) of images and of masks.

    Returns
    -------
    list of (Path, Path)
        ``(image, mask)`` pairs sorted by image stem.

    Raises
    ------
    FileNotFoundError
        A folder does not exist.
    ValueError
        A folder holds no image files, two files share a stem, or no image has a mask.
    """
    images_dir = _existing_folder(images_dir, "image")
    masks_dir = _existing_folder(masks_dir, "mask")
    kinds = ", ".join(IMAGE_SUFFIXES)
    image_files = _image_files(images_dir)
    if not image_files:
        raise ValueError(f"no image files ({kinds}) in the image folder {images_dir}")
    mask_files = _image_files(masks_dir)
    if not mask_files:
        raise ValueError(f"no mask files ({kinds}) in the mask folder {masks_dir}")
    images = _by_stem(image_files, images_dir, "image")
    masks = _by_stem(mask_files, masks_dir, "mask")
    same_folder = images_dir.resolve() == masks_dir.resolve()
    endings = _MASK_STEM_SUFFIXES[1:] if same_folder else _MASK_STEM_SUFFIXES

    matched: dict[str, Path] = {}
    for stem in sorted(images):
        for ending in endings:
            mask = masks.get(stem + ending)
            if mask is not None:
                matched[stem] = mask
                break
    if same_folder:  # the masks themselves are listed as images too: not training images
        mask_stems = {m.stem for m in matched.values()}
        images = {s: f for s, f in images.items() if s not in mask_stems}
        matched = {s: m for s, m in matched.items() if s in images}
    if not matched:
        raise ValueError(
            f"no image in {images_dir} has a mask of the same name in {masks_dir} (images: "
            f"{_examples(sorted(images))}; masks: {_examples(sorted(masks))}). Name each mask "
            "like its image (the extension may differ; an ending _mask or _labels is allowed)"
        )
    missing = sorted(set(images) - set(matched))
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(images)} images in {images_dir} have no mask in "
            f"{masks_dir} and are skipped ({_examples(missing)})",
            UserWarning,
            stacklevel=2,
        )
    return [(images[s], matched[s]) for s in sorted(matched)]


def list_images(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> list[Path]:
    """Expand files and folders into a list of image files.

    Parameters
    ----------
    inputs : path or iterable of paths
        Image files and/or folders. Folders contribute their image files (``suffixes``,
        not recursive, sorted by name, hidden files skipped).
    suffixes : sequence of str
        Accepted file suffixes, lower case with the dot (default :data:`IMAGE_SUFFIXES`).

    Returns
    -------
    list of Path
        The files in the order given, each once.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    ValueError
        Nothing was given, a folder holds no image, or a file is not a supported image type.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    suffixes = tuple(suffixes)
    kinds = ", ".join(suffixes)
    if not inputs:
        raise ValueError("no input given: pass image files or folders of images")
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: check the path")
        if p.is_dir():
            files = _image_files(p, suffixes)
            if not files:
                raise ValueError(f"the folder {p} holds no image files ({kinds})")
        elif p.suffix.lower() not in suffixes:
            raise ValueError(f"{p} is not a supported image file; expected one of {kinds}")
        else:
            files = [p]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


@dataclass
class Pair:
    """An image and its instance labels, ``(Y, X)`` or ``(Z, Y, X)``, with a name."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def read_pairs(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    *,
    channel: int | None = None,
) -> list[Pair]:
    """Read the (image, mask) pairs of two folders (masks beside the images by default).

    Files are paired by :func:`find_pairs`; each image is read with :func:`read_image`
    (``channel``: the channel of multi-channel images), each mask with
    :func:`read_label_image`, and a mask must match its image pixel for pixel.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`find_pairs` and the readers; a mask whose shape differs from its image's.
    """
    out = []
    for img_path, mask_path in find_pairs(images_dir, masks_dir or images_dir):
        image = read_image(img_path, channel=channel)
        mask = read_label_image(mask_path)
        if mask.shape != image.shape:
            raise ValueError(
                f"{mask_path.name} has shape {mask.shape} but its image {img_path.name} has "
                f"shape {image.shape}; a mask must match its image pixel for pixel"
            )
        out.append(Pair(img_path.name, image, mask))
    return out
