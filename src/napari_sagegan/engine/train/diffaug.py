"""DiffAugment (Zhao et al. 2020) for the image discriminator of SAGE-GAN phase 2.

Differentiable augmentations applied to *both* real and generated images before D_img, so
the discriminator cannot memorise a few-shot training set while gradients still reach G.
Each operation is applied to each sample independently with probability ``p`` (SAGE-GAN:
0.2):

* brightness: ``x + u``, ``u ~ U(-0.5, 0.5)``;
* contrast: ``(x - mean) * u + mean``, ``u ~ U(0.5, 1.5)``;
* translation: integer shift of up to 1/8 of the side, zeros (mid grey) shifted in;
* cutout: a square of half the side set to 0 at a random position.

All randomness comes from an optional ``torch.Generator`` (seeded runs repeat exactly).
Shapes: ``(N, C, H, W)`` in, same out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICY = ("brightness", "contrast", "translation", "cutout")


def _rand(shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device="cpu").to(x.device, x.dtype)


def _brightness(x, g):
    return x + (_rand((x.shape[0], 1, 1, 1), x, g) - 0.5)


def _contrast(x, g):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((x.shape[0], 1, 1, 1), x, g) + 0.5) + mean


def _translation(x, g, ratio: float = 0.125):
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.floor(_rand((n,), x, g) * (2 * sy + 1)) - sy
    dx = torch.floor(_rand((n,), x, g) * (2 * sx + 1)) - sx
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None, :] - dy[:, None]  # (N, H)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, :] - dx[:, None]  # (N, W)
    # normalised sampling grid (align_corners=True): pixel i -> -1 + 2 i / (side - 1)
    gy = (2.0 * ys / max(h - 1, 1) - 1.0)[:, :, None].expand(n, h, w)
    gx = (2.0 * xs / max(w - 1, 1) - 1.0)[:, None, :].expand(n, h, w)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=True)


def _cutout(x, g, ratio: float = 0.5):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.floor(_rand((n,), x, g) * (h + (1 - ch % 2)))
    cx = torch.floor(_rand((n,), x, g) * (w + (1 - cw % 2)))
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None]
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :]
    inside = (
        ((ys - cy[:, None, None]).abs() < ch / 2) & ((xs - cx[:, None, None]).abs() < cw / 2)
    ).to(x.dtype)
    return x * (1.0 - inside[:, None])


_OPS = {
    "brightness": _brightness,
    "contrast": _contrast,
    "translation": _translation,
    "cutout": _cutout,
}


def diff_augment(
    x: torch.Tensor,
    p: float = 0.2,
    policy: tuple[str, ...] = POLICY,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply the DiffAugment ``policy`` to ``x (N, C, H, W)``, each op per sample with prob. ``p``.

    Differentiable with respect to ``x``. ``p = 0`` returns ``x`` unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the DiffAugment probability must be in [0, 1], got {p}")
    unknown = [op for op in policy if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op {unknown[0]!r}; choose from {', '.join(_OPS)}")
    if p == 0.0:
        return x
    for op in policy:
        apply = (_rand((x.shape[0], 1, 1, 1), x, generator) < p).to(x.dtype)
        x = apply * _OPS[op](x, generator) + (1.0 - apply) * x
    return x
