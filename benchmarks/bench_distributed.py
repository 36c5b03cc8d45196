"""Batch segmentation on a dask LocalCluster: throughput against the number of workers, the
scheduler's overhead per image, and a projection to 10,000 micrographs on N machines.

Usage::

    python benchmarks/bench_distributed.py [--images 8] [--workers 1,2] [--generated]
        [--cores-per-machine 32] [--trimmed] [--no-write]

The same image files (the first ``--images`` of the EMPS training split's fixed held-out
subset, read in place from ../shared/data/emps-train; ``--generated``: 512 x 512 synthetic
micrographs written to a temporary folder) are segmented with the bundled model:

1. locally (``api.segment``, one process, torch 1 thread, after a one-image warm-up): the
   per-image time;
2. with ``api.segment_distributed`` on a LocalCluster of 1, 2... worker processes (1 torch
   thread each), timed from the call to the last image (model sent and built included; the
   cluster's start-up and the workers' imports are timed apart), and checked to give the
   same labels as 1.;
3. a no-op task's round trip through the scheduler (one at a time, and 200 at once).

The scheduler's overhead per image is (1 worker - local) / images. The projection assumes
one worker per core, each as fast as one measured here, with the parallel efficiency of the
largest worker count measured; it is a projection, not a measurement. Writes the section
``bench-distributed`` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402
from napari_sagegan import api  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

PROJECTED = 10_000
#: The dask setting segment_distributed's own LocalCluster uses (see api/distributed.py).
UNTRIMMED = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def emps_files(n: int) -> list[Path]:
    """The first ``n`` images of the fixed held-out EMPS subset (paths, read in place)."""
    import emps
    from napari_sagegan.engine.data.pairs import split_indices
    from napari_sagegan.io.images import find_pairs

    if not emps.available():
        raise SystemExit(f"EMPS data not found at {emps.EMPS}; use --generated")
    pairs = find_pairs(emps.EMPS / "images", emps.EMPS / "masks")
    _, hold = split_indices(len(pairs), emps.HOLDOUT_FRACTION, emps.HOLDOUT_SEED)
    return [pairs[i][0] for i in sorted(hold)[:n]]


def generated_files(n: int, folder: Path) -> list[Path]:
    import imageio.v3 as iio

    from napari_sagegan.engine.synthetic.render import make_sample

    files = []
    for i in range(n):
        img, _ = make_sample("tem_hex" if i % 2 else "sem_sparse", shape=(512, 512), seed=i)
        files.append(folder / f"gen{i:02d}.png")
        iio.imwrite(files[-1], img)
    return files


def labels_of(folder: Path, files: list[Path]) -> list[np.ndarray]:
    return [tifffile.imread(folder / f"{f.stem}.tif") for f in files]


def noop() -> None:
    return None


def ident(i: int) -> int:
    return i


def warm() -> None:
    """What a fresh process imports before its first image (torch, the engine, the readers)."""
    import torch  # noqa: F401

    import napari_sagegan.api.distributed  # noqa: F401
    import napari_sagegan.engine.analysis.measure  # noqa: F401
    import napari_sagegan.engine.infer.segment  # noqa: F401
    import napari_sagegan.io.export  # noqa: F401
    import napari_sagegan.io.images  # noqa: F401


def round_trip(client, n: int = 200) -> tuple[float, float]:
    """Seconds per no-op task: one at a time (latency), and ``n`` at once (throughput)."""
    times = []
    for _ in range(20):
        t = time.perf_counter()
        client.submit(noop, pure=False).result()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    client.gather(client.map(ident, range(n), pure=False))
    return statistics.median(times), (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    ap.add_argument("--generated", action="store_true", help="synthetic 512 px images")
    ap.add_argument("--cores-per-machine", type=int, default=32)
    ap.add_argument(
        "--trimmed",
        action="store_true",
        help="workers with dask's MALLOC_TRIM_THRESHOLD_=65536 (segment_distributed unsets it)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    import dask
    import distributed

    load0 = os.getloadavg()[0]
    counts = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    if args.generated:
        (tmp / "in").mkdir()
        files, source = (
            generated_files(args.images, tmp / "in"),
            "generated 512x512 (sem_sparse, tem_hex)",
        )
    else:
        from napari_sagegan.io.images import read_image

        files = emps_files(args.images)
        px = sorted(int(np.prod(read_image(f).shape)) for f in files)
        source = f"EMPS held-out subset, {px[0] / 1e6:.2f} to {px[-1] / 1e6:.2f} MP each"
    torch.set_num_threads(1)
    run_to_end(api.segment(files[:1], model="default", device="cpu", out=tmp / "warm"))
    t = time.perf_counter()  # the local run timed warm: imports done, one image segmented
    run_to_end(api.segment(files, model="default", device="cpu", out=tmp / "local"))
    t_local = time.perf_counter() - t
    reference = labels_of(tmp / "local", files)
    n = len(files)
    rows = [
        ["local (api.segment), 1 process", 1, "-", "-", f"{t_local:.1f}", n / t_local,
         t_local / n, "-"]
    ]  # fmt: skip
    per_worker: dict[int, float] = {}
    overhead = None
    noop_latency = noop_batch = None
    for w in counts:
        t0 = time.perf_counter()
        with dask.config.set({} if args.trimmed else UNTRIMMED):  # as segment_distributed's
            cluster = distributed.LocalCluster(
                n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None
            )
        client = distributed.Client(cluster)
        start = time.perf_counter() - t0
        try:
            t = time.perf_counter()
            client.run(warm)  # every worker process imports what it needs
            warmup = time.perf_counter() - t
            t = time.perf_counter()
            gen = api.segment_distributed(
                files, out=tmp / f"w{w}", scheduler=client, threads_per_worker=1,
                model="default", device="cpu",
            )  # fmt: skip
            results = run_to_end(gen)
            elapsed = time.perf_counter() - t
            if w == counts[0]:
                noop_latency, noop_batch = round_trip(client)
        finally:
            client.close()
            cluster.close()
        assert all(r["status"] == "segmented" for r in results), results
        same = all(np.array_equal(a, b) for a, b in zip(reference, labels_of(tmp / f"w{w}", files)))
        per_worker[w] = elapsed
        if w == 1:
            overhead = (elapsed - t_local) / n
        rows.append(["segment_distributed, LocalCluster", w, f"{start:.1f}", f"{warmup:.1f}",
                     f"{elapsed:.1f}", n / elapsed, elapsed / n,
                     "yes" if same else "NO"])  # fmt: skip
    wmax = max(per_worker)
    t1 = per_worker.get(1, t_local) / n  # seconds per image on one worker
    efficiency = (per_worker.get(1, t_local) / per_worker[wmax]) / wmax if wmax > 1 else 1.0
    proj = []
    for machines in (1, 4, 16, 64):
        cores = machines * args.cores_per_machine
        hours = PROJECTED * t1 / (cores * efficiency) / 3600
        proj.append([machines, cores, f"{hours:.2f}"])
    table = markdown_table(
        [
            "run",
            "workers",
            "cluster start s",
            "imports s",
            "run s",
            "images/s",
            "s/image",
            "labels = local",
        ],
        rows,
    )
    ptable = markdown_table(["machines", "workers (1 per core)", f"hours for {PROJECTED:,}"], proj)
    print(table, "\n")
    print(
        f"scheduler overhead per image (1 worker - local): {overhead:+.3f} s"
        if overhead is not None
        else ""
    )
    print(
        f"no-op task round trip: {noop_latency * 1e3:.1f} ms one at a time, {noop_batch * 1e3:.2f} ms each in a batch of 200"
    )
    print(f"parallel efficiency at {wmax} workers: {efficiency:.2f}\n")
    print(ptable)
    if args.no_write:
        return
    command = "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
    body = f"""## Batch segmentation on a dask LocalCluster

