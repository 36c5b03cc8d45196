"""Per-image particle scale and polarity: estimate, resample, override, map back."""

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.engine.analysis.metrics import evaluate_pair
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
from napari_sagegan.engine.data.sampling import PatchSampler
from napari_sagegan.engine.infer.scale import (
    MAX_FACTOR,
    estimate_diameter,
    median_diameter,
    rescale_pair,
    scale_factor,
)
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.engine.synthetic.render import make_sample
from napari_sagegan.engine.train.segmenter import SegmenterTrainer

TARGET = 12.0


def layout(magnification: float, dark: bool = True, seed: int = 0):
    """The same particle layout drawn at a magnification: 6 discs of radius 6 px at x1."""
    centres = [(14, 14), (14, 48), (34, 30), (52, 12), (54, 50), (34, 56)]
    m = magnification
    shape = (int(68 * m), int(68 * m))
    return disc_image(
        shape,
        [(int(y * m), int(x * m)) for y, x in centres],
        radius=int(round(6 * m)),
        seed=seed,
        dark=dark,
    )


def toy_training_set(n=10):
    """``n`` layouts at random magnifications and both contrasts, plus two empty fields."""
    rng = np.random.default_rng(1)
    images, labels = [], []
    for i in range(n):
        m = float(rng.uniform(0.7, 2.0))
        img, lab = layout(m, dark=bool(i % 2), seed=i)
        images.append(img)
        labels.append(lab)
    for _ in range(2):
        images.append(rng.normal(128, 8, (96, 96)).astype(np.float32))
        labels.append(np.zeros((96, 96), np.int32))
    return images, labels


@pytest.fixture(scope="module")
def scaled_model():
    """A tiny model trained at a network scale of 12-px particles, both polarities."""
    # the same model whatever an earlier test left torch's thread count at (reductions, and
    # so the weights, depend on it)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _train_scaled_model()
    finally:
        torch.set_num_threads(threads)


def _train_scaled_model():
    torch.manual_seed(0)
    images, labels = toy_training_set(12)
    trainer = SegmenterTrainer(
        images,
        labels,
        TrainConfig(
            patch_size=48,
            batch_size=8,
            epochs=6,
            steps_per_epoch=15,
            lr=3e-3,
            val_fraction=0.25,
            augment_p=0.5,
            invert=True,
            min_instance_area=5,
            target_diameter=TARGET,
            scale_jitter=1.3,
            seed=0,
        ),
        arch=ArchConfig(base_channels=8, depth=3, dropout=0.0),
        device="cpu",
        infer=InferConfig(tile_size=64, overlap=0.25, min_size=8),
    )
    for _ in trainer.run():
        pass
    seg = Segmenter(
        trainer.best_model(),
        device="cpu",
        checkpoint={"train": {"target_diameter": TARGET}, "infer": trainer.infer.to_dict()},
    )
    return seg


def grid_discs(radius: int, dark: bool, n: int = 6):
    """``n x n`` discs on a jittered grid (spacing 3 radii), background texture and noise."""
    rng = np.random.default_rng(radius)
    spacing = 3 * radius + 2
    side = spacing * n + 2 * radius
    centres = [
        (
            int(spacing * (i + 0.5) + rng.integers(-1, 2)),
            int(spacing * (j + 0.5) + rng.integers(-1, 2)),
        )
        for i in range(n)
        for j in range(n)
    ]
    return disc_image((side, side), centres, radius=radius, seed=radius, dark=dark)


def test_size_estimate_within_20_percent_on_known_sizes():
    for radius in (3, 8, 20, 45):
        for dark in (True, False):
            img, lab = grid_discs(radius, dark)
            truth = median_diameter(lab)
            est = estimate_diameter(img)
            assert est == pytest.approx(truth, rel=0.2), (radius, dark, est, truth)
    for kind, seed in (("tem_dispersed", 0), ("haadf_square", 0), ("sem_sparse", 1)):
        img, lab = make_sample(kind, shape=(384, 384), seed=seed)
        assert estimate_diameter(img) == pytest.approx(median_diameter(lab), rel=0.2), kind


def test_size_estimate_on_a_huge_image_reads_only_a_crop(tmp_path):
    img, lab = disc_image((300, 300), [(60, 60), (150, 150), (240, 80)], radius=10)
    big = np.lib.format.open_memmap(
        tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(6000, 6000)
    )
    big[:] = 190
    big[2850:3150, 2850:3150] = img  # the central crop holds the particles
    assert estimate_diameter(big) == pytest.approx(median_diameter(lab), rel=0.2)


