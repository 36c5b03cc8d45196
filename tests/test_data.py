"""Normalisation, per-instance targets, splits and the patch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sagegan.engine.data.intensity import apply_range, normalize, robust_range
from napari_sagegan.engine.data.pairs import instance_targets, split_indices
from napari_sagegan.engine.data.sampling import PatchSampler

# --------------------------------------------------------------------------- intensities


def test_normalize_few_grey_levels_spreads_over_range():
    rng = np.random.default_rng(0)
    img = (rng.integers(0, 19, (64, 64)) * 13).astype(np.uint8)  # 19 grey levels
    out = normalize(img)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() >= -1 and out.max() <= 1
    assert len(np.unique(out)) >= 15
    assert out.min() == -1 and out.max() == 1


def test_normalize_mostly_one_grey_level_falls_back_to_min_max():
    img = np.full((100, 100), 50, np.uint8)
    img[10:12, 10:12] = 200  # 4 bright pixels and ...
    img[30:32, 30:32] = 100  # ... 4 grey ones: both percentiles are 50
    out = normalize(img)
    assert np.all(out[10:12, 10:12] == 1.0)
    assert np.all(out[img == 50] == -1.0)
    np.testing.assert_allclose(out[30:32, 30:32], -1.0 / 3.0, atol=1e-6)


def test_normalize_16bit():
    rng = np.random.default_rng(1)
    img = rng.integers(1000, 60000, (48, 64)).astype(np.uint16)
    out = normalize(img)
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 0.4  # uniform data fill the range
    np.testing.assert_allclose(out.mean(), 0.0, atol=0.05)


def test_constant_image_gives_minus_one_without_nan():
    for img in (np.full((16, 16), 7, np.uint8), np.zeros((16, 16), np.float32)):
        lo, hi = robust_range(img)
        assert hi > lo
        out = normalize(img)
        assert not np.isnan(out).any()
        assert np.all(out == -1.0)


def test_apply_range_maps_and_clips():
    out = apply_range(np.array([0.0, 10.0, 20.0, 30.0, -5.0]), 10.0, 20.0)
    np.testing.assert_allclose(out, [-1.0, -1.0, 1.0, 1.0, -1.0])
    np.testing.assert_allclose(apply_range(np.array([15.0]), 10.0, 20.0), [0.0])
    with pytest.raises(ValueError):
        apply_range(np.zeros(3), 1.0, 1.0)


def test_robust_range_on_memmap_and_dask_matches_numpy(tmp_path):
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(2)
    img = rng.gamma(2.0, 500.0, (300, 410)).astype(np.uint16)
    mm = np.memmap(tmp_path / "img.raw", dtype=np.uint16, mode="w+", shape=img.shape)
    mm[:] = img
    mm.flush()
    lazy = da.from_array(img, chunks=(64, 64))
    small = 40_000  # forces a strided subsample (every 2nd pixel of 123 000)
    ref = robust_range(img, max_samples=small)
    assert robust_range(mm, max_samples=small) == ref
    assert robust_range(lazy, max_samples=small) == ref
    full = np.percentile(img, [0.5, 99.8])
    spread = full[1] - full[0]
    assert abs(ref[0] - full[0]) < 0.05 * spread and abs(ref[1] - full[1]) < 0.05 * spread


def test_robust_range_ignores_nan():
    img = np.linspace(0, 100, 400, dtype=np.float32).reshape(20, 20)
    img[0, :5] = np.nan
    lo, hi = robust_range(img)
    assert np.isfinite(lo) and np.isfinite(hi) and hi > lo


# --------------------------------------------------------------------------- targets


def test_touching_squares_are_separated_by_a_valley():
    lab = np.zeros((20, 32), np.int32)
    lab[4:14, 4:14] = 1
    lab[4:14, 14:24] = 2
    clean, fg, dist = instance_targets(lab)
    np.testing.assert_array_equal(clean, lab)
    assert fg.dtype == np.float32 and dist.dtype == np.float32
    np.testing.assert_array_equal(fg, (lab > 0).astype(np.float32))
    assert np.all(dist[4:14, 13] == 0) and np.all(dist[4:14, 14] == 0)  # the shared edge
    assert dist[lab == 1].max() == 1.0 and dist[lab == 2].max() == 1.0
    assert np.all(dist[lab == 0] == 0)
    assert 0 <= dist.min() and dist.max() <= 1
    row = dist[9]
    assert row[8] > 0.5 and row[19] > 0.5 and row[13] == 0  # peak, valley, peak
    assert dist[4:14, 4].min() > 0  # the rim against background stays positive


def test_thin_instances_get_a_positive_distance():
    lab = np.zeros((24, 30), np.int32)
    lab[2, 2:22] = 1  # a 1-pixel-thick line, area 20
    lab[8:12, 2:22] = 2
    lab[12, 2:22] = 3  # a 1-pixel line squeezed between blocks 2 and 4: all on contact lines
    lab[13:17, 2:22] = 4
    _, _, dist = instance_targets(lab, min_area=15)
    for k in (1, 2, 3, 4):
        assert dist[lab == k].max() >= 0.5, k
        assert dist[lab == k].min() > 0 or k in (2, 4), k


def test_min_area_removes_small_instances():
    lab = np.zeros((20, 20), np.int32)
    lab[1:4, 1:5] = 5  # 12 px
    lab[10:13, 10:15] = 9  # 15 px
    clean, fg, dist = instance_targets(lab, min_area=15)
    assert np.all(clean[1:4, 1:5] == 0) and np.all(fg[1:4, 1:5] == 0)
    assert np.all(dist[1:4, 1:5] == 0)
    assert np.all(clean[10:13, 10:15] == 9) and dist[10:13, 10:15].max() == 1.0
    clean_all, _, _ = instance_targets(lab, min_area=0)
    np.testing.assert_array_equal(clean_all, lab)


def test_instance_targets_rejects_bad_labels():
    with pytest.raises(ValueError, match="integers"):
        instance_targets(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        instance_targets(np.zeros((2, 4, 4), np.int32))


# --------------------------------------------------------------------------- splits


def test_split_indices_deterministic_and_disjoint():
    train, val = split_indices(20, 0.2, seed=3)
    train2, val2 = split_indices(20, 0.2, seed=3)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(val) == 4 and len(train) == 16
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(20))
    other = [tuple(split_indices(20, 0.2, seed=s)[1]) for s in range(4, 8)]
    assert any(o != tuple(val) for o in other)


def test_split_indices_edge_cases():
    train, val = split_indices(2, 0.1, seed=0)
    assert len(val) == 1 and len(train) == 1
    train, val = split_indices(5, 0.0, seed=0)
    assert len(val) == 0 and list(train) == [0, 1, 2, 3, 4]
    train, val = split_indices(1, 0.5, seed=0)
    assert list(train) == [0] and len(val) == 0
    with pytest.raises(ValueError, match="no image/mask pairs"):
        split_indices(0, 0.2, seed=0)


# --------------------------------------------------------------------------- sampler


def _blobs(shape, n, seed, radius=4):
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        c = (rng.integers(radius, shape[0] - radius), rng.integers(radius, shape[1] - radius))
        rr, cc = disk(c, radius, shape=shape)
        lab[rr, cc] = k
    img = np.where(lab > 0, 40000, 8000) + rng.integers(0, 3000, shape)
    return img.astype(np.uint16), lab


def test_sampler_shapes_dtypes_and_ranges():
    img1, lab1 = _blobs((80, 96), 6, seed=0)
    img2, lab2 = _blobs((70, 64), 3, seed=1)
    s = PatchSampler([img1, img2.astype(np.uint8) // 2], [lab1, lab2], patch_size=48, seed=0)
    assert s.n_images == 2 and s.pixels == 80 * 96 + 70 * 64
    x, fg, dist = s.sample(5)
    assert x.shape == (5, 1, 48, 48) and x.dtype == torch.float32
    assert fg.shape == (5, 48, 48) and fg.dtype == torch.int64
    assert dist.shape == (5, 48, 48) and dist.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert set(torch.unique(fg).tolist()) <= {0, 1}
    assert dist.min() >= 0 and dist.max() <= 1
    assert torch.all(dist[fg == 0] == 0)


def test_sampler_same_seed_same_batches():
    img, lab = _blobs((64, 64), 5, seed=2)
    a = PatchSampler([img], [lab], patch_size=32, seed=7)
    b = PatchSampler([img], [lab], patch_size=32, seed=7)
    c = PatchSampler([img], [lab], patch_size=32, seed=8)
    for _ in range(2):
        xa, fa, da = a.sample(3)
        xb, fb, db = b.sample(3)
        xc, _, _ = c.sample(3)
        assert torch.equal(xa, xb) and torch.equal(fa, fb) and torch.equal(da, db)
        assert not torch.equal(xa, xc)


def test_fg_bias_centres_patches_on_particles():
    lab = np.zeros((256, 256), np.int32)
    lab[200:208, 40:48] = 1  # one small particle: a uniform 32-px patch rarely hits it
    img = np.where(lab > 0, 200, 50).astype(np.uint8)
    biased = PatchSampler([img], [lab], patch_size=32, fg_bias=1.0, augment_p=0.0, seed=0)
    _, fg, _ = biased.sample(8)
    assert all(int(f.sum()) > 0 for f in fg)
    uniform = PatchSampler([img], [lab], patch_size=32, fg_bias=0.0, augment_p=0.0, seed=0)
    _, fg, _ = uniform.sample(8)
    assert sum(int(f.sum()) > 0 for f in fg) < 4
    x, fg, _ = biased.sample(4)  # without augmentation the image matches the mask
    assert torch.equal(x[:, 0] > 0, fg > 0)


def test_patch_centres_are_thinned_on_large_particles(monkeypatch):
    monkeypatch.setattr(PatchSampler, "MAX_CENTRES", 10)
    lab = np.zeros((128, 128), np.int32)
    lab[20:60, 20:60] = 1  # 1600 particle pixels, thinned to at most 10 centres
    lab[100:104, 100:104] = 2
    img = np.where(lab > 0, 200, 50).astype(np.uint8)
    s = PatchSampler([img], [lab], patch_size=16, fg_bias=1.0, augment_p=0.0, seed=0)
    centres = s._fg_index[0]
    assert 0 < centres.size <= 10
    assert np.all(lab.ravel()[centres] > 0)
    _, fg, _ = s.sample(6)
    assert all(int(f.sum()) > 0 for f in fg)


def test_image_smaller_than_patch_is_padded_with_background():
    img = np.full((20, 30), 100, np.uint8)
    img[5:15, 5:15] = 220
    lab = np.zeros((20, 30), np.int32)
    lab[5:15, 5:15] = 1
    s = PatchSampler([img], [lab], patch_size=40, augment_p=0.0, seed=0)
    x, fg, dist = s.sample(2)
    assert x.shape == (2, 1, 40, 40)
    assert int(fg[0].sum()) == 100 and int(fg[1].sum()) == 100  # no fake particle added
    # the padding has the image's median grey (-1 here, the background level)
    assert float((x[0, 0] > 0).sum()) == 100


def test_sampler_rejects_mismatched_shapes():
    img, lab = _blobs((40, 40), 2, seed=0)
    with pytest.raises(ValueError, match=r"image 1 .*\(40, 40\).*\(40, 39\)"):
        PatchSampler([img, img], [lab, lab[:, :39]], patch_size=16)
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        PatchSampler([img, img], [lab], patch_size=16)
