"""Training data: intensity normalisation, per-instance targets and a patch sampler.

NumPy only at import; torch is imported inside :meth:`PatchSampler.sample`.

The network sees one grayscale channel in ``[-1, 1]`` (method.md). EM images often use a
handful of grey levels or 16 bits, so each image is stretched between robust percentiles
(:func:`robust_range`, :func:`apply_range`) computed on a strided subsample: the same code
works on a numpy array, a ``np.memmap`` or a dask array without reading it whole.

Targets (:func:`instance_targets`) are the foreground mask and a boundary-aware distance map
that peaks at 1 in the middle of every particle and falls to 0 where two particles touch; the
post-processing splits touching particles on its valleys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sagegan.engine.data.augment import augment_sample

if TYPE_CHECKING:
    import torch

__all__ = [
    "PatchSampler",
    "apply_range",
    "instance_targets",
    "normalize",
    "robust_range",
    "split_indices",
]


# --------------------------------------------------------------------------- intensities


def _strided_sample(image: Any, max_samples: int) -> np.ndarray:
    """Read at most ``max_samples`` pixels on a regular grid (same stride on every axis)."""
    shape = tuple(int(n) for n in image.shape)
    n = math.prod(shape)
    if n <= max_samples:
        return np.asarray(image)
    stride = max(1, math.ceil((n / max_samples) ** (1.0 / len(shape))))
    while math.prod(math.ceil(s / stride) for s in shape) > max_samples:
        stride += 1
    return np.asarray(image[(slice(None, None, stride),) * len(shape)])


def robust_range(
    image: Any,
    *,
    low: float = 0.5,
    high: float = 99.8,
    max_samples: int = 2_000_000,
) -> tuple[float, float]:
    """Intensity range between two percentiles, estimated from a strided subsample.

    Parameters
    ----------
    image : array-like
        Any shape and dtype: numpy array, ``np.memmap``, dask array (anything sliceable with
        steps and accepted by ``np.asarray``). Only a regular grid of at most
        ``max_samples`` pixels is read. NaN and infinite values are ignored.
    low, high : float
        Percentiles, ``0 <= low < high <= 100``.
    max_samples : int
        Most pixels read.

    Returns
    -------
    (float, float)
        ``(lo, hi)`` with ``lo < hi``, in the image's grey levels. When the two percentiles
        coincide (an image with very few grey levels) the sample's min and max are used; a
        constant image with value ``v`` gives ``(v, v + 1)`` (it normalises to -1).

    Raises
    ------
    ValueError
        Bad percentiles, an empty image, or no finite value.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    if math.prod(image.shape) == 0:
        raise ValueError(f"the image is empty (shape {tuple(image.shape)})")
    sample = _strided_sample(image, max_samples).astype(np.float64, copy=False).ravel()
    if not np.all(np.isfinite(sample)):
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise ValueError("the image holds no finite value (all NaN or infinite)")
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def apply_range(image: Any, lo: float, hi: float) -> np.ndarray:
    """Map grey level ``lo`` to -1 and ``hi`` to +1, linearly, clipping outside.

    Parameters
    ----------
    image : array-like
        Any shape and dtype.
    lo, hi : float
        Grey levels mapped to -1 and +1, ``lo < hi`` (see :func:`robust_range`).

    Returns
    -------
    numpy.ndarray
        float32, same shape, values in ``[-1, 1]``.
    """
    if not hi > lo:
        raise ValueError(f"the intensity range needs lo < hi, got lo={lo}, hi={hi}")
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)  # new array: safe to edit
    out *= np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out)


def normalize(image: Any) -> np.ndarray:
    """Robustly stretch a whole image to ``[-1, 1]``.

    ``apply_range(image, *robust_range(image))``: the 0.5th and 99.8th percentiles map to
    -1 and +1.

    Parameters
    ----------
    image : array-like
        ``(Y, X)`` micrograph, any dtype.

    Returns
    -------
    numpy.ndarray
        float32 ``(Y, X)`` in ``[-1, 1]``.
    """
    lo, hi = robust_range(image)
    return apply_range(image, lo, hi)


# --------------------------------------------------------------------------- targets


