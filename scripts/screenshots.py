"""Screenshots of the real napari window with the plugin's widgets, for the docs.

Opens napari (under a private Xvfb display when there is none), loads the "TEM dispersed
particles" sample, docks the widgets one after the other and saves the whole window:
segments the image; proofreads it (a particle deleted and added back from the network's
maps with one click, the view on the least sure particle); measures the particles; shows
Export with napari's features table; fine-tunes briefly on the corrected labels; and runs
phase 2 of SAGE-GAN for a few seconds, then generates two pairs::

    python scripts/screenshots.py [--model default|MODEL.pt] [--out docs/images]
                                  [--only segment,proofread,measure,export,retrain,augment]

Writes segment.png, proofread.png, measure.png, export.png, retrain.png and augment.png
(``--only``: just those named; the segmentation always runs). Uses the bundled default
model when it is installed (pass ``--model`` otherwise). About 3 minutes on 2 CPU cores.
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
SHOTS = ("segment", "proofread", "measure", "export", "retrain", "augment")
#: Phase-2 budget of the "augment" shot (minutes): a few steps, enough for the curves.
AUGMENT_MINUTES = 0.4
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


def until(app, condition, timeout: float = 60.0) -> None:
    """Run the event loop until ``condition()`` (docks add their layers over several turns)."""
    t0 = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.01)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the layers did not appear in time")


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
    ctx = {"viewer": viewer, "app": app, "win": win, "name": name, "out": out,
           "threads": threads, "written": []}  # fmt: skip

    # 1. segmentation (always: every other shot starts from it)
    seg.attention_check.setChecked(False)
    wait(app, seg.run())
    until(app, lambda: not seg.is_running and f"{name} labels" in viewer.layers)
    labels = viewer.layers[f"{name} labels"]
    ctx["labels"] = labels
    viewer.layers.selection.active = labels
    settle(app, 1.0)
    if "segment" in only:
        save(ctx, "segment")
    print(f"{labels.name}: {len(labels.features)} particles")
    seg_dock.hide()
    for shot in ("proofread", "measure", "export", "retrain", "augment"):
        if shot in only:
            globals()[f"shoot_{shot}"](ctx)
    print(f"wrote {', '.join(f'{out}/{w}' for w in ctx['written'])}")
    viewer.close()


def save(ctx: dict, shot: str) -> None:
    ctx["viewer"].screenshot(str(ctx["out"] / f"{shot}.png"), canvas_only=False)
    ctx["written"].append(f"{shot}.png")


def shoot_proofread(ctx: dict) -> None:
    """The Proofread dock, the view on the least sure particle (selected), after a missed
    particle was added from the network's maps."""
    from qtpy.QtCore import Qt

    viewer, app, labels = ctx["viewer"], ctx["app"], ctx["labels"]
    dock, proof = viewer.window.add_plugin_dock_widget("napari-sagegan", "Proofread particles")
    if ctx["threads"]:
        proof.threads = ctx["threads"]
    viewer.layers.selection.active = labels
    # a missed particle: delete the second least sure one and add it back with one click
    order = sorted(
        (c, int(i)) for i, c in zip(labels.features["label"], labels.features["confidence"])
    )
    _, missed = order[1]
    row = labels.features[labels.features["label"] == missed].iloc[0]
    centre = (float(row["centroid_y_px"]), float(row["centroid_x_px"]))
    proof.delete_at(centre)
    proof.set_mode("add")
    added = proof.add_at(centre, blocking=True)
    first = proof.next_low_confidence()
    viewer.layers.selection.active = labels
    win = ctx["win"]
    win.resizeDocks([dock], [420], Qt.Orientation.Horizontal)
    settle(app, 1.5)
    save(ctx, "proofread")
    print(
        f"proofread: lowest confidence particle {first}; "
        + (f"{added.what}" if added is not None else "nothing added")
    )
    # leave the segmentation as Segment made it for the other shots
    proof.set_mode(None)
    while proof._undo:
        proof.undo()
    labels.selected_label = 1
    viewer.reset_view()
    dock.hide()


def shoot_measure(ctx: dict) -> None:
    """Measure: the pixel size typed in (the sample has none), plots, particles coloured."""
    from qtpy.QtCore import Qt

    viewer, app, labels, name = ctx["viewer"], ctx["app"], ctx["labels"], ctx["name"]
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
    ctx["win"].resizeDocks([me_dock], [560], Qt.Orientation.Horizontal)
    settle(app, 1.5)
    save(ctx, "measure")
    s = result.summary
    print(
        f"measure: {s['n_particles']} particles, D50 "
        f"{s[f'equivalent_diameter_{result.unit}_d50']:.3g} {result.unit}"
    )
    meas.reset_colours()
    labels.features = segment_features
    me_dock.hide()


