"""Throughput end to end, on the images users actually have (issue 18).

Usage::

    python benchmarks/bench_throughput.py [--quick] [--no-write]
    python benchmarks/bench_throughput.py --curve    # accuracy against compute, by scale
    python benchmarks/bench_throughput.py --seams    # tile overlap against seam error

The main run times the whole ``sagegan segment`` work (``api.segment`` with an output
folder: reading the files, the particle size, the network, post-processing, writing), auto
scale on, on three fixed sets: generated TEM frames of 6-px gold dots, generated SEM frames
of 60-px particles, and EMPS leave-source-out validation images (benchmarks/emps.py), for

* **before issue 18**: the code of :data:`BEFORE` (the commit before issue 18's work) with
  its defaults and the same bundled weights, run in a subprocess that loads the model once
  (:class:`BeforeWorker`): "today's pipeline" of the issue, to which every ratio is taken;
* **this code, 0.1 settings**: this version with the settings before issue 18 (512-px tiles,
  25 % overlap, 4 tiles per batch, particles always resampled to the network's 32 px:
  ``scale_band=(1, 1)``, float32): what the code changes alone give;
* **this version**: the defaults (tiles shaped to the image, rectangles of at most
  1024 x 1024 px in float32 or 1280 x 1280 px in bfloat16, an overlap of the network's context of 128 px,
  ``precision="auto"``: bfloat16 on a CPU that has it), and
  the same with ``--precision fp32`` and with ``--engine onnxruntime``;
* **MONAI peer**: the same network and post-processing, with MONAI's
  ``sliding_window_inference`` (512-px tiles, 25 % overlap, Gaussian blending) over the
  image resampled to the 0.1 pipeline's scale, as a MONAI user would build it;

and reports images/s, megapixels/s, the ratio to the code before issue 18 in the same run
(every pipeline run on each image in turn), F1@0.5
and the size bias against the true labels, and where the time of this version goes.

``--curve`` segments generated images (6-100 px particles, three modalities) and EMPS
validation images with the true size given, at network particle sizes of 10-64 px: F1,
Dice and size bias against the network pixels computed; the band of
``InferConfig.scale_band`` is chosen from it. ``--seams`` compares tiled maps with one
whole-image pass for overlaps of 16-128 px.

Writes the section ``bench-throughput`` (and ``bench-scale-band`` with ``--curve``,
``bench-seams`` with ``--seams``) of docs/benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, size_ratios  # noqa: E402
from napari_sagegan.engine.infer.scale import median_diameter  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

#: The code before issue 18 (its parent commit): "today's pipeline" of the issue.
BEFORE = "95ac981"
#: The row of :class:`BeforeWorker`, to which every ratio is taken.
BEFORE_NAME = f"before issue 18 ({BEFORE})"
#: The settings of the 0.1 pipeline (before issue 18).
OLD = {
    "tile_size": 512,
    "overlap": 0.25,
    "batch_size": 4,
    "scale_band": (1.0, 1.0),
    "precision": "fp32",
}
CURVE_SIZES = (10, 12, 16, 20, 24, 32, 40, 48, 64)


# --------------------------------------------------------------------------- data


def gen_set(kind: str, diameter: float, side: int, n: int, seed: int = 11):
    from napari_sagegan.engine.synthetic.render import make_sample

    return [
        (f"{kind}@{diameter:g}px#{i}", *make_sample(kind, shape=(side, side), seed=seed + i,
                                                     diameter=float(diameter)))
        for i in range(n)
    ]  # fmt: skip


def data_sets(quick: bool):
    n = 3 if quick else 8
    _, val = emps.load_lso()
    val = val[:: max(1, len(val) // (4 if quick else 12))][: 4 if quick else 12]
    return {
        "6-px gold dots, TEM, 384 px": gen_set("tem_dispersed", 6, 384, n),
        "60-px particles, SEM, 1024 px": gen_set("sem_agglomerate", 60, 1024, n),
        "EMPS leave-source-out": val,
    }


def scores(pairs):
    f1 = [evaluate_pair(p, g)["f1@0.5"] for p, g in pairs]
    ratios = np.concatenate([size_ratios(p, g) for p, g in pairs] or [np.zeros(0)])
    bias = float(np.median(ratios)) - 1.0 if ratios.size else float("nan")
    return float(np.mean(f1)), bias


# --------------------------------------------------------------------------- profile


class StageTimer:
    """Exclusive wall time per stage, from wrapped functions and generator functions."""

    def __init__(self):
        self.excl: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.undo: list = []

    def _enter(self, name):
        self.stack.append([name, time.perf_counter(), 0.0])

    def _exit(self):
        name, t0, child = self.stack.pop()
        el = time.perf_counter() - t0
        self.excl[name] += el - child
        if self.stack:
            self.stack[-1][2] += el

    def wrap(self, owner, attr, name, generator=False):
        fn = getattr(owner, attr)
        timer = self

        if generator:

            def wrapped(*a, **k):
                timer._enter(name)
                try:
                    return (yield from fn(*a, **k))
                finally:
                    timer._exit()
        else:

            def wrapped(*a, **k):
                timer._enter(name)
                try:
                    return fn(*a, **k)
                finally:
                    timer._exit()

        setattr(owner, attr, wrapped)
        self.undo.append((owner, attr, fn))

    def __enter__(self):
        import importlib

        # import_module: ``napari_sagegan.api.segment`` as an attribute is the function
        api_seg = importlib.import_module("napari_sagegan.api.segment")
        eng = importlib.import_module("napari_sagegan.engine.infer.segment")
        tiling = importlib.import_module("napari_sagegan.engine.infer.tiling")

        self.wrap(api_seg, "_read", "read the file")
        self.wrap(api_seg, "_write_segmented", "write the labels")
        self.wrap(eng, "estimate_diameter", "size: classical estimate")
        self.wrap(eng.Segmenter, "_search", "size: network ladder (its own tiles)", True)
        self.wrap(eng.Segmenter, "predict_maps", "network + tiling + resampling", True)
        self.wrap(tiling, "_resolve_range", "normalisation range")
        self.wrap(eng, "instances_from_maps", "post-processing (instances)")
        self.wrap(eng, "particle_confidence", "per-particle confidence")
        self.wrap(eng, "find_annotations", "burned-in annotations")
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self.undo):
            setattr(owner, attr, fn)
        self.undo = []  # entered again for the next image: the times add up


# --------------------------------------------------------------------------- pipelines


def run_api(seg, paths, infer, out):
    from napari_sagegan import api

    return run_to_end(api.segment(paths, model=seg, infer=infer, out=out, keep_labels=True))


def run_monai(seg, images):
    """The MONAI peer: whole image resampled to the 0.1 pipeline's scale, MONAI's sliding
    window over it, maps resampled back, our post-processing; size from our estimate."""
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from napari_sagegan.engine.data.intensity import apply_range, robust_range
    from napari_sagegan.engine.infer.postprocess import instances_from_maps
    from napari_sagegan.engine.nets.attention_unet import maps_from_logits

    cfg = seg.default_infer_config(**OLD)
    net = seg.model
    out = []
    for img in images:
        info = seg.estimate_scale(img, cfg)
        info = run_to_end(info)
        f = info.factor
        lo, hi = robust_range(img)
        x = torch.from_numpy(apply_range(img, lo, hi))[None, None]
        if abs(f - 1) > 1e-6:
            size = [max(16, int(round(s * f))) for s in img.shape]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        with torch.inference_mode():
            maps = sliding_window_inference(
                x, (512, 512), 4,
                lambda t: maps_from_logits(net(t.contiguous(memory_format=torch.channels_last))),
                overlap=0.25, mode="gaussian",
            )  # fmt: skip
            if abs(f - 1) > 1e-6:
                maps = F.interpolate(maps, size=img.shape, mode="bilinear", align_corners=False)
        m = maps[0].numpy()
        min_size = max(1, int(round(cfg.min_size / f**2)))
        out.append(
            instances_from_maps(m[0], m[1], threshold=cfg.threshold,
                                seed_threshold=cfg.seed_threshold, min_size=min_size)
        )  # fmt: skip
    return out


_WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from napari_sagegan import api
from napari_sagegan.engine.infer.segment import Segmenter
from napari_sagegan.util.progress import run_to_end
# the old code knows fewer InferConfig / TrainConfig keys than the bundled checkpoint
# holds (engine, precision, scale_band are newer: machine settings, or off): a copy with
# the ones it knows, and the tiling left to the old code's own defaults
import dataclasses
from napari_sagegan.engine.config import InferConfig, TrainConfig
ck = torch.load(sys.argv[2], weights_only=True)
machine = {"tile_size", "overlap", "batch_size", "device"}
for key, cls in (("infer", InferConfig), ("train", TrainConfig)):
    known = {f.name for f in dataclasses.fields(cls)} - (machine if key == "infer" else set())
    ck[key] = {k: v for k, v in ck[key].items() if k in known}
torch.save(ck, sys.argv[3])
seg = Segmenter.load(sys.argv[3], device="cpu")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    t = time.perf_counter()
    run_to_end(api.segment([job["path"]], model=seg, out=job["out"], keep_labels=False))
    print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
"""


