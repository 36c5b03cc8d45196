"""What every ``sagegan`` command shares: progress bars, device choice, flags from configs,
outputs that never overwrite inputs, SIGTERM as a clean stop, printable paths.

Imported by the command modules and by :func:`napari_sagegan.cli.main` when it runs (never
by :mod:`napari_sagegan.cli` at import time); loads neither torch nor Qt.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

from napari_sagegan.util.files import refuse_overwriting_inputs
from napari_sagegan.util.progress import Progress, run_to_end
from napari_sagegan.util.units import PIXEL_SIZE_RANGE_NM

DEVICES = ["auto", "cpu", "cuda", "mps"]
#: The exit status of a run stopped by SIGTERM (128 + 15, as the shells report it).
EXIT_TERMINATED = 143


def say(message: str) -> None:
    """One ``sagegan: ...`` line on stderr (progress and notes; results go to stdout)."""
    print(f"sagegan: {message}", file=sys.stderr)


class Bar:
    """A tqdm bar on stderr, shown on a terminal (or with ``SAGEGAN_PROGRESS=1``)."""

    def __init__(self, desc: str, total: int | None = None) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm(
            total=total,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None if os.environ.get("SAGEGAN_PROGRESS") != "1" else False,
        )

    def show(self, ev: Progress, total: int | None = None, step: int | None = None) -> None:
        total = total if total is not None else ev.total
        if total and self.tqdm.total != total:
            self.tqdm.total = total
        self.tqdm.n = step if step is not None else ev.step
        self.tqdm.refresh()

    def write(self, text: str) -> None:
        self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.tqdm.close()


def drive(
    gen: Generator[Progress, None, Any],
    desc: str,
    on_event: Callable[[Progress, Bar], None] | None = None,
) -> Any:
    """Run an api generator to its end behind one progress bar; return its result."""
    bar = Bar(desc)

    def show(ev: Progress) -> None:
        if on_event is not None:
            on_event(ev, bar)
        bar.show(ev)

    try:
        return run_to_end(gen, show)
    finally:
        bar.close()


def _field_default(defaults: Any, name: str) -> Any:
    if name in {f.name for f in dataclasses.fields(defaults)}:
        return getattr(defaults, name)
    return getattr(defaults.train, name)  # GanConfig: the phase-1 options are nested


def config_flags(
    parser: argparse.ArgumentParser, defaults: Any, helps: dict[str, str], **extra: Any
) -> None:
    """Add one ``--field-name`` flag per config field in ``helps``.

    The type and the default come from the config instance ``defaults`` (a ``GanConfig``'s
    nested ``train`` fields included); ``extra`` maps a field to more ``add_argument``
    keywords (``choices``, ``default``..., and ``flag`` for a flag not named like the
    field). Read the values back with :func:`config_values`.
    """
    for name, text in helps.items():
        default = _field_default(defaults, name)
        kw = {"type": type(default) if default is not None else float, "default": default}
        kw.update(extra.get(name, {}))
        flag = kw.pop("flag", "--" + name.replace("_", "-"))
        shown = kw["default"]
        parser.add_argument(
            flag,
            dest=name,
            help=f"{text} (default {shown})" if shown is not None else text,
            **kw,
        )


def config_values(args: argparse.Namespace, helps: dict[str, str]) -> dict[str, Any]:
    """The values of the flags :func:`config_flags` added, by field name."""
    return {name: getattr(args, name) for name in helps}


# --------------------------------------------------------------------------- checks


def spare_inputs(
    inputs: Iterable[Any], out: Any, names: Iterable[str] | None = None, *, flag: str = "--out"
) -> None:
    """Refuse (``ValueError``, one line) an output that is, or would overwrite, an input.

    ``inputs``: the files and folders the command reads (a folder stands for its files;
    ``None`` and ``"default"`` are skipped). ``out``: the output file, or with ``names`` the
    output folder and the names of what the command writes into it (``images/x.tif``).
    Called by every command before any work; the api functions check again where they take
    both inputs and outputs (:func:`napari_sagegan.util.files.refuse_overwriting_inputs`).
    """
    if out is None:
        return
    out = Path(out).expanduser()
    files = [i for i in inputs if i is not None and str(i) != "default"]
    if names is None:
        refuse_overwriting_inputs([out], files, what=flag)
    else:
        refuse_overwriting_inputs([out / n for n in names], files, what=flag, folder=out)


def folder_stems(inputs: Iterable[Any]) -> list[str]:
    """The stems of the given files and of the files in the given folders (not recursive):
    every name a command that writes ``<stem>.*`` per input might use."""
    stems: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            with contextlib.suppress(OSError):
                stems += [Path(e.name).stem for e in os.scandir(p) if e.is_file()]
        else:
            stems.append(p.stem)
    return stems


def check_pixel_size(value: float | None, flag: str = "--pixel-size") -> None:
    """Refuse (``ValueError``, one line) a pixel size flag that is not a finite number of nm
    per pixel in :data:`PIXEL_SIZE_RANGE_NM` (``1e-300`` or ``1e300`` would make every length
    and area 0 or infinite)."""
    lo, hi = PIXEL_SIZE_RANGE_NM
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(
            f"{flag} must be a positive number of nm per pixel from {lo:g} to {hi:g}, got "
            f"{value:g}; give it in nm (e.g. 0.5), or leave it out to use the file's"
        )


# --------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt``: the same clean stop
    (staged outputs and temporary files removed, the best model so far kept)."""


class SigtermStop:
    """While installed, SIGTERM (a timeout, a job scheduler) raises :class:`Terminated` in
    the main thread, once; a second SIGTERM during the clean-up is ignored. Outside the
    main thread it does nothing."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._installed = False
        self._previous: Any = signal.SIG_DFL
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._handle)
            self._previous = signal.SIG_DFL if previous is None else previous
            self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        signal.signal(signum, signal.SIG_IGN)
        raise Terminated

    @property
    def why(self) -> str:
        """`` (SIGTERM)`` once it came, else ``""``."""
        return " (SIGTERM)" if self.signal is not None else ""

    def status(self, rc: int, interrupted: int = 130) -> int:
        """``rc``, or :data:`EXIT_TERMINATED` for a command that stopped on SIGTERM by
        itself (it returned ``interrupted``); says so."""
        if self.signal is not None and rc == interrupted:
            print(f"sagegan: interrupted{self.why}", file=sys.stderr)
            return EXIT_TERMINATED
        return rc

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def printable_output() -> None:
    """Let stdout and stderr print any path: characters the terminal cannot encode (a file
    name that is not UTF-8, under a strict UTF-8 locale) come out as backslash escapes."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="backslashreplace")
