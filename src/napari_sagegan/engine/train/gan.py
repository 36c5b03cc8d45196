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
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_sagegan.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_sagegan.engine.config import ArchConfig, TrainConfig, _Config
from napari_sagegan.engine.data.augment import GEOMETRIC
from napari_sagegan.engine.data.pairs import PatchSampler, instance_targets, normalize
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.engine.nets.discriminator import DiscriminatorConfig, PatchDiscriminator
from napari_sagegan.engine.nets.generator import GeneratorConfig, StyleUNetGenerator
from napari_sagegan.engine.train.diffaug import diff_augment
from napari_sagegan.engine.train.losses import segmentation_loss
from napari_sagegan.engine.train.segmenter import SegmenterTrainer
from napari_sagegan.util.progress import Progress

GAN_KIND = "sagegan-gan"
GENERATOR_KIND = "generator"
PERCEPTUAL = ("ssim", "none")


@dataclass(frozen=True)
class GanConfig(_Config):
    """How to train phase 2.

    Defaults are the authors' (SAGE-GAN weights, freeze 30 epochs, mix ratio +0.005 per
    epoch up to 0.6, selection after epoch 39, Adam lr 1e-4). An "epoch" is
    ``steps_per_epoch`` iterations (0: one pass over the training images' area). Short CPU
    runs should shorten the schedule with it: see :meth:`short`.

    Attributes
    ----------
    w_rec_mask, w_id_mask, w_p, w_rec_l1, w_id_l1, w_adv_img, w_adv_mask : float
        Loss weights (SAGE-GAN: 200, 100, 100, 50, 25, 1, 1; cGAN-Seg: 100, 50, 100, ...).
    freeze_epochs : int
        Epochs during which G does not move.
    mix_start, mix_step, mix_max : float
        Probability of the synthetic-pair term: ``min(mix_max, mix_start + mix_step * (e-1))``
        in epoch ``e`` (1-based).
    select_after : int
        Epochs before a checkpoint may replace the best one.
    perceptual : {"ssim", "none"}
        Offline perceptual term ``P`` (multi-scale ``1 - SSIM``).
    style_mixing : float
        Probability of mixing two latents while training G.
    diffaug_p : float
        Probability of each DiffAugment operation.
    preview_every : int
        A ``preview`` event (a generated image) every this many steps (0: never).
    """

    patch_size: int = 256
    batch_size: int = 2
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    epochs: int = 200
    steps_per_epoch: int = 0
    max_minutes: float | None = None
    w_rec_mask: float = 200.0
    w_id_mask: float = 100.0
    w_p: float = 100.0
    w_rec_l1: float = 50.0
    w_id_l1: float = 25.0
    w_adv_img: float = 1.0
    w_adv_mask: float = 1.0
    freeze_epochs: int = 30
    mix_start: float = 0.0
    mix_step: float = 0.005
    mix_max: float = 0.6
    select_after: int = 39
    perceptual: str = "ssim"
    style_mixing: float = 0.9
    diffaug_p: float = 0.2
    seg_loss: str = "focal_tversky"
    dist_weight: float = 1.0
    augment_p: float = 0.5  # geometric augmentation (flips, crops) of the real pairs
    fg_bias: float = 0.7
    min_instance_area: int = 15
    val_fraction: float = 0.2
    val_every: int = 1
    preview_every: int = 20
    gen_base_channels: int = 16
    gen_depth: int = 4
    z_dim: int = 128
    disc_base_channels: int = 32
    disc_attention: bool = True
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.perceptual not in PERCEPTUAL:
            raise ValueError(f"perceptual must be one of {PERCEPTUAL}, got {self.perceptual!r}")
        if self.patch_size < 32:
            raise ValueError(f"patch_size must be at least 32 pixels, got {self.patch_size}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be at least 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        for name in ("mix_start", "mix_max", "style_mixing", "diffaug_p", "augment_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mix_step < 0 or self.freeze_epochs < 0 or self.select_after < 0:
            raise ValueError("mix_step, freeze_epochs and select_after must not be negative")

    @classmethod
    def short(cls, **changes: Any) -> GanConfig:
        """A schedule for minutes-long CPU runs: 20-step epochs, G frozen for 2 epochs, the
        mix ratio growing by 0.1 per epoch (to 0.6), selection from the first epoch, patches
        of 128 px. The loss weights stay the authors'."""
        base = dict(
            patch_size=128,
            steps_per_epoch=20,
            freeze_epochs=2,
            mix_step=0.1,
            select_after=0,
            preview_every=10,
        )
        base.update(changes)
        return cls(**base)

    def mix_ratio(self, epoch: int) -> float:
        """Probability of the synthetic-pair term in (1-based) ``epoch``."""
        return float(min(self.mix_max, self.mix_start + self.mix_step * max(epoch - 1, 0)))

    def seg_train_config(self) -> TrainConfig:
        """The phase-1 settings used for ``L_seg``, the patch sampler and validation."""
        return TrainConfig(
            patch_size=self.patch_size,
            batch_size=self.batch_size,
            lr=self.lr,
            epochs=self.epochs,
            max_minutes=self.max_minutes,
            loss=self.seg_loss,
            dist_weight=self.dist_weight,
            val_fraction=self.val_fraction,
            seed=self.seed,
            fg_bias=self.fg_bias,
            augment_p=self.augment_p,
            min_instance_area=self.min_instance_area,
        )


# --------------------------------------------------------------------------- SSIM


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


def _mse_to(pred: torch.Tensor, value: float) -> torch.Tensor:
    return F.mse_loss(pred, torch.full_like(pred, value))


# --------------------------------------------------------------------------- checkpoints


def build_generator(ckpt: dict[str, Any]) -> StyleUNetGenerator:
    """Rebuild a generator from a loaded ``generator`` checkpoint (``strict=True``), eval mode."""
    try:
        cfg = GeneratorConfig.from_dict(dict(ckpt["arch"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the generator checkpoint's architecture is invalid: {err}") from err
    gen = StyleUNetGenerator(cfg)
    try:
        gen.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"the generator's weights do not fit its architecture: {str(err).splitlines()[0]}"
        ) from err
    return gen.eval()


def load_generator(path: str | os.PathLike) -> tuple[StyleUNetGenerator, dict[str, Any]]:
    """Load a generator checkpoint written by phase 2 (``kind="generator"``)."""
    if str(path) == "default":
        raise FileNotFoundError("there is no bundled generator; give a generator.pt file")
    ckpt = load_checkpoint(path, kind=GENERATOR_KIND)
    return build_generator(ckpt), ckpt


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


# --------------------------------------------------------------------------- trainer


class GanTrainer:
    """Train phase 2: the segmenter and a generator in a CycleGAN.

    Parameters
    ----------
    images, labels : sequences of np.ndarray
        2-D raw images and their instance (or binary) label maps.
    config : GanConfig
        Settings (weights, schedule, budget, seed).
    seg : str, path or dict
        The phase-1 segmenter checkpoint (path, ``"default"`` or a loaded dict). Not needed
        with ``resume``.
    resume : str or path, optional
        A ``gan_state.pt`` written by a previous run with ``out``: continue from it.
    out : str or path, optional
        Folder for ``segmenter.pt`` and ``generator.pt`` (best so far, written at every
        improvement) and ``gan_state.pt`` (after every epoch, for resuming). All atomic.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    val_images, val_labels : sequences, optional
        An explicit validation set; by default a seeded ``val_fraction`` of the pairs.
    gen_config, disc_config : optional
        Architectures (default: from ``config``).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: GanConfig | None = None,
        *,
        seg: str | os.PathLike | dict | None = None,
        resume: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None,
        device: str = "auto",
        val_images: Sequence[np.ndarray] | None = None,
        val_labels: Sequence[np.ndarray] | None = None,
        gen_config: GeneratorConfig | None = None,
        disc_config: DiscriminatorConfig | None = None,
    ) -> None:
        state = None
        if resume is not None:
            state = load_checkpoint(resume, kind=GAN_KIND)
            extra = state.get("extra") or {}
            if config is None:
                config = GanConfig.from_dict(dict(state["train"]))
            seg = {
                "arch": extra["seg_arch"],
                "state_dict": extra["segmenter"],
                "infer": extra.get("infer"),
            }
            gen_config = GeneratorConfig.from_dict(dict(state["arch"]))
            disc_config = DiscriminatorConfig.from_dict(dict(extra["disc_arch"]))
        self.config = cfg = config or GanConfig()
        if seg is None:
            raise ValueError("phase 2 needs a phase-1 segmenter: give seg=MODEL.pt or 'default'")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seg_ckpt = seg if isinstance(seg, dict) else load_checkpoint(seg, kind="segmenter")
        self.out = Path(out) if out is not None else None
        if self.out is not None and not self.out.is_dir():
            raise FileNotFoundError(f"output folder {self.out} does not exist; create it first")
        # the segmenter trainer checks the pairs, splits them, holds S and validates it
        self.seg = SegmenterTrainer(
            images,
            labels,
            cfg.seg_train_config(),
            init=seg_ckpt,
            device=device,
            val_images=val_images,
            val_labels=val_labels,
        )
        self.device = self.seg.device
        self.S = self.seg.model
        self.seg_arch: ArchConfig = self.seg.arch
        self.gen_config = gen_config or GeneratorConfig(
            base_channels=cfg.gen_base_channels, depth=cfg.gen_depth, z_dim=cfg.z_dim
        )
        self.disc_config = disc_config or DiscriminatorConfig(
            base_channels=cfg.disc_base_channels, attention=cfg.disc_attention
        )
        div = math.lcm(self.seg_arch.divisor, self.gen_config.divisor)
        if cfg.patch_size % div:
            raise ValueError(
                f"patch_size {cfg.patch_size} must be a multiple of {div} (the networks' "
                "down-sampling factor)"
            )
        self.sampler = PatchSampler(
            self.seg.train_images,
            self.seg.train_labels,
            patch_size=cfg.patch_size,
            fg_bias=cfg.fg_bias,
            augment_p=cfg.augment_p,
            augment_ops=GEOMETRIC,
            min_area=cfg.min_instance_area,
            seed=cfg.seed + 1,
        )
        self.G = StyleUNetGenerator(self.gen_config).to(self.device)
        self.D_img = PatchDiscriminator(self.disc_config).to(self.device)
        self.D_mask = PatchDiscriminator(self.disc_config).to(self.device)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_gs = torch.optim.Adam(
            list(self.G.parameters()) + list(self.S.parameters()), lr=cfg.lr, betas=betas
        )
        self.opt_d_img = torch.optim.Adam(self.D_img.parameters(), lr=cfg.lr, betas=betas)
        self.opt_d_mask = torch.optim.Adam(self.D_mask.parameters(), lr=cfg.lr, betas=betas)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed)
        self._rng = np.random.default_rng(cfg.seed)
        self.seg_cfg = self.seg.config

        from napari_sagegan.engine.synthetic.layouts import fit_stats

        self.mask_stats = fit_stats(self.seg.train_labels)
        self._val_pairs = self._generator_val_pairs()

        self.start_epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: tuple[float, float] = (-1.0, -1.0)
        self.best_metrics: dict[str, float] = {}
        self.best_seg_state: dict | None = None
        self.best_ssim = -2.0
        self.best_gen_state: dict | None = None
        self.gen_metrics: dict[str, float] = {}
        self.stopped_by = "epochs"
        self._written_gen = False
        if state is not None:
            self._restore(state)
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------ state
    def _restore(self, state: dict) -> None:
        extra = state["extra"]
        self.G.load_state_dict({k: v.float() for k, v in state["state_dict"].items()})
        self.D_img.load_state_dict(extra["d_img"])
        self.D_mask.load_state_dict(extra["d_mask"])
        self.opt_gs.load_state_dict(extra["opt_gs"])
        self.opt_d_img.load_state_dict(extra["opt_d_img"])
        self.opt_d_mask.load_state_dict(extra["opt_d_mask"])
        self.start_epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.history = list(extra.get("history", []))
        self.best_score = tuple(extra.get("best_score", (-1.0, -1.0)))  # type: ignore[assignment]
        self.best_metrics = dict(state.get("metrics") or {})
        self.best_ssim = float(extra.get("best_ssim", -2.0))
        self.best_seg_state = extra.get("best_segmenter")
        self.best_gen_state = extra.get("best_generator")
        self.gen_metrics = dict(extra.get("gen_metrics", {}))
        self.aug_gen.manual_seed(self.config.seed + self.start_epoch)

    def _generator_val_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed centre crops (image, particle mask) used to score G (SSIM) and to preview."""
        images = self.seg.val_images or self.seg.train_images
        labels = self.seg.val_labels or self.seg.train_labels
        div = math.lcm(self.seg_arch.divisor, self.gen_config.divisor)
        out = []
        for im, lab in zip(images, labels):
            im, lab = np.asarray(im), np.asarray(lab)
            side = min(self.config.patch_size, *im.shape)
            side -= side % div
            if side < div:
                continue
            y0, x0 = (im.shape[0] - side) // 2, (im.shape[1] - side) // 2
            x = normalize(im)[y0 : y0 + side, x0 : x0 + side]
            fg = (np.asarray(lab) > 0)[y0 : y0 + side, x0 : x0 + side]
            out.append(
                (
                    torch.from_numpy(np.ascontiguousarray(x))[None, None],
                    torch.from_numpy(fg.astype(np.float32))[None, None],
                )
            )
        return out[:8]

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
        adv_img = c.w_adv_img * _mse_to(
            self.D_img(diff_augment(self.fake_x, c.diffaug_p, generator=g)), 1.0
        )
        adv_mask = c.w_adv_mask * _mse_to(self.D_mask(self.pred_m * 2.0 - 1.0), 1.0)
        id_seg, _ = segmentation_loss(self.seg_real, self.real_fg, self.real_dist, self.seg_cfg)
        id_mask = c.w_id_mask * id_seg
        if self.seg_fake is not None:
            rec_seg, _ = segmentation_loss(
                self.seg_fake, self.real_fg, self.real_dist, self.seg_cfg
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
        d_img = 0.5 * (_mse_to(real, 1.0) + _mse_to(fake, 0.0))
        d_mask = 0.5 * (
            _mse_to(self.D_mask(self.real_m * 2.0 - 1.0), 1.0)
            + _mse_to(self.D_mask(self.pred_m.detach() * 2.0 - 1.0), 0.0)
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
        self.set_input(batch)
        self.forward(mix)
        self.opt_gs.zero_grad(set_to_none=True)
        parts = self.backward_G()
        self.opt_gs.step()
        self.opt_d_img.zero_grad(set_to_none=True)
        self.opt_d_mask.zero_grad(set_to_none=True)
        parts.update(self.backward_D())
        self.opt_d_img.step()
        self.opt_d_mask.step()
        set_requires_grad(self.G, True)
        parts.update(mix=mix, frozen=float(frozen), synthetic=float(self.use_synth))
        self.step += 1
        self.last_losses = parts
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

    # ------------------------------------------------------------------ saving
    def _seg_state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.S.state_dict().items()}

    def _gen_state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.G.state_dict().items()}

    def generator_checkpoint(self) -> dict[str, Any]:
        """The best generator so far as a checkpoint dict (``kind="generator"``)."""
        state = self.best_gen_state or self._gen_state()
        return {
            "format": "napari-sagegan",
            "format_version": 1,
            "kind": GENERATOR_KIND,
            "arch": self.gen_config.to_dict(),
            "train": self.config.to_dict(),
            "seed": int(self.config.seed),
            "epoch": int(self.history[-1]["epoch"]) if self.history else 0,
            "step": int(self.step),
            "metrics": dict(self.gen_metrics),
            "state_dict": state,
            "extra": {"mask_stats": self.mask_stats},
        }

    def segmenter_checkpoint(self) -> dict[str, Any]:
        """The best segmenter so far as a checkpoint dict (``kind="segmenter"``)."""
        tr = self.seg
        return {
            "format": "napari-sagegan",
            "format_version": 1,
            "kind": "segmenter",
            "arch": self.seg_arch.to_dict(),
            "train": tr.config.to_dict(),
            "infer": tr.infer.to_dict(),
            "seed": int(self.config.seed),
            "epoch": int(self.history[-1]["epoch"]) if self.history else 0,
            "step": int(self.step),
            "metrics": {k: float(v) for k, v in self.best_metrics.items()},
            "state_dict": self.best_seg_state or self._seg_state(),
            "optimizer": None,
            "extra": {"history": list(self.history), "phase": 2},
        }

    def save_generator(self, path: str | os.PathLike) -> Path:
        ck = self.generator_checkpoint()
        gen = StyleUNetGenerator(self.gen_config)
        gen.load_state_dict(ck["state_dict"])
        return save_checkpoint(
            path,
            gen,
            kind=GENERATOR_KIND,
            arch=self.gen_config,  # type: ignore[arg-type]  (any config with to_dict)
            train=self.config.to_dict(),
            seed=self.config.seed,
            epoch=ck["epoch"],
            step=self.step,
            metrics=self.gen_metrics,
            extra={"mask_stats": self.mask_stats},
        )

    def save_segmenter(self, path: str | os.PathLike) -> Path:
        ck = self.segmenter_checkpoint()
        return self.seg.save(
            path,
            state=ck["state_dict"],
            epoch=ck["epoch"],
            metrics=self.best_metrics,
            with_optimizer=False,
        )

    def save_state(self, path: str | os.PathLike, epoch: int) -> Path:
        """Everything needed to resume (``kind="sagegan-gan"``)."""
        return save_checkpoint(
            path,
            self.G,
            kind=GAN_KIND,
            arch=self.gen_config,  # type: ignore[arg-type]
            train=self.config.to_dict(),
            seed=self.config.seed,
            epoch=epoch,
            step=self.step,
            metrics=self.best_metrics,
            extra={
                "seg_arch": self.seg_arch.to_dict(),
                "infer": self.seg.infer.to_dict(),
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
                "best_segmenter": self.best_seg_state,
                "best_generator": self.best_gen_state,
                "gen_metrics": self.gen_metrics,
            },
        )

    # ------------------------------------------------------------------ main loop
    @property
    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch > 0:
            return self.config.steps_per_epoch
        per_batch = self.config.patch_size**2 * self.config.batch_size
        return max(1, math.ceil(self.sampler.pixels / per_batch))

    def _validate(self, epoch: int, record: dict[str, Any]) -> tuple[dict, bool]:
        metrics = self.seg.validate()
        ssim = self.generator_ssim()
        record.update({f"val_{k}": v for k, v in metrics.items()})
        record["val_ssim"] = ssim
        improved = False
        if epoch == 0 or epoch > self.config.select_after:
            if metrics:
                score = (metrics["f1@0.5"], metrics["dice"])
                improved = score > self.best_score
            else:
                improved = True  # no validation images: keep the latest
            if improved:
                self.best_score = (metrics.get("f1@0.5", 0.0), metrics.get("dice", 0.0))
                self.best_metrics = dict(metrics)
                self.best_seg_state = self._seg_state()
        gen_improved = epoch > self.config.freeze_epochs and (
            not math.isfinite(ssim) or ssim >= self.best_ssim
        )
        if gen_improved:
            self.best_ssim = ssim if math.isfinite(ssim) else self.best_ssim
            self.gen_metrics = {"ssim": ssim, "epoch": float(epoch)}
            self.best_gen_state = self._gen_state()
        elif self.best_gen_state is None:  # still frozen: report the current generator
            self.gen_metrics = {"ssim": ssim, "epoch": float(epoch)}
        if self.out is not None:
            if improved:
                self.save_segmenter(self.out / "segmenter.pt")
            if gen_improved or not self._written_gen:
                self.save_generator(self.out / "generator.pt")
                self._written_gen = True
        return metrics, improved

    def run(self) -> Generator[Progress, None, GanResult]:
        """Train; yields ``train`` (per step, losses per term), ``preview`` and ``validate``
        events; returns a :class:`GanResult`. Closing the generator keeps the best so far."""
        cfg = self.config
        spe = self.steps_per_epoch
        total = spe * max(0, cfg.epochs - self.start_epoch)
        budget = cfg.max_minutes * 60.0 if cfg.max_minutes else None
        t0 = time.perf_counter()
        if self.start_epoch == 0 and not self.history:
            record: dict[str, Any] = {"epoch": 0, "step": 0}
            metrics, _ = self._validate(0, record)
            self.history.append(record)
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
        done = 0
        for epoch in range(self.start_epoch + 1, cfg.epochs + 1):
            sums: dict[str, float] = {}
            out_of_time = False
            n = 0
            for _ in range(spe):
                parts = self.optimize(self.sampler.sample(cfg.batch_size), epoch=epoch)
                done += 1
                n += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                elapsed = time.perf_counter() - t0
                eta = elapsed / done * (total - done)
                if budget is not None:
                    eta = min(eta, max(0.0, budget - elapsed))
                yield Progress(
                    "train",
                    done,
                    total,
                    eta_s=eta,
                    message=(
                        f"epoch {epoch}/{cfg.epochs} step {done}/{total} "
                        f"loss {parts['loss']:.3f}" + (" (G frozen)" if parts["frozen"] else "")
                    ),
                    data={"epoch": epoch, **parts},
                )
                if cfg.preview_every and self.step % cfg.preview_every == 0:
                    yield Progress("preview", done, total, message="preview", data=self.preview())
                if budget is not None and elapsed >= budget:
                    out_of_time = True
                    break
            record = {"epoch": epoch, "step": self.step}
            record.update({k: v / max(n, 1) for k, v in sums.items()})
            last = epoch == cfg.epochs or out_of_time
            if epoch % cfg.val_every == 0 or last:
                metrics, improved = self._validate(epoch, record)
                self.history.append(record)
                if self.out is not None:
                    self.save_state(self.out / "gan_state.pt", epoch)
                yield Progress(
                    "validate",
                    done,
                    total,
                    message=(
                        f"epoch {epoch}: loss {record.get('loss', float('nan')):.3f}"
                        + (
                            f", val Dice {metrics['dice']:.3f}, F1@0.5 {metrics['f1@0.5']:.3f}"
                            if metrics
                            else ""
                        )
                        + f", G SSIM {record['val_ssim']:.3f}"
                        + (" (best)" if improved else "")
                    ),
                    data={**record, "improved": improved},
                )
            else:
                self.history.append(record)
            if out_of_time:
                self.stopped_by = "time"
                break
        return self.result()

    def result(self) -> GanResult:
        """The best segmenter and generator so far (also after a cancel)."""
        seg = AttentionUNet(self.seg_arch)
        seg.load_state_dict(self.best_seg_state or self._seg_state())
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
        )


def mask_targets(labels: np.ndarray, min_area: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Binary particle mask and distance target of an instance label map (for synthetic pairs)."""
    _, fg, dist = instance_targets(np.asarray(labels), min_area=min_area)
    return fg, dist
