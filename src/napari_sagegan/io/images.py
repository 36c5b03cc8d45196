"""Read micrographs and label images, and pair them by name.

Qt-free and torch-free: the ``sagegan`` command line and training on folders use it.

Conventions
-----------
- Micrographs are grayscale. An RGB(A) file whose colour channels are equal (the usual way a
  grayscale figure is saved) is read as that single channel, alpha dropped; a genuinely
  coloured image is refused with a ``ValueError``.
- A 2-D image is returned as ``(Y, X)``; a TIFF stack as ``(Z, Y, X)``. The stored dtype
  (uint8, uint16, float, ...) is kept: normalisation is the engine's job.
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


def _load_tiff(path: Path) -> tuple[np.ndarray, tuple[int, ...], bool, bool]:
    """Read the first series of a TIFF.

    Returns the data with singleton axes dropped and any samples-per-pixel axis moved last,
    the shape as stored, whether there is a samples axis, and whether it holds RGB colour.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("the file holds no image")
        series = tif.series[0]
        axes = series.axes
        photometric = series.keyframe.photometric
        data = series.asarray()
    stored = tuple(data.shape)
    # Drop length-1 axes (e.g. ImageJ's T=1, C=1), keeping Y and X even when 1 pixel long.
    keep = [i for i, (ax, n) in enumerate(zip(axes, stored)) if n > 1 or ax in "YX"]
    data = data.reshape([stored[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    has_samples = "S" in axes
    if has_samples:
        data = np.moveaxis(data, axes.index("S"), -1)
    colour = has_samples and photometric in (
        tifffile.PHOTOMETRIC.RGB,
        tifffile.PHOTOMETRIC.YCBCR,
    )
    return data, stored, has_samples, colour


def _load_other(path: Path) -> tuple[np.ndarray, tuple[int, ...], bool, bool]:
    """Read PNG / JPEG / BMP (and anything else Pillow reads) through imageio."""
    import imageio.v3 as iio

    data = np.asarray(iio.imread(path, plugin="pillow"))
    stored = tuple(data.shape)
    has_samples = data.ndim == 3 and data.shape[-1] in (2, 3, 4)
    colour = has_samples and data.shape[-1] >= 3
    return data, stored, has_samples, colour


def _single_channel(data: np.ndarray, colour: bool, path: Path, what: str) -> np.ndarray:
    """Reduce a trailing samples axis to one grey channel, refusing real colour."""
    if not colour:  # grey + alpha / extra samples: the grey value is the first sample
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
            "grayscale: convert it to grayscale first"
        )
    raise ValueError(
        f"{path} is a colour mask (its R, G, B channels differ); expected a grayscale label "
        "image (0 = background, 1, 2, ... = particles) or a binary mask: save the mask as a "
        "single-channel image"
    )


def _read_array(path: str | os.PathLike, what: str) -> np.ndarray:
    p = existing_file(path)
    is_tiff = p.suffix.lower() in _TIFF_SUFFIXES
    try:
        data, stored, has_samples, colour = _load_tiff(p) if is_tiff else _load_other(p)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # any decoder failure: truncated, corrupt, not an image
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read {p} as an image: {reason}") from exc
    if has_samples:
        data = _single_channel(data, colour, p, what)
    # Only a TIFF holds stacks: any other 3-D result (an odd channel count) is refused.
    if data.ndim == 2 or (data.ndim == 3 and is_tiff):
        return data
    raise ValueError(f"{p}: expected a 2-D image or a 3-D stack (Z, Y, X), got shape {stored}")


def probe_image(path: str | os.PathLike) -> tuple[int, ...]:
    """Check that ``path`` looks like a readable 2-D image or 3-D stack without decoding it.

    Reads only the file header (TIFF series / Pillow header), so a batch job can refuse a
    bad input before it starts. Returns the stored shape (a samples axis included).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_image`, for what a header can tell.
    """
    p = existing_file(path)
    try:
        if p.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if not tif.series:
                    raise ValueError("the file holds no image")
                series = tif.series[0]
                shape = tuple(int(n) for n in series.shape)
                axes = series.axes
            core = [n for n, ax in zip(shape, axes) if (n > 1 or ax in "YX") and ax != "S"]
        else:
            import imageio.v3 as iio

            props = iio.improps(p, plugin="pillow")
            shape = tuple(int(n) for n in props.shape)
            core = list(shape[:2])
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read {p} as an image: {reason}") from exc
    if len(core) not in (2, 3):
        raise ValueError(f"{p}: expected a 2-D image or a 3-D stack (Z, Y, X), got shape {shape}")
    return shape


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a grayscale micrograph (or TIFF stack) as stored.

    PNG, JPEG and BMP are read with imageio (Pillow), TIFF with tifffile (first series).

    Parameters
    ----------
    path : str or PathLike
        Image file.

    Returns
    -------
    numpy.ndarray
        ``(Y, X)`` for an image, ``(Z, Y, X)`` for a TIFF stack; dtype as stored (uint8,
        uint16, float32, ...). RGB(A) files with equal colour channels give the single
        channel (alpha dropped).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a readable image (truncated, corrupt, another format), is a colour
        image, or has more than three axes.
    """
    return _read_array(path, "image")


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
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None
) -> list[Pair]:
    """Read the (image, mask) pairs of two folders (masks beside the images by default).

    Files are paired by :func:`find_pairs`; each mask is read with :func:`read_label_image`
    and must match its image pixel for pixel.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`find_pairs` and the readers; a mask whose shape differs from its image's.
    """
    out = []
    for img_path, mask_path in find_pairs(images_dir, masks_dir or images_dir):
        image = read_image(img_path)
        mask = read_label_image(mask_path)
        if mask.shape != image.shape:
            raise ValueError(
                f"{mask_path.name} has shape {mask.shape} but its image {img_path.name} has "
                f"shape {image.shape}; a mask must match its image pixel for pixel"
            )
        out.append(Pair(img_path.name, image, mask))
    return out
