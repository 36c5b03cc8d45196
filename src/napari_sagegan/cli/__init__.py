"""The ``sagegan`` command: one module per sub-command, each parsing its flags into one
:mod:`napari_sagegan.api` call.

- ``train`` (:mod:`~napari_sagegan.cli.train`) -> :func:`napari_sagegan.api.fine_tune`
- ``segment`` (:mod:`~napari_sagegan.cli.segment`) -> :func:`napari_sagegan.api.segment`
- ``evaluate`` (:mod:`~napari_sagegan.cli.evaluate`) -> :func:`napari_sagegan.api.evaluate`
- ``measure`` (:mod:`~napari_sagegan.cli.measure`) -> :func:`napari_sagegan.api.measure`
- ``augment`` (:mod:`~napari_sagegan.cli.augment`) -> :func:`napari_sagegan.api.augment`
- ``generate`` (:mod:`~napari_sagegan.cli.generate`) -> :func:`napari_sagegan.api.generate`
- ``export`` (:mod:`~napari_sagegan.cli.export`) -> :func:`napari_sagegan.api.export_model`

A new command is one module with ``add_parser(sub)`` and ``run(args)``, listed in
:data:`COMMANDS`. Bad input exits with status 2 and a one-line reason (no traceback) and
leaves no partial output; an interrupted run (Ctrl-C) exits with status 130, one stopped
by SIGTERM the same way with status 143. A full or read-only disk is one line too (status
2), and no output ever overwrites an input. ``sagegan --help`` loads neither torch nor Qt.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
#: The sub-command modules, in the order ``sagegan --help`` lists them.
COMMANDS = ("train", "segment", "evaluate", "measure", "augment", "generate", "export")


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

    from napari_sagegan.cli._common import EXIT_TERMINATED, SigtermStop, printable_output
    from napari_sagegan.util.files import OutputError, describe_write_error

    printable_output()  # a file name that is not UTF-8 never crashes a message
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    stop = SigtermStop()  # SIGTERM: the same clean stop as Ctrl-C
    try:
        return stop.status(int(args.func(args) or 0), EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print(f"sagegan: interrupted{stop.why}", file=sys.stderr)
        return EXIT_TERMINATED if stop.signal is not None else EXIT_INTERRUPTED
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
    except OSError as err:  # a full disk, a quota, a read-only disk: write elsewhere
        if not isinstance(err, OutputError) and err.errno not in _FULL_OR_READ_ONLY:
            raise
        flag = "--json" if args.command == "evaluate" else "--out"
        if not isinstance(err, OutputError) and getattr(args, flag[2:], None):
            err.filename = getattr(args, flag[2:])
        print(f"sagegan: error: {describe_write_error(err, flag)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print(f"sagegan: error: out of memory; {_memory_hint(args.command)}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # torch's allocators: "can't allocate memory", "out of memory"
        if not _out_of_memory(err):
            raise
        print(f"sagegan: error: out of memory; {_memory_hint(args.command)}", file=sys.stderr)
        return 1
    finally:
        stop.restore()


#: What to try after running out of memory, with the flags of each command.
_MEMORY_HINTS = {
    "train": "try a smaller --patch-size or --batch-size",
    "augment": "try a smaller --patch-size, --batch-size or --gen-channels",
    "segment": "try a smaller --tile-size or --batch-size",
    "generate": "try a smaller --size",
    "evaluate": "the label images are too large for this machine",
    "measure": "the label images are too large for this machine",
    "export": "the model is too large for this machine",
}


def _memory_hint(command: str) -> str:
    return _MEMORY_HINTS.get(command, "try smaller inputs")


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is torch running out of memory (CPU or GPU allocators)."""
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
