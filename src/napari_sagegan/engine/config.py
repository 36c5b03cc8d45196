"""Frozen configuration dataclasses: architecture, training (phase 1 and 2) and inference.

Each config converts to and from a plain dict of primitives (``to_dict`` / ``from_dict``) so
that it can be stored inside a checkpoint and loaded with ``torch.load(weights_only=True)``.
``from_dict`` rejects unknown keys with a ``ValueError`` naming the key. Configs compose:
:class:`GanConfig` holds the :class:`TrainConfig` of the segmenter it trains (field
``train``), so a training option is one field of :class:`TrainConfig` and reaches both
phases; a nested config is a nested dict in ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

C = TypeVar("C", bound="_Config")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of primitives (nested configs as nested dicts)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build the config from :meth:`to_dict`'s output.

        Raises
        ------
        ValueError
            ``values`` is not a dict, holds a key that is not a field (also inside a nested
            config: the message names the key), or a value out of range.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} expects a dict, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key {unknown[0]!r}; known keys: {', '.join(sorted(names))}"
            )
        values = dict(values)
        for name, sub in _nested_fields(cls).items():
            if isinstance(values.get(name), dict):
                try:
                    values[name] = sub.from_dict(values[name])
                except ValueError as err:
                    raise ValueError(f"{cls.__name__}.{name}: {err}") from None
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _nested_fields(cls: type) -> dict[str, type[_Config]]:
    """The fields of ``cls`` whose type is itself a config."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints.get(f.name), type) and issubclass(hints[f.name], _Config)
    }


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


