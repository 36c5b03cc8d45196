"""Pre-training of phase 2's mask -> image generator on its own (the bundled generator).

Phase 2 (:mod:`~napari_sagegan.engine.train.gan`) trains the generator ``G`` together with
the segmenter, two discriminators and the cycle terms; started from random weights, minutes
of CPU give grey blobs. This trainer teaches ``G`` to draw micrographs first, on many pairs
(real EM images with their masks and generated exact-label pairs), with only the terms that
concern ``G``: the image identity terms of phase 2 and its image discriminator::

    x_hat  = G(m, z)
    L_G    = w_adv * MSE(D(DA(x_hat)), 1) + w_l1 * L1(x_hat, x) + w_p * (1 - MS-SSIM(x_hat, x))
    L_D    = 0.5 [MSE(D(DA(x)), 1) + MSE(D(DA(x_hat.detach())), 0)]

The result is an ordinary ``kind="generator"`` checkpoint (with the mask statistics that
:func:`napari_sagegan.api.generate` draws layouts from), so phase 2 can start from it
(``GanTrainer(..., init_generator=...)``) and ``generate`` can use it without any training.
Pairs are resampled to the network scale ``target_diameter`` (the bundled segmenter's), the
scale phase 2 works at.

Validation: mean SSIM of ``G(m)`` (fixed latent) against the paired real crops, and the same
for a flat image at each crop's mean (the baseline a generator must beat: a grey field scores
well on SSIM's luminance term).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import GENERATOR, Checkpoint, state_on_cpu
from ..config import GanConfig
from ..nets.discriminator import DiscriminatorConfig, PatchDiscriminator
from ..nets.generator import GeneratorConfig, StyleUNetGenerator
from .diffaug import diff_augment
from .gan import centre_crops, phase2_sampler
from .loop import Fit
from .losses import ms_ssim_loss, mse_to, set_requires_grad, ssim_index

#: Validation crops scored per validation (fixed centre crops of the validation pairs).
N_VAL_CROPS = 16


class GeneratorTrainer(Fit):
    """Train ``G`` (and an image discriminator) on image/mask pairs.

    Parameters
    ----------
    images, labels : sequences of np.ndarray
        2-D micrographs and their instance (or binary) masks.
    config : GanConfig
        Weights (``w_id_l1``, ``w_p``, ``w_adv_img``), ``style_mixing``, ``diffaug_p`` and the
        architecture sizes; ``config.train`` holds the budget, patches, batch and lr.
    target_diameter : float, optional
        Network scale the pairs are resampled to (particle diameter in pixels).
    init : path or Checkpoint, optional
        A generator checkpoint to continue from (new optimisers; the discriminator too when
        the checkpoint holds one, see :meth:`checkpoint`).
    """

    record_keys = ("loss", "adv", "l1", "ssim_loss", "d")

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: GanConfig | None = None,
        *,
        target_diameter: float | None = None,
        init: str | os.PathLike | Checkpoint | None = None,
        device: str = "cpu",
        val_images: Sequence[np.ndarray] | None = None,
        val_labels: Sequence[np.ndarray] | None = None,
    ) -> None:
        self._init_fit()
        self.config = cfg = config or GanConfig()
        self.train_config = cfg.train
        pairs = self._setup(
            images, labels, cfg.train, device=device, val_images=val_images, val_labels=val_labels
        )
        self.target_diameter = target_diameter
        self.pairs = pairs.at_scale(target_diameter)
        init_ck = Checkpoint.load(init, kind=GENERATOR) if init is not None else None
        self.gen_config = (
            GeneratorConfig.from_dict(dict(init_ck.arch))
            if init_ck is not None
            else GeneratorConfig(
                base_channels=cfg.gen_base_channels, depth=cfg.gen_depth, z_dim=cfg.z_dim
            )
        )
        self.disc_config = DiscriminatorConfig(
            base_channels=cfg.disc_base_channels, attention=cfg.disc_attention
        )
        self.sampler = phase2_sampler(
            self.train_images, self.train_labels, cfg.train, self.gen_config.divisor
        )
        self.G = StyleUNetGenerator(self.gen_config).to(self.device)
        if init_ck is not None:
            self.G.load_state_dict({k: v.float() for k, v in init_ck.state_dict.items()})
            self.step = int(init_ck.step or 0)
            trainer_state = dict(init_ck.extra or {}).get("trainer")
        else:
            trainer_state = None
        self.D = PatchDiscriminator(self.disc_config).to(self.device)
        adam = dict(lr=cfg.train.lr, betas=(cfg.beta1, cfg.beta2))
        self.opt_g = torch.optim.Adam(self.G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), **adam)
        if trainer_state:
            self.D.load_state_dict({k: v.float() for k, v in trainer_state["d"].items()})
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed)
        from ..synthetic.layouts import fit_stats

        self.mask_stats = fit_stats(self.train_labels)
        self._val = self._val_crops()
        self.best_ssim = -2.0
        self.best_gen_state: dict | None = None
        self.gen_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def _val_crops(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return centre_crops(
            self.val_images or self.train_images,
            self.val_labels or self.train_labels,
            self.config.train.patch_size,
            self.gen_config.divisor,
            limit=N_VAL_CROPS,
        )

    # ------------------------------------------------------------------ one step
    def train_step(self, epoch: int) -> dict[str, float]:
        c = self.config
        x, fg, _dist = self.sampler.sample(c.train.batch_size)
        x = x.to(self.device)
        m = fg[:, None].float().to(self.device)
        self.G.train()
        snap = self.snapshot(self.G, self.D)  # a step that is not finite is undone
        fake = self.G(m, mixing=c.style_mixing)
        set_requires_grad(self.D, False)
        adv = c.w_adv_img * mse_to(
            self.D(diff_augment(fake, c.diffaug_p, generator=self.aug_gen)), 1.0
        )
        l1 = c.w_id_l1 * F.l1_loss(fake, x)
        ssim_l = 0.5 * c.w_p * ms_ssim_loss(fake, x)
        loss = adv + l1 + ssim_l
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        g_ok = self.finite_update(loss.detach(), self.opt_g, snap)
        set_requires_grad(self.D, True)
        self.opt_d.zero_grad(set_to_none=True)
        d = torch.tensor(math.nan)
        if g_ok:  # the fakes of undone weights train no discriminator either
            real_s = self.D(diff_augment(x, c.diffaug_p, generator=self.aug_gen))
            fake_s = self.D(diff_augment(fake.detach(), c.diffaug_p, generator=self.aug_gen))
            d = 0.5 * (mse_to(real_s, 1.0) + mse_to(fake_s, 0.0))
            d.backward()
            self.finite_update(d.detach(), self.opt_d, snap, (self.D,))
        self.step += 1
        return {
            "loss": float(loss.detach()),
            "adv": float(adv.detach()),
            "l1": float(l1.detach()),
            "ssim_loss": float(ssim_l.detach()),
            "d": float(d.detach()),
        }

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def scores(self) -> dict[str, float]:
        """``ssim``: mean SSIM of ``G(m)`` (fixed latents) against the real crops;
        ``flat_ssim``: the same for a flat image at each crop's mean."""
        if not self._val:
            return {"ssim": float("nan"), "flat_ssim": float("nan")}
        self.G.eval()
        gen = torch.Generator().manual_seed(12345)
        vals, flat = [], []
        for x, m in self._val:
            z = torch.randn(1, self.gen_config.z_dim, generator=gen).to(self.device)
            fake = self.G(m.to(self.device), z).clamp(-1, 1).cpu()
            vals.append(float(ssim_index(fake, x)[0]))
            flat.append(float(ssim_index(torch.full_like(x, float(x.mean())), x)[0]))
        self.G.train()
        return {"ssim": float(np.mean(vals)), "flat_ssim": float(np.mean(flat))}

    def validate_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[str, bool]:
        s = self.scores()
        record.update({f"val_{k}": v for k, v in s.items()})
        improved = math.isfinite(s["ssim"]) and s["ssim"] > self.best_ssim
        if improved:
            self.best_ssim = s["ssim"]
            self.best_gen_state = state_on_cpu(self.G)
            self.gen_metrics = {**s, "epoch": float(epoch)}
        msg = (
            f"epoch {epoch}: loss {record.get('loss', float('nan')):.3f}, G SSIM "
            f"{s['ssim']:.3f} (flat image {s['flat_ssim']:.3f})" + (" (best)" if improved else "")
        )
        return msg, improved

    # ------------------------------------------------------------------ results
    def checkpoint(
        self, *, best: bool = True, half: bool = False, trainer_state: bool = False
    ) -> Checkpoint:
        """The generator (best so far, or the current weights) as a ``kind="generator"``
        checkpoint; with ``trainer_state`` also the discriminator's weights (float16, to
        continue a campaign; the optimisers start afresh, as in the segmenter's campaign)."""
        state = self.best_gen_state if (best and self.best_gen_state) else state_on_cpu(self.G)
        model = StyleUNetGenerator(self.gen_config)
        model.load_state_dict(state)
        return Checkpoint.from_model(
            model,
            kind=GENERATOR,
            arch=self.gen_config,
            train=self.config,
            target_diameter=self.target_diameter,
            seed=self.config.train.seed,
            step=self.step,
            metrics=self.gen_metrics or self.scores(),
            half=half,
            extra={
                "mask_stats": self.mask_stats,
                **(
                    {"trainer": {"d": {k: v.half() for k, v in state_on_cpu(self.D).items()}}}
                    if trainer_state
                    else {}
                ),
            },
        )

    def result(self) -> Checkpoint:
        return self.checkpoint()

    def save(self, path: str | os.PathLike, **kw: Any) -> Path:
        return self.checkpoint(**kw).save(path)