def test_scale_factor_and_rescale_pair():
    assert scale_factor(64.0, 32.0) == 0.5
    assert scale_factor(1.0, 32.0) == MAX_FACTOR  # clipped
    assert scale_factor(None, 32.0) == 1.0
    img, lab = disc_image((64, 64), [(20, 20), (44, 40)], radius=7)
    big_img, big_lab = rescale_pair(img, lab, 2.0)
    assert big_img.shape == big_lab.shape == (128, 128)
    assert set(np.unique(big_lab)) == {0, 1, 2}  # nearest neighbour keeps the ids
    assert median_diameter(big_lab) == pytest.approx(2 * median_diameter(lab), rel=0.05)


def test_zoomed_patches_keep_image_and_targets_aligned():
    img, lab = disc_image((64, 64), [(20, 20), (44, 40)], radius=7)
    sampler = PatchSampler(
        [img], [lab], patch_size=32, augment_p=0.0, fg_bias=1.0, scale_jitter=2.0, seed=0
    )
    x, fg, dist = sampler.sample(16)
    assert x.shape == (16, 1, 32, 32) and fg.shape == dist.shape == (16, 32, 32)
    # dark particles: the particle pixels are darker than the rest in every patch
    for b in range(16):
        inside, outside = x[b, 0][fg[b] == 1], x[b, 0][fg[b] == 0]
        if inside.numel() > 4 and outside.numel() > 4:
            assert inside.mean() < outside.mean() - 0.5
        assert float(dist[b][fg[b] == 0].numpy().max(initial=0)) <= 0.5


def test_same_layout_at_several_magnifications_gives_the_same_count(scaled_model):
    counts, factors = [], []
    for m in (1.0, 2.0, 3.5):
        img, lab = layout(m)
        result = scaled_model.segment_sync(img)
        counts.append(int(result.labels.max()))
        factors.append(result.scale.factor)
        assert result.labels.shape == img.shape
        assert evaluate_pair(result.labels, lab)["f1@0.5"] >= 0.8, m
    assert counts == [6, 6, 6]
    assert factors[0] > factors[1] > factors[2]  # bigger particles are shrunk more


def test_same_layout_without_scale_handling_is_not_scale_invariant(scaled_model):
    # the control: at its own scale the network sees 42-px particles it never saw
    img, lab = layout(3.5)
    plain = scaled_model.segment_sync(
        img, InferConfig(tile_size=64, overlap=0.25, min_size=8, auto_scale=False)
    )
    scaled = scaled_model.segment_sync(img, InferConfig(tile_size=64, overlap=0.25, min_size=8))
    assert plain.scale.factor == 1.0
    assert evaluate_pair(scaled.labels, lab)["f1@0.5"] > evaluate_pair(plain.labels, lab)["f1@0.5"]


def test_inverted_image_gives_the_same_labels(scaled_model):
    img, lab = layout(1.5, dark=True, seed=5)
    a = scaled_model.segment_sync(img).labels
    b = scaled_model.segment_sync(255 - img).labels
    assert int(a.max()) == int(b.max()) == 6
    # each polarity finds its own particle size (the network's scale search), so the two
    # label images may differ by the tiny model's polarity bias; both must match the truth
    match = evaluate_pair(b, a)
    assert match["f1@0.5"] == 1.0 and match["dice"] >= 0.75
    for labels in (a, b):
        truth = evaluate_pair(labels, lab)
        assert truth["f1@0.5"] == 1.0 and truth["dice"] >= 0.85


def test_user_diameter_overrides_the_estimate(scaled_model):
    img, lab = layout(2.0)
    result = scaled_model.segment_sync(
        img, InferConfig(tile_size=64, overlap=0.25, min_size=8, diameter=24.0)
    )
    assert result.scale.source == "user" and result.scale.diameter == 24.0
    low = InferConfig().scale_band[0] * TARGET  # resampled to the low end of the band
    assert result.scale.factor == pytest.approx(low / 24.0)
    assert int(result.labels.max()) == 6
    auto = scaled_model.segment_sync(img)
    assert auto.scale.source in ("estimate", "network")
    assert auto.scale.diameter == pytest.approx(median_diameter(lab), rel=0.2)


def test_empty_image_gives_an_empty_result(scaled_model):
    flat = np.full((80, 80), 128, np.uint8)
    noise = np.random.default_rng(0).normal(128, 3, (80, 80)).astype(np.float32)
    for image in (flat, noise):
        result = scaled_model.segment_sync(image)
        assert result.labels.shape == image.shape
        assert int(result.labels.max()) == 0


