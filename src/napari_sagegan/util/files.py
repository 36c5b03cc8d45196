"""Atomic files and staged output folders: a crash, an error, Ctrl-C or ``kill -9`` never
leaves a half-written file or a half-replaced output folder behind, and no output ever
overwrites an input.

- :func:`atomic_path` / :func:`atomic_write_text`: one file, written beside its target and
  renamed over it.
- :func:`staged_folder`: a whole output folder, written into a hidden staging folder and
  moved into place at the end, all or nothing: every target is checked before any is
  replaced, and a journal in the staging folder lets the next run finish a move that a
  killed process left half done.
- :func:`new_folder` / :func:`new_file` check an output first;
  :func:`refuse_overwriting_inputs` refuses an output that is one of the inputs.
- :class:`OutputError`: writing failed for want of space or permission (the output named as
  the user gave it); :func:`describe_write_error` says it in one line.

Temporary files (``.NAME.<pid>-<host>-XXXX.tmp``) and staging folders
(``.sagegan-[kind-]<pid>-<host>-XXXX``) carry the id of the process that made them; the next
run writing to the same place removes those of processes that no longer exist
(:func:`clean_stale`), never one of a live process. NumPy-free, torch-free.

About 640 lines, over the house's ~500: the staged move, its journal, the recovery of a killed
move and the clean-up of stale temporaries share the same naming and checks, and a reader
needs to see them together to trust that no output is ever half-replaced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

PathLike = str | os.PathLike

#: errno -> what it means for an output, for the errors that say "write elsewhere".
WRITE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    WRITE_ERRNOS[errno.EDQUOT] = "disk quota exceeded"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: Below this many free bytes, a write that failed without an errno (``torch.save`` raises
#: ``RuntimeError``) is taken as a full disk.
_FULL_BELOW = 8 << 20

JOURNAL = "journal.json"
_JOURNAL_FORMAT = "sagegan-move"
#: Called with the number of entries moved so far during a staged move (tests only: a
#: subprocess kills itself there to check that the next run recovers).
_MOVE_HOOK: Callable[[int], None] | None = None


class OutputError(OSError):
    """Writing an output failed: no space left, a quota, a read-only file system or no
    permission. ``filename`` is the output as the user named it (a file or an output
    folder), ``errno`` the cause; nothing half-written is left behind."""


def describe_write_error(err: OSError, flag: str = "--out") -> str:
    """One line for an :class:`OutputError` (or an ``OSError`` of :data:`WRITE_ERRNOS`):
    what could not be written, why and what to do, e.g. ``cannot write out: no space left
    on device; free space or choose another --out``."""
    reason = WRITE_ERRNOS.get(err.errno or 0) or (err.strerror or type(err).__name__).lower()
    name = os.fsdecode(err.filename) if err.filename is not None else "the output"
    if err.errno in _FULL:
        advice = f"free space or choose another {flag}"
    elif err.errno == errno.EROFS:
        advice = f"choose another {flag} on a writable disk"
    else:
        advice = f"choose another {flag} in a folder you may write to"
    return f"cannot write {name}: {reason}; {advice}"


# --------------------------------------------------------------------------- ownership


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _tag() -> str:
    """``<pid>-<host>``: who made a temporary file or a staging folder."""
    return f"{os.getpid()}-{_host()}"


_STALE_TMP = re.compile(r"^\..*\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[^.]*\.tmp$", re.S)
_STALE_STAGING = re.compile(r"^\.sagegan-(?:[a-z]+-)?(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine may still exist (when unsure: yes)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    try:  # a killed process that nobody reaped yet is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[-1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _stale(name: str, pattern: re.Pattern) -> bool:
    m = pattern.match(name)
    return bool(m) and m["host"] == _host() and not _alive(int(m["pid"]))


_CLEANED: set[str] = set()


def clean_stale(folder: PathLike) -> list[Path]:
    """Remove the temporary files and staging folders that killed runs left in ``folder``.

    Only those made on this machine by a process that no longer exists are touched; a
    staging folder whose move into ``folder`` was interrupted is finished first (see
    :func:`staged_folder`). Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return removed
    for e in entries:
        path = Path(e.path)
        try:
            if _stale(e.name, _STALE_TMP) and not e.is_dir(follow_symlinks=False):
                path.unlink()
                removed.append(path)
            elif _stale(e.name, _STALE_STAGING) and e.is_dir(follow_symlinks=False):
                if _recover(path):
                    removed.append(path)
        except OSError:  # not ours to remove after all (permissions): leave it
            continue
    return removed


