"""Phase 1: train (or fine-tune) the Attention U-Net segmenter.

:class:`SegmenterTrainer` turns image/label pairs into a trained model. Its :meth:`run` is a
generator of :class:`~napari_sagegan.util.progress.Progress` events (``stage="train"`` after
each optimisation step with the losses, ``stage="validate"`` after each validation with Dice
and instance F1) that a caller can stop between any two events: the best model so far stays
available in :attr:`SegmenterTrainer.best_state` and, when ``out`` is given, on disk.

Model selection is on validation instance F1 at IoU 0.5 (ties broken by Dice); the learning
rate is halved when that score has not improved for ``plateau_patience`` validations
(``ReduceLROnPlateau`` in *max* mode, unlike the authors' code).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics
from napari_sagegan.engine.checkpoint import build_segmenter, load_checkpoint, save_checkpoint
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
from napari_sagegan.engine.data.augment import AUGMENTATIONS
from napari_sagegan.engine.data.pairs import PatchSampler, split_indices
from napari_sagegan.engine.device import describe_device, resolve_device
from napari_sagegan.engine.infer.postprocess import instances_from_maps
from napari_sagegan.engine.infer.scale import (
    estimate_diameter,
    median_diameter,
    rescale_pair,
    scale_factor,
)
from napari_sagegan.engine.infer.tiling import predict_tiled
from napari_sagegan.engine.nets.attention_unet import AttentionUNet, maps_from_logits
from napari_sagegan.engine.train.losses import segmentation_loss
from napari_sagegan.util.progress import Progress, run_to_end


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (third-party code may use the legacy global)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What training produced."""

    model: AttentionUNet
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    stopped_by: str = "epochs"  # "epochs" | "time"


def _check_pairs(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} label images")
    if len(images) == 0:
        raise ValueError("no image/mask pairs to train on")
    for i, (im, lab) in enumerate(zip(images, labels)):
        if np.ndim(im) != 2:
            raise ValueError(f"training image {i} must be 2-D (Y, X), got shape {np.shape(im)}")
        if np.shape(im) != np.shape(lab):
            raise ValueError(
                f"training pair {i}: image shape {np.shape(im)} differs from mask shape "
                f"{np.shape(lab)}; masks must match their images pixel for pixel"
            )
    if not any(np.any(np.asarray(lab) > 0) for lab in labels):
        raise ValueError(
            "the masks contain no particles (every pixel is background); label at least a few "
            "particles before training"
        )


