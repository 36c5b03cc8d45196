"""Bad and awkward inputs: non-finite pixels, multi-channel files, files that declare more
pixels than they could ever hold. Each is either handled (NaN pixels are missing, a channel
is chosen) or refused with one line naming the file, before anything is written."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_sagegan.cli import main
from napari_sagegan.engine.synthetic.render import make_sample
from napari_sagegan.io.images import probe_image, read_image, read_pairs

BORDER = 10


@pytest.fixture(scope="module")
def seg():
    """The bundled segmenter (a real, small model: ~1 s per 192 px image on a CPU)."""
    import torch

    from napari_sagegan.engine.infer.segment import Segmenter

    torch.manual_seed(0)
    return Segmenter.load("default", device="cpu")


@pytest.fixture(scope="module")
def sample():
    img, labels = make_sample("tem_dispersed", shape=(192, 192), seed=1)
    return img.astype(np.float32), labels


@pytest.fixture(scope="module")
def clean(seg, sample):
    """The sample segmented as it is (the reference of the NaN tests)."""
    return seg.segment_sync(sample[0])


def _with_border(img, value=np.nan):
    out = img.copy()
    out[:BORDER] = value
    out[-BORDER:] = -np.inf
    out[:, :BORDER] = np.inf
    out[:, -BORDER:] = value
    return out


def _inside(labels, margin):
    """Ids of the instances whose bounding box keeps ``margin`` px from the image border."""
    from skimage.measure import regionprops

    h, w = labels.shape
    return [
        r.label
        for r in regionprops(labels)
        if min(r.bbox[:2]) >= margin and r.bbox[2] <= h - margin and r.bbox[3] <= w - margin
    ]


def _found_again(ref, other, ids):
    """How many instances ``ids`` of ``ref`` are found in ``other`` (IoU > 0.5)."""
    n = 0
    for i in ids:
        mine = ref == i
        hit = np.bincount(other[mine].ravel())
        hit[0] = 0
        if hit.max() == 0:
            continue
        theirs = other == hit.argmax()
        n += (mine & theirs).sum() / (mine | theirs).sum() > 0.5
    return n


# --------------------------------------------------------------------------- NaN pixels


def test_normalisation_ignores_and_fills_missing_pixels(tmp_path):
    from napari_sagegan.engine.data.intensity import (
        apply_range,
        count_nonfinite,
        has_finite,
        intensity_levels,
        nonfinite_mask,
        normalize,
    )

    img = np.linspace(0, 100, 400, dtype=np.float32).reshape(20, 20)
    bad = img.copy()
    bad[3, 4], bad[5, :], bad[7, 7] = np.nan, np.inf, -np.inf
    lo, hi, mid = intensity_levels(bad)
    finite = bad[np.isfinite(bad)]
    assert (lo, mid) == (
        pytest.approx(np.percentile(finite, 0.5)),
        pytest.approx(np.median(finite)),
    )
    out = normalize(bad)
    assert np.isfinite(out).all()
    fill = 2 * (mid - lo) / (hi - lo) - 1
    np.testing.assert_allclose(out[~np.isfinite(bad)], fill, atol=1e-6)
    np.testing.assert_allclose(out[np.isfinite(bad)], apply_range(finite, lo, hi), atol=1e-6)
    assert np.isnan(apply_range(bad, lo, hi)[3, 4])  # without a fill, NaN stays NaN
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=bad.shape)
    mm[:] = bad
    assert count_nonfinite(mm, rows=3) == 22 and has_finite(mm, rows=3)
    np.testing.assert_array_equal(nonfinite_mask(mm, rows=3), ~np.isfinite(bad))
    assert nonfinite_mask(img) is None and count_nonfinite(img.astype(np.uint8)) == 0
    assert not has_finite(np.full((4, 4), np.nan))


def test_one_nan_pixel_changes_nothing_but_itself(seg, sample, clean):
    img, truth = sample
    # the worst place: the middle of a particle
    areas = np.bincount(truth.ravel())
    areas[0] = 0
    y, x = np.argwhere(truth == areas.argmax()).mean(axis=0).round().astype(int)
    assert truth[y, x] == areas.argmax()
    holed = img.copy()
    holed[y, x] = np.nan
    res = seg.segment_sync(holed)
    assert clean.labels.max() > 10
    assert abs(int(res.labels.max()) - int(clean.labels.max())) <= 1
    assert res.labels[y, x] == 0 and res.nonfinite == 1
    assert res.scale.diameter == pytest.approx(clean.scale.diameter, rel=0.05)
    ids = _inside(clean.labels, 0)
    assert _found_again(clean.labels, res.labels, ids) >= len(ids) - 1


def test_nan_border_keeps_the_particles_inside_and_the_size(sample, clean, tmp_path, capsys):
    from napari_sagegan.engine.infer.scale import estimate_diameter

    img, _ = sample
    bordered = _with_border(img)
    n_bad = int((~np.isfinite(bordered)).sum())
    # the classical first guess no longer sees the border as a particle phase (was 116 px)
    assert estimate_diameter(bordered) == pytest.approx(estimate_diameter(img), rel=0.15)
    tifffile.imwrite(tmp_path / "drift.tif", bordered)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "drift.tif"), "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    count = f"{n_bad:,}".replace(",", " ")
    assert f"warning: {count} pixels (20 %) of drift.tif were not finite (NaN/inf)" in err
    assert "treated as missing" in err
    (entry,) = json.loads((out / "segment_report.json").read_text())["images"]
    assert entry["nonfinite_pixels"] == n_bad == 192 * 192 - 172 * 172
    assert entry["diameter_px"] == pytest.approx(clean.scale.diameter, rel=0.15)
    labels = tifffile.imread(out / "drift.tif")
    assert not labels[~np.isfinite(bordered)].any()  # missing pixels are background
    ids = _inside(clean.labels, BORDER + 3)
    assert len(ids) >= 10
    assert _found_again(clean.labels, labels.astype(np.int32), ids) >= len(ids) - 1


def test_all_nan_image_is_refused_naming_it(tmp_path, capsys):
    from napari_sagegan import api
    from napari_sagegan.util.progress import run_to_end

    tifffile.imwrite(tmp_path / "empty_scan.tif", np.full((64, 64), np.nan, np.float32))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "empty_scan.tif"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the progress line, then why
    (line,) = [t for t in lines if "error" in t]
    assert line == lines[-1] and line.startswith("sagegan: error: ")
    assert "empty_scan.tif holds no finite value" in line
    assert not out.exists()
    arr = api.Micrograph("layer 'scan'", np.full((2, 32, 32), np.inf, np.float32))
    with pytest.raises(ValueError, match="layer 'scan' holds no finite value"):
        run_to_end(api.segment(arr, model="default", device="cpu"))


def test_a_missing_slice_of_a_stack_is_empty_not_an_error(tiny_arch):
    import torch

    from napari_sagegan.engine.config import InferConfig
    from napari_sagegan.engine.infer.segment import Segmenter
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    torch.manual_seed(0)
    tiny = Segmenter(AttentionUNet(tiny_arch), device="cpu")
    img, _ = make_sample("tem_dispersed", shape=(64, 64), seed=0)
    stack = np.stack([img, img, img]).astype(np.float32)
    stack[1] = np.nan  # the middle slice (where the size is planned) is missing
    res = tiny.segment_sync(stack, InferConfig(tile_size=64, threshold=0.3), keep_maps=True)
    alone = tiny.segment_sync(img.astype(np.float32), InferConfig(tile_size=64, threshold=0.3))
    assert res.nonfinite == 64 * 64 and not res.labels[1].any() and not res.prob[1].any()
    np.testing.assert_array_equal(res.labels[0] > 0, alone.labels > 0)


# --------------------------------------------------------------------------- channels


@pytest.fixture
def planes():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 60000, (48, 40), dtype=np.uint16) for _ in range(5)]


@pytest.mark.parametrize("n", [3, 5])
def test_tiff_samples_that_are_not_rgb_are_refused_or_chosen(tmp_path, planes, n):
    path = tmp_path / f"eds{n}.tif"
    data = np.stack(planes[:n], axis=-1)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="contig")
    expected = rf"eds{n}\.tif has {n} channels \(axes YXS, shape 48x40x{n}\); choose one with"
    for fn in (read_image, probe_image):
        with pytest.raises(ValueError, match=expected + rf" --channel N \(0-{n - 1}\)"):
            fn(path)
    np.testing.assert_array_equal(read_image(path, channel=n - 1), planes[n - 1])
    with pytest.raises(ValueError, match=f"there is no channel {n}: choose one of 0-{n - 1}"):
        read_image(path, channel=n)
    with pytest.raises(ValueError, match="whole number"):
        read_image(path, channel=-1)


def test_imagej_channels_are_not_a_stack_but_z_and_t_are(tmp_path, planes):
    cyx, zyx = tmp_path / "cyx.tif", tmp_path / "zyx.tif"
    tifffile.imwrite(cyx, np.stack(planes[:3]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(zyx, np.stack(planes[:3]), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(
        tmp_path / "tyx.tif", np.stack(planes[:4]), imagej=True, metadata={"axes": "TYX"}
    )
    with pytest.raises(ValueError, match=r"cyx\.tif has 3 channels \(axes CYX, shape 3x48x40\)"):
        read_image(cyx)
    np.testing.assert_array_equal(read_image(cyx, channel=1), planes[1])
    np.testing.assert_array_equal(read_image(zyx), np.stack(planes[:3]))  # still a stack
    assert read_image(tmp_path / "tyx.tif").shape == (4, 48, 40)
    with pytest.raises(ValueError, match="single channel .* there is no channel 2"):
        read_image(zyx, channel=2)
    assert read_image(zyx, channel=0).shape == (3, 48, 40)
    zcyx = tmp_path / "zcyx.tif"
    hyper = np.stack([np.stack(planes[:3])] * 2)  # Z=2, C=3
    tifffile.imwrite(zcyx, hyper, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_image(zcyx, channel=2), hyper[:, 2])


def test_rgb_stays_grey_or_refused_and_a_channel_can_be_taken(tmp_path, planes):
    grey = (planes[0] // 256).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey_rgb.tif", np.stack([grey] * 3, -1), photometric="rgb")
    iio.imwrite(tmp_path / "shot.png", np.stack([grey] * 3 + [grey // 2], -1))
    np.testing.assert_array_equal(read_image(tmp_path / "grey_rgb.tif"), grey)
    np.testing.assert_array_equal(read_image(tmp_path / "shot.png"), grey)
    colour = np.stack([(p // 256).astype(np.uint8) for p in planes[:3]], -1)
    iio.imwrite(tmp_path / "colour.png", colour)
    with pytest.raises(ValueError, match="colour image .* --channel N"):
        read_image(tmp_path / "colour.png")
    np.testing.assert_array_equal(read_image(tmp_path / "colour.png", channel=2), colour[..., 2])


def test_training_pairs_and_measure_take_the_channel(tmp_path, planes, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    tifffile.imwrite(images / "a.tif", np.stack(planes[:3]), imagej=True, metadata={"axes": "CYX"})
    lab = np.zeros((48, 40), np.uint16)
    lab[10:20, 10:20] = 1
    tifffile.imwrite(masks / "a.tif", lab)
    with pytest.raises(ValueError, match="3 channels"):
        read_pairs(images, masks)
    (pair,) = read_pairs(images, masks, channel=2)
    np.testing.assert_array_equal(pair.image, planes[2])
    out = tmp_path / "p.csv"
    args = ["measure", str(masks / "a.tif"), "--image", str(images / "a.tif"), "--out", str(out)]
    assert main(args) == 2
    assert "choose one with --channel N (0-2)" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--channel", "1"]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert table["mean_intensity"].iloc[0] == pytest.approx(
        planes[1][10:20, 10:20].mean(), rel=1e-4
    )


def test_segment_refuses_channels_before_writing_and_takes_channel(tmp_path, planes, capsys):
    img, _ = make_sample("tem_dispersed", shape=(96, 96), seed=0)
    tifffile.imwrite(tmp_path / "ok.tif", img)
    cyx = np.stack([np.zeros_like(img), img, 255 - img])
    tifffile.imwrite(tmp_path / "cyx.tif", cyx, imagej=True, metadata={"axes": "CYX"})
    out = tmp_path / "out"
    inputs = [str(tmp_path / "ok.tif"), str(tmp_path / "cyx.tif")]
    assert main(["segment", *inputs, "--out", str(out), "--device", "cpu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cyx.tif has 3 channels (axes CYX, shape 3x96x96)" in line
    assert not out.exists()  # refused from the headers, before the first image
    argv = ["segment", str(tmp_path / "cyx.tif"), "--out", str(out), "--channel", "1"]
    assert main([*argv, "--device", "cpu"]) == 0
    labels = tifffile.imread(out / "cyx.tif")
    assert labels.shape == (96, 96) and labels.max() > 0


# --------------------------------------------------------------------------- declared size


def _tiny_tiff(path, width, height):
    """A valid 138-byte baseline TIFF header declaring ``width x height`` uint8 pixels."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
            (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 16)]  # fmt: skip
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        ifd += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, value, *(
            (0,) if kind == 3 else ()))  # fmt: skip
    path.write_bytes(b"II*\x00" + struct.pack("<I", 24) + bytes(16) + ifd + bytes(4))