def _clean_once(folder: Path) -> None:
    """:func:`clean_stale` the first time this process writes into ``folder``."""
    key = os.path.abspath(folder)
    if key not in _CLEANED:
        _CLEANED.add(key)
        clean_stale(folder)


# --------------------------------------------------------------------------- errors


def _within(name: object, folder: Path) -> bool:
    """Whether an error's file name lies in ``folder`` (no name: an open file's error)."""
    if name is None:
        return True
    try:
        path, top = os.path.abspath(os.fsdecode(name)), os.path.abspath(folder)
    except (TypeError, ValueError):
        return False
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _FULL_BELOW
    except OSError:
        return False


def _as_output_error(
    err: BaseException, target: Path, scratch: Path, *, writing: bool = False
) -> OutputError | None:
    """``err`` as an :class:`OutputError` naming ``target`` when it is a failure to write
    into ``scratch`` (a temporary file or a staging folder) for want of space or
    permission; ``None`` for any other error. ``writing``: the failing code only wrote
    (a ``RuntimeError`` on a full disk is then the disk's)."""
    if isinstance(err, OSError):  # an OutputError too: named inside scratch, renamed here
        if err.errno not in WRITE_ERRNOS or not _within(err.filename, scratch):
            return None
    elif not (writing and isinstance(err, RuntimeError) and _disk_full(scratch.parent)):
        return None  # torch.save says "file write failed" as a RuntimeError
    code = getattr(err, "errno", None) or errno.ENOSPC
    return OutputError(code, os.strerror(code), str(target))


# --------------------------------------------------------------------------- one file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched; a
    failure for want of space or permission is raised as an :class:`OutputError` naming
    ``path``. Stale temporary files of killed runs beside ``path`` are removed first.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name inside it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {parent} does not exist; create it first")
    _clean_once(parent)
    stem = path.name[:80]  # leave room in a 255-byte name
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.{_tag()}-", suffix=".tmp", dir=parent)
    except OSError as err:
        out = _as_output_error(err, path, parent)
        if out is None:
            raise
        raise out from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes files private (0600)
        os.replace(tmp_path, path)
    except BaseException as err:
        out = _as_output_error(err, path, tmp_path, writing=True)
        if out is None:
            raise
        raise out from err
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------- checks


def _why_not_writable(folder: Path) -> str:
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    return "you have no permission to write there"


def _check_folder_writable(folder: Path, what: str, flag: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {what}: {_why_not_writable(folder)} ({folder}); choose another {flag}"
        )


def _read_only(path: Path) -> bool:
    """Whether an existing file is protected against writing (mode or access)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return False  # the link is replaced, not its target
    return not (st.st_mode & 0o222) or not os.access(path, os.W_OK)


def new_file(path: PathLike, *, example: str = "out.txt", flag: str = "--out") -> Path:
    """Check that a file can be written at ``path`` (its folder exists and is writable, an
    existing file there is not read-only); return the Path.

    Raises
    ------
    ValueError
        ``path`` is a folder (the message suggests ``path / example``).
    FileNotFoundError
        Its folder does not exist.
    PermissionError
        The folder cannot be written (read-only disk, permissions) or the file is read-only.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name such as {out / example}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the folder of {out} ({out.parent}) does not exist; create it first"
        )
    _check_folder_writable(parent, str(out), flag)
    if _read_only(out):
        raise PermissionError(
            f"{out} is read-only, so it is not replaced; make it writable or choose another {flag}"
        )
    return out


