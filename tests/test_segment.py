"""The Segmenter: tiled = untiled, stacks, lazy arrays, bad input."""

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.engine.config import ArchConfig, InferConfig
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.util.progress import run_to_end

ARCH = ArchConfig(base_channels=4, depth=2)


@pytest.fixture
def seg():
    torch.manual_seed(0)
    return Segmenter(AttentionUNet(ARCH), device="cpu")


def test_tiled_equals_untiled(seg):
    img, _ = disc_image((96, 160), ((30, 30), (60, 100), (50, 140)), radius=9)
    whole = run_to_end(seg.predict_maps(img, InferConfig(tile_size=160, overlap=0.0)))
    tiled = run_to_end(seg.predict_maps(img, InferConfig(tile_size=64, overlap=0.5)))
    assert whole.shape == tiled.shape == (2, 96, 160)
    # away from the outer border, blended tiles reproduce the untiled network output
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert np.abs(whole[inner] - tiled[inner]).max() < 0.05
    assert np.abs(whole - tiled).mean() < 0.01


def test_view_averaging_makes_the_maps_follow_a_mirrored_image(seg):
    img = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    one = InferConfig(tile_size=64, overlap=0.0)  # one tile: no seams to move

    def maps(im, cfg):
        return run_to_end(seg.predict_maps(np.ascontiguousarray(im), cfg))

    plain = maps(img, one)
    # an untrained network is not mirror-symmetric...
    assert np.abs(maps(img[:, ::-1], one)[:, :, ::-1] - plain).max() > 1e-3
    # ... its maps averaged over the four mirror images are (not over a transpose)...
    four = one.replace(tta=4)
    a = maps(img, four)
    np.testing.assert_allclose(maps(img[::-1, ::-1], four)[:, ::-1, ::-1], a, atol=1e-5)
    assert np.abs(maps(img.T, four).transpose(0, 2, 1) - a).max() > 1e-3
    mirrors = [maps(img[sy, sx], one)[:, sy, sx]
               for sy, sx in ((slice(None), slice(None)), (slice(None), slice(None, None, -1)),
                              (slice(None, None, -1), slice(None)),
                              (slice(None, None, -1), slice(None, None, -1)))]  # fmt: skip
    np.testing.assert_allclose(a, np.mean(mirrors, axis=0), atol=1e-5)
    # ... and over all eight symmetries of the square, transposes included
    eight = one.replace(tta=8)
    b = maps(img, eight)
    np.testing.assert_allclose(maps(img.T, eight).transpose(0, 2, 1), b, atol=1e-5)
    np.testing.assert_allclose(maps(img[:, ::-1], eight)[:, :, ::-1], b, atol=1e-5)
    # a runtime choice, not one a checkpoint imposes; other counts are refused
    stored = Segmenter(seg.model, device="cpu", checkpoint={"infer": {"tta": 8}})
    assert stored.default_infer_config().tta == 1
    with pytest.raises(ValueError, match="one of 1, 2, 4, 8"):
        InferConfig(tta=3)


@pytest.mark.parametrize("shape", [(37, 53), (70, 21), (5, 300)])
def test_odd_sizes_keep_their_shape(seg, shape):
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    res = seg.segment_sync(img, InferConfig(tile_size=32), keep_maps=True, with_attention=True)
    assert res.labels.shape == shape and res.labels.dtype == np.int32
    assert res.prob.shape == shape and res.attention.shape == shape
    assert np.isfinite(res.prob).all()


def test_stack_is_segmented_slice_by_slice(seg):
    a, _ = disc_image((64, 64), ((20, 20),), radius=8)
    b, _ = disc_image((64, 64), ((40, 40),), radius=8, seed=1)
    stack = np.stack([a, b, a])
    events = []
    gen = seg.segment(stack, InferConfig(tile_size=32, overlap=0.25, threshold=0.5))
    res = run_to_end(gen, events.append)
    assert res.labels.shape == (3, 64, 64)
    single = seg.segment_sync(a, InferConfig(tile_size=32, overlap=0.25))
    # each slice equals segmenting that slice alone (up to the label offset)
    np.testing.assert_array_equal(res.labels[0] > 0, single.labels > 0)
    np.testing.assert_array_equal(res.labels[2] > 0, single.labels > 0)
    # ids are unique across slices
    ids0 = set(np.unique(res.labels[0])) - {0}
    ids2 = set(np.unique(res.labels[2])) - {0}
    assert not ids0 & ids2
    assert events[-1].step == events[-1].total
    assert len({e.step for e in events}) == len(events)


def test_memmap_and_dask_inputs(seg, tmp_path):
    da = pytest.importorskip("dask.array")
    img, _ = disc_image((80, 96), ((30, 30), (50, 60)), radius=10)
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="w+", shape=img.shape)
    mm[:] = img
    cfg = InferConfig(tile_size=48)
    ref = seg.segment_sync(img, cfg).labels
    np.testing.assert_array_equal(seg.segment_sync(mm, cfg).labels, ref)
    np.testing.assert_array_equal(seg.segment_sync(da.from_array(img, chunks=32), cfg).labels, ref)


def test_bad_input_is_explained(seg):
    with pytest.raises(ValueError, match="2-D image .* or a 3-D stack"):
        seg.segment_sync(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="2-D image .* or a 3-D stack"):
        seg.segment_sync(np.zeros(32, np.uint8))
    with pytest.raises(ValueError, match="device"):
        Segmenter(AttentionUNet(ARCH), device="tpu")


def test_cancel_stops_between_tiles(seg):
    img = np.zeros((128, 128), np.uint8)
    gen = seg.segment(img, InferConfig(tile_size=32, overlap=0.0, batch_size=1))
    first = next(gen)
    assert first.total == 16 and first.step == 1
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = AttentionUNet(ARCH)
    img, _ = disc_image((96, 96), ((30, 30), (60, 64)), radius=10)
    cfg = InferConfig(tile_size=64)
    cpu = run_to_end(Segmenter(model, device="cpu").predict_maps(img, cfg))
    gpu = run_to_end(Segmenter(model, device="cuda").predict_maps(img, cfg))
    assert np.abs(cpu - gpu).max() < 0.02  # autocast float16 on CUDA