def shoot_export(ctx: dict) -> None:
    """Export, with napari's feature table showing the particle measurements."""
    from qtpy.QtCore import Qt

    viewer, app, labels = ctx["viewer"], ctx["app"], ctx["labels"]
    ex_dock, export = viewer.window.add_plugin_dock_widget("napari-sagegan", "Export labels")
    export.folder_edit.setText(str(Path.home() / "sagegan-export"))
    viewer.layers.selection.active = labels
    table_dock, _ = viewer.window.add_plugin_dock_widget("napari", "Features table widget")
    settle(app, 0.5)
    ctx["win"].resizeDocks([ex_dock, table_dock], [220, 700], Qt.Orientation.Vertical)
    settle(app, 1.0)
    save(ctx, "export")
    ex_dock.hide()
    table_dock.hide()


def shoot_retrain(ctx: dict) -> None:
    """Correct (here: the exact ground truth stands for the user's corrections), retrain."""
    import numpy as np

    viewer, app, labels, name = ctx["viewer"], ctx["app"], ctx["labels"], ctx["name"]
    re_dock, retrain = viewer.window.add_plugin_dock_widget("napari-sagegan", "Correct and retrain")
    if ctx["threads"]:
        retrain.threads = ctx["threads"]
    truth = viewer.layers[f"{name} ground truth"].data
    labels.data = truth.astype(labels.data.dtype)
    retrain.refresh_pairs()
    retrain.epochs_spin.setValue(5)
    retrain.steps_spin.setValue(4)
    retrain.patch_spin.setValue(128)
    wait(app, retrain.start_training())
    until(app, lambda: not retrain.is_running)
    wait(app, retrain.resegment())
    until(app, lambda: not retrain.is_running)
    # the canvas shows the corrected layer that was trained on; the re-segmentation is the
    # "[1]" layer in the list
    again = f"{name} labels [1]"
    if again in viewer.layers:
        viewer.layers[again].visible = False
    viewer.layers.selection.active = labels
    settle(app, 1.0)
    save(ctx, "retrain")
    n = int(np.unique(labels.data).size - 1)
    print(f"retrain: fine-tuned on {n} corrected particles")
    re_dock.hide()


def shoot_augment(ctx: dict) -> None:
    """Augment: a short phase-2 run on the sample (AUGMENT_MINUTES), its loss curves, and
    two generated pairs on the canvas."""
    from qtpy.QtCore import Qt

    viewer, app, labels = ctx["viewer"], ctx["app"], ctx["labels"]
    dock, aug = viewer.window.add_plugin_dock_widget("napari-sagegan", "Augment (SAGE-GAN)")
    if ctx["threads"]:
        aug.threads = ctx["threads"]
    aug.refresh_pairs()
    for candidate in aug.pairs.names():  # the corrected labels of the sample only
        aug.set_checked(candidate, candidate == labels.name)
    aug.minutes_spin.setValue(AUGMENT_MINUTES)
    aug.patch_spin.setValue(128)
    worker = aug.start_training()
    if worker is None:
        sys.exit(f"augment: phase 2 did not start (pairs ticked: {aug.checked_labels()})")
    wait(app, worker)
    until(app, lambda: not aug.is_running and aug.state.phase2.generator is not None)
    print(f"augment: {aug.status.text()!r}")
    aug.n_spin.setValue(2)
    worker = aug.start_generate()
    if worker is None:
        sys.exit("augment: generating did not start (no generator after phase 2)")
    wait(app, worker)
    until(app, lambda: "SAGE-GAN synth 02 labels" in viewer.layers)
    settle(app, 1.0)
    for layer in viewer.layers:
        layer.visible = layer.name.startswith("SAGE-GAN synth 02")
    viewer.layers["SAGE-GAN synth 02 labels"].contour = 1  # outlines: the image shows through
    synth = [layer for layer in viewer.layers if layer.name.startswith("SAGE-GAN synth")]
    if synth:
        viewer.layers.selection.active = synth[-1]
    viewer.reset_view()
    ctx["win"].resizeDocks([dock], [520], Qt.Orientation.Horizontal)
    settle(app, 1.5)
    save(ctx, "augment")
    print(f"augment: {len(synth) // 2} pairs generated")
    dock.hide()


if __name__ == "__main__":
    main()
