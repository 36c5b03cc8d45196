"""Random training patches: :class:`PatchSampler` draws augmented patches with their targets.

NumPy only at import; torch is imported inside :meth:`PatchSampler.sample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .augment import augment_sample
from .intensity import normalize
from .pairs import instance_targets

if TYPE_CHECKING:
    import torch

__all__ = ["PatchSampler"]


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
    weights : sequence of float, optional
        Per image, a factor on its chance of being drawn (default: all 1, i.e. by area).
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
        weights: Sequence[float] | None = None,
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
        #: ``None``, or a list that collects ``(image, y0, x0, h, w)`` of every patch drawn.
        self.windows: list[tuple[int, int, int, int, int]] | None = None
        self._offsets: list[tuple[int, int]] = []
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
            ph, pw = max(self.patch_size - x.shape[0], 0), max(self.patch_size - x.shape[1], 0)
            self._offsets.append((ph // 2, pw // 2))
            x, fg, dist = self._pad(x, fg, dist)
            self._x.append(x)
            self._fg.append(fg.astype(np.uint8))
            self._dist.append(dist)
            self._fg_index.append(self._centres(fg))
        self._areas = np.asarray(areas, dtype=np.int64)
        if weights is not None:
            if len(weights) != len(images) or any(not w >= 0 for w in weights) or not any(weights):
                raise ValueError("weights must be one number >= 0 per image, not all 0")
            p = self._areas * np.asarray(weights, dtype=np.float64)
        else:
            p = self._areas.astype(np.float64)
        self._p = p / p.sum()

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

    def _record(self, i: int, top: int, left: int, q: int) -> None:
        """Keep the window's pixels in image ``i`` (clipped to it, in the unpadded image's
        coordinates) in :attr:`windows`, when it is a list (tests check where patches come
        from)."""
        if self.windows is None:
            return
        oy, ox = self._offsets[i]
        h, w = self._x[i].shape
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + q, h), min(left + q, w)
        self.windows.append((i, y0 - oy, x0 - ox, y1 - y0, x1 - x0))

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
        self._record(i, top, left, q)
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
                self._record(i, top, left, p)
                win = (slice(top, top + p), slice(left, left + p))
                x, fg, dist = self._x[i][win], self._fg[i][win], self._dist[i][win]
            if self.augment_p > 0:
                x, fg, dist = augment_sample(
                    x, fg, dist, self._rng, p=self.augment_p, ops=self.augment_ops
                )
            xs[b, 0], fgs[b], dists[b] = x, fg, dist
        return torch.from_numpy(xs), torch.from_numpy(fgs), torch.from_numpy(dists)
