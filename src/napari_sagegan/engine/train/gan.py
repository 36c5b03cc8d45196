"""Phase 2 of SAGE-GAN: the segmenter inside a CycleGAN (cGAN-Seg style).

Two mappings play the cycle: the segmenter ``S`` (image -> mask, initialised from a phase-1
checkpoint, distance head included) and the generator ``G`` (mask -> image,
:mod:`~napari_sagegan.engine.nets.generator`). Two PatchGAN discriminators judge images
(through DiffAugment) and masks. One iteration on a real pair ``(x, m)`` (``m`` the binary
particle mask, ``dist`` its boundary-aware distance target from the exact instances):

``forward``::

    x_hat = G(m, z)              m_p = argmax S(x)  (hard mask)         x_rec = G(m_p, z')

``backward_G`` (one optimiser over G and S; D frozen with ``set_requires_grad(D, False)``)::

    adv_img  = MSE(D_img(DA(x_hat)), 1)
    adv_mask = MSE(D_mask(m_p), 1)                           (no gradient: m_p is an argmax)
    id_mask  = w_id_mask  * L_seg(S(x), m, dist)              real pairs
    rec_mask = w_rec_mask * L_seg(S(x_hat), m, dist)          synthetic pairs, with prob. mix
    rec_img  = w_rec_l1 * L1(x_rec, x) + w_p     * P(x_rec, x)
    id_img   = w_id_l1  * L1(x_hat, x) + w_p / 2 * P(x_hat, x)
    L_GS     = adv_img + adv_mask + id_mask + rec_mask + rec_img + id_img

``backward_D`` (on detached fakes)::

    L_Dimg  = 0.5 [MSE(D_img(DA(x)), 1) + MSE(D_img(DA(x_hat.detach())), 0)]
    L_Dmask = 0.5 [MSE(D_mask(m), 1)     + MSE(D_mask(m_p), 0)]

``L_seg`` is the phase-1 loss (focal + Tversky + distance BCE), so the synthetic pairs, whose
masks carry exact instances, also train the boundary-aware output. ``P`` is offline by
default: ``1 - SSIM`` averaged over three scales (no VGG download).

Schedule (SAGE-GAN): G frozen for ``freeze_epochs``; the probability ``mix`` of the
synthetic-pair term grows from ``mix_start`` by ``mix_step`` per epoch up to ``mix_max``;
checkpoints considered only after ``select_after`` epochs, selected on validation instance
F1 at IoU 0.5 (ties: Dice). The phase-1 segmenter is validated first and stays the best
unless phase 2 beats it. The generator is selected on validation SSIM of ``G(m)`` against
the paired real image.

This module is about 600 lines, over the house's ~500, because it keeps phase 2 in one place
to read: the equations above, the trainer's set-up, the fixed step vocabulary (``set_input``,
``forward``, ``backward_G``, ``backward_D``, ``optimize``), the generator's scoring and the
three checkpoints it writes; each part uses the others' attributes, and splitting them would
make a reader follow one iteration across files. The loop (budget, ETA, validation,
selection, history, cancel) is
:class:`~napari_sagegan.engine.train.loop.Fit`'s; the settings are a
:class:`~napari_sagegan.engine.config.GanConfig`, whose ``train`` is the segmenter's
:class:`~napari_sagegan.engine.config.TrainConfig`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...util.progress import Progress
from ..checkpoint import (
    GAN_STATE,
    GENERATOR,
    SEGMENTER,
    Checkpoint,
    all_finite,
    state_on_cpu,
)
from ..config import GanConfig, InferConfig
from ..data.augment import GEOMETRIC
from ..data.intensity import normalize
from ..data.sampling import PatchSampler
from ..nets.attention_unet import AttentionUNet
from ..nets.discriminator import DiscriminatorConfig, PatchDiscriminator
from ..nets.generator import GeneratorConfig, StyleUNetGenerator
from .diffaug import diff_augment
from .loop import Fit, validate_segmenter
from .losses import (
    ms_ssim_loss,
    mse_to,
    segmentation_loss,
    set_requires_grad,
    ssim_index,
)


@dataclass
class GanResult:
    """What phase 2 produced (the best models, on the CPU, in eval mode)."""

    segmenter: AttentionUNet
    generator: StyleUNetGenerator
    best_metrics: dict[str, float]
    generator_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "epochs"
    out: Path | None = None
    #: Iterations undone because a loss or the weights were not finite.
    skipped_steps: int = 0


# --------------------------------------------------------------------------- shared parts


def phase2_sampler(images, labels, train: Any, divisor: int) -> PatchSampler:
    """The patch sampler of phase 2 (and of the generator's pre-training): geometric
    augmentations only (intensity ones would teach G other images than the pairs'); refuses a
    patch size that the networks' down-sampling factor ``divisor`` does not divide."""
    if train.patch_size % divisor:
        raise ValueError(
            f"patch_size {train.patch_size} must be a multiple of {divisor} (the networks' "
            "down-sampling factor)"
        )
    return PatchSampler(
        images,
        labels,
        patch_size=train.patch_size,
        fg_bias=train.fg_bias,
        augment_p=train.augment_p,
        augment_ops=GEOMETRIC,
        min_area=train.min_instance_area,
        seed=train.seed + 1,
    )


def centre_crops(
    images, labels, patch: int, divisor: int, *, limit: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``limit`` centre crops ``(image in [-1, 1], particle mask)``, each ``(1, 1, s, s)``
    with ``s`` the patch size (or the image's smaller side) rounded down to ``divisor``."""
    out = []
    for im, lab in zip(images, labels):
        im, lab = np.asarray(im), np.asarray(lab)
        side = min(patch, *im.shape)
        side -= side % divisor
        if side < divisor:
            continue
        y0, x0 = (im.shape[0] - side) // 2, (im.shape[1] - side) // 2
        x = normalize(im)[y0 : y0 + side, x0 : x0 + side]
        fg = (lab > 0)[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
        out.append(
            (
                torch.from_numpy(np.ascontiguousarray(x))[None, None],
                torch.from_numpy(np.ascontiguousarray(fg))[None, None],
            )
        )
        if len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------- trainer


class GanTrainer(Fit):
    """Train phase 2: the segmenter and a generator in a CycleGAN.

    Parameters
    ----------
    images, labels : sequences of np.ndarray
        2-D raw images and their instance (or binary) label maps.
    config : GanConfig
        Settings (weights, schedule; ``config.train``: budget, seed, patches, ``L_seg``).
    seg : str, path, dict or Checkpoint
        The phase-1 segmenter checkpoint (path, ``"default"`` or loaded). Not needed with
        ``resume``. The pairs are resampled once to its network scale.
    resume : str or path, optional
        A ``gan_state.pt`` written by a previous run with ``out``: continue from it.
    out : str or path, optional
        Folder for ``segmenter.pt`` and ``generator.pt`` (best so far, written at every
        improvement) and ``gan_state.pt`` (after every validation, for resuming). All atomic.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    val_images, val_labels : sequences, optional
        An explicit validation set; by default a seeded ``val_fraction`` of the pairs.
    gen_config, disc_config : optional
        Architectures (default: from ``config``).
    init_generator : path, ``"default"`` or Checkpoint, optional
        A generator to start ``G`` from (its architecture replaces ``config``'s), e.g. the
        bundled one, pre-trained on many micrographs; by default ``G`` starts from random
        weights. Not with ``resume``.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: GanConfig | None = None,
        *,
        seg: str | os.PathLike | dict | Checkpoint | None = None,
        resume: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
        device: str = "auto",
        val_images: Sequence[np.ndarray] | None = None,
        val_labels: Sequence[np.ndarray] | None = None,
        gen_config: GeneratorConfig | None = None,
        disc_config: DiscriminatorConfig | None = None,
        init_generator: str | os.PathLike | Checkpoint | None = None,
    ) -> None:
        self._init_fit()
        gen_init = None
        if init_generator is not None and resume is None:
            gen_init = Checkpoint.load(init_generator, kind=GENERATOR)
            gen_config = GeneratorConfig.from_dict(dict(gen_init.arch))
        state = None
        if resume is not None:
            state = Checkpoint.load(resume, kind=GAN_STATE)
            if config is None:
                config = GanConfig.from_dict(dict(state.train or {}))
            seg = Checkpoint(
                kind=SEGMENTER,
                arch=state.extra["seg_arch"],
                state_dict=state.extra["segmenter"],
                infer=state.extra.get("infer"),
                target_diameter=state.target_diameter,
            )
            gen_config = GeneratorConfig.from_dict(dict(state.arch))
            disc_config = DiscriminatorConfig.from_dict(dict(state.extra["disc_arch"]))
        self.config = cfg = config or GanConfig()
        if seg is None:
            raise ValueError("phase 2 needs a phase-1 segmenter: give seg=MODEL.pt or 'default'")
        seg_ckpt = Checkpoint.load(seg, kind=SEGMENTER)
        self.out = Path(out) if out is not None else None
        if self.out is not None and not self.out.is_dir():
            raise FileNotFoundError(f"output folder {self.out} does not exist; create it first")
        pairs = self._setup(
            images, labels, cfg.train, device=device, val_images=val_images, val_labels=val_labels
        )
        self.S: AttentionUNet = seg_ckpt.build()
        self.seg_arch = self.S.config
        self.infer = (
            InferConfig.from_dict(dict(seg_ckpt.infer)) if seg_ckpt.infer else InferConfig()
        )
        #: ``L_seg``'s settings and the loop's; the network scale is the phase-1 model's
        self.seg_config = cfg.train.replace(target_diameter=seg_ckpt.target_diameter)
        self.train_config = self.seg_config
        self.pairs = pairs.at_scale(self.seg_config.target_diameter)
        self.S.to(self.device)
        self.gen_config = gen_config or GeneratorConfig(
            base_channels=cfg.gen_base_channels, depth=cfg.gen_depth, z_dim=cfg.z_dim
        )
        self.disc_config = disc_config or DiscriminatorConfig(
            base_channels=cfg.disc_base_channels, attention=cfg.disc_attention
        )
        div = math.lcm(self.seg_arch.divisor, self.gen_config.divisor)
        self.sampler = phase2_sampler(self.train_images, self.train_labels, cfg.train, div)
        self.G = StyleUNetGenerator(self.gen_config).to(self.device)
        if gen_init is not None:
            self.G.load_state_dict({k: v.float() for k, v in gen_init.state_dict.items()})
        #: where G started: ``"random"`` or the generator file
        self.generator_source = "random" if gen_init is None else str(gen_init.source or "given")
        self.D_img = PatchDiscriminator(self.disc_config).to(self.device)
        self.D_mask = PatchDiscriminator(self.disc_config).to(self.device)
        adam = dict(lr=cfg.train.lr, betas=(cfg.beta1, cfg.beta2))
        self.opt_gs = torch.optim.Adam(
            list(self.G.parameters()) + list(self.S.parameters()),
            weight_decay=cfg.train.weight_decay,
            **adam,
        )
        self.opt_d_img = torch.optim.Adam(self.D_img.parameters(), **adam)
        self.opt_d_mask = torch.optim.Adam(self.D_mask.parameters(), **adam)
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed)
        self._rng = np.random.default_rng(cfg.train.seed)

        from ..synthetic.layouts import fit_stats

        self.mask_stats = fit_stats(self.train_labels)
        self._val_pairs = self._generator_val_pairs()
        self.best_ssim = -2.0
        self.best_gen_state: dict | None = None
        self.gen_metrics: dict[str, float] = {}
        self._written_gen = False
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------------ state
    def _restore(self, state: Checkpoint) -> None:
        extra = state.extra
        self.G.load_state_dict({k: v.float() for k, v in state.state_dict.items()})
        self.D_img.load_state_dict(extra["d_img"])
        self.D_mask.load_state_dict(extra["d_mask"])
        self.opt_gs.load_state_dict(extra["opt_gs"])
        self.opt_d_img.load_state_dict(extra["opt_d_img"])
        self.opt_d_mask.load_state_dict(extra["opt_d_mask"])
        self.start_epoch = state.epoch
        self.step = state.step
        self.history = list(extra.get("history", []))
        self.best_score = tuple(extra.get("best_score", (-1.0, -1.0)))  # type: ignore[assignment]
        self.best_metrics = dict(state.metrics)
        self.best_ssim = float(extra.get("best_ssim", -2.0))
        self.best_state = extra.get("best_segmenter")
        self.best_gen_state = extra.get("best_generator")
        self.gen_metrics = dict(extra.get("gen_metrics", {}))
        self.aug_gen.manual_seed(self.config.train.seed + self.start_epoch)

    def _generator_val_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed centre crops (image, particle mask) used to score G (SSIM) and to preview."""
        div = math.lcm(self.seg_arch.divisor, self.gen_config.divisor)
        return centre_crops(
            self.val_images or self.train_images,
            self.val_labels or self.train_labels,
            self.config.train.patch_size,
            div,
            limit=8,
        )

    # ------------------------------------------------------------------ one iteration
    def set_input(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        x, fg, dist = (t.to(self.device) for t in batch)
        self.real_x, self.real_fg, self.real_dist = x, fg, dist
        self.real_m = fg[:, None].float()

    def forward(self, mix: float) -> None:
        """``x_hat = G(m)``, ``m_p = argmax S(x)``, ``x_rec = G(m_p)``, ``S(x_hat)`` w.p. ``mix``."""
        sm = self.config.style_mixing
        self.fake_x = self.G(self.real_m, mixing=sm)
        self.seg_real = self.S(self.real_x)
        self.pred_m = self.seg_real[:, :2].argmax(dim=1, keepdim=True).float()
        self.rec_x = self.G(self.pred_m, mixing=sm)
        self.use_synth = bool(self._rng.random() < mix)
        self.seg_fake = self.S(self.fake_x) if self.use_synth else None

    def _p(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.config.perceptual == "none":
            return a.new_zeros(())
        return ms_ssim_loss(a, b)

    def backward_G(self) -> dict[str, float]:
        """``L_GS`` (see the module docstring) with the discriminators frozen."""
        c = self.config
        set_requires_grad([self.D_img, self.D_mask], False)
        g = self.aug_gen
        adv_img = c.w_adv_img * mse_to(
            self.D_img(diff_augment(self.fake_x, c.diffaug_p, generator=g)), 1.0
        )
        adv_mask = c.w_adv_mask * mse_to(self.D_mask(self.pred_m * 2.0 - 1.0), 1.0)
        id_seg, _ = segmentation_loss(self.seg_real, self.real_fg, self.real_dist, self.seg_config)
        id_mask = c.w_id_mask * id_seg
        if self.seg_fake is not None:
            rec_seg, _ = segmentation_loss(
                self.seg_fake, self.real_fg, self.real_dist, self.seg_config
            )
            rec_mask = c.w_rec_mask * rec_seg
        else:
            rec_mask = id_mask.new_zeros(())
        rec_img = c.w_rec_l1 * F.l1_loss(self.rec_x, self.real_x) + c.w_p * self._p(
            self.rec_x, self.real_x
        )
        id_img = c.w_id_l1 * F.l1_loss(self.fake_x, self.real_x) + 0.5 * c.w_p * self._p(
            self.fake_x, self.real_x
        )
        total = adv_img + adv_mask + id_mask + rec_mask + rec_img + id_img
        total.backward()
        return {
            "adv_img": float(adv_img.detach()),
            "adv_mask": float(adv_mask.detach()),
            "id_mask": float(id_mask.detach()),
            "rec_mask": float(rec_mask.detach()),
            "rec_img": float(rec_img.detach()),
            "id_img": float(id_img.detach()),
            "loss": float(total.detach()),
        }

    def backward_D(self) -> dict[str, float]:
        """``L_Dimg`` and ``L_Dmask`` on detached fakes (see the module docstring)."""
        c, g = self.config, self.aug_gen
        set_requires_grad([self.D_img, self.D_mask], True)
        real = self.D_img(diff_augment(self.real_x, c.diffaug_p, generator=g))
        fake = self.D_img(diff_augment(self.fake_x.detach(), c.diffaug_p, generator=g))
        d_img = 0.5 * (mse_to(real, 1.0) + mse_to(fake, 0.0))
        d_mask = 0.5 * (
            mse_to(self.D_mask(self.real_m * 2.0 - 1.0), 1.0)
            + mse_to(self.D_mask(self.pred_m.detach() * 2.0 - 1.0), 0.0)
        )
        (d_img + d_mask).backward()
        return {"d_img": float(d_img.detach()), "d_mask": float(d_mask.detach())}

    def optimize(self, batch, *, epoch: int) -> dict[str, float]:
        """One iteration: forward, G/S step (G frozen early), then the discriminators' step."""
        frozen = epoch <= self.config.freeze_epochs
        mix = self.config.mix_ratio(epoch)
        self.G.train()
        self.S.train()
        set_requires_grad(self.G, not frozen)
        nets = (self.S, self.G, self.D_img, self.D_mask)
        snap = self.snapshot(*nets)  # a step that is not finite is undone (Fit.finite_update)
        self.set_input(batch)
        self.forward(mix)
        self.opt_gs.zero_grad(set_to_none=True)
        parts = self.backward_G()
        gs_ok = self.finite_update(parts["loss"], self.opt_gs, snap, nets)
        self.opt_d_img.zero_grad(set_to_none=True)
        self.opt_d_mask.zero_grad(set_to_none=True)
        if gs_ok:
            parts.update(self.backward_D())
            self.finite_update(
                parts["d_img"] + parts["d_mask"],
                (self.opt_d_img, self.opt_d_mask),
                snap,
                (self.D_img, self.D_mask),
            )
        else:  # the fakes came from undone weights: no discriminator step either
            parts.update(d_img=math.nan, d_mask=math.nan)
        set_requires_grad(self.G, True)
        parts.update(mix=mix, frozen=float(frozen), synthetic=float(self.use_synth))
        self.step += 1
        return parts

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generator_ssim(self) -> float:
        """Mean SSIM of ``G(m)`` (fixed latent) against the paired real validation crops."""
        if not self._val_pairs:
            return float("nan")
        self.G.eval()
        gen = torch.Generator().manual_seed(12345)
        vals = []
        for x, m in self._val_pairs:
            z = torch.randn(1, self.gen_config.z_dim, generator=gen).to(self.device)
            fake = self.G(m.to(self.device), z).clamp(-1, 1)
            vals.append(float(ssim_index(fake, x.to(self.device))[0]))
        self.G.train()
        return float(np.mean(vals))

    @torch.no_grad()
    def preview(self) -> dict[str, np.ndarray]:
        """``G(m)`` for the first validation mask, with a fixed latent: ``image``, ``mask``."""
        if not self._val_pairs:
            return {}
        x, m = self._val_pairs[0]
        self.G.eval()
        z = torch.randn(1, self.gen_config.z_dim, generator=torch.Generator().manual_seed(7))
        img = self.G(m.to(self.device), z.to(self.device)).clamp(-1, 1)[0, 0].cpu().numpy()
        self.G.train()
        return {"image": img, "mask": m[0, 0].numpy().astype(np.uint8), "real": x[0, 0].numpy()}

    # ------------------------------------------------------------------ checkpoints
    def _seg_state(self) -> dict:
        return state_on_cpu(self.S)

    def _gen_state(self) -> dict:
        return state_on_cpu(self.G)

    @property
    def _epoch(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    def _checkpoint(self, kind: str, **fields: Any) -> Checkpoint:
        """A checkpoint of this run (seed, step and network scale filled in)."""
        return Checkpoint.from_model(
            fields.pop("model", None),
            kind=kind,
            target_diameter=self.seg_config.target_diameter,
            seed=self.config.train.seed,
            step=self.step,
            **fields,
        )

    def generator_checkpoint(self) -> Checkpoint:
        """The best generator so far (``kind="generator"``)."""
        return self._checkpoint(
            GENERATOR,
            arch=self.gen_config,
            state_dict=self.best_gen_state or self._gen_state(),
            train=self.config,
            epoch=self._epoch,
            metrics=self.gen_metrics,
            extra={"mask_stats": self.mask_stats},
        )

    def segmenter_checkpoint(self) -> Checkpoint:
        """The best segmenter so far (``kind="segmenter"``)."""
        return self._checkpoint(
            SEGMENTER,
            arch=self.seg_arch,
            state_dict=self.best_state or self._seg_state(),
            train=self.seg_config,
            infer=self.infer,
            epoch=self._epoch,
            metrics=self.best_metrics,
            extra={"history": list(self.history), "phase": 2},
        )

    def state_checkpoint(self, epoch: int) -> Checkpoint:
        """Everything needed to resume (``kind="sagegan-gan"``)."""
        return self._checkpoint(
            GAN_STATE,
            model=self.G,
            arch=self.gen_config,
            train=self.config,
            epoch=epoch,
            metrics=self.best_metrics,
            extra={
                "seg_arch": self.seg_arch.to_dict(),
                "infer": self.infer.to_dict(),
                "disc_arch": self.disc_config.to_dict(),
                "segmenter": self._seg_state(),
                "d_img": self.D_img.state_dict(),
                "d_mask": self.D_mask.state_dict(),
                "opt_gs": self.opt_gs.state_dict(),
                "opt_d_img": self.opt_d_img.state_dict(),
                "opt_d_mask": self.opt_d_mask.state_dict(),
                "history": self.history,
                "best_score": list(self.best_score),
                "best_ssim": self.best_ssim,
                "best_segmenter": self.best_state,
                "best_generator": self.best_gen_state,
                "gen_metrics": self.gen_metrics,
            },
        )

    def save_generator(self, path: str | os.PathLike) -> Path:
        return self.generator_checkpoint().save(path)

    def save_segmenter(self, path: str | os.PathLike) -> Path:
        return self.segmenter_checkpoint().save(path)

    def save_state(self, path: str | os.PathLike, epoch: int) -> Path:
        return self.state_checkpoint(epoch).save(path)

    # ------------------------------------------------------------------ loop hooks
    def before_fit(self, total: int) -> Iterator[Progress]:
        """Validate the phase-1 segmenter first (epoch 0): it stays the best unless beaten."""
        if self.start_epoch == 0 and not self.history:
            record: dict[str, Any] = {"epoch": 0, "step": 0}
            metrics = self._validate(0, record)
            self.history.append(record)
            self._write(self._improved)
            yield Progress(
                "validate",
                0,
                total,
                message="phase-1 segmenter: "
                + (
                    f"val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"
                    if metrics
                    else "no validation images"
                ),
                data={**record, "improved": True},
            )

    def train_step(self, epoch: int) -> dict[str, float]:
        return self.optimize(self.sampler.sample(self.config.train.batch_size), epoch=epoch)

    def step_note(self, parts: dict[str, float]) -> str:
        return f"loss {parts['loss']:.3f}" + (" (G frozen)" if parts["frozen"] else "")

    def after_step(self, done: int, total: int) -> Iterator[Progress]:
        every = self.config.preview_every
        if every and self.step % every == 0:
            yield Progress("preview", done, total, message="preview", data=self.preview())

    def _validate(self, epoch: int, record: dict[str, Any]) -> dict[str, float]:
        """Score S (instance F1, Dice) and G (SSIM); select both. Sets ``_improved`` and
        ``_gen_improved`` for :meth:`_write`."""
        metrics = validate_segmenter(
            self.S, self.val_images, self.val_labels, self.infer, device=self.device
        )
        ssim = self.generator_ssim()
        record.update({f"val_{k}": v for k, v in metrics.items()})
        record["val_ssim"] = ssim
        self._improved = False
        if epoch == 0 or epoch > self.config.select_after:
            self._improved = self.beats(metrics)
            if self._improved:
                self._improved = self.keep_best(metrics, self._seg_state())
        gen_state = self._gen_state()
        self._gen_improved = (
            epoch > self.config.freeze_epochs
            and (not math.isfinite(ssim) or ssim >= self.best_ssim)
            and all_finite(gen_state.values())
        )
        if self._gen_improved:
            self.best_ssim = ssim if math.isfinite(ssim) else self.best_ssim
            self.gen_metrics = {"ssim": ssim, "epoch": float(epoch)}
            self.best_gen_state = gen_state
        elif self.best_gen_state is None:  # still frozen: report the current generator
            self.gen_metrics = {"ssim": ssim, "epoch": float(epoch)}
        return metrics

    def _write(self, improved: bool) -> None:
        if self.out is None:
            return
        if improved:
            self.save_segmenter(self.out / "segmenter.pt")
        if self._gen_improved or not self._written_gen:
            self.save_generator(self.out / "generator.pt")
            self._written_gen = True

    def validate_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[str, bool]:
        metrics = self._validate(epoch, record)
        message = (
            f"epoch {epoch}: loss {record.get('loss', float('nan')):.3f}"
            + (
                f", val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"
                if metrics
                else ""
            )
            + f", G SSIM {record['val_ssim']:.3f}"
            + (" (best)" if self._improved else "")
        )
        return message, self._improved

    def after_validation(self, epoch: int, improved: bool) -> None:
        self._write(improved)
        if self.out is not None:
            self.save_state(self.out / "gan_state.pt", epoch)

    def result(self) -> GanResult:
        """The best segmenter and generator so far (also after a cancel)."""
        seg = AttentionUNet(self.seg_arch)
        seg.load_state_dict(self.best_state or self._seg_state())
        gen = StyleUNetGenerator(self.gen_config)
        gen.load_state_dict(self.best_gen_state or self._gen_state())
        if self.out is not None and not self._written_gen:
            self.save_generator(self.out / "generator.pt")
            self._written_gen = True
        if self.out is not None and not (self.out / "segmenter.pt").exists():
            self.save_segmenter(self.out / "segmenter.pt")
        return GanResult(
            segmenter=seg.eval(),
            generator=gen.eval(),
            best_metrics=dict(self.best_metrics),
            generator_metrics=dict(self.gen_metrics),
            history=list(self.history),
            stopped_by=self.stopped_by,
            out=self.out,
            skipped_steps=self.skipped_steps,
        )
