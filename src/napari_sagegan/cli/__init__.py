"""The ``sagegan`` command: one module per sub-command, each parsing its flags into one
:mod:`napari_sagegan.api` call.

- ``train`` (:mod:`~napari_sagegan.cli.train`) -> :func:`napari_sagegan.api.fine_tune`
- ``segment`` (:mod:`~napari_sagegan.cli.segment`) -> :func:`napari_sagegan.api.segment`
- ``evaluate`` (:mod:`~napari_sagegan.cli.evaluate`) -> :func:`napari_sagegan.api.evaluate`
- ``measure`` (:mod:`~napari_sagegan.cli.measure`) -> :func:`napari_sagegan.api.measure`
- ``augment`` (:mod:`~napari_sagegan.cli.augment`) -> :func:`napari_sagegan.api.augment`
- ``generate`` (:mod:`~napari_sagegan.cli.generate`) -> :func:`napari_sagegan.api.generate`

A new command is one module with ``add_parser(sub)`` and ``run(args)``, listed in
:data:`COMMANDS`. Bad input exits with status 2 and a one-line reason (no traceback) and
leaves no partial output; an interrupted run (Ctrl-C) exits with status 130. ``sagegan
--help`` loads neither torch nor Qt.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
#: The sub-command modules, in the order ``sagegan --help`` lists them.
COMMANDS = ("train", "segment", "evaluate", "measure", "augment", "generate")


def build_parser() -> argparse.ArgumentParser:
    """The ``sagegan`` argument parser, with every sub-command."""
    from napari_sagegan import __version__

    p = argparse.ArgumentParser(
        prog="sagegan",
        description="Segment nanoparticles in electron micrographs (SAGE-GAN Attention U-Net).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"napari_sagegan.cli.{name}").add_parser(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"sagegan: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sagegan`` with ``argv`` (default: the command line); returns the exit status."""
    import warnings

    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sagegan: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sagegan: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print(
            "sagegan: error: out of memory; try a smaller --tile-size or --batch-size",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
