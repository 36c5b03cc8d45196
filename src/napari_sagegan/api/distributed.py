"""Segment a batch of micrograph files on a dask.distributed cluster:
:func:`segment_distributed`, the same outputs as :func:`~napari_sagegan.api.segment`'s.

The model goes to each worker once, as a worker plugin that holds its checkpoint's bytes (the
scheduler keeps it, so a worker that joins later or is restarted after a crash gets it too);
each worker builds one Segmenter per process from it. Only file paths travel: every image is
read, segmented and written *on a worker* (the workers and this machine share the output
folder, as on any cluster file system), by the same functions as a local run
(:mod:`napari_sagegan.api.segment`). Per image, ``<stem>.tif`` (with ``csv`` ``<stem>.csv``
and ``<stem>.summary.json``) is written into a staging folder inside ``out`` and moved into
place (:func:`napari_sagegan.util.files.staged_folder`); this machine then rewrites
``segment_report.json`` atomically, which lists every finished image in input order, the
run's settings and the images that failed. An image is *finished* once the report lists it
and its files are there, so a re-run with the same settings skips it (resume after a crash
or a lost worker) and redoes the others; a re-run with other settings is refused.

``dask.distributed`` is imported only when a run starts (``pip install
'napari-sagegan[distributed]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from napari_sagegan.api.segment import (
    REPORT_FORMAT,
    REPORT_NAME,
    Micrograph,
    Segmented,
    _check_diameters,
    _check_outputs,
    _micrographs,
    _named,
    _plane_config,
    _read,
    _segmented,
    _write_segmented,
    output_names,
    particle_diameter,
    write_report,
)
from napari_sagegan.io.pixel_size import PixelSize, resolve_pixel_size
from napari_sagegan.util.progress import EtaClock, Progress, run_to_end

PathLike = str | os.PathLike
#: The version of the ``settings`` entry of a distributed run's ``segment_report.json``.
SETTINGS_VERSION = 1
#: How often a task is tried again after an unexpected error (its worker lost, a flaky
#: file system); a lost worker's tasks are also moved to another worker by the scheduler.
RETRIES = 2
_INSTALL = "pip install 'napari-sagegan[distributed]'"


def require_distributed() -> Any:
    """The ``distributed`` module; an ``ImportError`` naming the extra to install."""
    try:
        import distributed
    except ImportError as err:
        raise ImportError(
            f"segmenting on a dask cluster needs dask.distributed, which is not installed: "
            f"{_INSTALL}"
        ) from err
    return distributed


# --------------------------------------------------------------------------- the workers


def _plugin_class() -> type:
    """The worker plugin class that carries the model (made on first use: it subclasses
    ``distributed.WorkerPlugin``, which this module does not import at its top)."""
    cls = globals().get("ModelPlugin")
    if cls is not None:
        return cls
    from distributed import WorkerPlugin

    class ModelPlugin(WorkerPlugin):
        """A segmenter checkpoint's bytes, sent once to every worker (and to the workers that
        join later); :meth:`segmenter` builds the Segmenter once per worker process."""

        def __init__(self, payload: bytes, device: str, threads: int) -> None:
            self.payload, self.device, self.threads = payload, device, threads
            self._built: Any = None
            self._lock = threading.Lock()

        def __getstate__(self) -> dict[str, Any]:
            return {"payload": self.payload, "device": self.device, "threads": self.threads}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__init__(state["payload"], state["device"], state["threads"])

        def segmenter(self) -> Any:
            with self._lock:
                if self._built is None:
                    self._built = _build_segmenter(self.payload, self.device, self.threads)
                return self._built

        def teardown(self, worker: Any) -> None:
            self._built = None

    ModelPlugin.__module__, ModelPlugin.__qualname__ = __name__, "ModelPlugin"
    globals()["ModelPlugin"] = ModelPlugin
    return ModelPlugin


def __getattr__(name: str) -> Any:  # a worker unpickling the plugin makes its class here
    if name == "ModelPlugin":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_segmenter(payload: bytes, device: str, threads: int) -> Any:
    """The Segmenter of a checkpoint's bytes (loaded with ``weights_only=True``); torch set to
    ``threads`` threads in this process."""
    import torch

    from napari_sagegan.engine.checkpoint import Checkpoint
    from napari_sagegan.engine.infer.segment import Segmenter

    torch.set_num_threads(threads)
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    ckpt = Checkpoint.load(state, kind="segmenter")
    return Segmenter(ckpt.build(), device=device, checkpoint=ckpt)


def segment_file(
    seg: Any,
    path: PathLike,
    out: PathLike,
    *,
    diameter: float | None = None,
    diameter_nm: float | None = None,
    pixel_size: float | None = None,
    infer: dict[str, Any] | None = None,
    csv: bool = False,
    channel: int | None = None,
) -> Segmented:
    """Segment one image file with ``seg`` as :func:`~napari_sagegan.api.segment` does, and
    write its files into ``out`` (staged, then moved into place); return its
    :class:`Segmented` without the labels and maps (small enough to send back).

    This is what a worker runs per image; it is also usable without dask.
    """
    import dataclasses

    from napari_sagegan.util.files import staged_folder

    (m,) = _micrographs([path], pixel_size, channel)
    _check_diameters([m], diameter, diameter_nm)
    config = seg.default_infer_config(**(infer or {}))
    data = _read(m, channel)
    cfg = _plane_config(config, m, diameter, diameter_nm)
    with _named(m.name):
        info, _ = seg.plan(data, cfg)
        res = run_to_end(seg.segment(data, cfg, scale=info))
    result = _segmented(m, res, cfg, data)
    with staged_folder(out, prefix=".sagegan-image-") as staging:
        _write_segmented(staging, result, data, csv)
    result.labels = None
    result.extra = dataclasses.replace(res, labels=None, prob=None, dist=None, attention=None)
    return result


#: Errors of the image itself (unreadable, wrong shape, no finite pixel...): reported at
#: once; any other error is tried again (:data:`RETRIES`).
_IMAGE_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _task(path: str, out: str, plugin: str, options: dict[str, Any]) -> tuple[str, Any]:
    """One image on a worker: ``("done", Segmented)`` or ``("failed", reason)``."""
    from distributed import get_worker

    seg = get_worker().plugins[plugin].segmenter()
    try:
        return "done", segment_file(seg, path, out, **options)
    except _IMAGE_ERRORS as err:
        return "failed", _reason(err)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# --------------------------------------------------------------------------- this machine


def _model_payload(model: Any) -> tuple[bytes, str]:
    """The checkpoint's bytes (checked here first) and their SHA-256."""
    from napari_sagegan.engine.checkpoint import Checkpoint, resolve_model_path

    if isinstance(model, Checkpoint):
        import torch

        buf = io.BytesIO()
        torch.save(model.check_finite().to_dict(), buf)
        data = buf.getvalue()
    elif isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(model)
        data = path.read_bytes()
        Checkpoint.load(path, kind="segmenter")  # a damaged file refused here, not per image
    else:
        raise ValueError(
            f"the model must be a checkpoint file, 'default' or a Checkpoint, got "
            f"{type(model).__name__}; a Segmenter in memory cannot be sent to the workers"
        )
    return data, hashlib.sha256(data).hexdigest()


