"""Label TIFFs that Fiji reads with their pixel size; particle tables; the export widget."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import disc_image
from napari_sagegan.io.export import (
    particle_table,
    read_labels_scale,
    short_unit,
    write_labels_tiff,
)

CENTRES = ((16, 16), (16, 48), (48, 30))


def labels_2d():
    return disc_image((64, 64), centres=CENTRES, radius=6)[1]


def test_uint16_labels_with_pixel_size_and_unit(tmp_path):
    lab = labels_2d()
    path = write_labels_tiff(tmp_path / "a.tif", lab, scale=(0.25, 0.5), unit="nm")
    back = tifffile.imread(path)
    assert back.dtype == np.uint16 and np.array_equal(back, lab)
    assert read_labels_scale(path) == ((0.25, 0.5), "nm")
    with tifffile.TiffFile(path) as tif:  # what Fiji reads
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "nm"
        xres = tif.pages[0].tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(2.0)  # pixels per nm along X


def test_stack_spacing_micron_and_uncalibrated(tmp_path):
    stack = np.stack([labels_2d(), np.zeros((64, 64), np.int32)])
    path = write_labels_tiff(tmp_path / "s.tif", stack, scale=(40.0, 0.5, 0.5), unit="µm")
    with tifffile.TiffFile(path) as tif:
        meta = tif.imagej_metadata
        assert meta["spacing"] == 40.0 and meta["unit"] == "micron"  # ImageJ's spelling
        assert tif.series[0].shape == (2, 64, 64)
    assert read_labels_scale(path) == ((0.5, 0.5), "µm")
    plain = write_labels_tiff(tmp_path / "p.tif", labels_2d(), scale=(1.0, 1.0), unit="nm")
    assert read_labels_scale(plain) == ((1.0, 1.0), None)


def test_more_than_65535_particles_need_uint32(tmp_path):
    lab = labels_2d().astype(np.int64)
    lab[lab == 3] = 70_000
    path = write_labels_tiff(tmp_path / "big.tif", lab, scale=(2.0, 2.0), unit="nm")
    back = tifffile.imread(path)
    assert back.dtype == np.uint32 and np.array_equal(back, lab)
    (py, px), unit = read_labels_scale(path)  # resolution tags in pixels per cm
    assert unit == "nm" and py == pytest.approx(2.0) and px == pytest.approx(2.0)


def test_bad_labels_leave_no_file(tmp_path):
    target = tmp_path / "x.tif"
    with pytest.raises(ValueError, match="integers"):
        write_labels_tiff(target, np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="negative"):
        write_labels_tiff(target, -np.ones((8, 8), np.int32))
    with pytest.raises(ValueError, match=r"\(Y, X\) image or \(Z, Y, X\) stack"):
        write_labels_tiff(target, np.zeros((2, 2, 8, 8), np.int32))
    with pytest.raises(ValueError, match="positive"):
        write_labels_tiff(target, labels_2d(), scale=(0.0, 1.0))
    assert list(tmp_path.iterdir()) == []


def test_units_from_napari_layers():
    import pint

    ureg = pint.UnitRegistry()
    assert short_unit(ureg.nanometer) == "nm" and short_unit(ureg.micrometer) == "µm"
    assert short_unit(ureg.pixel) is None and short_unit("px") is None and short_unit(None) is None


def test_particle_table_in_pixels_and_physical_units():
    lab = labels_2d()
    table = particle_table(lab, scale=(0.5, 0.5), unit="nm")
    assert list(table["label"]) == [1, 2, 3] and list(table["index"]) == [1, 2, 3]
    areas = np.bincount(lab.ravel())[1:]
    np.testing.assert_array_equal(table["area_px"], areas)
    np.testing.assert_allclose(table["area_nm2"], areas * 0.25)
    np.testing.assert_allclose(table["equivalent_diameter_px"], 2 * np.sqrt(areas / np.pi))
    np.testing.assert_allclose(
        table["equivalent_diameter_nm"], 0.5 * table["equivalent_diameter_px"]
    )
    np.testing.assert_allclose(table[["centroid_y_px", "centroid_x_px"]], CENTRES, atol=0.01)
    assert "area_nm2" not in particle_table(lab)  # uncalibrated: pixels only
    stack = particle_table(np.stack([lab, np.zeros_like(lab), lab]))
    assert len(stack) == 6 and sorted(set(stack["slice"])) == [0, 2]
    assert len(particle_table(np.zeros((8, 8), np.int32))) == 0


def test_npe2_writer_takes_scale_and_units_from_the_layer(tmp_path):
    from napari.layers import Labels

    from napari_sagegan.napari.writer import write_labels

    layer = Labels(labels_2d(), scale=(0.5, 0.5), units="nm", name="x labels")
    data, meta, _ = layer.as_layer_data_tuple()
    written = write_labels(str(tmp_path / "out"), data, meta)
    assert written == [str(tmp_path / "out.tif")]
    assert np.array_equal(tifffile.imread(written[0]), labels_2d())
    assert read_labels_scale(written[0]) == ((0.5, 0.5), "nm")


@pytest.mark.gui
def test_export_all_labels_asks_before_overwriting(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_sagegan.napari._qt.export import ExportWidget

    viewer = make_napari_viewer()
    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.export_all(str(tmp_path)) is None  # no Labels layer at all
    assert "no Labels layer" in notification_manager.records[-1].message
    lab = labels_2d()
    viewer.add_labels(lab, name="a labels", scale=(0.5, 0.5), units="nm")
    viewer.add_labels(np.stack([lab, lab]), name="stack/labels")
    assert widget.export_all(str(tmp_path / "nowhere")) is None
    assert "does not exist" in notification_manager.records[-1].message
    asked = []
    widget.confirm_overwrite = lambda paths: asked.append(list(paths)) or False

    worker = widget.export_all(str(tmp_path))
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_labels.tif",
        "particles.csv",
        "stack_labels.tif",
    ]
    assert asked == []  # nothing existed: no question
    assert read_labels_scale(tmp_path / "a_labels.tif") == ((0.5, 0.5), "nm")
    assert tifffile.imread(tmp_path / "stack_labels.tif").shape == (2, 64, 64)
    csv = pd.read_csv(tmp_path / "particles.csv")
    assert len(csv) == 3 + 6 and set(csv["layer"]) == {"a labels", "stack/labels"}
    assert csv.loc[csv["layer"] == "a labels", "area_nm2"].notna().all()

    # a second export: asked first; "No" leaves every file as it was
    viewer.layers["a labels"].data = np.zeros_like(lab)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert widget.export_all(str(tmp_path)) is None
    assert len(asked) == 1 and len(asked[0]) == 3
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # "Yes" replaces them
    widget.confirm_overwrite = lambda paths: True
    worker = widget.export_all(str(tmp_path))
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=10_000)
    assert not tifffile.imread(tmp_path / "a_labels.tif").any()
    assert len(pd.read_csv(tmp_path / "particles.csv")) == 6


def test_particle_table_flags_particles_cut_by_the_border():
    lab = labels_2d()
    lab[0:5, 40:44] = 9  # touches the top edge
    lab[60:64, 0:3] = 10  # the bottom-left corner
    table = particle_table(lab)
    cut = dict(zip(table["label"], table["touches_border"]))
    assert cut == {1: False, 2: False, 3: False, 9: True, 10: True}
    assert table["touches_border"].dtype == bool


def test_npe2_writer_uses_the_recorded_pixel_size_without_a_scale(tmp_path):
    """A Labels layer whose scale says pixels but whose metadata holds the pixel size (a
    TIFF's calibration read by this plugin) is written with it."""
    from napari.layers import Labels

    from napari_sagegan.napari.writer import layer_scale_unit, write_labels

    layer = Labels(labels_2d(), metadata={"pixel_size_nm": 0.8})
    data, meta, _ = layer.as_layer_data_tuple()
    (written,) = write_labels(str(tmp_path / "m.tif"), data, meta)
    assert read_labels_scale(written) == (pytest.approx((0.8, 0.8)), "nm")
    plain = Labels(labels_2d())
    (written,) = write_labels(str(tmp_path / "p.tif"), *plain.as_layer_data_tuple()[:2])
    assert read_labels_scale(written) == ((1.0, 1.0), None)
    # a stack keeps its Z spacing; a layer in um keeps its unit
    assert layer_scale_unit((3.0, 1.0, 1.0), ("pixel",) * 3, {"pixel_size_nm": 2.0}) == (
        (3.0, 2.0, 2.0),
        "nm",
    )
    assert layer_scale_unit((0.5, 0.5), ("um", "um"), {"pixel_size_nm": 2.0}) == (
        (0.5, 0.5),
        "µm",
    )


@pytest.mark.gui
def test_export_ticks_segment_results_only_by_default(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_sagegan.napari._qt.export import ExportWidget
    from napari_sagegan.napari.layers import META_KEY, labels_digest

    viewer = make_napari_viewer()
    lab = labels_2d()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="x", scale=(0.5, 0.5), units="nm")
    result_meta = {META_KEY: {"image": "x", "digest": labels_digest(lab)}}
    viewer.add_labels(lab, name="x labels", metadata=result_meta)  # Segment's: no scale
    viewer.add_labels(lab, name="x ground truth")  # opened from a file
    synth = {META_KEY: {"image": "SAGE-GAN synth 01", "synthetic": True, "digest": "0"}}
    viewer.add_labels(lab, name="SAGE-GAN synth 01 labels", metadata=synth)
    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.layer_list.count() == 3
    assert widget.ticked() == ["x labels"]

    assert widget.export_all(str(tmp_path)) is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["particles.csv", "x_labels.tif"]
    # the labels carry no scale: the pixel size is their image's
    assert read_labels_scale(tmp_path / "x_labels.tif") == ((0.5, 0.5), "nm")
    csv = pd.read_csv(tmp_path / "particles.csv")
    assert set(csv["layer"]) == {"x labels"} and (csv["pixel_size_nm"] == 0.5).all()
    np.testing.assert_allclose(csv["equivalent_diameter_nm"], csv["equivalent_diameter_px"] * 0.5)
    assert csv["touches_border"].dtype == bool

    widget.tick("x ground truth")  # the user's choice is kept when layers change
    viewer.add_labels(np.zeros_like(lab), name="x labels [1]", metadata=dict(result_meta))
    assert widget.ticked() == ["x labels", "x ground truth", "x labels [1]"]
    widget.tick_all(False)
    assert widget.export_all(str(tmp_path)) is None
    assert "No Labels layer is ticked" in notification_manager.records[-1].message
    widget.tick("x ground truth")
    widget.confirm_overwrite = lambda paths: True
    assert widget.export_all(str(tmp_path)) is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=10_000)
    csv = pd.read_csv(tmp_path / "particles.csv")
    assert set(csv["layer"]) == {"x ground truth"}
    assert (csv["pixel_size_nm"] == 0.5).all()  # "<image> ground truth": its image's
    assert read_labels_scale(tmp_path / "x_ground_truth.tif") == ((0.5, 0.5), "nm")
    viewer.add_labels(lab, name="drawn")  # belongs to no image: nothing known
    widget.tick_all(False)
    widget.tick("drawn")
    assert widget.export_all(str(tmp_path)) is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=10_000)
    csv = pd.read_csv(tmp_path / "particles.csv")
    assert csv["pixel_size_nm"].isna().all() and "area_nm2" not in csv
    assert read_labels_scale(tmp_path / "drawn.tif") == ((1.0, 1.0), None)


def test_export_csv_carries_the_network_confidence(make_napari_viewer, qtbot, tmp_path):
    """The confidence Segment put in a layer's features reaches particles.csv, by label; a
    layer without one gets an empty column."""
    from napari_sagegan.napari._qt.export import ExportWidget

    viewer = make_napari_viewer()
    widget = ExportWidget(viewer)
    lab = labels_2d()
    ids = np.unique(lab)[1:]
    layer = viewer.add_labels(lab, name="a labels")
    layer.features = pd.DataFrame({"label": ids, "confidence": [0.9, 0.2, 0.55][: len(ids)]})
    viewer.add_labels(lab.copy(), name="b labels")
    widget.refresh()
    widget.tick_all(True)
    worker = widget.export_all(str(tmp_path))
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=10_000)
    csv = pd.read_csv(tmp_path / "particles.csv")
    a = csv[csv["layer"] == "a labels"]
    assert dict(zip(a["label"], a["confidence"])) == pytest.approx(
        dict(zip(ids, [0.9, 0.2, 0.55][: len(ids)]))
    )
    assert csv.loc[csv["layer"] == "b labels", "confidence"].isna().all()
