"""New masks for synthetic pairs, and synthetic pairs from a trained generator.

Three ways to make masks (method.md, "Producing new synthetic pairs"):

* ``real``: the training masks flipped, rotated by multiples of 90 degrees and elastically
  deformed (:func:`transform_mask`);
* ``paste``: real particles cut from the label images pasted without overlap into an empty
  field up to a chosen area fraction (:func:`paste_instances`, cGAN-Seg's approach);
* ``lattice``: hexagonal or square lattices whose spacing and particle sizes are *fitted* to
  the training masks (:func:`fit_stats`, :func:`lattice_mask`): median nearest-neighbour
  centre spacing, the empirical distribution of equivalent diameters (polydispersity), with
  jitter, vacancies and grain boundaries.

:func:`synthesize_pairs` turns a generator and masks into ``(image, labels)`` pairs
(a generator of progress events, like the rest of the engine).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import relabel_sequential

from ...util.progress import Progress
from .render import (
    LATTICE_SPACING,
    _ellipses,
    _lattice_layout,
    _rasterize,
)

LAYOUTS = ("real", "paste", "lattice", "hex", "square")


def _regions(labels: np.ndarray):
    """Per-particle (area, centroid y, centroid x) of an instance map, vectorised."""
    labels = np.asarray(labels)
    ids, inv, area = np.unique(labels.ravel(), return_inverse=True, return_counts=True)
    yy, xx = np.indices(labels.shape)
    cy = np.bincount(inv, yy.ravel()) / area
    cx = np.bincount(inv, xx.ravel()) / area
    keep = ids > 0
    return area[keep], cy[keep], cx[keep]


def _as_instances(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool or labels.max() <= 1:
        from skimage.measure import label

        return label(labels > 0, connectivity=1).astype(np.int32)
    return labels.astype(np.int32, copy=False)


def fit_stats(labels_list: Sequence[np.ndarray], min_area: int = 15) -> dict[str, Any]:
    """Size and spacing statistics of training masks.

    Returns a dict of primitives (stored in generator checkpoints): ``diameters`` (list of
    equivalent diameters, px, at most 2000), ``diameter`` (median), ``polydispersity``
    (std / mean of diameters), ``spacing`` (median nearest-neighbour centre distance, px;
    ``LATTICE_SPACING * diameter`` when no image has two particles), ``density`` (particle
    area fraction) and ``shape`` (the median image shape).

    Raises
    ------
    ValueError
        No mask contains a particle of at least ``min_area`` pixels.
    """
    diams: list[np.ndarray] = []
    nn: list[np.ndarray] = []
    fg_area, total, shapes = 0, 0, []
    for lab in labels_list:
        lab = _as_instances(lab)
        area, cy, cx = _regions(lab)
        keep = area >= min_area
        area, cy, cx = area[keep], cy[keep], cx[keep]
        shapes.append(lab.shape)
        total += lab.size
        fg_area += int(area.sum())
        if area.size:
            diams.append(2.0 * np.sqrt(area / np.pi))
        if area.size >= 2:
            pts = np.stack([cy, cx], 1)
            d, _ = cKDTree(pts).query(pts, k=2)
            nn.append(d[:, 1])
    if not diams:
        raise ValueError(
            "the masks contain no particles (every pixel is background, or only specks "
            f"under {min_area} px); label some particles first"
        )
    d = np.concatenate(diams)
    diameter = float(np.median(d))
    spacing = float(np.median(np.concatenate(nn))) if nn else LATTICE_SPACING * diameter
    rng = np.random.default_rng(0)
    kept = d if d.size <= 2000 else rng.choice(d, 2000, replace=False)
    return {
        "diameters": [float(v) for v in kept],
        "diameter": diameter,
        "polydispersity": float(d.std() / max(d.mean(), 1e-6)),
        "spacing": max(spacing, 0.5 * diameter),
        "density": float(fg_area / max(total, 1)),
        "shape": [int(np.median([s[0] for s in shapes])), int(np.median([s[1] for s in shapes]))],
    }


def transform_mask(
    labels: np.ndarray, rng: np.random.Generator, *, elastic: float = 0.5
) -> np.ndarray:
    """A flipped / rotated (multiples of 90 deg) / elastically deformed copy of ``labels``.

    ``elastic``: probability of an elastic deformation (displacement field of std 4 px
    smoothed over 16 px, nearest-neighbour resampling keeps the instance ids).
    """
    lab = _as_instances(labels)
    if rng.random() < 0.5:
        lab = lab[:, ::-1]
    if rng.random() < 0.5:
        lab = lab[::-1, :]
    if lab.shape[0] == lab.shape[1]:
        lab = np.rot90(lab, int(rng.integers(4)))
    lab = np.ascontiguousarray(lab)
    if rng.random() < elastic:
        h, w = lab.shape
        sigma = 16.0
        dy = ndi.gaussian_filter(rng.normal(0, 1, (h, w)), sigma)
        dx = ndi.gaussian_filter(rng.normal(0, 1, (h, w)), sigma)
        scale = 4.0 / max(float(np.std(dy)), float(np.std(dx)), 1e-6)
        yy, xx = np.indices((h, w), dtype=np.float64)
        lab = ndi.map_coordinates(
            lab, [yy + dy * scale, xx + dx * scale], order=0, mode="reflect"
        ).astype(np.int32)
    return relabel_sequential(lab)[0].astype(np.int32)


def _particle_crops(labels_list: Sequence[np.ndarray], min_area: int) -> list[np.ndarray]:
    crops = []
    for lab in labels_list:
        lab = _as_instances(lab)
        for i, sl in enumerate(ndi.find_objects(lab), 1):
            if sl is None:
                continue
            crop = lab[sl] == i
            if crop.sum() >= min_area:
                crops.append(crop)
    return crops


def paste_instances(
    labels_list: Sequence[np.ndarray],
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    density: float | None = None,
    min_area: int = 15,
    max_fails: int = 200,
) -> np.ndarray:
    """Real particles pasted without overlap (1 px gap) into an empty field.

    Particles (random flips / 90-degree rotations) are drawn from the training masks and
    placed at random free positions until the area fraction reaches ``density`` (default:
    the training masks' own) or ``max_fails`` placements in a row fail.
    """
    crops = _particle_crops(labels_list, min_area)
    if not crops:
        raise ValueError("the masks contain no particles to paste; label some particles first")
    if density is None:
        density = fit_stats(labels_list, min_area)["density"]
    if not 0.0 < density <= 0.9:
        raise ValueError(f"density (area fraction) must be in (0, 0.9], got {density}")
    h, w = shape
    out = np.zeros((h, w), np.int32)
    taken = np.zeros((h + 2, w + 2), bool)  # padded by 1 px: the 1 px gap at the borders
    area, goal, fails, n = 0, density * h * w, 0, 0
    while area < goal and fails < max_fails:
        c = crops[int(rng.integers(len(crops)))]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        c = np.rot90(c, int(rng.integers(4)))
        ch, cw = c.shape
        if ch > h or cw > w:
            fails += 1
            continue
        y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        grown = ndi.binary_dilation(np.pad(c, 1))
        if np.any(taken[y : y + ch + 2, x : x + cw + 2] & grown):
            fails += 1
            continue
        n += 1
        out[y : y + ch, x : x + cw][c] = n
        taken[y + 1 : y + ch + 1, x + 1 : x + cw + 1] |= c
        area += int(c.sum())
        fails = 0
    return out


def lattice_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    spacing: float,
    diameters: Sequence[float] | float,
    kind: str = "hex",
    jitter: float = 0.05,
    vacancy: float = 0.05,
    grain_boundaries: bool = True,
) -> np.ndarray:
    """An ordered lattice of particles as an instance label image.

    Parameters
    ----------
    shape : (int, int)
        Output size (Y, X), pixels.
    spacing : float
        Centre-to-centre distance of nearest lattice neighbours, px.
    diameters : float or sequence of float
        Equivalent diameters (px) to draw from (the training masks' distribution gives
        their polydispersity); each particle draws one, capped at ``spacing``.
    kind : {"hex", "square"}
    jitter : float
        RMS displacement as a fraction of the spacing.
    vacancy : float
        Fraction of empty sites.
    grain_boundaries : bool
        2-4 grains with different lattice orientations.
    """
    if kind not in ("hex", "square"):
        raise ValueError(f"lattice kind must be 'hex' or 'square', got {kind!r}")
    if spacing < 2:
        raise ValueError(f"lattice spacing must be at least 2 px, got {spacing}")
    pool = np.atleast_1d(np.asarray(diameters, dtype=float))
    if pool.size == 0 or np.any(pool <= 0):
        raise ValueError("particle diameters must be positive")
    # the synthetic module's lattice uses spacing = LATTICE_SPACING * diameter
    yx, _ = _lattice_layout(
        rng, shape, spacing / LATTICE_SPACING, 0.0, vacancy, grain_boundaries, jitter, kind
    )
    d = np.minimum(rng.choice(pool, len(yx)), spacing)
    particles = _ellipses(rng, np.asarray(yx, float), 0.5 * d)
    particles[:, 2:4] = (0.5 * d)[:, None]  # round particles: the size is what was fitted
    labels = _rasterize(particles, tuple(shape))
    return relabel_sequential(labels)[0].astype(np.int32)


def calibrate_spacing(
    stats: dict[str, Any], shape: tuple[int, int], kind: str, *, seed: int = 12345
) -> float:
    """Nominal lattice spacing whose *measured* median nearest-neighbour distance matches
    ``stats["spacing"]`` (jitter, vacancies and grain boundaries shorten the measured one).

    One probe lattice is drawn with the target as nominal spacing and the nominal is scaled
    by target / measured.
    """
    target = float(stats["spacing"])
    side = max(int(6 * target), *shape)
    probe = lattice_mask(
        (side, side),
        np.random.default_rng(seed),
        spacing=target,
        diameters=stats.get("diameters") or [stats["diameter"]],
        kind=kind,
    )
    measured = fit_stats([probe], min_area=1)["spacing"]
    return float(target * target / measured) if measured > 0 else target


def make_masks(
    source: Sequence[np.ndarray] | None,
    n: int,
    *,
    layout: str = "real",
    shape: tuple[int, int] | None = None,
    stats: dict[str, Any] | None = None,
    density: float | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """``n`` new instance masks.

    ``source``: the training masks (needed by ``real`` and ``paste``; lattices only need
    ``stats`` from :func:`fit_stats`, computed from ``source`` when not given). ``layout``
    ``lattice`` alternates hexagonal and square lattices. ``real`` keeps each source mask's
    shape; the others use ``shape`` (default: the statistics' median shape).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if n < 1:
        raise ValueError(f"the number of pairs must be at least 1, got {n}")
    src = [np.asarray(s) for s in (source or [])]
    if layout in ("real", "paste") and not src:
        raise ValueError(f"layout {layout!r} needs training masks (give --masks DIR)")
    if src and not any(np.any(s > 0) for s in src):
        raise ValueError("the masks contain no particles (every pixel is background)")
    if stats is None:
        if not src:
            raise ValueError("lattice layouts need training masks or fitted statistics")
        stats = fit_stats(src)
    rng = np.random.default_rng(seed)
    shape = tuple(shape) if shape is not None else tuple(stats["shape"])  # type: ignore[assignment]
    out = []
    nominal: dict[str, float] = {}
    for i in range(n):
        if layout == "real":
            m = transform_mask(src[i % len(src)], rng)
        elif layout == "paste":
            m = paste_instances(src, shape, rng, density=density)  # type: ignore[arg-type]
        else:
            kind = layout if layout in ("hex", "square") else ("hex", "square")[i % 2]
            if kind not in nominal:
                nominal[kind] = calibrate_spacing(stats, shape, kind)  # type: ignore[arg-type]
            m = lattice_mask(
                shape,  # type: ignore[arg-type]
                rng,
                spacing=nominal[kind],
                diameters=stats.get("diameters") or [stats["diameter"]],
                kind=kind,
            )
        out.append(m)
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Map a generated image in [-1, 1] to uint8 grey levels 0-255."""
    return np.clip((np.asarray(image) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def synthesize_pairs(
    generator: Any,
    masks: Sequence[np.ndarray],
    *,
    seed: int = 0,
    device: str = "auto",
) -> Generator[Progress, None, list[tuple[np.ndarray, np.ndarray]]]:
    """Images ``G(mask, z)`` for each mask; yields progress, returns ``[(image, labels)]``.

    Each image is float32 in [-1, 1] (linear output clamped), the labels the mask's exact
    instances (int32). Masks are padded to the generator's divisor and cropped back. The
    latents come from a generator seeded with ``seed``.
    """
    import torch

    from ..device import resolve_device
    from ..nets.generator import pad_to_multiple

    dev = resolve_device(device)
    generator = generator.to(dev).eval()
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for i, lab in enumerate(masks, 1):
        lab = np.asarray(lab)
        if lab.ndim != 2:
            raise ValueError(f"mask {i} must be 2-D (Y, X), got shape {lab.shape}")
        m = torch.from_numpy((lab > 0).astype(np.float32))[None, None]
        m, (h, w) = pad_to_multiple(m, generator.config.divisor)
        z = torch.randn(1, generator.config.z_dim, generator=g)
        with torch.inference_mode():
            img = generator(m.to(dev), z.to(dev)).clamp(-1, 1)[0, 0, :h, :w].cpu().numpy()
        out.append((img.astype(np.float32), lab.astype(np.int32)))
        yield Progress("generate", i, len(masks), message=f"pair {i}/{len(masks)}")
    return out


def spacing_stats(labels: np.ndarray) -> tuple[float, float]:
    """``(median equivalent diameter, median nearest-neighbour spacing)`` of one mask, px."""
    st = fit_stats([labels], min_area=1)
    return st["diameter"], st["spacing"]
