"""Screenshots of the real napari window with the plugin's widgets, for the docs.

Opens napari (under a private Xvfb display when there is none), loads the "TEM dispersed
particles" sample, docks the Segment, Measure, Export and Correct-and-retrain widgets,
segments the image, measures the particles, fine-tunes briefly on the corrected labels, and
saves the whole window::

    python scripts/screenshots.py [--model default|MODEL.pt] [--out docs/images]
                                  [--only segment,measure,export,retrain]

Writes segment.png, measure.png, export.png and retrain.png (``--only``: just those named;
the segmentation always runs). Uses the bundled default model when it is installed (pass
``--model`` otherwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW = (1500, 960)
SHOTS = ("segment", "measure", "export", "retrain")
#: nm per pixel typed into the Measure widget (the sample carries no calibration); the demo
#: (scripts/demo.py) calibrates its "tem_dispersed" image the same way.
MEASURE_PIXEL_SIZE_NM = 0.75


def ensure_display() -> subprocess.Popen | None:
    """Start Xvfb on a free display when none is set; returns the process to stop."""
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        sys.exit("no DISPLAY and no Xvfb: install the Debian package xvfb")
    for n in range(99, 130):
        if not Path(f"/tmp/.X11-unix/X{n}").exists():
            proc = subprocess.Popen(
                ["Xvfb", f":{n}", "-screen", "0", "1920x1200x24", "-nolisten", "tcp", "-terminate"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            os.environ["DISPLAY"] = f":{n}"
            for _ in range(100):
                if Path(f"/tmp/.X11-unix/X{n}").exists():
                    break
                time.sleep(0.05)
            return proc
    sys.exit("no free X display number")


def wait(app, worker, timeout: float = 600.0) -> None:
    done = {"v": worker is None}
    if worker is not None:
        worker.finished.connect(lambda: done.update(v=True))
    t0 = time.perf_counter()
    while not done["v"]:
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the worker did not finish in time")


def settle(app, seconds: float = 0.5) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default or a MODEL.pt file")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: as the widgets)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SHOTS),
        help=f"comma-separated screenshots to write (default: all of {', '.join(SHOTS)})",
    )
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only or not only <= set(SHOTS):
        parser.error(f"--only takes some of {', '.join(SHOTS)}, got {args.only!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xvfb = ensure_display()
    try:
        shoot(args.model, out, args.threads, only)
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=10)


def shoot(model: str, out: Path, threads: int | None, only: set[str] | None = None) -> None:
    import napari
    import numpy as np
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    only = set(SHOTS) if only is None else only
    viewer = napari.Viewer(show=True, title="napari-sagegan")
    app = QApplication.instance()
    win = viewer.window._qt_window
    win.resize(*WINDOW)
    viewer.open_sample("napari-sagegan", "tem_dispersed")
    name = viewer.layers[0].name
    seg_dock, seg = viewer.window.add_plugin_dock_widget("napari-sagegan", "Segment")
    if threads:
        seg.threads = threads
    if model != "default" and not seg.load_model(model):
        sys.exit(f"cannot load {model}")
    seg.store.current.check_available()

    # 1. segmentation
    seg.attention_check.setChecked(False)
    wait(app, seg.run())
    labels = viewer.layers[f"{name} labels"]
    viewer.layers.selection.active = labels
    settle(app, 1.0)
    if "segment" in only:
        viewer.screenshot(str(out / "segment.png"), canvas_only=False)
    print(f"{labels.name}: {len(labels.features)} particles")
    written = ["segment.png"] if "segment" in only else []

    # 2. measure: the pixel size typed in (the sample has none), plots, particles coloured
    seg_dock.hide()
    if "measure" in only:
        me_dock, meas = viewer.window.add_plugin_dock_widget("napari-sagegan", "Measure particles")
        segment_features = labels.features.copy()  # Measure replaces them; restored below
        meas.labels_combo.setCurrentText(labels.name)
        meas.image_combo.setCurrentText(name)
        meas.pixel_size.setValue(MEASURE_PIXEL_SIZE_NM)
        result = meas.run(blocking=True)
        meas.tabs.setCurrentIndex(1)  # the plots
        meas.colour_combo.setCurrentText(f"equivalent_diameter_{result.unit}")
        meas.colour_by(meas.colour_combo.currentText())
        viewer.layers.selection.active = labels
        settle(app, 0.5)
        win.resizeDocks([me_dock], [560], Qt.Orientation.Horizontal)
        settle(app, 1.5)
        viewer.screenshot(str(out / "measure.png"), canvas_only=False)
        written.append("measure.png")
        s = result.summary
        print(
            f"measure: {s['n_particles']} particles, D50 "
            f"{s[f'equivalent_diameter_{result.unit}_d50']:.3g} {result.unit}"
        )
        meas.reset_colours()
        labels.features = segment_features
        me_dock.hide()
    if not only & {"export", "retrain"}:
        print(f"wrote {', '.join(f'{out}/{w}' for w in written)}")
        viewer.close()
        return

    # 3. export, with napari's feature table showing the particle measurements
    ex_dock, export = viewer.window.add_plugin_dock_widget("napari-sagegan", "Export labels")
    export.folder_edit.setText(str(Path.home() / "sagegan-export"))
    viewer.layers.selection.active = labels
    table_dock, _ = viewer.window.add_plugin_dock_widget("napari", "Features table widget")
    settle(app, 0.5)
    win.resizeDocks([ex_dock, table_dock], [220, 700], Qt.Orientation.Vertical)
    settle(app, 1.0)
    if "export" in only:
        viewer.screenshot(str(out / "export.png"), canvas_only=False)
        written.append("export.png")
    if "retrain" not in only:
        print(f"wrote {', '.join(f'{out}/{w}' for w in written)}")
        viewer.close()
        return

    # 4. correct (here: the exact ground truth stands for the user's corrections), retrain
    ex_dock.hide()
    table_dock.hide()
    re_dock, retrain = viewer.window.add_plugin_dock_widget("napari-sagegan", "Correct and retrain")
    if threads:
        retrain.threads = threads
    truth = viewer.layers[f"{name} ground truth"].data
    labels.data = truth.astype(labels.data.dtype)
    retrain.refresh_pairs()
    retrain.epochs_spin.setValue(5)
    retrain.steps_spin.setValue(4)
    retrain.patch_spin.setValue(128)
    wait(app, retrain.start_training())
    wait(app, retrain.resegment())
    # the canvas shows the corrected layer that was trained on; the re-segmentation is the
    # "[1]" layer in the list
    viewer.layers[f"{name} labels [1]"].visible = False
    viewer.layers.selection.active = labels
    settle(app, 1.0)
    viewer.screenshot(str(out / "retrain.png"), canvas_only=False)
    written.append("retrain.png")
    n = int(np.unique(labels.data).size - 1)
    print(f"wrote {', '.join(f'{out}/{w}' for w in written)} ({n} particles corrected)")
    viewer.close()


if __name__ == "__main__":
    main()
