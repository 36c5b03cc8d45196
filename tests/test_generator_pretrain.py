"""The generator's own pre-training (the bundled generator's trainer)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import disc_image


def _pairs(n=4):
    out = []
    for k in range(n):
        img, lab = disc_image(
            shape=(64, 64), centres=((16 + k, 18), (44, 40 - k), (20, 46)), radius=7, seed=k
        )
        out.append((img, lab))
    return out


def _config(steps=10, epochs=1, lr=2e-3):
    from napari_sagegan.engine.config import GanConfig, TrainConfig

    train = TrainConfig(
        patch_size=32,
        batch_size=4,
        steps_per_epoch=steps,
        epochs=epochs,
        num_threads=1,
        lr=lr,
        calibrate=False,
        seed=3,
    )
    return GanConfig(
        train=train, gen_base_channels=4, gen_depth=2, disc_base_channels=8, disc_attention=False
    )


def _trainer(cfg, **kw):
    from napari_sagegan.engine.train.generator_pretrain import GeneratorTrainer

    pairs = _pairs()
    return GeneratorTrainer([i for i, _ in pairs], [lab for _, lab in pairs], cfg, **kw)


def test_pretraining_learns_to_draw_the_masks():
    """After a few dozen steps G(m) is much closer to the real images than at the start
    (SSIM), and closer than a flat image."""
    from napari_sagegan.util.progress import run_to_end

    t = _trainer(_config(steps=20, epochs=4))
    before = t.scores()
    ck = run_to_end(t.run())
    after = t.scores()
    assert ck.kind == "generator"
    assert after["ssim"] > before["ssim"] + 0.1
    assert after["ssim"] > after["flat_ssim"]
    assert ck.metrics["ssim"] == pytest.approx(t.best_ssim)


def test_checkpoint_resumes_the_campaign_and_feeds_generate(tmp_path):
    """A saved campaign state continues with the same generator and discriminator weights
    (float16) and step count; the checkpoint carries the mask statistics ``generate`` needs."""
    import torch

    from napari_sagegan.api import generate
    from napari_sagegan.util.progress import run_to_end

    t = _trainer(_config(steps=5))
    run_to_end(t.run())
    path = t.save(tmp_path / "g.pt", best=False, trainer_state=True)
    t2 = _trainer(_config(steps=5), init=path)
    assert t2.step == t.step
    for a, b in zip(t.G.state_dict().values(), t2.G.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(t.D.state_dict().values(), t2.D.state_dict().values()):
        assert torch.equal(a.half().float(), b)  # the discriminator is kept in float16
    pairs = run_to_end(generate(path, 2, size=64, seed=1))
    assert len(pairs) == 2
    img, lab = pairs[0]
    assert img.dtype == np.uint8 and img.shape == lab.shape == (64, 64)
    assert lab.max() > 0  # drawn from the stored mask statistics


def test_patch_size_must_fit_the_generator():
    from napari_sagegan.engine.config import GanConfig, TrainConfig

    cfg = GanConfig(
        train=TrainConfig(patch_size=34, calibrate=False), gen_depth=2, gen_base_channels=4
    )
    with pytest.raises(ValueError, match="multiple of 4"):
        _trainer(cfg)