def _touching(labels: np.ndarray) -> np.ndarray:
    """Pixels of an instance with a 4-neighbour in a *different* instance (not background)."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = labels[:-1, :] if axis == 0 else labels[:, :-1]
        b = labels[1:, :] if axis == 0 else labels[:, 1:]
        differ = (a != b) & (a > 0) & (b > 0)
        if axis == 0:
            out[:-1, :] |= differ
            out[1:, :] |= differ
        else:
            out[:, :-1] |= differ
            out[:, 1:] |= differ
    return out


def instance_targets(
    labels: np.ndarray, *, min_area: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground and boundary-aware distance targets from an instance label map.

    The distance of a particle pixel is its Euclidean distance (pixels) to the nearest pixel
    that is background *or* lies on the contact line with another particle (the contact
    pixels themselves get 0), divided by the particle's maximum. So every particle peaks at
    1, its rim against the background is ``1 / max`` (small but positive) and two touching
    particles are separated by a two-pixel valley of 0. One EDT for the whole image and one
    scatter-max (``np.maximum.at``) for the per-particle maxima: no loop over particles, except
    for the rare particle that lies entirely on contact lines (1-2 px thick, squeezed
    between others), which gets the exact distance to any other label inside its own box.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` instance labels: 0 = background, 1..N = particles (ids need not be
        consecutive). A boolean mask is split into 4-connected components first.
    min_area : int
        Particles with fewer pixels are set to background.

    Returns
    -------
    labels_clean : numpy.ndarray
        ``(H, W)`` int32, the input without the small particles (ids kept; renumbered only
        if larger than the number of pixels).
    fg : numpy.ndarray
        ``(H, W)`` float32 in {0, 1}: ``labels_clean > 0``.
    dist : numpy.ndarray
        ``(H, W)`` float32 in [0, 1]: 0 on the background, 1 at every particle's centre,
        ``> 0`` somewhere in every kept particle.

    Raises
    ------
    ValueError
        ``labels`` is not 2-D, not integer/boolean, or negative.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.dtype == bool:
        from skimage.measure import label as connected_components

        labels = connected_components(labels, connectivity=1)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (instance ids), got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative (0 = background, 1..N = particles)")
    if labels.size and labels.max() > labels.size:  # sparse huge ids: compact them
        from skimage.segmentation import relabel_sequential

        labels = relabel_sequential(labels)[0]
    clean = labels.astype(np.int32)  # a copy

    n_ids = int(clean.max()) + 1 if clean.size else 1
    area = np.bincount(clean.ravel(), minlength=n_ids)
    small = area < min_area
    small[0] = False
    if small.any():
        clean[small[clean]] = 0
    fg = clean > 0

    edt = ndi.distance_transform_edt(fg & ~_touching(clean)).astype(np.float32)
    peak = np.zeros(n_ids, dtype=np.float32)
    ids = np.flatnonzero((area > 0) & ~small)
    ids = ids[ids > 0]
    if ids.size:
        # Per-particle maxima. np.maximum.at is an unbuffered scatter, ~50x faster here than
        # scipy.ndimage.maximum, which sorts the whole image (seconds on 4k x 4k).
        np.maximum.at(peak, clean[fg], edt[fg])
        flat = ids[peak[ids] == 0]  # particles lying entirely on contact lines (rare)
        boxes = ndi.find_objects(clean) if flat.size else []
        for k in flat:  # exact distance to any other label, inside the particle's box
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[k - 1])
            inside = clean[box] == k
            local = ndi.distance_transform_edt(inside).astype(np.float32)
            edt[box][inside] = local[inside]
            peak[k] = local.max()
    denom = peak[clean]
    dist = np.divide(edt, denom, out=np.zeros_like(edt), where=denom > 0)
    return clean, fg.astype(np.float32), np.clip(dist, 0.0, 1.0, out=dist)


# --------------------------------------------------------------------------- splits


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, seeded split of ``n`` items into training and validation indices.

    Parameters
    ----------
    n : int
        Number of image/mask pairs.
    val_fraction : float
        Fraction held out for validation, in ``[0, 1)``; rounded to the nearest count, at
        least 1 when ``n >= 2`` and ``val_fraction > 0``, and never all items.
    seed : int
        Seed of ``np.random.default_rng``: the same seed gives the same split.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted int64 training and validation indices, disjoint, together ``0..n-1``.
    """
    if n <= 0:
        raise ValueError(
            f"no image/mask pairs to split (got {n}); give at least one image with its mask"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(math.floor(n * val_fraction + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


# --------------------------------------------------------------------------- sampler


def _clamp_start(start: int, length: int, window: int) -> int:
    """Clamp a window's start inside ``[0, length - window]`` (centred when it is longer)."""
    if window >= length:
        return (length - window) // 2
    return min(max(start, 0), length - window)


def _random_start(rng: np.random.Generator, length: int, window: int) -> int:
    if window >= length:
        return (length - window) // 2
    return int(rng.integers(length - window + 1))


class PatchSampler:
    """Random training patches from whole images, with targets and augmentation.

    Each image is normalised once (:func:`normalize`) and its targets computed once
    (:func:`instance_targets`). A patch comes from an image drawn with probability
    proportional to its area (so small images are not over-sampled); with probability
    ``fg_bias`` it is centred on a random particle pixel, otherwise placed uniformly. Images
    smaller than the patch are padded with their median grey (targets with background), so
    the padding never looks like an unlabelled particle. All randomness comes from the
    sampler's own ``np.random.Generator``: the same seed gives the same batches.

    Parameters
    ----------
    images : list of numpy.ndarray
        ``(Y, X)`` raw micrographs, any dtype.
    labels : list of numpy.ndarray
        ``(Y, X)`` instance label maps, one per image, same shape.
    patch_size : int
        Side ``P`` of the square patches, pixels.
    fg_bias : float
        Probability that a patch is centred on a particle pixel.
    augment_ops : sequence of str, optional
        Which augmentations to draw from (default: all of
        :data:`~napari_sagegan.engine.data.augment.AUGMENTATIONS`).
    augment_p : float
        Probability of each augmentation (:func:`~napari_sagegan.engine.data.augment.augment_sample`);
        0 disables augmentation.
    min_area : int
        Particles smaller than this (pixels) are removed from the targets.
    seed : int
        Seed of the sampler's random generator.
    scale_jitter : float
        Each patch is zoomed by a factor drawn log-uniformly from
        ``[1 / scale_jitter, scale_jitter]``: a window of ``P / zoom`` pixels is cut and
        resampled to ``P`` (image bilinear, anti-aliased when shrinking; particle mask
        nearest; distance bilinear). 1 disables it.
    """

    #: Most candidate patch centres kept per image (see ``_centres``).
    MAX_CENTRES = 65_536

    def __init__(
        self,
        images: list[np.ndarray],
        labels: list[np.ndarray],
        *,
        patch_size: int,
        fg_bias: float = 0.7,
        augment_p: float = 0.5,
        augment_ops: Sequence[str] | None = None,
        min_area: int = 15,
        seed: int = 0,
        scale_jitter: float = 1.0,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} masks: give one each")
        if not images:
            raise ValueError("no image/mask pairs: give at least one image with its mask")
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")
        if not 0.0 <= fg_bias <= 1.0:
            raise ValueError(f"fg_bias must be in [0, 1], got {fg_bias}")
        if not 0.0 <= augment_p <= 1.0:
            raise ValueError(f"augment_p must be in [0, 1], got {augment_p}")
        if not 1.0 <= scale_jitter <= 4.0:
            raise ValueError(f"scale_jitter must be in [1, 4], got {scale_jitter}")
        self.scale_jitter = float(scale_jitter)
        self.patch_size = int(patch_size)
        self.fg_bias = float(fg_bias)
        self.augment_p = float(augment_p)
        self.augment_ops = None if augment_ops is None else tuple(augment_ops)
        self._rng = np.random.default_rng(seed)
        self._x: list[np.ndarray] = []
        self._fg: list[np.ndarray] = []
        self._dist: list[np.ndarray] = []
        self._fg_index: list[np.ndarray] = []
        areas = []
        for i, (image, lab) in enumerate(zip(images, labels)):
            image = np.asarray(image)
            lab = np.asarray(lab)
            if image.ndim != 2:
                raise ValueError(f"image {i} must be 2-D (Y, X), got shape {image.shape}")
            if lab.shape != image.shape:
                raise ValueError(
                    f"image {i} has shape {image.shape} but its mask has shape {lab.shape}; "
                    "a mask must have the same size as its image"
                )
            x = normalize(image)
            _, fg, dist = instance_targets(lab, min_area=min_area)
            areas.append(x.size)
            x, fg, dist = self._pad(x, fg, dist)
            self._x.append(x)
            self._fg.append(fg.astype(np.uint8))
            self._dist.append(dist)
            self._fg_index.append(self._centres(fg))
        self._areas = np.asarray(areas, dtype=np.int64)
        self._p = self._areas / self._areas.sum()

    def _pad(
        self, x: np.ndarray, fg: np.ndarray, dist: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pad to at least ``P`` on each side: image with its median, targets with zeros."""
        ph = max(self.patch_size - x.shape[0], 0)
        pw = max(self.patch_size - x.shape[1], 0)
        if ph == 0 and pw == 0:
            return x, fg, dist
        width = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        x = np.pad(x, width, mode="constant", constant_values=float(np.median(x)))
        return x, np.pad(fg, width), np.pad(dist, width)

    @staticmethod
    def _centres(fg: np.ndarray) -> np.ndarray:
        """Flat indices of particle pixels that may centre a patch (int32, evenly thinned).

        At most :attr:`MAX_CENTRES` per image: a regular subset of the raster order keeps
        every particle represented while the memory stays small on large training sets.
        """
        index = np.flatnonzero(fg)
        step = -(-index.size // PatchSampler.MAX_CENTRES)
        return index[::step].astype(np.int32) if index.size else index.astype(np.int32)

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self._x)

    @property
    def pixels(self) -> int:
        """Total area of the images (pixels, before padding): sets the epoch length."""
        return int(self._areas.sum())

    def _window(self, i: int, p: int | None = None) -> tuple[int, int]:
        """Top-left corner of a ``p``-pixel window in padded image ``i`` (may start at a
        negative offset or run past the end when ``p`` exceeds the image: see ``_cut``)."""
        rng = self._rng
        p = self.patch_size if p is None else p
        h, w = self._x[i].shape
        index = self._fg_index[i]
        if index.size and rng.random() < self.fg_bias:
            cy, cx = divmod(int(index[rng.integers(index.size)]), w)
            return _clamp_start(cy - p // 2, h, p), _clamp_start(cx - p // 2, w, p)
        return _random_start(rng, h, p), _random_start(rng, w, p)

    def _cut(self, i: int, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A ``q``-pixel window of image ``i`` and its targets, padded where it leaves the
        image (image with its median grey, targets with background)."""
        top, left = self._window(i, q)
        x, fg, dist = self._x[i], self._fg[i], self._dist[i]
        h, w = x.shape
        ys, xs = slice(max(top, 0), min(top + q, h)), slice(max(left, 0), min(left + q, w))
        pad = (
            (max(-top, 0), max(top + q - h, 0)),
            (max(-left, 0), max(left + q - w, 0)),
        )
        parts = [x[ys, xs], fg[ys, xs], dist[ys, xs]]
        if any(a or b for a, b in pad):
            fill = float(np.median(x))
            parts = [
                np.pad(parts[0], pad, constant_values=fill),
                np.pad(parts[1], pad),
                np.pad(parts[2], pad),
            ]
        return parts[0], parts[1], parts[2]

    def _zoomed(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A patch of image ``i`` at a random zoom, resampled to ``P x P``."""
        from skimage.transform import resize

        p = self.patch_size
        log_j = math.log(self.scale_jitter)
        zoom = math.exp(self._rng.uniform(-log_j, log_j))
        q = max(4, int(round(p / zoom)))
        x, fg, dist = self._cut(i, q)
        if q == p:
            return x, fg, dist
        shrink = q > p
        x = resize(x, (p, p), order=1, anti_aliasing=shrink, preserve_range=True)
        fg = resize(fg, (p, p), order=0, anti_aliasing=False, preserve_range=True)
        dist = resize(dist, (p, p), order=1, anti_aliasing=False, preserve_range=True)
        return (
            x.astype(np.float32),
            fg.astype(np.uint8),
            dist.astype(np.float32),
        )

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw a batch of augmented patches.

        Parameters
        ----------
        batch_size : int
            Number of patches ``B``.

        Returns
        -------
        x : torch.Tensor
            ``(B, 1, P, P)`` float32 images in ``[-1, 1]``.
        fg : torch.Tensor
            ``(B, P, P)`` int64 class indices (0 background, 1 particle).
        dist : torch.Tensor
            ``(B, P, P)`` float32 normalised distances in ``[0, 1]``.
        """
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        p = self.patch_size
        xs = np.empty((batch_size, 1, p, p), dtype=np.float32)
        fgs = np.empty((batch_size, p, p), dtype=np.int64)
        dists = np.empty((batch_size, p, p), dtype=np.float32)
        for b in range(batch_size):
            i = int(self._rng.choice(self.n_images, p=self._p))
            if self.scale_jitter > 1.0:
                x, fg, dist = self._zoomed(i)
            else:
                top, left = self._window(i)
                win = (slice(top, top + p), slice(left, left + p))
                x, fg, dist = self._x[i][win], self._fg[i][win], self._dist[i][win]
            if self.augment_p > 0:
                x, fg, dist = augment_sample(
                    x, fg, dist, self._rng, p=self.augment_p, ops=self.augment_ops
                )
            xs[b, 0], fgs[b], dists[b] = x, fg, dist
        return torch.from_numpy(xs), torch.from_numpy(fgs), torch.from_numpy(dists)
