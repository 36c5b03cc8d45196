"""Procedural EM-like nanoparticle images with exact instance labels.

Used for the sample data shown in napari, for the bundled default model's training data and
for tests. Everything is deterministic given ``seed`` and needs only NumPy, SciPy and
scikit-image (no downloads).

Why one module of ~970 lines: the layouts, the three imaging models and the named presets
share one seeding scheme (``_rng`` tags) that makes every sample reproducible from its seed;
splitting them would spread that scheme over several files. Phase-2 mask layouts live in
:mod:`.layouts`, burned-in annotations in :mod:`.annotations`.

Two steps, usable apart:

1. :func:`make_layout` draws particles (ellipses of a chosen equivalent diameter, in pixels)
   in one of several arrangements and rasterises them into an instance label image.
   Touching or slightly overlapping particles never overwrite each other: every pixel goes
   to the particle whose (ellipse-normalised) centre distance is smallest, a Voronoi split
   inside the union of the particles, so neighbours share a boundary but stay separate.
2. :func:`render_em` turns any label image into a bright-field TEM, SEM or HAADF-STEM
   looking image: mass-thickness contrast of spheres, Fresnel fringes, carbon-film texture,
   uneven illumination, charging, shot noise and blur.

:func:`make_sample`, :func:`make_stack` and :func:`make_training_set` combine the two into
named presets, 3-D tilt / time series and varied training pairs.

Random streams: the layout, the imaging "style" (contrast, illumination, film texture) and
the shot noise each use their own generator derived from ``seed``, so the same layout can be
rendered several times with fresh noise but the same look (see :func:`make_stack`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries, relabel_sequential

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "SAMPLE_KINDS",
    "STACK_SERIES",
    "LATTICE_SPACING",
    "make_layout",
    "render_em",
    "make_sample",
    "make_stack",
    "make_training_set",
]

LAYOUTS = ("dispersed", "agglomerate", "hex", "square", "sparse")
"""Particle arrangements understood by :func:`make_layout`."""

MODALITIES = ("tem", "sem", "haadf")
"""Imaging modes understood by :func:`render_em`."""

SAMPLE_KINDS = ("tem_hex", "tem_dispersed", "sem_agglomerate", "sem_sparse", "haadf_square")
"""Named presets understood by :func:`make_sample` and :func:`make_stack`."""

STACK_SERIES = ("tilt", "time")
"""Kinds of 3-D series understood by :func:`make_stack`."""

LATTICE_SPACING = 1.05
"""Centre-to-centre lattice spacing of "hex" / "square" layouts, in units of the diameter."""

MAX_ASPECT = 1.2
"""Largest particle aspect ratio (major / minor axis)."""

SPARSE_MAX_DENSITY = 0.08
"""Area fraction cap of the "sparse" layout."""

# Tags that separate the random streams derived from one user seed.
_TAG_LAYOUT, _TAG_STYLE, _TAG_NOISE, _TAG_PARTICLE, _TAG_PRESET, _TAG_STACK, _TAG_TRAIN = (
    1001,
    1002,
    1003,
    1004,
    1005,
    1006,
    1007,
)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([*tags, int(seed)])


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 2 or min(out) < 8:
        raise ValueError(
            f"shape must be two image sizes in pixels (Y, X), each at least 8, got {shape!r}"
        )
    return out  # type: ignore[return-value]


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def _check_range(value: Any, name: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = lo <= v < hi if hi_open else lo <= v <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{bracket}, got {value!r}")
    return v


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"dtype must be uint8 or uint16 (the usual EM formats), got {dtype!r}")
    return dt


# --------------------------------------------------------------------------------------------
# particle drawing
# --------------------------------------------------------------------------------------------
def _draw_radius(rng: np.random.Generator, diameter: float, poly: float, n: int | None = None):
    """Equivalent radii (px): lognormal with mean ``diameter / 2`` and relative std ``poly``."""
    if poly > 0:
        sigma = math.sqrt(math.log1p(poly * poly))
        d = diameter * np.exp(rng.normal(-0.5 * sigma * sigma, sigma, n))
    else:
        d = np.full(n, diameter) if n is not None else diameter
    d = np.clip(d, max(0.4 * diameter, 1.5), 2.5 * diameter)
    return 0.5 * d


def _ellipses(rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Particle table (N, 5): y, x, semi-axis a, semi-axis b (px), angle (rad); area = pi r^2."""
    n = len(radii)
    aspect = rng.uniform(1.0, MAX_ASPECT, n)
    theta = rng.uniform(0.0, np.pi, n)
    root = np.sqrt(aspect)
    out = np.empty((n, 5))
    out[:, :2] = centres.reshape(n, 2)
    out[:, 2] = radii * root
    out[:, 3] = radii / root
    out[:, 4] = theta
    return out