def new_folder(path: PathLike, *, what: str = "--out", empty: bool = False) -> Path:
    """Check that ``path`` can become an output folder; return it as a ``Path``.

    Stale leftovers of killed runs in it (see :func:`clean_stale`) are removed first.

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
    PermissionError
        It (or the folder that would hold it) cannot be written.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder holding {what} ({parent}) does not exist")
    if out.is_dir():
        clean_stale(out)
        if empty and any(out.iterdir()):
            raise ValueError(
                f"{what} {out} is not empty; give a new or empty folder so nothing is overwritten"
            )
        _check_folder_writable(out, str(out), what)
    else:
        _check_folder_writable(parent, str(out), what)
    return out


def refuse_overwriting_inputs(
    outputs: Iterable[PathLike],
    inputs: Iterable[PathLike | None],
    *,
    what: str = "--out",
    folder: PathLike | None = None,
) -> None:
    """Refuse to write any output that is one of the inputs.

    Parameters
    ----------
    outputs : iterable of path
        Every file the command would write (those inside an output folder: give
        ``folder``).
    inputs : iterable of path or None
        The files the command reads; a folder stands for the files in it (not recursive).
        ``None`` entries are skipped.
    what : str
        The flag that named the outputs, for the message.
    folder : path, optional
        The output folder that ``outputs`` lie in, for the message.

    Raises
    ------
    ValueError
        An output is an input: the same path, or the same file through a link (compared as
        :func:`os.path.samefile` does).
    """
    seen: dict[object, Path] = {}

    def add(p: Path, st: os.stat_result) -> None:
        seen[(st.st_dev, st.st_ino)] = p
        seen[os.path.normcase(os.path.realpath(p))] = p

    for item in inputs:
        if item is None:
            continue
        p = Path(item).expanduser()
        try:
            st = p.stat()
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError), os.scandir(p) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.is_file():
                            add(Path(e.path), e.stat())
        else:
            add(p, st)
    if not seen:
        return
    for item in outputs:
        o = Path(item).expanduser()
        try:
            st = o.stat()
        except (OSError, ValueError):
            continue  # an output that does not exist yet overwrites nothing
        src = seen.get((st.st_dev, st.st_ino)) or seen.get(os.path.normcase(os.path.realpath(o)))
        if src is None or st.st_ino == 0 and stat.S_ISDIR(st.st_mode):
            continue
        if folder is not None:
            raise ValueError(
                f"{what} {Path(folder).expanduser()} would overwrite the input {src} (it "
                f"writes {o.name} there); choose another folder for {what}"
            )
        same = "is" if o == src else "is the same file as"
        raise ValueError(
            f"{what} {o} {same} the input {src}: writing it would destroy the input; "
            f"choose another {what}"
        )


# --------------------------------------------------------------------------- folders


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_journal(staging: Path, target: Path, names: list[str]) -> None:
    """Write-ahead record of a move: which entries go from ``staging/new`` into ``target``
    (named relative to the staging folder's parent: ``"."`` when it lies inside it)."""
    where = "." if staging.parent == target else target.name
    record = {"format": _JOURNAL_FORMAT, "version": 1, "pid": os.getpid(), "target": where,
              "entries": names}  # fmt: skip
    tmp = staging / (JOURNAL + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
        json.dump(record, fh, ensure_ascii=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, staging / JOURNAL)
    _fsync_dir(staging)


def _read_journal(staging: Path) -> tuple[Path, list[str]] | None:
    """The target and the entries of a journal (``None``: none, or not one of ours)."""
    try:
        record = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _JOURNAL_FORMAT:
        return None
    names, where = record.get("entries"), record.get("target", ".")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    if not isinstance(where, str) or not _plain_name(where, dot=True):
        return None
    target = staging.parent if where == "." else staging.parent / where
    return target, [n for n in names if _plain_name(n)]


def _plain_name(name: str, *, dot: bool = False) -> bool:
    """A single path component (a journal never sends a file outside its folder)."""
    if dot and name == ".":
        return True
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def _move_in(staging: Path, target: Path, name: str) -> None:
    """Move ``staging/new/name`` to ``target/name``, the old one (if any) to
    ``staging/old/name``. Safe to call again on a half-done move (the recovery)."""
    src, dst, bak = staging / "new" / name, target / name, staging / "old" / name
    if not _lexists(src):
        return  # moved already
    if _lexists(dst) and not _lexists(bak):
        os.replace(dst, bak)
    os.replace(src, dst)


def _move_back(staging: Path, target: Path, name: str) -> None:
    """Undo :func:`_move_in` for ``name`` (whatever part of it was done)."""
    src, dst, bak = staging / "new" / name, target / name, staging / "old" / name
    if not _lexists(src) and _lexists(dst):
        os.replace(dst, src)  # the new entry was moved in: take it out again
    if _lexists(bak):
        os.replace(bak, dst)


def _recover(staging: Path) -> bool:
    """Finish the move of a staging folder left by a killed run inside its target (or roll
    it back if it cannot be finished), then remove it. ``False`` when it had to be left."""
    journal = _read_journal(staging)
    if journal is not None:
        target, names = journal
        try:
            for name in names:
                _move_in(staging, target, name)
        except OSError as err:
            try:
                for name in reversed(names):
                    _move_back(staging, target, name)
            except OSError:
                warnings.warn(
                    f"{target}: could not finish nor undo the move that a killed run left in "
                    f"{staging.name} ({err}); its old files are kept in {staging / 'old'}",
                    stacklevel=3,
                )
                return False
    (staging / JOURNAL).unlink(missing_ok=True)  # no journal: the target is consistent
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _check_targets(new: Path, target: Path) -> list[str]:
    """The entries to move, once every target is known to be replaceable."""
    _check_folder_writable(target, str(target), "--out")
    names = sorted(e.name for e in os.scandir(new))
    for name in names:
        src, dst = new / name, target / name
        if not _lexists(dst):
            continue
        if dst.is_dir() and not dst.is_symlink() and not src.is_dir():
            raise IsADirectoryError(
                f"cannot replace {dst}: it is a folder where the file {name} goes; move it "
                "away or choose another --out (nothing was replaced)"
            )
        if src.is_dir() and not dst.is_dir():
            raise NotADirectoryError(
                f"cannot replace {dst}: it is a file where the folder {name} goes; move it "
                "away or choose another --out (nothing was replaced)"
            )
        if _read_only(dst):
            raise PermissionError(
                f"cannot replace {dst}: it is read-only; make it writable or choose another "
                "--out (nothing was replaced)"
            )
    return names


def _commit(staging: Path, target: Path) -> None:
    """Move ``staging/new`` into ``target``, all or nothing."""
    new = staging / "new"
    if not target.exists():
        os.rename(new, target)  # one rename: the whole folder appears at once
        return
    names = _check_targets(new, target)
    if not names:
        return
    try:
        _write_journal(staging, target, names)  # from here on, a killed run is finished
        (staging / "old").mkdir(exist_ok=True)  # by the next one
        for i, name in enumerate(names, 1):
            _move_in(staging, target, name)
            if _MOVE_HOOK is not None:
                _MOVE_HOOK(i)
    except BaseException:
        for name in reversed(names):
            _move_back(staging, target, name)
        (staging / JOURNAL).unlink(missing_ok=True)  # undone: the target is as it was
        raise
    (staging / JOURNAL).unlink()  # done: the backups may go
    _fsync_dir(target)


@contextlib.contextmanager
def staged_folder(target: PathLike, *, prefix: str = ".sagegan-") -> Iterator[Path]:
    """Yield a hidden folder to write a command's outputs into; move them into ``target``
    on success, all or nothing.

    A new ``target`` appears at the end in one rename. Into an existing ``target``, each
    top-level entry replaces the entry of the same name (a folder replaces a folder as a
    whole); every target is checked first (the folder writable, no folder where a file goes,
    no read-only file), so either all are replaced or none. The move is journalled: a run
    killed during it (``kill -9``, power loss) leaves its staging folder inside ``target``,
    and the next run into ``target`` finishes the move before it starts. On an error or
    Ctrl-C nothing reaches ``target`` (a move begun is undone); the staging folder is
    removed, unless undoing a move failed too: it then stays for the next run to finish.

    Parameters
    ----------
    target : str or PathLike
        The output folder; the folder holding it must exist.
    prefix : str
        Name prefix of the staging folder (``.sagegan-`` or ``.sagegan-KIND-``); the process
        id and a machine tag follow it.

    Raises
    ------
    FileNotFoundError
        The folder holding ``target`` does not exist.
    ValueError
        ``target`` is a file.
    IsADirectoryError, NotADirectoryError, PermissionError
        An entry of ``target`` cannot be replaced (nothing was).
    OutputError
        Writing failed for want of space or permission (nothing was written).
    """
    if not _STALE_STAGING.match(f"{prefix}1-00000000-"):
        raise ValueError(
            f"staging prefix {prefix!r} must look like '.sagegan-' or '.sagegan-kind-'"
        )
    target = Path(target).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder holding {target} ({parent}) does not exist")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    clean_stale(parent)
    if target.is_dir():
        clean_stale(target)
    where = target if target.is_dir() else parent  # inside: the same disk as its entries
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{_tag()}-", dir=where))
    except OSError as err:
        out = _as_output_error(err, target, where)
        if out is None:
            raise
        raise out from err
    try:
        (staging / "new").mkdir()
        yield staging / "new"
        _commit(staging, target)
    except BaseException as err:
        out = _as_output_error(err, target, staging)
        if out is None:
            raise
        raise out from err
    finally:
        if not (staging / JOURNAL).exists():  # a failed undo keeps it for the next run
            shutil.rmtree(staging, ignore_errors=True)
