"""Proofreading: the label operations (pure NumPy) and the "Proofread particles" dock in a
real napari viewer (delete, merge, split, add, next low-confidence, undo)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from conftest import disc_image
from napari_sagegan.io.export import particle_table
from napari_sagegan.napari import proofread as ops
from test_tasks import disc_scene, trained_checkpoint


def discs(shape=(64, 64), specs=(((20, 20), 7), ((44, 40), 7))):
    labels = np.zeros(shape, np.int32)
    for i, (c, r) in enumerate(specs, 1):
        rr, cc = disk(c, r, shape=shape)
        labels[rr, cc] = i
    return labels


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# --------------------------------------------------------------------------- operations


def test_delete_removes_one_particle_only():
    labels = discs()
    edit = ops.delete_particle(labels, ops.label_at(labels, (20, 20)))
    out = labels.copy()
    edit.apply(out)
    assert set(np.unique(out)) == {0, 2}
    assert np.array_equal(out == 2, labels == 2)
    assert edit.touched == {1} and "deleted particle 1" in edit.what
    back = out.copy()
    edit.inverse().apply(back)
    assert np.array_equal(back, labels)
    with pytest.raises(ValueError, match="no particle under the click"):
        ops.delete_particle(labels, ops.label_at(labels, (2, 60)))


def test_merge_joins_touching_particles_and_refuses_distant_ones():
    labels = discs(specs=(((30, 22), 8), ((30, 37), 8)))  # touching between columns 29 and 30
    labels[labels == 2] = 5
    edit = ops.merge_particles(labels, 5, 1)
    out = labels.copy()
    edit.apply(out)
    assert set(np.unique(out)) == {0, 5}
    assert (out == 5).sum() == (labels > 0).sum() and edit.labels == [5]
    assert ndi.label(out == 5)[1] == 1
    # a 2-px gap is bridged, 10 px are refused (nothing changes)
    gap = discs(specs=(((30, 20), 6), ((30, 34), 6)))
    merged = gap.copy()
    ops.merge_particles(gap, 1, 2).apply(merged)
    assert ndi.label(merged == 1, structure=np.ones((3, 3)))[1] == 1 and 2 not in merged
    far = discs()
    with pytest.raises(ValueError, match="do not touch"):
        ops.merge_particles(far, 1, 2)
    with pytest.raises(ValueError, match="two different particles"):
        ops.merge_particles(far, 1, 1)


def test_split_cuts_a_merged_pair_at_its_waist():
    truth = discs(specs=(((30, 20), 9), ((30, 40), 9)))
    truth[25:36, 27:33][truth[25:36, 27:33] == 0] = 1  # a bridge: one blob of two particles
    merged = (truth > 0).astype(np.int32) * 4
    edit = ops.split_particle(merged, 4, [(30, 18), (30, 42)], new_label=9)
    out = merged.copy()
    edit.apply(out)
    assert set(np.unique(out)) == {0, 4, 9} and sorted(edit.labels) == [4, 9]
    left, right = discs(specs=(((30, 20), 9),)) > 0, discs(specs=(((30, 40), 9),)) > 0
    assert iou(out == 4, left) > 0.8 and iou(out == 9, right) > 0.8
    with pytest.raises(ValueError, match="not inside particle"):
        ops.split_particle(merged, 4, [(30, 18), (2, 2)])
    with pytest.raises(ValueError, match="two clicks"):
        ops.split_particle(merged, 4, [(30, 18)])


def test_grow_from_maps_finds_a_missed_particle_and_stops_at_its_neighbour():
    truth = discs(specs=(((30, 20), 8), ((30, 35), 8)))  # two touching, both missed
    prob = np.where(truth > 0, 0.42, 0.03).astype(np.float32)  # below a 0.5 threshold
    dist = np.zeros(truth.shape, np.float32)
    for i in (1, 2):
        edt = ndi.distance_transform_edt(truth == i)
        dist[truth == i] = (edt / edt.max())[truth == i]
    occupied = np.zeros(truth.shape, bool)
    region = ops.grow_from_maps(prob, dist, (30, 19), occupied, max_radius=16, threshold=0.3)
    assert iou(region, truth == 1) > 0.85  # the watershed on dist kept the clicked one
    # without the distance map the two touching particles come together
    both = ops.grow_from_maps(prob, None, (30, 19), occupied, max_radius=20, threshold=0.3)
    assert iou(both, truth > 0) > 0.85
    # a pixel labelled already is never taken
    occupied[30, 15:25] = True
    assert not ops.grow_from_maps(prob, dist, (28, 19), occupied, max_radius=16)[occupied].any()
    with pytest.raises(ValueError, match="no particle at the click"):
        ops.grow_from_maps(prob, dist, (5, 5), np.zeros_like(occupied), max_radius=16)
    # the automatic level sits halfway between the local background and the click: a hazy
    # background (0.35 everywhere) does not leak in, and a faint particle is still found
    hazy = np.where(truth == 1, 0.9, np.where(truth == 2, 0.5, 0.35)).astype(np.float32)
    free = np.zeros_like(occupied)
    assert iou(ops.grow_from_maps(hazy, None, (30, 19), free, max_radius=16), truth == 1) > 0.9
    faint = ops.grow_from_maps(hazy, dist, (30, 36), free, max_radius=16)  # dist: not its
    assert iou(faint, truth == 2) > 0.9  # bright neighbour, although both are above the level
    with pytest.raises(ValueError, match="size limit"):  # a fixed level below the haze
        ops.grow_from_maps(hazy, None, (30, 19), free, max_radius=16, threshold=0.3)


@pytest.mark.parametrize("dark", [True, False])
def test_grow_from_image_follows_the_intensity(dark):
    img, truth = disc_image((64, 64), centres=((24, 24),), radius=8, seed=3, dark=dark)
    region = ops.grow_from_image(img, (25, 23), np.zeros(img.shape, bool), max_radius=16)
    assert iou(region, truth == 1) > 0.8
    with pytest.raises(ValueError, match="size limit"):  # a click on the background
        ops.grow_from_image(img, (55, 55), np.zeros(img.shape, bool), max_radius=6)


def test_add_particle_takes_free_pixels_only():
    labels = discs()
    region = np.zeros((20, 20), bool)
    region[5:15, 5:15] = True
    box = (slice(30, 50), slice(30, 50))  # overlaps particle 2
    edit = ops.add_particle(labels, region, box, confidence=0.4)
    out = labels.copy()
    edit.apply(out)
    assert edit.labels == [3] and edit.confidence == {3: 0.4}
    assert np.array_equal(out == 2, labels == 2)  # particle 2 untouched
    assert (out == 3).sum() == (region & (labels[box] == 0)).sum()


def test_refreshed_features_equal_a_full_measurement():
    labels = discs(specs=(((20, 20), 7), ((44, 40), 7), ((14, 50), 5)))
    features = particle_table(labels, (0.5, 0.5), "nm")
    features["confidence"] = [0.9, 0.2, 0.6]
    # split particle 1, then delete particle 3: every row must equal a full re-measurement
    plane = labels.copy()
    for edit in (
        ops.split_particle(plane, 1, [(20, 16), (20, 24)]),
        ops.delete_particle(plane, 3),
    ):
        edit.apply(plane)
        features = ops.refresh_features(features, plane, edit, (0.5, 0.5), "nm")
    full = particle_table(plane, (0.5, 0.5), "nm")
    assert list(features["label"]) == list(full["label"]) == [1, 2, 4]
    for col in full.columns:
        np.testing.assert_allclose(features[col], full[col], err_msg=col)
    np.testing.assert_allclose(features["confidence"], [np.nan, 0.2, np.nan])  # edited: unknown


def test_next_low_confidence_goes_up_from_the_lowest():
    import pandas as pd

    f = pd.DataFrame({"label": [1, 2, 3, 4], "confidence": [0.8, 0.1, np.nan, 0.5]})
    assert ops.low_confidence_order(f) == [(2, 0.1), (4, 0.5), (1, 0.8)]
    assert ops.next_low_confidence(f) == (2, 0.1)
    assert ops.next_low_confidence(f, (0.1, 2)) == (4, 0.5)
    assert ops.next_low_confidence(f, (0.8, 1)) is None
    assert ops.low_confidence_order(f.drop(columns=["confidence"])) == []
    # particles cut by the image border can be skipped
    labels = discs(specs=(((20, 20), 7), ((44, 40), 7), ((3, 50), 5), ((60, 10), 6)))
    assert ops.border_labels(labels) == {3, 4}
    assert ops.border_labels(np.stack([labels, np.zeros_like(labels)])) == {3, 4}
    assert ops.next_low_confidence(f, skip={2}) == (4, 0.5)


# --------------------------------------------------------------------------- the dock


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture
def segmented(make_napari_viewer, qtbot, tiny_model):
    """A viewer with the disc scene segmented by the Segment dock, and the Proofread dock."""
    pytest.importorskip("napari")
    from napari_sagegan.napari._qt.proofread import ProofreadWidget
    from napari_sagegan.napari._qt.segment import SegmentWidget

    viewer = make_napari_viewer()
    img, truth = disc_scene()
    viewer.add_image(img, name="discs")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    assert seg.load_model(str(tiny_model))
    seg.device_combo.setCurrentText("cpu")
    seg.tile_spin.setValue(64)
    assert seg.run() is not None
    qtbot.waitUntil(lambda: not seg.is_running, timeout=60_000)
    layer = viewer.layers["discs labels"]
    viewer.layers.selection.active = layer
    widget = ProofreadWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Proofread particles")
    widget.device_combo.setCurrentText("cpu")
    return viewer, widget, layer, truth


def _centre(truth, i):
    return tuple(float(v) for v in ndi.center_of_mass(truth == i))


@pytest.mark.gui
def test_dock_deletes_merges_splits_and_undoes(segmented):
    from napari_sagegan.napari.layers import is_edited

    viewer, widget, layer, truth = segmented
    assert "confidence" in layer.features and len(layer.features) == 8
    assert is_edited(layer) is False
    original = layer.data.copy()

    # delete, through a click in Delete mode (the layer's mouse callback)
    widget.set_mode("delete")
    assert widget._on_mouse in layer.mouse_drag_callbacks and layer.mode == "pan_zoom"
    p = _centre(truth, 1)
    gone = int(layer.data[int(p[0]), int(p[1])])
    event = type("Event", (), {"type": "mouse_press", "button": 1, "position": p})()
    widget._on_mouse(layer, event)
    assert gone not in layer.data and len(layer.features) == 7
    assert gone not in set(layer.features["label"])
    assert is_edited(layer) is True  # Correct and retrain will pick it up

    # particles 2 and 3 of the scene are far apart: the dock refuses and changes nothing
    before = layer.data.copy()
    assert widget.merge_at(_centre(truth, 2), _centre(truth, 3)) is None
    assert np.array_equal(layer.data, before) and "do not touch" in widget.status.text()

    # split particle 4 between two points; then undo twice gives the segmentation back
    q = _centre(truth, 4)
    label = int(layer.data[int(q[0]), int(q[1])])
    edit = widget.split_at((q[0], q[1] - 4), (q[0], q[1] + 4))
    assert edit is not None and len(edit.labels) == 2
    assert set(edit.labels) <= set(layer.features["label"]) and label in edit.labels
    assert len(layer.features) == 8
    widget.undo()
    assert len(layer.features) == 7 and label in set(layer.features["label"])
    widget.undo()
    assert np.array_equal(layer.data, original) and len(layer.features) == 8
    assert is_edited(layer) is False  # back to what Segment made


@pytest.mark.gui
def test_dock_merges_touching_particles_by_two_clicks(make_napari_viewer):
    from napari_sagegan.napari._qt.proofread import ProofreadWidget

    viewer = make_napari_viewer()
    labels = discs(specs=(((30, 22), 8), ((30, 37), 8)))
    layer = viewer.add_labels(labels, name="pair labels", features=particle_table(labels))
    widget = ProofreadWidget(viewer)
    viewer.layers.selection.active = layer
    widget.set_mode("merge")
    assert widget.click((30.0, 20.0)) is None and "Particle 1 chosen" in widget.status.text()
    edit = widget.click((30.0, 40.0))
    assert edit is not None and set(np.unique(layer.data)) == {0, 1}
    assert list(layer.features["label"]) == [1]
    assert layer.features["area_px"].iloc[0] == (labels > 0).sum()


@pytest.mark.gui
def test_dock_adds_a_missed_particle_from_the_network_and_from_the_image(segmented, qtbot):
    viewer, widget, layer, truth = segmented
    p = _centre(truth, 5)
    widget.delete_at(p)  # now it is "missed"
    n = len(layer.features)
    # from the network's maps, in a worker
    worker = widget.add_at(p)
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running and len(layer.features) == n + 1, timeout=60_000)
    new = int(layer.data[int(p[0]), int(p[1])])
    assert new > 0 and iou(layer.data == new, truth == 5) > 0.7
    row = layer.features[layer.features["label"] == new].iloc[0]
    assert 0.0 <= row["confidence"] <= 1.0  # scored by the network
    # from the image intensity, at once
    widget.undo()
    assert int(layer.data[int(p[0]), int(p[1])]) == 0
    widget.grow_combo.setCurrentText("image intensity")
    edit = widget.add_at(p)
    assert edit is not None
    new = int(layer.data[int(p[0]), int(p[1])])
    assert iou(layer.data == new, truth == 5) > 0.7
    assert np.isnan(layer.features.set_index("label").loc[new, "confidence"])


@pytest.mark.gui
def test_next_low_confidence_visits_the_lowest_first(segmented):
    viewer, widget, layer, truth = segmented
    order = layer.features.sort_values(["confidence", "label"])
    expected = list(order["label"])
    first = widget.next_low_confidence()
    assert first == expected[0] and layer.selected_label == first
    row = order.iloc[0]
    np.testing.assert_allclose(
        viewer.camera.center[-2:], (row["centroid_y_px"], row["centroid_x_px"]), atol=1e-6
    )
    assert widget.next_low_confidence() == expected[1]
    assert "2 of 8" in widget.status.text()
    for _ in range(6):
        widget.next_low_confidence()
    assert widget.next_low_confidence() == expected[0]  # from the lowest again
    assert "lowest again" in widget.status.text()


@pytest.mark.gui
def test_dock_edits_the_slice_of_a_stack(make_napari_viewer):
    from napari_sagegan.napari._qt.proofread import ProofreadWidget

    viewer = make_napari_viewer()
    plane = discs()
    stack = np.stack([plane, np.where(plane > 0, plane + 2, 0)]).astype(np.int32)
    layer = viewer.add_labels(stack.copy(), name="stack labels", features=particle_table(stack))
    widget = ProofreadWidget(viewer)
    viewer.layers.selection.active = layer
    edit = widget.delete_at((1.0, 20.0, 20.0))
    assert edit is not None
    assert np.array_equal(layer.data[0], stack[0])  # the other slice is untouched
    assert 3 not in layer.data and 4 in layer.data[1]
    assert list(layer.features["label"]) == [1, 2, 4] and list(layer.features["slice"]) == [0, 0, 1]
    new = widget.split_at((0.0, 44.0, 36.0), (0.0, 44.0, 44.0))
    assert new is not None and new.labels == [2, 5]  # a new label unique in the whole stack
    assert set(np.unique(layer.data[0])) == {0, 1, 2, 5}
