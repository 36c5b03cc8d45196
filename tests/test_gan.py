"""SAGE-GAN phase 2: generator, discriminator, DiffAugment and the GAN trainer (tiny nets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.engine.checkpoint import Checkpoint, CheckpointError
from napari_sagegan.engine.config import GanConfig, preset
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.engine.nets.discriminator import DiscriminatorConfig, PatchDiscriminator
from napari_sagegan.engine.nets.generator import GeneratorConfig, StyleUNetGenerator
from napari_sagegan.engine.train.diffaug import diff_augment
from napari_sagegan.engine.train.gan import GanTrainer
from napari_sagegan.engine.train.losses import ms_ssim_loss, ssim_index
from napari_sagegan.util.progress import run_to_end


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny nets gain nothing from two, and the CPU may be shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_G = GeneratorConfig(base_channels=4, depth=2, z_dim=8, w_dim=8, mapping_layers=1)


def _pairs(n=4):
    out = [disc_image(seed=i, centres=((16 + i, 20), (44, 40 + i))) for i in range(n)]
    return [p[0] for p in out], [p[1] for p in out]


def _seg_ckpt():
    torch.manual_seed(0)
    arch = preset("tiny")
    return {"arch": arch.to_dict(), "state_dict": AttentionUNet(arch).state_dict()}


def _config(**kw):
    base = dict(
        patch_size=32,
        batch_size=2,
        steps_per_epoch=2,
        epochs=2,
        freeze_epochs=0,
        mix_start=1.0,
        mix_max=1.0,
        gen_base_channels=4,
        gen_depth=2,
        z_dim=8,
        disc_base_channels=4,
        preview_every=1,
        val_fraction=0.25,
    )
    base.update(kw)
    return GanConfig.short(**base)


def _trainer(tmp_path=None, **kw):
    images, labels = _pairs()
    return GanTrainer(images, labels, _config(**kw), seg=_seg_ckpt(), out=tmp_path, device="cpu")


def load_generator(path):
    ckpt = Checkpoint.load(path, kind="generator")
    return ckpt.build(), ckpt


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- networks


def test_generator_shapes_parameters_and_noise():
    torch.manual_seed(0)
    g = StyleUNetGenerator(TINY_G)
    assert sum(p.numel() for p in g.parameters()) == 8277  # architecture regression
    m = (torch.rand(2, 1, 32, 48) > 0.5).float()
    z = torch.randn(2, 8)
    y = g(m, z)
    assert y.shape == (2, 1, 32, 48)
    # per-pixel noise: with non-zero noise scales two calls with the same z differ, and the
    # difference varies over the image (not one scalar per sample)
    for mod in g.modules():
        if mod.__class__.__name__ == "NoiseInjection":
            torch.nn.init.ones_(mod.weight)
    diff = g(m, z) - g(m, z)
    assert diff.abs().max() > 0
    assert diff[0, 0].std() > 0
    # one latent per layer (style mixing) is accepted
    assert g(m, torch.randn(2, TINY_G.n_styles, 8)).shape == y.shape
    with pytest.raises(ValueError, match="multiples of 4"):
        g(torch.zeros(1, 1, 30, 32))


def test_generator_style_changes_output():
    torch.manual_seed(0)
    g = StyleUNetGenerator(TINY_G)
    for mod in g.modules():  # give the affine maps a non-trivial weight
        if mod.__class__.__name__ == "ModulatedConv2d":
            torch.nn.init.normal_(mod.affine.weight, std=0.5)
    m = (torch.rand(1, 1, 32, 32) > 0.5).float()
    assert not torch.allclose(g(m, torch.randn(1, 8)), g(m, torch.randn(1, 8)))


def test_discriminator_output_shape_follows_input():
    d = PatchDiscriminator(DiscriminatorConfig(base_channels=4, attention=True))
    assert any(m.__class__.__name__ == "LinearAttention" for m in d.modules())
    small, large = d(torch.randn(2, 1, 32, 32)), d(torch.randn(2, 1, 64, 64))
    assert small.shape[:2] == (2, 1) and large.shape[:2] == (2, 1)
    assert large.shape[-1] > small.shape[-1]
    plain = PatchDiscriminator(DiscriminatorConfig(base_channels=4, attention=False))
    assert not any(m.__class__.__name__ == "LinearAttention" for m in plain.modules())


def test_diffaugment_is_differentiable_and_seeded():
    x = torch.randn(4, 1, 32, 32, requires_grad=True)
    a = diff_augment(x, 1.0, generator=torch.Generator().manual_seed(3))
    b = diff_augment(x, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert diff_augment(x, 0.0) is x
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, 0.5, policy=("color",))


def test_ssim():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(ssim_index(x, x), torch.ones(2), atol=1e-4)
    assert float(ms_ssim_loss(x, x)) < 1e-4
    assert float(ms_ssim_loss(x, -x)) > 0.5


def test_config_round_trip_and_unknown_key():
    cfg = _config()
    assert GanConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GanConfig key 'w_vgg'"):
        GanConfig.from_dict({"w_vgg": 1.0})
    with pytest.raises(ValueError, match="GanConfig.train: unknown TrainConfig key 'foo'"):
        GanConfig.from_dict({"train": {"foo": 1}})
    # the segmenter's options are one TrainConfig, nested (nothing copied or dropped)
    assert cfg.to_dict()["train"]["patch_size"] == 32 and "patch_size" not in cfg.to_dict()
    assert cfg.replace(invert=False, w_p=1.0).train.invert is False
    # the flat dicts of earlier versions still load
    old = GanConfig.from_dict({"patch_size": 64, "seg_loss": "ce_dice", "w_p": 3.0})
    assert (old.train.patch_size, old.train.loss, old.w_p) == (64, "ce_dice", 3.0)
    assert old.train.batch_size == GanConfig().train.batch_size == 2
    assert cfg.mix_ratio(1) == 1.0
    short = GanConfig.short()
    assert short.mix_ratio(1) == 0.0 and math.isclose(short.mix_ratio(3), 0.2)
    assert short.mix_ratio(100) == 0.6
    paper = GanConfig()
    assert (paper.w_rec_mask, paper.w_id_mask, paper.w_p) == (200.0, 100.0, 100.0)
    assert math.isclose(paper.mix_ratio(31), 0.15)


# --------------------------------------------------------------------------- one iteration


def test_one_iteration_gives_finite_losses_for_every_term():
    tr = _trainer()
    parts = tr.optimize(tr.sampler.sample(2), epoch=1)
    terms = ["adv_img", "adv_mask", "id_mask", "rec_mask", "rec_img", "id_img", "d_img", "d_mask"]
    for k in terms:
        assert math.isfinite(parts[k]), k
    assert parts["synthetic"] == 1.0 and parts["rec_mask"] > 0  # mix 1: synthetic term on
    assert parts["loss"] == pytest.approx(sum(parts[k] for k in terms[:6]), rel=1e-4)


def test_frozen_generator_does_not_move_but_segmenter_does():
    tr = _trainer(freeze_epochs=1)
    g0, s0 = _params(tr.G), _params(tr.S)
    parts = tr.optimize(tr.sampler.sample(2), epoch=1)
    assert parts["frozen"] == 1.0
    assert _same(g0, _params(tr.G))
    assert not _same(s0, _params(tr.S))
    parts = tr.optimize(tr.sampler.sample(2), epoch=2)  # after the freeze G learns
    assert parts["frozen"] == 0.0
    assert not _same(g0, _params(tr.G))


def test_discriminators_move_only_in_their_own_step():
    tr = _trainer()
    tr.set_input(tr.sampler.sample(2))
    tr.forward(mix=1.0)
    d0 = _params(tr.D_img) + _params(tr.D_mask)
    g0 = _params(tr.G)
    tr.opt_gs.zero_grad()
    tr.backward_G()
    assert all(p.grad is None for p in tr.D_img.parameters())
    tr.opt_gs.step()
    assert _same(d0, _params(tr.D_img) + _params(tr.D_mask))
    assert not _same(g0, _params(tr.G))
    g1 = _params(tr.G)
    grads = [p.grad.clone() for p in tr.G.parameters() if p.grad is not None]
    tr.backward_D()  # fakes are detached: no gradient reaches G
    assert _same(grads, [p.grad for p in tr.G.parameters() if p.grad is not None])
    tr.opt_d_img.step()
    tr.opt_d_mask.step()
    assert not _same(d0[: len(_params(tr.D_img))], _params(tr.D_img))
    assert _same(g1, _params(tr.G))


# --------------------------------------------------------------------------- the loop


def test_run_cancel_keeps_best_and_resume(tmp_path):
    tr = _trainer(tmp_path, epochs=3, freeze_epochs=1)
    gen = tr.run()
    stages = []
    for ev in gen:
        stages.append(ev.stage)
        if stages.count("validate") == 2:  # phase-1 baseline + epoch 1
            break
    gen.close()  # cancel
    assert "train" in stages and "preview" in stages
    res = tr.result()
    assert res.best_metrics and "f1@0.5" in res.best_metrics
    for name in ("segmenter.pt", "generator.pt", "gan_state.pt"):
        assert (tmp_path / name).is_file()
    seg = Checkpoint.load(tmp_path / "segmenter.pt", kind="segmenter")
    assert seg["extra"].get("phase") is None or seg["kind"] == "segmenter"
    assert seg.train["invert"] is True and seg.train["plateau_patience"] == 10  # none dropped
    g, ck = load_generator(tmp_path / "generator.pt")
    assert ck["extra"]["mask_stats"]["diameter"] > 5
    assert isinstance(g, StyleUNetGenerator)
    with pytest.raises(CheckpointError, match="'generator' model is needed"):
        load_generator(tmp_path / "segmenter.pt")
    # resume continues after the saved epoch
    images, labels = _pairs()
    tr2 = GanTrainer(images, labels, resume=tmp_path / "gan_state.pt", out=tmp_path, device="cpu")
    assert tr2.start_epoch == 1 and tr2.step == 2
    events = list(_events(tr2.run()))
    assert [e.data["epoch"] for e in events if e.stage == "validate"] == [2, 3]


def _events(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return


def test_budget_and_preview():
    tr = _trainer(epochs=50, max_minutes=0.001, preview_every=1)
    events = []
    res = run_to_end(tr.run(), events.append)
    assert res.stopped_by == "time"
    previews = [e for e in events if e.stage == "preview"]
    assert previews and previews[0].data["image"].shape == previews[0].data["mask"].shape
    assert np.all(np.abs(previews[0].data["image"]) <= 1.0)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_clearly(tmp_path):
    images, labels = _pairs()
    with pytest.raises(ValueError, match="no image/mask pairs"):
        GanTrainer([], [], _config(), seg=_seg_ckpt(), device="cpu")
    empty = [np.zeros_like(lab) for lab in labels]
    with pytest.raises(ValueError, match="no particles"):
        GanTrainer(images, empty, _config(), seg=_seg_ckpt(), device="cpu")
    tr = _trainer(tmp_path)
    tr.save_generator(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="'segmenter' model is needed"):
        GanTrainer(images, labels, _config(), seg=tmp_path / "g.pt", device="cpu")
    with pytest.raises(ValueError, match="multiple of 16"):
        GanTrainer(images, labels, _config(patch_size=40, gen_depth=4), seg=_seg_ckpt())
