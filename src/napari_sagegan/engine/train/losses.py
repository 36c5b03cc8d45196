"""Segmentation losses.

Shapes: ``logits (N, C, H, W)`` with channels 0-1 the class logits (background, particle)
and, when present, channel 2 the distance-map logit; ``fg (N, H, W)`` int64 class indices;
``dist (N, H, W)`` float targets in [0, 1].

Default (SAGE-GAN): ``L = focal + tversky`` with

* focal, **per pixel** (the authors apply it to the batch-mean cross-entropy, which only
  rescales the loss): ``FL = mean_i alpha (1 - p_i)^gamma CE_i``, ``p_i = exp(-CE_i)``;
* Tversky on the particle probability ``q``:
  ``1 - TP / (TP + a FP + b FN)`` with ``TP = sum q g``, ``FP = sum q (1 - g)``,
  ``FN = sum (1 - q) g``, ``a = 0.3``, ``b = 0.7`` (recall-leaning).

Option (cGAN-Seg): ``L = CE + (1 - soft Dice)``.

The boundary-aware head adds ``dist_weight * BCE(sigmoid(d), dist)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_sagegan.engine.config import TrainConfig

_EPS = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float):
    """Per-pixel focal loss on class logits ``(N, 2, H, W)`` and targets ``(N, H, W)``."""
    ce = F.cross_entropy(logits, target, reduction="none")
    pt = torch.exp(-ce)
    return (alpha * (1.0 - pt).pow(gamma) * ce).mean()


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, fp: float, fn: float):
    """Tversky loss of the particle class over the whole batch."""
    q = torch.softmax(logits, dim=1)[:, 1]
    g = target.float()
    tp = (q * g).sum()
    fp_sum = (q * (1.0 - g)).sum()
    fn_sum = ((1.0 - q) * g).sum()
    return 1.0 - (tp + _EPS) / (tp + fp * fp_sum + fn * fn_sum + _EPS)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor):
    """``1 - soft Dice`` of the particle class over the whole batch."""
    q = torch.softmax(logits, dim=1)[:, 1]
    g = target.float()
    inter = (q * g).sum()
    return 1.0 - (2.0 * inter + _EPS) / (q.sum() + g.sum() + _EPS)


def segmentation_loss(
    logits: torch.Tensor,
    fg: torch.Tensor,
    dist: torch.Tensor | None,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total training loss and its named terms (as floats, for progress reports)."""
    cls = logits[:, :2].float()
    parts: dict[str, torch.Tensor] = {}
    if config.loss == "focal_tversky":
        parts["focal"] = focal_loss(cls, fg, config.focal_alpha, config.focal_gamma)
        parts["tversky"] = tversky_loss(cls, fg, config.tversky_fp, config.tversky_fn)
    else:
        parts["ce"] = F.cross_entropy(cls, fg)
        parts["dice"] = soft_dice_loss(cls, fg)
    if dist is not None and logits.shape[1] > 2 and config.dist_weight > 0:
        parts["dist"] = config.dist_weight * F.binary_cross_entropy_with_logits(
            logits[:, 2].float(), dist
        )
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}