def _rasterize(particles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label image (int32) with particle ``i`` as id ``i + 1``; ids of hidden particles missing.

    Pixel centres sit at integer coordinates. A pixel inside several ellipses goes to the one
    with the smallest normalised distance ``(u / a)^2 + (v / b)^2``: for touching discs the
    split passes through the contact point, so neighbours share a boundary.
    """
    h, w = shape
    best = np.full(shape, np.inf, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    for i, (y, x, a, b, th) in enumerate(particles.tolist()):
        r = max(a, b)
        y0, y1 = max(int(math.floor(y - r)), 0), min(int(math.ceil(y + r)) + 1, h)
        x0, x1 = max(int(math.floor(x - r)), 0), min(int(math.ceil(x + r)) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - y)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - x)[None, :]
        c, s = math.cos(th), math.sin(th)
        u = (dx * c + dy * s) / a
        v = (dy * c - dx * s) / b
        d = u * u + v * v
        pb = best[y0:y1, x0:x1]
        m = (d < 1.0) & (d < pb)
        pb[m] = d[m]
        labels[y0:y1, x0:x1][m] = i + 1
    return labels


class _Placer:
    """Growing set of discs (centres, equivalent radii) with a vectorised overlap test."""

    def __init__(self) -> None:
        self.c = np.empty((64, 2))
        self.r = np.empty(64)
        self.n = 0

    def fits(self, y: float, x: float, r: float, factor: float) -> bool:
        if self.n == 0:
            return True
        c = self.c[: self.n]
        d2 = (c[:, 0] - y) ** 2 + (c[:, 1] - x) ** 2
        lim = (self.r[: self.n] + r) * factor
        return bool(np.all(d2 >= lim * lim))

    def add(self, y: float, x: float, r: float) -> int:
        if self.n == len(self.r):
            self.c = np.concatenate([self.c, np.empty_like(self.c)])
            self.r = np.concatenate([self.r, np.empty_like(self.r)])
        self.c[self.n] = (y, x)
        self.r[self.n] = r
        self.n += 1
        return self.n - 1


def _random_layout(rng, shape, diameter, poly, density, *, touch_prob, factor, max_fails=300):
    """Random sequential placement up to area fraction ``density``; some particles touching."""
    h, w = shape
    goal = density * h * w
    placer, area, fails = _Placer(), 0.0, 0
    while area < goal and fails < max_fails:
        r = float(_draw_radius(rng, diameter, poly))
        if placer.n and rng.random() < touch_prob:
            j = int(rng.integers(placer.n))
            ang = rng.uniform(0.0, 2.0 * np.pi)
            dist = (r + placer.r[j]) * rng.uniform(0.97, 1.0)
            y = placer.c[j, 0] + dist * math.sin(ang)
            x = placer.c[j, 1] + dist * math.cos(ang)
            inside = 0.0 <= y < h and 0.0 <= x < w
        else:
            y, x, inside = rng.uniform(0.0, h), rng.uniform(0.0, w), True
        if inside and placer.fits(y, x, r, factor):
            placer.add(y, x, r)
            area += math.pi * r * r
            fails = 0
        else:
            fails += 1
    return placer.c[: placer.n], placer.r[: placer.n]


def _agglomerate_layout(rng, shape, diameter, poly, density):
    """Clusters of touching particles grown by random attachment, up to area ``density``."""
    h, w = shape
    goal = density * h * w
    n_total = goal / (math.pi * diameter * diameter / 4.0)
    mean_size = float(np.clip(n_total / 5.0, 3.0, 30.0))
    placer, area, fails = _Placer(), 0.0, 0
    while area < goal and fails < 100:
        size = int(rng.geometric(1.0 / mean_size))
        r = float(_draw_radius(rng, diameter, poly))
        y, x = rng.uniform(0.0, h), rng.uniform(0.0, w)
        if not placer.fits(y, x, r, 1.0):
            fails += 1
            continue
        members = [placer.add(y, x, r)]
        area += math.pi * r * r
        for _ in range(size - 1):
            if area >= goal:
                break
            r = float(_draw_radius(rng, diameter, poly))
            for _attempt in range(20):
                j = members[int(rng.integers(len(members)))]
                ang = rng.uniform(0.0, 2.0 * np.pi)
                dist = (r + placer.r[j]) * rng.uniform(0.95, 1.0)
                y = placer.c[j, 0] + dist * math.sin(ang)
                x = placer.c[j, 1] + dist * math.cos(ang)
                if -r < y < h + r and -r < x < w + r and placer.fits(y, x, r, 0.95):
                    members.append(placer.add(y, x, r))
                    area += math.pi * r * r
                    break
        fails = 0
    return placer.c[: placer.n], placer.r[: placer.n]


def _lattice_layout(rng, shape, diameter, poly, vacancy, grain_boundaries, jitter, kind):
    """Lattice centres ("hex" or "square"), split into grains of different orientations."""
    h, w = shape
    spacing = LATTICE_SPACING * diameter
    if kind == "hex":
        basis, period = np.array([[1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]]) * spacing, 60.0
    else:
        basis, period = np.array([[1.0, 0.0], [0.0, 1.0]]) * spacing, 90.0

    # grain seeds: 2-4 well separated points inside the image
    n_grains = int(rng.integers(2, 5)) if grain_boundaries else 1
    seeds = rng.uniform((0.0, 0.0), (h, w), size=(1, 2))
    min_sep = 0.3 * min(h, w)
    for _ in range(200):
        if len(seeds) >= n_grains:
            break
        cand = rng.uniform((0.0, 0.0), (h, w), size=2)
        if np.min(np.hypot(*(seeds - cand).T)) >= min_sep:
            seeds = np.vstack([seeds, cand])
    n_grains = len(seeds)
    # orientations spread over the lattice's symmetry period, so grains look different
    base = rng.uniform(0.0, period)
    angles = np.deg2rad(
        base + period * np.arange(n_grains) / n_grains + rng.uniform(-3, 3, n_grains)
    )

    margin = diameter
    half = math.hypot(h, w) / 2.0 + 2.0 * spacing
    n_cells = int(math.ceil(half / (0.8 * spacing))) + 1
    ij = np.stack(
        np.meshgrid(np.arange(-n_cells, n_cells + 1), np.arange(-n_cells, n_cells + 1)), -1
    ).reshape(-1, 2)
    local = ij @ basis  # (M, 2) in (x, y) lattice frame
    centre = np.array([h / 2.0, w / 2.0])
    seed_tree = cKDTree(seeds)
    pts, grain = [], []
    for g, ang in enumerate(angles):
        offset = rng.uniform(0.0, 1.0, 2) @ basis
        p = local + offset
        c, s = math.cos(ang), math.sin(ang)
        yx = np.stack([p[:, 0] * s + p[:, 1] * c, p[:, 0] * c - p[:, 1] * s], -1) + centre
        keep = (
            (yx[:, 0] > -margin)
            & (yx[:, 0] < h + margin)
            & (yx[:, 1] > -margin)
            & (yx[:, 1] < w + margin)
        )
        yx = yx[keep]
        yx = yx[seed_tree.query(yx)[1] == g]
        pts.append(yx)
        grain.append(np.full(len(yx), g))
    yx = np.concatenate(pts)
    keep = np.ones(len(yx), dtype=bool)
    if n_grains > 1:
        # at grain boundaries, sites of different grains can collide: drop one of each pair
        pairs = cKDTree(yx).query_pairs(0.85 * spacing, output_type="ndarray")
        for i, j in pairs[rng.permutation(len(pairs))].tolist():
            if keep[i] and keep[j]:
                keep[j if rng.random() < 0.5 else i] = False
    keep &= rng.random(len(yx)) >= vacancy
    yx = yx[keep]
    yx = yx + rng.normal(0.0, jitter * spacing / math.sqrt(2.0), yx.shape)
    radii = _draw_radius(rng, diameter, poly, len(yx))
    return yx, radii


def _layout_particles(
    rng, shape, layout, diameter, polydispersity, density, vacancy, grain_boundaries, jitter
) -> np.ndarray:
    if layout == "dispersed":
        c, r = _random_layout(
            rng, shape, diameter, polydispersity, density, touch_prob=0.3, factor=0.97
        )
    elif layout == "sparse":
        c, r = _random_layout(
            rng,
            shape,
            diameter,
            polydispersity,
            min(density, SPARSE_MAX_DENSITY),
            touch_prob=0.0,
            factor=1.5,
        )
    elif layout == "agglomerate":
        c, r = _agglomerate_layout(rng, shape, diameter, polydispersity, density)
    else:
        c, r = _lattice_layout(
            rng, shape, diameter, polydispersity, vacancy, grain_boundaries, jitter, layout
        )
    return _ellipses(rng, np.asarray(c, dtype=float), np.asarray(r, dtype=float))


def _layout_args(
    shape,
    layout="dispersed",
    diameter=16.0,
    polydispersity=0.1,
    density=0.3,
    vacancy=0.05,
    grain_boundaries=True,
    jitter=0.08,
    seed=0,
) -> tuple:
    shape = _check_shape(shape)
    layout = _check_choice(layout, LAYOUTS, "layout")
    diameter = _check_range(diameter, "diameter (px)", 2.0, min(shape))
    polydispersity = _check_range(polydispersity, "polydispersity", 0.0, 1.0)
    density = _check_range(density, "density (area fraction)", 0.0, 0.6)
    if density == 0.0:
        raise ValueError("density (area fraction) must be > 0, got 0")
    vacancy = _check_range(vacancy, "vacancy", 0.0, 1.0, hi_open=True)
    jitter = _check_range(jitter, "jitter", 0.0, 0.5)
    return (
        shape,
        layout,
        diameter,
        polydispersity,
        density,
        vacancy,
        bool(grain_boundaries),
        jitter,
        _check_seed(seed),
    )


def make_layout(
    shape: tuple[int, int] = (256, 256),
    *,
    layout: str = "dispersed",
    diameter: float = 16.0,
    polydispersity: float = 0.1,
    density: float = 0.3,
    vacancy: float = 0.05,
    grain_boundaries: bool = True,
    jitter: float = 0.08,
    seed: int = 0,
) -> np.ndarray:
    """Draw a particle arrangement as an instance label image.

    Particles are ellipses (aspect ratio 1-1.2, random orientation) whose equivalent diameter
    follows a lognormal law with mean ``diameter`` and relative std ``polydispersity``.
    Touching particles are split along the Voronoi line of their centres (ellipse-normalised),
    so each pixel belongs to at most one particle and neighbours share a boundary.

    Parameters
    ----------
    shape : (int, int)
        Image size (Y, X) in pixels.
    layout : {"dispersed", "agglomerate", "hex", "square", "sparse"}
        - "dispersed": random non-overlapping placement at area fraction ``density``; about
          a third of the particles are placed touching an earlier one.
        - "agglomerate": clusters of touching particles, total area fraction ``density``.
        - "hex": close-packed hexagonal monolayer, centre spacing ``1.05 * diameter``
          (neighbours touching or nearly), with ``vacancy``, ``jitter`` and, if
          ``grain_boundaries``, 2-4 grains with different lattice orientations.
        - "square": the same with a square lattice.
        - "sparse": few isolated particles, gaps of at least half a diameter, area fraction
          ``min(density, 0.08)``.
    diameter : float
        Mean equivalent diameter in pixels (>= 2).
    polydispersity : float
        Relative standard deviation of the diameter (0: monodisperse).
    density : float
        Target area fraction of the random layouts, in (0, 0.6]; unused by lattices.
    vacancy : float
        Fraction of lattice sites left empty (lattices only).
    grain_boundaries : bool
        Split lattices into 2-4 grains of different orientations.
    jitter : float
        RMS displacement of lattice particles, as a fraction of the spacing (lattices only).
    seed : int
        Random seed (>= 0); the same seed gives the same layout.

    Returns
    -------
    labels : ndarray of int32, shape (Y, X)
        0 = background, particles numbered 1..N consecutively.

    Raises
    ------
    ValueError
        For an unknown layout or a parameter out of range.
    """
    args = _layout_args(
        shape, layout, diameter, polydispersity, density, vacancy, grain_boundaries, jitter, seed
    )
    shape, seed = args[0], args[-1]
    particles = _layout_particles(_rng(seed, _TAG_LAYOUT), *args[:-1])
    labels = _rasterize(particles, shape)
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit std (float32)."""
    f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return f / (float(f.std()) + 1e-12)


def _illumination(rng: np.random.Generator, shape: tuple[int, int], amp: float) -> np.ndarray:
    """Smooth multiplicative field ~1: a linear ramp and one broad bump (relative amp ``amp``)."""
    h, w = shape
    size = float(max(h, w))
    yy = ((np.arange(h, dtype=np.float32) - h / 2.0) / size)[:, None]
    xx = ((np.arange(w, dtype=np.float32) - w / 2.0) / size)[None, :]
    ang = rng.uniform(0.0, 2.0 * np.pi)
    grad = amp * rng.uniform(0.3, 1.0)
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    sig = rng.uniform(0.25, 0.7)
    bump = amp * rng.uniform(-1.0, 1.0)
    ramp = grad * (xx * math.cos(ang) + yy * math.sin(ang))
    blob = bump * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sig * sig))
    return (1.0 + ramp + blob).astype(np.float32)


