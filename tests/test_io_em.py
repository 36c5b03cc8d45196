"""Pixel sizes read back from files written with each kind of metadata; bad files fail cleanly.

TIFF metadata are written with tifffile (ImageJ, OME, and FEI / Zeiss private tags holding the
text their microscopes write), MRC with mrcfile and Berkeley EMD with rosettasciio's writer.
rosettasciio has no writer for DM3/DM4, SER or Velox EMD: the minimal valid files below follow
the published layouts (Gatan DM tag tree, FEI TIA series header, Velox HDF5 groups with JSON
metadata) and are read by rosettasciio's own readers.
"""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
import tifffile

from napari_sagegan.io.em import read_em, tiff_pixel_size, unit_to_nm
from napari_sagegan.io.pixel_size import read_pixel_size

pytest.importorskip("rsciio")
pytest.importorskip("mrcfile")


def micrograph(shape=(48, 64), dtype=np.float32):
    """A test image whose every row differs (catches flips and transposes)."""
    return ((np.arange(np.prod(shape)) * 7) % 251).reshape(shape).astype(dtype)


# --------------------------------------------------------------------------- file writers

_DM_ENCODING = {np.dtype("float32"): 6, np.dtype("uint16"): 4, np.dtype("uint8"): 10}
_DM_IMAGE_TYPE = {np.dtype("float32"): 2, np.dtype("uint16"): 10, np.dtype("uint8"): 6}


class _DMTags:
    """Gatan DigitalMicrograph tag tree, version 3 or 4 (big-endian headers, little-endian
    values). DM4 widens counts to 8 bytes and gives each tag its byte size."""

    def __init__(self, version: int):
        self.version = version
        self.fmt = ">Q" if version == 4 else ">I"

    def count(self, n: int) -> bytes:
        return struct.pack(self.fmt, n)

    def _tag(self, kind: int, name: str, body: bytes) -> bytes:
        size = struct.pack(">Q", len(body)) if self.version == 4 else b""
        return bytes([kind]) + struct.pack(">H", len(name)) + name.encode() + size + body

    def data(self, name: str, info: list[int], payload: bytes) -> bytes:
        head = b"%%%%" + self.count(len(info)) + b"".join(self.count(i) for i in info)
        return self._tag(0x15, name, head + payload)

    def group(self, name: str, tags: list[bytes]) -> bytes:
        return self._tag(0x14, name, b"\x00\x00" + self.count(len(tags)) + b"".join(tags))

    def f32(self, name: str, value: float) -> bytes:
        return self.data(name, [6], struct.pack("<f", value))

    def i32(self, name: str, value: int) -> bytes:
        return self.data(name, [3], struct.pack("<i", value))

    def text(self, name: str, value: str) -> bytes:
        chars = np.array([ord(c) for c in value], "<u2").tobytes()
        return self.data(name, [20, 4, len(value)], chars)

    def array(self, name: str, values: np.ndarray) -> bytes:
        values = np.ascontiguousarray(values.ravel())
        little = values.astype(values.dtype.newbyteorder("<")).tobytes()
        return self.data(name, [20, _DM_ENCODING[values.dtype], values.size], little)


def write_dm(path, data: np.ndarray, scale: float, units: str, version: int = 3) -> None:
    """A DM3/DM4 file holding one calibrated 2-D image."""
    t = _DMTags(version)
    dimension = [
        t.group("", [t.f32("Origin", 0.0), t.f32("Scale", scale), t.text("Units", units)])
        for _ in range(2)  # X, then Y
    ]
    calibrations = t.group(
        "Calibrations",
        [
            t.group("Brightness", [t.f32("Origin", 0), t.f32("Scale", 1), t.text("Units", "")]),
            t.group("Dimension", dimension),
        ],
    )
    image_data = t.group(
        "ImageData",
        [
            calibrations,
            t.array("Data", data),
            t.i32("DataType", _DM_IMAGE_TYPE[data.dtype]),
            t.group("Dimensions", [t.i32("", data.shape[1]), t.i32("", data.shape[0])]),
        ],
    )
    image = t.group("", [image_data, t.group("ImageTags", []), t.text("Name", "test")])
    root = b"\x00\x00" + t.count(2) + t.group("ImageList", [image]) + t.i32("Version", 1)
    body = root + b"\x00" * 8
    header_size = 16 if version == 4 else 12
    size = struct.pack(t.fmt, len(body) + header_size)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", version) + size + struct.pack(">I", 1) + body)


