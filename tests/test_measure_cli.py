"""``sagegan measure``: CSV + summary JSON, pixel size from the right place, clean failures."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.draw import disk

from napari_sagegan.cli.measure import add_parser
from napari_sagegan.engine.analysis.measure import measure
from napari_sagegan.io.export import write_labels_tiff
from napari_sagegan.io.tables import summary_path, write_measurements


def discs(shape=(96, 96), centres=((30, 30), (60, 64), (75, 20)), radius=7):
    labels = np.zeros(shape, np.uint16)
    for i, c in enumerate(centres, 1):
        rr, cc = disk(c, radius, shape=shape)
        labels[rr, cc] = i
    return labels


def run(argv):
    parser = argparse.ArgumentParser(prog="sagegan")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["measure", *map(str, argv)])
    return args.func(args)


def test_pixel_size_from_the_command_line(tmp_path, capsys):
    write_labels_tiff(tmp_path / "a_labels.tif", discs())
    out = tmp_path / "particles.csv"
    assert run([tmp_path / "a_labels.tif", "--pixel-size", "2.5", "--out", out]) == 0
    assert "pixel size 2.5 nm (from --pixel-size)" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert list(table["file"]) == ["a_labels.tif"] * 3
    expected = measure(discs(), pixel_size=2.5).table
    assert np.allclose(table["equivalent_diameter_nm"], expected["equivalent_diameter_nm"])
    assert np.allclose(table["feret_max_nm"], expected["feret_max_nm"], rtol=1e-5)
    summary = json.loads(summary_path(out).read_text())
    [record] = summary["files"]
    assert record["pixel_size_nm"] == 2.5 and record["unit"] == "nm"
    assert record["summary"]["n_particles"] == 3
    assert len(record["rdf"]["r_nm"]) == len(record["rdf"]["g"]) == 100


def test_pixel_size_from_the_label_file_then_from_the_image(tmp_path, capsys):
    labels = discs()
    tifffile.imwrite(
        tmp_path / "cal_labels.tif",
        labels,
        imagej=True,
        resolution=(0.5, 0.5),
        metadata={"unit": "nm"},
    )
    out = tmp_path / "cal.csv"
    run([tmp_path / "cal_labels.tif", "--out", out])
    assert "pixel size 2 nm (from cal_labels.tif (imagej metadata))" in capsys.readouterr().out
    assert "equivalent_diameter_nm" in pd.read_csv(out)

    write_labels_tiff(tmp_path / "img_labels.tif", labels)  # no pixel size in the labels
    image = np.where(labels > 0, 50, 200).astype(np.uint8)
    fei = "[Scan]\r\nPixelWidth=4e-10\r\nPixelHeight=4e-10\r\n"
    tifffile.imwrite(tmp_path / "img.tif", image, extratags=[(34682, "s", 0, fei, True)])
    out = tmp_path / "img.csv"
    run([tmp_path / "img_labels.tif", "--image", tmp_path / "img.tif", "--out", out])
    assert "pixel size 0.4 nm (from img.tif (fei metadata))" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert np.allclose(table["mean_intensity"], 50.0)
    assert json.loads(summary_path(out).read_text())["files"][0]["pixel_size_nm"] == 0.4


def test_without_pixel_size_lengths_stay_in_pixels(tmp_path, capsys):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "mask.png", (discs() > 0).astype(np.uint8) * 255)  # binary mask
    out = tmp_path / "px.csv"
    run([tmp_path / "mask.png", "--out", out])
    assert "pixel size unknown: measurements in pixels" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert len(table) == 3 and "equivalent_diameter_px" in table and "area_px2" in table
    assert not any(c.endswith("_nm") for c in table.columns)


def test_several_files_are_pooled(tmp_path):
    write_labels_tiff(tmp_path / "a.tif", discs())
    write_labels_tiff(tmp_path / "b.tif", discs(centres=((40, 40),), radius=10))
    out = tmp_path / "all.csv"
    run([tmp_path / "a.tif", tmp_path / "b.tif", "--pixel-size", "1", "--out", out])
    table = pd.read_csv(out)
    assert list(table["file"]) == ["a.tif"] * 3 + ["b.tif"]
    summary = json.loads(summary_path(out).read_text())
    assert [r["summary"]["n_particles"] for r in summary["files"]] == [3, 1]
    pooled = summary["pooled"]
    assert pooled["n_particles"] == 4
    assert pooled["number_density_per_nm2"] == pytest.approx(4 / (2 * 96 * 96))
    assert pooled["equivalent_diameter_nm_mean"] == pytest.approx(
        table["equivalent_diameter_nm"].mean()
    )


def test_stack_of_labels(tmp_path):
    write_labels_tiff(tmp_path / "stack.tif", np.stack([discs(), discs(radius=5)]))
    out = tmp_path / "stack.csv"
    run([tmp_path / "stack.tif", "--out", out])
    table = pd.read_csv(out)
    assert list(table["slice"]) == [0, 0, 0, 1, 1, 1]


def test_write_measurements_reads_back(tmp_path):
    labels = discs()
    image = np.where(labels > 0, 80.0, 10.0)
    path = tmp_path / "seg.csv"
    m = measure(labels, image, 0.8)
    write_measurements(path, m)
    back = pd.read_csv(path)
    assert list(back.columns) == list(m.table.columns)
    for col in ("area_nm2", "equivalent_diameter_nm", "psi6", "mean_intensity"):
        assert np.allclose(back[col], m.table[col], rtol=1e-5, equal_nan=True)
    assert back["touches_border"].dtype == bool
    summary = json.loads(summary_path(path).read_text())
    assert summary["files"][0]["summary"]["n_particles"] == 3
    assert summary["files"][0]["pixel_size_source"] == "given"


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--pixel-size", "-1"], ValueError, "positive"),
        (["--image", "a.tif", "a.tif"], ValueError, "one micrograph per label image"),
        (["--image", "small.tif"], ValueError, "pixel for pixel"),
    ],
)
def test_bad_arguments_fail_without_output(tmp_path, monkeypatch, extra, error, match):
    monkeypatch.chdir(tmp_path)
    write_labels_tiff("a.tif", discs())
    tifffile.imwrite("small.tif", np.zeros((10, 10), np.uint8))
    with pytest.raises(error, match=match):
        run(["a.tif", *extra, "--out", "out.csv"])
    assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "out.summary.json").exists()


def test_missing_inputs_and_outputs(tmp_path):
    write_labels_tiff(tmp_path / "a.tif", discs())
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        run([tmp_path / "nope.tif", "--out", tmp_path / "o.csv"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run([tmp_path / "a.tif", "--out", tmp_path / "no_such_dir" / "o.csv"])
    with pytest.raises(ValueError, match="folder"):
        run([tmp_path / "a.tif", "--out", tmp_path])


def test_mixed_units_are_refused(tmp_path):
    write_labels_tiff(tmp_path / "plain.tif", discs())
    tifffile.imwrite(
        tmp_path / "cal.tif", discs(), imagej=True, resolution=(1.0, 1.0), metadata={"unit": "nm"}
    )
    with pytest.raises(ValueError, match="--pixel-size"):
        run([tmp_path / "cal.tif", tmp_path / "plain.tif", "--out", tmp_path / "o.csv"])
    assert not (tmp_path / "o.csv").exists()


def test_summary_path():
    assert summary_path("x/run.csv").as_posix() == "x/run.summary.json"
    assert summary_path("results").as_posix() == "results.summary.json"
