"""Augmentation: ranges, binary masks, alignment of image and targets, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sagegan.engine.data.augment import AUGMENTATIONS, GEOMETRIC, augment_sample


def _sample(shape=(64, 64), seed=0):
    """An off-centre L-shaped particle (no symmetry), its image and a distance map."""
    rng = np.random.default_rng(seed)
    fg = np.zeros(shape, np.uint8)
    fg[8:40, 6:16] = 1
    fg[30:40, 16:34] = 1
    image = np.clip(fg * 1.2 - 0.6 + rng.normal(0, 0.1, shape), -1, 1).astype(np.float32)
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    dist /= dist.max()
    return image, fg, dist


@pytest.mark.parametrize("shape", [(64, 64), (48, 72)])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_shapes_ranges_and_binary_mask_are_preserved(shape, p):
    image, fg, dist = _sample(shape)
    for seed in range(6):
        x, f, d = augment_sample(image, fg, dist, np.random.default_rng(seed), p=p)
        assert x.shape == f.shape == d.shape == shape
        assert x.dtype == np.float32 and d.dtype == np.float32 and f.dtype == fg.dtype
        assert x.min() >= -1 and x.max() <= 1
        assert set(np.unique(f)) <= {0, 1} and f.sum() > 0
        assert d.min() >= 0 and d.max() <= 1
        assert np.all(d[f == 0] == 0)


def test_inputs_are_not_modified_and_p0_is_identity():
    image, fg, dist = _sample()
    copies = image.copy(), fg.copy(), dist.copy()
    x, f, d = augment_sample(image, fg, dist, np.random.default_rng(0), p=1.0)
    for a, b in zip((image, fg, dist), copies):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(x, image)
    x, f, d = augment_sample(image, fg, dist, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(x, image)
    np.testing.assert_array_equal(f, fg)
    np.testing.assert_array_equal(d, dist)


def test_flips_move_image_and_targets_together():
    _, fg, dist = _sample()
    image = fg.astype(np.float32) * 2 - 1  # the image *is* the mask: any misalignment shows
    moved = 0
    for seed in range(12):
        x, f, d = augment_sample(image, fg, dist, np.random.default_rng(seed), p=1.0, ops=["flip"])
        np.testing.assert_array_equal(x, f.astype(np.float32) * 2 - 1)
        np.testing.assert_array_equal(d > 0, f > 0)
        assert f.sum() == fg.sum()
        moved += not np.array_equal(f, fg)
    assert moved >= 6  # most of the 8 symmetries move the L-shape


def test_crop_and_flips_keep_alignment_and_zoom_in():
    _, fg, dist = _sample()
    image = fg.astype(np.float32) * 2 - 1
    for seed in range(8):
        rng = np.random.default_rng(seed)
        x, f, d = augment_sample(image, fg, dist, rng, p=1.0, ops=GEOMETRIC)
        agree = np.mean((x > 0) == (f > 0))
        assert agree > 0.995, seed
        assert np.all(d[f == 0] == 0) and d[f > 0].max() > 0.5
        # an 85 % crop blown up to full size enlarges the particle (when it stays inside)
        assert f.sum() <= fg.sum() / 0.85**2 * 1.05


def test_intensity_ops_leave_targets_alone():
    image, fg, dist = _sample()
    intensity_only = [n for n in AUGMENTATIONS if n not in GEOMETRIC]
    x, f, d = augment_sample(image, fg, dist, np.random.default_rng(1), p=1.0, ops=intensity_only)
    np.testing.assert_array_equal(f, fg)
    np.testing.assert_array_equal(d, dist)
    assert not np.allclose(x, image)


def test_invert_flips_polarity():
    image, fg, dist = _sample()
    x, _, _ = augment_sample(image, fg, dist, np.random.default_rng(0), p=1.0, ops=["invert"])
    np.testing.assert_array_equal(x, -image)


def test_seeded_generator_is_deterministic():
    image, fg, dist = _sample()
    a = augment_sample(image, fg, dist, np.random.default_rng(42))
    b = augment_sample(image, fg, dist, np.random.default_rng(42))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    others = [augment_sample(image, fg, dist, np.random.default_rng(s))[0] for s in range(43, 47)]
    assert any(not np.array_equal(a[0], o) for o in others)


def test_bad_inputs_are_refused():
    image, fg, dist = _sample()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one shape"):
        augment_sample(image, fg[:, :10], dist, rng)
    with pytest.raises(ValueError, match="unknown augmentation 'rotate45'"):
        augment_sample(image, fg, dist, rng, ops=["rotate45"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment_sample(image, fg, dist, rng, p=1.5)
