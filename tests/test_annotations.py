"""Burned-in annotations: drawn on generated images, found, and never counted as particles."""

import shutil

import numpy as np
import pytest

from napari_sagegan.engine.infer.annotations import (
    exclude,
    find_annotations,
    parse_scale_label,
    scale_bar_pixel_size,
)
from napari_sagegan.engine.synthetic.annotations import burn_in
from napari_sagegan.engine.synthetic.render import make_sample

KINDS = ("tem_dispersed", "sem_agglomerate", "tem_hex", "sem_sparse", "haadf_square")


@pytest.mark.parametrize("seed", range(5))
def test_drawn_annotations_are_found_and_no_particle_is_lost(seed):
    img, lab = make_sample(KINDS[seed], shape=(256, 320), seed=seed)
    drawn, lab2, mask = burn_in(img, lab, np.random.default_rng(seed))
    assert mask.any() and not (lab2[mask] > 0).any()  # annotations are background
    found = find_annotations(drawn)
    # (a dark panel on a dark substrate is invisible, to the detector as to a reader)
    assert (found.mask & mask).sum() >= 0.75 * mask.sum()
    assert (found.mask & (lab2 > 0)).sum() <= 0.01 * (lab2 > 0).sum()
    kinds = {a.kind for a in found.items}
    assert {"scalebar", "databar", "letter"} <= kinds
    # nothing is found on the same image without annotations
    assert not find_annotations(img).items


def test_a_scale_bar_is_measured_and_its_label_parsed():
    img, lab = make_sample("tem_dispersed", shape=(200, 300), seed=1)
    img = img.copy()
    img[170:176, 200:280] = 0  # an 80-px dark bar, 6 px thick, in the bottom right corner
    found = find_annotations(img)
    bars = found.scale_bars
    assert len(bars) == 1 and bars[0].length_px == 80.0
    assert bars[0].bbox == (170, 200, 176, 280)
    reading = scale_bar_pixel_size(img, found)
    assert reading is not None and reading.length_px == 80.0
    if reading.text is None:
        assert reading.pixel_size_nm is None  # no label read: nothing is proposed
    # labels of every common form
    assert parse_scale_label("100 nm") == 100.0
    assert parse_scale_label(" 2 µm") == 2000.0
    assert parse_scale_label("0.5um") == 500.0
    assert parse_scale_label("50nm ") == 50.0
    assert parse_scale_label("5 Å") == pytest.approx(0.5)
    assert parse_scale_label("scale") is None and parse_scale_label("0 nm") is None


def test_particles_on_annotations_are_removed_and_the_rest_kept():
    lab = np.zeros((100, 100), np.int32)
    lab[10:20, 10:20] = 1  # a particle
    lab[80:86, 40:90] = 2  # what a network might make of a scale bar
    img = np.full((100, 100), 120, np.uint8)
    img[10:20, 10:20] = 60
    img[80:86, 40:90] = 255
    found = find_annotations(img)
    gone = exclude(lab, found)
    assert gone == [2] and set(np.unique(lab)) == {0, 1}


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="Tesseract OCR not installed")
def test_ocr_reads_a_drawn_scale_bar_label():
    from napari_sagegan.engine.synthetic.annotations import _text_mask

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(90, 6, (240, 320)), 0, 200).astype(np.uint8)
    img[200:206, 200:300] = 255
    text = _text_mask("100 nm", 20)
    th, tw = text.shape
    img[195 - th : 195, 210 : 210 + tw][text] = 255
    reading = scale_bar_pixel_size(img)
    assert reading is not None and reading.length_nm == 100.0
    assert reading.pixel_size_nm == pytest.approx(1.0)
