"""Instances from probability + boundary-aware distance maps, and the watershed baseline."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from napari_sagegan.engine.infer import postprocess as pp
from napari_sagegan.engine.infer.postprocess import (
    instances_from_maps,
    relabel_sequential_dtype,
    watershed_baseline,
)


def draw_discs(shape: tuple[int, int], centres, radius: float) -> np.ndarray:
    """Label image with disc ``k`` (1-based) at ``centres[k - 1]``; later discs overwrite."""
    labels = np.zeros(shape, np.int32)
    for k, centre in enumerate(centres, start=1):
        rr, cc = disk(centre, radius, shape=shape)
        labels[rr, cc] = k
    return labels


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """The target the segmenter learns: distance to the instance's edge / its maximum."""
    dist = np.zeros(labels.shape, np.float32)
    for k, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == k
        edt = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
        dist[box][own] = (edt / edt.max())[own]
    return dist


def best_iou(pred: np.ndarray, truth_mask: np.ndarray) -> float:
    ids, counts = np.unique(pred[truth_mask], return_counts=True)
    counts, ids = counts[ids > 0], ids[ids > 0]
    if len(ids) == 0:
        return 0.0
    own = pred == ids[np.argmax(counts)]
    return float((own & truth_mask).sum() / (own | truth_mask).sum())


def hex_centres(rows: int, cols: int, spacing: float, origin: float = 12.0) -> list:
    """Centres of a hexagonal lattice, ``spacing`` pixels between neighbours."""
    return [
        (origin + r * spacing * np.sqrt(3) / 2, origin + c * spacing + (spacing / 2) * (r % 2))
        for r in range(rows)
        for c in range(cols)
    ]


def n_components(mask: np.ndarray) -> int:
    return ndi.label(mask, structure=np.ones((3, 3)))[1]


@pytest.fixture
def two_discs() -> np.ndarray:
    # radius 8, centres 15 px apart: the discs overlap by a 1-px lens (later one wins)
    return draw_discs((40, 48), [(20, 16), (20, 31)], 8)


def test_two_touching_discs_are_split(two_discs):
    assert n_components(two_discs > 0) == 1  # the binary union is one blob
    prob = (two_discs > 0).astype(np.float32)
    dist = normalised_distance(two_discs)
    out = instances_from_maps(prob, dist)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(np.unique(out), [0, 1, 2])
    for k in (1, 2):
        assert best_iou(out, two_discs == k) > 0.9
    merged = instances_from_maps(prob, dist, split=False)
    np.testing.assert_array_equal(np.unique(merged), [0, 1])
    assert np.array_equal(instances_from_maps(prob), merged)  # no dist: components


def test_hexagonal_close_packed_patch():
    truth = draw_discs((56, 80), hex_centres(4, 5, spacing=11), 6)  # 11 < 2 x 6: touching
    assert truth.max() == 20 and n_components(truth > 0) == 1
    out = instances_from_maps((truth > 0).astype(np.float32), normalised_distance(truth))
    assert out.max() == 20
    ious = [best_iou(out, truth == k) for k in range(1, 21)]
    assert min(ious) > 0.8
    # background interstices between three touching discs are not filled
    interstices = (truth == 0) & ndi.binary_fill_holes(truth > 0)
    assert interstices.any() and not out[interstices].any()


def test_large_component_split_tile_by_tile_matches_whole(monkeypatch):
    truth = draw_discs((96, 128), hex_centres(8, 10, spacing=11, origin=8), 6)
    assert n_components(truth > 0) == 1
    prob, dist = (truth > 0).astype(np.float32), normalised_distance(truth)
    whole = instances_from_maps(prob, dist)
    # tiles of 20 px + 4 px halo (smaller than a particle) and 4-row strips for the seeds,
    # so seeds and particles straddle strips and tiles
    monkeypatch.setattr(pp, "_MAX_BOX_PIXELS", 0)
    monkeypatch.setattr(pp, "_TILE", 20)
    monkeypatch.setattr(pp, "_HALO", 4)
    monkeypatch.setattr(pp, "_BLOCK_PIXELS", 4 * 128)
    tiled = instances_from_maps(prob, dist)
    assert tiled.max() == whole.max() == truth.max() == 80
    np.testing.assert_array_equal(np.unique(tiled), np.arange(81))
    assert min(best_iou(tiled, truth == k) for k in range(1, 81)) > 0.8
    same = [best_iou(tiled, whole == k) for k in range(1, 81)]
    assert np.mean(same) > 0.97


