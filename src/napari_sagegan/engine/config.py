"""Frozen configuration dataclasses: architecture, training and inference.

Each config converts to and from a plain dict of primitives (``to_dict`` / ``from_dict``) so
that it can be stored inside a checkpoint and loaded with ``torch.load(weights_only=True)``.
``from_dict`` rejects unknown keys with a ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C", bound="_Config")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} expects a dict, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key {unknown[0]!r}; known keys: {', '.join(sorted(names))}"
            )
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ArchConfig(_Config):
    """Architecture of the Attention U-Net segmenter.

    Attributes
    ----------
    in_channels : int
        Input channels (1: grayscale EM).
    base_channels : int
        Channels of the first encoder level; level ``i`` has ``base * 2**i``.
    depth : int
        Number of pooling steps (the paper uses 4: bottleneck ``16 * base``).
    dropout : float
        Dropout between the two convolutions of each decoder level (paper: 0.5).
    n_classes : int
        Segmentation classes (background, particle).
    dist_head : bool
        Add the boundary-aware output: one channel regressing the per-instance normalised
        distance to the particle's edge (1 at each particle's centre, 0 at its boundary and
        on the background). It seeds the split of touching particles.
    """

    in_channels: int = 1
    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.5
    n_classes: int = 2
    dist_head: bool = True

    def __post_init__(self) -> None:
        if self.depth < 1 or self.depth > 6:
            raise ValueError(f"depth must be between 1 and 6, got {self.depth}")
        if self.base_channels < 2:
            raise ValueError(f"base_channels must be at least 2, got {self.base_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this (``2**depth``)."""
        return 2**self.depth

    @property
    def out_channels(self) -> int:
        return self.n_classes + (1 if self.dist_head else 0)


#: Named architectures. ``paper`` is the authors' 31.4 M-parameter network; ``default`` is
#: the laptop-CPU preset (see docs/benchmarks.md for how it was chosen); ``tiny`` is for tests.
PRESETS: dict[str, ArchConfig] = {
    "paper": ArchConfig(base_channels=64, depth=4),
    "default": ArchConfig(base_channels=16, depth=4),
    "tiny": ArchConfig(base_channels=4, depth=2),
}


def preset(name: str) -> ArchConfig:
    """Return the architecture preset called ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig(_Config):
    """How to train the segmenter (phase 1).

    Defaults follow the authors where they are sound (Adam, lr 1e-4, focal + Tversky with
    FP weight 0.3 / FN weight 0.7, augmentation with probability 0.5, model selection on
    validation instance F1 at IoU 0.5) and depart where their code has a defect (the focal
    term is per pixel; the plateau scheduler maximises the score it watches).
    """

    patch_size: int = 128  # network pixels (particles are target_diameter across)
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 500
    steps_per_epoch: int = 0  # 0: one pass over the training images' area in patches
    max_minutes: float | None = None
    loss: str = "focal_tversky"  # or "ce_dice"
    focal_alpha: float = 0.5
    focal_gamma: float = 2.0
    tversky_fp: float = 0.3
    tversky_fn: float = 0.7
    dist_weight: float = 1.0
    val_fraction: float = 0.2
    val_every: int = 1
    seed: int = 0
    fg_bias: float = 0.7  # probability that a patch is centred on a particle pixel
    augment_p: float = 0.5
    invert: bool = True  # polarity-inversion augmentation (dark <-> bright particles)
    min_instance_area: int = 15  # instances smaller than this (network pixels) are dropped
    plateau_patience: int = 10  # epochs without validation F1 gain before lr is halved
    num_threads: int = 0  # 0: leave torch's default
    # Scale: every training image is resampled so that its particles' median diameter comes
    # out at ``target_diameter`` pixels (the network scale, recorded in the checkpoint and
    # used again at inference); ``None`` trains at the images' own scale. Patches are then
    # zoomed by a random factor in [1/scale_jitter, scale_jitter] (log-uniform).
    target_diameter: float | None = 32.0
    scale_jitter: float = 1.5

    def __post_init__(self) -> None:
        if self.loss not in ("focal_tversky", "ce_dice"):
            raise ValueError(f"loss must be 'focal_tversky' or 'ce_dice', got {self.loss!r}")
        if self.patch_size < 16:
            raise ValueError(f"patch_size must be at least 16 pixels, got {self.patch_size}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.target_diameter is not None and not 4.0 <= self.target_diameter <= 256.0:
            raise ValueError(
                f"target_diameter is the particle diameter the network sees, in pixels, and "
                f"must be in [4, 256] (or None), got {self.target_diameter}"
            )
        if not 1.0 <= self.scale_jitter <= 4.0:
            raise ValueError(f"scale_jitter must be in [1, 4], got {self.scale_jitter}")


@dataclass(frozen=True)
class InferConfig(_Config):
    """How to segment an image (tiled inference + post-processing).

    Attributes
    ----------
    tile_size : int
        Side of the square tiles, pixels (rounded up to the network's divisor).
    overlap : float
        Fraction of a tile shared with its neighbour, in [0, 0.9).
    batch_size : int
        Tiles per forward pass.
    threshold : float
        Particle probability threshold.
    seed_threshold : float
        Normalised-distance threshold for the seeds that split touching particles.
    split : bool
        Split touching particles (boundary-aware watershed) or keep connected components.
    fill_holes : bool
        Fill holes inside particles.
    min_size : int
        Objects smaller than this many pixels are removed.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    diameter : float or None
        Typical particle diameter of the images, pixels, when the user knows it; ``None``
        estimates it per image. Only used with a model trained at a network scale
        (``TrainConfig.target_diameter``): the image is resampled so its particles come out
        at that size, and the maps and labels are mapped back to the image's grid.
    auto_scale : bool
        Estimate the diameter of each image when none is given (else use images as they are).
    refine_scale : bool
        After a first pass at the estimated scale, re-measure the diameter on the network's
        own segmentation and run again when it differs by more than 30 %. Off by default:
        on the EMPS hold-out it lowered F1 with the models trained so far
        (docs/benchmarks.md, "Particle scale and polarity per image").

    ``tile_size`` and ``min_size`` are in network pixels when the image is resampled.
    """

    tile_size: int = 512
    overlap: float = 0.25
    batch_size: int = 4
    threshold: float = 0.5
    seed_threshold: float = 0.5
    split: bool = True
    fill_holes: bool = True
    min_size: int = 15
    device: str = "auto"
    diameter: float | None = None
    auto_scale: bool = True
    refine_scale: bool = False

    def __post_init__(self) -> None:
        if self.tile_size < 16:
            raise ValueError(f"tile_size must be at least 16 pixels, got {self.tile_size}")
        if not 0.0 <= self.overlap < 0.9:
            raise ValueError(f"overlap must be in [0, 0.9), got {self.overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.diameter is not None and not (self.diameter >= 1.0):
            raise ValueError(
                f"diameter is the typical particle diameter in pixels and must be at least 1 "
                f"(or None to estimate it), got {self.diameter}"
            )