def test_resampled_inference_is_the_same_on_a_memmap_and_a_stack(scaled_model, tmp_path):
    img, _ = layout(2.0)
    config = InferConfig(tile_size=32, min_size=8, diameter=24.0)  # several tiles
    ref = scaled_model.segment_sync(img, config).labels
    mm = np.lib.format.open_memmap(
        tmp_path / "img.npy", mode="w+", dtype=img.dtype, shape=img.shape
    )
    mm[:] = img
    assert np.array_equal(scaled_model.segment_sync(mm, config).labels, ref)
    stack = np.stack([img, img])
    result = scaled_model.segment_sync(stack, config)
    assert result.labels.shape == stack.shape
    assert int(result.labels[0].max()) == int(ref.max())


# --------------------------------------------------------------------------- found by the network


def test_one_layout_at_several_magnifications_gives_one_count_and_unbiased_sizes(scaled_model):
    from napari_sagegan.engine.analysis.metrics import size_ratios
    from napari_sagegan.engine.infer.calibrate import calibrate
    from napari_sagegan.util.progress import run_to_end

    # calibrate the tiny model's operating point on a few labelled layouts of the same
    # imaging conditions (dark particles), as training or a fine-tune on a user's data does
    cal_imgs, cal_labs = zip(*(layout(m, dark=d, seed=30 + i) for i, (m, d) in
                              enumerate([(1.0, True), (1.6, True), (2.2, True), (0.9, True)])))  # fmt: skip
    point = run_to_end(calibrate(scaled_model, list(cal_imgs), list(cal_labs)))
    assert point.size_bias is not None and abs(point.size_bias - 1) <= 0.05
    config = scaled_model.default_infer_config(**point.infer_overrides())
    every = []
    for m in (0.8, 1.5, 2.5, 4.0):
        img, lab = layout(m, seed=7)
        res = scaled_model.segment_sync(img, config)
        assert res.scale.source == "network", m
        assert res.scale.diameter == pytest.approx(median_diameter(lab), rel=0.25), m
        assert int(res.labels.max()) == 6, m
        ratios = size_ratios(res.labels, lab)
        # a 4-channel toy network: within 15 % at each magnification (9-px particles are
        # the hardest), and unbiased over all of them
        assert ratios.size == 6 and abs(float(np.median(ratios)) - 1) <= 0.15, (m, ratios)
        every.append(ratios)
    assert abs(float(np.median(np.concatenate(every))) - 1) <= 0.06


def test_a_first_guess_wrong_by_5x_still_comes_out_right(scaled_model, monkeypatch):
    import napari_sagegan.engine.infer.segment as segment_module

    img, lab = layout(2.0, seed=3)
    true = median_diameter(lab)
    for wrong in (true * 5, true / 5):
        monkeypatch.setattr(segment_module, "estimate_diameter", lambda _img, w=wrong: w)
        res = scaled_model.segment_sync(img)
        assert res.scale.diameter == pytest.approx(true, rel=0.3), wrong
        assert int(res.labels.max()) == 6
        assert evaluate_pair(res.labels, lab)["f1@0.5"] == 1.0
        # the classical guess alone would have been far off
        alone = scaled_model.segment_sync(
            img, InferConfig(tile_size=64, overlap=0.25, min_size=8, scale_search=False)
        )
        assert alone.scale.diameter == pytest.approx(wrong)


def test_estimate_scale_reports_a_confidence_and_the_ladder_in_progress(scaled_model):
    img, lab = layout(1.5, seed=4)
    gen = scaled_model.estimate_scale(img)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        info = stop.value
    assert info.source == "network" and 0.0 <= info.confidence <= 1.0
    assert info.diameter == pytest.approx(median_diameter(lab), rel=0.25)
    assert [e.step for e in events] == list(range(1, len(events) + 1)) and events
    assert all(e.stage == "scale" for e in events)
    # a user's diameter skips the search
    given = run_once(scaled_model.estimate_scale(img, InferConfig(diameter=20.0)))
    assert given.source == "user" and given.diameter == 20.0


def run_once(gen):
    from napari_sagegan.util.progress import run_to_end

    return run_to_end(gen)


def test_a_featureless_image_is_not_given_a_confident_size(scaled_model):
    noise = np.random.default_rng(0).normal(128, 3, (96, 96)).astype(np.float32)
    res = scaled_model.segment_sync(noise)
    assert int(res.labels.max()) == 0
    assert res.scale.confidence is None or res.scale.confidence < 0.5 or res.scale.diameter is None


