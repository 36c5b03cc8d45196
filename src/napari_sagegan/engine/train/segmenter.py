"""Phase 1: train (or fine-tune) the Attention U-Net segmenter.

:class:`SegmenterTrainer` turns image/label pairs into a trained model. Its :meth:`run` is a
generator of :class:`~napari_sagegan.util.progress.Progress` events (``stage="train"`` after
each optimisation step with the losses, ``stage="validate"`` after each validation with Dice
and instance F1) that a caller can stop between any two events: the best model so far stays
available in :attr:`SegmenterTrainer.best_state` and, when ``out`` is given, on disk.

The loop (budget, ETA, validation, selection, history, cancel) is
:class:`~napari_sagegan.engine.train.loop.Fit`'s; this module defines the step (focal +
Tversky + distance loss, Adam) and the validation. Model selection is on validation instance
F1 at IoU 0.5 (ties broken by Dice); the learning
rate is halved when that score has not improved for ``plateau_patience`` validations
(``ReduceLROnPlateau`` in *max* mode, unlike the authors' code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...util.progress import Progress, relay
from ..checkpoint import SEGMENTER, Checkpoint, state_on_cpu
from ..config import ArchConfig, InferConfig, TrainConfig
from ..data.augment import AUGMENTATIONS
from ..data.sampling import PatchSampler
from ..nets.attention_unet import AttentionUNet
from .loop import Fit, validate_segmenter
from .losses import segmentation_loss


@dataclass
class TrainResult:
    """What training produced."""

    model: AttentionUNet
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    stopped_by: str = "epochs"  # "epochs" | "time"


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
        Where to write the best checkpoint (atomically, at every improvement).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    val_images, val_labels : sequences, optional
        An explicit validation set; by default a seeded ``val_fraction`` of the pairs.
    infer : InferConfig, optional
        Post-processing used for validation (and stored in the checkpoint).
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
    ) -> None:
        self._init_fit()
        self.config = config or TrainConfig()
        pairs = self._setup(
            images, labels, self.config, device=device, val_images=val_images, val_labels=val_labels
        )
        self.out = Path(out) if out is not None else None
        if self.out is not None and not self.out.parent.is_dir():
            raise FileNotFoundError(f"output folder {self.out.parent} does not exist")

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
            ckpt = Checkpoint.load(init, kind=SEGMENTER)
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
        self.train_config = self.config
        self.pairs = pairs.at_scale(self.config.target_diameter)
        self.model.to(self.device)
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
            self.train_images,
            self.train_labels,
            patch_size=self.config.patch_size,
            fg_bias=self.config.fg_bias,
            augment_p=self.config.augment_p,
            augment_ops=[op for op in AUGMENTATIONS if op != "invert" or self.config.invert],
            min_area=self.config.min_instance_area,
            seed=self.config.seed + self.start_epoch,
            scale_jitter=self.config.scale_jitter if self.config.target_diameter else 1.0,
        )

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
        self.model.train()
        return iter(())

    def train_step(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        x, fg, dist = (t.to(self.device) for t in self.sampler.sample(cfg.batch_size))
        loss, parts = segmentation_loss(self.model(x), fg, dist, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[0]["lr"]}

    def validate_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[str, bool]:
        metrics = self.validate()
        record.update({f"val_{k}": v for k, v in metrics.items()})
        if metrics:
            self.scheduler.step(metrics["f1@0.5"])
        improved = self.beats(metrics)
        if not metrics:  # no validation images: keep the latest model
            metrics = {"train_loss": record["loss"]}
        if improved:
            self.keep_best(metrics, state_on_cpu(self.model))
        message = (
            f"epoch {epoch}: loss {record['loss']:.4f}"
            + (
                f", val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"
                if "dice" in metrics
                else ""
            )
            + (" (best)" if improved else "")
        )
        return message, improved

    def after_validation(self, epoch: int, improved: bool) -> None:
        if improved and self.out is not None:
            self.save(self.out, epoch=epoch, metrics=self.best_metrics)

    def after_fit(self) -> Iterator[Progress]:
        """Calibrate the best model's operating point on the validation images
        (``TrainConfig.calibrate``): thresholds that make the particle sizes unbiased, stored
        in the checkpoint's ``infer`` settings (engine/infer/calibrate.py)."""
        if not (self.config.calibrate and self.val_images and self.best_metrics):
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
        if self.out is not None:
            self.save(
                self.out, state=self.best_state, epoch=self._best_epoch(), metrics=self.best_metrics
            )
        yield Progress("calibrate", 1, 1, message=point.describe(), data=point.to_dict())

    def _best_epoch(self) -> int:
        best = [r for r in self.history if r.get("val_f1@0.5") == self.best_metrics.get("f1@0.5")]
        if best:
            return int(best[-1]["epoch"])
        return int(self.history[-1]["epoch"]) if self.history else 0

    def result(self) -> TrainResult:
        return TrainResult(
            model=self.best_model(),
            best_metrics=self.best_metrics,
            history=self.history,
            checkpoint=self.out,
            stopped_by=self.stopped_by,
        )
