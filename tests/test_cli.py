"""The `sagegan` command end to end on tiny data, and its answers to bad input."""

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from conftest import disc_image
from napari_sagegan.cli import main


def _write_pairs(root, n=4, seed=0):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(12, 52, 2)) for _ in range(2)]
        img, lab = disc_image((64, 64), centres, radius=7, seed=i)
        iio.imwrite(root / "images" / f"im{i}.png", img)
        iio.imwrite(root / "masks" / f"im{i}.png", lab.astype(np.uint16))
    return root / "images", root / "masks"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    images, masks = _write_pairs(root)
    model = root / "model.pt"
    rc = main(
        [
            "train",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--out",
            str(model),
            "--preset",
            "tiny",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "3",
            "--patch-size",
            "64",
            "--batch-size",
            "2",
            "--seed",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    return root, images, masks, model


def test_train_segment_evaluate(trained, capsys):
    root, images, masks, model = trained
    assert model.is_file()
    out = root / "labels"
    other = root / "other"
    other.mkdir()
    tifffile.imwrite(other / "im0.tif", iio.imread(images / "im0.png"))
    rc = main(
        [
            "segment",
            str(images),
            str(other),
            "--out",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2  # two different files named im0: their outputs would collide
    assert not out.exists()
    rc = main(["segment", str(images), "--out", str(out), "--model", str(model), "--device", "cpu"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"im{i}.tif" for i in range(4)] + ["segment_report.json"]
    lab = tifffile.imread(out / "im0.tif")
    assert lab.shape == (64, 64) and lab.dtype == np.uint16
    assert not [p for p in root.iterdir() if p.name.startswith(".sagegan-")]
    rc = main(["evaluate", "--pred", str(out), "--gt", str(masks), "--json", str(root / "m.json")])
    assert rc == 0
    report = json.loads((root / "m.json").read_text())
    assert set(report["per_image"]) == {f"im{i}" for i in range(4)}
    assert 0.0 <= report["mean"]["dice"] <= 1.0
    assert "mean" in capsys.readouterr().out


def test_segment_a_stack_writes_zyx(trained):
    root, images, _masks, model = trained
    stack = np.stack([iio.imread(images / f"im{i}.png") for i in range(3)])
    tifffile.imwrite(root / "stack.tif", stack, photometric="minisblack")
    out = root / "stack_out"
    assert (
        main(
            [
                "segment",
                str(root / "stack.tif"),
                "--out",
                str(out),
                "--model",
                str(model),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert tifffile.imread(out / "stack.tif").shape == (3, 64, 64)


def _run(args):
    """Run the real console entry in a subprocess: exit code and stderr."""
    p = subprocess.run(
        [sys.executable, "-m", "napari_sagegan.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stderr


def test_bad_inputs_exit_with_one_line_and_no_output(trained, tmp_path):
    root, images, masks, model = trained
    out = tmp_path / "out"
    cases = []
    cases.append(
        (
            ["segment", str(tmp_path / "nope"), "--out", str(out), "--model", str(model)],
            "does not exist",
        )
    )
    # unreadable file among good ones: nothing at all is written
    bad_dir = tmp_path / "mixed"
    bad_dir.mkdir()
    iio.imwrite(bad_dir / "a.png", iio.imread(images / "im0.png"))
    (bad_dir / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cases.append(
        (["segment", str(bad_dir), "--out", str(out), "--model", str(model)], "cannot read")
    )
    # a 4-D array
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 2, 16, 16), np.uint8), imagej=True)
    cases.append(
        (["segment", str(tmp_path / "4d.tif"), "--out", str(out), "--model", str(model)], "shape")
    )
    # training: missing folder, no pairs, shapes that differ
    cases.append(
        (
            [
                "train",
                "--images",
                str(tmp_path / "nope"),
                "--masks",
                str(masks),
                "--out",
                str(tmp_path / "m.pt"),
                "--epochs",
                "1",
            ],
            "does not exist",
        )
    )
    other = tmp_path / "other"
    other.mkdir()
    iio.imwrite(other / "zzz.png", np.zeros((8, 8), np.uint8))
    cases.append(
        (
            [
                "train",
                "--images",
                str(other),
                "--masks",
                str(masks),
                "--out",
                str(tmp_path / "m.pt"),
                "--epochs",
                "1",
            ],
            "no",
        )
    )
    small = tmp_path / "small_masks"
    small.mkdir()
    iio.imwrite(small / "im0.png", np.zeros((32, 32), np.uint8))
    cases.append(
        (
            [
                "train",
                "--images",
                str(images),
                "--masks",
                str(small),
                "--out",
                str(tmp_path / "m.pt"),
                "--epochs",
                "1",
            ],
            "shape",
        )
    )
    # a model file that is not a checkpoint
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    cases.append(
        (
            ["segment", str(images), "--out", str(out), "--model", str(tmp_path / "junk.pt")],
            "damaged",
        )
    )
    for args, needle in cases:
        rc, err = _run(args)
        assert rc != 0, args
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("sagegan: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (args, err)
        assert all(ln.startswith("sagegan: ") for ln in lines), err  # no traceback
        assert needle in errors[0], (needle, errors[0])
        assert not out.exists(), args
        assert not (tmp_path / "m.pt").exists(), args
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sagegan-")]


def test_segment_writes_particle_csv(trained):
    import csv

    root, images, _masks, model = trained
    out = root / "with_csv"
    rc = main(
        [
            "segment",
            str(images / "im1.png"),
            "--out",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--csv",
            "--pixel-size",
            "2.5",
        ]
    )
    assert rc == 0
    labels = tifffile.imread(out / "im1.tif")
    with open(out / "im1.csv") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert len(rows) == int(labels.max())
    assert "equivalent_diameter_nm" in reader.fieldnames  # the pixel size was applied
    assert (out / "im1.summary.json").is_file()


def test_segment_particle_size_flags(trained, capsys):
    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.io.em import tiff_pixel_size

    root, images, _masks, model = trained
    assert Checkpoint.load(model).target_diameter == 32.0  # `train`'s default
    base = ["segment", str(images / "im1.png"), "--model", str(model), "--device", "cpu"]

    capsys.readouterr()
    assert main([*base, "--out", str(root / "d_px"), "--diameter", "20"]) == 0
    assert "im1.png: particle diameter ~ 20 px (given); image resampled x1.6" in (
        capsys.readouterr().err
    )
    out = root / "d_nm"
    assert main([*base, "--out", str(out), "--diameter-nm", "10", "--pixel-size", "0.5"]) == 0
    assert "particle diameter ~ 20 px = 10 nm (given)" in capsys.readouterr().err
    meta = tiff_pixel_size(out / "im1.tif")  # the labels carry the pixel size, for Fiji
    assert meta["pixel_size"] == pytest.approx(0.5) and meta["unit"] == "nm"
    assert main([*base, "--out", str(root / "d_auto")]) == 0
    assert "(estimated)" in capsys.readouterr().err

    # nm without a pixel size, or the size given twice: one line, nothing written
    assert main([*base, "--out", str(root / "bad1"), "--diameter-nm", "10"]) == 2
    assert "--pixel-size" in capsys.readouterr().err
    assert main([*base, "--out", str(root / "bad2"), "--diameter", "5", "--diameter-nm", "3"]) == 2
    assert "once" in capsys.readouterr().err
    assert not (root / "bad1").exists() and not (root / "bad2").exists()


def test_segment_report(trained):
    """``segment_report.json``: per image, the particle size used, its source, the
    thresholds and the pixel size (issue 12)."""
    root, images, _masks, model = trained
    out = root / "report"
    args = ["segment", str(images / "im0.png"), str(images / "im1.png"), "--out", str(out)]
    assert main([*args, "--model", str(model), "--device", "cpu", "--diameter", "14"]) == 0
    report = json.loads((out / "segment_report.json").read_text())
    assert report["format"] == "sagegan-segment-report" and report["version"] == 1
    assert report["model"] == str(model)
    assert [e["file"] for e in report["images"]] == ["im0.png", "im1.png"]
    for entry in report["images"]:
        assert set(entry) == {
            "file", "diameter_px", "diameter_source", "confidence", "resample_factor",
            "threshold", "seed_threshold", "tta_views", "min_confidence", "unsure_left_out",
            "n_particles", "pixel_size_nm",
            "pixel_size_source", "excluded", "nonfinite_pixels",
        }  # fmt: skip
        assert entry["nonfinite_pixels"] == 0  # PNGs: integers, never NaN
        assert entry["tta_views"] == 1  # no test-time augmentation unless asked
        # the model file's own minimum confidence (none in this one): every particle kept
        assert entry["min_confidence"] == 0.0 and entry["unsure_left_out"] == 0
        assert entry["diameter_px"] == 14.0 and entry["diameter_source"] == "given"
        assert entry["resample_factor"] == pytest.approx(32 / 14)
        assert entry["confidence"] is None or isinstance(entry["confidence"], float)
        assert isinstance(entry["threshold"], float) and isinstance(entry["seed_threshold"], float)
        assert isinstance(entry["n_particles"], int) and isinstance(entry["excluded"], list)
        assert entry["pixel_size_nm"] is None and entry["pixel_size_source"] is None
    labels = tifffile.imread(out / "im1.tif")
    assert report["images"][1]["n_particles"] == int(labels.max())
    # --tta 4: averaged over the mirror images, recorded per image
    assert main([*args[:-1], str(root / "tta"), "--model", str(model), "--device", "cpu",
                 "--diameter", "14", "--tta", "4"]) == 0  # fmt: skip
    tta = json.loads((root / "tta" / "segment_report.json").read_text())
    assert [e["tta_views"] for e in tta["images"]] == [4, 4]
    with pytest.raises(SystemExit) as bad:
        main([*args[:-1], str(root / "tta3"), "--model", str(model), "--tta", "3"])
    assert bad.value.code == 2 and not (root / "tta3").exists()

    tifffile.imwrite(root / "cal.tif", iio.imread(images / "im2.png"), imagej=True,
                     resolution=(2.0, 2.0), metadata={"unit": "nm"})  # fmt: skip
    out = root / "report_auto"
    assert main(["segment", str(root / "cal.tif"), "--out", str(out), "--model", str(model),
                 "--device", "cpu"]) == 0  # fmt: skip
    [entry] = json.loads((out / "segment_report.json").read_text())["images"]
    assert entry["diameter_source"] in ("estimated", "none")
    assert (entry["diameter_px"] is None) == (entry["diameter_source"] == "none")
    assert entry["pixel_size_nm"] == pytest.approx(0.5) and entry["pixel_size_source"] == "imagej"


@pytest.fixture(scope="module")
def disc_model(tmp_path_factory):
    """The tiny disc segmenter of the GUI tests (a network scale of 32 px)."""
    from test_tasks import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("disc_model"))


def _scale_bar_image(path):
    """A generated SEM image with a 55 px scale bar and its label burned in (no pixel size)."""
    from napari_sagegan.engine.synthetic.annotations import burn_in
    from napari_sagegan.engine.synthetic.render import make_sample

    image, labels = make_sample("sem_sparse", shape=(256, 256), seed=1)
    image, _, mask = burn_in(image, labels, np.random.default_rng(2), kinds=("scalebar",))
    iio.imwrite(path, image)
    return mask


def test_segment_warns_of_an_uncertain_size_and_reports_annotations(
    disc_model, tmp_path, capsys, monkeypatch
):
    """Issue 12: an uncertain size estimate is a warning naming the flags; the scale bar and
    its label are left out, listed on stderr and in segment_report.json; the pixel size the
    bar's label gives is proposed (with its flag), not applied."""
    import napari_sagegan.engine.infer.annotations as annotations

    mask = _scale_bar_image(tmp_path / "bar.png")
    monkeypatch.setattr(annotations, "_ocr", lambda crop: "50 nm")  # as Tesseract reads it
    base = ["segment", str(tmp_path / "bar.png"), "--model", str(disc_model), "--device", "cpu"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    warnings = [line for line in err if "warning: bar.png:" in line]
    assert len(warnings) == 1 and "uncertain" in warnings[0]
    assert "--diameter PX" in warnings[0] and "--diameter-nm NM" in warnings[0]
    assert any("bar.png: annotations left out: scale bar (55 px)" in line for line in err)
    proposal = [line for line in err if "scale bar of 55 px was found" in line]
    assert len(proposal) == 1 and "labelled 50 nm" in proposal[0]
    assert "--pixel-size 0.9091" in proposal[0]
    assert "bar.png: " in captured.out and "particles ->" in captured.out  # the result line

    [entry] = json.loads((tmp_path / "auto" / "segment_report.json").read_text())["images"]
    assert entry["pixel_size_nm"] is None  # proposed only
    assert entry["diameter_source"] == "estimated" and entry["confidence"] < 0.35
    kinds = [e["kind"] for e in entry["excluded"]]
    assert kinds[0] == "scalebar" and "label" in kinds
    bar = entry["excluded"][0]
    assert bar["length_px"] == 55.0 and isinstance(bar["particles"], int)
    y0, x0, y1, x1 = bar["bbox"]
    assert mask[y0:y1, x0:x1].all()  # the bar drawn

    # the size given and the pixel size known: no warning, no proposal; still reported
    assert main([*base, "--out", str(tmp_path / "given"), "--diameter", "32",
                 "--pixel-size", "0.9091"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning" not in err and "scale bar of" not in err
    assert "annotations left out: scale bar (55 px)" in err
    [entry] = json.loads((tmp_path / "given" / "segment_report.json").read_text())["images"]
    assert entry["excluded"][0]["kind"] == "scalebar"
    assert entry["pixel_size_nm"] == pytest.approx(0.9091)
    labels = tifffile.imread(tmp_path / "given" / "bar.tif")
    area = np.bincount(labels.ravel())
    on_bar = np.bincount(labels[mask].ravel(), minlength=area.size)
    assert entry["n_particles"] > 0 and not (on_bar[1:] > area[1:] // 2).any()  # no particle


def test_segment_notes_without_ocr(tmp_path):
    """Without Tesseract the bar's length is said, with what to do; a sure estimate is no
    warning."""
    from napari_sagegan.api import Segmented
    from napari_sagegan.cli.segment import notes
    from napari_sagegan.engine.infer.annotations import ScaleBarReading
    from napari_sagegan.engine.infer.scale import ScaleInfo
    from napari_sagegan.io.pixel_size import PixelSize

    sure = ScaleInfo(20.0, "network", 1.6, confidence=0.9)
    r = Segmented("a.png", None, 3, sure, PixelSize(None), None,
                  scale_bar=ScaleBarReading(120.0, None, None, None))  # fmt: skip
    [line] = notes(r)
    assert "scale bar of 120 px" in line and "--pixel-size NM" in line
    unsure = ScaleInfo(20.0, "network", 1.6, confidence=0.1, alternatives=(40.0, 10.0))
    r = Segmented("a.png", None, 3, unsure, PixelSize(1.0, "user"), None)
    [line] = notes(r)
    assert line.startswith("warning: a.png: the particle size estimate (20 px) is uncertain")
    assert "other candidates: 40, 10 px" in line and "--diameter PX" in line