def _files(images: Any) -> list[Micrograph]:
    """Files and folders as Micrographs (not read: the workers read them)."""
    from napari_sagegan.io.em import EM_SUFFIXES
    from napari_sagegan.io.images import IMAGE_SUFFIXES, list_images

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    paths = []
    for item in images:
        if isinstance(item, Micrograph) and item.path is not None and item.data is None:
            item = item.path
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(
                "segment_distributed takes image files or folders (the workers read them), "
                f"got {type(item).__name__}; segment arrays with api.segment"
            )
        paths.append(item)
    files = list_images(paths, IMAGE_SUFFIXES + EM_SUFFIXES)
    if not files:
        raise ValueError("there is no image to segment: give image files or folders")
    return [Micrograph(f.name, None, PixelSize(None), f) for f in files]


def _settings(
    digest: str, device: str, diameter: Any, diameter_nm: Any, pixel_size: Any,
    infer: dict[str, Any] | None, csv: bool, channel: int | None,
) -> dict[str, Any]:  # fmt: skip
    """What decides a run's outputs, as recorded in its report (JSON values)."""
    if isinstance(pixel_size, PixelSize):
        pixel_size = pixel_size.nm
    return {
        "version": SETTINGS_VERSION,
        "model_sha256": digest,
        "device": device,
        "diameter": diameter,
        "diameter_nm": diameter_nm,
        "pixel_size": pixel_size,
        "infer": {k: v for k, v in sorted((infer or {}).items()) if v is not None},
        "csv": bool(csv),
        "channel": channel,
    }