def write_ser(path, data: np.ndarray, pixel_size_m: float) -> None:
    """An FEI TIA .ser series holding one 2-D float32 image calibrated in metres."""
    data = np.ascontiguousarray(data, "<f4")
    ny, nx = data.shape
    desc = b"Number"
    dimension = struct.pack("<IddII", 1, 0.0, 1.0, 0, len(desc)) + desc + struct.pack("<I", 0)
    offsets_at = 30 + len(dimension)
    data_at = offsets_at + 8
    element = struct.pack("<ddIddIHII", 0.0, pixel_size_m, 0, 0.0, pixel_size_m, 0, 7, nx, ny)
    element += data[::-1].tobytes()  # TIA stores rows bottom-up
    tag_at = data_at + len(element)
    header = struct.pack(
        "<HHHIIIIII", 0x4949, 0x0197, 0x0210, 0x4122, 0x4152, 1, 1, offsets_at, 1
    )  # little-endian, series id, version, 2-D data, time tags, 1 element, offsets, 1 dim
    tag = struct.pack("<HHI", 0x4152, 0, 0)
    with open(path, "wb") as f:
        f.write(header + dimension + struct.pack("<II", data_at, tag_at) + element + tag)


def write_velox(path, data: np.ndarray, pixel_size_m: float) -> None:
    """A Velox .emd (HDF5) holding one image and its JSON metadata."""
    import h5py

    meta = {
        "BinaryResult": {
            "PixelSize": {"width": repr(pixel_size_m), "height": repr(pixel_size_m)},
            "PixelUnitX": "m",
            "PixelUnitY": "m",
            "Offset": {"x": "0", "y": "0"},
            "DetectorIndex": "0",
        },
        "Detectors": {"Detector-0": {"DetectorName": "HAADF"}},
        "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1700000000"}},
        "Scan": {},
        "CustomProperties": {},
    }
    text = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with h5py.File(path, "w") as f:
        version = json.dumps({"format": "Velox", "version": "11"}).encode()
        f.create_dataset("Version", data=np.array([version]))
        group = f.create_group("Data/Image/6fdbde41eecc4ed4ad1b1ac4e7d4d1bc")
        group.create_dataset("Data", data=data[..., None])  # (Y, X, frames)
        group.create_dataset("Metadata", data=text[:, None])


def write_ncem_emd(path, data: np.ndarray, pixel_size_nm: float) -> None:
    from rsciio.emd import file_writer

    axes = [
        {"name": n, "scale": pixel_size_nm, "units": "nm", "size": s, "offset": 0.0}
        | {"navigate": False}
        for n, s in zip("yx", data.shape)
    ]
    signal = {
        "data": data,
        "axes": axes,
        "metadata": {"General": {"title": "test"}, "Signal": {}},
        "original_metadata": {},
    }
    file_writer(str(path), signal)


def write_mrc(path, data: np.ndarray, voxel_angstrom: float, stack: bool = False) -> None:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        mrc.voxel_size = voxel_angstrom


FEI_TEXT = "[User]\r\nDate=11/21/2026\r\n[Scan]\r\nPixelWidth=2.5e-09\r\nPixelHeight=2.5e-09\r\n"
ZEISS_TEXT = (
    "0\r\n0\r\nAP_PIXEL_SIZE\r\nPixel Size = 1.234 nm\r\n"
    "AP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 0.0025 \u00b5m\r\nDP_ZOOM\r\nZoom = Off\r\n"
)


