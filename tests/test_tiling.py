"""Tiled inference: blending, odd sizes, lazy inputs, progress and cancellation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_sagegan.engine.infer.tiling import (
    balanced_grid,
    blend_window,
    n_tiles,
    predict_tiled,
    predict_tiled_sync,
    tile_grid,
    tile_sides,
)
from napari_sagegan.util.progress import run_to_end


def _conv_model(kernel: int, seed: int = 0) -> torch.nn.Module:
    """A tiny real network: conv (1 -> 2 channels) + sigmoid, fixed weights."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, kernel, padding=kernel // 2), torch.nn.Sigmoid()
    )
    return model.eval()


def _image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth-ish uint8 test image (blobs + noise) so a 3x3 conv sees structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 100 + 80 * np.sin(yy / 7.0) * np.cos(xx / 5.0)
    return np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)


def _untiled(model: torch.nn.Module, image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The model applied once to the whole image, normalised linearly to [-1, 1]."""
    x = np.clip((image.astype(np.float32) - lo) / (hi - lo) * 2 - 1, -1, 1)
    with torch.inference_mode():
        return model(torch.from_numpy(x)[None, None])[0].numpy()


def _coverage(shape: tuple[int, int], tile: tuple[int, int], overlap: float) -> np.ndarray:
    count = np.zeros(shape, dtype=int)
    for y, x in tile_grid(shape, tile, overlap):
        count[y : y + tile[0], x : x + tile[1]] += 1
    return count


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((100, 130), 32, 0.25), ((64, 64), 64, 0.5), ((17, 300), 32, 0.0), ((257, 33), 32, 0.6)],
)
def test_tile_grid_covers_image_with_requested_overlap(shape, tile, overlap):
    corners = tile_grid(shape, tile, overlap)
    assert corners == sorted(corners)
    cover = _coverage(shape, (tile, tile), overlap)
    assert cover.min() >= 1
    stride = int(tile * (1 - overlap))
    for axis in (0, 1):
        starts = sorted({c[axis] for c in corners})
        assert starts[0] == 0
        if shape[axis] >= tile:
            assert starts[-1] == shape[axis] - tile  # flush with the end, no padding
            assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
        else:
            assert starts == [0]


def test_tile_sides_and_n_tiles():
    assert tile_sides((67, 93), 512, 16) == (80, 96)
    assert tile_sides((4000, 20), 500, 16) == (512, 32)
    assert n_tiles((100, 130), 32, 0.25, 16) == len(tile_grid((100, 130), 32, 0.25))
    assert n_tiles((10, 10), 512, 0.25, 16) == 1


def test_blend_window_is_positive_and_peaks_in_the_centre():
    w = blend_window(32, 48)
    assert w.shape == (32, 48)
    assert w.min() > 0
    assert np.unravel_index(np.argmax(w), w.shape) in {(15, 23), (15, 24), (16, 23), (16, 24)}
    assert w[0, 0] < 1e-3 * w.max()
    np.testing.assert_allclose(w, w[::-1, ::-1])


@pytest.mark.parametrize("shape", [(100, 130), (67, 93), (17, 300), (300, 17), (20, 20)])
def test_pointwise_model_tiled_equals_untiled(shape):
    # A 1x1 conv sees one pixel: tiling, padding and blending must not change anything.
    model = _conv_model(1)
    image = _image(shape)
    out = predict_tiled_sync(
        model, image, tile_size=32, overlap=0.3, batch_size=3, value_range=(0, 255)
    )
    assert out.shape == (2, *shape)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _untiled(model, image, 0, 255), atol=1e-6, rtol=0)


def test_3x3_model_blends_seams_and_is_exact_away_from_them():
    model = _conv_model(3)
    shape, tile, overlap = (96, 128), 32, 0.25
    image = _image(shape, seed=1)
    out = predict_tiled_sync(
        model, image, tile_size=tile, overlap=overlap, batch_size=4, value_range=(0, 255)
    )
    ref = _untiled(model, image, 0, 255)
    err = np.abs(out - ref).max(axis=0)
    # Pixels seen by one tile only are never on an inner tile edge: exact.
    (th, tw), corners = balanced_grid(shape, tile, overlap, 16)  # the grid used
    count = np.zeros(shape, dtype=int)
    for y, x in corners:
        count[y : y + th, x : x + tw] += 1
    single = count == 1
    assert single.sum() > 0.3 * single.size
    assert err[single].max() < 1e-5
    # On seams the zero-padded tile edges are wrong; the Gaussian window gives them a
    # tiny weight next to the neighbour's interior, so the blended value stays close. An
    # unweighted average or last-tile-wins would be off by ~1e-1 there.
    first_tile = _untiled(model, image[:tile, :tile], 0, 255)
    tile_edge_err = np.abs(first_tile[:, :, -1] - ref[:, :tile, tile - 1]).max()
    assert tile_edge_err > 2e-2  # the test image does make tile edges wrong
    assert err.max() < 5e-3


def test_exact_single_tile_and_small_image_padding():
    model = _conv_model(3)
    image = _image((64, 64), seed=2)
    out = predict_tiled_sync(model, image, tile_size=64, value_range=(0, 255))
    np.testing.assert_allclose(out, _untiled(model, image, 0, 255), atol=1e-6, rtol=0)
    # 20x20 is reflect-padded to one 32x32 tile and cropped back.
    small = image[:20, :20]
    out = predict_tiled_sync(model, small, tile_size=512, value_range=(0, 255))
    padded = np.pad(small, ((0, 12), (0, 12)), mode="reflect")
    np.testing.assert_allclose(out, _untiled(model, padded, 0, 255)[:, :20, :20], atol=1e-6, rtol=0)
    # A single row cannot be reflected: edge padding, still finite and the right shape.
    out = predict_tiled_sync(model, image[:1], tile_size=32, value_range=(0, 255))
    assert out.shape == (2, 1, 64)
    assert np.isfinite(out).all()


def test_memmap_and_dask_inputs_match_numpy(tmp_path):
    da = pytest.importorskip("dask.array")
    model = _conv_model(3)
    image = _image((90, 75), seed=3)
    kwargs = dict(tile_size=32, overlap=0.25, batch_size=2, value_range=(0, 255))
    expected = predict_tiled_sync(model, image, **kwargs)
    mm = np.memmap(tmp_path / "img.raw", dtype=np.uint8, mode="w+", shape=image.shape)
    mm[:] = image
    mm.flush()
    mm = np.memmap(tmp_path / "img.raw", dtype=np.uint8, mode="r", shape=image.shape)
    np.testing.assert_array_equal(predict_tiled_sync(model, mm, **kwargs), expected)
    lazy = da.from_array(image, chunks=(20, 50))
    np.testing.assert_array_equal(predict_tiled_sync(model, lazy, **kwargs), expected)


def test_progress_events_one_per_batch():
    model = _conv_model(1)
    shape = (100, 130)
    total = n_tiles(shape, 32, 0.25, 16)
    events = []
    out = run_to_end(
        predict_tiled(model, _image(shape), tile_size=32, batch_size=4, value_range=(0, 255)),
        events.append,
    )
    assert out.shape == (2, *shape)
    assert len(events) == math.ceil(total / 4)
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert all(e.stage == "tiles" and e.total == total for e in events)
    assert events[-1].step == total
    assert events[-1].eta_s == 0.0
    assert events[-1].message == f"tile {total}/{total}"


def test_cancel_after_first_event_is_clean():
    calls = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return torch.sigmoid(batch)

    gen = predict_tiled(fn, _image((128, 128)), tile_size=32, batch_size=2, value_range=(0, 255))
    first = next(gen)
    assert first.step == 2
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    assert calls == [2]
    # The generator must not leave inference mode switched on in the caller's thread.
    assert torch.is_grad_enabled()
    assert not torch.is_inference_mode_enabled()


def test_predict_fn_receives_normalised_channels_last_batches():
    seen = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append(
            (
                tuple(batch.shape),
                batch.dtype,
                batch.is_contiguous(memory_format=torch.channels_last),
                torch.is_inference_mode_enabled(),
                float(batch.min()),
                float(batch.max()),
            )
        )
        return torch.zeros(batch.shape[0], 3, *batch.shape[2:])

    image = _image((50, 70)).astype(np.float64) * 3.0
    out = predict_tiled_sync(fn, image, tile_size=40, divisor=16, batch_size=8, value_range=(0, 1))
    assert out.shape == (3, 50, 70)
    for shape, dtype, channels_last, inference, lo, hi in seen:
        assert shape[1:] == (1, *balanced_grid((50, 70), 40, 0.25, 16)[0])  # (32, 48)
        assert dtype == torch.float32
        assert channels_last and inference
        assert -1.0 <= lo <= hi <= 1.0


def test_uint16_and_uint8_versions_give_the_same_output():
    model = _conv_model(3)
    img8 = _image((80, 80), seed=4)
    img16 = img8.astype(np.uint16) * 257
    kwargs = dict(tile_size=32, overlap=0.25)
    a = predict_tiled_sync(model, img8, value_range=(10, 240), **kwargs)
    b = predict_tiled_sync(model, img16, value_range=(10 * 257, 240 * 257), **kwargs)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_robust_range_default_is_scale_invariant():
    pytest.importorskip("napari_sagegan.engine.data.pairs")
    model = _conv_model(3)
    img8 = _image((80, 80), seed=5)
    img16 = img8.astype(np.uint16) * 257
    a = predict_tiled_sync(model, img8, tile_size=32)
    b = predict_tiled_sync(model, img16, tile_size=32)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_float16_output():
    model = _conv_model(1)
    image = _image((40, 40))
    a = predict_tiled_sync(model, image, tile_size=32, value_range=(0, 255))
    b = predict_tiled_sync(model, image, tile_size=32, value_range=(0, 255), out_dtype=np.float16)
    assert b.dtype == np.float16
    np.testing.assert_allclose(b, a, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.zeros((4, 32, 32)), {}, "2-D"),
        (np.zeros((32, 32)), {"overlap": 1.0}, "overlap"),
        (np.zeros((32, 32)), {"batch_size": 0}, "batch_size"),
        (np.zeros((32, 32)), {"out_dtype": np.uint8}, "floating"),
        (np.zeros((32, 32)), {"value_range": (0.0,)}, "value_range"),
        (np.zeros((32, 32)), {"value_range": (5.0, 5.0)}, "low < high"),
    ],
)
def test_bad_input_raises_value_error(image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_tiled_sync(_conv_model(1), image, **{"value_range": (0, 1), **kwargs})


def test_wrong_prediction_shape_raises_value_error():
    def halves(batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(batch, 2)

    with pytest.raises(ValueError, match="divisor"):
        predict_tiled_sync(halves, np.zeros((32, 32)), tile_size=32, value_range=(0, 1))


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "divisor"),
    [
        ((1536, 1536), 1024, 0.125, 16),
        ((1536, 1536), 1280, 0.1, 16),
        ((100, 130), 32, 0.25, 16),
        ((5000, 200), 128, 0.25, 1),
        ((1025, 1030), 1024, 0.125, 16),
        ((64, 64), 64, 0.5, 16),
        ((8192, 3000), 1280, 0.1, 16),
    ],
)
def test_balanced_grid_covers_with_the_overlap_and_fewer_pixels(shape, tile, overlap, divisor):
    (th, tw), corners = balanced_grid(shape, tile, overlap, divisor)
    ohh, oww = tile_sides(shape, tile, divisor)
    old = tile_grid(shape, (ohh, oww), overlap)
    full = -(-tile // divisor) * divisor
    assert th % divisor == 0 and tw % divisor == 0
    assert th * tw <= full * full  # no tile takes more memory than a square full tile
    assert max(th, tw) <= 2 * full
    # never more computing than the plain grid
    assert len(corners) * th * tw <= len(old) * ohh * oww
    count = np.zeros(shape, dtype=int)
    for y, x in corners:
        count[y : y + th, x : x + tw] += 1
    assert count.min() >= 1  # everything covered
    margin = int(np.ceil(overlap * tile))
    for axis, side in ((0, th), (1, tw)):
        starts = sorted({c[axis] for c in corners})
        for a, b in zip(starts, starts[1:]):
            assert a + side - b >= margin  # neighbours share at least the overlap
    assert corners == sorted(corners)  # row-major, as the strip accumulator needs
    plain = tile_grid(shape, full, overlap)
    for axis, length, side in ((0, shape[0], th), (1, shape[1], tw)):
        starts = {c[axis] for c in corners}
        if side == full and starts == {c[axis] for c in plain}:
            continue  # the plain tiles of tile_grid
        # other tiles start on the network's grid, or flush with the end
        assert all(start % divisor == 0 or start == length - side for start in starts)
    if shape == (1536, 1536) and tile == 1024:
        assert (th, tw) == (832, 832)  # 2 x 2 tiles of 832 px instead of 1024
        assert corners[-1] == (704, 704)
    if shape == (1536, 1536) and tile == 1280:
        # a 1536 x 832 rectangle holds fewer pixels than 1280 ** 2: two tiles, not four
        assert (th, tw) == (1536, 832) and corners == [(0, 0), (0, 704)]
