"""Progress events yielded by the engine's long-running generators.

Every long computation in the engine (training, tiled inference, batch segmentation) is a
generator that yields :class:`Progress` events and *returns* its result. Nobody writes the
``next()`` / ``StopIteration`` loop by hand; there are two helpers:

- :func:`run_to_end` drives a generator to its end (a command line, a test, a script) and
  returns its result, calling a callback with every event;
- :func:`relay` passes a generator's events on from inside another generator, optionally
  rewritten (``result = yield from relay(gen, map_event)``).

A caller cancels by simply not asking for the next event and calling ``close()`` on the
generator: the engine cleans up in ``finally`` blocks, so cancelling between two events is
always safe. Both helpers close the generator they drive when they stop early.
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

    Returns
    -------
    object
        The generator's return value. An exception (or Ctrl-C) in the generator or in the
        callback propagates, and the generator is closed first.
    """
    box: list[T] = []

    def collect() -> Generator[Progress, None, None]:
        box.append((yield from relay(gen)))

    events = collect()
    try:
        for event in events:
            if callback is not None:
                callback(event)
    finally:
        events.close()
    return box[0]


def relay(
    gen: Generator[Progress, None, T], map_event: Callable[[Progress], Progress] | None = None
) -> Generator[Progress, None, T]:
    """Pass on the events of ``gen``, rewritten by ``map_event``; return its result.

    Use as ``result = yield from relay(gen, map_event)`` inside another progress generator,
    e.g. to turn one image's tile counts into counts over a whole batch. Closing the outer
    generator closes ``gen``.

    Parameters
    ----------
    gen : generator
        A generator yielding :class:`Progress` and returning a result.
    map_event : callable, optional
        ``Progress -> Progress``; ``None`` passes the events on unchanged.
    """
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield map_event(event) if map_event is not None else event
    finally:
        gen.close()
