"""What every dock shares: one task at a time in a worker thread, and notifications.

:class:`DockBase` runs a progress generator (an :mod:`napari_sagegan.api` call) in napari's
``create_worker``: events reach the dock on the main thread (``yielded``), the result
arrives with ``returned``, bad input raised in the worker becomes one error notification,
Cancel and closing the dock or the viewer stop the worker at its next event. The visible
parts (progress panel, pair list, plots) are in :mod:`.parts` and :mod:`.plots`.
:class:`ModelDock` adds the viewer's shared state; the training docks' base is
:class:`~napari_sagegan.napari._qt.training.TrainingDock`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QWidget

__all__ = ["DockBase", "ModelDock", "notify_error", "notify_info", "notify_warning"]

#: Longest wait (s) for a worker to stop when its widget or viewer is closed.
STOP_TIMEOUT_S = 30.0


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:]


def notify_error(message: str) -> None:
    """Show an error notification (bottom right of the viewer)."""
    show_error(_sentence(message))


def notify_warning(message: str) -> None:
    show_warning(_sentence(message))


def notify_info(message: str) -> None:
    show_info(_sentence(message))


# Python's full (generation 2) garbage collection walks every object of the process: with
# napari loaded that is a few hundred milliseconds during which no other thread runs. It
# starts in whichever thread happens to allocate, often the worker in the middle of a run.
# While a worker runs, full collections are postponed (young generations are still
# collected); the thresholds come back when the last worker ends. This is process-wide
# state on purpose: the garbage collector is one per process.
_GC_HOLDERS: set[int] = set()
_GC_SAVED: list[tuple[int, int, int]] = []
_GC_DEFERRED_THRESHOLD2 = 1_000_000


def _defer_full_gc(key: int, defer: bool) -> None:
    import gc

    if defer:
        if not _GC_HOLDERS:
            _GC_SAVED[:] = [gc.get_threshold()]
            t0, t1, _ = _GC_SAVED[0]
            gc.set_threshold(t0, t1, _GC_DEFERRED_THRESHOLD2)
        _GC_HOLDERS.add(key)
    elif key in _GC_HOLDERS:
        _GC_HOLDERS.discard(key)
        if not _GC_HOLDERS and _GC_SAVED:
            gc.set_threshold(*_GC_SAVED.pop())


class TaskFailed:
    """Returned by a worker whose task stopped on bad input: the message for the user."""

    def __init__(self, message: str) -> None:
        self.message = message


def _drive(gen: Generator) -> Generator:
    """Run ``gen`` inside the worker (a generator *function* for ``create_worker``).

    Bad input (``ValueError``, ``OSError``: the engine's messages say what to do) and
    running out of memory end the task with a :class:`TaskFailed` that the widget shows as
    one clear notification; anything else is a bug and reaches napari's error handler.
    """
    try:
        return (yield from gen)
    except (ValueError, OSError) as err:
        return TaskFailed(str(err) or type(err).__name__)
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "out of memory" not in str(err):
            raise
        return TaskFailed(
            "out of memory: lower the tile size (Segment) or the patch size (Retrain), "
            "or use the CPU"
        )


def _stop(worker: Any, gen: Generator, timeout: float = STOP_TIMEOUT_S) -> None:
    """Ask a worker to stop, wait for it (bounded), then close its generator."""
    try:
        worker.quit()
        deadline = time.monotonic() + timeout
        while worker.is_running and time.monotonic() < deadline:
            time.sleep(0.01)
    except RuntimeError:  # the Qt object is already gone
        pass
    _defer_full_gc(id(worker), False)
    if not _is_running(worker):
        try:
            gen.close()  # runs the engine's clean-up (finally blocks) now, not at garbage time
        except ValueError:  # the worker thread started in the meantime: it stops itself
            pass


def _guard(fn: Callable) -> Callable:
    """Ignore a late signal whose widget was already deleted by Qt (viewer closed)."""

    def call(*args: Any) -> None:
        try:
            fn(*args)
        except RuntimeError as err:
            if "deleted" not in str(err):
                raise

    return call


def _is_running(worker: Any) -> bool:
    try:
        return bool(worker.is_running)
    except RuntimeError:
        return False


class DockBase(QWidget):
    """A dock widget that runs one engine generator at a time in a worker thread.

    Every dock takes ``(napari_viewer, parent=None)``: the viewer (given by napari when the
    dock is opened from the Plugins menu) and an optional parent widget. Subclasses call
    :meth:`run_task`; a second call while a task runs is ignored (the run buttons are
    disabled meanwhile). Closing the widget, or the viewer, asks the worker to
    stop at its next progress event and waits for it.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self._gen: Generator | None = None
        self._busy_widgets: list[QWidget] = []
        self._live: dict[int, tuple[Any, Generator]] = {}
        # a plain dict captured by the callback (not self): it still works while Qt deletes
        # the widget
        live = self._live
        self.destroyed.connect(lambda *_: [_stop(w, g) for w, g in list(live.values())])

    @property
    def is_running(self) -> bool:
        """A task was started and has not finished (set before its thread even starts)."""
        return self.worker is not None

    def run_task(
        self,
        gen: Generator,
        *,
        on_yield: Callable[[Any], None],
        on_return: Callable[[Any], None],
        on_done: Callable[[str], None],
    ) -> Any:
        """Start ``gen`` in a worker; returns the worker (``None`` if one is running).

        ``on_yield`` / ``on_return`` run on the main thread; ``on_done(status)`` runs last
        with ``"done"``, ``"cancelled"`` or ``"error"``. Bad input raised in the worker
        becomes one error notification (see :func:`_drive`).
        """
        if self.is_running:
            gen.close()
            return None
        worker = create_worker(_drive, gen, _start_thread=False)
        key = id(worker)
        state = {"error": False}
        self_ref = weakref.ref(self)
        live = self._live

        def errored(exc: BaseException) -> None:  # napari shows the notification itself
            state["error"] = True

        def returned(value: Any) -> None:
            if isinstance(value, TaskFailed):
                state["error"] = True
                notify_error(value.message)
            else:
                on_return(value)

        def finished() -> None:
            live.pop(key, None)
            _defer_full_gc(key, False)
            gen.close()
            me = self_ref()
            if me is None:
                return
            me.worker = None
            me._set_busy(False)
            if state["error"]:
                on_done("error")
            else:
                on_done("cancelled" if worker.abort_requested else "done")

        worker.yielded.connect(_guard(on_yield))
        worker.returned.connect(_guard(returned))
        worker.errored.connect(errored)
        worker.finished.connect(_guard(finished))
        self.worker, self._gen = worker, gen
        self._live[key] = (worker, gen)
        self._set_busy(True)
        _defer_full_gc(key, True)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the running task at its next progress event (tile or training step)."""
        if self.worker is not None:
            self.worker.quit()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the running task and wait for it (used on close)."""
        for w, g in list(self._live.values()):
            _stop(w, g, timeout)

    def _set_busy(self, busy: bool) -> None:
        for w in self._busy_widgets:
            w.setEnabled(not busy)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.stop()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:
        # napari's dock "x" button takes the widget out of its dock (parent -> None)
        if event.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.stop()
        return super().event(event)


class ModelDock(DockBase):
    """A dock that runs models: it shares the viewer's state and limits torch's threads.

    Attributes
    ----------
    state : napari_sagegan.napari.state.ViewerState
        The viewer's models, training sets and phase-2 generator (shared by every dock).
    store : napari_sagegan.napari.state.ModelStore
        ``state.models``.
    threads : int or None
        Torch threads while the GUI is open: all cores but one
        (:func:`napari_sagegan.engine.device.gui_threads`).
    """

    #: Import the training modules too when the dock opens (see ``jobs.warm_up``).
    training = False

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        from napari_sagegan.engine.device import gui_threads
        from napari_sagegan.napari.jobs import warm_up
        from napari_sagegan.napari.state import viewer_state

        warm_up(training=self.training)  # imports now, not inside the worker (GUI stalls)
        self.state = viewer_state(napari_viewer)
        self.store = self.state.models
        self.threads: int | None = gui_threads()

    def check_model(self, entry: Any) -> bool:
        """Whether ``entry``'s file is there; if not, say so (an error notification)."""
        try:
            entry.check_available()
        except FileNotFoundError as err:
            notify_error(str(err))
            return False
        return True

    def training_arguments(
        self, picker: Any, base: Any, config: Callable[[], Any], no_pairs: str
    ) -> dict | None:
        """The arguments of a training job (:class:`~napari_sagegan.napari.jobs.FineTune`,
        :class:`~napari_sagegan.napari.jobs.Augment`): the pairs ticked in ``picker``
        (checked now), its folder, ``base``, ``config()`` and the dock's device and threads.

        Returns ``None`` after a notification when it cannot start: a bad pair (error), no
        pair at all (the warning ``no_pairs``), or a missing model file.
        """
        from napari_sagegan.napari.layers import pairs_from_layers

        picker.refresh()
        try:
            pairs = pairs_from_layers(self.viewer.layers, picker.checked_labels())
        except ValueError as err:
            notify_error(str(err))
            return None
        folder = picker.folder()
        if not pairs and folder is None:
            notify_warning(no_pairs)
            return None
        if not self.check_model(base):
            return None
        return {
            "base": base,
            "pairs": pairs,
            "config": config(),
            "folder": (folder, None) if folder else None,
            "device": self.device_combo.currentText(),
            "threads": self.threads,
        }

    def ready_arguments(self) -> dict | None:
        """The dock's :meth:`arguments` when no task runs (``None`` while one runs, or when
        they are incomplete: the dock said why)."""
        return None if self.is_running else self.arguments()

    def arguments(self) -> dict | None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def run_with_progress(
        self,
        gen: Generator,
        text: str,
        *,
        on_yield: Callable[[Any], None] | None = None,
        on_return: Callable[[Any], None] | None = None,
        done: str = "done",
        on_done: Callable[[str], None] | None = None,
    ) -> Any:
        """:meth:`run_task` with the dock's ``progress`` panel: started with ``text``, each
        event shown (after ``on_yield``), finished in words (``done``, cancelled, failed)
        unless ``on_done`` is given."""

        def shown(ev: Any) -> None:
            if on_yield is not None:
                on_yield(ev)
            self.progress.show(ev)

        self.progress.start(text)
        return self.run_task(
            gen,
            on_yield=shown,
            on_return=on_return or (lambda _: None),
            on_done=on_done or (lambda status: self.progress.finish_status(status, done)),
        )
