"""Images larger than memory: peak memory per worker of block-by-block segmentation.

Usage::

    nice -n 5 python benchmarks/bench_blocks.py [--limit-mb 64] [--block 1024] [--overlap 256]

Sets a memory limit, writes float32 tiled TIFFs of twice the limit (and of half of it, to
show that the peak does not follow the image) tile by tile from an iterator (dark discs on
a noisy background, rendered per tile: no image is ever whole in memory), trains the tiny
disc segmenter of the tests for a few seconds, and segments each image with
``api.segment_blocks`` (the ``sync`` scheduler: one block at a time, as one dask worker
runs them) in a fresh subprocess. Each subprocess reports its resident memory before
segmenting (Python, torch, dask, zarr, the model loaded), resets its peak (Linux
``/proc/self/clear_refs``) and reports the peak at the end (``VmHWM``; ``ru_maxrss`` where
the peak cannot be reset); the difference is what the blocks cost. Prints a table and writes section
``bench-blocks`` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

TILE = 512


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux: ``5`` into ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak resident memory since the last :func:`_reset_peak` (``VmHWM``), else the
    process's ``ru_maxrss``."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_scene(path: Path, side: int, diameter: float, seed: int = 0) -> int:
    """A ``side x side`` float32 tiled TIFF of dark discs on a jittered lattice, written a
    tile at a time; returns the number of discs."""
    import tifffile

    spacing = 2.5 * diameter
    n = int(math.ceil(side / spacing)) + 1
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-0.2, 0.2, (n, n, 2)) * spacing
    centres = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1) + 0.5
    centres = centres * spacing + jitter
    inside = (centres[..., 0] < side) & (centres[..., 1] < side)
    r = diameter / 2.0

    def tiles():
        for ty in range(0, side, TILE):
            for tx in range(0, side, TILE):
                yy, xx = np.mgrid[ty : ty + TILE, tx : tx + TILE].astype(np.float32)
                tile = np.full((TILE, TILE), 190.0, np.float32)
                i0, i1 = int(max(0, (ty - r) // spacing - 1)), int((ty + TILE + r) // spacing + 2)
                j0, j1 = int(max(0, (tx - r) // spacing - 1)), int((tx + TILE + r) // spacing + 2)
                for cy, cx in centres[i0:i1, j0:j1].reshape(-1, 2):
                    if cy < side and cx < side:
                        tile[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 60.0
                noise = np.random.default_rng(seed + ty * side + tx).normal(0, 8, tile.shape)
                yield (tile + noise).astype(np.float32)

    tifffile.imwrite(
        path, tiles(), shape=(side, side), dtype=np.float32, tile=(TILE, TILE),
        compression="zlib", photometric="minisblack", metadata=None, bigtiff=True,
    )  # fmt: skip
    return int(inside.sum())


def train_model(folder: Path) -> Path:
    """The tiny disc segmenter of tests/test_tasks.py (a few seconds on the CPU)."""
    from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
    from napari_sagegan.engine.train.segmenter import SegmenterTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import disc_image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(8):
        centres = [tuple(int(v) for v in rng.integers(10, 54, 2)) for _ in range(3)]
        img, lab = disc_image((64, 64), centres, radius=int(rng.integers(5, 8)), seed=100 + i)
        images.append(img)
        labels.append(lab)
    config = TrainConfig(
        patch_size=64, batch_size=4, epochs=6, steps_per_epoch=10, lr=3e-3,
        val_fraction=0.25, seed=0, augment_p=0.0, min_instance_area=5,
    )  # fmt: skip
    trainer = SegmenterTrainer(
        images, labels, config, arch=ArchConfig(base_channels=8, depth=2, dropout=0.1),
        device="cpu", infer=InferConfig(tile_size=64, min_size=5),
    )  # fmt: skip
    for _ in trainer.run():
        pass
    path = folder / "tiny.pt"
    trainer.save(path, state=trainer.best_state, epoch=6, metrics=trainer.best_metrics)
    return path


def child(args: argparse.Namespace) -> None:
    """Segment one image block by block; print one JSON line of measurements."""
    import torch

    from napari_sagegan import api
    from napari_sagegan.engine.infer.segment import Segmenter
    from napari_sagegan.util.progress import run_to_end

    torch.set_num_threads(args.threads)
    seg = Segmenter.load(args.model, device="cpu")
    import dask  # noqa: F401  (loaded before the baseline, as a worker has it)
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    base = _status_mb("VmRSS") or _peak_mb()
    reset = _reset_peak()  # the peak from now on: what the blocks add
    t0 = time.perf_counter()
    res = run_to_end(
        api.segment_blocks(
            args.image, out=args.out, model=seg, diameter=args.diameter,
            block_size=args.block, overlap=args.overlap, scheduler="sync",
            infer={"tile_size": 256, "exclude_annotations": False},
        )
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "baseline_mb": base, "peak_mb": _peak_mb(), "peak_reset": reset, "seconds": seconds,
        "n_particles": res.n_particles, "n_blocks": res.n_blocks, "stitched": res.merged,
        "overlap": res.overlap, "factor": res.scale.factor,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-mb", type=float, default=64.0)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=256)
    ap.add_argument("--diameter", type=float, default=128.0, help="disc diameter, pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    limit = args.limit_mb * 1e6
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="bench-blocks-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model = train_model(tmp)
        print(f"tiny model trained in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for share in (0.5, 2.0):
            side = int(16 * round(math.sqrt(share * limit / 4) / 16))
            image = tmp / f"scene-{side}.tif"
            t = time.perf_counter()
            n_true = write_scene(image, side, args.diameter)
            print(f"{image.name}: written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            cmd = [
                sys.executable, __file__, "--child", "--image", str(image),
                "--out", str(tmp / f"labels-{side}.zarr"), "--model", str(model),
                "--block", str(args.block), "--overlap", str(args.overlap),
                "--diameter", str(args.diameter), "--threads", str(args.threads),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            m = json.loads(done.stdout.strip().splitlines()[-1])
            mb = side * side * 4 / 1e6
            extra = m["peak_mb"] - m["baseline_mb"]
            raw.append({"side": side, "image_mb": mb, "true_particles": n_true, **m})
            rows.append([
                f"{side} x {side}", f"{mb:.0f}", f"{mb / args.limit_mb:.1f}x",
                f"{args.block} + 2 x {m['overlap']}", m["n_blocks"],
                f"{m['baseline_mb']:.0f}", f"{m['peak_mb']:.0f}", f"{extra:.0f}",
                "yes" if extra <= args.limit_mb else "no", f"{m['seconds']:.0f}",
                f"{side * side / 1e6 / m['seconds']:.2f}", f"{m['n_particles']} / {n_true}",
                m["stitched"],
            ])  # fmt: skip
            print(rows[-1], file=sys.stderr)
    header = [
        "image (px)", "image MB (float32)", "of the limit", "block (px)", "blocks",
        "RSS before (MB)", "peak RSS (MB)", "peak - before (MB)",
        f"within {args.limit_mb:.0f} MB", "time (s)", "MP/s", "particles found / drawn",
        "stitched across borders",
    ]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    print(json.dumps(raw, indent=1), file=sys.stderr)
    if args.write_docs:
        cmd = (
            f"nice -n 5 python benchmarks/bench_blocks.py --limit-mb {args.limit_mb:g} "
            f"--block {args.block} --overlap {args.overlap} --diameter {args.diameter:g} "
            f"--threads {args.threads} --write-docs"
        )
        write_section(
            "bench-blocks",
            "## Images larger than memory: peak memory per worker (block by block)\n\n"
            f"`{cmd}` on {machine()}.\n\n"
            f"A memory limit of {args.limit_mb:g} MB; float32 tiled TIFFs (zlib, "
            f"{TILE}-px tiles) of half and twice that, written tile by tile, of dark discs "
            f"{args.diameter:g} px across (2.5 diameters apart); the tiny disc segmenter of "
            "the tests (network scale 32 px, so every block is resampled by "
            f"{raw[-1]['factor']:.2f}); `api.segment_blocks` with the `sync` scheduler (one "
            "block at a time, as one dask worker runs them), output a zarr folder. Each run is "
            "a fresh process: *RSS before* is its resident memory with Python, torch, dask, "
            "zarr and the model loaded; its peak is then reset (`/proc/self/clear_refs`) and "
            "*peak RSS* is the peak during the segmentation (`VmHWM`). The "
            "image itself is never in memory: the peak over that baseline is set by the "
            "block (its window, maps, labels and post-processing), so it is the same for an "
            "image 4x larger.\n\n" + table + "\n\nThe disc count drawn includes discs cut by "
            "the image edge; the tiny model may miss or split a few, which does not bear on "
            "the memory.",
        )


if __name__ == "__main__":
    main()
