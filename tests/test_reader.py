"""The npe2 reader: claims EM files and calibrated TIFFs only, gives layers scale and units."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_sagegan.napari.reader import get_reader, read_micrographs

pytest.importorskip("mrcfile")
pytest.importorskip("rsciio")

# The minimal-file writers live with the format tests (tests/ is on sys.path under pytest).
from test_io_em import micrograph, write_dm, write_fei_tif, write_imagej_tif, write_mrc  # noqa: E402


def test_calibrated_files_are_claimed(tmp_path):
    write_fei_tif(tmp_path / "fei.tif", micrograph(dtype=np.uint8))
    write_dm(tmp_path / "a.dm3", micrograph(), 0.5, "nm")
    write_mrc(tmp_path / "a.mrc", micrograph(), 10.0)
    for name in ("fei.tif", "a.dm3", "a.mrc"):
        assert get_reader(str(tmp_path / name)) is read_micrographs
    assert get_reader([str(tmp_path / "a.dm3"), str(tmp_path / "a.mrc")]) is read_micrographs


def test_what_napari_reads_well_is_left_to_napari(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", micrograph(dtype=np.uint8))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "a.png", micrograph(dtype=np.uint8))
    write_fei_tif(tmp_path / "fei.tif", micrograph(dtype=np.uint8))
    assert get_reader(str(tmp_path / "plain.tif")) is None  # no pixel size in it
    assert get_reader(str(tmp_path / "broken.tif")) is None  # napari's reader says why
    assert get_reader(str(tmp_path / "a.png")) is None
    assert get_reader(str(tmp_path)) is None  # folders
    assert get_reader(str(tmp_path / "missing.tif")) is None
    assert get_reader([str(tmp_path / "fei.tif"), str(tmp_path / "plain.tif")]) is None


def test_layer_gets_scale_units_and_metadata(tmp_path):
    from napari.layers import Layer

    path = tmp_path / "grid.dm4"
    write_dm(path, micrograph(), 0.25, "\u00b5m", version=4)
    [(data, attrs, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and np.array_equal(data, micrograph())
    assert attrs["name"] == "grid"
    assert attrs["scale"] == pytest.approx((250.0, 250.0))
    assert attrs["metadata"] == {
        "pixel_size_nm": pytest.approx(250.0),
        "unit": "nm",
        "source": "dm",
        "path": str(path),
    }
    layer = Layer.create(data, attrs, kind)  # napari accepts every attribute as given
    assert [str(u) for u in layer.units] == ["nanometer", "nanometer"]
    assert np.allclose(layer.scale, 250.0)


def test_stack_scale_is_one_along_z(tmp_path):
    path = tmp_path / "stack.tif"
    stack = np.stack([micrograph(dtype=np.uint8)] * 3)
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "nm", "axes": "ZYX"}
    )
    [(data, attrs, _)] = read_micrographs(str(path))
    assert data.shape == (3, 48, 64)
    assert attrs["scale"] == pytest.approx((1.0, 0.25, 0.25))
    assert len(attrs["units"]) == 3


def test_calibrated_label_tiff_opens_as_labels(tmp_path):
    path = tmp_path / "grid_labels.tif"
    labels = (micrograph(dtype=np.uint16) > 120).astype(np.uint16)
    write_imagej_tif(path, labels, 2.0, "nm")
    [(data, attrs, kind)] = read_micrographs(str(path))
    assert kind == "labels" and attrs["scale"] == pytest.approx((2.0, 2.0))


def test_uncalibrated_em_file_says_pixels(tmp_path):
    path = tmp_path / "raw.mrc"
    write_mrc(path, micrograph(), 0.0)
    with pytest.warns(UserWarning, match="pixel size unknown: measurements in pixels"):
        [(_, attrs, _)] = read_micrographs(str(path))
    assert "scale" not in attrs
    assert attrs["metadata"]["unit"] == "px" and attrs["metadata"]["pixel_size_nm"] is None


def test_damaged_file_raises_a_clear_value_error(tmp_path):
    path = tmp_path / "damaged.mrc"
    write_mrc(path, micrograph(), 10.0)
    path.write_bytes(path.read_bytes()[:-100])
    reader = get_reader(str(path))
    with pytest.raises(ValueError, match="damaged.mrc.*truncated or damaged"):
        reader(str(path))


def test_tiff_layers_read_by_napari_get_the_file_calibration(tmp_path):
    """napari's own TIFF reader drops the FEI / ImageJ pixel size: the docks write it into
    the layer from layer.source.path (napari_sagegan.napari.calibration), and into the
    layers that belong to it."""
    from napari.layers import Image, Labels
    from napari.layers._source import layer_source

    from napari_sagegan.io.pixel_size import read_pixel_size
    from napari_sagegan.napari.calibration import calibrate_from_file

    path = tmp_path / "fei.tif"
    write_fei_tif(path, micrograph(dtype=np.uint8))
    expected = read_pixel_size(path)
    assert expected.known
    with layer_source(path=str(path), reader_plugin="napari"):
        image = Image(tifffile.imread(path), name="fei")
    truth = Labels(np.zeros(image.data.shape, np.int32), name="fei ground truth")
    other = Labels(np.zeros(image.data.shape, np.int32), name="unrelated")
    assert calibrate_from_file(image, [image, truth, other]) == pytest.approx(expected.nm)
    for layer in (image, truth):
        assert tuple(layer.scale) == pytest.approx((expected.nm, expected.nm))
        assert [str(u) for u in layer.units] == ["nanometer", "nanometer"]
        assert layer.metadata["pixel_size_nm"] == pytest.approx(expected.nm)
        assert layer.metadata["pixel_size_source"] == expected.source
    assert tuple(other.scale) == (1.0, 1.0)
    assert calibrate_from_file(image, [image]) is None  # already calibrated: left as it is

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, micrograph(dtype=np.uint8))
    with layer_source(path=str(plain), reader_plugin="napari"):
        layer = Image(tifffile.imread(plain))
    assert calibrate_from_file(layer) is None and tuple(layer.scale) == (1.0, 1.0)
