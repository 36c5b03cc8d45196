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

Phase 2 adds the offline perceptual term (:func:`ms_ssim_loss`, ``1 - SSIM`` over three
scales, images ``(N, 1, H, W)`` in [-1, 1]), the least-squares GAN term (:func:`mse_to`) and
:func:`set_requires_grad` (discriminators frozen while the generator steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import TrainConfig

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


# --------------------------------------------------------------------------- phase 2


def _gauss(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_index(a: torch.Tensor, b: torch.Tensor, *, window: int = 7) -> torch.Tensor:
    """Mean SSIM per sample of images ``(N, 1, H, W)`` in [-1, 1] (Gaussian window, sigma 1.5).

    Returns ``(N,)``. Computed on ``(x + 1) / 2`` with ``C1 = 0.01^2``, ``C2 = 0.03^2``.
    """
    a, b = (a + 1.0) / 2.0, (b + 1.0) / 2.0
    win = min(window, a.shape[-1], a.shape[-2])
    k = _gauss(win, 1.5, a.device, a.dtype)
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    saa = F.conv2d(a * a, k) - mu_a**2
    sbb = F.conv2d(b * b, k) - mu_b**2
    sab = F.conv2d(a * b, k) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(dim=1)


def ms_ssim_loss(a: torch.Tensor, b: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """Offline perceptual term ``P = 1 - mean_s SSIM(a_s, b_s)`` over ``scales`` 2x pyramids."""
    vals = []
    for s in range(scales):
        if s and min(a.shape[-2:]) < 16:
            break
        vals.append(ssim_index(a, b).mean())
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return 1.0 - torch.stack(vals).mean()


def set_requires_grad(nets: torch.nn.Module | Sequence[torch.nn.Module], flag: bool) -> None:
    """Switch gradients of every parameter of ``nets`` on or off."""
    if isinstance(nets, torch.nn.Module):
        nets = [nets]
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def mse_to(pred: torch.Tensor, value: float) -> torch.Tensor:
    """Least-squares GAN term ``mean((pred - value)^2)`` (targets built like ``pred``)."""
    return F.mse_loss(pred, torch.full_like(pred, value))
