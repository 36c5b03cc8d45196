"""How long does the napari window freeze while the plugin works, and whose work is it?

Opens a real viewer (under Xvfb when there is no display) with the Segment, Correct-and-
retrain and Augment docks, and runs what a user does, one task after the other: segment an
image, segment five open images, re-segment, fine-tune under a time limit, train phase 2
under a time limit, generate four pairs, delete the generated layers. A 10 ms ``QTimer`` on
the main thread records how late each of its ticks fires: the lateness is how long the
window could not react (the target: under 100 ms). Everything is counted, the layers the
plugin adds included.

A sampler thread looks at the main thread's stack every 2 ms and, for every gap over 50 ms,
splits its time into the plugin's own code (the docks' handlers: ``napari_sagegan``
frames innermost), napari's (napari, vispy, Qt: adding and removing layers, drawing), and
waiting (the main thread was idle in the event loop but could not run: the worker held the
GIL in a C call, or no core was free). Full garbage collections (napari calls one per layer
it removes) are counted apart.

Run (a few minutes on 2 shared cores)::

    python benchmarks/bench_gui_stall.py [--size 1024] [--batch-size 384] [--seconds 20]

It prints a table and writes the ``bench-gui-stall`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

TICK_MS = 10
GAP_MS = 100  # the target
LOOK_MS = 50  # gaps looked into
SAMPLE_S = 0.002


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
    import torch

    torch.manual_seed(0)
    arch = preset("default")
    path = workdir / "untrained.pt"
    Checkpoint.from_model(AttentionUNet(arch).eval(), arch=arch, infer=InferConfig()).save(path)
    return ModelEntry("untrained default-size", str(path)), "untrained, default preset"


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


_OURS = f"{os.sep}napari_sagegan{os.sep}"
_BENCH = str(Path(__file__).resolve().parent)
_THEIRS = tuple(
    f"{os.sep}{name}{os.sep}"
    for name in ("napari", "vispy", "qtpy", "superqt", "PyQt6", "PyQt5", "app_model", "psygnal")
)


def _owner(frame) -> str:
    """``plugin``, ``napari`` or ``waiting``: whose Python frame is innermost."""
    while frame is not None:
        name = frame.f_code.co_filename
        if _OURS in name:
            return "plugin"
        if name.startswith(_BENCH):
            return "waiting"  # the benchmark's own event loop: the main thread was free
        if any(part in name for part in _THEIRS):
            return "napari"
        frame = frame.f_back
    return "waiting"


class MainSampler:
    """Samples the main thread's innermost owner every :data:`SAMPLE_S` seconds."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, str]] = []  # (time, weight s, owner)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._main = threading.main_thread().ident

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(SAMPLE_S)
            now = time.perf_counter()
            frame = sys._current_frames().get(self._main)
            self.samples.append((now, now - last, _owner(frame)))
            last = now

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def split(self, intervals: list[tuple[float, float]]) -> dict[str, float]:
        """Seconds per owner of the samples inside ``intervals``."""
        out = {"plugin": 0.0, "napari": 0.0, "waiting": 0.0}
        for t, w, who in self.samples:
            if any(a <= t <= b for a, b in intervals):
                out[who] += w
        return out


class StallMeter:
    """A 10 ms QTimer that records how late each tick fires (main-thread stalls)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[tuple[float, float]] = []  # (time, lateness s)
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.ticks.append((now, max(0.0, now - self.last - TICK_MS / 1000)))
        self.last = now

    def start(self) -> None:
        self.ticks.clear()
        self.last = None
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def gaps(self, over_ms: float) -> list[tuple[float, float]]:
        """The (start, end) of every lateness over ``over_ms``."""
        return [(t - lag - TICK_MS / 1000, t) for t, lag in self.ticks if lag * 1000 > over_ms]


def settle(app, seconds: float) -> None:
    """Let napari finish its own work (first paint, texture upload) first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.002)


def wait_until(app, done: Callable[[], bool], timeout: float) -> None:
    t0 = time.perf_counter()
    while not done():
        app.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the task did not finish in time")