#: Smallest and largest training patch side, pixels (a patch of ``MAX_PATCH`` with the
#: default batch of 8 already needs several GB for the activations).
MIN_PATCH, MAX_PATCH = 16, 1024


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
    # Tversky weights of false positives / false negatives. The authors' 0.3 / 0.7 leans to
    # recall and draws particles too wide at threshold 0.5 (+5 to +28 % in diameter); the
    # default weighs both alike (a soft Dice), and the calibration after training picks the
    # threshold that makes sizes unbiased for either. `--tversky-fp 0.3 --tversky-fn 0.7`
    # gives the authors' recipe.
    tversky_fp: float = 0.5
    tversky_fn: float = 0.5
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
    scale_jitter: float = 2.0  # x1/2 to x2: a size estimate off by 1.5x costs little
    # After training, choose the probability and seed thresholds on the validation images
    # so that particle sizes are unbiased and F1 is highest (engine/infer/calibrate.py);
    # they are stored in the checkpoint and used by `segment` unless overridden.
    calibrate: bool = True
    # Validation with few pairs (issue 14). "auto": with fewer than ``FEW_PAIRS`` pairs a
    # band of every image (``val_fraction`` of its area, at the network scale) is held out
    # and the rest of every image trains, so that every correction is learned from; with
    # more, whole images are held out. "parts" / "images" force either.
    holdout: str = "auto"
    # The learning-rate schedule: "plateau" (halve on a validation plateau), "cosine" (a
    # linear warm-up over ``warmup_fraction`` of the run, then a cosine decay to 0; the run's
    # length is its steps or its time budget, whichever ends it first) or "constant".
    schedule: str = "plateau"
    warmup_fraction: float = 0.0
    # Fraction of the run (at its start) during which the encoder's weights stay fixed.
    freeze_encoder: float = 0.0
    # Rehearsal: generated pairs (engine/synthetic/render.make_training_set) mixed into the
    # training pairs, so that a fine-tune does not forget other sizes and contrasts.
    rehearsal: int = 0
    # "auto": a fine-tune (from an existing model) on at most ``FEW_SHOT_MAX`` pairs uses the
    # few-shot recipe (api.train.few_shot_recipe); "few-shot" always; "none" never.
    recipe: str = "auto"
    # WiSE-FT (Wortsman et al., 2022): after a fine-tune, the weights ``blend`` of the way
    # from the starting model to the fine-tuned one, their batch-norm statistics measured
    # again on training patches and their thresholds re-calibrated on the validation parts,
    # are one more candidate of the never-worse choice; 0 leaves them out. In the few-shot episodes of
    # docs/benchmarks.md (bench_fewshot.py), kept always, they scored at least the
    # fine-tuned weights on 6 of 10 articles, with fewer losses to the starting model.
    blend: float = 0.5

    def __post_init__(self) -> None:
        if self.holdout not in ("auto", "parts", "images"):
            raise ValueError(f"holdout must be 'auto', 'parts' or 'images', got {self.holdout!r}")
        if self.schedule not in ("plateau", "cosine", "constant"):
            raise ValueError(
                f"schedule must be 'plateau', 'cosine' or 'constant', got {self.schedule!r}"
            )
        if self.recipe not in ("auto", "few-shot", "none"):
            raise ValueError(f"recipe must be 'auto', 'few-shot' or 'none', got {self.recipe!r}")
        for name in ("warmup_fraction", "freeze_encoder"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.blend) and 0.0 <= self.blend < 1.0):
            raise ValueError(
                f"blend must be in [0, 1) (0.5: halfway between the starting and the fine-tuned "
                f"weights; 0: no blend), got {self.blend}"
            )
        if not 0 <= self.rehearsal <= 1000:
            raise ValueError(f"rehearsal must be 0 to 1000 pairs, got {self.rehearsal}")
        if self.loss not in ("focal_tversky", "ce_dice"):
            raise ValueError(f"loss must be 'focal_tversky' or 'ce_dice', got {self.loss!r}")
        if not MIN_PATCH <= self.patch_size <= MAX_PATCH:
            raise ValueError(
                f"patch_size must be between {MIN_PATCH} and {MAX_PATCH} pixels (128-256 is "
                f"usual), got {self.patch_size}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(
                f"epochs must be at least 1, got {self.epochs} (limit the time with max_minutes)"
            )
        if self.steps_per_epoch < 0:
            raise ValueError(
                "steps_per_epoch must be a positive number of steps, or 0 for one pass over "
                f"the training images' area, got {self.steps_per_epoch}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(
                f"lr (the learning rate) must be a positive finite number such as 1e-4, got "
                f"{self.lr}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"weight_decay must be a finite number of 0 or more, got {self.weight_decay}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_minutes is not None and not (
            math.isfinite(self.max_minutes) and self.max_minutes > 0
        ):
            raise ValueError(
                f"max_minutes must be a positive number of minutes (or None for no time "
                f"limit), got {self.max_minutes}"
            )
        if self.val_every < 1:
            raise ValueError(f"val_every must be at least 1 epoch, got {self.val_every}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a whole number of 0 or more, got {self.seed}")
        if self.target_diameter is not None and not 4.0 <= self.target_diameter <= 256.0:
            raise ValueError(
                f"target_diameter is the particle diameter the network sees, in pixels, and "
                f"must be in [4, 256] (or None), got {self.target_diameter}"
            )
        if not 1.0 <= self.scale_jitter <= 4.0:
            raise ValueError(f"scale_jitter must be in [1, 4], got {self.scale_jitter}")


#: The overlap of neighbouring tiles, network pixels, by default: the context the network's
#: output depends on measurably. With 128 px the particle probability at a seam is within
#: 0.015-0.06 of one whole-image pass and the labels are the same (64 px: within 0.14-0.23);
#: ``benchmarks/bench_throughput.py --seams`` measures it (docs/benchmarks.md).
CONTEXT_PX = 128


#: Test-time views :attr:`InferConfig.tta` accepts: 1 (none), 2 (the tile and its
#: left-right mirror image), 4 (every mirror image), 8 (every symmetry of the square).
TTA_VIEWS = (1, 2, 4, 8)


@dataclass(frozen=True)
class InferConfig(_Config):
    """How to segment an image (tiled inference + post-processing).

    Attributes
    ----------
    tile_size : int
        Side of the square tile whose area bounds every tile, pixels (rounded up to the
        network's divisor): the tiles are rectangles of at most ``tile_size ** 2`` pixels,
        the memory of that square, shaped to the image (``tiling.balanced_grid``). Tiling is a
        property of the machine, not of the model: a checkpoint's stored tiling is ignored
        (:meth:`~napari_sagegan.engine.infer.segment.Segmenter.default_infer_config`).
        The default, 1024, is the largest side in float32; where the network computes in
        16 bits (``precision``) the default tiles are 1280 px, which take the same memory
        (:meth:`~napari_sagegan.engine.infer.segment.Segmenter.network_tile`).
    overlap : float or None
        Fraction of a tile shared with its neighbour, in [0, 0.9); ``None`` (default): the
        network's context, :data:`CONTEXT_PX` pixels whatever the tile (see
        :meth:`overlap_for`).
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

    scale_search : bool
        Find the particle size with the network (a ladder of scales scored by the network's
        self-consistency, :mod:`~napari_sagegan.engine.infer.autoscale`), the classical
        estimate being only a first guess; then segment the whole image at each distinct
        candidate (the answer, the next-best rungs, the classical estimate) and keep the
        answer unless the network is clearly more confident in another's particles
        (``segment.VOTE_MARGIN``), when the ladder's confidence is under ``vote_below`` and
        the network is not already sure of the answer's particles (``vote_stop``).
        Off: the classical estimate alone.
    exclude_annotations : bool
        Detect burned-in scale bars, their labels, panel letters and SEM data bars, and
        remove the particles they would give (:mod:`~napari_sagegan.engine.infer.annotations`).
    engine : str
        What runs the network: ``torch`` (PyTorch eager), ``onnxruntime`` or ``openvino``
        (the network exported to ONNX in memory, CPU only, optional extras ``onnx`` /
        ``openvino``), or ``auto`` (torch where ``precision`` makes it compute in bfloat16 or
        float16, faster than those engines in float32; else the first of those installed,
        else torch). A missing or
        failing engine falls back to torch with a warning
        (:mod:`~napari_sagegan.engine.infer.engines`).

    precision : str
        What the network's convolutions compute in (PyTorch engine): ``auto`` (float16 on a
        CUDA GPU; bfloat16 on a CPU that computes it natively, AVX512-BF16 or AMX; float32
        elsewhere), ``fp32``, ``bf16`` or ``fp16`` (CUDA only); see
        :func:`~napari_sagegan.engine.device.autocast_dtype`. The maps come out in float32
        either way; bfloat16's differ from float32's by a few thousandths of probability
        (docs/benchmarks.md, ``bench-precision``).
    scale_band : (float, float)
        The particle sizes the network is as accurate at as at its training scale, as
        fractions of it (the model's ``target_diameter``): an image whose particles already
        fall in the band is not resampled; any other is resampled to the band's low end, the
        cheapest accurate size. The default ``(1.0, 1.0)`` always resamples to the training
        scale: with the size given exactly the bundled model is as accurate at 0.75 of it
        (24 px) for 1.8x less computing (``benchmarks/bench_throughput.py --curve``), but
        with the size estimated ``(0.75, 1.0)`` lost 0.07-0.10 of F1@0.5 on generated 6-px
        and 60-px images (``bench_throughput.py --quick --band``, docs/benchmarks.md); a
        band is for users who give the size and accept that trade.
    vote_below : float
        With the size found by the network (``scale_search``): when the ladder's confidence
        is under this, the whole image is segmented at each distinct candidate size and the
        network's confidence in the particles decides (``segment.VOTE_MARGIN``); at or above
        it, the ladder's answer is used with one pass. 0: never vote (one pass per image);
        above 1: always. The default 0.7 was chosen in an exploratory run on 40 EMPS
        training images (script not in the repository) as most of always voting's gain for
        about a third fewer passes (``benchmarks/bench_vote.py`` compares it with always);
        with it the leave-source-out images reach a mean F1@0.5 of 0.742 with the size found (0.590 before the vote; ``benchmarks/bench_size.py``).
    vote_stop : float
        The vote's first pass is at the ladder's answer; when the network's mean confidence
        in its particles (:mod:`~napari_sagegan.engine.infer.confidence`) is at least this,
        the other sizes are not tried. Above 1: they always are. The default 0.6 comes from
        ``python benchmarks/bench_vote.py`` (section ``bench-vote`` of docs/benchmarks.md):
        on 40 EMPS training images, stopping at 0.5 or 0.6 loses no F1@0.5 against never
        stopping (0.701 vs 0.700 mean), 0.4 loses pooled F1, and 0.6 is the more cautious of
        the two; on the 45 leave-source-out images it keeps the mean F1@0.5 of never
        stopping (0.742) in 1.39x the time of no vote instead of 2.02x (0.5: 0.729).
    tta : int
        Test-time augmentation: the network's maps are averaged over this many views of
        each tile (:data:`TTA_VIEWS`: 1, none; 2, and its left-right mirror image; 4, every
        mirror image; 8, and their transposes), one network pass each. With the size found,
        the candidate sizes still vote by single passes and the winner is segmented again
        with the views. A runtime choice (a checkpoint's is ignored). 1 by default: in
        ``python benchmarks/bench_tta.py`` (section ``bench-tta``) 4 views raised the
        pooled F1@0.5 of the 45 leave-source-out images from 0.676 to 0.708 (mean over
        images 0.743 -> 0.747) in 1.21x the time, but lowered it on 40 images of the
        training articles (mean 0.730 -> 0.712), and a large image takes 2.5x (8 views:
        4.7x) as long.
    min_confidence : float
        Particles whose confidence (:mod:`~napari_sagegan.engine.infer.confidence`) is
        below this are left out of the labels, in [0, 1); 0 keeps every particle. A
        calibrated setting: :mod:`~napari_sagegan.engine.infer.calibrate` chooses it on
        labelled images after the thresholds and stores it in the checkpoint. The bundled
        model's 0.45 was chosen on the particles the whole pipeline finds (size found) on its
        selection set (16 images of training articles plus 8 generated pairs; its threshold
        went from 0.4 to 0.45 in the same calibration); on the 45 leave-source-out images
        the two raised F1@0.5 from 0.742 to 0.785 (mean over images; pooled 0.668 -> 0.763)
        with Dice unchanged (0.849 / 0.848), and on the generated 6-300 px images left it
        where it was (0.932 -> 0.931), in ``python benchmarks/bench_size.py``
        (docs/benchmarks.md, section ``size``).

    ``tile_size`` and ``min_size`` are in network pixels when the image is resampled.
    """

    tile_size: int = 1024
    overlap: float | None = None
    batch_size: int = 1
    threshold: float = 0.5
    seed_threshold: float = 0.5
    split: bool = True
    fill_holes: bool = True
    min_size: int = 15
    device: str = "auto"
    diameter: float | None = None
    auto_scale: bool = True
    refine_scale: bool = False
    scale_search: bool = True
    exclude_annotations: bool = True
    engine: str = "torch"
    scale_band: tuple[float, float] = (1.0, 1.0)
    precision: str = "auto"
    vote_below: float = 0.7
    vote_stop: float = 0.6
    tta: int = 1
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.min_confidence)) and 0.0 <= self.min_confidence < 1.0):
            raise ValueError(
                "min_confidence is the particle confidence under which a particle is left out, "
                f"in [0, 1) (0: keep every particle), got {self.min_confidence!r}"
            )
        if not 0.0 <= float(self.vote_below):
            raise ValueError(
                "vote_below is the scale ladder's confidence under which full passes at the "
                f"candidate sizes vote, in [0, 1] (0: never, above 1: always), got {self.vote_below}"
            )
        if self.tta not in TTA_VIEWS:
            raise ValueError(
                f"tta is the number of views of each tile the network's maps are averaged "
                f"over: one of {', '.join(map(str, TTA_VIEWS))} (1: none), got {self.tta!r}"
            )
        if not 0.0 <= float(self.vote_stop):
            raise ValueError(
                "vote_stop is the particle confidence of the first pass at which the vote "
                f"stops, >= 0 (above 1: never), got {self.vote_stop!r}"
            )
        if self.tile_size < 16:
            raise ValueError(f"tile_size must be at least 16 pixels, got {self.tile_size}")
        if self.overlap is not None and not 0.0 <= self.overlap < 0.9:
            raise ValueError(f"overlap must be in [0, 0.9) or None, got {self.overlap}")
        band = self.scale_band
        if (
            not isinstance(band, (tuple, list))
            or len(band) != 2
            or not 0.0 < float(band[0]) <= float(band[1])
        ):
            raise ValueError(
                "scale_band is (low, high) with 0 < low <= high, fractions of the network's "
                f"particle size, got {band!r}"
            )
        object.__setattr__(self, "scale_band", (float(band[0]), float(band[1])))
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.engine not in ("auto", "torch", "onnxruntime", "openvino"):
            raise ValueError(
                f"engine must be auto, torch, onnxruntime or openvino, got {self.engine!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.diameter is not None and not (self.diameter >= 1.0):
            raise ValueError(
                f"diameter is the typical particle diameter in pixels and must be at least 1 "
                f"(or None to estimate it), got {self.diameter}"
            )

    def overlap_for(self, tile: int) -> float:
        """The overlap fraction of tiles ``tile`` pixels wide: :attr:`overlap` when set, else
        :data:`CONTEXT_PX` pixels of it (at most half a tile)."""
        if self.overlap is not None:
            return float(self.overlap)
        return min(0.5, CONTEXT_PX / max(int(tile), 1))


#: The offline perceptual terms phase 2 knows.
PERCEPTUAL = ("ssim", "none")


def _gan_train_defaults() -> TrainConfig:
    return TrainConfig(patch_size=256, batch_size=2, epochs=200)


@dataclass(frozen=True)
class GanConfig(_Config):
    """How to train phase 2 (segmenter + generator in a CycleGAN).

    The segmenter's training options (patch size, batch size, lr, epochs, budget, seed,
    segmentation loss and its parameters, weight decay, sampling, validation) are the
    :class:`TrainConfig` in ``train``; the fields here are phase 2's own. Defaults are the
    authors' (SAGE-GAN weights, freeze 30 epochs, mix ratio +0.005 per epoch up to 0.6,
    selection after epoch 39, Adam lr 1e-4, 256 px patches, batches of 2, 200 epochs). An
    "epoch" is ``train.steps_per_epoch`` iterations (0: one pass over the training images'
    area). Short CPU runs should shorten the schedule with it: see :meth:`short`.

    Attributes
    ----------
    train : TrainConfig
        The segmenter's training options (``loss``, ``focal_*``, ``tversky_*``,
        ``dist_weight`` define ``L_seg``; ``weight_decay`` applies to the segmenter's
        parameters; ``target_diameter`` is replaced by the phase-1 model's network scale).
        Phase 2 draws its real pairs with geometric augmentation only and no zoom jitter, so
        ``invert`` and ``scale_jitter`` are recorded in the segmenter's checkpoint but not
        applied; its lr has no plateau schedule.
    beta1, beta2 : float
        Adam betas of all optimisers.
    w_rec_mask, w_id_mask, w_p, w_rec_l1, w_id_l1, w_adv_img, w_adv_mask : float
        Loss weights (SAGE-GAN: 200, 100, 100, 50, 25, 1, 1; cGAN-Seg: 100, 50, 100, ...).
    freeze_epochs : int
        Epochs during which G does not move.
    mix_start, mix_step, mix_max : float
        Probability of the synthetic-pair term: ``min(mix_max, mix_start + mix_step * (e-1))``
        in epoch ``e`` (1-based).
    select_after : int
        Epochs before a checkpoint may replace the best one.
    perceptual : {"ssim", "none"}
        Offline perceptual term ``P`` (multi-scale ``1 - SSIM``).
    style_mixing : float
        Probability of mixing two latents while training G.
    diffaug_p : float
        Probability of each DiffAugment operation.
    preview_every : int
        A ``preview`` event (a generated image) every this many steps (0: never).
    gen_base_channels, gen_depth, z_dim : int
        Generator architecture.
    disc_base_channels : int
        Discriminator width.
    disc_attention : bool
        Linear-attention block in the discriminators.
    """

    train: TrainConfig = field(default_factory=_gan_train_defaults)
    beta1: float = 0.5
    beta2: float = 0.999
    w_rec_mask: float = 200.0
    w_id_mask: float = 100.0
    w_p: float = 100.0
    w_rec_l1: float = 50.0
    w_id_l1: float = 25.0
    w_adv_img: float = 1.0
    w_adv_mask: float = 1.0
    freeze_epochs: int = 30
    mix_start: float = 0.0
    mix_step: float = 0.005
    mix_max: float = 0.6
    select_after: int = 39
    perceptual: str = "ssim"
    style_mixing: float = 0.9
    diffaug_p: float = 0.2
    preview_every: int = 20
    gen_base_channels: int = 16
    gen_depth: int = 4
    z_dim: int = 128
    disc_base_channels: int = 32
    disc_attention: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"GanConfig.train must be a TrainConfig, got {self.train!r}")
        if self.perceptual not in PERCEPTUAL:
            raise ValueError(f"perceptual must be one of {PERCEPTUAL}, got {self.perceptual!r}")
        if self.train.patch_size < 32:
            raise ValueError(f"patch_size must be at least 32 pixels, got {self.train.patch_size}")
        for name in ("mix_start", "mix_max", "style_mixing", "diffaug_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.train.augment_p <= 1.0:
            raise ValueError(f"augment_p must be in [0, 1], got {self.train.augment_p}")
        if self.mix_step < 0 or self.freeze_epochs < 0 or self.select_after < 0:
            raise ValueError("mix_step, freeze_epochs and select_after must not be negative")

    def replace(self, **changes: Any) -> GanConfig:
        """A copy with ``changes`` applied; a :class:`TrainConfig` field name (``epochs``,
        ``patch_size``, ``max_minutes``, ...) changes ``train``."""
        own, train = _route(changes)
        base = own.pop("train", self.train)
        if train:
            base = base.replace(**train)
        return dataclasses.replace(self, train=base, **own)

    @classmethod
    def short(cls, **changes: Any) -> GanConfig:
        """A schedule for minutes-long CPU runs: 20-step epochs, G frozen for 2 epochs, the
        mix ratio growing by 0.1 per epoch (to 0.6), selection from the first epoch, patches
        of 128 px. The loss weights stay the authors'. ``changes`` as in :meth:`replace`."""
        base: dict[str, Any] = dict(
            patch_size=128,
            steps_per_epoch=20,
            freeze_epochs=2,
            mix_step=0.1,
            select_after=0,
            preview_every=10,
        )
        base.update(changes)
        return cls().replace(**base)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GanConfig:
        """As :meth:`_Config.from_dict`; also reads the flat dicts of earlier versions (the
        ``gan_state.pt`` / ``generator.pt`` files of napari-sagegan <= 0.1), in which the
        segmenter's options sat beside phase 2's and the loss was called ``seg_loss``."""
        if isinstance(values, dict) and "train" not in values:
            values = dict(values)
            if "seg_loss" in values:
                values["loss"] = values.pop("seg_loss")
            own, train = _route(values)
            if train:
                own["train"] = _gan_train_defaults().replace(**train).to_dict()
            values = own
        return super().from_dict(values)

    def mix_ratio(self, epoch: int) -> float:
        """Probability of the synthetic-pair term in (1-based) ``epoch``."""
        return float(min(self.mix_max, self.mix_start + self.mix_step * max(epoch - 1, 0)))


def _route(changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``changes`` into GanConfig fields and TrainConfig fields (unknown names raise)."""
    gan = {f.name for f in dataclasses.fields(GanConfig)}
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    own, nested = {}, {}
    for key, value in changes.items():
        if key in gan:
            own[key] = value
        elif key in train:
            nested[key] = value
        else:
            known = ", ".join(sorted(gan | train))
            raise ValueError(f"unknown GanConfig key {key!r}; known keys: {known}")
    return own, nested