class SegmenterTrainer:
    """Train or fine-tune a segmenter.

    Parameters
    ----------
    images, labels : sequences of np.ndarray
        2-D raw images (any dtype) and their instance (or binary) label maps.
    config : TrainConfig
        Training settings (loss, patch size, budget, seed, ...).
    arch : ArchConfig, optional
        Architecture for a new model; ignored when ``init`` or ``resume`` is given.
    init : str, path or dict, optional
        A segmenter checkpoint (path, ``"default"`` or loaded dict) to fine-tune from.
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

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: TrainConfig | None = None,
        *,
        arch: ArchConfig | None = None,
        init: str | os.PathLike | dict | None = None,
        resume: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
        device: str = "auto",
        val_images: Sequence[np.ndarray] | None = None,
        val_labels: Sequence[np.ndarray] | None = None,
        infer: InferConfig | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        _check_pairs(images, labels)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        seed_everything(self.config.seed)
        self.device = resolve_device(device)
        self.out = Path(out) if out is not None else None
        if self.out is not None and not self.out.parent.is_dir():
            raise FileNotFoundError(f"output folder {self.out.parent} does not exist")

        if val_images is not None:
            _check_pairs(val_images, val_labels or [])
            train_idx = list(range(len(images)))
            self.val_images, self.val_labels = list(val_images), list(val_labels or [])
        else:
            train_idx, val_idx = split_indices(
                len(images), self.config.val_fraction, self.config.seed
            )
            if len(train_idx) == 0:
                train_idx, val_idx = val_idx, []
            self.val_images = [images[i] for i in val_idx]
            self.val_labels = [labels[i] for i in val_idx]
        self.train_images = [np.asarray(images[i]) for i in train_idx]
        self.train_labels = [np.asarray(labels[i]) for i in train_idx]
        if not any(np.any(lab > 0) for lab in self.train_labels):
            raise ValueError("the training split has no particles; add labelled images")

        self.start_epoch = 0
        self.step = 0
        self.best_score: tuple[float, float] = (-1.0, -1.0)
        self.best_metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        opt_state = None
        ckpt = None
        if resume is not None:
            ckpt = load_checkpoint(resume, kind="segmenter")
            opt_state = ckpt.get("optimizer")
            self.start_epoch = int(ckpt.get("epoch", 0))
            self.step = int(ckpt.get("step", 0))
            m = ckpt.get("metrics") or {}
            if "f1@0.5" in m:
                self.best_score = (m["f1@0.5"], m.get("dice", 0.0))
                self.best_metrics = dict(m)
            self.history = list((ckpt.get("extra") or {}).get("history", []))
        elif init is not None:
            ckpt = init if isinstance(init, dict) else load_checkpoint(init, kind="segmenter")
        if ckpt is not None:
            self.model = build_segmenter(ckpt)
            self.arch = self.model.config
            if infer is None and ckpt.get("infer"):
                infer = InferConfig.from_dict(dict(ckpt["infer"]))
        else:
            self.arch = arch or ArchConfig()
            self.model = AttentionUNet(self.arch)
        self.infer = infer or InferConfig()
        if ckpt is not None:
            # a model keeps the network scale it was trained at (None: images' own scale)
            stored = (ckpt.get("train") or {}).get("target_diameter")
            self.config = dataclasses.replace(self.config, target_diameter=stored)
        self.train_images, self.train_labels = self._to_network_scale(
            self.train_images, self.train_labels
        )
        self.val_images, self.val_labels = self._to_network_scale(self.val_images, self.val_labels)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        if opt_state:
            self.optimizer.load_state_dict(opt_state)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.5, patience=self.config.plateau_patience
        )
        self.best_state = copy.deepcopy(self.model.state_dict())
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
        self.stopped_by = "epochs"

    # ------------------------------------------------------------------ helpers
    def _factor(self, image: np.ndarray, labels: np.ndarray) -> float:
        """Resampling factor that brings a labelled image to the network scale: from its
        particles' median diameter, or, for an image without particles, from the same
        estimate inference would make (so empty fields are seen as they will be met)."""
        target = self.config.target_diameter
        if not target:
            return 1.0
        diameter = median_diameter(labels, min_area=4)
        if diameter is None:
            diameter = estimate_diameter(image)
        return scale_factor(diameter, target)

    def _to_network_scale(
        self, images: list[np.ndarray], labels: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Resample each pair so its particles' median diameter is ``target_diameter``
        (images without particles keep their scale)."""
        if not self.config.target_diameter:
            return list(images), list(labels)
        out_i, out_l = [], []
        for image, lab in zip(images, labels):
            image, lab = np.asarray(image), np.asarray(lab)
            factor = self._factor(image, lab)
            if abs(factor - 1.0) > 1e-3:
                image, lab = rescale_pair(image.astype(np.float32), lab, factor)
            out_i.append(image)
            out_l.append(lab)
        return out_i, out_l

    @property
    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch > 0:
            return self.config.steps_per_epoch
        per_batch = self.config.patch_size**2 * self.config.batch_size
        return max(1, math.ceil(self.sampler.pixels / per_batch))

    @property
    def device_name(self) -> str:
        return describe_device(self.device)

    def _predict_fn(self):
        model, device = self.model, self.device

        def fn(x: torch.Tensor) -> torch.Tensor:
            return maps_from_logits(model(x.to(device)))

        return fn

    def validate(self) -> dict[str, float]:
        """Segment the validation images with the current model; mean metrics."""
        if not self.val_images:
            return {}
        self.model.eval()
        rows = []
        fn = self._predict_fn()
        for image, lab in zip(self.val_images, self.val_labels):
            maps = run_to_end(
                predict_tiled(
                    fn,
                    image,
                    tile_size=self.infer.tile_size,
                    overlap=self.infer.overlap,
                    batch_size=self.infer.batch_size,
                    divisor=self.arch.divisor,
                    device=self.device,
                    channels_last=False,
                )
            )
            pred = instances_from_maps(
                maps[0],
                maps[1] if self.arch.dist_head else None,
                threshold=self.infer.threshold,
                seed_threshold=self.infer.seed_threshold,
                split=self.infer.split,
                fill_holes=self.infer.fill_holes,
                min_size=self.infer.min_size,
            )
            rows.append(evaluate_pair(pred, np.asarray(lab)))
        self.model.train()
        return mean_metrics(rows)

    def save(
        self,
        path: str | os.PathLike,
        *,
        state: dict | None = None,
        epoch: int,
        metrics: dict[str, float],
        with_optimizer: bool = True,
    ) -> Path:
        """Write a checkpoint of ``state`` (default: the current weights)."""
        model = self.model
        if state is not None:
            model = AttentionUNet(self.arch)
            model.load_state_dict(state)
        return save_checkpoint(
            path,
            model,
            arch=self.arch,
            train=self.config.to_dict(),
            infer=self.infer.to_dict(),
            seed=self.config.seed,
            epoch=epoch,
            step=self.step,
            metrics=metrics,
            optimizer=self.optimizer.state_dict() if with_optimizer else None,
            extra={"history": self.history},
        )

    def best_model(self) -> AttentionUNet:
        """A CPU copy of the best model so far, in eval mode."""
        model = AttentionUNet(self.arch)
        model.load_state_dict(self.best_state)
        return model.eval()

    # ------------------------------------------------------------------ main loop
    def run(self) -> Generator[Progress, None, TrainResult]:
        """Train; yields progress after every step and validation; returns the result."""
        cfg = self.config
        spe = self.steps_per_epoch
        epochs_left = max(0, cfg.epochs - self.start_epoch)
        total = spe * epochs_left
        budget = cfg.max_minutes * 60.0 if cfg.max_minutes else None
        t0 = time.perf_counter()
        done = 0
        self.model.train()
        epoch = self.start_epoch
        for epoch in range(self.start_epoch + 1, cfg.epochs + 1):
            losses: list[float] = []
            out_of_time = False
            for _ in range(spe):
                x, fg, dist = self.sampler.sample(cfg.batch_size)
                x, fg, dist = x.to(self.device), fg.to(self.device), dist.to(self.device)
                logits = self.model(x)
                loss, parts = segmentation_loss(logits, fg, dist, cfg)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                done += 1
                losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t0
                eta = elapsed / done * (total - done)
                if budget is not None:
                    eta = min(eta, max(0.0, budget - elapsed))
                yield Progress(
                    "train",
                    done,
                    total,
                    eta_s=eta,
                    message=f"epoch {epoch}/{cfg.epochs} step {done}/{total} loss {losses[-1]:.4f}",
                    data={
                        "epoch": epoch,
                        "loss": losses[-1],
                        **parts,
                        "lr": self.optimizer.param_groups[0]["lr"],
                    },
                )
                if budget is not None and elapsed >= budget:
                    out_of_time = True
                    break
            record: dict[str, Any] = {
                "epoch": epoch,
                "step": self.step,
                "loss": float(np.mean(losses)) if losses else float("nan"),
            }
            last = epoch == cfg.epochs or out_of_time
            if epoch % cfg.val_every == 0 or last:
                metrics = self.validate()
                record.update({f"val_{k}": v for k, v in metrics.items()})
                improved = False
                if metrics:
                    score = (metrics["f1@0.5"], metrics["dice"])
                    self.scheduler.step(score[0])
                    improved = score > self.best_score
                else:  # no validation images: keep the latest model
                    improved = True
                    metrics = {"train_loss": record["loss"]}
                if improved:
                    self.best_score = (metrics.get("f1@0.5", 0.0), metrics.get("dice", 0.0))
                    self.best_metrics = dict(metrics)
                    self.best_state = copy.deepcopy(
                        {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
                    )
                self.history.append(record)
                if improved and self.out is not None:
                    self.save(self.out, epoch=epoch, metrics=self.best_metrics)
                yield Progress(
                    "validate",
                    done,
                    total,
                    eta_s=None,
                    message=(
                        f"epoch {epoch}: loss {record['loss']:.4f}"
                        + (
                            f", val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"
                            if "dice" in metrics
                            else ""
                        )
                        + (" (best)" if improved else "")
                    ),
                    data={**record, "improved": improved},
                )
            else:
                self.history.append(record)
            if out_of_time:
                self.stopped_by = "time"
                break
        return TrainResult(
            model=self.best_model(),
            best_metrics=self.best_metrics,
            history=self.history,
            checkpoint=self.out,
            stopped_by=self.stopped_by,
        )
