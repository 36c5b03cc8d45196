"""Faults around outputs (issue 15, items 2, 5, 6, 7, 8): an output never overwrites an
input; a full or read-only disk is one line and leaves nothing behind; an output folder is
replaced all or nothing, even across ``kill -9``; SIGTERM is a clean stop; the leftovers of
killed runs are removed by the next run (never those of a live one); ``measure
--pixel-size`` and ``generate``'s flags are checked; file names that are not UTF-8 print."""

from __future__ import annotations

import errno
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
from napari_sagegan.io.export import write_labels_tiff
from napari_sagegan.util import files

ROOT = Path(__file__).resolve().parents[1]
HOST = files._host()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_data(root: Path, n: int = 4) -> Path:
    """``images/imK.tif`` micrographs, ``masks/imK.png`` and ``labels/imK.tif`` labels."""
    for d in ("images", "masks", "labels"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(12, 52, 2)) for _ in range(2)]
        img, lab = disc_image((64, 64), centres, radius=7, seed=i)
        tifffile.imwrite(root / "images" / f"im{i}.tif", img)
        iio.imwrite(root / "masks" / f"im{i}.png", lab.astype(np.uint16))
        write_labels_tiff(root / "labels" / f"im{i}.tif", lab)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny untrained segmenter (its images' own scale: fast) and a tiny generator with
    mask statistics, as ``augment`` writes them."""
    from napari_sagegan.engine.nets.generator import GeneratorConfig, StyleUNetGenerator
    from napari_sagegan.engine.synthetic.layouts import fit_stats

    root = tmp_path_factory.mktemp("fault_models")
    torch.manual_seed(0)
    arch = preset("tiny")
    Checkpoint.from_model(AttentionUNet(arch), arch=arch).save(root / "seg.pt")
    g = GeneratorConfig(base_channels=4, depth=2, z_dim=8, w_dim=8, mapping_layers=1)
    _, lab = disc_image((64, 64), ((20, 20), (44, 40)), radius=7)
    Checkpoint.from_model(
        StyleUNetGenerator(g), kind="generator", arch=g, extra={"mask_stats": fit_stats([lab])}
    ).save(root / "gen.pt")
    return root / "seg.pt", root / "gen.pt"


@pytest.fixture
def data(tmp_path):
    return _write_data(tmp_path / "data")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes; folders as ``b"<dir>"``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = b"<dir>" if p.is_dir() else p.read_bytes()
    return out


def one_error(err: str) -> str:
    """The one ``sagegan: error:`` line of ``err``: the last line, no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("sagegan: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err, err
    return errors[0]


TRAIN_FAST = ["--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "1", "--patch-size",
              "32", "--batch-size", "2", "--seed", "1", "--device", "cpu", "--no-calibrate"]  # fmt: skip
AUG_FAST = ["--max-minutes", "0.05", "--epochs", "1", "--steps-per-epoch", "1", "--patch-size",
            "32", "--gen-channels", "4", "--seed", "1", "--device", "cpu", "--n", "2"]  # fmt: skip


def command(name: str, root: Path, models, out: Path) -> list[str]:
    """``sagegan NAME`` on the data under ``root``, writing ``out``."""
    seg, gen = models
    images, masks, labels = root / "images", root / "masks", root / "labels"
    return {
        "segment": ["segment", str(images), "--out", str(out), "--model", str(seg),
                    "--device", "cpu"],
        "measure": ["measure", str(labels / "im0.tif"), "--out", str(out)],
        "evaluate": ["evaluate", "--pred", str(labels), "--gt", str(masks), "--json", str(out)],
        "train": ["train", "--images", str(images), "--masks", str(masks), "--out", str(out),
                  *TRAIN_FAST],
        "augment": ["augment", "--images", str(images), "--masks", str(masks), "--seg",
                    str(seg), "--out", str(out), *AUG_FAST],
        "generate": ["generate", "--generator", str(gen), "--out", str(out), "--n", "2",
                     "--layout", "hex", "--size", "32", "--device", "cpu"],
    }[name]  # fmt: skip


OUT_NAMES = {"segment": "seg_out", "measure": "particles.csv", "evaluate": "metrics.json",
             "train": "model.pt", "augment": "aug_out", "generate": "gen_out"}  # fmt: skip


# --------------------------------------------------------------------------- item 5


def _failing_writer(real, code: int):
    """A writer that starts writing its file (a few bytes), then fails with ``code``."""

    def fake(*args, **kwargs):
        target = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
        if target is not None:
            Path(target).write_bytes(b"partial")
        raise OSError(code, os.strerror(code))

    return fake


def _break_writing(monkeypatch, name: str, code: int) -> None:
    """Make the function that writes ``name``'s output fail as a full / read-only disk."""
    import pandas as pd

    if name in ("segment", "generate"):
        monkeypatch.setattr(tifffile, "imwrite", _failing_writer(tifffile.imwrite, code))
    elif name in ("train", "augment"):
        monkeypatch.setattr(torch, "save", _failing_writer(torch.save, code))
    elif name == "measure":
        monkeypatch.setattr(pd.DataFrame, "to_csv", _failing_writer(None, code))
    else:  # evaluate: the JSON's temporary file
        real = Path.write_text

        def write_text(self, *a, **k):
            if self.name.endswith(".tmp"):
                self.write_bytes(b"partial")
                raise OSError(code, os.strerror(code))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("name", list(OUT_NAMES))
def test_full_or_read_only_disk_is_one_line_and_leaves_nothing(
    name, code, data, models, monkeypatch, capsys
):
    out = data / OUT_NAMES[name]
    before = snapshot(data)
    _break_writing(monkeypatch, name, code)
    capsys.readouterr()
    assert main(command(name, data, models, out)) == 2
    line = one_error(capsys.readouterr().err)
    flag = "--json" if name == "evaluate" else "--out"
    reason = "no space left on device" if code == errno.ENOSPC else "read-only file system"
    assert line.startswith(f"sagegan: error: cannot write {out}: {reason}; ")
    assert line.endswith(flag) or f"another {flag}" in line
    assert snapshot(data) == before  # inputs unchanged, no output, no temporary file


def test_staging_on_a_read_only_disk_and_torch_on_a_full_one(data, models, monkeypatch, capsys):
    """The staging folder cannot be made (EROFS); ``torch.save`` reports a full disk as a
    RuntimeError, which is told apart by the free space left."""
    import tempfile

    before = snapshot(data)

    def mkdtemp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(data / ".sagegan-x"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", mkdtemp)
        assert main(command("segment", data, models, data / "o")) == 2
    assert "cannot write" in one_error(capsys.readouterr().err)

    def save(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(files, "_disk_full", lambda folder: True)
    assert main(command("train", data, models, data / "m.pt")) == 2
    assert "no space left on device" in one_error(capsys.readouterr().err)
    assert snapshot(data) == before
    monkeypatch.setattr(files, "_disk_full", lambda folder: False)  # another RuntimeError
    with pytest.raises(RuntimeError, match="unexpected pos"), files.atomic_path(data / "x") as t:
        save(None, t)
    assert snapshot(data) == before


def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    data, models, monkeypatch, capsys
):
    real = os.access
    with monkeypatch.context() as m:  # a folder the user may not write to
        m.setattr(os, "access", lambda p, mode, **k: Path(p) != data and real(p, mode, **k))
        assert main(command("segment", data, models, data / "seg_out")) == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"sagegan: error: cannot write {data / 'seg_out'}: ")
    assert "no permission" in line and "choose another --out" in line
    table = data / "t.csv"
    table.write_bytes(b"a user's table")
    table.chmod(0o444)  # protected by its owner: never replaced
    before = snapshot(data)
    assert main(command("measure", data, models, table)) == 2
    assert "is read-only" in one_error(capsys.readouterr().err)
    assert snapshot(data) == before


def test_api_names_the_output_of_a_write_error(tmp_path):
    with pytest.raises(files.OutputError) as info, files.staged_folder(tmp_path / "out") as st:
        with files.atomic_path(st / "a.tif") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # a read error inside the block stays what it is
    with pytest.raises(PermissionError), files.staged_folder(tmp_path / "out"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.tif"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- item 2


def _hardlink(src: Path, dst: Path) -> Path:
    os.link(src, dst)
    return dst


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        (
            "segment folder onto itself",
            lambda d, m: [
                "segment",
                str(d / "images"),
                "--out",
                str(d / "images"),
                "--model",
                str(m[0]),
            ],
        ),
        (
            "segment file into its folder",
            lambda d, m: [
                "segment",
                str(d / "images" / "im1.tif"),
                "--out",
                str(d / "images"),
                "--model",
                str(m[0]),
            ],
        ),
        (
            "measure onto its labels",
            lambda d, m: [
                "measure",
                str(d / "labels" / "im0.tif"),
                "--out",
                str(d / "labels" / "im0.tif"),
            ],
        ),
        (
            "measure onto its micrograph through a hard link",
            lambda d, m: [
                "measure",
                str(d / "labels" / "im0.tif"),
                "--image",
                str(d / "images" / "im0.tif"),
                "--out",
                str(_hardlink(d / "images" / "im0.tif", d / "link.csv")),
            ],
        ),
        (
            "evaluate onto the ground truth",
            lambda d, m: [
                "evaluate",
                "--pred",
                str(d / "labels"),
                "--gt",
                str(d / "masks"),
                "--json",
                str(d / "masks" / "im2.png"),
            ],
        ),
        (
            "train onto a training image",
            lambda d, m: [
                "train",
                "--images",
                str(d / "images"),
                "--masks",
                str(d / "masks"),
                "--out",
                str(d / "images" / "im0.tif"),
                *TRAIN_FAST,
            ],
        ),
        (
            "augment into its masks",
            lambda d, m: [
                "augment",
                "--images",
                str(d / "images"),
                "--masks",
                str(d / "masks"),
                "--seg",
                str(m[0]),
                "--out",
                str(d / "masks"),
                *AUG_FAST,
            ],
        ),
        (
            "generate into its masks",
            lambda d, m: [
                "generate",
                "--generator",
                str(m[1]),
                "--masks",
                str(d / "masks"),
                "--out",
                str(d / "masks"),
                "--n",
                "2",
            ],
        ),
    ],  # fmt: skip
)
def test_an_output_over_an_input_is_refused(name, argv, data, models, capsys):
    args = argv(data, models)
    before = snapshot(data)
    capsys.readouterr()
    assert main(args) == 2, name
    line = one_error(capsys.readouterr().err)
    assert "input" in line or "not empty" in line, line
    assert snapshot(data) == before  # byte-identical, nothing added


def test_api_refuses_outputs_over_inputs(data, models):
    from napari_sagegan import api
    from napari_sagegan.util.progress import run_to_end

    before = snapshot(data)
    lab = data / "labels" / "im0.tif"
    with pytest.raises(ValueError, match="is the input"):
        run_to_end(api.measure(lab, out=lab))
    with pytest.raises(ValueError, match="would overwrite the input"):
        run_to_end(api.segment(data / "images", model=models[0], out=data / "images"))
    with pytest.raises(ValueError, match="is the input"):
        run_to_end(api.evaluate(data / "labels", data / "masks", out=data / "masks" / "im1.png"))
    assert snapshot(data) == before
    # beside its inputs (a new name) is fine
    run_to_end(api.measure(lab, out=data / "labels" / "im0.csv"))
    assert (data / "labels" / "im0.summary.json").is_file()


# --------------------------------------------------------------------------- item 6


def _old_and_new(target: Path, n: int = 24) -> list[str]:
    target.mkdir()
    names = [f"x{i:02d}.tif" for i in range(1, n + 1)]
    for name in names:
        (target / name).write_bytes(b"old " + name.encode())
    return names


def _write_new(staging: Path, names: list[str]) -> None:
    for name in names:
        (staging / name).write_bytes(b"new " + name.encode())


@pytest.mark.parametrize("how", ["folder in the way", "read-only file", "rename fails"])
def test_staged_folder_replaces_all_or_none(tmp_path, monkeypatch, how):
    target = tmp_path / "out"
    names = _old_and_new(target)
    thirteenth = target / names[12]
    if how == "folder in the way":
        thirteenth.unlink()
        thirteenth.mkdir()
        error = IsADirectoryError
    elif how == "read-only file":
        thirteenth.chmod(0o444)
        error = PermissionError
    else:  # the 13th replacement itself fails: the first 12 are undone
        real = os.replace

        def replace(src, dst):
            if Path(src).name == names[12] and Path(src).parent.name == "new":
                raise OSError(errno.EIO, "Input/output error")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        error = OSError
    before = snapshot(target)
    with pytest.raises(error), files.staged_folder(target) as st:
        _write_new(st, names)
    assert snapshot(target) == before  # none replaced, no staging folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_segment_replaces_none_when_one_output_cannot_be(data, models, capsys):
    out = data / "seg_out"
    assert main(command("segment", data, models, out)) == 0
    (out / "im2.tif").unlink()
    (out / "im2.tif").mkdir()  # a folder where a label image goes
    for p in out.glob("*.tif"):
        if p.is_file():
            p.write_bytes(b"old")
    before = snapshot(out)
    capsys.readouterr()
    assert main(command("segment", data, models, out)) == 2
    assert "nothing was replaced" in one_error(capsys.readouterr().err)
    assert snapshot(out) == before


KILLER = """
import os, signal, sys
from pathlib import Path
from napari_sagegan.util import files
after = int(sys.argv[1])
def hook(i):
    if i == after:
        os.kill(os.getpid(), signal.SIGKILL)
files._MOVE_HOOK = hook
if sys.argv[2] == "cli":
    from napari_sagegan.cli import main
    sys.exit(main(sys.argv[3:]))
target = Path(sys.argv[3])
with files.staged_folder(target) as st:
    for name in sorted(p.name for p in target.iterdir() if not p.name.startswith(".")):
        (st / name).write_bytes(b"new " + name.encode())
"""


def _killed(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    return p


def test_kill_9_during_the_move_is_finished_by_the_next_run(tmp_path):
    target = tmp_path / "out"
    names = _old_and_new(target)
    _killed("12", "files", str(target))
    [staging] = [p for p in target.iterdir() if p.name.startswith(".sagegan-")]
    assert (staging / files.JOURNAL).is_file()
    contents = [(target / n).read_bytes()[:3] if (target / n).exists() else b"" for n in names]
    assert contents.count(b"new") == 12  # killed half way: a mix, for now
    files.new_folder(target)  # what the next run does first
    assert sorted(p.name for p in target.iterdir()) == names  # the staging folder is gone
    assert all((target / n).read_bytes() == b"new " + n.encode() for n in names)


def test_kill_9_during_segment_then_a_rerun_leaves_a_consistent_folder(data, models):
    import json

    out = data / "seg_out"
    argv = command("segment", data, models, out)
    assert main(argv) == 0
    first = snapshot(out)
    for p in out.iterdir():
        p.write_bytes(b"old")  # an older result, to see which files were replaced
    _killed("2", "cli", *argv)
    assert any(p.name.startswith(".sagegan-") for p in out.iterdir())
    assert {p.read_bytes() == b"old" for p in out.iterdir() if p.is_file()} == {True, False}
    # a run that stops on bad input, once it looked at --out, has finished the move it found
    assert main([*argv, "--diameter", "-1"]) == 2
    assert snapshot(out) == first
    assert main(argv) == 0
    assert snapshot(out) == first
    report = json.loads((out / "segment_report.json").read_text())
    assert [e["file"] for e in report["images"]] == [f"im{i}.tif" for i in range(4)]


# --------------------------------------------------------------------------- item 7


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_leftovers_are_removed_but_never_a_live_ones(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".im0.tif.{dead}-{HOST}-abc123.tmp",
                 tmp_path / f".sagegan-{dead}-{HOST}-xyz"]  # fmt: skip
        kept = [tmp_path / f".im1.tif.{live.pid}-{HOST}-abc123.tmp",
                tmp_path / f".sagegan-augment-{live.pid}-{HOST}-xyz",
                tmp_path / f".im2.tif.{dead}-00000000-abc123.tmp",  # another machine's
                tmp_path / ".im3.tif.abc123.tmp", tmp_path / ".hidden"]  # fmt: skip
        for p in stale + kept:
            if "sagegan" in p.name:
                (p / "new").mkdir(parents=True)
                (p / "new" / "x.tif").write_bytes(b"x")
            else:
                p.write_bytes(b"x")
        # the next run writing here: a measure table written into this folder
        write_labels_tiff(tmp_path / "lab.tif", np.eye(16, dtype=np.uint16))
        assert main(["measure", str(tmp_path / "lab.tif"), "--out", str(tmp_path / "t.csv")]) == 0
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()
    assert set(files.clean_stale(tmp_path)) == {kept[0], kept[1]}  # its process is gone


def _reader(stream, q):
    for line in stream:
        q.put(line)
    q.put(None)


def test_sigterm_is_a_clean_stop(data, models):
    out = data / "aug_out"
    argv = command("augment", data, models, out)
    argv[argv.index("--max-minutes") + 1] = "2"
    argv[argv.index("--epochs") + 1] = "1000"
    before = snapshot(data)
    p = subprocess.Popen([sys.executable, "-m", "napari_sagegan.cli", *argv], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(p.stderr, q), daemon=True).start()
    lines, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = q.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            lines.append(line)
            if "phase 2 on" in line:  # training has started, its staging folder exists
                assert [s for s in out.parent.iterdir() if s.name.startswith(".sagegan-")]
                time.sleep(1.0)
                p.send_signal(signal.SIGTERM)
                break
        rc = p.wait(timeout=60)
    finally:
        p.kill()
    while (line := q.get(timeout=10)) is not None:
        lines.append(line)
    err = "".join(lines)
    assert rc == 143, err
    assert err.strip().splitlines()[-1] == "sagegan: interrupted (SIGTERM)"
    assert "Traceback" not in err
    assert snapshot(data) == before  # nothing written, the staging folder removed


def test_main_restores_the_sigterm_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    write_labels_tiff(tmp_path / "lab.tif", np.eye(16, dtype=np.uint16))
    assert main(["measure", str(tmp_path / "lab.tif"), "--out", str(tmp_path / "t.csv")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("value", ["1e-300", "1e300", "inf", "nan", "0", "-1"])
def test_measure_pixel_size_must_be_plausible(value, tmp_path, capsys):
    write_labels_tiff(tmp_path / "lab.tif", np.eye(16, dtype=np.uint16))
    out = tmp_path / "t.csv"
    assert main(["measure", str(tmp_path / "lab.tif"), "--pixel-size", value, "--out",
                 str(out)]) == 2  # fmt: skip
    line = one_error(capsys.readouterr().err)
    assert "--pixel-size" in line and "1e-06 to 1e+06" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.tif"]


def test_api_measure_refuses_an_implausible_pixel_size(tmp_path):
    from napari_sagegan import api
    from napari_sagegan.util.progress import run_to_end

    with pytest.raises(ValueError, match=r"from 1e-06 to 1e\+06"):
        run_to_end(api.measure(np.eye(16, dtype=np.uint16), pixel_size=1e-300))


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--n", "2", "--size", "-5"], "--size is the side of the generated masks"),
        (["--n", "2", "--size", "0"], "--size"),
        (["--n", "0"], "--n is the number of pairs"),
        (["--n", "2", "--seed", "-1"], "--seed is a random seed"),
    ],
)
def test_generate_flags_are_checked(flags, needle, models, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--generator", str(models[1]), "--out", str(out), *flags]) == 2
    line = one_error(capsys.readouterr().err)
    assert needle in line and "a whole number from" in line
    assert not out.exists()


def test_names_that_are_not_utf8_print_under_a_strict_utf8_terminal(tmp_path, models):
    folder = os.fsencode(tmp_path)
    name = folder + b"/lab\xff.tif"
    write_labels_tiff(os.fsdecode(name), np.eye(16, dtype=np.uint16))
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}
    p = subprocess.run([sys.executable, "-m", "napari_sagegan.cli", "measure", name, "--out",
                        folder + b"/t\xfe.csv"], capture_output=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    assert b"lab\\xff.tif: " in p.stdout and b"Traceback" not in p.stderr
    assert b"t\\udcfe.csv" in p.stdout  # the output's name, printed as it was given
    assert os.path.exists(folder + b"/t\xfe.csv")
    # an error naming such a file is one line too
    p = subprocess.run([sys.executable, "-m", "napari_sagegan.cli", "measure", name, "--out",
                        name], capture_output=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith(b"sagegan: error: --out "), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
