"""The live training plots shared by the docks, drawn with QPainter (no plotting library).

- :class:`CurvePlot`: training loss (left axis) and validation scores (right axis, 0-1), for
  fine-tuning.
- :class:`TermPlot`: phase 2's per-term losses on a log scale, named in plain words in the
  legend (the loss names of the code, ``adv_img``..., in each entry's tooltip).

New points are drawn at most :attr:`_Plot.REDRAW_MS` apart (a few times a second), however
fast the training steps come: a repaint per step was a main-thread cost on every step.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import QEvent, QPointF, QRectF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QToolTip, QWidget

__all__ = ["CurvePlot", "TermPlot", "TERMS", "TERM_NAMES"]

#: The phase-2 loss terms, in the order of the legend.
TERMS = ("adv_img", "adv_mask", "id_mask", "rec_mask", "rec_img", "id_img", "d_img", "d_mask")

#: Each term in plain words (the legend) and what it measures (its tooltip, with the name).
TERM_NAMES = {
    "adv_img": ("image realism", "how easily the image critic tells generated images from "
                "real ones (the generator's adversarial loss; lower: more realistic)"),
    "adv_mask": ("mask realism", "how easily the mask critic tells the segmenter's masks from "
                 "real masks (the segmenter's adversarial loss)"),
    "id_mask": ("segmentation, real", "the segmentation loss on the real pairs (as in "
                "fine-tuning: focal + Tversky + distance)"),
    "rec_mask": ("segmentation, synthetic", "the segmentation loss on images generated from "
                 "the real masks"),
    "rec_img": ("image round trip", "how far an image is from its reconstruction G(S(image)) "
                "(L1 + MS-SSIM)"),
    "id_img": ("image likeness", "how far a generated image G(mask) is from the real image "
               "of that mask (L1 + MS-SSIM)"),
    "d_img": ("image critic", "the image discriminator's own loss (it learns to tell "
              "generated images from real ones)"),
    "d_mask": ("mask critic", "the mask discriminator's own loss"),
}  # fmt: skip


class _Plot(QWidget):
    """A plot that grows with its dock; :meth:`clear` empties it; new points are drawn at
    most :attr:`REDRAW_MS` apart (:meth:`changed`)."""

    MIN_HEIGHT = 150
    #: Shortest time between two repaints for new points (ms).
    REDRAW_MS = 250

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(self.MIN_HEIGHT)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self._redraw = QTimer(self)
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(self.REDRAW_MS)
        self._redraw.timeout.connect(self.update)
        #: Legend entries as drawn: (rect, tooltip), for :meth:`event`.
        self._legend: list[tuple[QRectF, str]] = []
        self.clear()

    def clear(self) -> None:  # pragma: no cover (each plot has its own)
        self.update()

    def changed(self) -> None:
        """New points: repaint within :attr:`REDRAW_MS` (one repaint for a burst of steps)."""
        if not self._redraw.isActive():
            self._redraw.start()

    def event(self, event: Any) -> bool:
        """Show the tooltip of the legend entry under the mouse."""
        if event.type() == QEvent.Type.ToolTip:
            pos = QPointF(event.pos())
            for rect, tip in self._legend:
                if rect.contains(pos):
                    QToolTip.showText(event.globalPos(), tip, self)
                    return True
        return super().event(event)


class CurvePlot(_Plot):
    """A small live plot: training loss (left axis) and validation scores (right axis, 0-1).

    Drawn with QPainter: no plotting library needed, and cheap enough to redraw after every
    training step.
    """

    LOSS = QColor(90, 160, 255)
    LOSS_STEP = QColor(90, 160, 255, 90)
    COLORS = {"val_dice": QColor(80, 200, 120), "val_f1@0.5": QColor(255, 170, 60)}
    NAMES = {"val_dice": "val Dice", "val_f1@0.5": "val F1@0.5"}

    MIN_HEIGHT = 170

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setToolTip(
            "loss: the training loss, per step (faint) and per epoch (left axis; lower is "
            "better)\nval Dice: pixel overlap with the held-out labels\nval F1@0.5: "
            "particles found (IoU > 0.5) in the held-out labels (right axis, 0-1; higher is "
            "better)"
        )

    def clear(self) -> None:
        self.step_loss: list[tuple[float, float]] = []  # (epoch fraction, loss)
        self.epoch_loss: list[tuple[float, float]] = []
        self.scores: dict[str, list[tuple[float, float]]] = {k: [] for k in self.COLORS}
        self.update()

    def add_step(self, x: float, loss: float) -> None:
        if math.isfinite(loss):
            self.step_loss.append((x, loss))
            self.changed()

    def add_epoch(self, epoch: float, data: dict) -> None:
        if math.isfinite(data.get("loss", math.nan)):
            self.epoch_loss.append((epoch, float(data["loss"])))
        for key in self.scores:
            if key in data and math.isfinite(data[key]):
                self.scores[key].append((epoch, float(data[key])))
        self.changed()

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


class TermPlot(_Plot):
    """Live per-term loss curves (log scale, one colour per term), drawn with QPainter."""

    COLORS = [QColor(c) for c in ("#5aa0ff", "#ff9f40", "#50c878", "#e05a5a", "#b07cff",
                                   "#ffd24d", "#40d0d0", "#c0c0c0")]  # fmt: skip

    MIN_HEIGHT = 150

    def clear(self) -> None:
        self.series: dict[str, list[tuple[float, float]]] = {k: [] for k in TERMS}
        self.update()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setToolTip(
            "Phase-2 losses (log scale):\n"
            + "\n".join(f"{name} ({k}): {tip}" for k, (name, tip) in TERM_NAMES.items())
        )

    def add(self, step: float, data: dict) -> None:
        for k in TERMS:
            v = data.get(k)
            if v is not None and math.isfinite(v) and v > 0:
                self.series[k].append((step, math.log10(v)))
        self.changed()

    def _legend_layout(self, fm: Any) -> list[tuple[str, QColor, QRectF]]:
        """Legend entries (term, colour, rect), wrapped to the widget's width."""
        h = fm.height()
        x, row, out = 4.0, 1, []
        for k, color in zip(TERMS, self.COLORS):
            width = 13 + fm.horizontalAdvance(TERM_NAMES[k][0])
            if x > 4.0 and x + width > self.width() - 4:
                x, row = 4.0, row + 1
            out.append((k, color, QRectF(x, (row - 1) * h + 2, width, h)))
            x += width + 10
        return out

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        fg = self.palette().windowText().color()
        h = p.fontMetrics().height()
        legend = self._legend_layout(p.fontMetrics())
        top = legend[-1][2].bottom() + 6
        area = QRectF(36, top, self.width() - 44, self.height() - top - 6)
        self._legend = []
        for k, color, rect in legend:
            name, tip = TERM_NAMES[k]
            y = rect.bottom() - 3
            p.setPen(QPen(color, 3))
            p.drawLine(QPointF(rect.left(), y - h / 3), QPointF(rect.left() + 10, y - h / 3))
            p.setPen(QPen(fg, 1))
            p.drawText(QPointF(rect.left() + 13, y), name)
            self._legend.append((rect, f"{name} ({k}): {tip}"))
        if area.width() < 20 or area.height() < 20:
            p.end()
            return
        p.setPen(QPen(fg, 1))
        p.drawRect(area)
        pts = [pt for s in self.series.values() for pt in s]
        if pts:
            x_max = max(x for x, _ in pts) or 1.0
            lo, hi = min(y for _, y in pts), max(y for _, y in pts)
            hi = hi if hi - lo > 1e-9 else lo + 1.0

            def point(x: float, y: float) -> QPointF:
                return QPointF(
                    area.left() + area.width() * x / x_max,
                    area.bottom() - area.height() * (y - lo) / (hi - lo),
                )

            for s, color in zip(self.series.values(), self.COLORS):
                if not s:
                    continue
                path = QPainterPath(point(*s[0]))
                for x, y in s[1:]:
                    path.lineTo(point(x, y))
                p.setPen(QPen(color, 1.5))
                p.drawPath(path)
            p.setPen(QPen(fg, 1))
            p.drawText(QPointF(2, area.top() + h), f"1e{hi:.0f}")
            p.drawText(QPointF(2, area.bottom()), f"1e{lo:.0f}")
        p.end()
