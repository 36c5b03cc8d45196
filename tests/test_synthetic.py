"""Tests of the procedural EM nanoparticle generator (engine/synthetic.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import label as connected_components
from skimage.measure import regionprops

from napari_sagegan.engine.synthetic import render as syn


def _touching_ids(labels: np.ndarray) -> set[int]:
    """Ids of particles that share a 4-connected edge with another particle."""
    touching: set[int] = set()
    for a, b in (
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
    ):
        m = (a > 0) & (b > 0) & (a != b)
        touching.update(a[m].tolist())
        touching.update(b[m].tolist())
    return touching


def _interior_props(labels: np.ndarray):
    """regionprops of particles not cut by the image border."""
    h, w = labels.shape
    return [
        p
        for p in regionprops(labels)
        if p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < h and p.bbox[3] < w
    ]


def _far_background(labels: np.ndarray, distance: int = 3) -> np.ndarray:
    return ~ndi.binary_dilation(labels > 0, iterations=distance)


# -------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("kind", syn.SAMPLE_KINDS)
def test_make_sample_is_deterministic_by_seed(kind):
    img_a, lab_a = syn.make_sample(kind, shape=(96, 96), seed=4)
    img_b, lab_b = syn.make_sample(kind, shape=(96, 96), seed=4)
    img_c, lab_c = syn.make_sample(kind, shape=(96, 96), seed=5)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(lab_a, lab_b)
    assert not np.array_equal(img_a, img_c)
    assert not np.array_equal(lab_a, lab_c)


def test_render_seed_changes_only_the_image():
    labels = syn.make_layout((64, 64), layout="dispersed", diameter=10, seed=1)
    a = syn.render_em(labels, seed=0)
    np.testing.assert_array_equal(a, syn.render_em(labels, seed=0))
    assert not np.array_equal(a, syn.render_em(labels, seed=1))


# -------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("layout", syn.LAYOUTS)
def test_layout_labels_are_int32_consecutive_and_connected(layout):
    labels = syn.make_layout((128, 128), layout=layout, diameter=12, seed=3)
    assert labels.dtype == np.int32
    assert labels.shape == (128, 128)
    ids = np.unique(labels)
    assert ids[0] == 0
    assert ids.size > 1
    np.testing.assert_array_equal(ids, np.arange(ids.size))
    # no particle is cut in pieces by a neighbour drawn later
    for p in regionprops(labels):
        assert connected_components(p.image, connectivity=2).max() == 1, p.label


@pytest.mark.parametrize("diameter", [8.0, 14.0])
def test_hex_layout_size_spacing_and_contacts(diameter):
    labels = syn.make_layout((192, 192), layout="hex", diameter=diameter, seed=2)
    props = _interior_props(labels)
    assert len(props) > 30
    eq = np.median([p.equivalent_diameter_area for p in props])
    assert abs(eq - diameter) <= 0.15 * diameter

    centroids = np.array([p.centroid for p in regionprops(labels)])
    nn = cKDTree(centroids).query(centroids, k=2)[0][:, 1]
    spacing = syn.LATTICE_SPACING * diameter
    assert abs(np.median(nn) - spacing) <= 0.15 * spacing

    touching = _touching_ids(labels)
    assert len(touching) / labels.max() > 0.6


def test_hex_grain_boundaries_mix_orientations():
    def hexatic_order(labels, diameter):
        c = np.array([p.centroid for p in regionprops(labels)])
        pairs = cKDTree(c).query_pairs(1.3 * syn.LATTICE_SPACING * diameter, output_type="ndarray")
        bond = c[pairs[:, 1]] - c[pairs[:, 0]]
        return abs(np.mean(np.exp(6j * np.arctan2(bond[:, 0], bond[:, 1]))))

    kw = dict(layout="hex", diameter=10, jitter=0.03)
    for seed in range(3):
        single = syn.make_layout((128, 128), grain_boundaries=False, seed=seed, **kw)
        grains = syn.make_layout((128, 128), grain_boundaries=True, seed=seed, **kw)
        assert hexatic_order(single, 10) > 0.8
        assert hexatic_order(grains, 10) < 0.7


def test_vacancies_remove_lattice_sites():
    kw = dict(layout="square", diameter=10, grain_boundaries=False, seed=0)
    full = syn.make_layout((128, 128), vacancy=0.0, **kw).max()
    holed = syn.make_layout((128, 128), vacancy=0.3, **kw).max()
    assert 0.55 * full < holed < 0.85 * full


@pytest.mark.parametrize("layout", ["dispersed", "agglomerate"])
@pytest.mark.parametrize("density", [0.1, 0.3])
def test_random_layouts_reach_the_area_fraction(layout, density):
    labels = syn.make_layout((128, 128), layout=layout, diameter=10, density=density, seed=0)
    assert abs((labels > 0).mean() - density) <= 0.2 * density


def test_agglomerates_touch_and_sparse_particles_do_not():
    agg = syn.make_layout((128, 128), layout="agglomerate", diameter=10, density=0.3, seed=0)
    sparse = syn.make_layout((128, 128), layout="sparse", diameter=10, seed=0)
    assert len(_touching_ids(agg)) / agg.max() > 0.7
    assert sparse.max() >= 3
    assert len(_touching_ids(sparse)) == 0
    assert (sparse > 0).mean() <= syn.SPARSE_MAX_DENSITY + 0.01


# -------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize(
    ("modality", "particles_dark"), [("tem", True), ("sem", False), ("haadf", False)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_render_polarity_and_contrast(modality, particles_dark, seed):
    labels = syn.make_layout((128, 128), layout="dispersed", diameter=14, seed=seed)
    img = syn.render_em(labels, modality=modality, seed=seed).astype(float)
    inside = img[labels > 0].mean()
    background = img[labels == 0].mean()
    noise_std = img[_far_background(labels)].std()
    if particles_dark:
        assert inside < background
    else:
        assert inside > background
    assert abs(inside - background) > 3.0 * noise_std


def test_tem_particles_are_darkest_at_their_centre():
    labels = syn.make_layout((128, 128), layout="sparse", diameter=24, seed=0)
    img = syn.render_em(labels, modality="tem", seed=0, noise=0.0).astype(float)
    dist = ndi.distance_transform_edt(labels > 0)
    centre = img[dist >= 8].mean()
    rim = img[(dist >= 1) & (dist <= 2)].mean()
    assert centre < rim


def test_tem_fresnel_fringe_is_brighter_than_far_background():
    labels = syn.make_layout((128, 128), layout="sparse", diameter=20, seed=1)
    img = syn.render_em(labels, modality="tem", seed=0, noise=0.0).astype(float)
    dout = ndi.distance_transform_edt(labels == 0)
    fringe = img[(dout >= 1) & (dout <= 2)].mean()
    far = img[(dout >= 6) & (dout <= 12)].mean()
    assert fringe > far


def test_sem_rims_are_brighter_than_centres():
    labels = syn.make_layout((128, 128), layout="sparse", diameter=30, seed=2)
    img = syn.render_em(labels, modality="sem", seed=0, noise=0.0).astype(float)
    dist = ndi.distance_transform_edt(labels > 0)
    assert img[(dist >= 2) & (dist <= 3)].mean() > img[dist >= 10].mean()


def test_noise_parameter_scales_the_noise():
    labels = syn.make_layout((128, 128), layout="sparse", diameter=16, seed=0)
    bg = _far_background(labels, 4)

    def residual_std(noise):
        img = syn.render_em(labels, modality="tem", seed=3, noise=noise).astype(float)
        return (img - ndi.gaussian_filter(img, 3))[bg].std()

    quiet, normal, loud = residual_std(0.0), residual_std(1.0), residual_std(2.0)
    assert quiet < normal < loud


@pytest.mark.parametrize("modality", syn.MODALITIES)
def test_dtype_is_honoured_and_range_used(modality):
    labels = syn.make_layout((96, 96), layout="dispersed", diameter=12, seed=0)
    img8 = syn.render_em(labels, modality=modality, dtype=np.uint8)
    img16 = syn.render_em(labels, modality=modality, dtype="uint16")
    assert img8.dtype == np.uint8
    assert img16.dtype == np.uint16
    assert int(img8.max()) - int(img8.min()) > 64
    assert int(img16.max()) > 255
    assert np.unique(img16).size > 256


def test_render_accepts_non_consecutive_ids():
    labels = syn.make_layout((64, 64), layout="dispersed", diameter=10, seed=0)
    sparse_ids = np.where(labels > 0, labels * 1000 + 7, 0).astype(np.int64)
    a = syn.render_em(labels, seed=0, noise=0.0).astype(float)
    b = syn.render_em(sparse_ids, seed=0, noise=0.0).astype(float)
    # same geometry, only the per-particle contrast factors differ
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


# -------------------------------------------------------------------------------- stacks
def test_tilt_stack_foreshortens_along_x():
    images, labels = syn.make_stack(
        "tem_dispersed", n_slices=3, shape=(128, 128), seed=1, series="tilt"
    )
    assert images.shape == labels.shape == (3, 128, 128)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])

    def widths(lab):
        return {
            p.label: (p.bbox[3] - p.bbox[1], p.bbox[2] - p.bbox[0]) for p in _interior_props(lab)
        }

    flat, tilted = widths(labels[1]), widths(labels[0])  # 0 deg and -60 deg
    common = sorted(set(flat) & set(tilted))
    assert len(common) >= 5
    ratio_x = np.median([tilted[i][0] / flat[i][0] for i in common])
    ratio_y = np.median([tilted[i][1] / flat[i][1] for i in common])
    assert 0.35 < ratio_x < 0.65  # cos(60 deg) = 0.5
    assert ratio_y == pytest.approx(1.0, abs=0.05)


def test_time_stack_keeps_ids_and_particles_grow():
    images, labels = syn.make_stack(
        "sem_agglomerate", n_slices=4, shape=(96, 96), seed=0, series="time"
    )
    assert images.shape == labels.shape == (4, 96, 96)
    for z in range(1, 4):
        assert not np.array_equal(images[z], images[0])
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # consecutive over the stack
    first, last = set(np.unique(labels[0])) - {0}, set(np.unique(labels[-1])) - {0}
    common = sorted(first & last)
    assert len(common) >= 0.7 * len(first)
    area0 = np.bincount(labels[0].ravel(), minlength=ids.size)[common]
    area3 = np.bincount(labels[-1].ravel(), minlength=ids.size)[common]
    assert np.median(area3 / np.maximum(area0, 1)) > 1.0


def test_stack_single_slice_and_bad_arguments():
    images, labels = syn.make_stack("haadf_square", n_slices=1, shape=(64, 64), seed=0)
    assert images.shape == labels.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="series"):
        syn.make_stack("tem_hex", shape=(64, 64), series="rotation")
    with pytest.raises(ValueError, match="n_slices"):
        syn.make_stack("tem_hex", shape=(64, 64), n_slices=0)


# -------------------------------------------------------------------------------- training set
def test_training_set_is_varied_and_reproducible():
    pairs = syn.make_training_set(8, shape=(96, 96), seed=3)
    assert len(pairs) == 8
    for image, labels in pairs:
        assert image.shape == labels.shape == (96, 96)
        assert image.dtype in (np.uint8, np.uint16)
        assert labels.dtype == np.int32
        assert labels.max() >= 1
    diameters = [
        np.median([p.equivalent_diameter_area for p in regionprops(lab)]) for _, lab in pairs
    ]
    assert max(diameters) / min(diameters) > 2.0
    # pair i depends only on (seed, i)
    again = syn.make_training_set(3, shape=(96, 96), seed=3)
    for (a_img, a_lab), (b_img, b_lab) in zip(pairs[:3], again):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
    assert syn.make_training_set(0, shape=(64, 64)) == []


def test_training_set_kinds_restrict_the_presets():
    pairs = syn.make_training_set(4, shape=(64, 64), seed=0, kinds=["sem_sparse"])
    for _, labels in pairs:
        assert len(_touching_ids(labels)) == 0  # sparse particles never touch
    with pytest.raises(ValueError, match="tem_hex"):
        syn.make_training_set(2, shape=(64, 64), kinds=["tem_grid"])


# -------------------------------------------------------------------------------- bad input
def test_unknown_names_raise_value_error_listing_choices():
    with pytest.raises(ValueError, match="sem_sparse"):
        syn.make_sample("tem_cubes")
    with pytest.raises(ValueError, match="agglomerate"):
        syn.make_layout((64, 64), layout="fcc")
    with pytest.raises(ValueError, match="haadf"):
        syn.render_em(np.zeros((32, 32), np.int32), modality="xray")
    with pytest.raises(ValueError, match="diameter"):
        syn.make_sample("tem_hex", shape=(64, 64), diamter=12)


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.zeros((32, 32), bool), {}, "skimage.measure.label"),
        (np.zeros((4, 32, 32), np.int32), {}, "2-D"),
        (np.full((32, 32), -1, np.int32), {}, ">= 0"),
        (np.zeros((32, 32), np.int32), {"dtype": np.float32}, "uint8 or uint16"),
        (np.zeros((32, 32), np.int32), {"noise": -1}, "noise"),
    ],
)
def test_render_rejects_bad_input(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.render_em(labels, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (4, 64)},
        {"shape": (64,)},
        {"diameter": 0.5},
        {"density": 0.0},
        {"density": 0.9},
        {"vacancy": 1.0},
        {"seed": -1},
    ],
)
def test_make_layout_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError):
        syn.make_layout(**{"shape": (64, 64), **kwargs})


def test_empty_layout_renders_a_plain_background():
    img = syn.render_em(np.zeros((48, 48), np.int32), modality="tem", seed=0)
    assert img.dtype == np.uint8
    assert img.std() < 0.2 * img.mean()
