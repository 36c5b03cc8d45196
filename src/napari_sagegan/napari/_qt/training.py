"""The base of the training docks (Correct and retrain, Augment): what they share.

:class:`TrainingDock` builds the pair list, patch size, device, train button, progress panel
and curve plot, lays them out around the dock's own fields, gathers the arguments of a
:mod:`napari_sagegan.napari.jobs` training job, runs it in a worker and reports its end; a
dock adds its fields, its configuration, how it shows training events and what it keeps.

A run that its time budget ends says so ("stopped at the 1-minute limit after 130 of 200
steps"), and a dock whose budget is a time only (phase 2) shows time-based progress:
minutes elapsed of the budget, and the steps done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QFormLayout, QLayout, QPushButton, QVBoxLayout, QWidget

from napari_sagegan.napari._qt.common import ModelDock
from napari_sagegan.napari._qt.parts import PairPicker, ProgressPanel, device_combo, spin_box
from napari_sagegan.napari._qt.plots import CurvePlot

__all__ = ["TrainingDock"]


class TrainingDock(ModelDock):
    """A dock that trains on the viewer's (image, labels) pairs in a worker.

    Builds the shared parts from its class attributes: the pair list (``pairs``, a view of
    the viewer state's training set named ``training_set``), the patch-size field (32 to
    ``patch_max`` px), the device chooser, the train button (``train_text``), the progress
    panel and ``plot``; :meth:`training_form` and :meth:`training_layout` lay them out
    around the dock's own fields. :meth:`start_training` runs ``job(**self.arguments())`` (a
    :mod:`napari_sagegan.napari.jobs` training job); Cancel keeps its best model and
    :meth:`trained` turns the result into the dock's state and a summary line.

    Attributes
    ----------
    task : jobs.FineTune or jobs.Augment or None
        The running training job.
    """

    training = True
    #: The training job class (called with :meth:`arguments`).
    job: Callable[..., Any]
    #: The end of the message when training stopped without a model.
    unchanged = "nothing changed"
    #: What a stop before any model was kept is called.
    too_early = "stopped before the first validation"
    #: What a Cancel that kept the best model is called.
    cancelled_kept = "cancelled, best kept"
    #: The progress line while training (``{base}``: the base model's name).
    start_words = "training {base} ..."
    #: The warning when no pair is ticked and no folder given.
    no_pairs = "No training pairs: tick some here, or choose a folder of image/mask pairs."

    #: The viewer state's training set the pair list shows (``"retrain_set"``, ...).
    training_set = "retrain_set"
    #: Further :class:`~napari_sagegan.napari._qt.parts.PairPicker` arguments.
    picker: dict = {}
    #: The plot of the training curves (a class of :mod:`.plots`).
    plot_class: type = CurvePlot
    #: The train button's text.
    train_text = "Train"
    #: The largest patch size offered (px).
    patch_max = 1024

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.task: Any = None
        self._t0: float | None = None  # when the fit loop started (time-based progress)
        training_set = getattr(self.state, self.training_set)
        self.pairs = PairPicker(napari_viewer, training_set, **self.picker)
        self.pair_list = self.pairs.list
        self.folder_edit = self.pairs.folder_edit
        self.patch_spin = spin_box(32, self.patch_max, 128, step=32, suffix=" px")
        self.device_combo = device_combo()
        self.train_button = QPushButton(self.train_text)
        self.progress = ProgressPanel()
        self.plot = self.plot_class()
        self.train_button.clicked.connect(self.start_training)
        self.progress.cancel_button.clicked.connect(self.cancel)

    def training_form(self, *rows: tuple[str, Any]) -> QFormLayout:
        """The settings: the folder of extra pairs, ``rows``, the patch size, the device."""
        form = QFormLayout()
        form.addRow("Extra pairs", self.pairs.folder_row)
        for label, field in rows:
            form.addRow(label, field)
        form.addRow("Patch size", self.patch_spin)
        form.addRow("Device", self.device_combo)
        return form

    def training_layout(self, form: QFormLayout, *below: Any) -> QVBoxLayout:
        """The dock's layout: pairs, ``form``, train button, progress, plot, then ``below``
        (widgets or layouts)."""
        lay = QVBoxLayout(self)
        lay.addWidget(self.pairs)
        lay.addLayout(form)
        lay.addWidget(self.train_button)
        lay.addWidget(self.progress)
        lay.addWidget(self.plot, 1)
        for part in below:
            (lay.addLayout if isinstance(part, QLayout) else lay.addWidget)(part)
        return lay

    # ------------------------------------------------------------------ pairs
    def refresh_pairs(self, *_: Any) -> None:
        """List the pairs again (the ticks are the viewer's training set)."""
        self.pairs.refresh()

    def set_checked(self, labels_name: str, checked: bool = True) -> None:
        """Tick or untick a pair by its Labels layer name."""
        self.pairs.set_checked(labels_name, checked)

    def checked_labels(self) -> list[str]:
        return self.pairs.checked_labels()

    # ------------------------------------------------------------------ training
    def base_model(self) -> Any:  # pragma: no cover (abstract)
        """The model training starts from (a :class:`~napari_sagegan.napari.state.ModelEntry`)."""
        raise NotImplementedError

    def config(self) -> Any:  # pragma: no cover (abstract)
        """The training configuration set in the dock."""
        raise NotImplementedError

    def arguments(self) -> dict | None:
        """The dock's values as the arguments of :attr:`job`; ``None`` (and a notification)
        when it cannot start."""
        return self.training_arguments(self.pairs, self.base_model(), self.config, self.no_pairs)

    def start_training(self) -> Any:
        """Train (the button); returns the worker or ``None``."""
        args = self.ready_arguments()
        if args is None:
            return None
        self.task = self.job(**args)
        self.plot.clear()
        self._t0 = None
        return self.run_with_progress(
            self.task.run(),
            self.start_words.format(base=args["base"].name),
            on_yield=self.show_training_event,
            on_done=self._on_training_done,
        )

    def show_training_event(self, ev: Any) -> None:
        """Show one training event (curves, preview); the progress panel shows it after."""

    def show_progress(self, ev: Any) -> None:
        """The progress panel: steps of the budget, or, for a job whose budget is a time
        only (``budget_in_steps`` false), minutes elapsed of the time limit and steps done."""
        task = self.task
        if ev.stage == "prepare":
            self._t0 = time.perf_counter()
        minutes = task.time_limit_minutes if task is not None else None
        if task is None or task.budget_in_steps or not minutes or ev.stage == "prepare":
            self.progress.show(ev)
            return
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        step = task.steps[0]
        if ev.stage == "train":
            loss = ev.data.get("loss")
            text = f"{step} step{'s' if step != 1 else ''}, epoch {ev.data.get('epoch', '?')}"
            text += f", loss {loss:.3f}" if isinstance(loss, float) else ""
        else:
            text = ev.message
        self.progress.show_time(elapsed, 60.0 * minutes, text)

    def _on_training_done(self, status: str) -> None:
        task, self.task = self.task, None  # free the training data and the optimisers
        result = task.result() if task is not None else None
        if status == "error" or result is None:
            text = "failed" if status == "error" else self.too_early
            self.progress.finish(f"{text}; {self.unchanged}")
            return
        summary = self.trained(task, result)
        how = self.cancelled_kept if status == "cancelled" else (task.limit_text() or "done")
        self.progress.finish(f"{how}: {summary}")

    def trained(self, task: Any, result: Any) -> str:  # pragma: no cover (abstract)
        """Keep ``result`` (the new model); returns the summary line."""
        raise NotImplementedError

    def _set_busy(self, busy: bool) -> None:
        super()._set_busy(busy)
        if not busy:
            self.refresh_buttons()

    def refresh_buttons(self) -> None:
        """Enable the dock's buttons that depend on its state (after a task)."""
