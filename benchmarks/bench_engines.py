"""Inference engines against PyTorch eager on this CPU, at equal output.

Usage::

    python benchmarks/bench_engines.py [--size 2048] [--repeats 3] [--images 8] [--threads N]
        [--no-write]

For each engine (torch eager fp32 and bfloat16, ONNX Runtime fp32 and int8, OpenVINO fp32
and int8), in one run and with the bundled model:

* **Throughput** of the tiled network (``Segmenter.predict_maps``) on a generated
  ``--size``-squared TEM image: 512-px tiles, 25 % overlap, 4 tiles per batch (the
  defaults), median of ``--repeats`` runs, the engines interleaved so that a busy machine
  slows all alike. Megapixels per second, and achieved GFLOP/s: the network's convolution
  FLOPs per tile (counted on the network, 2 per multiply-add) times the tiles run, over the
  time; as a fraction of this CPU's fp32 convolution ceiling (:func:`conv_ceiling`, the best
  of a few large 3x3 convolutions in PyTorch, measured in the same run; also its bfloat16
  ceiling, the same convolutions under autocast).
* **Equal output**: the max abs difference of the particle-probability and distance maps
  from torch's, on that image and on ``--images`` fixed EMPS validation images (the first
  of the leave-source-out validation, benchmarks/emps.py) at the scale torch's pipeline
  chose; and pooled F1@0.5 / size bias of the whole pipeline (scale search included) on
  those images, with its time.

int8: ONNX Runtime's static quantisation (``quantize_static``, QDQ, per-channel int8
weights, uint8 activations) calibrated on tiles of 4 EMPS *training* images resampled to
the network scale. For ONNX Runtime only the convolutions are quantised, with
``reduce_range`` (7-bit activations): on this AVX2 CPU without VNNI the full 8-bit
products saturate and the maps were off by up to 0.78. OpenVINO (no NNCF here) runs the
same quantiser's QDQ model of every operator, without ``reduce_range``, which it computes
without that saturation.

Writes the section ``bench-engines`` of docs/benchmarks.md (``bench-engines-N-thread`` with
``--threads N``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from bench_inference import _image  # noqa: E402
from bench_size import pooled  # noqa: E402
from napari_sagegan.engine.config import InferConfig  # noqa: E402
from napari_sagegan.engine.data.intensity import normalize  # noqa: E402
from napari_sagegan.engine.infer import engines  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.engine.infer.tiling import n_tiles  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

TILE, OVERLAP, BATCH = 512, 0.25, 4
#: (label, engine of InferConfig or None for a fixed int8 session, int8 variant, precision)
ENGINES = (
    ("torch eager fp32", "torch", None, "fp32"),
    ("torch eager bf16", "torch", None, "bf16"),
    ("onnxruntime fp32", "onnxruntime", None, "fp32"),
    ("onnxruntime int8", None, "onnxruntime", "fp32"),
    ("openvino fp32", "openvino", None, "fp32"),
    ("openvino int8", None, "openvino", "fp32"),
)


#: What was shipped, and why (docs/benchmarks.md, after each table).
CONCLUSION = (
    "torch bf16 (autocast to bfloat16) is what `InferConfig.precision='auto'`, the default, "
    "runs on a CPU with native bfloat16 (AVX512-BF16 or AMX); elsewhere auto is fp32. Its "
    "maps are not float32's to the last digit (see the max abs diff): on a few images the "
    "pipeline's choices (the particle size found, a threshold crossing) move with them, so "
    "its F1 on this small set is not float32's; on the 45 leave-source-out images of "
    "bench_throughput.py it was (same F1@0.5, size bias within 0.1 point). "
    "Shipped: the fp32 engines (`InferConfig.engine`, `sagegan segment --engine "
    "onnxruntime|openvino|auto`, extras `onnx` / `openvino`), whose maps equal torch's to float "
    "rounding and give the same F1 and size bias. Not shipped: int8, whose maps differ from "
    "torch's by up to a third on real images and change the pipeline's F1, so it is not the "
    "same output. torch stays the default: building an engine's session (the ONNX export) "
    "costs seconds per loaded model, more than it saves on one small image; `--engine auto` "
    "keeps torch where the precision resolves to 16 bits (bfloat16 here is faster than the "
    "float32 engines) and uses onnxruntime, when installed, where it resolves to float32."
)


def conv_ceiling(repeats: int = 3, dtype: torch.dtype | None = None) -> float:
    """This CPU's convolution ceiling in PyTorch, GFLOP/s: the best of large 3x3
    convolutions (64 and 128 channels, channels_last, batch 4), 2 FLOPs per multiply-add;
    in float32, or autocast to ``dtype``."""
    best = 0.0
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for c, side in ((64, 128), (128, 64)):
            conv = torch.nn.Conv2d(c, c, 3, padding=1).eval().to(memory_format=torch.channels_last)
            x = torch.randn(4, c, side, side).contiguous(memory_format=torch.channels_last)
            flops = 2.0 * c * c * 9 * x.shape[0] * side * side
            conv(x)
            for _ in range(repeats):
                t = time.perf_counter()
                conv(x)
                best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return best


def conv_flops(net: torch.nn.Module, side: int) -> float:
    """Convolution FLOPs of one ``side``-squared tile through ``net`` (2 per multiply-add,
    transposed convolutions included; element-wise operations left out)."""
    total = [0.0]

    def hook(mod, inputs, out):
        if isinstance(mod, torch.nn.ConvTranspose2d):
            n_in = inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
            total[0] += 2.0 * n_in * mod.in_channels * mod.out_channels * np.prod(mod.kernel_size)
        else:
            k = mod.in_channels // mod.groups * np.prod(mod.kernel_size)
            total[0] += 2.0 * out.numel() * k

    handles = [
        m.register_forward_hook(hook)
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    with torch.inference_mode():
        net(torch.zeros(1, 1, side, side))
    for h in handles:
        h.remove()
    return total[0]


class FixedEngine(Segmenter):
    """A segmenter whose network runs through a given tile prediction function."""

    def __init__(self, base: Segmenter, fn: Callable) -> None:
        self.__dict__.update(base.__dict__)
        self._fixed = fn

    def _predict_fn(self, with_attention: bool, engine: str = "torch", precision: str = "fp32"):
        return self._fixed(with_attention)


def calibration_tiles(seg: Segmenter, pairs, per_image: int = 4, side: int = 256):
    """Normalised ``(1, 1, side, side)`` tiles of ``pairs``' images at the network scale
    (the classical size estimate), a few per image on a regular grid."""
    import torch.nn.functional as F

    tiles = []
    for _name, img, _gt in pairs:
        info, _ = seg.plan(img)
        x = torch.from_numpy(normalize(img))[None, None]
        x = F.interpolate(x, scale_factor=info.factor, mode="bilinear", antialias=info.factor < 1)
        h, w = x.shape[-2:]
        if min(h, w) < side:
            x = F.pad(x, (0, max(0, side - w), 0, max(0, side - h)), mode="replicate")
            h, w = x.shape[-2:]
        for k in range(per_image):
            y0, x0 = (h - side) * (k // 2), (w - side) * (k % 2)  # the corners
            tiles.append(np.ascontiguousarray(x[..., y0 : y0 + side, x0 : x0 + side].numpy()))
    return tiles


def quantized(model: bytes, tiles, *, conv_only: bool) -> bytes:
    """ONNX Runtime's static QDQ quantisation of ``model``, calibrated on ``tiles``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(tiles)

        def get_next(self):
            t = next(self.it, None)
            return None if t is None else {engines.INPUT_NAME: t}

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("m.onnx", "p.onnx", "q.onnx"))
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "ConvTranspose"] if conv_only else None,
            reduce_range=conv_only,
        )
        return out.read_bytes()