def _finished(out: Path, settings: dict[str, Any], csv: bool) -> tuple[dict[str, Any], str]:
    """The report entries of the images already finished in ``out`` (by file name; their
    files all there), and a note on the report found (``""``: none or resumable).

    Raises
    ------
    ValueError
        ``out`` holds a distributed run's results made with other settings.
    """
    try:
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, ""
    except (OSError, ValueError):
        return {}, f"{out / REPORT_NAME} is unreadable: every image is segmented again"
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        return {}, f"{out / REPORT_NAME} is not a segment report: every image is segmented again"
    old = report.get("settings")
    if not isinstance(old, dict):
        return {}, f"{out / REPORT_NAME} has no settings (a local run): every image is segmented"
    if old != settings:
        changed = [
            f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in settings.items() if old.get(k) != v
        ]
        raise ValueError(
            f"{out} holds the results of a run with other settings ({'; '.join(changed)}); "
            "resuming would mix them: choose another --out, or delete "
            f"{out / REPORT_NAME} to segment every image again"
        )
    done = {}
    for entry in report.get("images") or []:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        files = [out / n for n in output_names([Path(name).stem], csv) if n != REPORT_NAME]
        if all(f.is_file() and f.stat().st_size > 0 for f in files):
            done[name] = entry
    return done, ""


