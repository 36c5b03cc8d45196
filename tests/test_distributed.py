"""``segment_distributed`` and ``sagegan segment --workers / --scheduler`` on a real dask
LocalCluster (2 worker processes, 1 thread each): the same files as a local run, resume,
failures reported, a killed worker's images retried."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from conftest import disc_image
from napari_sagegan import api
from napari_sagegan.cli import main
from napari_sagegan.util.progress import run_to_end
from test_tasks import trained_checkpoint

distributed = pytest.importorskip("distributed")

NAMES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny disc segmenter, four micrographs (and a broken file), and the local run's
    outputs on the four with one torch thread."""
    root = tmp_path_factory.mktemp("dist")
    (root / "model").mkdir()
    model = trained_checkpoint(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i, name in enumerate(NAMES):
        centres = [tuple(int(v) for v in rng.integers(14, 82, 2)) for _ in range(3)]
        img, _ = disc_image((96, 112), centres, radius=int(rng.integers(6, 10)), seed=10 + i)
        iio.imwrite(images / f"{name}.png", img)
    files = [images / f"{n}.png" for n in NAMES]
    bad = root / "bad" / "bad.tif"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a TIFF file")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_to_end(api.segment(files, model=model, device="cpu", out=root / "local", csv=True))
    finally:
        torch.set_num_threads(threads)
    return {"model": model, "files": files, "bad": bad, "local": root / "local"}


def _run(files, out, scheduler, model, **kw):
    events = []
    gen = api.segment_distributed(
        files, out=out, scheduler=scheduler, threads_per_worker=1, model=model, device="cpu",
        csv=True, **kw,
    )  # fmt: skip
    return run_to_end(gen, events.append), events


def _same_as_local(out: Path, local: Path, names) -> None:
    for n in names:
        a, b = tifffile.imread(local / f"{n}.tif"), tifffile.imread(out / f"{n}.tif")
        assert a.dtype == b.dtype and np.array_equal(a, b), n
        assert (local / f"{n}.csv").read_bytes() == (out / f"{n}.csv").read_bytes(), n
        summary = (local / f"{n}.summary.json").read_bytes()
        assert summary == (out / f"{n}.summary.json").read_bytes(), n


def _report(folder: Path) -> dict:
    return json.loads((folder / "segment_report.json").read_text())


def test_same_files_as_the_local_run(client, data, tmp_path):
    out = tmp_path / "out"
    events = []
    gen = api.segment_distributed(
        data["files"], out=out, scheduler=client, threads_per_worker=1, model=data["model"],
        device="cpu", csv=True,
    )  # fmt: skip
    held = None
    for ev in gen:
        events.append(ev)
        if ev.stage == "image" and held is None:  # the model went to every worker once
            held = client.run(
                lambda dask_worker: [k for k in dask_worker.plugins if k.startswith("sagegan-")]
            )
    assert len(held) == 2 and all(len(v) == 1 for v in held.values())
    assert client.run(torch.get_num_threads) == {w: 1 for w in held}
    _same_as_local(out, data["local"], NAMES)
    assert any(tifffile.imread(out / f"{n}.tif").max() > 0 for n in NAMES)
    report, local = _report(out), _report(data["local"])
    assert report["images"] == local["images"] and report["model"] == local["model"]
    assert report["errors"] == [] and report["settings"]["csv"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in data["local"].iterdir())
    images = [e for e in events if e.stage == "image"]
    assert [e.step for e in images] == [1, 2, 3, 4] and images[-1].eta_s == 0
    assert all(e.data["result"].labels is None for e in images)
    assert not any(
        client.run(lambda dask_worker: [k for k in dask_worker.plugins if "sagegan" in k]).values()
    )  # the model is taken off the workers at the end


def test_resume_skips_finished_images_and_redoes_incomplete_ones(client, data, tmp_path):
    out = tmp_path / "out"
    files = data["files"][:3]
    _run(files, out, client, data["model"])
    kept = (out / "a.tif").stat().st_mtime_ns
    (out / "b.tif").unlink()  # deleted
    (out / "c.csv").unlink()  # incomplete: one file of three gone
    results, events = _run(files, out, client, data["model"])
    assert events[0].stage == "prepare" and events[0].data["skipped"] == 1
    assert "1 of 3 image(s) already segmented" in events[0].message
    assert [r["status"] for r in results] == ["skipped", "segmented", "segmented"]
    assert (out / "a.tif").stat().st_mtime_ns == kept
    _same_as_local(out, data["local"], ["a", "b", "c"])
    assert [e["file"] for e in _report(out)["images"]] == ["a.png", "b.png", "c.png"]
    # other settings in the same folder would mix two runs' outputs: refused, nothing touched
    with pytest.raises(ValueError, match=r"other settings \(infer: .*threshold.*--out"):
        _run(files, out, client, data["model"], infer={"threshold": 0.3})
    assert (out / "a.tif").stat().st_mtime_ns == kept


def test_a_failing_image_is_reported_and_the_others_finish(client, data, tmp_path):
    out = tmp_path / "out"
    files = [data["files"][0], data["bad"], data["files"][1]]
    results, events = _run(files, out, client, data["model"])
    assert [r["status"] for r in results] == ["segmented", "failed", "segmented"]
    assert "bad.tif" in results[1]["error"] and "TIFF" in results[1]["error"]
    [failed] = [e for e in events if e.stage == "failed"]
    assert failed.data["error"] == results[1]["error"]
    report = _report(out)
    assert report["errors"] == [{"file": "bad.tif", "error": results[1]["error"]}]
    assert [e["file"] for e in report["images"]] == ["a.png", "b.png"]
    assert not (out / "bad.tif").exists()
    _same_as_local(out, data["local"], ["a", "b"])


def test_bad_calls_are_refused_before_any_cluster(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="image files or folders.*api.segment"):
        run_to_end(api.segment_distributed(np.zeros((8, 8)), out=out, workers=1))
    with pytest.raises(ValueError, match="either a scheduler"):
        run_to_end(api.segment_distributed(data["files"], out=out, scheduler="x", workers=1))
    with pytest.raises(ValueError, match="workers must be a whole number"):
        run_to_end(api.segment_distributed(data["files"], out=out, workers=0))
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    with pytest.raises(ImportError, match=r"napari-sagegan\[distributed\]"):
        run_to_end(api.segment_distributed(data["files"], out=out, workers=1))


def test_cli_workers_and_scheduler(client, data, tmp_path, capsys):
    out = tmp_path / "out"
    model, bad = str(data["model"]), str(data["bad"])
    images = str(data["files"][0].parent)
    args = ["segment", images, bad, "--out", str(out), "--model", model, "--device", "cpu"]
    assert main([*args, "--csv", "--workers", "2"]) == 1  # an image failed
    err = capsys.readouterr().err
    assert "error: bad.tif: cannot read" in err and "1 of 5 image(s) failed" in err
    _same_as_local(out, data["local"], NAMES)
    (out / "d.tif").unlink()
    again = [*args, "--csv", "--scheduler", client.scheduler.address, "--threads-per-worker", "1"]
    assert main(again) == 1
    captured = capsys.readouterr()
    assert "3 of 5 image(s) already segmented" in captured.err
    assert "d.png: " in captured.out and "(segmented before: skipped)" in captured.out
    _same_as_local(out, data["local"], ["d"])
    assert main([*args, "--threads-per-worker", "2"]) == 2
    assert "--threads-per-worker needs --workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--workers", "2", "--scheduler", client.scheduler.address])


class KillOnce(distributed.WorkerPlugin):
    """Kills its worker process when a segmentation task starts there, once per marker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith("sagegan-segment-"):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)


def test_a_killed_workers_images_are_retried(client, data, tmp_path):
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker)), name="kill-once")
    try:
        results, _ = _run(data["files"], tmp_path / "out", client, data["model"])
    finally:
        client.unregister_worker_plugin("kill-once")
    assert marker.exists()  # a worker died while it held an image
    assert [r["status"] for r in results] == ["segmented"] * 4
    _same_as_local(tmp_path / "out", data["local"], NAMES)