def segmenters(base: Segmenter, calib_pairs) -> dict[str, tuple[Segmenter, InferConfig]]:
    """Every engine of :data:`ENGINES` as ``(segmenter, config)``; sessions built here."""
    fp32 = engines.onnx_bytes(base.model)
    tiles = calibration_tiles(base, calib_pairs)
    out = {}
    for label, engine, int8, precision in ENGINES:
        cfg = base.default_infer_config(
            tile_size=TILE, overlap=OVERLAP, batch_size=BATCH, precision=precision
        )
        if engine is not None:
            seg = base
            cfg = cfg.replace(engine=engine)
            run_to_end(seg.predict_maps(np.zeros((64, 64), np.uint8), cfg))  # build it now
        else:
            q = quantized(fp32, tiles, conv_only=int8 == "onnxruntime")
            run = engines.RUNNERS[int8](q)
            seg = FixedEngine(base, lambda a, run=run: engines.predict_fn_from_runner(run, a))
        out[label] = (seg, cfg)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads of every engine (0: torch's default); on a machine shared with other "
        "work, 1 avoids the cost of threads waiting for each other",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the engines take torch's thread count
    torch.manual_seed(0)
    base = Segmenter.load("default", device="cpu")
    train, val = emps.load_lso()
    val, calib = val[: args.images], train[:4]
    t0 = time.perf_counter()
    segs = segmenters(base, calib)
    print(f"sessions built in {time.perf_counter() - t0:.1f} s", flush=True)

    # throughput: engines interleaved, median of the repeats
    image = _image(args.size)
    times: dict[str, list[float]] = {k: [] for k in segs}
    maps: dict[str, np.ndarray] = {}
    ceilings, bf16_ceilings = [], []
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        ceilings.append(conv_ceiling())  # in the same conditions as the engines
        bf16_ceilings.append(conv_ceiling(dtype=torch.bfloat16))
        for label, (seg, cfg) in segs.items():
            t = time.perf_counter()
            maps[label] = run_to_end(seg.predict_maps(image, cfg))
            times[label].append(time.perf_counter() - t)
    ceiling = statistics.median(ceilings)
    bf16_ceiling = statistics.median(bf16_ceilings)
    tiles = n_tiles(image.shape, TILE, OVERLAP, base.model.config.divisor)
    flops = conv_flops(base.model, TILE) * tiles
    mp = image.size / 1e6

    # equal output on EMPS: the whole pipeline, engines interleaved per image after an
    # untimed pass each (lazy imports, first shapes); then the maps at torch's scale
    ref_label = ENGINES[0][0]
    warm = _image(256)
    for seg, cfg in segs.values():
        run_to_end(seg.segment(warm, cfg))
    results: dict[str, list] = {k: [] for k in segs}
    seconds = {k: 0.0 for k in segs}
    for _n, img, _gt in val:
        for label, (seg, cfg) in segs.items():
            t = time.perf_counter()
            results[label].append(run_to_end(seg.segment(img, cfg)))
            seconds[label] += time.perf_counter() - t
    scores = {
        k: pooled([(r.labels, gt) for r, (_n, _i, gt) in zip(res, val)])
        for k, res in results.items()
    }
    emps_diff = {k: 0.0 for k in segs}
    for (_n, img, _gt), ref in zip(val, results[ref_label]):
        ref_maps = None
        for label, (seg, cfg) in segs.items():
            m = run_to_end(seg.predict_maps(img, cfg, factor=ref.scale.factor))
            ref_maps = m if ref_maps is None else ref_maps
            emps_diff[label] = max(emps_diff[label], float(np.abs(m - ref_maps).max()))
    load.append(os.getloadavg()[0])
    print("EMPS seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)

    t_ref = statistics.median(times[ref_label])
    rows = []
    for label in segs:
        t = statistics.median(times[label])
        gflops = flops / t / 1e9
        s = scores[label]
        rows.append(
            [
                label,
                mp / t,
                gflops,
                f"{gflops / ceiling:.0%}",
                t_ref / t,
                f"{float(np.abs(maps[label] - maps[ref_label]).max()):.1e}",
                f"{emps_diff[label]:.1e}",
                s["f1"],
                f"{100 * (s['size_bias'] - 1):+.1f} %",
                seconds[ref_label] / seconds[label],
            ]
        )
    header = [
        "engine",
        "MP/s",
        "GFLOP/s",
        "of conv ceiling",
        "speed vs torch",
        "max abs diff (generated)",
        "max abs diff (EMPS)",
        "F1@0.5 (EMPS)",
        "size bias (EMPS)",
        "EMPS pipeline speed vs torch",
    ]
    table = markdown_table(header, rows)
    print(table)
    print(
        f"conv ceiling {ceiling:.0f} GFLOP/s (bf16 {bf16_ceiling:.0f}); {flops / tiles / TILE**2 / 1e6:.4f} MFLOP/pixel"
    )
    if args.no_write:
        return
    cmd = (
        f"python benchmarks/bench_engines.py --size {args.size} --repeats {args.repeats} "
        f"--images {args.images}" + (f" --threads {args.threads}" if args.threads else "")
    )
    body = (
        "## Inference engines (CPU): PyTorch eager, ONNX Runtime, OpenVINO"
        + (f", {args.threads} thread(s) each" if args.threads else "")
        + "\n\n"
        f"Machine: {machine()} (the same threads for every engine); onnxruntime "
        f"{_version('onnxruntime')}, openvino "
        f"{_version('openvino')}.\nCommand: `{cmd}`\n\n"
        f"Bundled model; network throughput on a generated {args.size}x{args.size} TEM image "
        f"through the tiler ({TILE}-px tiles, overlap {OVERLAP}, {BATCH} tiles per batch, "
        f"{tiles} tiles), median of {args.repeats} interleaved runs. The machine was shared "
        f"(load average {load[0]:.1f} at the start, {load[-1]:.1f} at the end, on "
        f"{os.cpu_count()} cores): compare the engines by their ratios, measured side by side, "
        "rather than by absolute speeds. GFLOP/s counts the "
        f"network's convolutions ({flops / tiles / TILE**2 / 1e6:.4f} MFLOP per network "
        f"pixel, {flops / 1e9:.0f} GFLOP for the image); the conv ceiling is the best of large "
        f"3x3 convolutions in PyTorch, measured before each repeat: {ceiling:.0f} GFLOP/s "
        f"(median; {bf16_ceiling:.0f} GFLOP/s autocast to bfloat16, against which torch "
        f"bf16 reaches {flops / statistics.median(times['torch eager bf16']) / 1e9 / bf16_ceiling:.0%}). "
        "Max abs diff: "
        "of the probability and distance maps against torch's, on the generated image and on "
        f"{len(val)} EMPS leave-source-out validation images at the scale torch chose; F1@0.5 "
        "(pooled) and size bias of the whole pipeline (scale search included) on those "
        "images, and its speed against torch's. int8: ONNX Runtime static QDQ quantisation "
        f"calibrated on {len(calib) * 4} tiles of 4 EMPS training images (see the script's "
        "docstring for the two variants).\n\n" + table + "\n\n" + CONCLUSION
    )
    name = "bench-engines" + (f"-{args.threads}-thread" if args.threads else "")
    write_section(name, body)


def _version(name: str) -> str:
    try:
        return __import__(name).__version__.split("-")[0]
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