def test_tiny_tiff_declaring_a_huge_image_is_refused_without_allocating(tmp_path, capsys):
    path = tmp_path / "huge.tif"
    _tiny_tiff(path, 200_000, 200_000)
    assert path.stat().st_size == 138
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"huge\.tif declares 200000 x 200000 pixels of "
                           r"uint8 \(40 GB decoded\), more than the 2\.15 billion"):  # fmt: skip
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000
    out = tmp_path / "out"
    assert main(["segment", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # refused from its header, before decoding: the size it would take, and what to do
    assert "huge.tif would take 40000 MB decoded" in err and "--block-size" in err
    assert "out of memory" not in err
    assert not out.exists()


def test_an_image_larger_than_the_free_memory_is_refused(tmp_path, monkeypatch):
    import napari_sagegan.io.layout as layout

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint16))
    assert read_image(tmp_path / "a.tif").shape == (64, 64)
    monkeypatch.setattr(layout, "available_memory", lambda: 4096)
    with pytest.raises(ValueError, match=r"64 x 64 pixels of uint16 \(8.19 KB decoded\), more "
                       r"than the 4.1 KB of memory available now"):  # fmt: skip
        read_image(tmp_path / "a.tif")


def test_png_decompression_bomb_is_refused_with_a_reason(tmp_path, capsys):
    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(99)))
    path = tmp_path / "bomb.png"
    path.write_bytes(png + chunk(b"IEND", b""))
    expected = (
        r"bomb\.png declares 40000 x 40000 pixels \(1\.6 billion\), more than the 179 million"
    )
    for fn in (read_image, probe_image):
        with pytest.raises(ValueError, match=expected):
            fn(path)
    assert main(["segment", str(path), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "decompression bomb" in line and "unknown error" not in line
