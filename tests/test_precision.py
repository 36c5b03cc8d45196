"""What the network computes in: float32, or bfloat16 where the CPU has it natively."""

import numpy as np
import pytest
import torch

from conftest import disc_image
from napari_sagegan.engine import device as devmod
from napari_sagegan.engine.config import ArchConfig, InferConfig
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.util.progress import run_to_end

CPU = torch.device("cpu")


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    return str(path)


def test_native_bf16_read_from_the_cpu_flags(tmp_path):
    has = _cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx_vnni")
    assert devmod.cpu_has_native_bf16(has) is True
    (tmp_path / "b").mkdir()
    lacks = _cpuinfo(tmp_path / "b", "fpu sse2 avx2 avx512f avx512bw avx512_vnni")
    assert devmod.cpu_has_native_bf16(lacks) is False
    (tmp_path / "c").mkdir()
    assert devmod.cpu_has_native_bf16(_cpuinfo(tmp_path / "c", "fpu amx_bf16 amx_tile")) is True
    assert devmod.cpu_has_native_bf16(str(tmp_path / "no-such-file")) is False


def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(devmod, "cpu_has_native_bf16", lambda *a: True)
    assert devmod.autocast_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(devmod, "cpu_has_native_bf16", lambda *a: False)
    assert devmod.autocast_dtype("auto", CPU) is None  # emulated bf16 would be slower
    assert devmod.autocast_dtype("auto", torch.device("cuda")) is torch.float16
    assert devmod.autocast_dtype("fp32", torch.device("cuda")) is None
    assert devmod.autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for: given
    assert devmod.autocast_dtype("fp32", CPU) is None
    assert devmod.autocast_dtype("auto", torch.device("mps")) is None


def test_bad_precision_says_what_is_accepted():
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        devmod.autocast_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        devmod.autocast_dtype("int8", CPU)
    with pytest.raises(ValueError, match="precision must be auto, fp32, bf16 or fp16"):
        InferConfig(precision="half")


def test_bf16_maps_are_float32_and_close_to_fp32():
    torch.manual_seed(0)
    seg = Segmenter(AttentionUNet(ArchConfig(base_channels=8, depth=2)), device="cpu")
    img, _ = disc_image((96, 96), ((30, 30), (60, 64)), radius=10)
    full = run_to_end(seg.predict_maps(img, InferConfig(tile_size=96, precision="fp32")))
    half = run_to_end(seg.predict_maps(img, InferConfig(tile_size=96, precision="bf16")))
    assert half.dtype == full.dtype == np.float32
    diff = np.abs(full - half)
    assert 0 < diff.max() < 0.05  # bfloat16 did run (not identical), and stayed close
    assert diff.mean() < 0.01


def test_stored_precision_is_not_taken_from_the_checkpoint():
    """Precision is a property of the machine, like the device: a model trained on a GPU
    whose checkpoint says fp16 must still run on a CPU."""
    torch.manual_seed(0)
    seg = Segmenter(AttentionUNet(ArchConfig(base_channels=4, depth=2)), device="cpu")
    seg.checkpoint = {"infer": {"precision": "fp16", "threshold": 0.4}}
    cfg = seg.default_infer_config()
    assert cfg.precision == "auto" and cfg.threshold == 0.4
    assert seg.default_infer_config(precision="fp32").precision == "fp32"


def test_the_default_tile_grows_in_16_bits_to_the_same_memory(monkeypatch):
    from napari_sagegan.engine.infer import segment as segmod

    seg = Segmenter(AttentionUNet(ArchConfig(base_channels=4, depth=2)), device="cpu")
    monkeypatch.setattr(devmod, "cpu_has_native_bf16", lambda *a: True)
    default = InferConfig()
    assert seg.network_tile(default) == segmod.HALF_PRECISION_TILE == 1280
    assert seg.network_tile(default.replace(precision="fp32")) == 1024
    assert seg.network_tile(default.replace(engine="onnxruntime")) == 1024  # float32 there
    assert seg.network_tile(default.replace(tile_size=512)) == 512  # the user's own tile
    # an image of 2048 network pixels: 3 tiles of 2048 x 768 (1.57 MP each, under 1280 ** 2)
    # in bfloat16, 2 x 3 of 1088 x 768 (under 1024 ** 2) in float32
    assert seg._tiles((2048, 2048), default, 1.0) == 3
    assert seg._tiles((2048, 2048), default.replace(precision="fp32"), 1.0) == 6
    monkeypatch.setattr(devmod, "cpu_has_native_bf16", lambda *a: False)
    assert seg.network_tile(default) == 1024  # auto is float32 on this CPU
