"""Images larger than memory: block-by-block segmentation, stitching, lazy I/O (issue 17)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("zarr")
pytest.importorskip("dask")

import tifffile  # noqa: E402
import zarr  # noqa: E402

from conftest import disc_image  # noqa: E402
from napari_sagegan import api  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair  # noqa: E402
from napari_sagegan.engine.infer import blocks  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

DIAMETER = 16  # the discs below: radius 8
BLOCK = 128


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The tiny disc segmenter the GUI tests share (trained for a few seconds)."""
    from test_tasks import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def seg(model_path):
    return Segmenter.load(model_path, device="cpu")


def scene(shape=(256, 384), seed=3):
    """Discs on a jittered grid, some of them across the borders of 128-px blocks."""
    rng = np.random.default_rng(seed)
    centres = [
        (y + int(rng.integers(-5, 6)), x + int(rng.integers(-5, 6)))
        for y in range(22, shape[0] - 10, 42)
        for x in range(22, shape[1] - 10, 42)
    ]
    # across a vertical border, a horizontal one, and the corner of four blocks
    crossing = [(60, BLOCK), (BLOCK, 300), (BLOCK, 2 * BLOCK)]
    centres = [c for c in centres if min(np.hypot(c[0] - y, c[1] - x) for y, x in crossing) > 24]
    return disc_image(shape, centres + crossing, radius=8, seed=seed), crossing


def whole_image(seg, img):
    return seg.segment_sync(img, seg.default_infer_config(diameter=DIAMETER)).labels


def by_blocks(seg, image, out, **kw):
    kw.setdefault("block_size", BLOCK)
    return run_to_end(api.segment_blocks(image, out=out, model=seg, diameter=DIAMETER, **kw))


def test_match_labels_pairs_one_particle_only():
    a = np.zeros((20, 20), np.int32)
    b = np.zeros((20, 20), np.int32)
    a[2:10, 2:10], b[3:10, 2:10] = 4, 7  # the same particle, seen slightly differently
    a[12:18, 12:18], b[12:18, 15:18] = 5, 9  # overlapping, IoU 0.5 exactly
    a[12:18, 2:8], b[12:18, 6:12] = 6, 3  # touching neighbours, IoU 0.2
    pairs = {tuple(p) for p in blocks.match_labels(a, b)}
    assert pairs == {(4, 7), (5, 9)}


def test_a_particle_across_block_borders_gets_one_label(seg, tmp_path):
    (img, truth), crossing = scene()
    res = by_blocks(seg, img, tmp_path / "labels.zarr", overlap=48)
    lab = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:]
    whole = whole_image(seg, img)
    assert res.n_blocks == 6 and res.merged >= 3  # stitched: at least the three crossing discs
    for cy, cx in crossing:
        disc = truth == truth[cy, cx]
        ids = np.unique(lab[disc])
        ids = ids[ids > 0]
        assert ids.size == 1, f"disc at {(cy, cx)} has labels {ids}"
        mine = lab == ids[0]
        # both sides of the border, and the same pixels as the whole-image segmentation
        if cx % BLOCK == 0:  # both sides of the border
            assert mine[:, :cx].any() and mine[:, cx:].any()
        if cy % BLOCK == 0:
            assert mine[:cy].any() and mine[cy:].any()
        theirs = whole == np.bincount(whole[disc]).argmax()
        iou = (mine & theirs).sum() / (mine | theirs).sum()
        assert iou > 0.9, (cy, cx, iou)


def test_blocks_agree_with_the_whole_image(seg, tmp_path):
    (img, truth), _ = scene()
    res = by_blocks(seg, img, tmp_path / "labels.zarr")
    lab = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:]
    whole = whole_image(seg, img)
    n = int(whole.max())
    assert n == int(truth.max())  # the tiny model finds every disc in the whole image
    assert res.n_particles == n and np.array_equal(np.unique(lab), np.arange(n + 1))
    score = evaluate_pair(lab, whole)
    assert score["f1@0.5"] == 1.0 and score["f1@0.9"] >= 0.95 and score["dice"] > 0.98
    report = res.report()
    for key in api.Segmented("x", None, 0, None, res.pixel_size, res.config).report():
        assert key in report
    assert report["blocks"] == 6 and report["output"] == "labels.zarr"
    assert report["n_particles"] == n and report["diameter_source"] == "given"


def test_zarr_in_zarr_out_and_tiff_in_tiled_tiff_out(seg, tmp_path):
    (img, _), _ = scene((200, 300), seed=4)
    src = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=img.shape, chunks=(64, 64), dtype=img.dtype
    )
    src[:] = img
    tifffile.imwrite(tmp_path / "in.tif", img, tile=(64, 64), compression="zlib")
    a = by_blocks(seg, tmp_path / "in.zarr", tmp_path / "out.zarr")
    b = by_blocks(seg, tmp_path / "in.tif", tmp_path / "out.tif", tile=64, pixel_size=0.5)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.shape == img.shape and out.dtype == np.int32 and out.chunks == (BLOCK, BLOCK)
    assert out.attrs["n_particles"] == a.n_particles > 0
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.shape == img.shape and page.dtype == np.uint32
        per_cm = page.tags["XResolution"].value
        assert per_cm[0] / per_cm[1] == pytest.approx(1e7 / 0.5)
        tiled = page.asarray()
    assert np.array_equal(tiled, out[:]) and b.n_particles == a.n_particles
    assert b.pixel_size.nm == 0.5 and b.format == "tiff"
    # the same labels from a numpy array, and from a dask array
    da = pytest.importorskip("dask.array")
    c = by_blocks(seg, da.from_array(img, chunks=(50, 70)), tmp_path / "from_dask.zarr")
    from_dask = zarr.open_array(str(tmp_path / "from_dask.zarr"), mode="r")[:]
    assert np.array_equal(from_dask, out[:]) and c.n_particles == a.n_particles
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "from_dask.zarr",
        "in.tif",
        "in.zarr",
        "out.tif",
        "out.zarr",
    ]  # fmt: skip  (no scratch, no staging left)


