"""What every dock shares: one task at a time in a worker thread, and notifications.

:class:`DockBase` runs a progress generator (an :mod:`napari_sagegan.api` call) in napari's
``create_worker``: events reach the dock on the main thread (``yielded``), the result
arrives with ``returned``, bad input raised in the worker becomes one error notification,
Cancel and closing the dock or the viewer stop the worker at its next event. The visible
parts (progress panel, pair list, plots) are in :mod:`.parts` and :mod:`.plots`.
:class:`ModelDock` adds the viewer's shared state; the training docks' base is
:class:`~napari_sagegan.napari._qt.training.TrainingDock`.

Every dock scrolls: its content is moved into a scroll area when its ``__init__`` ends, so
all the docks fit a 1366 x 768 screen together (each can be shrunk), and
:func:`open_all_docks` opens them as tabs of one dock area.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from napari.viewer import Viewer
from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

__all__ = [
    "DOCKS",
    "DockBase",
    "ModelDock",
    "notify_error",
    "notify_info",
    "notify_warning",
    "open_all_docks",
]

#: The plugin's docks (display names in napari.yaml), in the order they are used.
DOCKS = (
    "Segment",
    "Proofread particles",
    "Correct and retrain",
    "Augment (SAGE-GAN)",
    "Measure particles",
    "Export labels",
)
PLUGIN = "napari-sagegan"
#: Tallest size hint of a dock's scroll area (px): taller content scrolls.
DOCK_HINT_MAX_HEIGHT = 700
#: Pause between two pieces of main-thread work queued with :meth:`DockBase.later` (ms).
LATER_MS = 10

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


class _DockScroll(QScrollArea):
    """A frameless vertical scroll area whose size hint is its content's, up to
    :data:`DOCK_HINT_MAX_HEIGHT` (Qt's own hint caps it at 24 lines of text)."""

    def __init__(self, body: QWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(body)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        hint = self.widget().sizeHint()
        bar = self.verticalScrollBar().sizeHint().width()
        return QSize(hint.width() + bar, min(hint.height(), DOCK_HINT_MAX_HEIGHT))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        width = self.widget().minimumSizeHint().width()
        return QSize(width + self.verticalScrollBar().sizeHint().width(), 80)


def _outermost_init(cls: type) -> type:
    """The most derived class of ``cls`` that defines ``__init__``."""
    return next(c for c in cls.__mro__ if "__init__" in c.__dict__)


def open_all_docks(viewer: Viewer) -> dict[str, QWidget]:
    """Open every dock of the plugin as tabs of one dock area (the Segment tab in front);
    docks already open are kept. Returns the docks by name.

    Six docks stacked one above the other need more height than a laptop screen has (each
    scrolls, so they fit, but small); as tabs, each gets the whole height.
    """
    window = viewer.window
    docks: dict[str, QWidget] = {}
    dock_widgets = []
    for name in DOCKS:
        try:
            dock_widget, widget = window.add_plugin_dock_widget(PLUGIN, name, tabify=True)
        except (KeyError, ValueError):  # a dock this installation does not register
            continue
        docks[name] = widget
        dock_widgets.append(dock_widget)
    qt_window = getattr(window, "_qt_window", None)  # docks opened before: tabs as well
    first = dock_widgets[0]
    if qt_window is not None:
        for dock_widget in dock_widgets[1:]:
            if dock_widget not in qt_window.tabifiedDockWidgets(first):
                qt_window.tabifyDockWidget(first, dock_widget)
    first.show()
    first.raise_()
    return docks


class DockBase(QWidget):
    """A dock widget that runs one engine generator at a time in a worker thread.

    Every dock takes ``(napari_viewer, parent=None)``: the viewer (given by napari when the
    dock is opened from the Plugins menu) and an optional parent widget. Subclasses call
    :meth:`run_task`; a second call while a task runs is ignored (the run buttons are
    disabled meanwhile). Closing the widget, or the viewer, asks the worker to
    stop at its next progress event and waits for it.

    A subclass lays its widgets out on ``self`` as usual (``QVBoxLayout(self)``); when its
    ``__init__`` ends, that layout moves into :attr:`body`, inside :attr:`scroll_area`,
    so a dock can be shorter than its content.

    Main-thread work that a task's results need (adding layers) is queued with
    :meth:`later` and done one piece per turn of the event loop, so the window repaints and
    answers between two layers; the task counts as running (:attr:`is_running`) and its
    ``on_done`` comes only once that queue is done.

    Attributes
    ----------
    body : QWidget or None
        The dock's content (``None`` until the subclass laid it out).
    scroll_area : QScrollArea or None
        What scrolls :attr:`body`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_wraps_dock", False):
            return

        @functools.wraps(init)
        def __init__(self: DockBase, *args: Any, **kw: Any) -> None:  # noqa: N807
            init(self, *args, **kw)
            if _outermost_init(type(self)) is cls:
                self._scroll_content()

        __init__._wraps_dock = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self._gen: Generator | None = None
        self._busy_widgets: list[QWidget] = []
        self._live: dict[int, tuple[Any, Generator]] = {}
        self.body: QWidget | None = None
        self.scroll_area: QScrollArea | None = None
        self._later: deque = deque()
        self._later_timer = QTimer(self)
        self._later_timer.setInterval(LATER_MS)
        self._later_timer.timeout.connect(self._run_later)
        # a plain dict captured by the callback (not self): it still works while Qt deletes
        # the widget
        live = self._live
        self.destroyed.connect(lambda *_: [_stop(w, g) for w, g in list(live.values())])

    def _scroll_content(self) -> None:
        """Move the layout the subclass made on ``self`` into a scroll area (Qt moves a
        layout and its widgets to the widget it is set on)."""
        layout = self.layout()
        if layout is None or self.scroll_area is not None:
            return
        body = QWidget()
        body.setLayout(layout)
        self.body = body
        self.scroll_area = _DockScroll(body)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll_area)

    @property
    def is_running(self) -> bool:
        """A task was started and has not finished (set before its thread even starts; its
        queued main-thread work included)."""
        return self.worker is not None

    def later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the main thread after the work queued before it, one piece
        per turn of the event loop (see the class docstring)."""
        self._later.append((fn, args))
        if not self._later_timer.isActive():
            self._later_timer.start()

    def _run_later(self) -> None:
        if not self._later:
            self._later_timer.stop()
            return
        fn, args = self._later.popleft()
        try:
            fn(*args)
        finally:
            if not self._later:
                self._later_timer.stop()

    def flush_later(self) -> None:
        """Do all the queued main-thread work now (e.g. when the dock closes)."""
        while self._later:
            self._run_later()

    @property
    def pending(self) -> bool:
        """Main-thread work is queued (:meth:`later`)."""
        return bool(self._later)

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

        def complete() -> None:  # after the main-thread work the task's events queued
            me = self_ref()
            if me is None:
                return
            me.worker = None
            me._set_busy(False)
            if state["error"]:
                on_done("error")
            else:
                on_done("cancelled" if worker.abort_requested else "done")

        def finished() -> None:
            live.pop(key, None)
            _defer_full_gc(key, False)
            gen.close()
            me = self_ref()
            if me is not None:
                me.later(_guard(complete))

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
        self.flush_later()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:
        # napari's dock "x" button takes the widget out of its dock (parent -> None)
        if event.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.stop()
            self.flush_later()
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
        (checked now, each with the particle size set in the Segment dock), its folder,
        ``base``, ``config()`` and the dock's device and threads.

        Returns ``None`` after a notification when it cannot start: a bad pair (error), no
        pair at all (the warning ``no_pairs``), or a missing model file.
        """
        from napari_sagegan.napari.layers import pairs_from_layers

        picker.refresh()
        try:
            pairs = pairs_from_layers(
                self.viewer.layers, picker.checked_labels(), self.state.particle_size
            )
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

    def show_progress(self, ev: Any) -> None:
        """Show one event in the ``progress`` panel (a dock may show it its own way)."""
        self.progress.show(ev)

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
            self.show_progress(ev)

        self.progress.start(text)
        return self.run_task(
            gen,
            on_yield=shown,
            on_return=on_return or (lambda _: None),
            on_done=on_done or (lambda status: self.progress.finish_status(status, done)),
        )
