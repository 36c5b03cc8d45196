"""Shared fixtures: tiny synthetic images with known particles."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def disc_image(shape=(64, 64), centres=((20, 20), (44, 40)), radius=7, seed=0, dark=True):
    """A noisy grayscale image with discs and its instance labels."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i, c in enumerate(centres, 1):
        rr, cc = disk(c, radius, shape=shape)
        labels[rr, cc] = i
    base = np.where(labels > 0, 60.0, 190.0) if dark else np.where(labels > 0, 190.0, 60.0)
    img = np.clip(base + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)
    return img, labels


@pytest.fixture
def tiny_arch():
    from napari_sagegan.engine.config import preset

    return preset("tiny")


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