class Recording:
    """A lazy 2-D array that records every read and refuses to be read whole."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, 2
        self.reads: list[tuple[tuple[int, ...], bool]] = []

    def __getitem__(self, key):
        out = self.data[key]
        strided = any(isinstance(k, slice) and (k.step or 1) > 1 for k in key)
        self.reads.append((out.shape, strided))
        return out

    def __array__(self, *args, **kw):
        raise AssertionError("the whole image was read")


def test_memory_is_bounded_by_the_block(seg, tmp_path, monkeypatch):
    (img, _), _ = scene()
    seen = []
    original = Segmenter.segment

    def spy(self, image, *args, **kw):
        seen.append(tuple(image.shape))
        return original(self, image, *args, **kw)

    monkeypatch.setattr(Segmenter, "segment", spy)
    lazy = Recording(img)
    overlap = 40
    res = by_blocks(seg, lazy, tmp_path / "labels.zarr", overlap=overlap)
    side = BLOCK + 2 * overlap
    assert len(seen) == res.n_blocks == 6
    assert all(h <= side and w <= side for h, w in seen)
    # every read is a padded block, but one: the grey-level range's sample (at most 2M
    # pixels, strided on a larger image; this one is smaller, so read whole)
    windows = [s for s, _ in lazy.reads if s[0] <= side and s[1] <= side]
    (sample,) = [s for s, _ in lazy.reads if s[0] > side or s[1] > side]
    assert len(windows) == 6 and len(lazy.reads) == 7 and np.prod(sample) <= 2_000_000
    tifffile.imwrite(tmp_path / "strips.tif", img)  # contiguous: read through a memory map
    from napari_sagegan.io.lazy import open_lazy

    lazy_tiff = open_lazy(tmp_path / "strips.tif")
    assert lazy_tiff.memmappable and isinstance(lazy_tiff.array, np.memmap)


def test_bad_input_is_refused_and_nothing_is_left(seg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"2-D image \(Y, X\).*shape \(2, 3, 64, 64\)"):
        by_blocks(seg, np.zeros((2, 3, 64, 64), np.float32), out / "x.zarr")
    with pytest.raises(ValueError, match=r"block size \(32 px\) is smaller than the overlap"):
        by_blocks(seg, np.zeros((64, 64), np.float32), out / "x.zarr", block_size=32, overlap=48)
    with pytest.raises(ValueError, match="NAME.zarr"):
        by_blocks(seg, np.zeros((64, 64), np.float32), out / "x.png")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="single 2-D grey image"):
        by_blocks(seg, tmp_path / "rgb.tif", out / "x.zarr")
    assert list(out.iterdir()) == []


def test_cli_segments_block_by_block_and_refuses_big_inputs(model_path, tmp_path, capsys):
    from napari_sagegan.cli import main

    model = model_path
    (img, _), _ = scene()
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, img.astype(np.float32), tile=(64, 64))
    common = ["--model", str(model), "--device", "cpu", "--diameter", str(DIAMETER)]
    # an input over the memory limit is refused, naming --block-size; nothing is written
    rc = main(["segment", str(big), "--out", str(tmp_path / "plain"), "--memory-limit", "0.1",
               *common])  # fmt: skip
    assert rc == 2 and "--block-size" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()
    rc = main(["segment", str(big), "--out", str(tmp_path / "out"), "--block-size", "128",
               "--block-format", "tiff", *common])  # fmt: skip
    assert rc == 0
    with open(tmp_path / "out" / "segment_report.json") as f:
        report = json.load(f)
    (entry,) = report["images"]
    assert entry["file"] == "big.tif" and entry["output"] == "big.tif" and entry["blocks"] == 6
    labels = tifffile.imread(tmp_path / "out" / "big.tif")
    assert entry["n_particles"] == int(labels.max()) == np.unique(labels).size - 1 > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "big.tif", "segment_report.json"
    ]  # fmt: skip


def test_the_blocks_run_on_a_distributed_cluster_with_the_same_labels(seg, tmp_path):
    distributed = pytest.importorskip("distributed")
    (img, _), _ = scene((200, 300), seed=5)
    tifffile.imwrite(tmp_path / "in.tif", img, tile=(64, 64))
    here = by_blocks(seg, tmp_path / "in.tif", tmp_path / "here.zarr", scheduler="sync")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with distributed.get_task_stream(client) as stream:  # the active client runs them
            there = by_blocks(seg, tmp_path / "in.tif", tmp_path / "there.zarr")
    ran = Counter(str(t["key"]).split("-")[0].strip("('\"") for t in stream.data)
    a = zarr.open_array(str(tmp_path / "here.zarr"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "there.zarr"), mode="r")[:]
    assert np.array_equal(a, b) and there.n_particles == here.n_particles > 0
    # every block was segmented, compared and written by the cluster's workers
    assert ran["segment_block"] == 6 and ran["write_block"] == 6 and ran["match_pair"] == 7