def write_fei_tif(path, data, text=FEI_TEXT):
    tifffile.imwrite(path, data, extratags=[(34682, "s", 0, text, True)])


def write_zeiss_tif(path, data, text=ZEISS_TEXT):
    raw = text.encode("latin-1")  # Zeiss writes the micro sign as one Latin-1 byte
    tifffile.imwrite(path, data, extratags=[(34118, 2, len(raw), raw, True)])


def write_imagej_tif(path, data, pixel_size, unit):
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / pixel_size, 1 / pixel_size),
        metadata={"unit": unit},
    )


# --------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize(
    ("size", "unit", "nm"),
    [(0.25, "um", 250.0), (0.25, "\\u00B5m", 250.0), (1.5, "nm", 1.5), (4.0, "micron", 4000.0)],
)
def test_imagej_tiff(tmp_path, size, unit, nm):
    path = tmp_path / "ij.tif"
    write_imagej_tif(path, micrograph(dtype=np.uint16), size, unit)
    data, meta = read_em(path)
    assert np.array_equal(data, micrograph(dtype=np.uint16))
    assert meta == {"pixel_size": pytest.approx(nm, rel=1e-6), "unit": "nm", "source": "imagej"}


def test_imagej_stack_keeps_its_slices(tmp_path):
    stack = np.stack([micrograph(dtype=np.uint8)] * 3)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "nm", "axes": "ZYX"}
    )
    data, meta = read_em(path)
    assert data.shape == (3, 48, 64)
    assert meta["pixel_size"] == pytest.approx(0.5) and meta["source"] == "imagej"


def test_imagej_tiff_without_calibration_has_no_pixel_size(tmp_path):
    path = tmp_path / "plain_ij.tif"
    tifffile.imwrite(path, micrograph(dtype=np.uint8), imagej=True)
    assert read_em(path)[1] == {"pixel_size": None, "unit": None, "source": "none"}


@pytest.mark.parametrize(("unit", "nm"), [({"PhysicalSizeXUnit": "nm"}, 2.5), ({}, 2500.0)])
def test_ome_tiff(tmp_path, unit, nm):
    path = tmp_path / "a.ome.tif"
    meta = {"PhysicalSizeX": 2.5, "PhysicalSizeY": 2.5} | unit  # OME's default unit is µm
    if unit:
        meta["PhysicalSizeYUnit"] = "nm"
    tifffile.imwrite(path, micrograph(dtype=np.uint16), ome=True, metadata=meta)
    data, got = read_em(path)
    assert np.array_equal(data, micrograph(dtype=np.uint16))
    assert got == {"pixel_size": pytest.approx(nm), "unit": "nm", "source": "ome"}


def test_fei_tiff(tmp_path):
    path = tmp_path / "fei.tif"
    write_fei_tif(path, micrograph(dtype=np.uint8))
    with tifffile.TiffFile(path) as tif:  # the file is what tifffile calls an FEI file
        assert tif.is_fei and tif.fei_metadata["Scan"]["PixelWidth"] == 2.5e-9
    data, meta = read_em(path)
    assert np.array_equal(data, micrograph(dtype=np.uint8))
    assert meta == {"pixel_size": pytest.approx(2.5), "unit": "nm", "source": "fei"}


def test_zeiss_tiff_prefers_the_image_pixel_size(tmp_path):
    path = tmp_path / "zeiss.tif"
    write_zeiss_tif(path, micrograph(dtype=np.uint8))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_sem and tif.sem_metadata["ap_image_pixel_size"][2] == "\u00b5m"
    assert tiff_pixel_size(path) == {
        "pixel_size": pytest.approx(2.5),
        "unit": "nm",
        "source": "zeiss",
    }
    only_scan = ZEISS_TEXT.split("AP_IMAGE_PIXEL_SIZE")[0]
    write_zeiss_tif(path, micrograph(dtype=np.uint8), only_scan)
    assert tiff_pixel_size(path)["pixel_size"] == pytest.approx(1.234)


