import pytest
import torch

from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig, preset
from napari_sagegan.engine.nets.attention_unet import (
    AttentionUNet,
    count_parameters,
    maps_from_logits,
)
from napari_sagegan.engine.train.losses import focal_loss, segmentation_loss, tversky_loss


def test_paper_preset_has_the_authors_parameter_count():
    # Attention U-Net, base 64, depth 4: 31.4 M parameters in the paper.
    n = count_parameters(AttentionUNet(preset("paper").replace(dist_head=False)))
    assert abs(n - 31.4e6) < 0.05e6
    # the distance head adds one 1x1 output channel: 64 weights + 1 bias
    assert count_parameters(AttentionUNet(preset("paper"))) - n == 65


def test_default_preset_is_much_smaller_than_paper():
    n_default = count_parameters(AttentionUNet(preset("default")))
    assert n_default < count_parameters(AttentionUNet(preset("paper"))) / 10


@pytest.mark.parametrize("shape", [(32, 32), (48, 80), (33, 47)])
def test_output_shapes_and_attention_map(shape):
    torch.manual_seed(0)
    model = AttentionUNet(ArchConfig(base_channels=4, depth=2)).eval()
    x = torch.randn(2, 1, *shape)
    with torch.inference_mode():
        logits, psi = model(x, return_attention=True)
    assert logits.shape == (2, 3, *shape)
    assert psi.shape == (2, 1, *shape)
    assert float(psi.min()) >= 0.0 and float(psi.max()) <= 1.0
    assert model.last_attention is not None and model.last_attention.shape == psi.shape
    maps = maps_from_logits(logits)
    assert maps.shape == (2, 2, *shape)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def test_config_round_trip_and_unknown_key():
    cfg = ArchConfig(base_channels=8, depth=3)
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ArchConfig key 'bogus'"):
        ArchConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="mse")
    with pytest.raises(ValueError, match="overlap"):
        InferConfig(overlap=0.95)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_focal_is_per_pixel():
    # A confident correct pixel contributes ~0, a wrong one a lot: the per-pixel focal loss
    # differs from alpha*(1-exp(-mean CE))^gamma*mean CE, the authors' batch-mean version.
    logits = torch.tensor([[[[8.0, -2.0]], [[-8.0, 2.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 0]]])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = (0.5 * (1 - torch.exp(-ce)) ** 2 * ce).mean()
    batch_mean = 0.5 * (1 - torch.exp(-ce.mean())) ** 2 * ce.mean()
    got = focal_loss(logits, target, 0.5, 2.0)
    assert torch.isclose(got, expected)
    assert not torch.isclose(got, batch_mean, rtol=0.05)


def test_tversky_weights_false_negatives_more():
    target = torch.tensor([[[1, 1, 0, 0]]])
    # prediction misses one particle pixel (FN) vs. adds one background pixel (FP)
    big = 10.0
    miss = torch.tensor([[[[-big, -big, big, big]], [[big, -big, -big, -big]]]]).permute(0, 1, 2, 3)
    extra = torch.tensor([[[[-big, -big, -big, big]], [[big, big, big, -big]]]])
    l_fn = tversky_loss(miss, target, 0.3, 0.7)
    l_fp = tversky_loss(extra, target, 0.3, 0.7)
    assert l_fn > l_fp


def test_segmentation_loss_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    fg = (torch.rand(2, 8, 8) > 0.5).long()
    dist = torch.rand(2, 8, 8)
    total, parts = segmentation_loss(logits, fg, dist, TrainConfig())
    assert set(parts) == {"focal", "tversky", "dist"}
    assert abs(float(total.detach()) - sum(parts.values())) < 1e-5
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    _, parts = segmentation_loss(logits, fg, None, TrainConfig(loss="ce_dice"))
    assert set(parts) == {"ce", "dice"}


def test_batchnorm_folding_keeps_the_output():
    from napari_sagegan.engine.nets.attention_unet import fuse_batchnorm

    torch.manual_seed(0)
    model = AttentionUNet(ArchConfig(base_channels=4, depth=2))
    for mod in model.modules():  # non-trivial statistics, as after training
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    model.eval()
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # untouched
    x = torch.randn(2, 1, 32, 48)
    with torch.inference_mode():
        assert torch.allclose(model(x), fused(x), atol=1e-5)