def _geometry(labels: np.ndarray):
    """Per-pixel sphere geometry of each particle.

    Returns ``t`` (chord thickness of a sphere of the particle's inscribed radius, px),
    ``cos_tilt`` (cosine of the surface normal's tilt from the beam, 1 at the centre,
    ->0 at the rim), ``dout`` (distance of background pixels to the nearest particle, px)
    and ``fg`` (particle mask).
    """
    fg = labels > 0
    if not fg.any():
        z = np.zeros(labels.shape, dtype=np.float32)
        return z, z, np.full(labels.shape, np.inf, dtype=np.float32), fg
    inner = find_boundaries(labels, connectivity=1, mode="inner")
    e = ndi.distance_transform_edt(fg & ~inner).astype(np.float32) + 0.5
    seq = relabel_sequential(labels)[0]
    n = int(seq.max())
    rmax = np.zeros(n + 1, dtype=np.float32)
    rmax[1:] = ndi.maximum(e, seq, np.arange(1, n + 1))
    r = rmax[seq]
    rho = np.clip(r - e, 0.0, None)
    half = np.sqrt(np.clip(r * r - rho * rho, 0.0, None))
    t = np.where(fg, 2.0 * half, 0.0).astype(np.float32)
    cos_tilt = np.where(fg, half / np.maximum(r, 1e-6), 0.0).astype(np.float32)
    dout = ndi.distance_transform_edt(~fg).astype(np.float32)
    return t, cos_tilt, dout, fg