def run(size: int, batch_size: int, seconds: float, model: str, threads: int | None) -> str:
    import faulthandler

    import napari
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    faulthandler.enable()
    # no notification pop-ups: their fade-in animation over the canvas crashed Mesa's
    # software OpenGL under Xvfb (the messages still reach napari's notification manager)
    NapariQtNotification.show_notification = classmethod(lambda cls, notification: None)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gui-"))

    from napari_sagegan.engine.synthetic.render import make_sample
    from napari_sagegan.napari._qt.augment import AugmentWidget
    from napari_sagegan.napari._qt.retrain import RetrainWidget
    from napari_sagegan.napari._qt.segment import SegmentWidget

    rows: list[list] = []
    notes: list[str] = []
    load = [os.getloadavg()[0]]
    try:
        entry, model_text = model_entry(model, workdir)
        viewer = napari.Viewer(show=True)
        app = QApplication.instance()
        seg, retrain, augment = SegmentWidget(viewer), RetrainWidget(viewer), AugmentWidget(viewer)
        for widget, name in ((seg, "Segment"), (retrain, "Correct and retrain"),
                             (augment, "Augment (SAGE-GAN)")):  # fmt: skip
            viewer.window.add_dock_widget(widget, name=name, tabify=True)
            widget.device_combo.setCurrentText("cpu")
            if threads:
                widget.threads = threads
        seg.store.select(entry)
        seg.apply_model_settings()
        used_threads = seg.threads
        meter, gcwatch, sampler = StallMeter(), GCWatch(), MainSampler()
        sampler.start()

        def measure(label: str, start: Callable[[], object], busy: Callable[[], bool]) -> None:
            n_gc = len(gcwatch.full)
            meter.start()
            t0 = time.perf_counter()
            if start() is None and busy is not None:
                raise RuntimeError(f"{label}: the task did not start")
            if busy is None:
                settle(app, 5.0)
            else:
                wait_until(app, lambda: not busy(), 1800)
            settle(app, 0.3)  # what the task left for the event loop
            meter.stop()
            gaps = meter.gaps(LOOK_MS)
            lags = np.asarray([lag for _, lag in meter.ticks] or [0.0]) * 1000
            split = sampler.split(gaps)
            looked = sum(split.values()) or 1.0
            gcs = gcwatch.full[n_gc:]
            gc_ms = max((1000 * (b - a) for a, b in gcs), default=0.0)
            rows.append([
                label, f"{time.perf_counter() - t0:.1f}", len(lags), float(lags.max()),
                int((lags > GAP_MS).sum()), float(np.percentile(lags, 99)),
                f"{100 * split['plugin'] / looked:.0f} / {100 * split['napari'] / looked:.0f}"
                f" / {100 * split['waiting'] / looked:.0f}" if gaps else "-",
                f"{len(gcs)} ({gc_ms:.0f} ms)" if gcs else "0",
            ])  # fmt: skip
            print(rows[-1], flush=True)

        def busy(widget) -> Callable[[], bool]:
            return lambda: widget.is_running or widget.pending

        image, truth = make_sample("tem_dispersed", shape=(size, size), seed=0)
        settle(app, 3.0)
        measure("none (idle viewer, 5 s)", lambda: None, None)

        def by_hand(work: Callable[[], None]) -> tuple[Callable[[], object], Callable[[], bool]]:
            """napari's own cost: ``work`` done by hand while the plugin is idle, started
            from the event loop (so the meter ticks); returns (start, busy)."""
            state = {"done": False}

            def run_work() -> None:
                work()
                state["done"] = True

            def start() -> object:
                QTimer.singleShot(50, run_work)
                return True

            return start, lambda: not state["done"]

        for i in range(5):
            viewer.add_image(make_sample("tem_dispersed", shape=(batch_size,) * 2, seed=i + 1)[0],
                             name=f"small {i}")  # fmt: skip
        settle(app, 2.0)
        seg.all_images.setChecked(True)
        measure(f"segment 5 open images {batch_size}x{batch_size}", seg.run, busy(seg))
        seg.all_images.setChecked(False)
        for layer in viewer.layers:
            layer.visible = False
        viewer.add_image(image, name="large")
        seg.image_combo.setCurrentText("large")
        settle(app, 2.0)
        measure(f"segment 1 image {size}x{size}", seg.run, busy(seg))

        labels = viewer.layers["small 0 labels"]
        labels.data = np.where(labels.data == labels.data.max(), 0, labels.data).astype(
            labels.data.dtype
        )  # a correction: the pair is ticked for fine-tuning and re-segmenting
        settle(app, 1.0)
        retrain.refresh_pairs()
        assert retrain.checked_labels() == ["small 0 labels"], retrain.checked_labels()
        measure("re-segment 1 image", retrain.resegment, busy(retrain))

        retrain.epochs_spin.setValue(1000)
        retrain.steps_spin.setValue(20)
        retrain.patch_spin.setValue(128)
        retrain.minutes_spin.setValue(seconds / 60)
        measure(f"fine-tune, {seconds:g} s limit", retrain.start_training, busy(retrain))
        notes.append(f"fine-tune: {retrain.progress.status.text()}")

        for i in range(3):
            img, lab = make_sample("tem_dispersed", shape=(256, 256), seed=10 + i)
            viewer.add_image(img, name=f"pair {i}")
            viewer.add_labels(lab.astype(np.uint16), name=f"pair {i} labels")
        settle(app, 1.0)
        augment.refresh_pairs()
        for name in augment.pairs.names():  # the three pairs only
            augment.set_checked(name, name.startswith("pair "))
        augment.model_combo.setCurrentText(entry.name)
        augment.patch_spin.setValue(64)
        augment.minutes_spin.setValue(seconds / 60)
        augment.gan_extra = {"freeze_epochs": 0, "gen_base_channels": 8}
        measure(f"phase 2, {seconds:g} s limit", augment.start_training, busy(augment))
        notes.append(f"phase 2: {augment.progress.status.text()}")
        augment.n_spin.setValue(4)
        measure("generate 4 pairs", augment.start_generate, busy(augment))
        shape = viewer.layers["SAGE-GAN synth 01"].data.shape
        # napari alone; removals last, the top layer first (the other order can crash
        # Mesa's software OpenGL under Xvfb)
        measure(
            f"napari alone: add an image {size}x{size}",
            *by_hand(lambda: viewer.add_image(image, name="alone", contrast_limits=(0, 255))),
        )
        measure(
            f"napari alone: add a Labels layer {size}x{size}",
            *by_hand(lambda: viewer.add_labels(truth.astype(np.uint16), name="alone labels")),
        )
        measure(
            "napari alone: remove these 2 layers",
            *by_hand(lambda: [viewer.layers.remove(n) for n in ("alone labels", "alone")]),
        )
        n_layers = sum(1 for ly in viewer.layers if ly.name.startswith("SAGE-GAN"))
        measure(f"delete the {n_layers} generated layers", augment.delete_generated,
                lambda: augment.pending)  # fmt: skip
        notes.append(f"generated pairs: {shape[0]} x {shape[1]} px")
        sampler.stop()
        load.append(os.getloadavg()[0])
        viewer.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table = markdown_table(
        [
            "what the user did",
            "seconds",
            "timer ticks",
            "longest gap (ms)",
            f"gaps > {GAP_MS} ms",
            "p99 (ms)",
            f"gaps > {LOOK_MS} ms: plugin / napari / waiting (%)",
            "full GCs (longest)",
        ],
        rows,
    )
    threads_text = f"{used_threads} torch thread(s) in the worker"
    return f"""## GUI responsiveness while a worker runs

`python benchmarks/bench_gui_stall.py --size {size} --batch-size {batch_size} --seconds {seconds:g}`
on {machine()}; {threads_text}; model: {model_text}. The CPU was shared with other work
while this ran (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end), as a
user's often is.

A napari viewer (Xvfb, software OpenGL) with the Segment, Correct-and-retrain and Augment
docks; a 10 ms `QTimer` on the main thread records how late each tick fires while the
plugin works: the lateness is how long the window could not react. Everything is in, the
layers the plugin adds and removes included. A sampler thread splits the time of every gap
over {LOOK_MS} ms into the plugin's own main-thread code, napari's (adding, removing and
drawing layers), and waiting (the main thread was free but could not run: the worker held
the GIL in a C call, or no core was free).

{table}

{chr(10).join(f"- {n}" for n in notes)}

What the plugin does to keep the window free (issue 16, item 4):

- all compute runs in the worker: segmentation, training, measuring, the particle tables,
  the labels' fingerprints (`labels_digest`), the generated images' contrast limits (from
  their grey levels) and the labels' display dtype: uint16, which napari uploads to the
  texture as it is, where it re-maps (u)int32 labels on the main thread every time it draws
  them (napari's `_cast_labels_data_to_texture_dtype_auto`);
- finished results and generated pairs reach the viewer one layer per turn of the event
  loop (`DockBase.later`), so the window repaints and answers between two layers: a batch
  of N images is N short gaps, not one long one;
- deleting the generated layers goes the same way, inside one napari batch of the layer
  list (`begin_batch` / `end_batch`): napari cleans its scene graph, with a full garbage
  collection, once at the end instead of once per layer;
- the pair lists hash a Labels layer (to know whether it was corrected) only after that
  layer changed, and refresh 300 ms after the last change, not on every layer added;
- the training plots redraw at most four times a second, not after every step, and the
  phase-2 preview layer changes at most once a second;
- the widgets give torch all cores but one, leaving a core to the event loop; the engine's
  lazy imports happen when a dock opens; full garbage collections are postponed while a
  worker runs (one may then come right after the task: column "full GCs").

What is left is napari's own (column "napari", and the rows "napari alone", which add and
remove layers by hand, without the plugin): napari's main-thread cost of adding a layer
(its controls, its visual, the texture upload) and of removing one (disconnecting it, and a
full garbage collection of the whole process for every layer removed outside a batch; and,
here, drawing the canvas with software OpenGL, far slower than on a graphics card); and
waiting on the worker (column "waiting"): C calls that hold the GIL (SciPy's `zoom` when
cutting training patches, scikit-image's CLAHE, building a network's layers) and, on this
2-core machine shared with other work, no free core for the main thread.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="side of the single image, px")
    parser.add_argument("--batch-size", type=int, default=384, help="side of the 5 images, px")
    parser.add_argument("--seconds", type=float, default=20.0, help="training time limits")
    parser.add_argument("--model", default="default", help="default or a MODEL.pt")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the docks')"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    args = parser.parse_args()
    xvfb = ensure_display()
    try:
        body = run(args.size, args.batch_size, args.seconds, args.model, args.threads)
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=10)
    print(body)
    if not args.no_write:
        write_section("bench-gui-stall", body)


if __name__ == "__main__":
    main()
