"""The Measure dock widget: table, plots, colouring and CSV export in a real viewer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

pytest.importorskip("napari")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.gui


def hex_discs(a=14.0, field=128, radius=4.5):
    labels = np.zeros((field, field), np.int32)
    h = a * np.sqrt(3) / 2
    k = 0
    for row in range(int(field / h) + 1):
        for col in range(int(field / a) + 1):
            y, x = 6 + row * h, 6 + col * a + (row % 2) * a / 2
            if y < field - 6 and x < field - 6:
                k += 1
                rr, cc = disk((y, x), radius, shape=labels.shape)
                labels[rr, cc] = k
    return labels


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    from napari_sagegan.napari._qt.measure import MeasureWidget

    viewer = make_napari_viewer()
    labels = hex_discs()
    image = np.where(labels > 0, 40, 200).astype(np.uint8)
    viewer.add_image(image, name="micrograph", scale=(2.0, 2.0), units=("nm", "nm"))
    viewer.add_labels(labels, name="particles", scale=(2.0, 2.0), metadata={"pixel_size_nm": 2.0})
    widget = MeasureWidget(viewer)
    return viewer, widget, labels


def test_measures_the_labels_layer_and_exports_a_csv(viewer_and_widget, tmp_path):
    viewer, widget, labels = viewer_and_widget
    assert widget.labels_combo.currentText() == "particles"
    assert widget.pixel_size.value() == pytest.approx(2.0)  # from the layer's metadata
    widget.image_combo.setCurrentText("micrograph")
    result = widget.run(blocking=True)

    n = len(np.unique(labels)) - 1
    assert result is widget.result and len(result.table) == n
    assert widget.table_model.rowCount() == n
    assert "equivalent_diameter_nm" in result.table and result.unit == "nm"
    assert np.allclose(result.table["mean_intensity"], 40.0)
    assert f"{n} particles" in widget.status.text() and "psi6" in widget.status.text()
    # the Labels layer's features are the table, indexed by label (napari shows them on hover)
    features = viewer.layers["particles"].features
    assert list(features["index"]) == list(result.table["label"])
    # three plots: size and nearest-neighbour histograms, g(r)
    axes = widget.figure.axes
    assert [ax.get_xlabel() for ax in axes] == [
        "equivalent diameter (nm)",
        "nearest-neighbour distance (nm)",
        "r (nm)",
    ]
    assert len(axes[0].patches) > 0 and len(axes[2].lines) >= 1

    path = widget.export_csv(tmp_path / "table.csv")
    back = pd.read_csv(path)
    assert len(back) == n
    assert np.allclose(back["equivalent_diameter_nm"], result.table["equivalent_diameter_nm"])
    assert (tmp_path / "table.summary.json").exists()


def test_measuring_keeps_the_network_confidence(viewer_and_widget):
    """Segment's per-particle confidence in the layer's features survives Measure (the
    Proofread dock ranks particles by it)."""
    import pandas as pd

    viewer, widget, labels = viewer_and_widget
    ids = np.unique(labels)[1:]
    conf = np.linspace(0.2, 0.9, len(ids))
    layer = viewer.layers["particles"]
    layer.features = pd.DataFrame({"label": ids, "confidence": conf})
    widget.image_combo.setCurrentText("micrograph")
    result = widget.run(blocking=True)
    features = layer.features
    assert "equivalent_diameter_nm" in features and len(features) == len(result.table)
    back = dict(zip(features["label"], features["confidence"]))
    assert [back[i] for i in ids] == pytest.approx(list(conf))


def test_colour_by_property_and_reset(viewer_and_widget):
    from napari.utils.colormaps import DirectLabelColormap

    viewer, widget, labels = viewer_and_widget
    layer = viewer.layers["particles"]
    original = layer.colormap
    result = widget.run(blocking=True)
    widget.colour_by("psi6")
    cmap = layer.colormap
    assert isinstance(cmap, DirectLabelColormap)
    t = result.table
    inner = t.loc[t["order_interior"], "label"].iloc[0]
    border = t.loc[~t["order_interior"], "label"].iloc[0]
    assert np.allclose(cmap.color_dict[int(border)], (0.5, 0.5, 0.5, 1.0))  # undefined: grey
    assert not np.allclose(cmap.color_dict[int(inner)], (0.5, 0.5, 0.5, 1.0))
    widget.colour_by("equivalent_diameter_nm")
    widget.reset_colours()
    assert layer.colormap is original


def test_worker_thread_delivers_the_result(viewer_and_widget, qtbot):
    viewer, widget, labels = viewer_and_widget
    widget.pixel_size.setValue(0.0)  # unknown: measure in pixels
    widget.run()
    qtbot.waitUntil(lambda: widget.result is not None, timeout=20000)
    qtbot.waitUntil(widget.measure_button.isEnabled, timeout=5000)
    assert widget.result.unit == "px"
    assert "pixel size unknown" in widget.status.text()


def test_pixel_size_follows_the_chosen_layers(viewer_and_widget):
    viewer, widget, labels = viewer_and_widget
    assert widget.pixel_size.value() == pytest.approx(2.0)
    # labels of unknown origin: the one image of their shape is taken
    assert widget.image_combo.currentText() == "micrograph"
    viewer.add_labels(labels, name="uncalibrated")
    assert widget.pixel_size.value() == pytest.approx(2.0)  # adding a layer changes nothing
    widget.labels_combo.setCurrentText("uncalibrated")
    assert widget.image_combo.currentText() == "micrograph"  # of their shape: kept
    assert widget.pixel_size.value() == pytest.approx(2.0)  # the image's scale is in nm
    widget.image_combo.setCurrentText("(none)")
    assert widget.pixel_size.value() == 0.0  # no calibration anywhere: pixels
    assert "pixel size unknown" in widget.warning.text() and not widget.warning.isHidden()
    widget.image_combo.setCurrentText("micrograph")
    assert widget.pixel_size.value() == pytest.approx(2.0)
    assert widget.warning.isHidden()
    widget.pixel_size.setValue(3.5)  # typed in: kept while the layers stay
    viewer.add_image(np.zeros((4, 4)), name="other")
    assert widget.pixel_size.value() == pytest.approx(3.5)


def test_no_labels_layer_is_reported_not_raised(make_napari_viewer):
    from napari_sagegan.napari._qt.measure import MeasureWidget

    viewer = make_napari_viewer()
    widget = MeasureWidget(viewer)
    assert widget.run(blocking=True) is None
    assert "no Labels layer" in widget.status.text()
    with pytest.raises(ValueError, match="Measure first"):
        widget.export_csv("never.csv")


def test_layer_pixel_size_from_scale_units():
    from napari.layers import Image

    from napari_sagegan.napari.layers import layer_pixel_size

    image = np.zeros((8, 8))
    assert layer_pixel_size(Image(image, scale=(0.5, 0.5), units=("um", "um"))) == pytest.approx(
        500
    )
    assert layer_pixel_size(Image(image, scale=(3.0, 3.0))) is None  # pixels: unknown
    assert layer_pixel_size(Image(image, metadata={"pixel_size_nm": 1.5})) == 1.5


def test_pixel_size_of_a_tiff_opened_by_napari_itself(make_napari_viewer, tmp_path):
    """napari's TIFF reader drops the ImageJ pixel size; the widget reads it from the file."""
    import tifffile

    path = tmp_path / "calibrated.tif"
    tifffile.imwrite(
        path,
        np.zeros((16, 16), np.uint8),
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.25),
        metadata={"unit": "um"},
    )
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((16, 16), np.uint8))
    from napari_sagegan.napari.layers import layer_pixel_size

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path))
    (plain_layer,) = viewer.open(str(plain))
    assert layer_pixel_size(layer) == pytest.approx(250.0)
    assert layer_pixel_size(plain_layer) is None