def _particle_factor(seed: int, labels: np.ndarray, spread: float) -> np.ndarray:
    """Per-particle multiplicative factor in [1 - spread, 1 + spread], stable per label id."""
    u = _rng(seed, _TAG_PARTICLE).uniform(1.0 - spread, 1.0 + spread, 65536).astype(np.float32)
    u[0] = 1.0
    return u[np.asarray(labels, dtype=np.int64) % 65536]


def _shot_noise(rng: np.random.Generator, signal: np.ndarray, dose: float) -> np.ndarray:
    """Poisson counting noise at ``dose`` counts per unit signal (float32, same units)."""
    if not np.isfinite(dose):
        return signal
    lam = np.clip(signal, 0.0, None).astype(np.float64) * dose
    return (rng.poisson(lam) / dose).astype(np.float32)


def _render_tem(labels, style, noise_rng, dose_scale, seed):
    shape = labels.shape
    t_centre = style.uniform(0.3, 0.6)  # transmission at the centre of a median particle
    fringe_amp = style.uniform(0.06, 0.14)
    fringe_w = style.uniform(0.6, 1.0)
    film_amp = style.uniform(0.015, 0.04)
    illum_amp = style.uniform(0.05, 0.2)
    psf = style.uniform(0.5, 1.0)
    dose = style.uniform(150.0, 400.0) * dose_scale
    film = 1.0 + film_amp * (0.7 * _texture(style, shape, 1.0) + 0.5 * _texture(style, shape, 4.0))
    illum = _illumination(style, shape, illum_amp)

    t, _, dout, fg = _geometry(labels)
    t_med = float(np.median(t[fg])) * 1.25 if fg.any() else 1.0  # ~ median centre thickness
    k = -math.log(t_centre) / max(t_med, 1e-6)
    trans = np.exp(-k * t * _particle_factor(seed, labels, 0.2))
    fringe = np.where(fg, 0.0, fringe_amp * np.exp(-0.5 * ((dout - 1.0) / fringe_w) ** 2))
    signal = ndi.gaussian_filter((trans * film + fringe) * illum, psf)
    signal = ndi.gaussian_filter(_shot_noise(noise_rng, signal, dose), 0.4)
    return signal, 1.2  # (signal, value that maps near full scale)


