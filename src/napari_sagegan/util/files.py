"""Atomic files and staged output folders: a crash, an error or Ctrl-C never leaves a
half-written file or a half-filled output folder behind.

- :func:`atomic_path` / :func:`atomic_write_text`: one file, written beside its target and
  renamed over it.
- :func:`staged_folder`: a whole output folder, written into a hidden folder beside it and
  moved into place at the end; :func:`new_folder` / :func:`new_file` check an output
  first.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name inside it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes files private (0600)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def new_file(path: str | os.PathLike, *, example: str = "out.txt") -> Path:
    """Check that a file can be written at ``path`` (its folder exists); return the Path.

    Raises
    ------
    ValueError
        ``path`` is a folder (the message suggests ``path / example``).
    FileNotFoundError
        Its folder does not exist.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name such as {out / example}")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise FileNotFoundError(
            f"the folder of {out} ({out.parent}) does not exist; create it first"
        )
    return out


def new_folder(path: str | os.PathLike, *, what: str = "--out", empty: bool = False) -> Path:
    """Check that ``path`` can become an output folder; return it as a ``Path``.

    Parameters
    ----------
    path : str or PathLike
        The folder to write (it may exist).
    what : str
        How the folder is named in error messages (a flag such as ``--out``).
    empty : bool
        Refuse an existing folder that is not empty (nothing is ever overwritten).

    Raises
    ------
    ValueError
        ``path`` is a file, or (``empty``) a folder that is not empty.
    FileNotFoundError
        The folder that would hold it does not exist.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} exists and is not a folder")
    if empty and out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"{what} {out} is not empty; give a new or empty folder so nothing is overwritten"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder holding {what} ({parent}) does not exist")
    return out


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, prefix: str = ".sagegan-") -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``target``; move its contents there on success.

    Everything a command writes goes into the staging folder; when the block ends without
    an error, each top-level entry is renamed into ``target`` (created if needed, existing
    entries of the same name replaced). On an error or Ctrl-C nothing reaches ``target``.
    The staging folder is removed in every case.

    Parameters
    ----------
    target : str or PathLike
        The output folder; the folder holding it must exist.
    prefix : str
        Name prefix of the staging folder (hidden: starts with a dot).

    Raises
    ------
    FileNotFoundError
        The folder holding ``target`` does not exist.
    """
    import shutil

    target = Path(target).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder holding {target} ({parent}) does not exist")
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield staging
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(staging.iterdir()):
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
