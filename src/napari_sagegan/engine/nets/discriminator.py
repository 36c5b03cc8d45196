"""PatchGAN discriminator with an optional linear-attention block (SAGE-GAN phase 2).

pix2pix's 70x70 PatchGAN: 4x4 convolutions, ``n_layers`` of them with stride 2 (channel
doubling, capped at 8x), one with stride 1, then a 4x4 stride-1 convolution to one logit per
patch; BatchNorm after every convolution but the first and the last; LeakyReLU(0.2). The
authors add a linear-attention block after the first convolution (``attention=True``).

Shapes: input ``(N, in_channels, H, W)``; output ``(N, 1, h, w)`` whose size follows the
input (never hard-coded: the loss builds its targets with ``torch.full_like``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import _Config


@dataclass(frozen=True)
class DiscriminatorConfig(_Config):
    in_channels: int = 1
    base_channels: int = 32
    n_layers: int = 3
    attention: bool = True

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.base_channels < 1:
            raise ValueError("discriminator n_layers and base_channels must be at least 1")


class LinearAttention(nn.Module):
    """Efficient (linear) attention: softmax over channels for queries, over positions for
    keys; cost linear in the number of pixels. Residual with a learned gain starting at 0::

        out = x + gamma * proj(softmax_c(q) @ (softmax_hw(k)^T v))
    """

    def __init__(self, channels: int, key_channels: int | None = None) -> None:
        super().__init__()
        kc = key_channels or max(1, channels // 2)
        self.q = nn.Conv2d(channels, kc, 1)
        self.k = nn.Conv2d(channels, kc, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = torch.softmax(self.q(x).flatten(2), dim=1)  # (N, kc, HW)
        k = torch.softmax(self.k(x).flatten(2), dim=2)  # (N, kc, HW)
        v = self.v(x).flatten(2)  # (N, c, HW)
        context = torch.bmm(k, v.transpose(1, 2))  # (N, kc, c)
        out = torch.bmm(context.transpose(1, 2), q).reshape(n, c, h, w)
        return x + self.gamma * self.proj(out)


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per overlapping patch."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        cfg = config or DiscriminatorConfig()
        self.config = cfg
        b = cfg.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.in_channels, b, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        if cfg.attention:
            layers.append(LinearAttention(b))
        c = b
        for i in range(1, cfg.n_layers):
            c_out = b * min(2**i, 8)
            layers += [
                nn.Conv2d(c, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
            c = c_out
        c_out = b * min(2**cfg.n_layers, 8)
        layers += [
            nn.Conv2d(c, c_out, 4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c_out, 1, 4, stride=1, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
