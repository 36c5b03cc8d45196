"""npe2 sample data: synthetic EM images with their exact labels (generated, no download).

Each sample is an image layer plus its ground truth as a hidden Labels layer named
``"<image> ground truth"``. The ground truth is linked to its image, so the "Correct and
retrain" widget lists it (unticked) as a ready-made training pair.
"""

from __future__ import annotations

from typing import Any

from napari_sagegan.napari.layers import META_KEY

#: Side of the 2-D samples, pixels.
SIZE = 512

LayerData = list[tuple[Any, dict, str]]


def _layers(title: str, image: Any, labels: Any) -> LayerData:
    return [
        (image, {"name": title}, "image"),
        (
            labels,
            {
                "name": f"{title} ground truth",
                "visible": False,
                "opacity": 0.5,
                "metadata": {META_KEY: {"image": title, "ground_truth": True}},
            },
            "labels",
        ),
    ]


def _sample(kind: str, title: str) -> LayerData:
    from napari_sagegan.engine.synthetic.render import make_sample

    image, labels = make_sample(kind, shape=(SIZE, SIZE), seed=0)
    return _layers(title, image, labels)


def tem_hexagonal() -> LayerData:
    """Bright-field TEM: a close-packed hexagonal monolayer (10-14 px particles)."""
    return _sample("tem_hex", "TEM hex monolayer")


def tem_dispersed() -> LayerData:
    """Bright-field TEM: dispersed particles, some touching (14-22 px)."""
    return _sample("tem_dispersed", "TEM dispersed")


def sem_agglomerate() -> LayerData:
    """SEM: bright agglomerated particles (~25 px)."""
    return _sample("sem_agglomerate", "SEM agglomerate")


def haadf_square() -> LayerData:
    """HAADF-STEM: a square superlattice (10-16 px particles)."""
    return _sample("haadf_square", "HAADF superlattice")


def tem_tilt_series() -> LayerData:
    """A 3-D (Z, Y, X) TEM tilt series (7 slices, -60 to +60 degrees) of dispersed particles."""
    from napari_sagegan.engine.synthetic.render import make_stack

    stack, labels = make_stack("tem_dispersed", n_slices=7, shape=(384, 384), seed=0)
    return _layers("TEM tilt series", stack, labels)