@contextlib.contextmanager
def _client(
    distributed: Any,
    scheduler: Any,
    workers: int | None,
    threads: int,
    env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """A Client of ``scheduler`` (an address or a Client), or of a LocalCluster of
    ``workers`` processes (their environment ``env``); closed at the end when made here."""
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    cluster = None
    if scheduler is None:
        import dask

        n = workers or max(1, (os.cpu_count() or 1) // threads)
        # One image at a time per worker process, with `threads` torch threads. dask starts
        # its workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive
        # mmap threshold: every large temporary array is then mapped and zeroed afresh, and
        # images took 1.3-1.9x as long (benchmarks/bench_distributed.py --trimmed); unset here.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                env=env or {},
            )  # fmt: skip
        client = distributed.Client(cluster)
    else:
        try:
            client = distributed.Client(str(scheduler))
        except (OSError, TimeoutError) as err:
            raise ValueError(
                f"cannot reach the dask scheduler at {scheduler} ({_reason(err)}); check the "
                "address that `dask scheduler` printed and that it is still running"
            ) from err
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _describe(client: Any, scheduler: Any) -> str:
    """Where the images go, e.g. ``2 local worker process(es)``."""
    n = len(client.nthreads())
    if scheduler is None:
        return f"{n} local worker process(es)"
    now = f"{n} worker(s) now" if n else "no worker yet: the images wait for one"
    return f"the cluster at {client.scheduler.address} ({now})"


def _outcomes(
    distributed: Any, client: Any, todo: list[tuple[int, Micrograph]], out: Path,
    payload: bytes, digest: str, device: str, threads: int,
    options: dict[str, Any], retries: int,
) -> Generator[tuple[int, Micrograph, str, Any], None, None]:  # fmt: skip
    """Send the model once and one task per image; yield ``(index, micrograph, "done",
    Segmented)`` or ``(..., "failed", reason)`` as they finish. Closing it cancels the
    tasks left."""
    # one plugin per run: the end of another run on the same cluster never removes ours
    name = f"sagegan-model-{digest[:12]}-{os.urandom(4).hex()}"
    plugin = _plugin_class()(payload, device, threads)
    register = getattr(client, "register_plugin", None) or client.register_worker_plugin
    register(plugin, name=name)
    futures = client.map(
        _task, [str(m.path) for _, m in todo], out=str(out), plugin=name, options=options,
        retries=retries, pure=False,
        key=[f"sagegan-segment-{m.name}-{os.urandom(4).hex()}" for _, m in todo],
    )  # fmt: skip
    index = {f.key: item for f, item in zip(futures, todo)}
    try:
        for fut in distributed.as_completed(futures):
            i, m = index[fut.key]
            if fut.status == "finished":
                status, value = fut.result()
            elif fut.status == "error":
                status, value = "failed", _reason(fut.exception())
            else:
                status, value = "failed", f"its task was {fut.status}"
            yield i, m, status, value
    finally:
        client.cancel(futures)
        with contextlib.suppress(Exception):  # the cluster may be gone already
            client.unregister_worker_plugin(name)


def segment_distributed(
    images: Any,
    *,
    out: PathLike,
    scheduler: Any = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    model: Any = "default",
    device: str = "auto",
    diameter: float | None = None,
    diameter_nm: float | None = None,
    pixel_size: float | PixelSize | None = None,
    infer: dict[str, Any] | None = None,
    csv: bool = False,
    channel: int | None = None,
    retries: int = RETRIES,
) -> Generator[Progress, None, list[dict[str, Any]]]:
    """Segment image files on a dask.distributed cluster into ``out``, as
    :func:`~napari_sagegan.api.segment` with ``out=`` does; resumable.

    Parameters
    ----------
    images : path or sequence of paths
        Image files or folders of them (read on the workers: every worker must see them at
        the same paths, and ``out`` too).
    out : path
        The output folder: ``<stem>.tif``, with ``csv`` ``<stem>.csv`` +
        ``<stem>.summary.json``, and ``segment_report.json`` (the local run's entries per
        image, plus ``settings`` and ``errors``: ``{"file", "error"}`` per failed image).
    scheduler : str or distributed.Client, optional
        The address of a running scheduler (``tcp://host:8786``) or a Client; by default a
        LocalCluster of ``workers`` processes is started on this machine (and closed at the
        end).
    workers : int, optional
        Worker processes of the LocalCluster (default: the cores / ``threads_per_worker``).
    threads_per_worker : int, optional
        torch threads per image (default 1). A LocalCluster's workers segment one image at
        a time each; a ``scheduler``'s workers as many at once as their dask threads
        (``dask worker --nthreads``): give those ``--nthreads 1`` and this the cores of a
        worker, or ``--nthreads`` the cores and this 1.
    model, device, diameter, diameter_nm, pixel_size, infer, csv, channel
        As for :func:`~napari_sagegan.api.segment` (``model``: a file, ``"default"`` or a
        Checkpoint).
    retries : int
        Tries after an unexpected failure of an image's task (a lost worker's tasks are
        moved to another worker by the scheduler as well).

    Yields
    ------
    Progress
        ``prepare`` (``data``: ``skipped``, ``n_images``), then per image ``image`` (its
        :class:`Segmented` without labels in ``data["result"]``) or ``failed``
        (``data["error"]``), ``step`` / ``total`` over the images to do, with an ETA.

    Returns
    -------
    list of dict
        Per input, in order: its report entry with ``status`` ``"segmented"`` or
        ``"skipped"`` (finished by an earlier run), or ``{"file", "status": "failed",
        "error"}``.

    Raises
    ------
    ImportError
        dask.distributed is not installed.
    ValueError
        Bad input (as for ``segment``), or ``out`` holds a run made with other settings.
    """
    from napari_sagegan.io.layout import check_channel

    distributed = require_distributed()
    if scheduler is not None and workers is not None:
        raise ValueError("give either a scheduler (--scheduler) or a number of workers (--workers)")
    for what, value in (("workers", workers), ("threads per worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not int(value) == value or value < 1):
            raise ValueError(f"the number of {what} must be a whole number >= 1, got {value!r}")
    threads_per_worker = int(threads_per_worker or 1)
    channel = check_channel(channel)
    items = _files(images)
    out = _check_outputs(items, out, model, csv)
    particle_diameter(diameter, diameter_nm, PixelSize(1.0), "")  # refuse bad values first
    if pixel_size is not None:
        pixel_size = resolve_pixel_size(PixelSize(None), None, override=pixel_size).nm
    payload, digest = _model_payload(model)
    settings = _settings(digest, device, diameter, diameter_nm, pixel_size, infer, csv, channel)
    entries, note = _finished(out, settings, csv)
    out.mkdir(exist_ok=True)  # checked: the workers stage their files inside it
    entries = {m.name: entries[m.name] for m in items if m.name in entries}
    skipped = set(entries)
    errors: dict[str, str] = {}
    todo = [(i, m) for i, m in enumerate(items) if m.name not in skipped]

    def save() -> None:
        write_report(
            out, model, [entries[m.name] for m in items if m.name in entries],
            settings=settings,
            errors=[{"file": m.name, "error": errors[m.name]} for m in items if m.name in errors],
        )  # fmt: skip

    n, k = len(items), len(skipped)
    lines = [note] if note else []
    if k:
        lines.append(f"{k} of {n} image(s) already segmented in {out}: skipped")
    save()
    data = {"skipped": k, "n_images": n, "note": note}
    if not todo:
        yield Progress("prepare", 0, 0, message="; ".join([*lines, "nothing to do"]), data=data)
    else:
        options = {"diameter": diameter, "diameter_nm": diameter_nm, "pixel_size": pixel_size,
                   "infer": dict(infer or {}), "csv": csv, "channel": channel}  # fmt: skip
        with _client(distributed, scheduler, workers, threads_per_worker) as client:
            lines.append(f"segmenting {len(todo)} image(s) on {_describe(client, scheduler)}")
            yield Progress("prepare", 0, len(todo), message="; ".join(lines), data=data)
            clock = EtaClock(len(todo))
            outcomes = _outcomes(
                distributed, client, todo, out, payload, digest, device, threads_per_worker,
                options, retries,
            )  # fmt: skip
            with contextlib.closing(outcomes):
                for done, (i, m, status, value) in enumerate(outcomes, 1):
                    ev = {"file": m.name, "index": i, "n_images": n, "skipped": k}
                    if status == "done":
                        entries[m.name] = value.report()
                        ev["result"], message = value, f"{m.name}: {value.n_particles} particles"
                    else:
                        errors[m.name] = ev["error"] = value
                        message = f"{m.name}: {value}"
                    save()
                    stage = "image" if status == "done" else "failed"
                    yield Progress(stage, done, len(todo), clock.eta(done), message, ev)
    results: list[dict[str, Any]] = []
    for m in items:
        if m.name in errors:
            results.append({"file": m.name, "status": "failed", "error": errors[m.name]})
        elif m.name in entries:
            status = "skipped" if m.name in skipped else "segmented"
            results.append({**entries[m.name], "status": status})
    return results
