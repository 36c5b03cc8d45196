"""Reading micrographs and masks, pairing them by name, writing label TIFFs."""

from __future__ import annotations

import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_sagegan.io.export import write_labels_tiff
from napari_sagegan.io.images import (
    IMAGE_SUFFIXES,
    find_pairs,
    list_images,
    read_image,
    read_labels,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- read_image


def test_png_8bit_and_16bit_keep_values_and_dtype(tmp_path, rng):
    a8 = rng.integers(0, 256, (32, 48), dtype=np.uint8)
    a16 = rng.integers(0, 65536, (32, 48), dtype=np.uint16)
    iio.imwrite(tmp_path / "a8.png", a8)
    iio.imwrite(tmp_path / "a16.png", a16)
    out8, out16 = read_image(tmp_path / "a8.png"), read_image(tmp_path / "a16.png")
    assert out8.dtype == np.uint8 and out8.shape == (32, 48)
    np.testing.assert_array_equal(out8, a8)
    assert out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, a16)


def test_tiff_16bit_and_float(tmp_path, rng):
    a16 = rng.integers(0, 65536, (40, 36), dtype=np.uint16)
    af = rng.normal(size=(40, 36)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a16.tif", a16)
    tifffile.imwrite(tmp_path / "af.tiff", af)
    out16, outf = read_image(tmp_path / "a16.tif"), read_image(tmp_path / "af.tiff")
    assert out16.dtype == np.uint16 and outf.dtype == np.float32
    np.testing.assert_array_equal(out16, a16)
    np.testing.assert_array_equal(outf, af)


def test_rgb_and_rgba_with_equal_channels_give_one_channel(tmp_path, rng):
    grey = rng.integers(0, 256, (24, 30), dtype=np.uint8)
    alpha = rng.integers(0, 256, (24, 30), dtype=np.uint8)  # differs: must be dropped
    iio.imwrite(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1))
    iio.imwrite(tmp_path / "rgba.png", np.stack([grey] * 3 + [alpha], axis=-1))
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([grey] * 3, axis=-1), photometric="rgb")
    for name in ("rgb.png", "rgba.png", "rgb.tif"):
        out = read_image(tmp_path / name)
        assert out.shape == (24, 30), name
        np.testing.assert_array_equal(out, grey)


@pytest.mark.parametrize("name", ["colour.png", "colour.tif"])
def test_colour_image_is_refused(tmp_path, rng, name):
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if name.endswith(".png"):
        iio.imwrite(tmp_path / name, rgb)
    else:
        tifffile.imwrite(tmp_path / name, rgb, photometric="rgb")
    with pytest.raises(ValueError, match="colour image"):
        read_image(tmp_path / name)


def test_tiff_stack_of_three_slices_is_not_mistaken_for_rgb(tmp_path, rng):
    stack = rng.integers(0, 1000, (3, 20, 22), dtype=np.uint16)  # slices differ
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "ij.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    for name in ("stack.tif", "ij.tif"):
        out = read_image(tmp_path / name)
        assert out.shape == (3, 20, 22), name
        np.testing.assert_array_equal(out, stack)