Machine: {machine()}. Shared with other jobs while it ran (1-minute load average
{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores): the times
are noisy, and 2 workers on 2 busy cores cannot show a 2x speed-up.
Command: `{command.strip()}`

{n} images: {source}; bundled model, fp32 CPU, 1 torch thread per process, particle size
estimated per image. 'run s' is from the call to the last image written (the model sent to
the workers and built there included; the cluster's start-up and the workers' imports of
torch and the engine apart); the local run is timed after a one-image warm-up. 'labels =
local' compares every label image with the local run's, bit for bit.

{table}

Scheduler overhead per image (1 worker minus the local run, over {n} images):
{overhead:+.3f} s. A no-op task's round trip through the scheduler: {noop_latency * 1e3:.1f} ms one
at a time, {noop_batch * 1e3:.2f} ms each in a batch of 200: negligible beside the
{t1:.1f} s an image takes.

Projection (not a measurement) for {PROJECTED:,} such micrographs on N machines of
{args.cores_per_machine} cores, one 1-thread worker per core, each as fast as one worker here
({t1:.2f} s per image) with the parallel efficiency measured here at {wmax} workers
({efficiency:.2f}):

{ptable}
"""
    write_section("bench-distributed", body)
    print("wrote docs/benchmarks.md section bench-distributed")


if __name__ == "__main__":
    main()
