"""Small pieces shared by the dock widgets: workers, progress panel, notifications, plot."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

__all__ = [
    "DockBase",
    "ProgressPanel",
    "CurvePlot",
    "format_eta",
    "notify_error",
    "notify_info",
    "notify_warning",
]

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


def format_eta(seconds: float | None) -> str:
    """``"ETA 1 min 05 s"`` style text; empty when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"ETA {s} s"
    if s < 3600:
        return f"ETA {s // 60} min {s % 60:02d} s"
    return f"ETA {s // 3600} h {(s % 3600) // 60:02d} min"


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


class ProgressPanel(QWidget):
    """A progress bar with a real total, an ETA / status line and a Cancel button."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setFormat("%v / %m")
        self.bar.setTextVisible(False)  # no "0 / 1" before anything ran
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop at the next tile or training step")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.status)

    def start(self, text: str) -> None:
        self.bar.setRange(0, 0)  # busy until the first event gives a total
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.status.setText(text)
        self.cancel_button.setEnabled(True)

    def update_progress(self, step: int, total: int | None, eta_s: float | None, text: str):
        if total:
            self.bar.setRange(0, int(total))
            self.bar.setValue(min(int(step), int(total)))
        eta = format_eta(eta_s)
        self.status.setText(f"{text}  ·  {eta}" if eta else text)

    def finish(self, text: str) -> None:
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
        self.cancel_button.setEnabled(False)
        self.status.setText(text)


class DockBase(QWidget):
    """A dock widget that runs one engine generator at a time in a worker thread.

    Subclasses call :meth:`run_task`; a second call while a task runs is ignored (the run
    buttons are disabled meanwhile). Closing the widget, or the viewer, asks the worker to
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


class CurvePlot(QWidget):
    """A small live plot: training loss (left axis) and validation scores (right axis, 0-1).

    Drawn with QPainter: no plotting library needed, and cheap enough to redraw after every
    training step.
    """

    LOSS = QColor(90, 160, 255)
    LOSS_STEP = QColor(90, 160, 255, 90)
    COLORS = {"val_dice": QColor(80, 200, 120), "val_f1@0.5": QColor(255, 170, 60)}
    NAMES = {"val_dice": "val Dice", "val_f1@0.5": "val F1@0.5"}

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.clear()

    def clear(self) -> None:
        self.step_loss: list[tuple[float, float]] = []  # (epoch fraction, loss)
        self.epoch_loss: list[tuple[float, float]] = []
        self.scores: dict[str, list[tuple[float, float]]] = {k: [] for k in self.COLORS}
        self.update()

    def add_step(self, x: float, loss: float) -> None:
        if math.isfinite(loss):
            self.step_loss.append((x, loss))
            self.update()

    def add_epoch(self, epoch: float, data: dict) -> None:
        if math.isfinite(data.get("loss", math.nan)):
            self.epoch_loss.append((epoch, float(data["loss"])))
        for key in self.scores:
            if key in data and math.isfinite(data[key]):
                self.scores[key].append((epoch, float(data[key])))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        fg = self.palette().windowText().color()
        fm = p.fontMetrics()
        left, right = fm.horizontalAdvance("0.000") + 8, fm.horizontalAdvance("1.0") + 10
        top, bottom = fm.height() + 6, fm.height() + 8
        area = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
        if area.width() < 20 or area.height() < 20:
            return
        p.setPen(QPen(fg, 1))
        p.drawRect(area)
        xs = [x for x, _ in self.step_loss] + [x for x, _ in self.epoch_loss]
        losses = [v for _, v in self.step_loss] + [v for _, v in self.epoch_loss]
        x_max = max(xs + [1.0])
        lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
        if hi - lo < 1e-9:
            hi = lo + 1.0

        def point(x: float, y: float, y0: float, y1: float) -> QPointF:
            px = area.left() + area.width() * x / x_max
            py = area.bottom() - area.height() * (y - y0) / (y1 - y0)
            return QPointF(px, py)

        def line(points: list[tuple[float, float]], color: QColor, y0, y1, width=2.0):
            if not points:
                return
            path = QPainterPath(point(*points[0], y0, y1))
            for x, y in points[1:]:
                path.lineTo(point(x, y, y0, y1))
            p.setPen(QPen(color, width))
            p.drawPath(path)
            if len(points) == 1:
                p.drawEllipse(point(*points[0], y0, y1), 2.5, 2.5)

        line(self.step_loss, self.LOSS_STEP, lo, hi, 1.0)
        line(self.epoch_loss, self.LOSS, lo, hi)
        for key, color in self.COLORS.items():
            line(self.scores[key], color, 0.0, 1.0)
        # axes text
        p.setPen(QPen(fg, 1))
        align_r = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        align_l = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
        h = fm.height()
        for value, y in ((hi, area.top()), (lo, area.bottom())):
            p.drawText(QRectF(0, y - h / 2, left - 4, h), align_r, f"{value:.3g}")
        for value, y in (("1.0", area.top()), ("0.0", area.bottom())):
            p.drawText(QRectF(area.right() + 4, y - h / 2, right, h), align_l, value)
        p.drawText(
            QRectF(area.left(), area.bottom() + 2, area.width(), h),
            Qt.AlignmentFlag.AlignCenter,
            f"epoch (0 - {x_max:.0f})",
        )
        # legend
        x = area.left()
        for text, color in [("loss", self.LOSS)] + [
            (self.NAMES[k], c) for k, c in self.COLORS.items()
        ]:
            p.setPen(QPen(color, 3))
            p.drawLine(QPointF(x, h / 2 + 2), QPointF(x + 12, h / 2 + 2))
            p.setPen(QPen(fg, 1))
            p.drawText(QPointF(x + 15, h - 1), text)
            x += 15 + fm.horizontalAdvance(text) + 12
        p.end()
