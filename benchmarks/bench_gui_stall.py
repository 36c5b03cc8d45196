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
from collections.abc import Callable
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
                ["Xvfb", f":{n}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp", "-terminate"],
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
    from napari_sagegan.engine.checkpoint import Checkpoint, default_model_path
    from napari_sagegan.engine.config import InferConfig, preset
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet
    from napari_sagegan.napari.state import ModelEntry

    if choice != "default":
        return ModelEntry(Path(choice).name, choice), Path(choice).name
    if default_model_path().is_file():
        return ModelEntry("bundled default", "default"), "bundled default"
    # same size and speed as the default model; its untrained output is noise, which is
    # the hardest case for the post-processing (many small fragments)
    import torch

    torch.manual_seed(0)
    arch = preset("default")
    path = workdir / "untrained.pt"
    Checkpoint.from_model(AttentionUNet(arch).eval(), arch=arch, infer=InferConfig()).save(path)
    return ModelEntry("untrained default-size", str(path)), "untrained, default preset"


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


class GCWatch:
    """Records Python's full (generation 2) garbage collections: (start, end) times."""

    def __init__(self) -> None:
        import gc

        self.full: list[tuple[float, float]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.full.append((self._t0, time.perf_counter()))


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

    from napari_sagegan.engine.synthetic.render import make_sample
    from napari_sagegan.napari._qt import segment as segment_mod
    from napari_sagegan.napari._qt.retrain import RetrainWidget
    from napari_sagegan.napari._qt.segment import SegmentWidget

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
        seg.apply_model_settings()  # as choosing it in the widget does: loads the file
        seg.device_combo.setCurrentText("cpu")
        retrain.device_combo.setCurrentText("cpu")
        meter = StallMeter()
        meter.trace = trace
        gcwatch = GCWatch()

        original = segment_mod.add_result_layers
        intervals: list[tuple[float, float]] = []

        def timed_add(viewer_, result):
            t0 = time.perf_counter()
            try:
                return original(viewer_, result)
            finally:
                intervals.append((t0, time.perf_counter()))

        def measure(label, threads, start: Callable) -> None:
            """Run one phase under the stall meter and add its row."""
            intervals.clear()
            n_gc = len(gcwatch.full)
            meter.start()
            t0 = time.perf_counter()
            worker = start()
            seconds = wait_for(app, worker, 900) if worker is not None else 5.0
            if worker is None:
                settle(app, seconds)
            meter.stop()
            gcs = gcwatch.full[n_gc:]
            adds.extend(b - a for a, b in intervals)
            every = meter.stats(exclude=list(intervals))
            no_gc = meter.stats(exclude=list(intervals) + gcs)
            longest_gc = max((1000 * (b - a) for a, b in gcs), default=0.0)
            rows.append(
                [
                    label,
                    threads,
                    f"{time.perf_counter() - t0:.1f}",
                    every["ticks"],
                    every["max"],
                    no_gc["max"],
                    every["p99"],
                    f"{len(gcs)} ({longest_gc:.0f} ms)" if gcs else "0",
                ]
            )
            print(rows[-1], flush=True)

        segment_mod.add_result_layers = timed_add
        viewer.add_image(image, name="large")
        settle(app, 3.0)
        viewer.layers["large"].visible = False
        measure("none (idle viewer, 5 s)", "-", lambda: None)
        for threads in threads_list:
            seg.threads = retrain.threads = threads
            # a fresh image layer per run; the older layers are hidden, not removed (removing
            # a Labels layer and adding another can crash Mesa's software OpenGL under Xvfb,
            # with or without this plugin)
            for layer in viewer.layers:
                layer.visible = False
            name = f"large t{threads}"
            viewer.add_image(image, name=name)
            seg.image_combo.setCurrentText(name)
            settle(app, 3.0)
            measure(f"segment {size}x{size}", threads, seg.run)
            # fine-tune on the corrected result (the exact labels stand for the corrections)
            labels = viewer.layers[f"{name} labels"]
            labels.data = truth.astype(labels.data.dtype)
            settle(app, 2.0)
            retrain.refresh_pairs()
            for other in retrain.checked_labels():
                retrain.set_checked(other, False)
            retrain.set_checked(f"{name} labels")
            retrain.epochs_spin.setValue(1)
            retrain.steps_spin.setValue(steps)
            retrain.patch_spin.setValue(256)
            measure(f"fine-tune {steps} steps", threads, retrain.start_training)
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
            "longest outside full GCs (ms)",
            "p99 (ms)",
            "full GCs (longest)",
        ],
        rows,
    )
    add_ms = 1000 * max(adds) if adds else float("nan")
    return f"""## GUI responsiveness while a worker runs

`python benchmarks/bench_gui_stall.py --size {size}` on {machine()}.

A napari viewer (Xvfb) with the Segment and Correct-and-retrain widgets docked; a 10 ms
`QTimer` on the main thread records how late each of its ticks fires (after napari's own
start-up rendering has settled) while the plugin's worker segments a {size} x {size}
synthetic TEM image (model: {model_text}) and then fine-tunes for {steps} steps (batch 4,
256 px patches) on the result. The longest lateness is the longest time the window could
not react to the user; the target is under 100 ms.

{table}

What keeps the event loop free:

- all compute runs in a worker thread; PyTorch releases the GIL inside its kernels;
- the widgets give torch all cores but one (`SegmentWidget.threads`,
  `RetrainWidget.threads`; one thread on this 2-core machine), leaving a core to the event
  loop. With 2 threads the segmentation is faster but the GUI stalls longer, and the
  fine-tuning was slower here;
- the engine's lazily imported modules (scikit-image submodules, torch's optimiser stack,
  about 2 s) are imported when a widget opens, not by the worker: an import in the worker
  stalled the GUI for up to 250 ms;
- Python's full garbage collection, a pass over every object of the process (napari's
  included) that took 350-450 ms here and stops all threads, is postponed while a worker
  runs (column "full GCs": none happened during the runs); young-generation collections
  still run.

Adding the finished {size} x {size} Labels layer with its particle table is main-thread work
by necessity (napari layers are not thread-safe): napari took {add_ms:.0f} ms for it, once per
image at the end of the run; it is left out of the segmentation rows above.
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