def _render_sem(labels, style, noise_rng, dose_scale, seed):
    shape = labels.shape
    bg_level = style.uniform(0.08, 0.2)
    p_level = style.uniform(0.45, 0.65)
    edge_pow = style.uniform(0.5, 0.9)
    tex_amp = style.uniform(0.04, 0.1)
    charge_amp = style.uniform(0.03, 0.12)
    charge_decay = style.uniform(0.85, 0.97)
    illum_amp = style.uniform(0.1, 0.3)
    psf = style.uniform(0.6, 1.2)
    dose = style.uniform(60.0, 150.0) * dose_scale
    substrate = bg_level * (1.0 + 0.15 * _texture(style, shape, 1.5))
    surface = 1.0 + tex_amp * _texture(style, shape, 1.0)
    illum = _illumination(style, shape, illum_amp)
    # a broad charging glow somewhere in the field
    h, w = shape
    cy, cx = style.uniform(0.0, h), style.uniform(0.0, w)
    sig = style.uniform(0.15, 0.4) * max(h, w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    glow = style.uniform(0.0, 0.15) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))

    _, cos_tilt, _, fg = _geometry(labels)
    # secondary-electron yield ~ 1 / cos(tilt): bright rims on spheres
    rim = np.minimum(1.0 / np.maximum(cos_tilt, 0.15) ** edge_pow, 3.0)
    part = p_level * rim * surface * _particle_factor(seed, labels, 0.1)
    # charging: bright tails to the right of particles along the scan lines
    cols = np.broadcast_to(np.arange(w, dtype=np.float32), shape)
    last = np.maximum.accumulate(np.where(fg, cols, -np.inf), axis=1)  # last particle pixel
    tail = (charge_decay ** (cols - last)).astype(np.float32)  # 0 where none to the left
    signal = np.where(fg, part, substrate + charge_amp * tail) + glow
    signal = ndi.gaussian_filter(signal * illum, psf)
    signal = ndi.gaussian_filter(_shot_noise(noise_rng, signal, dose), 0.4)
    return signal.astype(np.float32), 1.3


def _render_haadf(labels, style, noise_rng, dose_scale, seed):
    shape = labels.shape
    bg_level = style.uniform(0.05, 0.12)
    p_gain = style.uniform(0.5, 0.8)
    film_amp = style.uniform(0.01, 0.025)
    probe = style.uniform(0.7, 1.3)
    dose = style.uniform(40.0, 120.0) * dose_scale
    line_noise = style.uniform(0.002, 0.01)
    film = bg_level + film_amp * _texture(style, shape, 1.0)
    illum = _illumination(style, shape, 0.05)

    t, _, _, fg = _geometry(labels)
    t_med = float(np.median(t[fg])) * 1.25 if fg.any() else 1.0
    signal = film + p_gain * (t / max(t_med, 1e-6)) * _particle_factor(seed, labels, 0.15)
    signal = ndi.gaussian_filter(signal * illum, probe)
    signal = _shot_noise(noise_rng, signal, dose)
    if np.isfinite(dose):
        rows = noise_rng.normal(0.0, line_noise / math.sqrt(dose_scale), shape[0])
        signal = signal + rows[:, None].astype(np.float32)
    return signal, 1.2


