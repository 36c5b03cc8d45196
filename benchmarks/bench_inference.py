"""Tiled-inference throughput against MONAI, and peak memory on a large image.

Usage::

    python benchmarks/bench_inference.py [--size 2048] [--paper-size 1024] [--repeats 3]
        [--memory-size 8192] [--no-memory]

For each preset (default, paper) it times, in the same process and run:

1. napari-sagegan: our Attention U-Net through our tiler (``Segmenter.predict_maps``);
2. MONAI's ``sliding_window_inference`` driving *our* network (same tiles, Gaussian
   blending): isolates the tiler, and checks that both give the same output;
3. MONAI's ``AttentionUnet`` with the same channels through ``sliding_window_inference``:
   the named peer.

All use 512-px tiles, 25 % overlap, 4 tiles per batch, fp32 on the CPU, weights random (speed
does not depend on them). Throughput is megapixels per second (median of the repeats).
Then a subprocess segments a ``--memory-size``-squared uint8 memmap end to end (tiles +
post-processing) and reports its peak resident memory. Writes the tables into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402
from napari_sagegan.engine.checkpoint import default_model_path  # noqa: E402
from napari_sagegan.engine.config import InferConfig, preset  # noqa: E402
from napari_sagegan.engine.data.intensity import apply_range, robust_range  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.engine.nets.attention_unet import AttentionUNet, maps_from_logits  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

TILE, OVERLAP, BATCH = 512, 0.25, 4


def _image(size: int) -> np.ndarray:
    from napari_sagegan.engine.synthetic.render import make_sample

    img, _ = make_sample("tem_hex", shape=(size, size), seed=0)
    return img


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_preset(name: str, size: int, repeats: int) -> list:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import AttentionUnet

    torch.manual_seed(0)
    arch = preset(name)
    ours = AttentionUNet(arch).eval()
    seg = Segmenter(ours, device="cpu")
    cfg = InferConfig(tile_size=TILE, overlap=OVERLAP, batch_size=BATCH)
    image = _image(size)
    mp = size * size / 1e6

    t_ours, maps = _time(lambda: run_to_end(seg.predict_maps(image, cfg)), repeats)

    lo, hi = robust_range(image)
    x = torch.from_numpy(apply_range(image, lo, hi))[None, None]
    net_cl = seg.model  # channels_last copy of our network

    def monai_ours():
        with torch.inference_mode():
            return sliding_window_inference(
                x,
                (TILE, TILE),
                BATCH,
                lambda t: maps_from_logits(net_cl(t.contiguous(memory_format=torch.channels_last))),
                overlap=OVERLAP,
                mode="gaussian",
                padding_mode="reflect",
            )

    t_swi, out_swi = _time(monai_ours, repeats)
    diff = float((out_swi[0].numpy() - maps).__abs__().max())

    chans = tuple(arch.base_channels * 2**i for i in range(arch.depth + 1))
    peer = AttentionUnet(
        spatial_dims=2,
        in_channels=1,
        out_channels=arch.out_channels,
        channels=chans,
        strides=(2,) * arch.depth,
        dropout=arch.dropout,
    ).eval()

    def monai_peer():
        with torch.inference_mode():
            return sliding_window_inference(
                x, (TILE, TILE), BATCH, peer, overlap=OVERLAP, mode="gaussian"
            )

    t_peer, _ = _time(monai_peer, repeats)
    return [
        [
            name,
            f"{size}x{size}",
            "napari-sagegan (our net, our tiler)",
            mp / t_ours,
            t_peer / t_ours,
            "-",
        ],
        [
            name,
            f"{size}x{size}",
            "MONAI sliding_window_inference, our net",
            mp / t_swi,
            t_peer / t_swi,
            f"{diff:.1e}",
        ],
        [
            name,
            f"{size}x{size}",
            "MONAI AttentionUnet + sliding_window_inference (peer)",
            mp / t_peer,
            1.0,
            "n/a",
        ],
    ]


_MEMORY_CHILD = r"""
import resource, sys, time
import numpy as np, torch
from napari_sagegan.engine.config import InferConfig, preset
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.util.progress import run_to_end
from napari_sagegan.engine.infer.segment import Segmenter
path, size, diameter = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) or None
vote = sys.argv[4] == "1"  # every candidate size segmented in full: the vote's worst case
img = np.memmap(path, dtype=np.uint8, mode="r", shape=(size, size))
from napari_sagegan.engine.checkpoint import default_model_path
torch.manual_seed(0)
if default_model_path().is_file():  # the bundled model: real particles, real post-processing
    seg = Segmenter.load("default", device="cpu")
else:
    seg = Segmenter(AttentionUNet(preset("default")), device="cpu")
passes = []
plane = seg._plane
def counted(*a, **k):
    passes.append(1)
    return plane(*a, **k)
seg._plane = counted
cfg = seg.default_infer_config(diameter=diameter)  # defaults
if vote:
    cfg = cfg.replace(vote_below=1.01, vote_stop=1.01)
t = time.perf_counter()
res = run_to_end(seg.segment(img, cfg))
dt = time.perf_counter() - t
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, dt, int(res.labels.max()),
      res.scale.factor, len(passes))
