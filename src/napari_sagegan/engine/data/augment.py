"""Training augmentation of one (image, foreground, distance) sample (method.md).

As in the authors' pipeline, each operation is applied with probability ``p``, in a random
order: brightness / contrast jitter, Gaussian blur, flips + 90 degree rotations, Gaussian
noise, CLAHE, sharpening (unsharp mask) and a random 85 % crop resized back to the input
size. One more operation is added: polarity inversion (``image -> -image``), because EM
particles can be darker or brighter than their support.

Intensity operations change only the image; geometric ones (``flip``, ``crop``) move the
image and both targets together. All randomness comes from the ``np.random.Generator``
passed in, so a seeded generator gives the same result every time. NumPy, SciPy and
scikit-image only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["AUGMENTATIONS", "GEOMETRIC", "augment_sample"]

#: Names of the operations, in the order :func:`augment_sample` lists them.
AUGMENTATIONS = ("intensity", "blur", "flip", "noise", "clahe", "sharpen", "crop", "invert")
#: Operations that move pixels (applied to the image and to both targets).
GEOMETRIC = ("flip", "crop")

#: Side of the random crop, as a fraction of the input side.
CROP_FRACTION = 0.85

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- intensity


def _intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast x0.75-1.25 about the mean, then brightness shift of +-0.15 (of range 2)."""
    contrast = rng.uniform(0.75, 1.25)
    brightness = rng.uniform(-0.15, 0.15)
    mean = np.float32(image.mean())
    return (image - mean) * np.float32(contrast) + mean + np.float32(brightness)


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma 0.5-1.5 pixels."""
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(image, sigma=rng.uniform(0.5, 1.5), mode="reflect")


def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, standard deviation 0.02-0.1 (of range 2)."""
    sigma = np.float32(rng.uniform(0.02, 0.1))
    return image + sigma * rng.standard_normal(image.shape, dtype=np.float32)


def _clahe(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CLAHE (skimage ``equalize_adapthist``, tiles 1/8 of the side, clip limit 0.01-0.03)."""
    from skimage.exposure import equalize_adapthist

    unit = np.clip((image + 1.0) * 0.5, 0.0, 1.0)
    out = equalize_adapthist(unit, clip_limit=rng.uniform(0.01, 0.03))
    return out.astype(np.float32) * 2.0 - 1.0


def _sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unsharp mask, radius 0.5-2 pixels, amount 0.5-1.5."""
    from skimage.filters import unsharp_mask

    radius, amount = rng.uniform(0.5, 2.0), rng.uniform(0.5, 1.5)
    return unsharp_mask(image, radius=radius, amount=amount, preserve_range=True)


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Polarity inversion: dark particles become bright and vice versa."""
    return -image


# --------------------------------------------------------------------------- geometric


def _flip(image: np.ndarray, fg: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> _Arrays:
    """Random element of the square's symmetry group: h / v flips and quarter turns.

    Non-square inputs get only half turns, so the shape is kept.
    """
    flip_h, flip_v = rng.random() < 0.5, rng.random() < 0.5
    k = int(rng.integers(4)) if image.shape[0] == image.shape[1] else 2 * int(rng.integers(2))

    def move(a: np.ndarray) -> np.ndarray:
        if flip_h:
            a = a[:, ::-1]
        if flip_v:
            a = a[::-1, :]
        return np.rot90(a, k)

    return move(image), move(fg), move(dist)


def _crop(image: np.ndarray, fg: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> _Arrays:
    """Random crop of 85 % of each side, resized back (image, dist bilinear; fg nearest).

    ``scipy.ndimage.zoom`` with ``grid_mode=True`` maps pixel edges onto pixel edges (as
    ``skimage.transform.resize`` does), so the three arrays stay aligned.
    """
    from scipy import ndimage as ndi

    h, w = image.shape
    ch, cw = max(1, round(CROP_FRACTION * h)), max(1, round(CROP_FRACTION * w))
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    win = (slice(top, top + ch), slice(left, left + cw))
    kw = {"grid_mode": True, "mode": "nearest"}
    zoom = (h / ch, w / cw)
    image = ndi.zoom(image[win], zoom, order=1, **kw)
    fg = ndi.zoom(fg[win], zoom, order=0, **kw)
    dist = ndi.zoom(dist[win], zoom, order=1, **kw) * (fg > 0)
    return image, fg, dist


_INTENSITY_OPS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "intensity": _intensity,
    "blur": _blur,
    "noise": _noise,
    "clahe": _clahe,
    "sharpen": _sharpen,
    "invert": _invert,
}
_GEOMETRIC_OPS: dict[str, Callable[..., _Arrays]] = {"flip": _flip, "crop": _crop}


def augment_sample(
    image: np.ndarray,
    fg: np.ndarray,
    dist: np.ndarray,
    rng: np.random.Generator,
    p: float = 0.5,
    *,
    ops: Sequence[str] | None = None,
) -> _Arrays:
    """Randomly augment one training sample.

    The operations are shuffled (``rng.permutation``) and each is applied with probability
    ``p``. The generator is consumed the same way whatever is applied, so a generator in a
    given state always yields the same result.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` float image in ``[-1, 1]``.
    fg : numpy.ndarray
        ``(H, W)`` integer (or boolean) foreground mask in {0, 1}.
    dist : numpy.ndarray
        ``(H, W)`` float normalised distance to the particle edge, in ``[0, 1]``.
    rng : numpy.random.Generator
        Source of all randomness.
    p : float
        Probability of each operation, in ``[0, 1]``.
    ops : sequence of str, optional
        Subset of :data:`AUGMENTATIONS` to draw from (default: all of them), e.g.
        ``GEOMETRIC`` to move pixels without changing grey levels.

    Returns
    -------
    image : numpy.ndarray
        ``(H, W)`` float32 in ``[-1, 1]``.
    fg : numpy.ndarray
        ``(H, W)``, the input's dtype, still in {0, 1}.
    dist : numpy.ndarray
        ``(H, W)`` float32 in ``[0, 1]``, 0 wherever ``fg`` is 0 after a crop.

    Raises
    ------
    ValueError
        Shapes differ or are not 2-D, ``p`` is outside ``[0, 1]``, or an unknown operation.
    """
    image = np.asarray(image)
    fg = np.asarray(fg)
    dist = np.asarray(dist)
    if image.ndim != 2 or fg.shape != image.shape or dist.shape != image.shape:
        raise ValueError(
            "image, fg and dist must be 2-D arrays of one shape, got "
            f"{image.shape}, {fg.shape}, {dist.shape}"
        )
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the augmentation probability p must be in [0, 1], got {p}")
    names = AUGMENTATIONS if ops is None else tuple(ops)
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown augmentation {unknown[0]!r}; choose from {', '.join(AUGMENTATIONS)}"
        )

    image = image.astype(np.float32)  # copies: the caller's arrays are never modified
    fg = fg.copy()
    dist = dist.astype(np.float32)
    for j in rng.permutation(len(names)):
        name = names[int(j)]
        if rng.random() >= p:
            continue
        if name in _GEOMETRIC_OPS:
            image, fg, dist = _GEOMETRIC_OPS[name](image, fg, dist, rng)
        else:
            image = np.clip(_INTENSITY_OPS[name](image, rng), -1.0, 1.0).astype(np.float32)
    image = np.ascontiguousarray(np.clip(image, -1.0, 1.0), dtype=np.float32)
    dist = np.ascontiguousarray(np.clip(dist, 0.0, 1.0), dtype=np.float32)
    return image, np.ascontiguousarray(fg), dist
