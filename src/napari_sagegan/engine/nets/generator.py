"""The mask -> image generator G of SAGE-GAN phase 2 (method.md).

A U-Net whose encoder reads the particle mask and whose decoder is made of StyleGAN2
modulated / demodulated convolutions driven by a style ``w`` from a mapping MLP::

    w = mapping(z),  z ~ N(0, I_128)
    modconv(x; w):  s = A(w);  W'_{oik} = s_i W_{oik};  W''_{oik} = W'_{oik} / sqrt(sum_{ik} W'^2 + eps)
    y = W'' * x + B * n + b,  n ~ N(0, 1) per pixel,  B a learned scale per channel

Style mixing: with probability ``style_mixing`` (training only) two latents are drawn and the
decoder's styles switch from ``w1`` to ``w2`` at a random layer. The output is linear (no
tanh): images live in [-1, 1] and are clamped only when written out.

Shapes: mask ``(N, 1, H, W)`` in {0, 1} (H, W multiples of ``2**depth``); latent ``z``
``(N, z_dim)`` or ``(N, n_styles, z_dim)``; output ``(N, 1, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _Config


@dataclass(frozen=True)
class GeneratorConfig(_Config):
    """Architecture of the generator.

    Attributes
    ----------
    in_channels, out_channels : int
        Mask channels (1: binary particle mask) and image channels (1: grayscale).
    base_channels : int
        Channels of the first encoder level; level ``i`` has ``base * 2**i`` (at most 8x).
    depth : int
        Down-sampling steps; inputs must be multiples of ``2**depth``.
    z_dim, w_dim : int
        Latent and style sizes (paper: 128).
    mapping_layers : int
        Fully connected layers of the mapping MLP.
    """

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 4
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 6:
            raise ValueError(f"generator depth must be between 1 and 6, got {self.depth}")
        if self.base_channels < 2:
            raise ValueError(f"generator base_channels must be >= 2, got {self.base_channels}")
        if self.z_dim < 1 or self.w_dim < 1 or self.mapping_layers < 1:
            raise ValueError("z_dim, w_dim and mapping_layers must be at least 1")

    @property
    def divisor(self) -> int:
        return 2**self.depth

    def channels(self) -> list[int]:
        return [self.base_channels * min(2**i, 8) for i in range(self.depth + 1)]

    @property
    def n_styles(self) -> int:
        """Style inputs: two per decoder level, two at the bottleneck, one for the output."""
        return 2 * self.depth + 3


class MappingNetwork(nn.Module):
    """``z (N, z_dim) -> w (N, w_dim)``: pixel-norm then ``mapping_layers`` x (Linear, LReLU)."""

    def __init__(self, z_dim: int, w_dim: int, n_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = z_dim
        for _ in range(n_layers):
            layers += [nn.Linear(c, w_dim), nn.LeakyReLU(0.2)]
            c = w_dim
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + 1e-8)
        return self.net(z)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (per-sample weights through a grouped conv).

    Input ``(N, c_in, H, W)`` and style ``w (N, w_dim)``; output ``(N, c_out, H, W)``.
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True
    ) -> None:
        super().__init__()
        self.c_in, self.c_out, self.kernel = c_in, c_out, kernel
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.scale = 1.0 / math.sqrt(c_in * kernel * kernel)
        self.affine = nn.Linear(w_dim, c_in)
        nn.init.zeros_(self.affine.weight)
        nn.init.ones_(self.affine.bias)  # styles start at 1: a plain convolution
        self.demodulate = demodulate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, c, h, wd = x.shape
        s = self.affine(w)  # (N, c_in)
        weight = self.scale * self.weight[None] * s[:, None, :, None, None]
        if self.demodulate:
            d = torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
            weight = weight * d
        weight = weight.reshape(n * self.c_out, c, self.kernel, self.kernel)
        out = F.conv2d(x.reshape(1, n * c, h, wd), weight, padding=self.kernel // 2, groups=n)
        return out.reshape(n, self.c_out, h, wd)


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise ``(N, 1, H, W)`` scaled by a learned weight per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device)
        return x + self.weight * noise


class StyledConv(nn.Module):
    """Modulated 3x3 conv -> per-pixel noise -> bias -> LeakyReLU(0.2)."""

    def __init__(self, c_in: int, c_out: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim)
        self.noise = NoiseInjection(c_out)
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.act(self.noise(self.conv(x, w)) + self.bias)


class _EncoderBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.LeakyReLU(0.2),
        )


class StyleUNetGenerator(nn.Module):
    """Mask -> image U-Net with a style-modulated decoder.

    Parameters
    ----------
    config : GeneratorConfig
        Architecture.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels()
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.mapping_layers)
        self.encoder = nn.ModuleList()
        c_prev = config.in_channels
        for c in ch[:-1]:
            self.encoder.append(_EncoderBlock(c_prev, c))
            c_prev = c
        self.pool = nn.AvgPool2d(2)
        self.bottleneck = nn.ModuleList(
            [StyledConv(ch[-2], ch[-1], config.w_dim), StyledConv(ch[-1], ch[-1], config.w_dim)]
        )
        self.decoder = nn.ModuleList()
        for i in reversed(range(config.depth)):
            self.decoder.append(
                nn.ModuleList(
                    [
                        StyledConv(ch[i + 1] + ch[i], ch[i], config.w_dim),
                        StyledConv(ch[i], ch[i], config.w_dim),
                    ]
                )
            )
        self.to_image = ModulatedConv2d(ch[0], config.out_channels, 1, config.w_dim, False)
        self.out_bias = nn.Parameter(torch.zeros(1, config.out_channels, 1, 1))

    def styles(
        self, n: int, z: torch.Tensor | None, mixing: float, device: torch.device
    ) -> torch.Tensor:
        """Per-layer styles ``(N, n_styles, w_dim)`` from ``z`` (drawn when ``None``)."""
        k = self.config.n_styles
        if z is None:
            z = torch.randn(n, self.config.z_dim, device=device)
            if mixing > 0 and float(torch.rand(())) < mixing:
                z2 = torch.randn(n, self.config.z_dim, device=device)
                cut = int(torch.randint(1, k, ()))
                w1, w2 = self.mapping(z), self.mapping(z2)
                return torch.cat(
                    [w1[:, None].expand(n, cut, -1), w2[:, None].expand(n, k - cut, -1)], dim=1
                )
        if z.dim() == 3:  # one latent per layer
            return self.mapping(z)
        return self.mapping(z)[:, None].expand(n, k, -1)

    def forward(
        self, mask: torch.Tensor, z: torch.Tensor | None = None, *, mixing: float = 0.0
    ) -> torch.Tensor:
        """Image ``(N, 1, H, W)`` for masks ``(N, 1, H, W)`` in {0, 1}.

        ``z``: ``(N, z_dim)`` (one style) or ``(N, n_styles, z_dim)``; drawn at random when
        ``None``, with style mixing of two latents with probability ``mixing``.
        """
        d = self.config.divisor
        if mask.shape[-1] % d or mask.shape[-2] % d:
            raise ValueError(
                f"generator input sides must be multiples of {d}, got {tuple(mask.shape[-2:])}"
            )
        ws = self.styles(mask.shape[0], z, mixing, mask.device)
        x = mask * 2.0 - 1.0
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        j = 0
        for conv in self.bottleneck:
            x = conv(x, ws[:, j])
            j += 1
        for (c1, c2), skip in zip(self.decoder, reversed(skips)):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = c1(torch.cat([x, skip], dim=1), ws[:, j])
            x = c2(x, ws[:, j + 1])
            j += 2
        return self.to_image(x, ws[:, j]) + self.out_bias


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``(N, C, H, W)`` at the bottom/right to multiples of ``divisor``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)