def test_ring_of_particles_keeps_its_hole():
    n, r = 12, 5
    ring_radius = 19.5  # chord between neighbours 2 R sin(pi / n) = 10.1 ~ 2r: they touch
    angles = 2 * np.pi * np.arange(n) / n
    centres = [(32 + ring_radius * np.sin(a), 32 + ring_radius * np.cos(a)) for a in angles]
    truth = draw_discs((64, 64), centres, r + 0.6)
    hole = ndi.binary_fill_holes(truth > 0) & (truth == 0)
    assert n_components(truth > 0) == 1 and hole[32, 32]
    out = instances_from_maps((truth > 0).astype(np.float32), normalised_distance(truth))
    assert out.max() == n
    assert not out[hole].any()  # the enclosed background stays background


def test_own_hole_is_filled_but_not_a_neighbour():
    truth = draw_discs((40, 48), [(20, 16), (20, 31)], 8)
    prob = (truth > 0).astype(np.float32)
    prob[19:22, 15:18] = 0.0  # a 3x3 hole inside disc 1
    out = instances_from_maps(prob, normalised_distance(truth))
    assert out[20, 16] == out[20, 12] != 0
    kept = instances_from_maps(prob, normalised_distance(truth), fill_holes=False)
    assert kept[20, 16] == 0


def test_min_size_removes_small_blob_after_splitting(two_discs):
    labels = two_discs.copy()
    labels[2:5, 40:43] = 3  # 9 px
    prob = (labels > 0).astype(np.float32)
    dist = normalised_distance(labels)
    out = instances_from_maps(prob, dist, min_size=15)
    assert out.max() == 2 and not out[2:5, 40:43].any()
    assert instances_from_maps(prob, dist, min_size=5).max() == 3


def test_object_without_seed_is_kept_and_small_seeds_ignored(two_discs):
    labels = two_discs.copy()
    rr, cc = disk((8, 40), 5, shape=labels.shape)
    labels[rr, cc] = 3
    dist = normalised_distance(labels)
    dist[labels == 3] *= 0.4  # weak particle: dist never exceeds the seed threshold
    dist[20, 9] = dist[20, 10] = 0.99  # a 2-px spurious seed near disc 1's edge
    out = instances_from_maps((labels > 0).astype(np.float32), dist)
    assert out.max() == 3
    assert best_iou(out, labels == 3) == 1.0
    assert best_iou(out, labels == 1) > 0.9  # the spurious seed did not cut disc 1


def test_threshold_and_seed_threshold_are_used(two_discs):
    prob = np.where(two_discs > 0, 0.6, 0.1).astype(np.float32)
    dist = normalised_distance(two_discs)
    assert instances_from_maps(prob, dist, threshold=0.7).max() == 0
    assert instances_from_maps(prob, dist, seed_threshold=0.99).max() == 1


def test_watershed_baseline_splits_two_equal_discs(two_discs):
    prob = (two_discs > 0).astype(np.float32)
    out = watershed_baseline(prob)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(np.unique(out), [0, 1, 2])
    for k in (1, 2):
        assert best_iou(out, two_discs == k) > 0.9
    # markers closer than the discs' centre distance are needed to split them
    assert watershed_baseline(prob, min_distance=20).max() == 1


def test_bad_input_raises():
    with pytest.raises(ValueError, match="2-D image"):
        instances_from_maps(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="2-D image"):
        watershed_baseline(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="dist map shape"):
        instances_from_maps(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="threshold"):
        instances_from_maps(np.zeros((8, 8)), threshold=1.5)


def test_relabel_sequential_dtype_switches_at_65536():
    small = np.arange(65535, dtype=np.int64).reshape(255, 257) * 3  # 65534 labels, max 196602
    out = relabel_sequential_dtype(small)
    assert out.dtype == np.uint16 and out.max() == 65534
    np.testing.assert_array_equal(out.ravel(), np.arange(65535))  # order kept, consecutive
    big = np.arange(1, 70001, dtype=np.int32).reshape(280, 250)
    out = relabel_sequential_dtype(big)
    assert out.dtype == np.uint32 and out.max() == 70000
    sparse = np.array([[0, 5, 5], [2**40, 0, 5]], dtype=np.int64)
    np.testing.assert_array_equal(relabel_sequential_dtype(sparse), [[0, 1, 1], [2, 0, 1]])
