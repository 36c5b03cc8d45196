"""Train: :func:`fine_tune` (phase 1), :func:`augment` (SAGE-GAN phase 2) and
:func:`generate` (synthetic pairs). See :mod:`napari_sagegan.api` for the map.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.util.files import new_file
from napari_sagegan.util.progress import Progress, relay

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- training


def _training_pairs(
    pairs: Sequence[Any],
    folder: Any,
    advice: str,
    channel: int | None = None,
    diameters: list | None = None,
    diameter: float | None = None,
) -> tuple[list, list]:
    """Pairs given (``Pair`` / objects with ``name, image, labels`` / 3-tuples) plus a
    folder's, checked, as 2-D (images, labels) lists: a stack gives one pair per slice.

    ``diameters``, when a list, receives each 2-D pair's particle diameter: the pair's own
    ``diameter`` attribute when it has one (the size its image was segmented with), else
    ``diameter`` (``None``: not known)."""
    from napari_sagegan.io.images import read_pairs

    items = [p if hasattr(p, "labels") else _AsPair(*p) for p in pairs]
    if folder is not None:
        folder = (folder, None) if isinstance(folder, (str, os.PathLike)) else tuple(folder)
        items += read_pairs(*folder, channel=channel)
    if not items:
        raise ValueError(f"no training pairs: {advice}")
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for p in items:
        im, lab = np.asarray(p.image), np.asarray(p.labels)
        if im.ndim not in (2, 3):
            raise ValueError(
                f"{p.name}: the image has shape {im.shape}; training needs 2-D images (Y, X) or "
                "3-D stacks (Z, Y, X)"
            )
        if im.shape != lab.shape:
            raise ValueError(
                f"{p.name}: the labels have shape {lab.shape} but the image has shape "
                f"{im.shape}; a mask must match its image pixel for pixel"
            )
        if np.issubdtype(im.dtype, np.inexact) and not np.isfinite(im).any():
            raise ValueError(
                f"{p.name}: the image holds no finite value (every pixel is NaN or infinite); "
                "remove it from the training set"
            )
        lab = lab.astype(np.int32, copy=False)
        images.extend([im] if im.ndim == 2 else list(im))
        labels.extend([lab] if lab.ndim == 2 else list(lab))
        if diameters is not None:
            own = getattr(p, "diameter", None)
            diameters.extend([own or diameter] * (1 if im.ndim == 2 else len(im)))
    return images, labels


@dataclass
class _AsPair:
    name: str
    image: Any
    labels: Any


def fit_patch_size(patch_size: int, images: Sequence[np.ndarray]) -> int:
    """``patch_size``, or the largest multiple of 16 (at least 32) that fits the smallest
    image when the patches would be larger than it."""
    smallest = min(min(np.shape(im)[-2:]) for im in images)
    if patch_size <= smallest:
        return int(patch_size)
    return max(32, int(smallest) // 16 * 16)


#: A fine-tune on at most this many pairs uses the few-shot recipe (``recipe="auto"``).
FEW_SHOT_MAX = 10


def few_shot_recipe(config: Any, n_pairs: int) -> Any:
    """The few-shot fine-tuning recipe (1-10 pairs, 1-5 CPU minutes), applied to ``config``.

    The one place it is decided, for every way of fine-tuning (corrected layers in the
    viewer, folders with ``sagegan train --init``, both mixed): a linear warm-up over the
    first 10 % of the run and a cosine decay of the learning rate to the end of the budget
    (its steps or its minutes), the user's augmentation (by default every augmentation
    with probability 0.5, plus the scale jitter), and rehearsal: 4 generated pairs of other sizes and contrasts
    get 20 % of the patches, so that the model does not forget them. With few pairs a band
    of each image is held out for validation (``holdout="auto"``). The learning rate,
    budget and patch size stay the user's. ``config.recipe == "none"`` leaves ``config`` as
    it is.

    Measured on the tests' toy shift (a dark-particle model, one corrected bright-particle
    image, 24 steps): freezing the encoder for the first 30 % of the run, or augmenting each
    patch with probability 0.8 (or 0.5), kept the model from adapting at all (validation F1
    0 -> 0), while this recipe without augmentation reached 1.0; so the recipe neither
    freezes nor raises the augmentation (``freeze_encoder`` and ``augment_p`` set them).
    """
    if config.recipe == "none" or (config.recipe == "auto" and n_pairs > FEW_SHOT_MAX):
        return config
    return config.replace(
        schedule="cosine",
        warmup_fraction=0.05,
        rehearsal=config.rehearsal or 4,
        recipe="few-shot",
    )


@dataclass
class Trained:
    """What :func:`fine_tune` produced: the engine's ``TrainResult``, the trainer (for the
    best model so far: ``trainer.best_checkpoint()``) and the file written, if any."""

    result: Any
    trainer: Any
    checkpoint: Path | None = None


def fine_tune(
    pairs: Sequence[Any] = (),
    *,
    folder: Any = None,
    init: Any = None,
    config: Any = None,
    arch: Any = None,
    resume: PathLike | None = None,
    out: PathLike | None = None,
    device: str = "auto",
    fit_patch: bool = False,
    overwrite: bool = False,
    advice: str = "give a folder of images and a folder of masks named like them",
    channel: int | None = None,
    diameter: float | None = None,
) -> Generator[Progress, None, Trained]:
    """Train a segmenter (phase 1), or fine-tune one, on (image, labels) pairs.

    Parameters
    ----------
    pairs : sequence
        In-memory pairs: :class:`~napari_sagegan.io.images.Pair` s, objects with ``name``,
        ``image`` and ``labels``, or ``(name, image, labels)`` tuples; 2-D or stacks.
    folder : path or (images_dir, masks_dir), optional
        Pairs read from disk (:func:`~napari_sagegan.io.images.read_pairs`).
    init : path, ``"default"`` or Checkpoint, optional
        Fine-tune from this segmenter (it keeps its own network scale).
    config : TrainConfig, optional
        Budget, learning rate, patch size, ...
    arch : ArchConfig or str, optional
        Architecture (or preset name) of a new model.
    resume : path, optional
        Continue a run from its checkpoint.
    out : path, optional
        Checkpoint file for the best model (written at every improvement, atomically). An
        existing file must be a segmenter checkpoint (else it is refused before training) and
        is replaced only by a model that scores better on the same validation images
        (``Trained.result.kept`` says when it was kept).
    fit_patch : bool
        Shrink patches larger than the smallest image to fit it (:func:`fit_patch_size`).
    overwrite : bool
        Replace an existing ``out`` whatever it holds and however the new model scores.
    advice : str
        Completes the error when there is no pair at all.
    channel : int, optional
        The channel of multi-channel images in ``folder`` (refused without it); see
        :func:`~napari_sagegan.io.images.read_image`.
    diameter : float, optional
        The typical particle diameter (pixels) of the pairs, when the user knows it: each
        pair is resampled to the network scale by it instead of by its labels' median
        diameter (which binary masks of touching particles overestimate). A pair with its
        own ``diameter`` attribute (the size the dock segmented its image with) keeps that.

    Yields
    ------
    Progress
        ``prepare`` twice (the second with ``data["trainer"]`` and ``data["device"]``), then
        the trainer's ``train`` / ``validate`` events.

    Notes
    -----
    A fine-tune (``init``) of at most :data:`FEW_SHOT_MAX` pairs uses
    :func:`few_shot_recipe` (unless ``config.recipe`` is ``"none"``), holds a band of each
    image out for validation when there are few pairs, scores the starting model on it
    first, re-calibrates the thresholds there, and keeps the starting model (possibly with
    re-calibrated thresholds) when the fine-tuned one does not beat it
    (``Trained.result.decision``).
    """
    from napari_sagegan.engine.config import TrainConfig, preset

    if out is not None:
        out = new_file(out, example="model.pt")
    yield Progress("prepare", 0, None, message="loading the model and the pairs")
    given: list = []
    images, labels = _training_pairs(pairs, folder, advice, channel, given, diameter)
    config = config or TrainConfig()
    if init is not None and resume is None:
        config = few_shot_recipe(config, len(images))
    if fit_patch:
        config = config.replace(patch_size=fit_patch_size(config.patch_size, images))
    from napari_sagegan.engine.train.segmenter import SegmenterTrainer

    trainer = SegmenterTrainer(
        images, labels, config, arch=preset(arch) if isinstance(arch, str) else arch,
        init=init, resume=resume, out=out, device=device, overwrite=overwrite,
        diameters=given if any(given) else None,
    )  # fmt: skip
    base_metrics = trainer.score_base()
    yield Progress(
        "prepare", 1, None,
        message=(
            f"training on {trainer.pairs.n_pairs} images; no part of them could be held out "
            "(too few or too large particles), so the models are compared on the training "
            "images themselves (a weak check)"
            if trainer.val_on_train
            else trainer.pairs.describe()
        )
        + (" (few-shot recipe)" if config.recipe == "few-shot" else "")
        + (
            f"; the starting model scores F1@0.5 {base_metrics['f1@0.5']:.3f}, Dice "
            f"{base_metrics['dice']:.3f} there (the fine-tuned model is kept only if it scores "
            "higher)"
            if base_metrics
            else ""
        )
        + f", device {trainer.device_name}, {trainer.steps_per_epoch} steps per epoch",
        data={"trainer": trainer, "device": trainer.device_name},
    )  # fmt: skip
    result = yield from relay(trainer.run())
    return Trained(result, trainer, result.checkpoint)


# --------------------------------------------------------------------------- phase 2


@dataclass
class Augmented:
    """What :func:`augment` produced: the engine's ``GanResult``, the trainer
    (``segmenter_checkpoint()``, ``generator_checkpoint()``), the pairs generated and the
    training masks at network scale (layouts for more pairs)."""

    result: Any
    trainer: Any
    pairs: list = field(default_factory=list)
    source_labels: list = field(default_factory=list)


def _write_pairs(folder: Path, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """``folder/images/synth_0001.tif`` (uint8) and ``folder/masks/synth_0001.tif``."""
    import tifffile

    from napari_sagegan.io.export import write_labels_tiff
    from napari_sagegan.util.files import atomic_path

    (folder / "images").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    for i, (image, labels) in enumerate(pairs, 1):
        name = f"synth_{i:04d}.tif"
        with atomic_path(folder / "images" / name) as tmp:
            tifffile.imwrite(tmp, image)
        write_labels_tiff(folder / "masks" / name, labels)


def _synthesize(gen: Any, masks: list, seed: int, device: str):
    from napari_sagegan.engine.synthetic.layouts import synthesize_pairs, to_uint8

    pairs = yield from synthesize_pairs(gen, masks, seed=seed, device=device)
    return [(to_uint8(img), lab) for img, lab in pairs]


def augment(
    pairs: Sequence[Any] = (),
    *,
    folder: Any = None,
    seg: Any = "default",
    init_generator: Any = "default",
    config: Any = None,
    n: int = 0,
    layout: str = "real",
    out: PathLike | None = None,
    device: str = "auto",
    fit_patch: bool = False,
    overwrite: bool = False,
    advice: str = "give a folder of images and a folder of masks named like them",
    channel: int | None = None,
) -> Generator[Progress, None, Augmented]:
    """SAGE-GAN phase 2: train the segmenter inside a CycleGAN with a mask -> image
    generator, then draw ``n`` synthetic pairs.

    Parameters
    ----------
    pairs, folder, fit_patch, advice, channel
        As :func:`fine_tune`.
    seg : path, ``"default"`` or Checkpoint
        The phase-1 segmenter to start from.
    init_generator : path, ``"default"``, Checkpoint or None
        The generator to start from: ``"default"`` (the default) is the bundled one,
        pre-trained on many micrographs, when this installation has one (else a random
        start, and the prepare message says so); ``None``: a random start.
    config : GanConfig, optional
        Budget, schedule and sizes (``GanConfig.short()`` for minutes-long CPU runs).
    n : int
        Synthetic pairs to draw after training, with masks of ``layout``.
    out : path, optional
        New or empty folder: ``segmenter.pt``, ``generator.pt``, ``images/`` and
        ``masks/`` (``synth_0001.tif``...), moved into place at the end.
    overwrite : bool
        Accept an ``out`` that is not empty: those four entries are replaced, all or nothing
        (a previous run's ``images/`` and ``masks/`` as whole folders); other files stay.
    """
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.config import GanConfig
    from napari_sagegan.util.files import new_folder, staged_folder

    if n < 0:
        raise ValueError(f"the number of synthetic pairs must be 0 or more, got {n}")
    if out is not None:
        out = new_folder(out)
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise ValueError(
                f"--out {out} is not empty; give a new or empty folder, or pass --overwrite to "
                "replace the segmenter.pt, generator.pt, images/ and masks/ in it"
            )
    yield Progress("prepare", 0, None, message="loading the segmenter and the pairs")
    images, labels = _training_pairs(pairs, folder, advice, channel)
    base = Checkpoint.load(seg, kind="segmenter")
    config = config or GanConfig.short()
    if fit_patch:
        config = config.replace(patch_size=fit_patch_size(config.train.patch_size, images))
    from napari_sagegan.engine.checkpoint import GENERATOR, has_bundled
    from napari_sagegan.engine.synthetic.layouts import make_masks
    from napari_sagegan.engine.train.gan import GanTrainer

    if isinstance(init_generator, str) and init_generator == "default":
        init_generator = "default" if has_bundled(GENERATOR) else None
    gen_init = Checkpoint.load(init_generator, kind=GENERATOR) if init_generator else None
    with staged_folder(out, prefix=".sagegan-augment-") if out else contextlib.nullcontext() as st:
        trainer = GanTrainer(
            images, labels, config, seg=base, out=st, device=device, init_generator=gen_init
        )
        start = (
            "a random generator"
            if gen_init is None
            else "the bundled generator"
            if init_generator == "default"
            else f"the generator {gen_init.source}"
        )
        yield Progress(
            "prepare", 1, None,
            message=f"phase 2 on {len(trainer.train_images)} images, validating on "
            f"{len(trainer.val_images)}, from {start}, device {trainer.device_name}",
            data={"trainer": trainer, "device": trainer.device_name},
        )  # fmt: skip
        result = yield from relay(trainer.run())
        synth: list = []
        if n:
            seed = config.train.seed
            masks = make_masks(trainer.train_labels, n, layout=layout, seed=seed)
            synth = yield from _synthesize(result.generator, masks, seed, device)
        if st is not None:
            (st / "gan_state.pt").unlink(missing_ok=True)
            if synth or (overwrite and any((out / d).is_dir() for d in ("images", "masks"))):
                _write_pairs(st, synth)  # (empty folders replace a previous run's pairs)
    return Augmented(result, trainer, synth, list(trainer.train_labels))


def generate(
    generator: Any,
    n: int,
    *,
    masks: Any = None,
    layout: str | None = None,
    size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    out: PathLike | None = None,
) -> Generator[Progress, None, list[tuple[np.ndarray, np.ndarray]]]:
    """``n`` synthetic pairs ``(uint8 image, int32 labels)`` from a trained generator.

    Parameters
    ----------
    generator : path or Checkpoint
        ``generator.pt`` written by :func:`augment` (or its checkpoint in memory).
    masks : path or sequence of arrays, optional
        Masks to draw layouts from (a folder, or label arrays); without them the generator's
        stored mask statistics are used.
    layout : str, optional
        ``real`` / ``paste`` (need masks), ``lattice`` / ``hex`` / ``square``; default
        ``real`` with masks, else ``lattice``.
    size : int, optional
        Side of statistics-drawn masks, pixels.
    out : path, optional
        New or empty folder for ``images/`` and ``masks/``.
    """
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.synthetic.layouts import LAYOUTS, make_masks
    from napari_sagegan.util.files import new_folder, staged_folder

    if n < 1:
        raise ValueError(f"the number of pairs must be at least 1, got {n}")
    if out is not None:
        out = new_folder(out, empty=True)
    ckpt = Checkpoint.load(generator, kind="generator")
    gen = ckpt.build()
    source = None
    if isinstance(masks, (str, os.PathLike)):
        from napari_sagegan.io.images import list_images, read_labels

        source = [read_labels(p) for p in list_images(masks)]
        if not source:
            raise ValueError(f"no mask files in {masks}")
    elif masks is not None:
        source = [np.asarray(m) for m in masks] or None
    layout = layout or ("real" if source is not None else "lattice")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    stats = None if source is not None else (ckpt.get("extra") or {}).get("mask_stats")
    if source is None and stats is None:
        raise ValueError(f"{generator} stores no mask statistics; give masks (--masks DIR)")
    yield Progress("prepare", 0, n, message="drawing new masks")
    shape = (size, size) if size else None
    layouts = make_masks(source, n, layout=layout, shape=shape, stats=stats, seed=seed)
    pairs = yield from _synthesize(gen, layouts, seed, device)
    if out is not None:
        with staged_folder(out, prefix=".sagegan-generate-") as st:
            _write_pairs(st, pairs)
    return pairs
