"""Particle measurements and order analysis on shapes and lattices of known geometry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk, ellipse

from napari_sagegan.engine.analysis.measure import (
    _hull_measures,
    measure,
    order_metrics,
    radial_distribution,
)


def discs(shape, centres, radius):
    """Label image with one disc per centre (labels 1..N, in order)."""
    labels = np.zeros(shape, np.int32)
    for i, c in enumerate(centres, 1):
        rr, cc = disk(c, radius, shape=shape)
        labels[rr, cc] = i
    return labels


def hex_points(a, field, margin=0.0):
    """Points of a hexagonal lattice of spacing ``a`` filling a square field."""
    pts = []
    h = a * np.sqrt(3) / 2
    for row in range(int(field / h) + 2):
        for col in range(int(field / a) + 2):
            y, x = margin + row * h, margin + col * a + (row % 2) * a / 2
            if y < field - margin and x < field - margin:
                pts.append((y, x))
    return np.array(pts)


# --------------------------------------------------------------------------- size and shape


@pytest.mark.parametrize("radius", [4, 7, 12])
def test_discs_give_their_diameter_within_a_pixel(radius):
    labels = discs((96, 96), [(30, 30), (60, 64)], radius)
    t = measure(labels).table
    assert len(t) == 2
    assert np.all(np.abs(t["equivalent_diameter_px"] - 2 * radius) < 1.0)
    # Feret of the pixel squares: at most one pixel (plus the diagonal corner) off.
    assert np.all(np.abs(t["feret_max_px"] - 2 * radius) < 1.5)
    assert np.all(np.abs(t["feret_min_px"] - 2 * radius) <= 1.0)
    assert np.allclose(t["aspect_ratio"], t["feret_max_px"] / t["feret_min_px"])
    assert np.all(t["aspect_ratio"] < 1 + 1 / radius)  # digitisation elongates small discs
    assert np.all(t["circularity"] > 0.9)
    assert np.all(t["solidity"] == 1.0)  # a drawn disc is digitally convex
    assert np.allclose(t["centroid_y_px"], [30, 60]) and np.allclose(t["centroid_x_px"], [30, 64])


def test_pixel_size_turns_lengths_into_nm():
    labels = discs((96, 96), [(30, 30), (60, 64)], 7)
    px = measure(labels).table
    nm = measure(labels, pixel_size=2.5).table
    assert "equivalent_diameter_nm" in nm and "equivalent_diameter_px" not in nm
    assert nm.attrs["unit"] == "nm" and px.attrs["unit"] == "px"
    for col in ("equivalent_diameter", "feret_max", "feret_min", "perimeter", "centroid_x"):
        assert np.allclose(nm[f"{col}_nm"], 2.5 * px[f"{col}_px"])
    assert np.allclose(nm["area_nm2"], 6.25 * px["area_px2"])
    assert np.allclose(nm["circularity"], px["circularity"])  # dimensionless: unchanged
    m = measure(labels, pixel_size=2.5)
    assert m.column("area") == "area_nm2" and m.column("feret_max") == "feret_max_nm"
    with pytest.raises(KeyError):
        m.column("volume")


def test_ellipse_aspect_ratio_and_feret():
    labels = np.zeros((80, 80), np.int32)
    rr, cc = ellipse(40, 40, 8, 24)  # semi-axes 8 (rows) and 24 (columns)
    labels[rr, cc] = 1
    t = measure(labels).table
    assert abs(t["feret_max_px"][0] - 48) <= 1.5
    assert abs(t["feret_min_px"][0] - 16) <= 1.5
    assert abs(t["aspect_ratio"][0] - 3.0) < 0.3


def test_concave_particle_has_low_solidity():
    labels = np.zeros((40, 40), np.int32)
    labels[5:30, 5:10] = 1  # an L: the convex hull adds a large triangle
    labels[25:30, 5:30] = 1
    t = measure(labels).table
    assert t["solidity"][0] < 0.7
    assert t["circularity"][0] < 0.6


def test_feret_by_rotating_calipers_matches_brute_force():
    rng = np.random.default_rng(3)
    from scipy.spatial import ConvexHull

    for _ in range(25):
        mask = np.zeros((40, 40), bool)
        for _ in range(rng.integers(1, 4)):
            rr, cc = ellipse(
                *rng.uniform(10, 30, 2),
                *rng.uniform(0.6, 9, 2),
                shape=mask.shape,
                rotation=rng.uniform(0, np.pi),
            )
            mask[rr, cc] = True
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        rows, cols = np.nonzero(crop)
        corners = np.concatenate(
            [np.column_stack([rows + dy, cols + dx]) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)]
        )
        hull = ConvexHull(corners)  # rotating calipers on the pixel-corner hull directly
        verts = corners[hull.vertices]
        depth = -(verts @ hull.equations[:, :2].T + hull.equations[:, 2])
        brute_min = depth.max(axis=0).min()
        brute_max = np.sqrt(((verts[:, None] - verts[None]) ** 2).sum(-1)).max()
        feret_max, feret_min, _ = _hull_measures(crop)
        assert feret_max == pytest.approx(brute_max, abs=1e-9)
        assert feret_min == pytest.approx(brute_min, abs=1e-9)


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (np.ones((1, 1), bool), (np.sqrt(2), 1.0)),
        (np.ones((1, 5), bool), (np.hypot(5, 1), 1.0)),
        (np.ones((6, 1), bool), (np.hypot(6, 1), 1.0)),
    ],
)
def test_feret_of_degenerate_particles(mask, expected):
    feret_max, feret_min, convex_area = _hull_measures(mask)
    assert (feret_max, feret_min) == pytest.approx(expected)
    assert convex_area == mask.sum()


def test_mean_intensity_per_particle():
    labels = discs((64, 64), [(16, 16), (44, 44)], 6)
    image = np.where(labels == 1, 100.0, np.where(labels == 2, 30.0, 200.0))
    t = measure(labels, image).table
    assert np.allclose(t["mean_intensity"], [100.0, 30.0])
    assert "mean_intensity" not in measure(labels).table


# --------------------------------------------------------------------------- summary


def test_border_particles_flagged_and_left_out_of_size_statistics():
    labels = discs((64, 64), [(32, 32), (3, 40)], 6)  # the second is cut by the top edge
    m = measure(labels)
    assert list(m.table["touches_border"]) == [False, True]
    full_d = m.table["equivalent_diameter_px"][0]
    assert m.summary["n_measured"] == 1 and m.summary["n_touching_border"] == 1
    assert m.summary["equivalent_diameter_px_mean"] == pytest.approx(full_d)
    with_border = measure(labels, include_border=True).summary
    assert with_border["n_measured"] == 2
    assert with_border["equivalent_diameter_px_mean"] < full_d


def test_summary_statistics_against_numpy():
    rng = np.random.default_rng(0)
    labels = np.zeros((128, 128), np.int32)
    k = 0
    for y in range(14, 128 - 14, 25):
        for x in range(14, 128 - 14, 25):
            k += 1
            rr, cc = disk((y, x), rng.uniform(3, 10), shape=labels.shape)
            labels[rr, cc] = k
    s = measure(labels, pixel_size=0.5).summary
    area = np.bincount(labels.ravel())[1:] * 0.25
    d = np.sqrt(4 * area / np.pi)
    assert s["unit"] == "nm" and s["n_particles"] == k == s["n_measured"]
    assert s["equivalent_diameter_nm_mean"] == pytest.approx(d.mean())
    assert s["equivalent_diameter_nm_std"] == pytest.approx(d.std(ddof=1))
    for q in (10, 50, 90):
        assert s[f"equivalent_diameter_nm_d{q}"] == pytest.approx(np.percentile(d, q))
    field_nm2 = 128 * 128 * 0.25
    assert s["number_density_per_nm2"] == pytest.approx(k / field_nm2)
    assert s["number_density_per_um2"] == pytest.approx(k / field_nm2 * 1e6)
    assert s["area_fraction"] == pytest.approx(area.sum() / field_nm2)


def test_pixel_units_are_labelled():
    s = measure(discs((64, 64), [(30, 30)], 5)).summary
    assert s["unit"] == "px" and s["pixel_size_nm"] is None
    assert "equivalent_diameter_px_mean" in s and "number_density_per_px2" in s
    assert not any("_nm" in key or "um2" in key for key in s if key != "pixel_size_nm")


def test_empty_labels_give_an_empty_table():
    m = measure(np.zeros((32, 32), np.int32), np.ones((32, 32)), pixel_size=1.0)
    assert len(m.table) == 0 and "equivalent_diameter_nm" in m.table
    assert m.summary["n_particles"] == 0
    assert m.summary["equivalent_diameter_nm_mean"] is None
    assert m.summary["psi6_global"] is None
    assert np.all(m.rdf_g == 0)


def test_binary_mask_is_split_into_components():
    mask = discs((64, 64), [(16, 16), (44, 44)], 6) > 0
    assert len(measure(mask).table) == 2


def test_stack_is_measured_per_slice():
    a = discs((64, 64), [(20, 20), (44, 44)], 6)
    b = discs((64, 64), [(32, 32)], 9)
    t = measure(np.stack([a, b, a])).table
    assert list(t["slice"]) == [0, 0, 1, 2, 2]
    first, last = (t[t.slice == z].drop(columns="slice").reset_index(drop=True) for z in (0, 2))
    pd.testing.assert_frame_equal(first, last)
    assert abs(t[t.slice == 1]["equivalent_diameter_px"].iloc[0] - 18) < 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": np.zeros((8, 8), float)}, "integers"),
        ({"labels": -np.ones((8, 8), np.int32)}, "negative"),
        ({"labels": np.zeros(8, np.int32)}, "2-D"),
        ({"labels": np.zeros((8, 8), np.int32), "image": np.zeros((8, 9))}, "shape"),
        ({"labels": np.zeros((8, 8), np.int32), "pixel_size": 0}, "positive"),
        ({"labels": np.zeros((8, 8), np.int32), "pixel_size": float("nan")}, "positive"),
        ({"labels": np.zeros((8, 8), np.int32), "pixel_size": "abc"}, "number"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure(**kwargs)


# --------------------------------------------------------------------------- order


def test_perfect_hexagonal_lattice():
    a = 10.0
    pts = hex_points(a, 200.0)
    o = order_metrics(pts, (200, 200))
    inner = o["order_interior"]
    assert inner.sum() > 0.6 * len(pts)
    assert np.allclose(o["psi6"][inner], 1.0)
    assert np.all(o["coordination"][inner] == 6)
    assert np.allclose(o["nn_distance"], a)
    assert np.all(o["psi4"][inner] < 0.05)
    # border cells are not scored
    assert np.all(np.isnan(o["psi6"][~inner]))


def test_hexagonal_assembly_of_drawn_particles():
    a, field = 14.0, 160
    pts = hex_points(a, field, margin=6.0)
    labels = discs((field, field), [tuple(p) for p in pts], 4.5)
    m = measure(labels, pixel_size=2.0)
    s = m.summary
    assert s["psi6_global"] > 0.95 and s["psi6_local_mean"] > 0.95
    assert s["fraction_coordination_6"] == 1.0
    assert s["psi4_local_mean"] < 0.2
    assert s["nn_distance_nm_median"] == pytest.approx(2.0 * a, abs=2.0 * 0.5)
    assert s["rdf_peak_nm"] == pytest.approx(2.0 * a, abs=2.0 * 1.5)


def test_square_lattice_has_psi4_not_psi6():
    pts = np.array([(y, x) for y in np.arange(5, 200, 10.0) for x in np.arange(5, 200, 10.0)])
    o = order_metrics(pts, (200, 200))
    inner = o["order_interior"]
    assert inner.sum() > 200
    assert np.allclose(o["psi4"][inner], 1.0)
    assert np.all(o["psi6"][inner] < 0.1)
    assert np.all(o["coordination"][inner] == 4)


def test_square_lattice_with_jitter_still_reads_square():
    rng = np.random.default_rng(1)
    pts = np.array([(y, x) for y in np.arange(5, 200, 10.0) for x in np.arange(5, 200, 10.0)])
    o = order_metrics(pts + rng.normal(0, 0.3, pts.shape), (200, 200))
    inner = o["order_interior"]
    assert np.mean(o["psi4"][inner]) > 0.9 and np.mean(o["psi6"][inner]) < 0.3


def test_random_dispersion_has_low_order_and_flat_rdf():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 400, (800, 2))
    o = order_metrics(pts, (400, 400))
    inner = o["order_interior"]
    assert np.mean(o["psi6"][inner]) < 0.6
    assert abs(np.mean(o["psi6_complex"][inner])) < 0.1
    r, g = radial_distribution(pts, (400, 400), r_max=100, bins=20)
    assert r[0] == pytest.approx(2.5) and r[-1] == pytest.approx(97.5)
    # Edge-corrected: a Poisson pattern gives g = 1 at every distance, out to the window's edge
    assert np.mean(g) == pytest.approx(1.0, abs=0.05)
    assert np.all(np.abs(g[2:] - 1) < 0.15)


def test_order_with_few_or_collinear_points_is_undefined_not_an_error():
    o = order_metrics(np.array([[10.0, 10.0]]), (50, 50))
    assert np.isnan(o["nn_distance"][0]) and not o["order_interior"][0]
    line = np.column_stack([np.full(6, 20.0), np.arange(6) * 5.0 + 10])
    o = order_metrics(line, (50, 50))
    assert np.allclose(o["nn_distance"], 5.0)
    assert np.all(np.isnan(o["psi6"]))


def test_nn_statistics_skip_particles_nearer_the_border_than_their_neighbour():
    labels = discs((100, 100), [(50, 20), (50, 30), (8, 80)], 3)  # the third is isolated
    m = measure(labels)
    ok = m.table["nn_edge_ok"].to_numpy()
    assert list(ok) == [True, True, False]
    assert m.summary["nn_distance_px_mean"] == pytest.approx(10.0)
