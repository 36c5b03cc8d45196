"""Phase 1: train (or fine-tune) the Attention U-Net segmenter.

:class:`SegmenterTrainer` turns image/label pairs into a trained model. Its :meth:`run` is a
generator of :class:`~napari_sagegan.util.progress.Progress` events (``stage="train"`` after
each optimisation step with the losses, ``stage="validate"`` after each validation with Dice
and instance F1) that a caller can stop between any two events: the best model so far stays
available in :attr:`SegmenterTrainer.best_state` and, when ``out`` is given, on disk.

The loop (budget, ETA, validation, selection, history, cancel, non-finite steps) is
:class:`~napari_sagegan.engine.train.loop.Fit`'s; this module defines the step (focal +
Tversky + distance loss, Adam) and the validation. Model selection is on validation instance
F1 at IoU 0.5 (ties broken by Dice); the learning
rate is halved when that score has not improved for ``plateau_patience`` validations
(``ReduceLROnPlateau`` in *max* mode, unlike the authors' code).

An existing ``out`` file is replaced only by a better model: it must be a segmenter
checkpoint (anything else is refused before training starts), it is scored on the same
validation images first (at its own network scale and operating point), and the run writes
``out`` only once its best model beats that score (F1@0.5, ties broken by Dice). Otherwise the
old file stays and :attr:`TrainResult.kept` says why. ``overwrite=True`` replaces it anyway;
resuming from ``out`` itself continues the run that wrote it.

A fine-tune (``init``) is never worse (issue 14): the starting model is scored on the same
validation images first (with fewer than 8 pairs, a held-out band of every image:
:func:`~napari_sagegan.engine.data.pairs.hold_out_band`), the new model must beat it
clearly (by more than one validation particle's worth of F1, :func:`decision_margin`, or by
0.03 of Dice with F1 not lower) to be written, and after the run
:meth:`SegmenterTrainer.choose_model` keeps the starting model unless the fine-tuned model
(at its calibrated thresholds) or the starting model with thresholds re-calibrated on those
images beats it that clearly (:attr:`TrainResult.decision`). When the bands
hold no particle, the training images stand in for validation (said to the user).

Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its share of every global
batch through DistributedDataParallel and rank 0 alone validates, chooses and writes
(:mod:`~napari_sagegan.engine.train.distributed`); otherwise nothing of it is used.

Over 500 lines because the three comparisons (the run's best, the file at ``out``, the
starting model) share the validation images, the operating points and the one write to
``out``; split apart, each would need the others' state.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...util.progress import Progress, relay
from ..checkpoint import SEGMENTER, Checkpoint, CheckpointError, state_on_cpu
from ..config import ArchConfig, InferConfig, TrainConfig
from ..data.augment import AUGMENTATIONS
from ..data.sampling import PatchSampler
from ..nets.attention_unet import AttentionUNet
from .distributed import DistributedRun
from .loop import Fit, validate_segmenter
from .losses import segmentation_loss

#: Network scales a fine-tune also tries for the model it keeps, as multiples of the
#: model's (its ``target_diameter``): each candidate is scored on the validation parts
#: resampled by them (its particles seen that much larger or smaller).
SCALE_CHOICES = (0.8, 1.25)
#: The least F1@0.5 by which another model, its re-calibrated thresholds or another network
#: scale must beat the one the user had to replace it (see :func:`decision_margin`).
SCALE_MARGIN = 0.02
#: Dice a replacement may lose on the validation parts: "better" is better particles
#: without worse masks (a model that finds one more particle but draws all of them worse
#: is not kept).
DICE_SLACK = 0.02
#: Dice by which a replacement with no fewer particles right (F1@0.5 not lower) must beat
#: the model it replaces: better outlines are better sizes, and Dice counts pixels, so a
#: band of one or two particles can show them when F1 cannot.
DICE_MARGIN = 0.03


def decision_margin(n_particles: int) -> float:
    """F1@0.5 by which a replacement must beat the model it replaces on validation parts
    holding ``n_particles`` particles: more than one particle's worth (one particle moves
    F1 by about ``1 / n``), and at least :data:`SCALE_MARGIN`.

    The validation parts of a few corrected images are small: on a band of two particles a
    model that predicts one false particle fewer gains 0.1 F1; in the few-shot episodes of
    docs/benchmarks.md, before this margin, such a choice did not carry over to the rest of
    the article (apt.2019.10.001: 0.71 -> 0.36). A single particle is noise; two are
    evidence.
    """
    return max(SCALE_MARGIN, 1.0 / max(int(n_particles), 1))


def _beats(new: dict[str, Any], old: dict[str, Any], margin: float) -> bool:
    """``new`` scores clearly better than ``old``: F1@0.5 higher by more than ``margin``
    with Dice not lower by more than :data:`DICE_SLACK`, or F1@0.5 not lower and Dice
    higher by more than :data:`DICE_MARGIN`."""
    f1, f1_old = float(new.get("f1@0.5", 0.0)), float(old.get("f1@0.5", 0.0))
    dice, dice_old = float(new.get("dice", 0.0)), float(old.get("dice", 0.0))
    return (f1 > f1_old + margin and dice >= dice_old - DICE_SLACK) or (
        f1 >= f1_old and dice > dice_old + DICE_MARGIN
    )


def blend_states(base: dict, tuned: dict, alpha: float) -> dict | None:
    """The weights ``alpha`` of the way from ``base`` to ``tuned`` (WiSE-FT: floating-point
    tensors interpolated, counters taken from ``tuned``); ``None`` when the two are not
    states of the same network."""
    if base.keys() != tuned.keys() or any(base[k].shape != tuned[k].shape for k in base):
        return None
    return {
        k: torch.lerp(base[k].float(), v.float(), alpha).to(v.dtype)
        if v.is_floating_point() else v.clone()
        for k, v in tuned.items()
    }  # fmt: skip


#: Batches of training patches the blended weights' batch-norm statistics are measured on.
BN_BATCHES = 16


def reestimate_batchnorm(net: torch.nn.Module, sample, batches: int = BN_BATCHES) -> None:
    """Measure the batch-norm running statistics of ``net`` again, as the plain mean over
    ``batches`` batches ``sample()[0]`` (its weights unchanged; ``net`` is left in eval
    mode). Interpolated weights come with interpolated statistics that describe neither
    model's activations."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    device = next(net.parameters()).device
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(sample()[0].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def count_particles(labels: Sequence[np.ndarray]) -> int:
    """Instances in ``labels`` (label images; a particle cut by a part's edge counts)."""
    return int(sum(np.count_nonzero(np.unique(np.asarray(lab))) for lab in labels))


@dataclass
class TrainResult:
    """What training produced."""

    model: AttentionUNet
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The file this run wrote (``None``: nothing written, e.g. an existing ``out`` was kept).
    checkpoint: Path | None = None
    stopped_by: str = "epochs"  # "epochs" | "time"
    #: Optimisation steps undone because the loss or the weights were not finite.
    skipped_steps: int = 0
    #: When an existing ``out`` was kept: ``{"path", "metrics"}`` (its validation scores, ``{}``
    #: without validation images) and ``"new_metrics"`` (the new model's best).
    kept: dict[str, Any] | None = None
    #: A fine-tune (``init``) with validation: which model was kept, and the scores of every
    #: candidate on the same validation parts (:meth:`SegmenterTrainer.decision`).
    decision: dict[str, Any] | None = None


class SegmenterTrainer(Fit):
    """Train or fine-tune a segmenter.

    Parameters
    ----------
    images, labels : sequences of np.ndarray
        2-D raw images (any dtype) and their instance (or binary) label maps.
    config : TrainConfig
        Training settings (loss, patch size, budget, seed, ...).
    arch : ArchConfig, optional
        Architecture for a new model; ignored when ``init`` or ``resume`` is given.
    init : str, path, dict or Checkpoint, optional
        A segmenter checkpoint (path, ``"default"`` or loaded) to fine-tune from. The model
        keeps the network scale it was trained at (its ``target_diameter``).
    resume : str or path, optional
        A checkpoint written by a previous run with ``out``: continue from its epoch and
        optimiser state.
    out : str or path, optional
        Where to write the best checkpoint (atomically, at every improvement). An existing
        file must be a segmenter checkpoint and is replaced only by a model that scores
        better on the validation images (see the module docstring).
    overwrite : bool
        Replace an existing ``out`` whatever it holds and however the new model scores.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    val_images, val_labels : sequences, optional
        An explicit validation set; by default a seeded ``val_fraction`` of the pairs.
    infer : InferConfig, optional
        Post-processing used for validation (and stored in the checkpoint).
    diameters : sequence of float or None, optional
        The particle diameter the user gave for each image (``None``: its labels' median);
        see :func:`~napari_sagegan.engine.data.pairs.prepare_pairs`.
    """

    record_keys = ("loss",)

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: TrainConfig | None = None,
        *,
        arch: ArchConfig | None = None,
        init: str | os.PathLike | dict | Checkpoint | None = None,
        resume: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
        device: str = "auto",
        val_images: Sequence[np.ndarray] | None = None,
        val_labels: Sequence[np.ndarray] | None = None,
        infer: InferConfig | None = None,
        overwrite: bool = False,
        diameters: Sequence[float | None] | None = None,
    ) -> None:
        self._init_fit()
        self.config = config or TrainConfig()
        self.out = Path(out) if out is not None else None
        if self.out is not None and not self.out.parent.is_dir():
            raise FileNotFoundError(f"output folder {self.out.parent} does not exist")
        #: The file at ``out`` before the run, to beat before replacing it (``None``: no file,
        #: ``overwrite``, or the run resumed from it).
        self.existing = None if overwrite else self._existing_out(resume)
        self.existing_metrics: dict[str, float] | None = None  # scored in before_fit
        self.written: Path | None = None  # the file this run wrote
        self._validated = False  # a validation round ran in this run
        cfg = self.config
        # under torchrun (WORLD_SIZE > 1): this process's share of the run, else None
        self.ddp = DistributedRun.from_env(device, cfg.batch_size)
        pairs = self._setup(
            images, labels, cfg, device=device, val_images=val_images, val_labels=val_labels,
            holdout=cfg.holdout, margin=cfg.patch_size // 2, extra=rehearsal_pairs(cfg),
            diameters=diameters,
        )  # fmt: skip
        if self.ddp is not None:
            self.device = self.ddp.device  # cuda:LOCAL_RANK on CUDA
        #: The model fine-tuned from (``init``), scored on the same validation images before
        #: training and kept when the new one does not beat it (:meth:`choose_model`).
        self.base: Checkpoint | None = None
        self.base_metrics: dict[str, float] | None = None  # scored in before_fit
        self.outcome: dict[str, Any] | None = None  # set by choose_model
        self.fine_tuned: dict[str, Any] | None = None  # set by choose_model
        self.blended: dict[str, Any] | None = None  # set by choose_model (TrainConfig.blend)
        self.recalibrated: dict[str, Any] | None = None  # set by choose_model
        self._margin: float | None = None

        ckpt = None
        if resume is not None:
            ckpt = Checkpoint.load(resume, kind=SEGMENTER)
            self.start_epoch = ckpt.epoch
            self.step = ckpt.step
            if "f1@0.5" in ckpt.metrics:
                self.best_score = (ckpt.metrics["f1@0.5"], ckpt.metrics.get("dice", 0.0))
                self.best_metrics = dict(ckpt.metrics)
            self.history = list(ckpt.extra.get("history", []))
        elif init is not None:
            ckpt = self.base = Checkpoint.load(init, kind=SEGMENTER)
        if ckpt is not None:
            self.model = ckpt.build()
            self.arch = self.model.config
            if infer is None and ckpt.infer:
                infer = InferConfig.from_dict(dict(ckpt.infer))
            # a model keeps the network scale it was trained at (None: images' own scale)
            self.config = self.config.replace(target_diameter=ckpt.target_diameter)
        else:
            self.arch = arch or ArchConfig()
            self.model = AttentionUNet(self.arch)
        self.infer = infer or InferConfig()
        self.base_infer = self.infer  # the starting model's own operating point
        self.train_config = self.config
        self._pairs_own_scale = pairs
        self.pairs = pairs.at_scale(self.config.target_diameter)
        #: A fine-tune whose held-out parts hold no particle (too few, or too large for a
        #: band) is validated on its training images instead, so that a model that got worse
        #: is still caught (a weaker check: said to the user).
        self.val_on_train = bool(
            self.base is not None
            and self.config.val_fraction > 0
            and self.pairs.train_regions
            and not self.val_has_particles
        )
        if self.val_on_train:
            self.pairs = dataclasses.replace(
                self.pairs, val_images=list(self.pairs.train_images),
                val_labels=list(self.pairs.train_labels), val_regions=(),
            )  # fmt: skip
        self.model.to(self.device)
        #: What the steps run: the model, or its DDP wrapper on several processes (the model
        #: itself, unwrapped, is what is validated and saved).
        self._net = (
            self.model
            if self.ddp is None
            else self.ddp.wrap(self.model, find_unused=self.config.freeze_encoder > 0)
        )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        if ckpt is not None and resume is not None and ckpt.optimizer:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.5, patience=self.config.plateau_patience
        )
        self.best_state = state_on_cpu(self.model)
        self.sampler = PatchSampler(
            self.pairs.sampled_images,
            self.pairs.sampled_labels,
            patch_size=self.config.patch_size,
            fg_bias=self.config.fg_bias,
            augment_p=self.config.augment_p,
            augment_ops=[op for op in AUGMENTATIONS if op != "invert" or self.config.invert],
            min_area=self.config.min_instance_area,
            seed=self.config.seed + self.start_epoch,
            scale_jitter=self.config.scale_jitter if self.config.target_diameter else 1.0,
            weights=self._weights(),
        )

    #: The share of the patches drawn from the rehearsal pairs (when there are any).
    REHEARSAL_SHARE = 0.2

    def _weights(self) -> list[float] | None:
        """Sampling weights: the rehearsal pairs get :attr:`REHEARSAL_SHARE` of the patches
        whatever their area, the user's pairs the rest (each by its area)."""
        own, extra = self.pairs.train_images, self.pairs.extra_images
        if not extra:
            return None
        a_own = sum(im.size for im in own)
        a_extra = sum(im.size for im in extra)
        k = self.REHEARSAL_SHARE / (1 - self.REHEARSAL_SHARE) * a_own / max(1, a_extra)
        return [1.0] * len(own) + [k] * len(extra)

    # ------------------------------------------------------------------ the file at out
    def _existing_out(self, resume: str | os.PathLike | None) -> Checkpoint | None:
        """The segmenter already at ``out`` (``None``: no file there, or the run resumes from
        it); anything else there is refused before training."""
        out = self.out
        if out is None or not out.exists():
            return None
        if resume is not None and Path(resume).exists() and os.path.samefile(resume, out):
            return None  # the run continues the one that wrote it
        try:
            return Checkpoint.load(out, kind=SEGMENTER)
        except CheckpointError as err:
            reason = str(err).strip().splitlines()[0].split("; ")[0].replace(str(out), "it")
            raise CheckpointError(
                f"{out} already exists and is not a usable segmenter model ({reason}); choose "
                "another output file, or pass --overwrite to replace it"
            ) from err

    def _score_existing(self) -> dict[str, float]:
        """Validation scores of the model already at ``out``, on the same validation images
        (resampled to its own network scale) with its own post-processing settings."""
        old = self.existing
        assert old is not None
        if not self.val_images:
            return {}
        pairs = self.pairs
        if old.target_diameter != self.config.target_diameter:
            pairs = self._pairs_own_scale.at_scale(old.target_diameter)
        infer = self.infer
        if old.infer:
            own = InferConfig.from_dict(dict(old.infer))
            infer = infer.replace(
                threshold=own.threshold,
                seed_threshold=own.seed_threshold,
                split=own.split,
                fill_holes=own.fill_holes,
                min_size=own.min_size,
            )
        model = old.build().to(self.device)
        return validate_segmenter(
            model, pairs.val_images, pairs.val_labels, infer, device=self.device
        )

    def may_write_out(self) -> bool:
        """Whether the best model so far may be written to ``out``: always unless a model was
        there before the run, which it must beat on the validation images; and, when
        fine-tuning, only once it beats the starting model there."""
        if self.out is None:
            return False
        if self.base_metrics and self.best_metrics and "f1@0.5" in self.best_metrics:
            if not _beats(self.best_metrics, self.base_metrics, self.margin()):
                return False
        if self.existing is None:
            return True
        old = self.existing_metrics
        if not old or not self.best_metrics or "f1@0.5" not in self.best_metrics:
            return False  # nothing to compare on: keep the file the user had
        return self.best_score > (old["f1@0.5"], old["dice"])

    def _write_out(self, **fields: Any) -> None:
        assert self.out is not None
        if self.ddp is not None and not self.ddp.is_main:
            return  # rank 0 alone writes
        self.written = self.save(self.out, **fields)

    @property
    def device_name(self) -> str:
        """The device, for the user (with the number of processes under torchrun)."""
        name = super().device_name
        return name if self.ddp is None else f"{name} in each of {self.ddp.world} processes"

    @property
    def _follower(self) -> bool:
        """A rank other than 0 under torchrun: it neither validates nor writes."""
        return self.ddp is not None and not self.ddp.is_main

    def run(self) -> Generator[Progress, None, TrainResult]:
        """:meth:`Fit.run`; on several processes a rank that stops early makes the others
        stop (:meth:`~napari_sagegan.engine.train.distributed.DistributedRun.guard`)."""
        gen = super().run()
        return (yield from (gen if self.ddp is None else self.ddp.guard(gen)))

    @property
    def val_has_particles(self) -> bool:
        """Whether the validation images hold a labelled particle (else nothing can be
        compared or calibrated on them)."""
        return any(np.any(np.asarray(lab) > 0) for lab in self.val_labels)

    # ------------------------------------------------------------------ models
    def validate(self) -> dict[str, float]:
        """Segment the validation images with the current model; mean metrics."""
        return validate_segmenter(
            self.model, self.val_images, self.val_labels, self.infer, device=self.device
        )

    def checkpoint(
        self,
        *,
        state: dict | None = None,
        epoch: int,
        metrics: dict[str, float],
        with_optimizer: bool = True,
        extra: dict | None = None,
    ) -> Checkpoint:
        """A checkpoint of ``state`` (default: the current weights), with the history."""
        return Checkpoint.from_model(
            self.model,
            kind=SEGMENTER,
            arch=self.arch,
            state_dict=state,
            train=self.config,
            infer=self.infer,
            target_diameter=self.config.target_diameter,
            seed=self.config.seed,
            epoch=epoch,
            step=self.step,
            metrics=metrics,
            optimizer=self.optimizer.state_dict() if with_optimizer else None,
            extra={
                "history": list(self.history),
                **({"calibration": self.calibration} if self.calibration else {}),
                **(extra or {}),
            },
        )

    def best_checkpoint(self, extra: dict | None = None) -> Checkpoint:
        """The best model so far, without optimiser state (also after a cancel)."""
        epoch = int(self.history[-1]["epoch"]) if self.history else self.start_epoch
        return self.checkpoint(
            state=self.best_state,
            epoch=epoch,
            metrics=self.best_metrics,
            with_optimizer=False,
            extra=extra,
        )

    def save(
        self,
        path: str | os.PathLike,
        *,
        state: dict | None = None,
        epoch: int,
        metrics: dict[str, float],
        with_optimizer: bool = True,
    ) -> Path:
        """Write a checkpoint of ``state`` (default: the current weights), atomically."""
        ckpt = self.checkpoint(
            state=state, epoch=epoch, metrics=metrics, with_optimizer=with_optimizer
        )
        return ckpt.save(path)

    def best_model(self) -> AttentionUNet:
        """A CPU copy of the best model so far, in eval mode."""
        model = AttentionUNet(self.arch)
        model.load_state_dict(self.best_state)
        return model.eval()

    # ------------------------------------------------------------------ loop hooks
    def before_fit(self, total: int) -> Iterator[Progress]:
        """Score the starting model on the validation images (a fine-tune must beat it) and
        the model already at ``out`` (it stays unless the new one beats it)."""
        if self.base_metrics is None:
            self.score_base()
        if self.existing is not None and not self._follower:
            yield Progress("prepare", 0, None, message=f"scoring the model already at {self.out}")
            self.existing_metrics = m = self._score_existing()
            yield Progress(
                "prepare",
                1,
                None,
                message=(
                    f"{self.out} exists (val Dice {m['dice']:.3f}, F1@0.5 {m['f1@0.5']:.3f}): "
                    "it is replaced only by a model that scores higher"
                    if m
                    else f"{self.out} exists and there are no validation images to compare "
                    "with: it is kept (use --overwrite to replace it)"
                ),
                data={"existing_metrics": dict(m)},
            )
        self.model.train()

    def _schedule(self) -> None:
        """Set the learning rate (cosine / constant schedules) and freeze or free the encoder
        for this step, from :attr:`run_fraction`."""
        cfg, t = self.config, self.run_fraction
        if cfg.schedule != "plateau":
            factor = 1.0
            if cfg.warmup_fraction and t < cfg.warmup_fraction:
                factor = (t + 1e-3) / cfg.warmup_fraction
            elif cfg.schedule == "cosine":
                rest = (t - cfg.warmup_fraction) / max(1e-9, 1.0 - cfg.warmup_fraction)
                factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, rest)))
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * max(factor, 0.02)
        if cfg.freeze_encoder:
            frozen = t < cfg.freeze_encoder
            for p in self.model.encoder.parameters():
                p.requires_grad_(not frozen)

    def train_step(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        self._schedule()
        if self.ddp is not None:
            return self._distributed_step(self.sampler.sample(cfg.batch_size))
        x, fg, dist = (t.to(self.device) for t in self.sampler.sample(cfg.batch_size))
        snap = self.snapshot(self.model)
        loss, parts = segmentation_loss(self.model(x), fg, dist, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
        self.finite_update(loss.detach(), self.optimizer, snap)
        self.step += 1
        return {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[0]["lr"]}

    def _distributed_step(self, batch: Sequence[torch.Tensor]) -> dict[str, float]:
        """:meth:`train_step` on this rank's slice of the global ``batch`` (drawn whole by
        every rank), through DDP; the losses reported are the global batch's."""
        assert self.ddp is not None
        x, fg, dist = (t.to(self.device) for t in self.ddp.shard(*batch))
        snap = self.snapshot(self.model)
        loss, parts, total = self.ddp.loss(self._net(x), fg, dist, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        if math.isfinite(total):  # the same on every rank: all go backward, or none
            loss.backward()
        self.finite_update(total, self.optimizer, snap)
        self.step += 1
        return {"loss": total, **parts, "lr": self.optimizer.param_groups[0]["lr"]}

    def validate_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[str, bool]:
        if self.ddp is None:
            metrics = self.validate()
        else:  # rank 0 validates; every rank takes the same decisions from its scores
            metrics = self.ddp.share(self.validate() if self.ddp.is_main else {})
        record.update({f"val_{k}": v for k, v in metrics.items()})
        if metrics and self.config.schedule == "plateau":
            self.scheduler.step(metrics["f1@0.5"])
        improved = self.beats(metrics)
        if not metrics:  # no validation images: keep the latest model
            metrics = {"train_loss": record["loss"]}
        if improved:
            improved = self.keep_best(metrics, state_on_cpu(self.model))
        message = (
            f"epoch {epoch}: loss {record['loss']:.4f}"
            + (
                f", val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"
                if "dice" in metrics
                else ""
            )
            + (
                ""
                if not improved
                else " (best)"
                if self.existing is None or self.may_write_out()
                else f" (best of this run, not better than the existing {self.out.name}, "
                "which stays)"
            )
        )
        return message, improved

    def after_validation(self, epoch: int, improved: bool) -> None:
        self._validated = True
        if improved and self.may_write_out():
            self._write_out(epoch=epoch, metrics=self.best_metrics)

    def after_fit(self) -> Iterator[Progress]:
        """Calibrate the best model's operating point (:meth:`calibrate_best`); then, when no
        validation round wrote ``out`` (no epoch was left to run), write the model there.
        On several processes rank 0 alone does it."""
        if self._follower:
            return
        yield from self.calibrate_best()
        yield from self.choose_model()
        if self.written is None and not self._validated and self.may_write_out():
            self._write_out(
                state=self.best_state, epoch=self.start_epoch, metrics=self.best_metrics
            )

    def calibrate_best(self) -> Iterator[Progress]:
        """Calibrate the best model's operating point on the validation images
        (``TrainConfig.calibrate``): thresholds that make the particle sizes unbiased, stored
        in the checkpoint's ``infer`` settings (engine/infer/calibrate.py)."""
        if not (self.config.calibrate and self.val_has_particles and self.best_metrics):
            return
        from ..infer.calibrate import calibrate
        from ..infer.segment import Segmenter

        seg = Segmenter(
            self.best_model(),
            device=str(self.device),
            checkpoint={
                "infer": self.infer.to_dict(),
                "target_diameter": self.config.target_diameter,
            },
        )
        point = yield from relay(
            calibrate(seg, self.val_images, self.val_labels, config=self.infer),
            lambda ev: Progress("calibrate", ev.step, ev.total, message=ev.message),
        )
        self.infer = self.infer.replace(**point.infer_overrides())
        self.calibration = point.to_dict()
        self.best_metrics = {**self.best_metrics, "calibrated_f1@0.5": point.f1}
        if point.size_bias is not None:
            self.best_metrics["calibrated_size_bias"] = point.size_bias
        if self.written is not None:
            self._write_out(
                state=self.best_state, epoch=self._best_epoch(), metrics=self.best_metrics
            )
        yield Progress("calibrate", 1, 1, message=point.describe(), data=point.to_dict())

    def score_base(self) -> dict[str, float] | None:
        """Score the starting model (``init``) on the validation images at its own operating
        point, once (before the first step; the api calls it earlier to say the scores);
        ``None`` without a starting model or validation particles."""
        if self._follower:
            return None  # rank 0 compares and writes
        if self.base_metrics is None and self.base is not None and self.val_has_particles:
            self.base_metrics = self._validate_ckpt(self.base, self.base_infer)
        return self.base_metrics

    def _validate_ckpt(self, ckpt: Checkpoint, infer: InferConfig) -> dict[str, float]:
        return validate_segmenter(
            ckpt.build().to(self.device), self.val_images, self.val_labels, infer,
            device=self.device,
        )  # fmt: skip

    def _recalibrated(self, state: dict, infer: InferConfig) -> Iterator[Progress]:
        """``infer`` with the operating point calibrated on the validation images for the
        weights ``state``; returns ``(infer, point)``."""
        from ..infer.calibrate import calibrate
        from ..infer.segment import Segmenter

        model = AttentionUNet(self.arch)
        model.load_state_dict(state)
        seg = Segmenter(
            model.eval(), device=str(self.device),
            checkpoint={"infer": infer.to_dict(), "target_diameter": self.config.target_diameter},
        )  # fmt: skip
        point = yield from relay(
            calibrate(seg, self.val_images, self.val_labels, config=infer),
            lambda ev: Progress("calibrate", ev.step, ev.total, message=ev.message),
        )
        return infer.replace(**point.infer_overrides()), point

    def choose_model(self) -> Iterator[Progress]:
        """Never worse: after a fine-tune, score on the same validation images the new model
        (at its calibrated operating point), the starting model at its own and the starting
        model re-calibrated there. The starting model stays unless another clearly beats it
        (:func:`_beats`: by the :func:`decision_margin` of the validation particles, or by
        :data:`DICE_MARGIN` of Dice); of those that do, the best is kept (F1@0.5, then
        Dice). :attr:`outcome` says which was
        kept, with every score and the margin; :attr:`fine_tuned` keeps the fine-tuned
        weights whichever is kept."""
        if self.base is None or not self.base_metrics or not self.best_metrics:
            return
        n_val, margin = count_particles(self.val_labels), self.margin()
        self.fine_tuned = {
            "state": self.best_state,
            "infer": self.infer,
            "target_diameter": self.config.target_diameter,
        }
        base_state = state_on_cpu(self.base.build())
        yield Progress("choose", 0, 3, message="re-calibrating the starting model")
        recal, point = yield from self._recalibrated(base_state, self.base_infer)
        model = self.best_model().to(self.device)
        new = validate_segmenter(model, self.val_images, self.val_labels, self.infer,
                                 device=self.device)  # fmt: skip
        yield Progress("choose", 1, 3, message="scoring the re-calibrated starting model")
        recal_m = (
            dict(self.base_metrics)
            if recal == self.base_infer
            else self._validate_ckpt(self.base, recal)
        )
        # the model the user had stays unless another beats it clearly; of those, the best
        # (ties: the one nearer the starting model)
        candidates = [
            ("starting model", self.base_metrics, base_state, self.base_infer),
            ("starting model, re-calibrated", recal_m, base_state, recal),
        ]
        self.recalibrated = {"state": base_state, "infer": recal,
                             "target_diameter": self.config.target_diameter}  # fmt: skip
        blended = self.config.blend and blend_states(base_state, self.best_state,
                                                     self.config.blend)  # fmt: skip
        blend_m = None
        if blended:
            net = AttentionUNet(self.arch).to(self.device)
            net.load_state_dict(blended)
            reestimate_batchnorm(net, lambda: self.sampler.sample(self.config.batch_size))
            blended = state_on_cpu(net)
            yield Progress("choose", 1, 3, message="re-calibrating the blended weights")
            blend_infer, blend_point = yield from self._recalibrated(blended, self.infer)
            blend_m = validate_segmenter(net, self.val_images, self.val_labels, blend_infer,
                                         device=self.device)  # fmt: skip
            candidates.append(("blended", blend_m, blended, blend_infer))
            self.blended = {"state": blended, "infer": blend_infer,
                            "target_diameter": self.config.target_diameter}  # fmt: skip
        candidates.append(("fine-tuned", new, self.best_state, self.infer))
        best = candidates[0]
        for c in candidates[1:]:
            if _beats(c[1], self.base_metrics, margin) and (
                best is candidates[0] or _score(c[1]) > _score(best[1])
            ):
                best = c
        choice, metrics, state, infer = best
        # the network scale, re-chosen on the user's validation parts: every candidate at
        # the other scales, kept only when clearly better than the best at the model's own
        yield Progress("choose", 2, 3, message="trying other network scales")
        scale, by_scale, own = 1.0, {}, metrics
        for s in SCALE_CHOICES if self.config.target_diameter and self.val_images else ():
            images, labels = self._val_at(s)
            for name, _m, st, inf in candidates:
                net = AttentionUNet(self.arch)
                net.load_state_dict(st)
                m = validate_segmenter(net.to(self.device), images, labels, inf,
                                       device=self.device)  # fmt: skip
                by_scale[f"{name} x{s:g}"] = m
                if _beats(m, own, margin) and (scale == 1.0 or _score(m) > _score(metrics)):
                    choice, metrics, state, infer, scale = name, m, st, inf, s
        scale_key = f"{choice} x{scale:g}"
        if scale != 1.0 and choice == "starting model":
            choice = "starting model, re-scaled"  # its weights, another network scale
        self.outcome = {
            "kept": choice,
            "base": dict(self.base_metrics),
            "base_recalibrated": dict(recal_m),
            "fine_tuned": dict(new),
            **({"blended": dict(blend_m), "blend": self.config.blend} if blend_m else {}),
            "thresholds": {"threshold": infer.threshold, "seed_threshold": infer.seed_threshold},
            "scale": scale,
            "by_scale": by_scale,
            "scale_key": scale_key,
            "validation_particles": n_val,
            "margin": margin,
        }
        if scale != 1.0:
            self.outcome["target_diameter"] = self.config.target_diameter * scale
            self.config = self.config.replace(target_diameter=self.config.target_diameter * scale)
        self.best_state, self.infer = state, infer
        self.best_metrics = dict(metrics)
        self.best_score = _score(metrics)
        if choice == "blended":
            self.calibration = blend_point.to_dict()
        elif choice != "fine-tuned":
            # the starting model at its own thresholds (re-scaled or not) was not re-calibrated
            own = choice in ("starting model", "starting model, re-scaled")
            self.calibration = None if own else point.to_dict()
        old = self.existing_metrics
        if self.out is not None and (
            self.existing is None or (old and _score(metrics) > _score(old))
        ):
            self._write_out(state=self.best_state, epoch=self._best_epoch(),
                            metrics=self.best_metrics)  # fmt: skip
        yield Progress("choose", 3, 3, message=describe_outcome(self.outcome), data=self.outcome)

    def _val_at(self, scale: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The validation parts resampled by ``scale`` (their particles that much larger)."""
        from ..infer.scale import rescale_pair

        pairs = [
            rescale_pair(np.asarray(im, np.float32), np.asarray(lab), scale)
            for im, lab in zip(self.val_images, self.val_labels)
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _best_epoch(self) -> int:
        best = [r for r in self.history if r.get("val_f1@0.5") == self.best_metrics.get("f1@0.5")]
        if best:
            return int(best[-1]["epoch"])
        return int(self.history[-1]["epoch"]) if self.history else 0

    def result(self) -> TrainResult:
        kept = None
        if self.existing is not None and self.written is None:
            kept = {
                "path": self.out,
                "metrics": dict(self.existing_metrics or {}),
                "new_metrics": dict(self.best_metrics),
            }
        return TrainResult(
            model=self.best_model(),
            best_metrics=self.best_metrics,
            history=self.history,
            checkpoint=self.written,
            stopped_by=self.stopped_by,
            skipped_steps=self.skipped_steps,
            kept=kept,
            decision=self.decision(),
        )

    def decision(self) -> dict[str, Any] | None:
        """Which model a fine-tune keeps, with the scores: :attr:`outcome` after the run;
        after a Cancel, the best so far against the starting model at its own operating
        point. ``None`` without a starting model or validation images."""
        if self.outcome is not None:
            return dict(self.outcome)
        if self.base is None or not self.base_metrics or "f1@0.5" not in self.best_metrics:
            return None
        better = _beats(self.best_metrics, self.base_metrics, self.margin())
        return {
            "kept": "fine-tuned" if better else "starting model",
            "base": dict(self.base_metrics),
            "fine_tuned": dict(self.best_metrics),
            "validation_particles": count_particles(self.val_labels),
            "margin": self.margin(),
        }

    def margin(self) -> float:
        """The :func:`decision_margin` of this run's validation parts."""
        if self._margin is None:
            self._margin = decision_margin(count_particles(self.val_labels))
        return self._margin


def _score(metrics: dict[str, Any]) -> tuple[float, float]:
    return (float(metrics.get("f1@0.5", 0.0)), float(metrics.get("dice", 0.0)))


def _scores(metrics: dict[str, Any]) -> str:
    return f"F1@0.5 {metrics.get('f1@0.5', math.nan):.3f}, Dice {metrics.get('dice', math.nan):.3f}"


def describe_outcome(outcome: dict[str, Any]) -> str:
    """One line for the user: which model was kept, with the scores on validation."""
    base, new = outcome["base"], outcome["fine_tuned"]
    recal = outcome.get("base_recalibrated")
    kept = outcome["kept"]
    both = f"fine-tuned {_scores(new)}, starting model {_scores(base)}"
    if recal is not None and recal != base:
        both += f" ({_scores(recal)} re-calibrated)"
    if outcome.get("blended") is not None:
        both += (
            f", blended ({outcome['blend']:g} of the way from the starting to the fine-tuned "
            f"weights) {_scores(outcome['blended'])}"
        )
    scale = float(outcome.get("scale", 1.0))
    if scale != 1.0:
        m = outcome["by_scale"][outcome["scale_key"]]
        both += (
            f"; with the particles seen x{scale:g} larger (network scale "
            f"{outcome['target_diameter']:g} px) the {kept} scores {_scores(m)}, so that "
            "scale is kept"
        )
    on = "on the validation images"
    if "margin" in outcome:
        n = int(outcome.get("validation_particles", 0))
        on += (
            f" ({n} particle{'s' if n != 1 else ''}: a replacement must score F1@0.5 more than "
            f"{outcome['margin']:.2f} higher with Dice at most {DICE_SLACK:g} lower, or Dice more "
            f"than {DICE_MARGIN:g} higher with F1@0.5 not lower)"
        )
    if kept == "fine-tuned":
        return f"kept the fine-tuned model: {both} {on}"
    if kept == "blended":
        return f"kept the blended model: {both} {on}"
    if kept == "starting model, re-calibrated":
        return (
            "kept the starting model with re-calibrated thresholds (the fine-tuned one was not "
            f"clearly better): {both} {on}"
        )
    return f"kept the starting model (the fine-tuned one was not clearly better): {both} {on}"


def rehearsal_pairs(config: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """``config.rehearsal`` generated pairs of varied sizes and contrasts (seeded by the
    run's seed), mixed into a fine-tune so that it does not forget them."""
    if not config.rehearsal:
        return []
    from ..synthetic.render import make_training_set

    return make_training_set(int(config.rehearsal), shape=(192, 192), seed=int(config.seed))
