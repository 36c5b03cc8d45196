"""What every ``sagegan`` command shares: progress bars, device choice, flags from configs.

Imported by the command modules only (never by :mod:`napari_sagegan.cli` itself at import
time); loads neither torch nor Qt.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Generator
from typing import Any

from napari_sagegan.util.progress import Progress, run_to_end

DEVICES = ["auto", "cpu", "cuda", "mps"]


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