def test_plain_tiff_resolution_is_not_a_pixel_size(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, micrograph(dtype=np.uint8), resolution=(72, 72), resolutionunit="INCH")
    assert read_em(path)[1] == {"pixel_size": None, "unit": None, "source": "none"}


def test_centimetre_resolution_of_a_plain_tiff(tmp_path):
    # as written for label files with more ids than ImageJ's uint16 holds
    path = tmp_path / "big_labels.tif"
    data = micrograph(dtype=np.uint32)
    tifffile.imwrite(path, data, resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
    assert tiff_pixel_size(path) == {
        "pixel_size": pytest.approx(10.0),
        "unit": "nm",
        "source": "tiff",
    }
    # 300 dots per inch written in centimetres: a print setting, not a pixel size
    tifffile.imwrite(path, data, resolution=(118.11, 118.11), resolutionunit="CENTIMETER")
    assert tiff_pixel_size(path)["pixel_size"] is None


def test_non_square_pixels_warn_and_use_the_width(tmp_path):
    path = tmp_path / "rect.tif"
    text = FEI_TEXT.replace("PixelHeight=2.5e-09", "PixelHeight=5e-09")
    write_fei_tif(path, micrograph(dtype=np.uint8), text)
    with pytest.warns(UserWarning, match="not square"):
        assert tiff_pixel_size(path)["pixel_size"] == pytest.approx(2.5)


def test_png_has_no_pixel_size(tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "a.png"
    iio.imwrite(path, micrograph(dtype=np.uint8))
    data, meta = read_em(path)
    assert data.shape == (48, 64) and meta["pixel_size"] is None


# --------------------------------------------------------------------------- EM formats


@pytest.mark.parametrize("version", [3, 4])
def test_dm_files(tmp_path, version):
    path = tmp_path / f"a.dm{version}"
    write_dm(path, micrograph(), 0.25, "\u00b5m", version)
    data, meta = read_em(path)
    assert data.dtype == np.float32 and np.array_equal(data, micrograph())
    assert meta == {"pixel_size": pytest.approx(250.0), "unit": "nm", "source": "dm"}


def test_uncalibrated_dm_file_stays_in_pixels(tmp_path):
    path = tmp_path / "raw.dm3"
    write_dm(path, micrograph(dtype=np.uint16), 1.0, "")
    data, meta = read_em(path)
    assert data.dtype == np.uint16 and np.array_equal(data, micrograph(dtype=np.uint16))
    assert meta["pixel_size"] is None and meta["source"] == "none"


def test_diffraction_pattern_in_reciprocal_units_has_no_pixel_size(tmp_path):
    path = tmp_path / "dp.dm4"
    write_dm(path, micrograph(), 0.01, "1/nm", 4)
    assert read_em(path)[1]["pixel_size"] is None


def test_ser_file(tmp_path):
    path = tmp_path / "a.ser"
    write_ser(path, micrograph(), 2.5e-9)
    data, meta = read_em(path)
    assert np.array_equal(data, micrograph())
    assert meta == {"pixel_size": pytest.approx(2.5), "unit": "nm", "source": "ser"}


def test_velox_emd_file(tmp_path):
    pytest.importorskip("h5py")
    path = tmp_path / "velox.emd"
    write_velox(path, micrograph(dtype=np.uint16), 1.2e-10)
    data, meta = read_em(path)
    assert np.array_equal(data, micrograph(dtype=np.uint16))
    assert meta == {"pixel_size": pytest.approx(0.12), "unit": "nm", "source": "emd"}


def test_berkeley_emd_file(tmp_path):
    pytest.importorskip("h5py")
    path = tmp_path / "ncem.emd"
    write_ncem_emd(path, micrograph(), 0.5)
    data, meta = read_em(path)
    assert np.array_equal(data, micrograph())
    assert meta == {"pixel_size": pytest.approx(0.5), "unit": "nm", "source": "emd"}


def test_mrc_files(tmp_path):
    write_mrc(tmp_path / "a.mrc", micrograph(), 12.5)  # Å
    data, meta = read_em(tmp_path / "a.mrc")
    assert np.array_equal(data, micrograph())
    assert meta == {"pixel_size": pytest.approx(1.25), "unit": "nm", "source": "mrc"}
    stack = np.stack([micrograph(dtype=np.int16)] * 2)
    write_mrc(tmp_path / "b.mrcs", stack, 0.0, stack=True)  # voxel size 0: not calibrated
    data, meta = read_em(tmp_path / "b.mrcs")
    assert data.shape == (2, 48, 64) and meta["pixel_size"] is None


def test_read_pixel_size_matches_read_em(tmp_path):
    write_fei_tif(tmp_path / "f.tif", micrograph(dtype=np.uint8))
    write_mrc(tmp_path / "m.mrc", micrograph(), 5.0)
    meta = read_em(tmp_path / "f.tif")[1]
    found = read_pixel_size(tmp_path / "f.tif")
    assert (found.nm, found.source, found.file) == (meta["pixel_size"], meta["source"], "f.tif")
    assert read_pixel_size(tmp_path / "m.mrc").nm == pytest.approx(0.5)


# --------------------------------------------------------------------------- bad files


def _all_formats(tmp_path):
    img = micrograph()
    files = {
        "a.dm3": lambda p: write_dm(p, img, 1.0, "nm", 3),
        "a.dm4": lambda p: write_dm(p, img, 1.0, "nm", 4),
        "a.ser": lambda p: write_ser(p, img, 1e-9),
        "a.emd": lambda p: write_velox(p, img, 1e-9),
        "a.mrc": lambda p: write_mrc(p, img, 10.0),
        "a.tif": lambda p: write_fei_tif(p, img.astype(np.uint8)),
    }
    for name, write in files.items():
        write(tmp_path / name)
    return [tmp_path / name for name in files]


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_files_fail_with_a_value_error(tmp_path, keep):
    for path in _all_formats(tmp_path):
        raw = path.read_bytes()
        bad = path.with_name("cut_" + path.name)
        bad.write_bytes(raw[: int(len(raw) * keep)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=bad.name):
                read_em(bad)


@pytest.mark.parametrize("suffix", [".dm3", ".dm4", ".ser", ".emd", ".mrc", ".tif"])
def test_garbage_and_empty_files_fail_with_a_value_error(tmp_path, suffix):
    for content in (b"", b"this is not a micrograph" * 20):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="junk"):
            read_em(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_em(tmp_path / "nope.dm3")
    with pytest.raises(ValueError, match="folder"):
        read_em(tmp_path)


def test_spectrum_is_not_an_image(tmp_path):
    path = tmp_path / "spectrum.emd"
    from rsciio.emd import file_writer

    axis = {"name": "E", "scale": 1.0, "units": "eV", "size": 64, "offset": 0.0, "navigate": False}
    metadata = {"General": {"title": "EDS"}, "Signal": {}}
    signal = {
        "data": np.arange(64.0),
        "axes": [axis],
        "metadata": metadata,
        "original_metadata": {},
    }
    file_writer(str(path), signal)
    with pytest.raises(ValueError, match="no 2-D image"):
        read_em(path)


@pytest.mark.parametrize(
    ("unit", "nm"),
    [
        ("nm", 1.0),
        ("\u00b5m", 1e3),
        ("\u03bcm", 1e3),
        ("\\u00B5m", 1e3),
        ("um", 1e3),
        ("micron", 1e3),
        ("\u00c5", 0.1),
        ("\u212b", 0.1),
        ("m", 1e9),
        ("pm", 1e-3),
        ("pixel", None),
        ("1/nm", None),
        ("", None),
        (None, None),
    ],
)
def test_unit_to_nm(unit, nm):
    assert unit_to_nm(unit) == (pytest.approx(nm) if nm else None)
