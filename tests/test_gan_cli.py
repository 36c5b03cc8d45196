"""`sagegan augment` and `sagegan generate` end to end on tiny data, and their bad input."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from conftest import disc_image
from napari_sagegan.cli import main
from napari_sagegan.engine.checkpoint import Checkpoint
from napari_sagegan.engine.config import preset
from napari_sagegan.engine.nets.attention_unet import AttentionUNet


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_pairs(root, n=4, seed=0, empty=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(12, 52, 2)) for _ in range(2)]
        img, lab = disc_image((64, 64), centres, radius=7, seed=i)
        if empty:
            lab[:] = 0
        iio.imwrite(root / "images" / f"im{i}.png", img)
        iio.imwrite(root / "masks" / f"im{i}.png", lab.astype(np.uint16))
    return root / "images", root / "masks"


def _tiny_seg(path):
    torch.manual_seed(0)
    arch = preset("tiny")
    Checkpoint.from_model(AttentionUNet(arch), arch=arch).save(path)
    return path


AUG_FAST = [
    "--max-minutes", "0.05", "--epochs", "2", "--steps-per-epoch", "1",
    "--patch-size", "32", "--gen-channels", "4", "--seed", "1", "--device", "cpu",
    "--init-generator", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gan_cli")
    images, masks = _write_pairs(root)
    seg = _tiny_seg(root / "seg.pt")
    out = root / "aug"
    rc = main(
        ["augment", "--images", str(images), "--masks", str(masks), "--seg", str(seg),
         "--out", str(out), "--n", "3", "--layout", "paste", *AUG_FAST]
    )  # fmt: skip
    assert rc == 0
    return root, masks, out


def test_augment_writes_models_and_pairs(augmented, capsys):
    root, _masks, out = augmented
    assert sorted(p.name for p in out.iterdir()) == [
        "generator.pt",
        "images",
        "masks",
        "segmenter.pt",
    ]
    assert Checkpoint.load(out / "segmenter.pt", kind="segmenter")["kind"] == "segmenter"
    assert Checkpoint.load(out / "generator.pt", kind="generator")["extra"]["mask_stats"]
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["synth_0001.tif", "synth_0002.tif", "synth_0003.tif"]
    assert names == sorted(p.name for p in (out / "masks").iterdir())
    img = tifffile.imread(out / "images" / names[0])
    lab = tifffile.imread(out / "masks" / names[0])
    assert img.dtype == np.uint8 and img.shape == lab.shape and lab.max() >= 1
    assert not any(p.name.startswith(".sagegan") for p in root.iterdir())  # no staging left
    # the phase-2 segmenter is usable by `sagegan segment`
    seg_out = root / "seg_out"
    assert main(["segment", str(out / "images"), "--out", str(seg_out), "--model",
                 str(out / "segmenter.pt"), "--device", "cpu"]) == 0  # fmt: skip
    assert len(list(seg_out.glob("*.tif"))) == 3


def test_generate_from_masks_and_from_statistics(augmented, tmp_path):
    _root, masks, out = augmented
    g = out / "generator.pt"
    a = tmp_path / "from_masks"
    assert main(["generate", "--generator", str(g), "--out", str(a), "--n", "2",
                 "--masks", str(masks), "--device", "cpu"]) == 0  # fmt: skip
    labs = [tifffile.imread(p) for p in sorted((a / "masks").iterdir())]
    assert len(labs) == 2 and all(lab.shape == (64, 64) and lab.max() >= 1 for lab in labs)
    b = tmp_path / "lattice"
    assert main(["generate", "--generator", str(g), "--out", str(b), "--n", "2",
                 "--layout", "hex", "--size", "64", "--device", "cpu"]) == 0  # fmt: skip
    imgs = [tifffile.imread(p) for p in sorted((b / "images").iterdir())]
    assert [i.shape for i in imgs] == [(64, 64), (64, 64)]


def test_bad_input_gives_clear_errors_and_no_output(augmented, tmp_path, capsys):
    root, masks, out = augmented
    images = root / "images"
    # a checkpoint of the wrong kind
    dest = tmp_path / "o1"
    rc = main(["augment", "--images", str(images), "--masks", str(masks), "--seg",
               str(out / "generator.pt"), "--out", str(dest), *AUG_FAST])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "sagegan: error:" in err and "'segmenter' model is needed" in err
    assert not dest.exists()
    rc = main(["generate", "--generator", str(out / "segmenter.pt"), "--out", str(dest),
               "--n", "1"])  # fmt: skip
    assert rc == 2 and "'generator' model is needed" in capsys.readouterr().err
    # masks without particles
    bad_images, bad_masks = _write_pairs(tmp_path / "empty", empty=True)
    rc = main(["augment", "--images", str(bad_images), "--masks", str(bad_masks), "--seg",
               str(root / "seg.pt"), "--out", str(dest), *AUG_FAST])  # fmt: skip
    assert rc == 2 and "no particles" in capsys.readouterr().err
    assert not dest.exists()
    assert not any(p.name.startswith(".sagegan") for p in tmp_path.iterdir())
    # no pairs at all
    (tmp_path / "none_i").mkdir()
    (tmp_path / "none_m").mkdir()
    rc = main(["augment", "--images", str(tmp_path / "none_i"), "--masks",
               str(tmp_path / "none_m"), "--seg", str(root / "seg.pt"), "--out", str(dest)])  # fmt: skip
    assert rc == 2 and "sagegan: error:" in capsys.readouterr().err
    # an output folder that is not empty is never overwritten
    rc = main(["generate", "--generator", str(out / "generator.pt"), "--out", str(out),
               "--n", "1"])  # fmt: skip
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_augment_into_a_folder_that_is_not_empty_needs_overwrite(augmented, tmp_path, capsys):
    import shutil

    root, masks, out = augmented
    dest = tmp_path / "again"
    shutil.copytree(out, dest)
    (dest / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    args = ["augment", "--images", str(root / "images"), "--masks", str(masks), "--seg",
            str(root / "seg.pt"), "--out", str(dest), "--n", "1", *AUG_FAST]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert main([*args, "--overwrite"]) == 0
    # the four outputs replaced as a whole (one pair now, not three); the user's file stays
    assert sorted(p.name for p in (dest / "images").iterdir()) == ["synth_0001.tif"]
    assert sorted(p.name for p in (dest / "masks").iterdir()) == ["synth_0001.tif"]
    assert (dest / "notes.txt").read_text() == "mine"
    assert Checkpoint.load(dest / "segmenter.pt").kind == "segmenter"
    assert not any(p.name.startswith(".sagegan") for p in dest.iterdir())


def _bundle(monkeypatch, generator_file):
    """Make ``generator_file`` this installation's bundled generator (None: there is none)."""
    from napari_sagegan.engine import checkpoint

    real = checkpoint.default_model_path

    def fake(kind=checkpoint.SEGMENTER):
        if kind == checkpoint.GENERATOR:
            return generator_file if generator_file is not None else real(kind).with_name("no.pt")
        return real(kind)

    monkeypatch.setattr(checkpoint, "default_model_path", fake)