_RENDERERS = {"tem": _render_tem, "sem": _render_sem, "haadf": _render_haadf}


def _render(labels, modality, seed, noise_rng, dtype, noise) -> np.ndarray:
    style = _rng(seed, _TAG_STYLE)
    # output mapping drawn first, so it is the same whatever the modality draws afterwards
    offset = style.uniform(0.0, 0.08)
    gain = style.uniform(0.75, 0.95)
    dose_scale = 1.0 / noise**2 if noise > 0 else math.inf
    signal, full = _RENDERERS[modality](labels, style, noise_rng, dose_scale, seed)
    if dtype == np.uint16:
        top = float(style.choice([4095, 16383, 65535]))  # 12-, 14- or 16-bit detectors
    else:
        top = 255.0
    img = (offset + gain * signal / full) * top
    return np.clip(np.rint(img), 0, top).astype(dtype)


def _check_labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 2 or min(arr.shape, default=0) < 1:
        raise ValueError(f"labels must be a 2-D (Y, X) label image, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer instance label image (0 = background), got dtype "
            f"{arr.dtype}; convert a binary mask with skimage.measure.label first"
        )
    if arr.size and arr.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background, 1..N = particles)")
    return arr


def render_em(
    labels: np.ndarray,
    *,
    modality: str = "tem",
    seed: int = 0,
    dtype: Any = np.uint8,
    noise: float = 1.0,
) -> np.ndarray:
    """Render an instance label image as an electron micrograph.

    Each particle is modelled as a sphere whose radius is the particle's inscribed radius
    (so ellipses and cut-off particles at the image border look right).

    - "tem" (bright-field TEM): bright background, dark particles with mass-thickness
      contrast ``I = exp(-k t)`` (``t``: sphere chord thickness, so darkest at the centre; ``k``
      set so a median particle transmits 30-60 % at its centre, with +-20 % per-particle
      diffraction-like variation), a thin bright Fresnel fringe just outside each edge,
      carbon-film texture, uneven illumination, Poisson shot noise and PSF blur.
    - "sem": dark textured substrate, bright particles with edge brightening (secondary
      electron yield ``~ 1 / cos(tilt)``), surface texture, charging (a broad glow and bright
      tails along the scan lines after particles), uneven illumination, shot noise, blur.
    - "haadf": dark background, particle brightness proportional to thickness, probe blur,
      shot noise and scan-line noise.

    Contrast, brightness, noise level and blur vary a little with ``seed``.

    Parameters
    ----------
    labels : ndarray of int, shape (Y, X)
        Instance labels, 0 = background. Ids need not be consecutive.
    modality : {"tem", "sem", "haadf"}
        Imaging mode.
    seed : int
        Random seed (>= 0) for the imaging style and the noise.
    dtype : {numpy.uint8, numpy.uint16}
        Output type. ``uint16`` images use a 12-, 14- or 16-bit range (drawn from the seed),
        like real detectors.
    noise : float
        Shot-noise scale: 1 typical, 0 none, 2 twice the noise std (a quarter of the dose).

    Returns
    -------
    image : ndarray of ``dtype``, shape (Y, X)

    Raises
    ------
    ValueError
        For a non-integer or non-2-D label image, an unknown modality, dtype or noise < 0.
    """
    arr = _check_labels(labels)
    modality = _check_choice(modality, MODALITIES, "modality")
    seed = _check_seed(seed)
    dt = _check_dtype(dtype)
    noise = _check_range(noise, "noise", 0.0, 10.0)
    return _render(arr, modality, seed, _rng(seed, _TAG_NOISE), dt, noise)


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------
_LAYOUT_KEYS = (
    "layout",
    "diameter",
    "polydispersity",
    "density",
    "vacancy",
    "grain_boundaries",
    "jitter",
)
_RENDER_KEYS = ("modality", "dtype", "noise")