class BeforeWorker:
    """``sagegan segment``'s work as the code of :data:`BEFORE` does it, with its defaults
    and the same bundled weights, in a subprocess that loads the model once; each call
    segments one file there and returns the seconds it took (timed inside, so that the
    pipes cost nothing)."""

    def __init__(self, tmp: Path) -> None:
        import subprocess

        root = Path(__file__).resolve().parents[1]
        src = Path(tmp) / "before"
        src.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", BEFORE, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        weights = root / "src" / "napari_sagegan" / "models" / "default.pt"
        env = dict(os.environ, PYTHONPATH=str(src / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(torch.get_num_threads()), str(weights),
             str(Path(tmp) / "before-weights.pt")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {BEFORE} worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def segment(self, path: Path, out: Path) -> float:
        self.proc.stdin.write(json.dumps({"path": str(path), "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def bench_main(quick: bool, band: bool = False):
    import tifffile

    seg = Segmenter.load("default", device="cpu")
    rows, profile_rows = [], []
    for set_name, items in data_sets(quick).items():
        mp = sum(img.size for _, img, _ in items) / 1e6
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for name, img, _ in items:
                p = Path(tmp) / f"{name.replace('@', '_').replace('#', '_')}.tif"
                tifffile.imwrite(p, img)
                paths.append(p)
            truth = [lab for _, _, lab in items]
            pipelines = [
                ("this code, 0.1 settings", OLD),
                ("this version", {}),
                ("this version, --precision fp32", {"precision": "fp32"}),
            ]
            if band:  # the accurate band of --curve, with the particle size estimated
                pipelines.append(
                    ("this version, scale_band (0.75, 1)", {"scale_band": (0.75, 1.0)})
                )
            if importlib.util.find_spec("onnxruntime") is not None:
                pipelines.append(("this version, --engine onnxruntime", {"engine": "onnxruntime"}))
            # image by image, every pipeline in turn (the first one rotating), so that a
            # busy spell of the shared machine slows all of them alike
            settings = dict(pipelines)
            names = [BEFORE_NAME, *settings, "MONAI peer"]
            seconds = dict.fromkeys(names, 0.0)
            labels: dict[str, list] = {k: [] for k in names}
            timer = StageTimer()
            before = BeforeWorker(Path(tmp))
            for _label, infer in pipelines:  # untimed: lazy imports, first shapes
                run_api(seg, paths[:1], infer, Path(tmp) / "warm-up")
            run_monai(seg, [tifffile.imread(paths[0])])
            before.segment(paths[0], Path(tmp) / "warm-up-before")
            for n, path in enumerate(paths):
                order = list(range(len(names)))
                order = order[n % len(order) :] + order[: n % len(order)]
                for k in order:
                    label = names[k]
                    t = time.perf_counter()
                    if label == BEFORE_NAME:
                        out = Path(tmp) / "out-before"
                        seconds[label] += before.segment(path, out)
                        labels[label].append(tifffile.imread(out / f"{path.stem}.tif"))
                        continue
                    if label == "MONAI peer":
                        labels[label] += run_monai(seg, [tifffile.imread(path)])
                    elif label == "this version":
                        with timer:
                            res = run_api(seg, [path], settings[label], Path(tmp) / f"out-{k}")
                        labels[label] += [r.labels for r in res]
                    else:
                        res = run_api(seg, [path], settings[label], Path(tmp) / f"out-{k}")
                        labels[label] += [r.labels for r in res]
                    seconds[label] += time.perf_counter() - t
            before.close()
            results = {k: (seconds[k], labels[k]) for k in names}
        base = results[BEFORE_NAME][0]
        for label, (sec, labs) in results.items():
            f1, bias = scores(list(zip(labs, truth)))
            rows.append([set_name, label, len(items) / sec, mp / sec, base / sec, f1,
                         f"{100 * bias:+.1f} %"])  # fmt: skip
        total = results["this version"][0]
        stages = dict(timer.excl)
        stages["other (api, report, progress)"] = total - sum(stages.values())
        for stage, sec in sorted(stages.items(), key=lambda kv: -kv[1]):
            profile_rows.append([set_name, stage, sec, 100 * sec / total])
        print(markdown_table(["set", "pipeline", "images/s", "MP/s", "x before", "F1@0.5",
                              "size bias"], rows[-len(results):]), flush=True)  # fmt: skip
    return rows, profile_rows


# --------------------------------------------------------------------------- precision


def bench_precision():
    """The whole pipeline (size found) in bfloat16 and in float32 on every leave-source-out
    image: mean F1@0.5 and size bias of each, and the images where they differ."""
    seg = Segmenter.load("default", device="cpu")
    _, val = emps.load_lso()
    runs = {}
    for precision in ("bf16", "fp32"):
        cfg = seg.default_infer_config(precision=precision)
        out = []
        for name, img, lab in val:
            res = run_to_end(seg.segment(img, cfg))
            f1 = evaluate_pair(res.labels, lab)["f1@0.5"]
            out.append((name, res.labels, lab, f1, res.scale.diameter if res.scale else None))
        runs[precision] = out
    rows = []
    for precision, out in runs.items():
        f1, bias = scores([(p, g) for _, p, g, _, _ in out])
        rows.append([f"all {len(out)}", precision, f1, f"{100 * bias:+.1f} %", "", ""])
    for a, b in zip(runs["bf16"], runs["fp32"]):
        da, db = a[4] or float("nan"), b[4] or float("nan")
        if abs(a[3] - b[3]) > 0.02 or not abs(np.log(da / db)) <= 0.1:
            true = median_diameter(a[2])
            rows.append([a[0], "bf16 / fp32", f"{a[3]:.3f} / {b[3]:.3f}", "",
                         f"{da:.1f} / {db:.1f}", f"{true:.1f}"])  # fmt: skip
    return rows


# --------------------------------------------------------------------------- curve, seams


def bench_curve(quick: bool):
    from napari_sagegan.engine.synthetic.render import make_sample

    seg = Segmenter.load("default", device="cpu")
    target = seg.target_diameter
    gen = []
    for kind in ("tem_dispersed", "sem_agglomerate", "haadf_square"):
        for d in (6, 10, 16, 25, 40, 64, 100)[:: 2 if quick else 1]:
            side = int(min(1024, max(256, 12 * d)))
            img, lab = make_sample(kind, shape=(side, side), seed=7, diameter=float(d))
            gen.append((f"{kind}@{d}", img, lab))
    _, val = emps.load_lso()
    real = val[:: max(1, len(val) // (6 if quick else 16))]
    rows = []
    for set_name, items in (("generated, 6-100 px", gen), ("EMPS leave-source-out", real)):
        for D in (16, 24, 32, 40) if quick else CURVE_SIZES:
            f1s, dices, ratios, npx = [], [], [], 0.0
            for _, img, lab in items:
                d = median_diameter(lab)
                cfg = seg.default_infer_config(diameter=d * target / D, scale_band=(1.0, 1.0))
                res = run_to_end(seg.segment(img, cfg))
                m = evaluate_pair(res.labels, lab)
                f1s.append(m["f1@0.5"])
                dices.append(m["dice"])
                ratios.append(size_ratios(res.labels, lab))
                npx += img.size * res.scale.factor**2
            r = np.concatenate(ratios)
            rows.append([set_name, D, D / target, np.mean(f1s), np.mean(dices),
                         f"{100 * (np.median(r) - 1):+.1f} %", npx / 1e6])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def bench_seams():
    from napari_sagegan.engine.infer.postprocess import instances_from_maps
    from napari_sagegan.engine.synthetic.render import make_sample

    seg = Segmenter.load("default", device="cpu")
    base = seg.default_infer_config()
    rows = []
    for kind, d in (("tem_dispersed", 32), ("sem_agglomerate", 30), ("haadf_square", 28)):
        img, _ = make_sample(kind, shape=(1024, 1024), seed=3, diameter=float(d))
        ref = run_to_end(seg.predict_maps(img, base.replace(tile_size=1024, overlap=0.0)))

        def labels(m):
            return instances_from_maps(m[0], m[1], threshold=base.threshold,
                                       seed_threshold=base.seed_threshold)  # fmt: skip

        ref_lab = labels(ref)
        for ov in (128, 64, 32, 16):
            m = run_to_end(seg.predict_maps(img, base.replace(tile_size=512, overlap=ov / 512)))
            diff = np.abs(m[0].astype(np.float32) - ref[0])
            rows.append([kind, ov, float(diff.max()), float(np.quantile(diff, 0.999)),
                         evaluate_pair(labels(m), ref_lab)["f1@0.5"]])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--seams", action="store_true")
    ap.add_argument(
        "--band",
        action="store_true",
        help="also run scale_band (0.75, 1) with the size estimated (section "
        "bench-throughput-band instead of bench-throughput)",
    )
    ap.add_argument(
        "--precision",
        action="store_true",
        help="the pipeline in bfloat16 and float32 on every leave-source-out image "
        "(section bench-precision)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cmd = "python benchmarks/bench_throughput.py" + " ".join(
        [
            "",
            *(["--quick"] if args.quick else []),
            *(["--band"] if args.band else []),
            *([f"--threads {args.threads}"] if args.threads else []),
        ]
    )
    if args.precision:
        rows = bench_precision()
        body = (
            "### bfloat16 against float32 on every leave-source-out image\n\n"
            f"Command: `{cmd} --precision` ({machine()}; "
            f"{(time.perf_counter() - t0) / 60:.1f} min). The whole pipeline, particle size "
            "found, with `precision='bf16'` (what auto runs on this CPU) and `'fp32'`: mean "
            "F1@0.5 and size bias over the images, then each image where F1@0.5 differs by "
            "more than 0.02 or the size found by more than 10 %.\n\n"
            + markdown_table(
                ["images", "precision", "F1@0.5", "size bias", "size found (px)", "true size (px)"],
                rows,
            )  # fmt: skip
        )
        print(body)
        if not args.no_write:
            write_section("bench-precision", body)
        return
    if args.curve or args.seams:
        parts = ["## Which particle sizes the network sees: the scale band and the tile overlap\n"]
        if args.curve:
            rows = bench_curve(args.quick)
            parts.append(
                f"Command: `{cmd} --curve` ({machine()}; "
                f"{(time.perf_counter() - t0) / 60:.1f} min). The true particle size is given and "
                "the image resampled so that the network sees particles of D px (the bundled "
                "model was trained at 32 px); network MP = pixels through the network, the cost.\n\n"
                + markdown_table(
                    ["set", "D (px)", "D / 32", "F1@0.5", "Dice", "size bias", "network MP"], rows
                )  # fmt: skip
            )
        if args.seams:
            rows = bench_seams()
            parts.append(
                f"Command: `{cmd} --seams`. 512-px tiles with an overlap of N px against one "
                "1024-px pass over the whole 1024 x 1024 image (no seams):\n\n"
                + markdown_table(
                    [
                        "image",
                        "overlap (px)",
                        "max |prob diff|",
                        "99.9th pct",
                        "F1 of labels vs one pass",
                    ],
                    rows,
                )  # fmt: skip
            )
        if not args.no_write:  # one section each, so that either can be re-run alone
            if args.curve:
                write_section("bench-scale-band", "\n\n".join(parts[:2]))
            if args.seams:
                write_section("bench-seams", "### Tile overlap against seams\n\n" + parts[-1])
        return
    rows, prof = bench_main(args.quick, args.band)
    title = "Throughput end to end" + (
        " with the particle-size band (0.75, 1), size estimated" if args.band else " (issue 18)"
    )
    body = (
        f"## {title}\n\n"
        f"Command: `{cmd}` ({machine()}; {(time.perf_counter() - t0) / 60:.1f} min). Whole "
        "`sagegan segment` work (api.segment with an output folder: read, particle size, "
        "network, post-processing, write), auto scale on; ratios are to the code before issue 18 "
        f"(commit {BEFORE}, its defaults, the same weights) in "
        "the same run, every pipeline run on each image in turn after an untimed warm-up (the "
        "machine is shared and noisy: compare ratios, not absolute times).\n\n"
        + markdown_table(
            ["set", "pipeline", "images/s", "MP/s", "x before", "F1@0.5", "size bias"], rows
        )  # fmt: skip
        + "\n\nWhere this version's time goes (exclusive wall time per stage):\n\n"
        + markdown_table(["set", "stage", "seconds", "% of total"], prof)
    )
    print(body)
    if not args.no_write:
        write_section("bench-throughput-band" if args.band else "bench-throughput", body)


if __name__ == "__main__":
    main()
