"""How long does the napari event loop stall while the plugin's worker segments and trains?

Opens a real viewer (under Xvfb when there is no display), docks the Segment and Correct-and-
retrain widgets, segments a large synthetic micrograph and fine-tunes on its (edited) labels,
while a 10 ms ``QTimer`` on the main thread records how late each of its ticks fires. The
longest lateness is the longest time the GUI could not react. Adding the finished result
layer is main-thread work by necessity (napari layers are not thread-safe); it is timed and
reported on its own line.

Run (about 2 minutes on 2 cores)::

    python benchmarks/bench_gui_stall.py [--size 2048] [--model default|MODEL.pt]

It prints a table and writes the ``bench-gui-stall`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

TICK_MS = 10


def ensure_display() -> subprocess.Popen | None:
    """Start Xvfb on a free display when none is set; returns the process to stop."""
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        sys.exit("no DISPLAY and no Xvfb: apt-get install xvfb (see docs/environment)")
    for n in range(99, 120):
        if not Path(f"/tmp/.X11-unix/X{n}").exists():
            proc = subprocess.Popen(
                ["Xvfb", f":{n}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            os.environ["DISPLAY"] = f":{n}"
            for _ in range(100):
                if Path(f"/tmp/.X11-unix/X{n}").exists():
                    return proc
                time.sleep(0.05)
            return proc
    sys.exit("no free X display number")


def model_entry(choice: str, workdir: Path):
    """The model to run: a file, the bundled default, or an untrained default-size net."""
    from napari_sagegan import _tasks
    from napari_sagegan.engine.checkpoint import default_model_path, save_checkpoint
    from napari_sagegan.engine.config import InferConfig, preset
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    if choice != "default":
        return _tasks.ModelEntry(Path(choice).name, choice), Path(choice).name
    if default_model_path().is_file():
        return _tasks.ModelEntry("bundled default", "default"), "bundled default"
    # same size and speed as the default model; its untrained output is noise, which is
    # the hardest case for the post-processing (many small fragments)
    import torch

    torch.manual_seed(0)
    arch = preset("default")
    path = workdir / "untrained.pt"
    save_checkpoint(path, AttentionUNet(arch).eval(), arch=arch, infer=InferConfig().to_dict())
    return _tasks.ModelEntry("untrained default-size", str(path)), "untrained, default preset"


def _worker_stack() -> str:
    """Where the plugin's worker thread is now (the code that just held the GIL)."""
    import threading
    import traceback

    main = threading.main_thread().ident
    for ident, frame in sys._current_frames().items():
        if ident == main:
            continue
        stack = traceback.extract_stack(frame)
        if any("napari_sagegan" in f.filename for f in stack):
            return " <- ".join(
                f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[::-1][:5]
            )
    return "(main thread)"


class StallMeter:
    """A 10 ms QTimer that records how late each tick fires (main-thread stalls)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[tuple[float, float]] = []  # (time, lateness s)
        self.trace = False
        self.traces: list[tuple[float, str]] = []  # (lateness, where the worker was)
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            lag = max(0.0, now - self.last - TICK_MS / 1000)
            self.ticks.append((now, lag))
            if self.trace and lag > 0.03:
                self.traces.append((lag, _worker_stack()))
        self.last = now

    def start(self) -> None:
        self.ticks.clear()
        self.last = None
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def stats(self, exclude: list[tuple[float, float]] = ()) -> dict:
        """Longest and 99th-percentile lateness (ms), leaving out ticks whose gap overlaps
        one of the ``exclude`` intervals (layer additions)."""
        late = []
        for t, lag in self.ticks:
            start = t - lag - TICK_MS / 1000
            if any(start < b and t > a for a, b in exclude):
                continue
            late.append(lag)
        arr = np.asarray(late or [0.0]) * 1000
        return {"ticks": len(late), "max": float(arr.max()), "p99": float(np.percentile(arr, 99))}


def settle(app, seconds: float) -> None:
    """Let napari finish its own start-up work (first paint, texture upload) first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.002)


def wait_for(app, worker, timeout: float) -> float:
    done = {"v": False}
    worker.finished.connect(lambda: done.update(v=True))
    t0 = time.perf_counter()
    while not done["v"]:
        app.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t0 > timeout:
            worker.quit()
            raise TimeoutError("the worker did not finish in time")
    return time.perf_counter() - t0