def _preset(kind: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """Layout and render keyword arguments of a named preset (sizes drawn from ``rng``)."""
    if kind == "tem_hex":
        lay = dict(layout="hex", diameter=rng.uniform(10, 14), polydispersity=0.07)
        lay.update(vacancy=0.04, grain_boundaries=True, jitter=0.06)
        return lay, dict(modality="tem")
    if kind == "tem_dispersed":
        lay = dict(layout="dispersed", diameter=rng.uniform(14, 22), polydispersity=0.15)
        lay.update(density=rng.uniform(0.15, 0.3))
        return lay, dict(modality="tem")
    if kind == "sem_agglomerate":
        lay = dict(layout="agglomerate", diameter=rng.uniform(22, 28), polydispersity=0.15)
        lay.update(density=rng.uniform(0.3, 0.45))
        return lay, dict(modality="sem")
    if kind == "sem_sparse":
        lay = dict(layout="sparse", diameter=rng.uniform(35, 45), polydispersity=0.15)
        lay.update(density=SPARSE_MAX_DENSITY)
        return lay, dict(modality="sem")
    if kind == "haadf_square":
        lay = dict(layout="square", diameter=rng.uniform(10, 16), polydispersity=0.06)
        lay.update(vacancy=0.05, grain_boundaries=False, jitter=0.05)
        return lay, dict(modality="haadf")
    raise ValueError(f"unknown sample kind {kind!r}; choose one of: {', '.join(SAMPLE_KINDS)}")


def _preset_with_overrides(kind: str, seed: int, kw: dict) -> tuple[dict, dict]:
    _check_choice(kind, SAMPLE_KINDS, "sample kind")
    lay, ren = _preset(kind, _rng(seed, _TAG_PRESET))
    for key, value in kw.items():
        if key in _LAYOUT_KEYS:
            lay[key] = value
        elif key in _RENDER_KEYS:
            ren[key] = value
        else:
            raise ValueError(
                f"unknown option {key!r}; layout options: {', '.join(_LAYOUT_KEYS)}; "
                f"rendering options: {', '.join(_RENDER_KEYS)}"
            )
    return lay, ren


def make_sample(
    kind: str = "tem_hex", *, shape: tuple[int, int] = (256, 256), seed: int = 0, **kw: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A named synthetic micrograph with its exact instance labels.

    Parameters
    ----------
    kind : str
        One of :data:`SAMPLE_KINDS`:

        - "tem_hex": bright-field TEM, close-packed hexagonal monolayer of 10-14 px
          particles with grain boundaries and vacancies;
        - "tem_dispersed": TEM, dispersed 14-22 px particles, some touching;
        - "sem_agglomerate": SEM, bright agglomerated ~25 px particles;
        - "sem_sparse": SEM, a few isolated ~40 px particles;
        - "haadf_square": HAADF-STEM, square superlattice of 10-16 px particles.
    shape : (int, int)
        Image size (Y, X) in pixels.
    seed : int
        Random seed (>= 0): the same seed gives the same image and labels.
    **kw
        Overrides of :func:`make_layout` (layout, diameter, polydispersity, density, vacancy,
        grain_boundaries, jitter) or :func:`render_em` (modality, dtype, noise) arguments.

    Returns
    -------
    image : ndarray of uint8 (or ``dtype``), shape (Y, X)
    labels : ndarray of int32, shape (Y, X)
        0 = background, particles 1..N.

    Raises
    ------
    ValueError
        For an unknown kind or option, or an out-of-range value.
    """
    seed = _check_seed(seed)
    lay, ren = _preset_with_overrides(kind, seed, kw)
    labels = make_layout(shape, seed=seed, **lay)
    return render_em(labels, seed=seed, **ren), labels


def make_stack(
    kind: str = "tem_hex",
    *,
    n_slices: int = 5,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    series: str = "tilt",
) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D (Z, Y, X) series of one sample, with labels.

    - "tilt": the sample tilted about the Y axis, angles spread evenly over -60..+60 deg
      (0 deg for a single slice). Each slice is the untilted layout foreshortened along X by
      ``cos(angle)`` about the image centre (nearest-neighbour resampling of the labels; the
      untilted layout is drawn wide enough that the field of view stays full), re-rendered.
      Particles are foreshortened too, as flat (plate-like) particles would be; projected
      spheres would stay round.
    - "time": the same particles drifting together (0.3-1 px per frame), each also
      wandering (random walk, 0.25 px per frame) and slowly growing (0.5-2 % per frame).

    The imaging style (contrast, illumination, film texture) stays the same over the series;
    the shot noise is drawn afresh per slice.

    Parameters
    ----------
    kind : str
        A preset of :data:`SAMPLE_KINDS` (see :func:`make_sample`).
    n_slices : int
        Number of slices Z (>= 1).
    shape : (int, int)
        Slice size (Y, X) in pixels.
    seed : int
        Random seed (>= 0).
    series : {"tilt", "time"}
        Kind of series.

    Returns
    -------
    images : ndarray of uint8, shape (Z, Y, X)
    labels : ndarray of int32, shape (Z, Y, X)
        A particle keeps the same id in every slice where it is visible (so ids track
        particles through the series); ids are consecutive 1..N over the whole stack, not per
        slice, and a slice may lack some ids.

    Raises
    ------
    ValueError
        For an unknown kind or series, or ``n_slices`` < 1.
    """
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    series = _check_choice(series, STACK_SERIES, "series")
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise ValueError(f"n_slices must be an integer >= 1, got {n_slices!r}")
    lay, ren = _preset_with_overrides(kind, seed, {})
    args = _layout_args(shape, seed=seed, **lay)
    rng = _rng(seed, _TAG_LAYOUT)
    h, w = shape
    slices = []
    if series == "tilt":
        angles = np.deg2rad(np.linspace(-60.0, 60.0, n_slices) if n_slices > 1 else [0.0])
        wide = int(math.ceil(w / math.cos(float(np.max(np.abs(angles)))))) + 2
        big = (h, wide)
        base = _rasterize(_layout_particles(rng, big, *args[1:-1]), big)
        x_out = np.arange(w) - (w - 1) / 2.0
        for ang in angles:
            src = np.rint(x_out / math.cos(ang) + (wide - 1) / 2.0).astype(np.intp)
            slices.append(base[:, np.clip(src, 0, wide - 1)])
    else:
        drift_rng = _rng(seed, _TAG_STACK)
        speed = drift_rng.uniform(0.3, 1.0)
        heading = drift_rng.uniform(0.0, 2.0 * np.pi)
        growth = drift_rng.uniform(0.005, 0.02)
        diameter = args[2]
        margin = int(math.ceil(speed * n_slices + 1.5 * diameter * (1 + growth * n_slices))) + 2
        big = (h + 2 * margin, w + 2 * margin)
        particles = _layout_particles(rng, big, *args[1:-1])
        walk = np.cumsum(drift_rng.normal(0.0, 0.25, (n_slices, len(particles), 2)), axis=0)
        walk -= walk[:1]
        step = speed * np.array([math.sin(heading), math.cos(heading)])
        for z in range(n_slices):
            p = particles.copy()
            p[:, :2] += step * z + walk[z]
            p[:, 2:4] *= 1.0 + growth * z
            slices.append(_rasterize(p, big)[margin : margin + h, margin : margin + w])
    labels = relabel_sequential(np.stack(slices))[0].astype(np.int32, copy=False)
    dt = _check_dtype(ren.get("dtype", np.uint8))
    noise = ren.get("noise", 1.0)
    images = np.stack(
        [
            _render(lab, ren["modality"], seed, _rng(seed, _TAG_NOISE, z), dt, noise)
            for z, lab in enumerate(labels)
        ]
    )
    return images, labels


def make_training_set(
    n: int,
    *,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    kinds: tuple[str, ...] | list[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Varied synthetic (image, labels) pairs for training and tests.

    Each pair draws a preset from ``kinds`` (its layout and modality) and then varies it:
    diameter log-uniform in 6-60 px (at most a quarter of the smaller image side),
    polydispersity 3-25 %, area fraction, lattice vacancies / jitter / grain boundaries,
    noise 0.5-2, the modality swapped for another one with probability 0.3, and uint16
    output with probability 0.25.

    Parameters
    ----------
    n : int
        Number of pairs (>= 0).
    shape : (int, int)
        Image size (Y, X) in pixels.
    seed : int
        Random seed (>= 0); pair ``i`` depends only on ``seed`` and ``i``.
    kinds : sequence of str, optional
        Presets to draw from (default: all of :data:`SAMPLE_KINDS`).

    Returns
    -------
    list of (image, labels)
        ``image``: uint8 or uint16, shape (Y, X); ``labels``: int32, shape (Y, X).

    Raises
    ------
    ValueError
        For an unknown kind, an empty ``kinds`` or ``n`` < 0.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0 (number of pairs), got {n!r}")
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    kinds = SAMPLE_KINDS if kinds is None else tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds must name at least one of: {', '.join(SAMPLE_KINDS)}")
    for k in kinds:
        _check_choice(k, SAMPLE_KINDS, "sample kind")
    d_max = max(6.0, min(60.0, min(shape) / 4.0))
    density_range = {
        "dispersed": (0.1, 0.45),
        "agglomerate": (0.2, 0.5),
        "sparse": (0.02, SPARSE_MAX_DENSITY),
    }
    pairs = []
    for i in range(int(n)):
        rng = _rng(seed, _TAG_TRAIN, i)
        kind = kinds[int(rng.integers(len(kinds)))]
        lay, ren = _preset(kind, rng)
        lay["diameter"] = float(np.exp(rng.uniform(math.log(6.0), math.log(d_max))))
        lay["polydispersity"] = rng.uniform(0.03, 0.25)
        if lay["layout"] in density_range:
            lay["density"] = rng.uniform(*density_range[lay["layout"]])
        else:
            lay.update(
                vacancy=rng.uniform(0.0, 0.1),
                jitter=rng.uniform(0.02, 0.1),
                grain_boundaries=bool(rng.random() < 0.6),
            )
        if rng.random() < 0.3:
            ren["modality"] = MODALITIES[int(rng.integers(len(MODALITIES)))]
        ren["noise"] = rng.uniform(0.5, 2.0)
        ren["dtype"] = np.uint16 if rng.random() < 0.25 else np.uint8
        item_seed = int(rng.integers(2**31))
        labels = make_layout(shape, seed=item_seed, **lay)
        pairs.append((render_em(labels, seed=item_seed, **ren), labels))
    return pairs
