"""scripts/demo.py, the README's first command, on tiny settings with the bundled model."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["tem_dispersed", "sem_sparse"]
SIZE = 128


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("sagegan_demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(demo, tmp_path_factory):
    """One demo run into a fresh folder, from an empty working directory."""
    base = tmp_path_factory.mktemp("demo")
    cwd = base / "cwd"
    cwd.mkdir()
    out = base / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        rc = demo.main(["--out", str(out), "--size", str(SIZE), "--kinds", ",".join(KINDS)])
    assert rc == 0
    return base, cwd, out


def report_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in KINDS:
            rows[cells[0]] = cells
    return rows


def test_demo_writes_consistent_outputs(demo, demo_run):
    from skimage.io import imread

    from napari_sagegan.io.images import read_image, read_labels

    base, cwd, out = demo_run
    assert sorted(p.name for p in base.iterdir()) == ["cwd", "out"]
    assert not any(cwd.iterdir())  # nothing written outside --out
    staging = [p for p in out.iterdir() if p.name.startswith(".sagegan-") and p.name != demo.MARKER]
    assert not staging  # sagegan segment's staging folder is gone
    for name in ("report.md", "metrics.json", "size_histogram.png"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    rows = report_rows(report)
    assert sorted(rows) == sorted(KINDS)
    for kind in KINDS:
        image = read_image(out / "images" / f"{kind}.tif")
        labels = read_labels(out / "labels" / f"{kind}.tif")
        truth = read_labels(out / "truth" / f"{kind}.tif")
        assert image.shape == labels.shape == truth.shape == (SIZE, SIZE)
        table = pd.read_csv(out / "labels" / f"{kind}.csv")
        n = len(np.unique(labels)) - 1
        assert len(table) == n == labels.max()
        summary = json.loads((out / "labels" / f"{kind}.summary.json").read_text())["files"][0]
        # the pixel size came from the TIFF's ImageJ calibration
        assert summary["pixel_size_nm"] == pytest.approx(demo.PIXEL_SIZE_NM[kind])
        assert summary["unit"] == "nm" and "equivalent_diameter_nm" in table
        assert summary["summary"]["n_particles"] == n

        overlay = imread(out / "overlays" / f"{kind}.png")
        assert overlay.shape == (SIZE, SIZE, 3) and overlay.dtype == np.uint8
        if n:  # the outlines are drawn in colour, the rest stays grey
            coloured = (overlay[..., 0] != overlay[..., 1]) | (overlay[..., 1] != overlay[..., 2])
            assert coloured.any()

        cells = rows[kind]
        border = table["touches_border"].astype(bool)
        assert cells[2] == f"{n} ({int(border.sum())})"
        assert cells[3] == str(int(truth.max()))
        d = table.loc[~border, "equivalent_diameter_nm"].to_numpy(float)
        if d.size:
            mean = float(re.match(r"([\d.]+) ± ", cells[4]).group(1))
            assert mean == pytest.approx(d.mean(), abs=0.006)
            assert float(cells[6]) == pytest.approx(np.percentile(d, 50), abs=0.006)
        else:
            assert cells[4] == "n/a"
        assert float(cells[9]) == pytest.approx(metrics["per_image"][kind]["dice"], abs=6e-4)
        assert float(cells[10]) == pytest.approx(metrics["per_image"][kind]["f1@0.5"], abs=6e-4)
        assert f"(overlays/{kind}.png)" in cells[11]
    assert "![" in report and "(size_histogram.png)" in report


def test_demo_run_again_replaces_its_outputs(demo, demo_run, capsys):
    _, _, out = demo_run
    stray = out / "notes.txt"  # something of the user's, not the demo's: kept
    stray.write_text("mine")
    rc = demo.main(["--out", str(out), "--size", "96", "--kinds", "sem_sparse"])
    assert rc == 0
    assert stray.read_text() == "mine"
    assert sorted(p.stem for p in (out / "images").iterdir()) == ["sem_sparse"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["sem_sparse.png"]
    assert "tem_dispersed" not in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "report.md" in printed and "-w napari-sagegan" in printed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--size", "10"], "--size"),
        (["--size", "big"], "invalid int"),
        (["--kinds", "tem_hex,nope"], "unknown sample kind 'nope'"),
        (["--model", "missing.pt"], "is not a file"),
        (["--train-minutes", "-1"], "--train-minutes"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_arguments_give_one_line(demo, tmp_path, capsys, argv, words):
    rc = demo.main(["--out", str(tmp_path / "out")] + argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("demo: error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_it_did_not_write(demo, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "precious.tif").write_bytes(b"x")
    assert demo.main(["--out", str(tmp_path), "--size", "64", "--kinds", "sem_sparse"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "images" / "precious.tif").read_bytes() == b"x"
