"""Particle statistics in physical units: size, shape, intensity and the order of assemblies.

Qt-free and torch-free: NumPy, SciPy and scikit-image only. The ``sagegan measure`` command,
the Measure dock widget and Python users all call :func:`measure`.

Why one module of ~830 lines: every statistic is a column of the one particle table that
:func:`measure` builds in a single pass over the labels (sizes, shape, intensity,
neighbours, order), or a number of its summary (the log-normal size law included); they
share its region properties and its units.

Units
-----
A pixel size (nm per pixel) turns every length into nanometres; without one, lengths stay in
pixels. The unit is always written into the column and key names (``area_nm2``,
``equivalent_diameter_px``, ``number_density_per_um2``, ...) and into ``unit`` fields, so a
table never holds an unlabelled number. Pixels are assumed square.

Conventions
-----------
- A particle is one label value of a 2-D label image (0 = background). A 3-D stack
  ``(Z, Y, X)`` is measured slice by slice; its table has a ``slice`` column and the same label
  value in two slices counts as two particles.
- Positions are pixel centres: pixel ``(r, c)`` covers ``[r - 0.5, r + 0.5] x [c - 0.5,
  c + 0.5]``, so a centroid in pixels times the pixel size is the napari world coordinate of
  a layer whose ``scale`` is the pixel size.
- Feret diameters are those of the particle as drawn: the union of its pixel squares (the
  convex hull of the pixel corners, as ImageJ measures them). The maximum is the largest
  distance between two hull vertices, the minimum the smallest caliper width, found by
  rotating calipers over the hull edges. A single pixel has Feret max sqrt(2) and min 1.
- Perimeter: Crofton estimate with 4 directions (``skimage.measure.perimeter_crofton``),
  the least biased of scikit-image's estimators for round particles. Circularity
  ``4 pi area / perimeter**2`` is clipped to 1 (digitisation pushes small discs above it).
- Solidity: area / convex area, the convex area being the number of pixels whose centres lie
  in the convex hull of the particle's pixel centres (its digital convex hull), so a
  digitally convex particle (a drawn disc, an ellipse) has solidity 1 whatever its size.
- Particles touching the image border are cut by it: they are flagged (``touches_border``)
  and left out of the size statistics unless asked otherwise. They are kept as neighbours in
  the order analysis, because they are real neighbours.

Order of an assembly
--------------------
Neighbours are those of the Delaunay triangulation of the particle centroids, taken with
their dual Voronoi edges (``scipy.spatial.Voronoi``, one Qhull run gives both). The local
bond-orientational order of particle ``j`` is::

    psi_n(j) = | sum_k (l_jk / L_j) exp(i n theta_jk) |

with ``theta_jk`` the angle of the bond to neighbour ``k``, ``l_jk`` the length of the Voronoi
edge the two cells share and ``L_j`` the cell's perimeter (Mickel et al., J. Chem. Phys. 138,
044501, 2013). The Voronoi weights make psi_n continuous: a neighbour that barely touches
counts barely, which is what makes a square lattice read psi4 = 1 (its Delaunay diagonals are
arbitrary and carry zero weight). The coordination number counts neighbours whose shared edge
is at least ``min_edge_fraction`` (default 5 %) of the cell perimeter. Only particles whose
Voronoi cell lies wholly inside the field of view are scored (``order_interior``): at the
border, neighbours outside the image are missing. The global order parameter is the modulus
of the mean of the complex local values, ~1 for a single crystal, ~0 for a liquid or a
polycrystal; the mean of the local moduli measures local order alone.

Nearest-neighbour distances use every particle; their statistics keep only particles closer
to their nearest neighbour than to the image border (the border cannot hide a nearer one).
The radial distribution function uses the translation edge correction for a rectangular
window (Ohser 1983): each pair ``(i, j)`` is weighted by ``1 / |W n (W + x_j - x_i)|``, the
area of the window shifted by the pair vector, which makes g(r) unbiased up to half the
window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ...util.units import check_pixel_size

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: Neighbours sharing less than this fraction of a Voronoi cell's perimeter do not count
#: towards its coordination number.
MIN_EDGE_FRACTION = 0.05
#: Default number of bins of g(r).
RDF_BINS = 100
#: By default g(r) extends to this many median nearest-neighbour distances (at most half the
#: field of view).
RDF_NN_MULTIPLE = 10.0
_NM_PER_UM = 1000.0


# --------------------------------------------------------------------------- helpers


def length_unit(pixel_size: float | None) -> str:
    """``"nm"`` when a pixel size is known, else ``"px"``."""
    return "nm" if pixel_size is not None else "px"


def _check_labels(labels: Any) -> np.ndarray:
    """Return ``labels`` as a non-negative integer array of 2 or 3 dimensions."""
    from skimage.measure import label as connected_components

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or labels.size == 0:
        raise ValueError(
            f"expected a 2-D label image (Y, X) or a stack (Z, Y, X), got shape {labels.shape}"
        )
    if labels.dtype == bool:  # a binary mask: its 4-connected components are the particles
        if labels.ndim == 2:
            return connected_components(labels, connectivity=1)
        return np.stack([connected_components(s, connectivity=1) for s in labels])
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must hold integers (0 = background, 1, 2, ... = particles), got dtype "
            f"{labels.dtype}"
        )
    if labels.min() < 0:
        raise ValueError("labels must not be negative (0 = background, 1, 2, ... = particles)")
    return labels


def _check_image(image: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if image is None:
        return None
    image = np.asarray(image)
    if image.shape != shape:
        raise ValueError(
            f"the intensity image has shape {image.shape} but the labels have shape {shape}; "
            "they must match pixel for pixel"
        )
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise ValueError(f"the intensity image must be numeric, got dtype {image.dtype}")
    return image


# --------------------------------------------------------------------------- shape


def _hull_measures(mask: np.ndarray) -> tuple[float, float, int]:
    """Feret max, Feret min (px) and convex area (pixel count) of one particle.

    ``mask`` is the particle's bounding-box crop (bool, at least one True). One Qhull run on
    the pixel centres serves all three: the particle as drawn (its pixel squares) has the
    convex hull ``H + S``, the Minkowski sum of the centres' hull ``H`` and a unit pixel
    ``S``. The width of a sum is the sum of the widths, and the minimum width of a convex
    polygon is reached normal to one of its edges, whose normals are those of ``H`` and of
    ``S`` (the axes): rotating calipers over these candidates give the exact Feret min. The
    vertices of ``H + S`` are among the corners of the pixels at the vertices of ``H``: the
    largest distance between those is the exact Feret max.
    """
    from scipy.spatial import ConvexHull, QhullError
    from skimage.measure import grid_points_in_poly

    h, w = mask.shape
    area = int(np.count_nonzero(mask))
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = w - 1 - mask[rows, ::-1].argmax(axis=1)
    # The hull of a union of row runs is the hull of the runs' end pixels.
    centres = np.concatenate(
        [np.column_stack([rows, first]), np.column_stack([rows, last])]
    ).astype(float)
    axes = np.array([[1.0, 0.0], [0.0, 1.0]])
    try:
        hull = ConvexHull(centres)
    except QhullError:  # one pixel, one row or one column: a point or a segment, convex
        verts = centres
        span = verts[np.argmax(verts @ [1.0, 1e-3])] - verts[np.argmin(verts @ [1.0, 1e-3])]
        length = float(np.hypot(*span))
        normals = axes if length == 0 else np.vstack([axes, [-span[1] / length, span[0] / length]])
        convex_area = area
    else:
        verts = centres[hull.vertices]  # ordered around the hull
        normals = np.vstack([hull.equations[:, :2], axes])
        # Convex area: pixels whose centres lie in the hull of the particle's pixel centres
        # (edges included), so a digitally convex particle has solidity 1.
        inside = grid_points_in_poly((h, w), verts, binarize=False)
        convex_area = max(int(np.count_nonzero(inside)), area)
    proj = verts @ normals.T
    widths = proj.max(axis=0) - proj.min(axis=0) + np.abs(normals).sum(axis=1)
    feret_min = float(widths.min())
    corners = (verts[:, None, :] + _PIXEL_CORNERS[None]).reshape(-1, 2)
    diff = corners[:, None, :] - corners[None, :, :]
    feret_max = float(np.sqrt((diff**2).sum(-1).max()))
    return feret_max, feret_min, convex_area


_PIXEL_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


def _shape_columns(labels: np.ndarray, image: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-particle columns of one 2-D label image, lengths in pixels."""
    from scipy import ndimage as ndi
    from skimage.measure import perimeter_crofton

    ny, nx = labels.shape
    flat = labels.ravel()
    ids = np.unique(flat)
    ids = ids[ids != 0]
    n = ids.size
    if n == 0:
        empty = {k: np.zeros(0) for k in _SHAPE_KEYS}
        empty["touches_border"] = np.zeros(0, bool)
        if image is not None:
            empty["mean_intensity"] = np.zeros(0)
        return {"label": np.zeros(0, np.int64)} | empty
    # Sequential ids keep bincount and find_objects small whatever the label values are.
    seq = np.searchsorted(ids, flat).reshape(labels.shape) + 1
    seq[labels == 0] = 0
    rr, cc = np.indices(labels.shape, sparse=True)
    area = np.bincount(seq.ravel(), minlength=n + 1)[1:].astype(float)
    cy = np.bincount(seq.ravel(), np.broadcast_to(rr, labels.shape).ravel(), n + 1)[1:] / area
    cx = np.bincount(seq.ravel(), np.broadcast_to(cc, labels.shape).ravel(), n + 1)[1:] / area
    cols: dict[str, np.ndarray] = {"label": ids.astype(np.int64), "area": area}
    cols["centroid_y"], cols["centroid_x"] = cy, cx
    perimeter = np.empty(n)
    feret_max = np.empty(n)
    feret_min = np.empty(n)
    convex_area = np.empty(n)
    border = np.zeros(n, bool)
    for i, sl in enumerate(ndi.find_objects(seq)):
        mask = seq[sl] == i + 1
        perimeter[i] = perimeter_crofton(mask, directions=4)
        feret_max[i], feret_min[i], convex_area[i] = _hull_measures(mask)
        border[i] = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == ny or sl[1].stop == nx
    cols["perimeter"] = perimeter
    cols["equivalent_diameter"] = np.sqrt(4.0 * area / np.pi)
    cols["feret_max"], cols["feret_min"] = feret_max, feret_min
    cols["aspect_ratio"] = feret_max / feret_min
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = 4.0 * np.pi * area / perimeter**2
    cols["circularity"] = np.clip(np.nan_to_num(circ, nan=1.0, posinf=1.0), 0.0, 1.0)
    cols["solidity"] = area / convex_area
    if image is not None:
        total = np.bincount(seq.ravel(), image.astype(float).ravel(), n + 1)[1:]
        cols["mean_intensity"] = total / area
    cols["touches_border"] = border
    return cols


