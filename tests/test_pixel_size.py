"""The one pixel-size resolver: which value wins, and what it says about its source."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_sagegan.io.pixel_size import PixelSize, from_scale, read_pixel_size, resolve_pixel_size


def _imagej(path, nm):
    tifffile.imwrite(
        path, np.zeros((8, 8), np.uint8), imagej=True, resolution=(1 / nm, 1 / nm),
        metadata={"unit": "nm"},
    )  # fmt: skip
    return path


def test_override_then_candidates_in_order(tmp_path):
    cal = _imagej(tmp_path / "cal.tif", 2.0)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8))
    assert resolve_pixel_size(cal, override=0.5) == PixelSize(0.5, "given")
    flag = PixelSize(0.25, "--pixel-size")
    assert resolve_pixel_size(cal, override=flag).describe() == "--pixel-size"
    found = resolve_pixel_size(plain, cal)
    assert found.nm == pytest.approx(2.0) and found.source == "imagej" and found.file == "cal.tif"
    assert found.describe() == "cal.tif (imagej metadata)"
    assert resolve_pixel_size({"pixel_size_nm": 1.5}, cal) == PixelSize(1.5, "metadata")
    meta = {"pixel_size": 0.8, "unit": "nm", "source": "dm"}
    assert resolve_pixel_size(None, PixelSize.from_meta(meta, "a.dm4")).describe() == (
        "a.dm4 (dm metadata)"
    )
    unknown = resolve_pixel_size(plain, None, {"pixel_size": None, "source": "none"})
    assert unknown == PixelSize(None) and not unknown.known and unknown.describe() == "none"
    with pytest.raises(ValueError, match="positive"):
        resolve_pixel_size(cal, override=-1.0)


def test_unreadable_files_count_as_unknown_unless_asked(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    assert resolve_pixel_size(bad) == PixelSize(None)
    with pytest.raises(ValueError, match="cannot read"):
        resolve_pixel_size(bad, quiet=False)
    with pytest.raises(FileNotFoundError):
        read_pixel_size(tmp_path / "missing.png")
    png = tmp_path / "a.png"
    png.write_bytes(b"")
    assert read_pixel_size(png) == PixelSize(None)


def test_from_a_layer_scale_and_unit():
    pint = pytest.importorskip("pint")
    ureg = pint.UnitRegistry()
    assert from_scale((1.0, 0.5, 0.5), "um").nm == pytest.approx(500.0)
    assert from_scale((0.5, 0.5), ureg.nanometer).nm == pytest.approx(0.5)
    assert from_scale((0.5, 0.5), ureg.micrometer).nm == pytest.approx(500.0)
    assert from_scale((3.0, 3.0), ureg.pixel) == PixelSize(None)
    assert from_scale((3.0, 3.0), None) == PixelSize(None)
    assert from_scale((0.5, 0.5), "nm").source == "scale"
