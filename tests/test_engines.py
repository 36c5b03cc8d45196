"""Optional inference engines (ONNX Runtime, OpenVINO) and ``sagegan export``.

The engines must give torch's output (maps within 1e-4, the same labels) through the whole
Segmenter, fall back to torch with one warning when they cannot run, and the exported
ONNX file must carry what other tools need (metadata) and run in ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.cli import main
from napari_sagegan.engine.checkpoint import Checkpoint, default_model_path
from napari_sagegan.engine.config import InferConfig, preset
from napari_sagegan.engine.infer import engines
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.util.progress import run_to_end

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _net(seed: int = 0) -> AttentionUNet:
    """A tiny net whose head is scaled up, so that its maps are mostly far from the
    thresholds (a pixel within float rounding of 0.5 could flip a label)."""
    torch.manual_seed(seed)
    net = AttentionUNet(preset("tiny")).eval()
    with torch.no_grad():
        net.head.weight.mul_(20.0)
        net.head.bias.mul_(20.0)
    return net


@pytest.fixture(scope="module")
def net():
    return _net()


@pytest.fixture(scope="module")
def image():
    img, _ = disc_image((96, 136), ((30, 30), (60, 100), (50, 70)), radius=9)
    return img


def _segment(seg: Segmenter, image, engine: str, precision: str = "fp32"):
    """Float32 unless asked: the engines compute in float32, and ``auto`` prefers torch
    where it computes in bfloat16 (see test_auto_prefers_torch_where_it_runs_bf16)."""
    cfg = InferConfig(tile_size=64, overlap=0.25, batch_size=2, engine=engine, precision=precision)
    return run_to_end(seg.segment(image, cfg, keep_maps=True, with_attention=True))


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engine_gives_torchs_maps_and_labels(net, image, engine):
    if engine == "openvino":
        pytest.importorskip("openvino")
    seg = Segmenter(net, device="cpu")
    ref = _segment(seg, image, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the engine really ran
        got = _segment(seg, image, engine)
    assert seg._engines[engine] is not None
    assert np.abs(got.prob - ref.prob).max() < 1e-4
    assert np.abs(got.dist - ref.dist).max() < 1e-4
    assert np.abs(got.attention - ref.attention).max() < 1e-4
    assert ref.labels.max() > 0  # there is something to compare
    np.testing.assert_array_equal(got.labels, ref.labels)


def test_auto_builds_one_session_and_reuses_it(net, image):
    seg = Segmenter(net, device="cpu")
    _segment(seg, image, "auto")
    first = seg._engines[engines.AUTO_ORDER[0]]
    assert first is not None
    _segment(seg, image, "auto")
    assert seg._engines[engines.AUTO_ORDER[0]] is first


def test_auto_prefers_torch_where_it_runs_bf16(net, image, monkeypatch):
    """bfloat16 torch is faster than the float32 engines (docs/benchmarks.md, bench-engines):
    where the CPU has it, ``auto`` builds no engine session."""
    from napari_sagegan.engine import device as devmod

    monkeypatch.setattr(devmod, "cpu_has_native_bf16", lambda *a: True)
    seg = Segmenter(net, device="cpu")
    bf16 = _segment(seg, image, "auto", precision="auto")
    assert not any(seg.__dict__.get("_engines", {}).values())
    ref = _segment(seg, image, "torch", precision="bf16")
    np.testing.assert_array_equal(bf16.prob, ref.prob)  # the same computation: torch's
    monkeypatch.setattr(devmod, "cpu_has_native_bf16", lambda *a: False)
    _segment(seg, image, "auto", precision="auto")  # no native bf16: the engine, fp32
    assert seg._engines[engines.AUTO_ORDER[0]] is not None


def test_missing_engine_falls_back_to_torch_with_one_warning(net, image, monkeypatch):
    seg = Segmenter(net, device="cpu")
    ref = _segment(seg, image, "torch")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    with pytest.warns(RuntimeWarning) as record:
        a = _segment(seg, image, "onnxruntime")
        b = _segment(seg, image, "onnxruntime")
    texts = [str(w.message) for w in record if "onnxruntime" in str(w.message)]
    assert len(texts) == 1, texts
    assert "not installed" in texts[0] and "napari-sagegan[onnx]" in texts[0]
    for res in (a, b):  # torch's own output, bit for bit
        np.testing.assert_array_equal(res.prob, ref.prob)
        np.testing.assert_array_equal(res.labels, ref.labels)


def test_failing_session_falls_back_to_torch(net, image, monkeypatch):
    def broken(model: bytes):
        raise RuntimeError("no such provider")

    monkeypatch.setitem(engines.RUNNERS, "onnxruntime", broken)
    seg = Segmenter(net, device="cpu")
    with pytest.warns(RuntimeWarning, match="could not be built.*no such provider"):
        res = _segment(seg, image, "onnxruntime")
    ref = _segment(seg, image, "torch")
    np.testing.assert_array_equal(res.labels, ref.labels)


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be auto, torch, onnxruntime or openvino"):
        InferConfig(engine="tensorrt")


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny.pt"
    arch = preset("tiny")
    infer = InferConfig(threshold=0.55, seed_threshold=0.35, min_confidence=0.4)
    Checkpoint.from_model(_net(1), arch=arch, infer=infer, target_diameter=24.0).save(path)
    return path


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_writes_an_onnx_file_with_metadata_that_runs(checkpoint, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert "model.onnx" in capsys.readouterr().out
    meta = _meta(out)
    assert meta["format"] == "napari-sagegan-onnx"
    assert meta["target_diameter_px"] == "24"
    assert meta["threshold"] == "0.55" and meta["seed_threshold"] == "0.35"
    assert meta["min_confidence"] == "0.4" and "min_confidence" in meta["usage"]
    assert meta["divisor"] == "4"
    norm = json.loads(meta["normalization"])
    assert (norm["low_percentile"], norm["high_percentile"]) == (0.5, 99.8)
    assert json.loads(meta["arch"])["base_channels"] == preset("tiny").base_channels
    # the graph is the segmenter's: same maps as torch on a random batch of odd sizes
    seg = Segmenter.load(checkpoint, device="cpu")
    x = torch.rand(3, 1, 40, 52) * 2 - 1
    with torch.inference_mode():
        logits, psi = seg.model(x, return_attention=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    maps, att = sess.run(None, {"image": x.numpy()})
    assert maps.shape == (3, 2, 40, 52)
    assert np.abs(maps[:, 0] - torch.softmax(logits[:, :2], 1)[:, 1].numpy()).max() < 1e-4
    assert np.abs(maps[:, 1] - torch.sigmoid(logits[:, 2]).numpy()).max() < 1e-4
    assert np.abs(att - psi.numpy()).max() < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left


@pytest.mark.skipif(not default_model_path("generator").is_file(), reason="no bundled generator")
def test_export_refuses_a_generator_and_a_bad_out(checkpoint, tmp_path, capsys):
    generator = str(default_model_path("generator"))
    assert main(["export", generator, "--out", str(tmp_path / "g.onnx")]) == 2
    assert "not a segmenter" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model.txt")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    args = ["export", str(checkpoint), "--out", str(full), "--format", "bioimageio"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["full", "keep.txt"]


def test_bioimageio_package_is_consistent(checkpoint, tmp_path):
    import onnxruntime as ort
    import yaml

    out = tmp_path / "pkg.zip"
    args = ["export", str(checkpoint), "--out", str(out), "--format", "bioimageio"]
    assert main(args) == 0
    with zipfile.ZipFile(out) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    rdf = yaml.safe_load(files["rdf.yaml"])
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    for entry in [*rdf["weights"].values(), *(t["test_tensor"] for t in rdf["inputs"])]:
        assert hashlib.sha256(files[entry["source"]]).hexdigest() == entry["sha256"]

    def npy(name):
        import io

        return np.load(io.BytesIO(files[name]))

    # the preprocessing the rdf states, then the ONNX weights, give the test output
    x = npy(rdf["inputs"][0]["test_tensor"]["source"])
    steps = {p["id"]: p["kwargs"] for p in rdf["inputs"][0]["preprocessing"]}
    lo, hi = np.percentile(
        x, [steps["scale_range"]["min_percentile"], steps["scale_range"]["max_percentile"]]
    )
    lin = steps["scale_linear"]
    xn = np.clip((x - lo) / (hi - lo) * lin["gain"] + lin["offset"], -1, 1).astype(np.float32)
    sess = ort.InferenceSession(files[rdf["weights"]["onnx"]["source"]])
    maps = sess.run(["maps"], {"image": xn})[0]
    expected = npy(rdf["outputs"][0]["test_tensor"]["source"])
    assert maps.shape == expected.shape
    assert np.abs(maps - expected).max() < 1e-4
    assert rdf["config"]["napari_sagegan"]["target_diameter_px"] == "24"


def test_segment_cli_engine_flag_gives_torchs_labels(checkpoint, tmp_path):
    import imageio.v3 as iio
    import tifffile

    folder = tmp_path / "in"
    folder.mkdir()
    img, _ = disc_image((64, 80), ((20, 20), (40, 56)), radius=7)
    iio.imwrite(folder / "a.png", img)
    outs = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / engine
        args = ["segment", str(folder), "--out", str(out), "--model", str(checkpoint)]
        assert main([*args, "--engine", engine, "--device", "cpu", "--diameter", "14"]) == 0
        outs[engine] = tifffile.imread(out / "a.tif")
    np.testing.assert_array_equal(outs["onnxruntime"], outs["torch"])
