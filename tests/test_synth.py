"""Mask synthesis for new pairs (transforms, instance pasting, fitted lattices) and G -> pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sagegan.engine.nets.generator import GeneratorConfig, StyleUNetGenerator
from napari_sagegan.engine.synthetic.layouts import (
    fit_stats,
    lattice_mask,
    make_masks,
    paste_instances,
    spacing_stats,
    synthesize_pairs,
    to_uint8,
    transform_mask,
)
from napari_sagegan.util.progress import run_to_end


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["hex", "square"])
def test_lattice_matches_requested_size_and_spacing(kind):
    rng = np.random.default_rng(0)
    m = lattice_mask(
        (256, 256),
        rng,
        spacing=18.0,
        diameters=[12.0],
        kind=kind,
        jitter=0.0,
        vacancy=0.0,
        grain_boundaries=False,
    )
    d, s = spacing_stats(m)
    assert d == pytest.approx(12.0, rel=0.1)
    assert s == pytest.approx(18.0, rel=0.05)
    # hexagonal: 6 neighbours at the spacing; square: 4
    from scipy.spatial import cKDTree

    st = fit_stats([m])
    assert st["spacing"] == pytest.approx(18.0, rel=0.05)
    ids = np.unique(m[m > 0])
    cy = np.array([np.mean(np.nonzero(m == i)[0]) for i in ids])
    cx = np.array([np.mean(np.nonzero(m == i)[1]) for i in ids])
    pts = np.stack([cy, cx], 1)
    inner = (cy > 40) & (cy < 216) & (cx > 40) & (cx < 216)
    counts = [len(c) - 1 for c in cKDTree(pts).query_ball_point(pts[inner], 18.0 * 1.15)]
    assert np.median(counts) == (6 if kind == "hex" else 4)


def test_lattice_fitted_to_training_statistics():
    """make_masks("lattice") reproduces the training masks' diameter and NN spacing."""
    rng = np.random.default_rng(1)
    training = [
        lattice_mask((192, 192), rng, spacing=15.0, diameters=[9.0, 10.0, 11.0], kind="hex")
        for _ in range(2)
    ]
    target = fit_stats(training)
    masks = make_masks(training, 4, layout="lattice", shape=(160, 160), seed=3)
    assert all(m.shape == (160, 160) and m.max() > 20 for m in masks)
    got = fit_stats(masks)
    assert got["diameter"] == pytest.approx(target["diameter"], rel=0.1)
    assert got["spacing"] == pytest.approx(target["spacing"], rel=0.1)
    assert got["polydispersity"] > 0.02  # drawn from the empirical size distribution


def test_paste_instances_without_overlap_at_density():
    rng = np.random.default_rng(2)
    source = [lattice_mask((128, 128), rng, spacing=14.0, diameters=[10.0], kind="hex")]
    out = paste_instances(source, (128, 128), rng, density=0.2)
    assert (out > 0).mean() == pytest.approx(0.2, abs=0.04)
    ids = np.unique(out[out > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))
    # no two particles touch (1 px gap): no 4-neighbour pair with different non-zero ids
    for a, b in ((out[1:], out[:-1]), (out[:, 1:], out[:, :-1])):
        assert not np.any((a > 0) & (b > 0) & (a != b))
    with pytest.raises(ValueError, match="no particles"):
        paste_instances([np.zeros((32, 32), np.int32)], (32, 32), rng)


def test_transform_mask_keeps_instances():
    rng = np.random.default_rng(3)
    m = lattice_mask((96, 96), rng, spacing=16.0, diameters=[10.0], kind="square")
    t = transform_mask(m, rng, elastic=1.0)
    assert t.shape == m.shape and t.dtype == np.int32
    assert abs(int(t.max()) - int(m.max())) <= 0.2 * m.max()
    assert (t > 0).mean() == pytest.approx((m > 0).mean(), rel=0.2)


def test_bad_masks_are_refused():
    empty = [np.zeros((32, 32), np.int32)]
    with pytest.raises(ValueError, match="no particles"):
        fit_stats(empty)
    with pytest.raises(ValueError, match="no particles"):
        make_masks(empty, 2, layout="real")
    with pytest.raises(ValueError, match="unknown layout"):
        make_masks(empty, 2, layout="grid")
    with pytest.raises(ValueError, match="needs training masks"):
        make_masks(None, 2, layout="paste")


def test_synthesize_pairs_pads_and_crops():
    torch.manual_seed(0)
    g = StyleUNetGenerator(GeneratorConfig(base_channels=4, depth=2, z_dim=8, w_dim=8))
    rng = np.random.default_rng(4)
    masks = [lattice_mask((30, 42), rng, spacing=12.0, diameters=[8.0]) for _ in range(2)]
    events = []
    pairs = run_to_end(synthesize_pairs(g, masks, seed=1, device="cpu"), events.append)
    assert [e.step for e in events] == [1, 2]
    for (img, lab), m in zip(pairs, masks):
        assert img.shape == m.shape and img.dtype == np.float32
        assert img.min() >= -1 and img.max() <= 1
        np.testing.assert_array_equal(lab, m)
    again = run_to_end(synthesize_pairs(g, masks, seed=1, device="cpu"))
    assert to_uint8(again[0][0]).dtype == np.uint8