def test_band_factor_resamples_only_outside_the_band_and_to_its_low_end():
    from napari_sagegan.engine.infer.scale import band_factor, scale_factor

    band = (0.75, 1.0)
    assert band_factor(28.0, 32.0, band) == 1.0  # in the band: used as it is
    assert band_factor(24.0, 32.0, band) == 1.0 and band_factor(32.0, 32.0, band) == 1.0
    assert band_factor(12.0, 32.0, band) == pytest.approx(2.0)  # small: up to 24 px, not 32
    assert band_factor(96.0, 32.0, band) == pytest.approx(0.25)  # large: down to 24 px
    assert band_factor(3.0, 32.0, band) == pytest.approx(4.0)  # clipped like scale_factor
    for d in (5.0, 20.0, 32.0, 50.0, 400.0):  # (1, 1): the training scale, as before
        assert band_factor(d, 32.0, (1.0, 1.0)) == scale_factor(d, 32.0)
    assert band_factor(None, 32.0, band) == 1.0 and band_factor(20.0, None, band) == 1.0


def test_bad_scale_band_is_refused():
    for bad in ((1.0, 0.5), (0.0, 1.0), (1.0,), "wide"):
        with pytest.raises(ValueError, match="scale_band"):
            InferConfig(scale_band=bad)
    assert InferConfig.from_dict({"scale_band": [0.5, 1.5]}).scale_band == (0.5, 1.5)


def test_overlap_is_the_network_context_unless_given():
    from napari_sagegan.engine.config import CONTEXT_PX

    assert InferConfig().overlap_for(1024) == pytest.approx(CONTEXT_PX / 1024)
    assert InferConfig().overlap_for(64) == 0.5  # at most half a tile
    assert InferConfig(overlap=0.25).overlap_for(1024) == 0.25


def test_a_checkpoints_stored_tiling_is_ignored_but_its_thresholds_are_kept(tiny_arch):
    from napari_sagegan.engine.infer.segment import Segmenter
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    stored = {"tile_size": 128, "overlap": 0.3, "batch_size": 8, "threshold": 0.7}
    seg = Segmenter(AttentionUNet(tiny_arch), device="cpu", checkpoint={"infer": stored})
    cfg = seg.default_infer_config()
    assert cfg.threshold == 0.7  # the model's calibration
    defaults = InferConfig()
    assert (cfg.tile_size, cfg.overlap, cfg.batch_size) == (
        defaults.tile_size,
        defaults.overlap,
        defaults.batch_size,
    )  # the machine's tiling, not the one of the version that wrote the checkpoint
    assert seg.default_infer_config(tile_size=256).tile_size == 256  # the user's wins


def test_shrunk_ladder_crops_are_measured_on_the_network_grid_as_on_their_own(
    scaled_model, monkeypatch
):
    """A rung that shrinks its crop (particles larger than the network scale) segments it
    on the network's grid instead of resampling the maps back: the same network input, so
    the same particles, measured in crop pixels within the quantisation of the grid."""
    import napari_sagegan.engine.infer.segment as segment_module
    from napari_sagegan.engine.infer import autoscale

    img, lab = layout(3.0, seed=5)  # discs of 36 px: rungs above 12 px shrink the crop
    true = median_diameter(lab)
    calls: list[tuple] = []
    real_search = autoscale.search_scale

    def spy(segment_crop, *a, **k):
        def both(crop, factor, box):
            out = segment_crop(crop, factor, box)
            calls.append((factor, out, crop.shape))
            return out

        return real_search(both, *a, **k)

    monkeypatch.setattr(segment_module, "search_scale", spy)
    monkeypatch.setattr(segment_module, "NETWORK_GRID_LADDER", True)
    new = run_once(scaled_model.estimate_scale(img))
    shrunk = [(f, out, shape) for f, out, shape in calls if f < 1]
    assert shrunk and all(isinstance(out, tuple) for _f, out, _s in shrunk)
    assert all(not isinstance(out, tuple) for f, out, _s in calls if f >= 1)  # as before
    divisor = scaled_model.model.config.divisor
    for f, (labels, grid), (h, w) in shrunk:
        # the network's grid: the crop shrunk by f, rounded up to the network's divisor
        assert labels.shape == tuple(-(-round(n * f) // divisor) * divisor for n in (h, w))
        assert grid == pytest.approx((labels.shape[0] / h * labels.shape[1] / w) ** 0.5)
    # the same search with the maps resampled back to every crop (the way before)
    monkeypatch.setattr(segment_module, "NETWORK_GRID_LADDER", False)
    calls.clear()
    old = run_once(scaled_model.estimate_scale(img))
    assert all(not isinstance(out, tuple) for _f, out, _s in calls)
    assert new.diameter == pytest.approx(old.diameter, rel=0.03)
    assert new.diameter == pytest.approx(true, rel=0.2)
