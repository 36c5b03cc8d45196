"""The Attention U-Net segmenter (phase 1 of SAGE-GAN).

Shapes: input ``(N, in_channels, H, W)`` with ``H`` and ``W`` multiples of ``2**depth``
(the tiler pads); output logits ``(N, n_classes + dist_head, H, W)``.

Architecture (method.md): an encoder of ``depth`` levels, each ``[Conv3x3 -> BN -> ReLU] x 2``
then 2x2 max-pooling, channels ``base * 2**i``; a bottleneck of ``base * 2**depth`` channels;
decoder levels made of a 2x2 stride-2 transposed convolution, an additive attention gate on
the skip connection (Oktay et al. 2018)::

    psi = sigmoid(BN(conv1x1_{F_int -> 1}(relu(BN(conv1x1(g)) + BN(conv1x1(x))))))
    gated = x * psi

with ``g`` the upsampled decoder feature, ``x`` the skip and ``F_int = channels / 2``, a
concatenation and ``Conv-BN-ReLU-Dropout-Conv-BN-ReLU``. A 1x1 head gives the two class
logits (background, particle) and, with ``dist_head``, one more channel: the logit of the
per-instance normalised distance to the particle's edge, used to split touching particles.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ArchConfig


class ConvBlock(nn.Sequential):
    """``[Conv3x3 -> BN -> ReLU] x 2`` with optional dropout after the first ReLU."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class AttentionGate(nn.Module):
    """Additive attention gate; returns the gated skip and the gate map ``psi (N,1,H,W)``."""

    def __init__(self, c_gate: int, c_skip: int, c_int: int) -> None:
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(c_gate, c_int, 1), nn.BatchNorm2d(c_int))
        self.w_x = nn.Sequential(nn.Conv2d(c_skip, c_int, 1), nn.BatchNorm2d(c_int))
        self.psi = nn.Sequential(nn.Conv2d(c_int, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        psi = self.psi(F.relu(self.w_g(g) + self.w_x(x)))
        return x * psi, psi


class DecoderLevel(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.gate = AttentionGate(c_out, c_out, max(1, c_out // 2))
        self.conv = ConvBlock(2 * c_out, c_out, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.up(x)
        if g.shape[-2:] != skip.shape[-2:]:
            g = F.interpolate(g, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        gated, psi = self.gate(g, skip)
        return self.conv(torch.cat([gated, g], dim=1)), psi


class AttentionUNet(nn.Module):
    """Attention U-Net with an optional boundary-aware distance head.

    Parameters
    ----------
    config : ArchConfig
        Architecture (depth, base channels, dropout, heads).
    """

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.config = config
        chans = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.encoder = nn.ModuleList()
        c_prev = config.in_channels
        for c in chans:
            self.encoder.append(ConvBlock(c_prev, c))
            c_prev = c
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList(
            DecoderLevel(chans[i + 1], chans[i], config.dropout)
            for i in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(chans[0], config.out_channels, 1)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Compute logits ``(N, out_channels, H, W)``.

        With ``return_attention`` also return the last (finest) attention gate's map
        ``psi`` of shape ``(N, 1, H, W)``; it is also kept in ``self.last_attention``.
        """
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < self.config.depth:
                skips.append(x)
                x = self.pool(x)
        psi = None
        for level, skip in zip(self.decoder, reversed(skips)):
            x, psi = level(x, skip)
        self.last_attention = psi.detach() if psi is not None else None
        logits = self.head(x)
        if return_attention:
            return logits, psi
        return logits


def maps_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Turn logits ``(N, C, H, W)`` into probability maps ``(N, 1 + dist, H, W)``.

    Channel 0 is the particle probability (softmax over the two classes); channel 1, when
    the network has a distance head, is the normalised distance in [0, 1] (sigmoid).
    """
    prob = torch.softmax(logits[:, :2].float(), dim=1)[:, 1:2]
    if logits.shape[1] > 2:
        return torch.cat([prob, torch.sigmoid(logits[:, 2:3].float())], dim=1)
    return prob


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fuse_batchnorm(model: AttentionUNet) -> AttentionUNet:
    """Return an inference copy of ``model`` with every BatchNorm folded into its convolution.

    In eval mode ``BN(conv(x))`` is an affine map of ``conv(x)``, so it can be absorbed into
    the convolution's weights and bias: same output (to float rounding), one pass less over
    every feature map. Used by the segmenter for inference; never for training.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
                seq[i + 1] = nn.Identity()
    return fused