def test_singleton_axes_are_dropped(tmp_path, rng):
    a = rng.integers(0, 255, (1, 1, 20, 22), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack")
    assert read_image(tmp_path / "a.tif").shape == (20, 22)


def test_4d_tiff_is_refused_with_its_shape(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((2, 3, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\)"):
        read_image(tmp_path / "a.tif")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_truncated_file_raises_value_error(tmp_path, rng, suffix):
    a = rng.integers(0, 65536, (128, 128), dtype=np.uint16)
    full = tmp_path / f"full{suffix}"
    if suffix == ".png":
        iio.imwrite(full, a)
    else:
        tifffile.imwrite(full, a)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read .*cut"):
        read_image(cut)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all\n" * 5)
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ValueError, match="folder"):
        read_image(tmp_path)


# --------------------------------------------------------------------------- read_labels


def test_binary_mask_becomes_connected_components(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6] = 255
    mask[10:15, 10:18] = 255
    mask[6:8, 6:8] = 255  # touches the first square only at a corner: separate
    iio.imwrite(tmp_path / "m.png", mask)
    lab = read_labels(tmp_path / "m.png")
    assert lab.dtype == np.int32 and lab.shape == (20, 20)
    assert len(np.unique(lab[lab > 0])) == 3
    for region in (np.s_[2:6, 2:6], np.s_[10:15, 10:18], np.s_[6:8, 6:8]):
        assert len(np.unique(lab[region])) == 1 and lab[region].min() > 0
    assert np.all((lab > 0) == (mask > 0))


def test_boolean_and_zero_one_masks(tmp_path):
    mask = np.zeros((12, 12), bool)
    mask[1:4, 1:4] = True
    mask[7:10, 7:10] = True
    tifffile.imwrite(tmp_path / "b.tif", mask)
    iio.imwrite(tmp_path / "01.png", mask.astype(np.uint8))
    for name in ("b.tif", "01.png"):
        lab = read_labels(tmp_path / name)
        assert set(np.unique(lab)) == {0, 1, 2}, name


def test_instance_map_is_kept(tmp_path):
    lab = np.zeros((16, 16), np.uint16)
    lab[2:10, 2:8] = 3
    lab[2:10, 8:14] = 700  # touches label 3: must stay a separate instance
    iio.imwrite(tmp_path / "inst.png", lab)
    out = read_labels(tmp_path / "inst.png")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, lab.astype(np.int32))


def test_rgb_mask_and_float_masks(tmp_path):
    lab = np.zeros((10, 10), np.uint8)
    lab[1:4, 1:4], lab[5:9, 5:9] = 1, 2
    iio.imwrite(tmp_path / "rgb.png", np.stack([lab] * 3, axis=-1))
    np.testing.assert_array_equal(read_labels(tmp_path / "rgb.png"), lab)
    tifffile.imwrite(tmp_path / "f.tif", lab.astype(np.float32))
    np.testing.assert_array_equal(read_labels(tmp_path / "f.tif"), lab)
    tifffile.imwrite(tmp_path / "half.tif", lab.astype(np.float32) * 0.5)
    with pytest.raises(ValueError, match="non-integer"):
        read_labels(tmp_path / "half.tif")
    colour = np.stack([lab, lab * 2, lab], axis=-1)
    iio.imwrite(tmp_path / "colour.png", colour)
    with pytest.raises(ValueError, match="colour mask"):
        read_labels(tmp_path / "colour.png")


# --------------------------------------------------------------------------- pairs / lists


def _touch(path):
    """Write a tiny valid image file (PNG / JPEG through imageio, TIFF through tifffile)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    else:
        iio.imwrite(path, np.zeros((8, 8), np.uint8), extension=path.suffix.lower())


def test_find_pairs_by_stem_with_different_suffixes(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("b.png", "a.png", "c.png"):
        _touch(images / name)
    for name in ("a.tif", "b_mask.png", "z.png"):
        _touch(masks / name)
    (images / "readme.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="1 of 3 images"):
        pairs = find_pairs(images, masks)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.tif"), ("b.png", "b_mask.png")]


def test_find_pairs_in_one_folder(tmp_path):
    for name in ("x.tif", "x_mask.tif", "y.tif", "y_labels.png"):
        _touch(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the masks must not count as unpaired images
        pairs = find_pairs(tmp_path, tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("x.tif", "x_mask.tif"),
        ("y.tif", "y_labels.png"),
    ]


def test_find_pairs_errors(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    with pytest.raises(FileNotFoundError, match="image folder"):
        find_pairs(tmp_path / "nope", masks)
    with pytest.raises(ValueError, match="no image files"):
        find_pairs(images, masks)
    _touch(images / "img001.png")
    _touch(masks / "mask001.png")
    with pytest.raises(FileNotFoundError, match="mask folder"):
        find_pairs(images, tmp_path / "nope")
    with pytest.raises(ValueError, match="'img001'.*'mask001'"):
        find_pairs(images, masks)


def test_list_images_expands_folders(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.tif", "a.png", "c.JPG"):
        _touch(folder / name)
    (folder / "notes.txt").write_text("x")
    (folder / "sub").mkdir()
    single = tmp_path / "single.tif"
    _touch(single)
    out = list_images([single, folder, folder / "a.png"])
    assert [p.name for p in out] == ["single.tif", "a.png", "b.tif", "c.JPG"]
    assert ".jpg" in IMAGE_SUFFIXES
    with pytest.raises(FileNotFoundError):
        list_images([tmp_path / "missing.tif"])
    with pytest.raises(ValueError, match="no image files"):
        list_images([folder / "sub"])
    with pytest.raises(ValueError, match="not a supported image"):
        list_images([folder / "notes.txt"])


# --------------------------------------------------------------------------- writing


def test_write_labels_round_trip_uint16_imagej(tmp_path, rng):
    lab = rng.integers(0, 300, (30, 40)).astype(np.int64)
    out = tmp_path / "lab.tif"
    write_labels_tiff(out, lab)
    with tifffile.TiffFile(out) as tif:
        data = tif.asarray()
        assert tif.is_imagej
        assert tif.pages[0].compression != 1  # compressed
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(data, lab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.tif"]


def test_write_labels_uint32_and_stack(tmp_path):
    lab = np.zeros((2, 10, 12), np.int64)
    lab[0, 1:4, 1:4] = 70_000
    lab[1, 5:8, 5:8] = 3
    write_labels_tiff(tmp_path / "big.tif", lab)
    data = tifffile.imread(tmp_path / "big.tif")
    assert data.dtype == np.uint32 and data.shape == (2, 10, 12)
    np.testing.assert_array_equal(data, lab)
    write_labels_tiff(tmp_path / "small.tif", lab.clip(0, 9))
    assert tifffile.imread(tmp_path / "small.tif").shape == (2, 10, 12)


def test_write_labels_overwrites_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.tif"
    write_labels_tiff(target, np.ones((5, 5), np.uint8))
    write_labels_tiff(target, np.full((5, 5), 2, np.uint8))
    np.testing.assert_array_equal(tifffile.imread(target), 2)
    blocked = tmp_path / "blocked.tif"
    blocked.mkdir()  # renaming a file over a folder fails after the data were written
    with pytest.raises(OSError):
        write_labels_tiff(blocked, np.ones((5, 5), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.tif", "out.tif"]
    assert list(blocked.iterdir()) == []
    with pytest.raises(ValueError, match="integers"):
        write_labels_tiff(tmp_path / "f.tif", np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        write_labels_tiff(tmp_path / "n.tif", -np.ones((4, 4), np.int32))