_SHAPE_KEYS = (
    "area",
    "centroid_y",
    "centroid_x",
    "perimeter",
    "equivalent_diameter",
    "feret_max",
    "feret_min",
    "aspect_ratio",
    "circularity",
    "solidity",
    "touches_border",
)


# --------------------------------------------------------------------------- order


def _edge_distance(points: np.ndarray, field_shape: tuple[int, int]) -> np.ndarray:
    """Distance (px) from each point to the border of the field ``[-0.5, n - 0.5]``."""
    ny, nx = field_shape
    y, x = points[:, 0], points[:, 1]
    return np.minimum.reduce([y + 0.5, ny - 0.5 - y, x + 0.5, nx - 0.5 - x])


def _check_points(points: Any) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be an (N, 2) array of (y, x), got shape {points.shape}")
    return points


def order_metrics(
    points: np.ndarray,
    field_shape: tuple[int, int],
    *,
    min_edge_fraction: float = MIN_EDGE_FRACTION,
) -> dict[str, np.ndarray]:
    """Nearest-neighbour distance, coordination and bond-orientational order per point.

    Parameters
    ----------
    points : numpy.ndarray
        ``(N, 2)`` particle centroids ``(y, x)`` in pixels.
    field_shape : tuple of int
        ``(Y, X)`` size of the field of view in pixels (the image the points come from).
    min_edge_fraction : float
        A Voronoi neighbour counts towards the coordination number when the edge the two
        cells share is at least this fraction of the cell's perimeter.

    Returns
    -------
    dict of numpy.ndarray, each of length N
        ``nn_distance`` (px; NaN with fewer than 2 points), ``nn_edge_ok`` (nearest
        neighbour closer than the image border), ``order_interior`` (Voronoi cell wholly
        inside the field), ``coordination`` (float; NaN where not interior), ``psi6`` and
        ``psi4`` (local moduli; NaN where not interior), ``psi6_complex`` and
        ``psi4_complex`` (complex local values; NaN where not interior).
    """
    from scipy.spatial import QhullError, Voronoi, cKDTree

    points = _check_points(points)
    n = len(points)
    nan = np.full(n, np.nan)
    out: dict[str, np.ndarray] = {
        "nn_distance": nan.copy(),
        "nn_edge_ok": np.zeros(n, bool),
        "order_interior": np.zeros(n, bool),
        "coordination": nan.copy(),
        "psi6": nan.copy(),
        "psi4": nan.copy(),
        "psi6_complex": np.full(n, np.nan, complex),
        "psi4_complex": np.full(n, np.nan, complex),
    }
    if n < 2:
        return out
    dist, _ = cKDTree(points).query(points, k=2)
    out["nn_distance"] = dist[:, 1]
    out["nn_edge_ok"] = dist[:, 1] <= _edge_distance(points, field_shape)
    if n < 4:
        return out
    try:
        vor = Voronoi(points)
    except (QhullError, ValueError):  # all points on a line: no 2-D neighbourhood
        return out

    ny, nx = field_shape
    vv = vor.vertices
    vertex_inside = (
        (vv[:, 0] >= -0.5) & (vv[:, 0] <= ny - 0.5) & (vv[:, 1] >= -0.5) & (vv[:, 1] <= nx - 0.5)
    )
    interior = np.zeros(n, bool)
    for i, region_index in enumerate(vor.point_region):
        region = vor.regions[region_index]
        interior[i] = bool(region) and -1 not in region and bool(vertex_inside[region].all())

    pairs = vor.ridge_points
    ridge = vor.ridge_vertices
    finite = np.array([-1 not in rv for rv in ridge], bool)
    length = np.zeros(len(ridge))
    if finite.any():
        rv = np.array([ridge[k] for k in np.flatnonzero(finite)])
        length[finite] = np.linalg.norm(vv[rv[:, 0]] - vv[rv[:, 1]], axis=1)
    i, j = pairs[:, 0], pairs[:, 1]
    d = points[j] - points[i]
    theta = np.arctan2(d[:, 0], d[:, 1])  # bond i -> j; j -> i adds pi (even n: same value)
    perimeter = np.bincount(i, length, n) + np.bincount(j, length, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_i = length / perimeter[i]
        frac_j = length / perimeter[j]
    counts = np.bincount(i, frac_i >= min_edge_fraction, n) + np.bincount(
        j, frac_j >= min_edge_fraction, n
    )
    for order in (6, 4):
        e = np.exp(1j * order * theta)
        re = np.bincount(i, frac_i * e.real, n) + np.bincount(j, frac_j * e.real, n)
        im = np.bincount(i, frac_i * e.imag, n) + np.bincount(j, frac_j * e.imag, n)
        local = np.where(interior, re + 1j * im, np.nan + 0j)
        out[f"psi{order}_complex"] = local
        out[f"psi{order}"] = np.where(interior, np.abs(local), np.nan)
    out["order_interior"] = interior
    out["coordination"] = np.where(interior, counts, np.nan)
    return out


def _rdf_sums(
    points: np.ndarray, field_shape: tuple[int, int], edges: np.ndarray
) -> tuple[np.ndarray, float]:
    """Edge-weighted pair sums per bin and the normalisation ``A**2 / (N (N - 1))``."""
    from scipy.spatial import cKDTree

    n = len(points)
    sums = np.zeros(len(edges) - 1)
    if n < 2:
        return sums, 0.0
    ny, nx = field_shape
    pairs = cKDTree(points).query_pairs(edges[-1], output_type="ndarray")
    if len(pairs):
        d = points[pairs[:, 1]] - points[pairs[:, 0]]
        r = np.hypot(d[:, 0], d[:, 1])
        overlap = (ny - np.abs(d[:, 0])) * (nx - np.abs(d[:, 1]))
        keep = overlap > 0
        # Each unordered pair stands for the two ordered pairs (i, j) and (j, i).
        sums = np.histogram(r[keep], bins=edges, weights=2.0 / overlap[keep])[0]
    area = float(ny * nx)
    return sums, area**2 / (n * (n - 1))


def radial_distribution(
    points: np.ndarray,
    field_shape: tuple[int, int],
    *,
    r_max: float | None = None,
    bins: int = RDF_BINS,
) -> tuple[np.ndarray, np.ndarray]:
    """Radial distribution function g(r) of points in a rectangular field, edge-corrected.

    Parameters
    ----------
    points : numpy.ndarray
        ``(N, 2)`` centroids ``(y, x)`` in pixels.
    field_shape : tuple of int
        ``(Y, X)`` field of view in pixels.
    r_max : float, optional
        Largest distance in pixels. Default: ten median nearest-neighbour distances, at most
        half the shorter side of the field.
    bins : int
        Number of distance bins.

    Returns
    -------
    r : numpy.ndarray
        ``(bins,)`` bin centres in pixels.
    g : numpy.ndarray
        ``(bins,)`` g(r): 1 for an uncorrelated (Poisson) dispersion, peaks at the neighbour
        shells of an ordered one; zeros with fewer than 2 points.
    """
    points = _check_points(points)
    edges = _rdf_edges([points], field_shape, r_max, bins)
    sums, norm = _rdf_sums(points, field_shape, edges)
    shell = np.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
    return 0.5 * (edges[1:] + edges[:-1]), sums * norm / shell


def _rdf_edges(
    point_sets: list[np.ndarray],
    field_shape: tuple[int, int],
    r_max: float | None,
    bins: int,
) -> np.ndarray:
    if int(bins) < 1:
        raise ValueError(f"g(r) needs at least one bin, got bins={bins}")
    half = 0.5 * min(field_shape)
    if r_max is None:
        from scipy.spatial import cKDTree

        nn = [cKDTree(p).query(p, k=2)[0][:, 1] for p in point_sets if len(p) >= 2]  # pixels
        r_max = half
        if nn:
            r_max = min(half, RDF_NN_MULTIPLE * float(np.median(np.concatenate(nn))))
    elif not (math.isfinite(r_max) and r_max > 0):
        raise ValueError(f"the g(r) range must be a positive distance, got {r_max!r}")
    return np.linspace(0.0, float(max(r_max, 1e-9)), int(bins) + 1)


# --------------------------------------------------------------------------- size law


def lognormal_fit(diameters: Any) -> tuple[float, float] | None:
    """The log-normal law of particle diameters: its median and geometric standard deviation.

    Particle sizes of a synthesis are close to log-normal: ``ln d`` is normal with mean
    ``mu`` and standard deviation ``sigma``. The maximum-likelihood fit is the log-moment
    estimate::

        mu = mean(ln d),   sigma = sqrt(mean((ln d - mu)**2))

    (the same as ``scipy.stats.lognorm.fit(d, floc=0)``, whose ``scale`` is ``exp(mu)`` and
    shape ``s`` is ``sigma``). The median is ``exp(mu)`` (in the diameters' unit), the
    geometric standard deviation ``exp(sigma)`` (dimensionless, >= 1: 1 for identical
    particles; about 68 % of them lie within median / gsd and median * gsd).

    Parameters
    ----------
    diameters : array-like
        ``(N,)`` diameters in any length unit; NaN, infinite and non-positive values are
        left out.

    Returns
    -------
    (median, gsd) or None
        ``None`` with fewer than 2 usable diameters.
    """
    d = np.asarray(diameters, dtype=float).ravel()
    d = d[np.isfinite(d) & (d > 0)]
    if d.size < 2:
        return None
    logs = np.log(d)
    return float(np.exp(logs.mean())), float(np.exp(logs.std()))


def lognormal_pdf(x: Any, median: float, gsd: float) -> np.ndarray:
    """Probability density of the log-normal law ``(median, gsd)`` at diameters ``x``.

    ``pdf(x) = exp(-(ln(x / median))**2 / (2 s**2)) / (x s sqrt(2 pi))`` with
    ``s = ln(gsd)``, in 1 / (the diameters' unit); 0 for ``x <= 0``. A law of identical
    particles (``gsd == 1``) has no density: all zeros.
    """
    x = np.asarray(x, dtype=float)
    s = math.log(gsd) if gsd > 0 else 0.0
    out = np.zeros_like(x)
    if s <= 0 or median <= 0:
        return out
    ok = x > 0
    z = np.log(x[ok] / median) / s
    out[ok] = np.exp(-0.5 * z * z) / (x[ok] * s * math.sqrt(2.0 * math.pi))
    return out


# --------------------------------------------------------------------------- tables


@dataclass
class Measurements:
    """Everything :func:`measure` finds about one label image.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per particle (see :func:`measure` for the columns).
    summary : dict
        JSON-ready numbers (see :func:`summarize`).
    rdf_r : numpy.ndarray
        ``(bins,)`` g(r) bin centres in :attr:`unit`.
    rdf_g : numpy.ndarray
        ``(bins,)`` g(r) values (dimensionless).
    unit : str
        ``"nm"`` or ``"px"``: the unit of every length.
    pixel_size : float or None
        nm per pixel, ``None`` when unknown.
    """

    table: pd.DataFrame
    summary: dict[str, Any]
    rdf_r: np.ndarray
    rdf_g: np.ndarray
    unit: str
    pixel_size: float | None
    field_shape: tuple[int, ...] = field(default=())

    def column(self, name: str) -> str:
        """The table's column for a length or area named without unit, e.g.
        ``column("equivalent_diameter") -> "equivalent_diameter_nm"``."""
        for candidate in (name, f"{name}_{self.unit}", f"{name}_{self.unit}2"):
            if candidate in self.table.columns:
                return candidate
        raise KeyError(f"no column {name!r} in the table")


def _lengths_to_unit(cols: dict[str, np.ndarray], pixel_size: float | None) -> dict[str, Any]:
    """Rename pixel columns to unit-labelled ones and scale them by the pixel size."""
    unit = length_unit(pixel_size)
    s = 1.0 if pixel_size is None else pixel_size
    renamed: dict[str, Any] = {}
    for key, value in cols.items():
        if key in ("centroid_y", "centroid_x", "perimeter", "equivalent_diameter"):
            renamed[f"{key}_{unit}"] = value * s
        elif key in ("feret_max", "feret_min", "nn_distance"):
            renamed[f"{key}_{unit}"] = value * s
        elif key == "area":
            renamed[f"area_{unit}2"] = value * s * s
        else:
            renamed[key] = value
    return renamed


_COLUMN_ORDER = (
    "slice",
    "label",
    "centroid_y",
    "centroid_x",
    "area",
    "equivalent_diameter",
    "feret_max",
    "feret_min",
    "aspect_ratio",
    "perimeter",
    "circularity",
    "solidity",
    "mean_intensity",
    "touches_border",
    "nn_distance",
    "nn_edge_ok",
    "coordination",
    "psi6",
    "psi4",
    "order_interior",
)


def _slice_columns(
    labels2d: np.ndarray, image2d: np.ndarray | None, min_edge_fraction: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    cols = _shape_columns(labels2d, image2d)
    points = np.column_stack([cols["centroid_y"], cols["centroid_x"]]).reshape(-1, 2)
    order = order_metrics(points, labels2d.shape, min_edge_fraction=min_edge_fraction)
    cols.update({k: v for k, v in order.items() if not k.endswith("_complex")})
    cols["_psi6c"], cols["_psi4c"] = order["psi6_complex"], order["psi4_complex"]
    return cols, points


def summarize(
    table: pd.DataFrame,
    field_shape: tuple[int, ...] | None,
    pixel_size: float | None = None,
    *,
    field_area: float | None = None,
    include_border: bool = False,
    psi_complex: dict[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Summary statistics of a particle table.

    Parameters
    ----------
    table : pandas.DataFrame
        As returned by :func:`measure` (``Measurements.table``); its unit is read from
        ``table.attrs["unit"]``, else from ``pixel_size``.
    field_shape : tuple of int or None
        ``(Y, X)`` or ``(Z, Y, X)`` shape of the label image, for the number density and
        the area fraction (all slices count).
    pixel_size : float or None
        nm per pixel, as used for the table (its unit must match the table's columns).
    field_area : float, optional
        Total field area in the table's unit squared, instead of ``field_shape`` (e.g. for
        tables pooled over images of different sizes or pixel sizes).
    include_border : bool
        Include particles touching the image border in the size statistics.
    psi_complex : dict, optional
        ``{6: values, 4: values}`` complex local order per row, for the global order
        parameters (``measure`` passes them).

    Returns
    -------
    dict
        JSON-ready: ``unit``, ``pixel_size_nm``, ``n_particles``, ``n_touching_border``,
        ``n_measured`` (particles in the size statistics), ``equivalent_diameter_<u>_mean``,
        ``_std`` (sample, ddof=1), ``_d10``, ``_d50``, ``_d90`` (number-weighted
        percentiles), ``lognormal_median_<u>`` and ``lognormal_gsd`` (the log-normal law
        fitted to those diameters, :func:`lognormal_fit`), ``feret_max_<u>_mean``,
        ``feret_min_<u>_mean``, ``aspect_ratio_mean``, ``circularity_mean``,
        ``solidity_mean``, ``area_fraction`` (of the field covered by particles, all
        included), ``number_density_per_<u>2`` (all particles / field area;
        also ``number_density_per_um2`` in nm), ``nn_distance_<u>_mean``, ``_std``,
        ``_median`` (over particles nearer their neighbour than the border, ``n_nn``),
        ``n_order_interior``, ``coordination_mean``, ``fraction_coordination_6``,
        ``fraction_coordination_4``, ``psi6_local_mean``, ``psi4_local_mean``,
        ``psi6_global``, ``psi4_global``. Statistics of empty sets are ``None``.
    """
    pixel_size = check_pixel_size(pixel_size)
    unit = table.attrs.get("unit") or length_unit(pixel_size)
    if unit not in ("nm", "px"):
        raise ValueError(f"the table's unit must be 'nm' or 'px', got {unit!r}")
    s = 1.0 if pixel_size is None else pixel_size
    n = len(table)

    def stat(values: np.ndarray, fn) -> float | None:
        values = np.asarray(values, float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
        return float(fn(values))

    def std(v: np.ndarray) -> float:
        return float(np.std(v, ddof=1)) if v.size > 1 else 0.0

    border = table["touches_border"].to_numpy(bool) if n else np.zeros(0, bool)
    sized = table if include_border else table[~border]
    out: dict[str, Any] = {
        "unit": unit,
        "pixel_size_nm": pixel_size,
        "n_particles": int(n),
        "n_touching_border": int(border.sum()),
        "n_measured": int(len(sized)),
        "border_particles_in_size_statistics": bool(include_border),
    }
    d = sized[f"equivalent_diameter_{unit}"].to_numpy(float) if len(sized) else np.zeros(0)
    key = f"equivalent_diameter_{unit}"
    out[f"{key}_mean"] = stat(d, np.mean)
    out[f"{key}_std"] = stat(d, std)
    for q in (10, 50, 90):
        out[f"{key}_d{q}"] = stat(d, lambda v, q=q: np.percentile(v, q))
    fit = lognormal_fit(d)
    out[f"lognormal_median_{unit}"] = fit[0] if fit is not None else None
    out["lognormal_gsd"] = fit[1] if fit is not None else None
    for name in (f"feret_max_{unit}", f"feret_min_{unit}", "aspect_ratio", "circularity"):
        out[f"{name}_mean"] = stat(sized[name].to_numpy(float) if len(sized) else d, np.mean)
    out["solidity_mean"] = stat(sized["solidity"].to_numpy(float) if len(sized) else d, np.mean)

    if field_area is None:
        if field_shape is None:
            raise ValueError("summarize needs the field of view: give field_shape or field_area")
        if unit == "nm" and pixel_size is None:
            raise ValueError("a table in nm needs its pixel size (or field_area) to summarise")
        dims = tuple(int(v) for v in field_shape)
        n_slices = dims[0] if len(dims) == 3 else 1
        field_area = float(dims[-2] * dims[-1]) * n_slices * s * s  # unit^2, all slices
    covered = table[f"area_{unit}2"].to_numpy(float).sum() if n else 0.0
    out["area_fraction"] = float(covered / field_area)
    out[f"number_density_per_{unit}2"] = float(n / field_area)
    if unit == "nm":
        out["number_density_per_um2"] = float(n / field_area * _NM_PER_UM**2)

    nn_ok = table["nn_edge_ok"].to_numpy(bool) if n else np.zeros(0, bool)
    nn = table[f"nn_distance_{unit}"].to_numpy(float)[nn_ok] if n else np.zeros(0)
    out["n_nn"] = int(np.isfinite(nn).sum())
    out[f"nn_distance_{unit}_mean"] = stat(nn, np.mean)
    out[f"nn_distance_{unit}_std"] = stat(nn, std)
    out[f"nn_distance_{unit}_median"] = stat(nn, np.median)

    interior = table["order_interior"].to_numpy(bool) if n else np.zeros(0, bool)
    coord = table["coordination"].to_numpy(float)[interior] if n else np.zeros(0)
    out["n_order_interior"] = int(interior.sum())
    out["coordination_mean"] = stat(coord, np.mean)
    out["fraction_coordination_6"] = stat(coord, lambda v: np.mean(v == 6))
    out["fraction_coordination_4"] = stat(coord, lambda v: np.mean(v == 4))
    for order in (6, 4):
        local = table[f"psi{order}"].to_numpy(float)[interior] if n else np.zeros(0)
        out[f"psi{order}_local_mean"] = stat(local, np.mean)
        glob = None
        if psi_complex is not None and interior.any():
            z = np.asarray(psi_complex[order])[interior]
            glob = float(np.abs(z.mean()))
        out[f"psi{order}_global"] = glob
    return out


def measure(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    pixel_size: float | None = None,
    *,
    include_border: bool = False,
    min_edge_fraction: float = MIN_EDGE_FRACTION,
    rdf_r_max: float | None = None,
    rdf_bins: int = RDF_BINS,
) -> Measurements:
    """Measure every particle of a label image, summarise, and analyse the assembly's order.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(Y, X)`` instance labels (0 = background, 1, 2, ... = particles) or ``(Z, Y, X)``
        stack measured slice by slice. A boolean mask is split into its 4-connected
        components.
    image : numpy.ndarray, optional
        Intensity image of the same shape, for ``mean_intensity`` (in the image's units).
    pixel_size : float, optional
        nm per pixel. ``None``: every length in pixels (``_px`` columns).
    include_border : bool
        Count particles touching the image border in the size statistics (default: no).
    min_edge_fraction : float
        See :func:`order_metrics`.
    rdf_r_max : float, optional
        Range of g(r) in the output unit (nm, or px without pixel size). Default: ten median
        nearest-neighbour distances, at most half the field.
    rdf_bins : int
        Number of g(r) bins.

    Returns
    -------
    Measurements
        ``table`` columns, ``<u>`` being ``nm`` or ``px``: ``slice`` (stacks only),
        ``label``, ``centroid_y_<u>``, ``centroid_x_<u>``, ``area_<u>2``,
        ``equivalent_diameter_<u>`` (diameter of the disc of equal area), ``feret_max_<u>``,
        ``feret_min_<u>``, ``aspect_ratio`` (Feret max / min), ``perimeter_<u>``,
        ``circularity``, ``solidity``, ``mean_intensity`` (with ``image``),
        ``touches_border``, ``nn_distance_<u>``, ``nn_edge_ok``, ``coordination`` (nullable
        integer), ``psi6``, ``psi4``, ``order_interior``. ``table.attrs`` holds ``unit`` and
        ``pixel_size_nm``. ``summary``: see :func:`summarize`, plus ``rdf_bins``,
        ``rdf_r_max_<u>`` and ``rdf_peak_<u>`` (where g(r) is highest: the lattice spacing of
        an ordered assembly). ``rdf_r`` / ``rdf_g``: g(r), averaged over the slices of a stack.

    Raises
    ------
    ValueError
        Labels not 2-D/3-D integers, negative; image of another shape; bad pixel size.
    """
    import pandas as pd

    pixel_size = check_pixel_size(pixel_size)
    labels = _check_labels(labels)
    image = _check_image(image, labels.shape)
    unit = length_unit(pixel_size)
    s = 1.0 if pixel_size is None else pixel_size
    stack = labels.ndim == 3
    slices = list(labels) if stack else [labels]
    images = list(image) if (stack and image is not None) else [image]
    if stack and image is None:
        images = [None] * len(slices)

    per_slice, point_sets = [], []
    for z, (lab, img) in enumerate(zip(slices, images)):
        cols, points = _slice_columns(lab, img, min_edge_fraction)
        if stack:
            cols["slice"] = np.full(len(cols["label"]), z, np.int64)
        per_slice.append(cols)
        point_sets.append(points)
    merged = {k: np.concatenate([c[k] for c in per_slice]) for k in per_slice[0]}
    psi_complex = {6: merged.pop("_psi6c"), 4: merged.pop("_psi4c")}
    if image is None:
        merged.pop("mean_intensity", None)
    cols = _lengths_to_unit(merged, pixel_size)
    names = []
    for base in _COLUMN_ORDER:
        for candidate in (base, f"{base}_{unit}", f"{base}_{unit}2"):
            if candidate in cols:
                names.append(candidate)
    table = pd.DataFrame({k: cols[k] for k in names})
    table["coordination"] = table["coordination"].round().astype("Int64")
    for flag in ("touches_border", "nn_edge_ok", "order_interior"):
        table[flag] = table[flag].astype(bool)
    table.attrs = {"unit": unit, "pixel_size_nm": pixel_size}

    field_shape = labels.shape[-2:]
    r_max_px = None if rdf_r_max is None else float(rdf_r_max) / s
    edges = _rdf_edges(point_sets, field_shape, r_max_px, rdf_bins)
    total, weight = np.zeros(len(edges) - 1), 0.0
    for points in point_sets:  # average over slices, weighted by their number of pairs
        sums, norm = _rdf_sums(points, field_shape, edges)
        pairs = len(points) * (len(points) - 1)
        total += sums * norm * pairs
        weight += pairs
    shell = np.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
    g = total / shell / weight if weight else np.zeros(len(edges) - 1)
    r = 0.5 * (edges[1:] + edges[:-1]) * s

    summary = summarize(
        table, labels.shape, pixel_size, include_border=include_border, psi_complex=psi_complex
    )
    summary["rdf_bins"] = int(rdf_bins)
    summary[f"rdf_r_max_{unit}"] = float(edges[-1] * s)
    if weight and np.any(g > 0):
        summary[f"rdf_peak_{unit}"] = float(r[int(np.argmax(g))])
    else:
        summary[f"rdf_peak_{unit}"] = None
    return Measurements(
        table=table,
        summary=summary,
        rdf_r=r,
        rdf_g=g,
        unit=unit,
        pixel_size=pixel_size,
        field_shape=tuple(int(v) for v in labels.shape),
    )
