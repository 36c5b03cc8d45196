"""Progress events yielded by the engine's long-running generators.

Every long computation in the engine (training, tiled inference, batch segmentation) is a
generator that yields :class:`Progress` events and *returns* its result (read it from
``StopIteration.value`` or with :func:`run_to_end`). A caller cancels by simply not asking
for the next event and calling ``close()`` on the generator: the engine cleans up in
``finally`` blocks, so cancelling between two events is always safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Progress:
    """One progress event.

    Attributes
    ----------
    stage : str
        What is running, e.g. ``"train"``, ``"validate"``, ``"tiles"``, ``"slices"``.
    step : int
        Steps done so far in this stage (1-based once the first step is done).
    total : int or None
        Steps in this stage when known.
    eta_s : float or None
        Estimated seconds left for this stage.
    message : str
        A short human-readable line.
    data : dict
        Stage-specific numbers (losses, validation scores, epoch, ...).
    """

    stage: str
    step: int
    total: int | None = None
    eta_s: float | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.step / self.total)


class EtaClock:
    """Estimate the time left from the mean duration of the steps done so far."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.start = time.perf_counter()

    def eta(self, done: int) -> float | None:
        if not self.total or done <= 0:
            return None
        elapsed = time.perf_counter() - self.start
        return max(0.0, elapsed / done * (self.total - done))


def run_to_end(
    gen: Generator[Progress, None, T], callback: Callable[[Progress], None] | None = None
) -> T:
    """Drive an engine generator to completion and return its result.

    Parameters
    ----------
    gen : generator
        An engine generator yielding :class:`Progress`.
    callback : callable, optional
        Called with every event (e.g. to print progress).
    """
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