def test_bundled_generator_starts_phase_2_and_generates(augmented, tmp_path, monkeypatch):
    """``--init-generator default`` (the default) starts G from the bundled generator's
    weights; ``generate --generator default`` draws pairs with no training."""
    from napari_sagegan import api

    root, _masks, out = augmented
    bundled = Checkpoint.load(out / "generator.pt", kind="generator")
    _bundle(monkeypatch, out / "generator.pt")
    b = tmp_path / "gen"
    assert main(["generate", "--generator", "default", "--out", str(b), "--n", "1",
                 "--size", "64", "--device", "cpu"]) == 0  # fmt: skip
    assert len(list((b / "images").iterdir())) == 1
    gen = api.augment(folder=(root / "images", root / "masks"), seg=root / "seg.pt",
                      device="cpu")  # fmt: skip
    for ev in gen:
        if ev.stage == "prepare" and ev.step == 1:
            trainer = ev.data["trainer"]
            break
    gen.close()
    assert "from the bundled generator" in ev.message
    assert trainer.gen_config.base_channels == bundled.arch["base_channels"]
    for k, v in bundled.state_dict.items():
        assert torch.equal(trainer.G.state_dict()[k].cpu(), v.float())


def test_without_a_bundled_generator(augmented, tmp_path, monkeypatch, capsys):
    """No bundled generator: ``generate --generator default`` says so (exit 2) and phase 2
    starts from random weights, saying so."""
    from napari_sagegan import api

    root, _masks, _out = augmented
    _bundle(monkeypatch, None)
    assert main(["generate", "--generator", "default", "--out", str(tmp_path / "g"),
                 "--n", "1", "--device", "cpu"]) == 2  # fmt: skip
    assert "bundled generator is missing" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    gen = api.augment(folder=(root / "images", root / "masks"), seg=root / "seg.pt",
                      device="cpu")  # fmt: skip
    for ev in gen:
        if ev.stage == "prepare" and ev.step == 1:
            break
    gen.close()
    assert "from a random generator" in ev.message