"""


def default_tiling() -> str:
    """The default tiling of the bundled model on this machine, in words (the tile side
    depends on the precision ``auto`` resolves to here)."""
    from napari_sagegan.engine.device import autocast_dtype
    from napari_sagegan.engine.infer.segment import Segmenter

    seg = Segmenter.load("default", device="cpu")
    cfg = seg.default_infer_config()
    tile = seg.network_tile(cfg)
    dtype = autocast_dtype(cfg.precision, seg.device)
    return (
        f"tiles of at most {tile} x {tile} px shaped to the image, "
        f"{round(cfg.overlap_for(tile) * tile)}-px overlap, {cfg.batch_size} per batch, "
        f"precision {cfg.precision}: {str(dtype).replace('torch.', '') if dtype else 'float32'}"
        " on this CPU"
    )


def bench_memory(
    size: int, diameter: float = 0.0, kind: str = "tem_hex", vote: bool = False
) -> list:
    from napari_sagegan.engine.synthetic.render import make_sample

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.u8"
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(size, size))
        block = 2048
        tile, _ = make_sample(kind, shape=(block, block), seed=1)
        for y in range(0, size, block):
            for x in range(0, size, block):
                mm[y : y + block, x : x + block] = tile[
                    : min(block, size - y), : min(block, size - x)
                ]
        mm.flush()
        del mm
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _MEMORY_CHILD,
                str(path),
                str(size),
                str(diameter),
                "1" if vote else "0",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            check=True,
        )
    rss_mb, seconds, n, factor, n_passes = out.stdout.split()
    size_text = f"{diameter:g} px given" if diameter else "estimated"
    if vote and not diameter:
        size_text += f", every candidate size voted ({n_passes} full passes)"
    return [
        [
            f"{size}x{size} uint8 memmap ({kind})",
            f"{size_text}, resampled x{float(factor):.2f}",
            "bundled default model"
            if default_model_path().is_file()
            else "default preset, random weights",
            float(rss_mb),
            float(seconds),
            size * size / 1e6 / float(seconds),
            int(n),
        ]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--paper-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-size", type=int, default=8192)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--memory-diameter",
        type=float,
        nargs="+",
        default=[0.0],
        help="particle diameters (px) given for the memory runs (0: estimated, auto scale)",
    )
    ap.add_argument(
        "--memory-kind",
        default="tem_hex",
        help="the generated sample tiled over the memory run's image (make_sample kinds)",
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the memory run; keeps the throughput table in the docs",
    )
    ap.add_argument(
        "--memory-vote",
        action="store_true",
        help="with the size estimated, also a run with every candidate size segmented in "
        "full (vote_below and vote_stop above 1): the vote's worst case for memory",
    )
    args = ap.parse_args()
    if args.memory_only:
        mem = [
            row
            for d in args.memory_diameter
            for v in ((False, True) if args.memory_vote and not d else (False,))
            for row in bench_memory(args.memory_size, d, args.memory_kind, v)
        ]
        mtable = markdown_table(
            ["input", "particle size", "model", "peak RSS (MB)", "seconds", "MP/s", "particles"],
            mem,
        )
        print(mtable)
        write_section(
            "bench-memory",
            (
                "### Peak resident memory, whole segmentation (tiles + post-processing)\n\n"
                f"Machine: {machine()}.\nCommand: `python benchmarks/bench_inference.py "
                f"--memory-only --memory-size {args.memory_size} --memory-diameter "
                f"{' '.join(f'{d:g}' for d in args.memory_diameter)} --memory-kind "
                f"{args.memory_kind}{' --memory-vote' if args.memory_vote else ''}`\n\n"
                f"Default tiling ({default_tiling()}); "
                "0 = the particle size estimated (auto scale).\n\n" + mtable
            ),
        )
        return
    rows = bench_preset("default", args.size, args.repeats)
    rows += bench_preset("paper", args.paper_size, args.repeats)
    header = ["preset", "image", "pipeline", "MP/s", "speed vs MONAI peer", "max abs diff vs ours"]
    table = markdown_table(header, rows)
    print(table)
    body = (
        "## Tiled inference throughput (CPU)\n\n"
        f"Machine: {machine()}.\n"
        f"Command: `python benchmarks/bench_inference.py --size {args.size} --paper-size "
        f"{args.paper_size} --repeats {args.repeats} --memory-size {args.memory_size}`\n\n"
        f"Tiles {TILE} px, overlap {OVERLAP}, {BATCH} tiles per batch, fp32, median of "
        f"{args.repeats} runs. 'max abs diff' compares MONAI's sliding window driving our network "
        "with our tiler (same weights): the particle-probability and distance maps agree.\n\n"
        + table
    )
    if not args.no_memory:
        mem = [
            row
            for d in args.memory_diameter
            for v in ((False, True) if args.memory_vote and not d else (False,))
            for row in bench_memory(args.memory_size, d, args.memory_kind, v)
        ]
        mtable = markdown_table(
            ["input", "particle size", "model", "peak RSS (MB)", "seconds", "MP/s", "particles"],
            mem,
        )
        print(mtable)
        body += (
            "\n\n### Peak resident memory, whole segmentation (tiles + post-processing)\n\n"
            + mtable
        )
    write_section("bench-inference", body)


if __name__ == "__main__":
    main()