def run(size: int, model: str, threads_list: list[int], steps: int, trace: bool = False) -> str:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sagegan._widgets import segment as segment_mod
    from napari_sagegan._widgets.retrain import RetrainWidget
    from napari_sagegan._widgets.segment import SegmentWidget
    from napari_sagegan.engine.synthetic import make_sample

    image, truth = make_sample("tem_dispersed", shape=(size, size), seed=0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gui-"))
    rows, adds = [], []
    try:
        entry, model_text = model_entry(model, workdir)
        viewer = napari.Viewer(show=True)
        app = QApplication.instance()
        seg = SegmentWidget(viewer)
        retrain = RetrainWidget(viewer)
        viewer.window.add_dock_widget(seg, name="Segment")
        viewer.window.add_dock_widget(retrain, name="Correct and retrain")
        seg.store.select(entry)
        seg.device_combo.setCurrentText("cpu")
        retrain.device_combo.setCurrentText("cpu")
        meter = StallMeter()
        meter.trace = trace

        original = segment_mod.add_result_layers
        intervals: list[tuple[float, float]] = []

        def timed_add(viewer_, result):
            t0 = time.perf_counter()
            try:
                return original(viewer_, result)
            finally:
                intervals.append((t0, time.perf_counter()))

        segment_mod.add_result_layers = timed_add
        viewer.add_image(image, name="large")
        settle(app, 3.0)
        meter.start()
        settle(app, 5.0)
        meter.stop()
        s = meter.stats()
        rows.append(["none (idle viewer, 5 s)", "-", "5.0", s["ticks"], s["max"], s["p99"]])
        print(rows[-1], flush=True)
        for threads in threads_list:
            seg.threads = retrain.threads = threads
            for layer in [ly for ly in viewer.layers]:
                viewer.layers.remove(layer)
            viewer.add_image(image, name="large")
            settle(app, 3.0)
            # --- segmentation
            intervals.clear()
            meter.start()
            worker = seg.run()
            seconds = wait_for(app, worker, 900)
            meter.stop()
            s = meter.stats(exclude=list(intervals))
            n = len(viewer.layers["large labels"].features)
            rows.append(
                [
                    f"segment {size}x{size}",
                    threads,
                    f"{seconds:.1f}",
                    s["ticks"],
                    s["max"],
                    s["p99"],
                ]
            )
            adds.extend(b - a for a, b in intervals)
            print(rows[-1], f"{n} particles", flush=True)
            # --- fine-tuning on the corrected result (the exact labels stand for the user's
            # corrections)
            labels = viewer.layers["large labels"]
            labels.data = truth.astype(labels.data.dtype)
            settle(app, 2.0)
            retrain.refresh_pairs()
            retrain.set_checked("large labels")
            retrain.epochs_spin.setValue(1)
            retrain.steps_spin.setValue(steps)
            retrain.patch_spin.setValue(256)
            meter.start()
            worker = retrain.start_training()
            seconds = wait_for(app, worker, 900)
            meter.stop()
            s = meter.stats()
            rows.append(
                [
                    f"fine-tune {steps} steps",
                    threads,
                    f"{seconds:.1f}",
                    s["ticks"],
                    s["max"],
                    s["p99"],
                ]
            )
            print(rows[-1], flush=True)
        segment_mod.add_result_layers = original
        for lag, where in sorted(meter.traces, reverse=True)[:15]:
            print(f"stall {1000 * lag:.0f} ms: {where}")
        viewer.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table = markdown_table(
        [
            "worker task",
            "torch threads",
            "seconds",
            "timer ticks",
            "longest stall (ms)",
            "p99 (ms)",
        ],
        rows,
    )
    add_ms = 1000 * max(adds) if adds else float("nan")
    return f"""## GUI responsiveness while a worker runs

`python benchmarks/bench_gui_stall.py --size {size}` on {machine()}.

A napari viewer (Xvfb) with the Segment and Correct-and-retrain widgets docked; a 10 ms
`QTimer` on the main thread records how late each tick fires (after napari's own start-up
rendering has settled) while the worker segments a
{size} x {size} synthetic TEM image (model: {model_text}) and then fine-tunes for {steps}
steps (batch 4, 256 px patches) on the result. The longest lateness is the longest time the
GUI could not react to the user.

{table}

Adding the finished {size} x {size} Labels layer (and its particle table) to the viewer
is main-thread work by necessity (napari layers are not thread-safe): it took
{add_ms:.0f} ms once per image, and is left out of the segmentation rows above.

The widgets run torch with **one thread** while the viewer is open (`SegmentWidget.threads`,
`RetrainWidget.threads`): on a 2-core machine the second core stays free for the event loop.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="image side, pixels")
    parser.add_argument("--model", default="default", help="default or a MODEL.pt")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="fine-tuning steps")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument("--trace", action="store_true", help="print where stalls happen")
    args = parser.parse_args()
    xvfb = ensure_display()
    try:
        body = run(args.size, args.model, args.threads, args.steps, args.trace)
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=10)
    print(body)
    if not args.no_write:
        write_section("bench-gui-stall", body)


if __name__ == "__main__":
    main()
