"""The work the docks run in a worker thread: :mod:`napari_sagegan.api` calls, adapted to layers.

Each job is a progress generator over an api function: it takes what the dock read from the
layers on the main thread (:class:`~napari_sagegan.napari.layers.ImageInput`,
:class:`~napari_sagegan.napari.layers.TrainingPair`, a
:class:`~napari_sagegan.napari.state.ModelEntry`), loads the model inside the worker, limits
torch's threads while a viewer is open (:func:`~napari_sagegan.engine.device.torch_threads`),
and turns the api's results into what the docks add to the viewer. No Qt, no napari.

- :func:`segment_layers`: :func:`napari_sagegan.api.segment`, one
  :class:`~napari_sagegan.napari.layers.LayerResult` per image as soon as it is done.
- :func:`segment_folder`: :func:`napari_sagegan.api.segment` over a folder of files, written
  as ``sagegan segment --csv`` writes them; an image that fails is reported and skipped
  (:class:`FolderReport`).
- :func:`estimate_size`: :func:`napari_sagegan.api.estimate_size`, the particle size of one
  image layer before segmenting it (and a scale bar's pixel-size proposal).
- :class:`FineTune`: :func:`napari_sagegan.api.fine_tune`; Cancel keeps the best model so
  far (:meth:`FineTune.result`).
- :class:`Augment`: :func:`napari_sagegan.api.augment` (phase 2), the same way.
- :func:`generate_pairs`: :func:`napari_sagegan.api.generate`; :func:`generate_layers`
  turns the pairs into layer data in the worker; :func:`suggest_layout` picks the layout
  that suits the training masks.
- :func:`export_plan` / :func:`export_layers`: every Labels layer to a Fiji-ready TIFF, plus
  one particle CSV (no api capability covers this: it is the viewer's "export all").
- :func:`warm_up`: the imports a worker would otherwise make (they stall the GUI).

About 840 lines, over the house's ~500: it is the one Qt-free place where every dock's work
meets the api (segmenting layers and folders, fine-tuning, phase 2, generating, exporting),
each a short generator; a later split by dock (jobs/segment.py, jobs/train.py, ...) is the
obvious next step.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.napari.layers import (
    ADVICE_OPEN,
    ImageInput,
    LayerData,
    LayerResult,
    TrainingPair,
    display_labels,
    labels_digest,
    synthetic_layer_data,
)
from napari_sagegan.napari.state import ModelEntry
from napari_sagegan.util.progress import Progress, relay

#: What to do when fine-tuning has no pair (completes the error).
ADVICE_RETRAIN = (
    "correct a Labels layer made by Segment (paint, erase, fill), tick it in the list, or "
    "choose a folder of image/mask pairs"
)
#: What to do when phase 2 has no pair.
ADVICE_AUGMENT = "tick (image, labels) layers or choose a folder of image/mask pairs"


def _threads(n: int | None):
    from napari_sagegan.engine.device import torch_threads

    return torch_threads(n)


def warm_up(training: bool = False) -> None:
    """Import what the engine would otherwise import lazily inside a worker thread.

    Python holds the import lock and, in parts, the GIL while it imports: a worker that
    imports scikit-image submodules, or runs its first optimiser step (torch imports its
    compiler stack then, about 2 s), stalls the GUI. The docks call this when they open,
    so that cost is paid once, while the dock appears, not in the middle of a run.
    """
    import importlib

    for name in (
        "pandas",
        "scipy.ndimage",
        "skimage.measure",
        "skimage.segmentation",
        "skimage.morphology",
        "torch.nn.utils.fusion",
        "napari_sagegan.api",
        "napari_sagegan.engine.infer.segment",
        "napari_sagegan.engine.infer.postprocess",
        "napari_sagegan.engine.infer.tiling",
        "napari_sagegan.engine.data.pairs",
    ):
        importlib.import_module(name)
    if training:
        for name in (
            "skimage.exposure",
            "skimage.filters",
            "napari_sagegan.engine.data.augment",
            "napari_sagegan.engine.train.losses",
            "napari_sagegan.engine.analysis.metrics",
            "napari_sagegan.engine.train.segmenter",
        ):
            importlib.import_module(name)
        import torch

        # the first Adam step imports torch's compiler modules: do it on a 1-value tensor
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([param], lr=1e-3)
        (param * 2).sum().backward()
        optimizer.step()


# --------------------------------------------------------------------------- segmentation


def segment_layers(
    entry: ModelEntry,
    images: Sequence[ImageInput],
    *,
    device: str = "auto",
    infer: dict | None = None,
    diameter: float | None = None,
    diameter_nm: float | None = None,
    with_attention: bool = False,
    threads: int | None = None,
) -> Generator[Progress, None, list[LayerResult]]:
    """Segment image layers with a model (:func:`napari_sagegan.api.segment`).

    Parameters
    ----------
    entry : ModelEntry
        The model (loaded here, in the worker, if needed; its segmenter is cached).
    images : sequence of ImageInput
        2-D images or 3-D stacks with their geometry and pixel size.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    infer : dict, optional
        :class:`~napari_sagegan.engine.config.InferConfig` fields replacing the model's
        recommended settings (``tile_size``, ``threshold``, ``split``, ...).
    diameter, diameter_nm : float, optional
        Particle diameter in px, or in nm (each image's pixel size turns it into px).
    with_attention : bool
        Also return the attention map.
    threads : int, optional
        Torch threads while running.

    Yields
    ------
    Progress
        The api's events; ``stage="image"`` events carry ``data["result"]`` as a
        :class:`LayerResult` (with its particle table, its labels in their display dtype
        and their fingerprint, all made here in the worker), so finished images survive
        Cancel, ``data["annotations"]``: a line naming the burned-in annotations left
        out, and ``data["unsure"]``: one saying how many particles the network was unsure of
        were left out (``InferConfig.min_confidence``; both ``""`` when none).

    Returns
    -------
    list of LayerResult
    """
    from napari_sagegan import api
    from napari_sagegan.engine.infer.confidence import with_confidence
    from napari_sagegan.io.export import particle_table
    from napari_sagegan.io.pixel_size import PixelSize

    if not images:
        raise ValueError(f"there is no image to segment: {ADVICE_OPEN}")
    by_name = {im.name: im for im in images}
    results: list[LayerResult] = []
    tiles: list = [0, None, None]  # the last tile event: the bar counts tiles over all images

    def as_layer(ev: Progress) -> Progress:
        if ev.stage == "tiles":
            tiles[:] = [ev.step, ev.total, ev.eta_s]
        res = ev.data.get("result")
        if ev.stage != "image" or res is None:
            return ev
        im = by_name[res.name]
        shown = display_labels(res.labels)  # uint16: napari maps int32 on the main thread
        result = LayerResult(
            image=im,
            labels=shown,
            features=with_confidence(particle_table(res.labels, im.scale, im.unit), res),
            attention=res.attention,
            model=entry.name,
            device=res.device,
            scale=res.scale,
            digest=labels_digest(shown),
        )
        results.append(result)
        return Progress(ev.stage, tiles[0], tiles[1], tiles[2], ev.message,
                        {**ev.data, "result": result,
                         "annotations": res.describe_excluded(),
                         "unsure": res.describe_unsure("a minimum confidence of 0")})  # fmt: skip

    micrographs = [
        api.Micrograph(im.name, im.data, PixelSize(im.pixel_size_nm, "layer")) for im in images
    ]
    with _threads(threads):
        yield from relay(
            api.segment(
                micrographs,
                model=entry.segmenter(device),
                device=device,
                diameter=diameter,
                diameter_nm=diameter_nm,
                infer=infer,
                with_attention=with_attention,
            ),
            as_layer,
        )
    return results


@dataclass
class FolderReport:
    """What :func:`segment_folder` did.

    Attributes
    ----------
    folder, out : Path
        The input folder and the output folder.
    done : list of (str, int)
        The images written, with their particle counts.
    failed : list of (str, str)
        The images that could not be segmented, with the reason.
    n_images : int
        Images found in the folder.
    cancelled : bool
        Stopped by the user (the images done so far are written).
    """

    folder: Path
    out: Path
    done: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    n_images: int = 0
    cancelled: bool = False

    def describe(self) -> str:
        """One line: ``"5 of 6 images segmented (812 particles), 1 failed -> OUT"``."""
        n = sum(k for _, k in self.done)
        s = "s" if self.n_images != 1 else ""
        line = f"{len(self.done)} of {self.n_images} image{s} segmented ({n} particles)"
        if self.failed:
            line += f", {len(self.failed)} failed"
        if self.cancelled:
            line += ", the rest cancelled"
        return f"{line} -> {self.out}"


def _check_folders(folder: Path, out: Path, files: Sequence[Path]) -> None:
    """Refuse an output folder whose files would replace an input (or be read as one)."""
    stems = [f.stem for f in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(
            f"several images in {folder} share the name {dupes[0]!r} (e.g. .tif and .png); "
            "their outputs would overwrite each other: rename them or move one away"
        )
    same = out.exists() and os.path.samefile(out, folder)
    if same or out.resolve() == folder.resolve():
        raise ValueError(
            f"the output folder is the input folder {folder}: the label TIFFs would sit among "
            "(or replace) the micrographs; choose another output folder"
        )


def segment_folder(
    entry: ModelEntry,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    infer: dict | None = None,
    diameter: float | None = None,
    diameter_nm: float | None = None,
    pixel_size: float | None = None,
    threads: int | None = None,
) -> Generator[Progress, None, FolderReport]:
    """Segment every image file of ``folder`` into ``out``, as ``sagegan segment --csv``.

    Each image goes through :func:`napari_sagegan.api.segment` on its own (read, segmented
    and written one at a time: nothing is kept in memory, nothing reaches the viewer):
    ``OUT/<stem>.tif`` (labels, calibrated when the pixel size is known),
    ``OUT/<stem>.csv`` + ``OUT/<stem>.summary.json``, and one ``OUT/segment_report.json``
    for all (the entries ``sagegan segment`` writes, plus ``failed``: the images that
    could not be segmented and why). An image that fails (unreadable, not grayscale, no
    pixel size for a size in nm, out of memory) is reported and skipped. Everything is
    staged and moved into ``out`` at the end; a Cancel writes the images done so far with
    their report.

    Parameters
    ----------
    entry : ModelEntry
        The model.
    folder : path
        A folder of micrographs (TIFF, PNG, JPEG, BMP, DM3/DM4, EMD, SER, MRC; not
        recursive).
    out : path
        The output folder (created if needed; not the input folder).
    device, infer, diameter, diameter_nm, threads
        As for :func:`segment_layers`.
    pixel_size : float, optional
        nm per pixel of every image, overriding the files (``--pixel-size``).

    Yields
    ------
    Progress
        ``prepare`` (per image: the device); ``tiles`` with ``step`` / ``total`` counting
        images (``data["fraction"]``: images done, the current one in fractions) and an ETA
        over the folder; ``segmented`` when an image's files are written; ``image`` after
        each image with ``data["result"]`` (a :class:`napari_sagegan.api.Segmented`, labels
        not kept) or ``data["error"]``.

    Returns
    -------
    FolderReport

    Raises
    ------
    FileNotFoundError, ValueError
        No such folder, no image in it, clashing names, or the output folder is the input
        folder (before anything is segmented).
    """
    from napari_sagegan import api
    from napari_sagegan.io.em import EM_SUFFIXES
    from napari_sagegan.io.images import IMAGE_SUFFIXES, list_images
    from napari_sagegan.io.tables import write_json
    from napari_sagegan.util.files import new_folder, staged_folder

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"the input folder {folder} does not exist: choose a folder")
    suffixes = IMAGE_SUFFIXES + EM_SUFFIXES
    files = list_images([folder], suffixes)
    if not files:
        raise ValueError(
            f"{folder} holds no image file ({', '.join(s.lstrip('.') for s in suffixes)}): "
            "choose a folder of micrographs"
        )
    out = new_folder(out, what="the output folder")
    _check_folders(folder, out, files)
    n = len(files)
    report = FolderReport(folder, out, n_images=n)
    model = entry.source if entry.source != "memory" else "memory"
    t0 = time.perf_counter()
    yield Progress("prepare", 0, n, message=f"segmenting {n} images of {folder} ...")

    with _threads(threads), staged_folder(out) as staging:
        seg = entry.segmenter(device)
        reports: list[dict] = []
        try:
            for i, f in enumerate(files):

                def overall(ev: Progress, i: int = i, f: Path = f) -> Progress:
                    if ev.stage != "tiles":  # "prepare", and "image" (reported below, once)
                        stage = "prepare" if ev.stage == "prepare" else "segmented"
                        data = {k: v for k, v in ev.data.items() if k != "result"}
                        return Progress(stage, i, n, None, ev.message, data)
                    d = ev.data
                    frac = d.get("image_step", 0) / max(d.get("image_total") or 1, 1)
                    done = i + min(frac, 1.0)
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / done * (n - done) if done > 0 else None
                    return Progress(
                        "tiles", i, n, eta, f"{f.name} ({i + 1}/{n}): {ev.message}",
                        {**d, "fraction": done},
                    )  # fmt: skip

                part = staging / f".image-{i:05d}"
                try:
                    (result,) = yield from relay(
                        api.segment(
                            [f], model=seg, device=device, diameter=diameter,
                            diameter_nm=diameter_nm, pixel_size=pixel_size, infer=infer,
                            out=part, csv=True, keep_labels=False,
                        ),
                        overall,
                    )  # fmt: skip
                except (ValueError, OSError, MemoryError) as err:  # this image only
                    shutil.rmtree(part, ignore_errors=True)
                    reason = str(err) or type(err).__name__
                    report.failed.append((f.name, reason))
                    yield Progress(
                        "image", i + 1, n, message=f"{f.name}: failed: {reason}",
                        data={"image": f.name, "error": reason},
                    )  # fmt: skip
                    continue
                for item in part.iterdir():
                    if item.name != api.REPORT_NAME:
                        os.replace(item, staging / item.name)
                shutil.rmtree(part, ignore_errors=True)
                reports.append(result.report())
                report.done.append((f.name, int(result.n_particles)))
                yield Progress(
                    "image", i + 1, n, message=f"{f.name}: {result.n_particles} particles",
                    data={"image": f.name, "result": result},
                )  # fmt: skip
        except GeneratorExit:  # Cancel: keep the images done, with their report
            report.cancelled = True
            for left in staging.glob(".image-*"):
                shutil.rmtree(left, ignore_errors=True)
        write_json(
            staging / api.REPORT_NAME,
            {
                "format": api.REPORT_FORMAT,
                "version": api.REPORT_VERSION,
                "model": str(model),
                "images": reports,
                "failed": [{"file": name, "error": why} for name, why in report.failed],
                "cancelled": report.cancelled,
            },
        )
    return report


def estimate_size(
    entry: ModelEntry,
    image: ImageInput,
    *,
    device: str = "auto",
    infer: dict | None = None,
    threads: int | None = None,
) -> Generator[Progress, None, Any]:
    """The particle size of one image layer, before segmenting it
    (:func:`napari_sagegan.api.estimate_size`).

    Parameters
    ----------
    entry : ModelEntry
        The model (loaded here, in the worker, if needed).
    image : ImageInput
        The layer's data and pixel size (``None``: unknown, and a scale bar is looked for).
    device, infer, threads
        As for :func:`segment_layers`.

    Returns
    -------
    SizeEstimate
        The size (px, and nm when the pixel size is known), its confidence and, for an image
        without a pixel size, the scale bar's pixel-size proposal (to confirm).
    """
    from napari_sagegan import api
    from napari_sagegan.io.pixel_size import PixelSize

    micrograph = api.Micrograph(image.name, image.data, PixelSize(image.pixel_size_nm, "layer"))
    with _threads(threads):
        return (
            yield from api.estimate_size(
                micrograph, model=entry.segmenter(device), device=device, infer=infer
            )  # fmt: skip
        )


# --------------------------------------------------------------------------- training


class _Training:
    """An api training generator run in a worker, keeping its trainer for a Cancel.

    Parameters as :class:`FineTune`. A subclass names its api function (``api_function``,
    e.g. ``"fine_tune"``), the keyword that takes the loaded base model (``base_keyword``) and
    the advice on bad pairs, and turns the trainer into its :meth:`result`.
    """

    #: The :mod:`napari_sagegan.api` training function.
    api_function: str
    #: Its argument that takes the base model's checkpoint.
    base_keyword: str
    #: What to do when the pairs are not usable (shown with the error).
    advice: str
    #: The budget is a number of steps (epochs x steps per epoch) as well as a time limit;
    #: ``False`` for a run the time limit is meant to end (phase 2 in the dock).
    budget_in_steps = True

    def __init__(
        self,
        base: ModelEntry,
        pairs: Sequence[TrainingPair],
        config: Any,
        *,
        folder: tuple[str, str | None] | None = None,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.base = base
        self.pairs = list(pairs)
        self.config = config
        self.folder = folder
        self.device = device
        self.threads = threads
        self.trainer: Any = None
        #: The last ``train`` event's (step, total).
        self.steps: tuple[int, int | None] = (0, None)

    def _start(self) -> Generator[Progress, None, Any]:
        from napari_sagegan import api

        train = getattr(api, self.api_function)
        return (
            yield from train(
                self.pairs,
                folder=self.folder,
                config=self.config,
                device=self.device,
                advice=self.advice,
                **{self.base_keyword: self.base.load()},
            )  # fmt: skip
        )

    def _trained(self) -> Any:
        """The trainer once it kept a model (one validation), else ``None``."""
        tr = self.trainer
        return tr if tr is not None and tr.history else None

    def _keep_trainer(self, ev: Progress) -> Progress:
        if ev.stage == "train":
            self.steps = (int(ev.step), ev.total)
        self.watch(ev)
        trainer = ev.data.get("trainer")
        if trainer is None:
            return ev
        self.trainer = trainer
        data = {k: v for k, v in ev.data.items() if k != "trainer"}  # not through Qt
        return Progress(ev.stage, ev.step, ev.total, ev.eta_s, ev.message, data)

    def watch(self, ev: Progress) -> None:
        """See every event (worker thread); a subclass keeps what it needs."""

    def run(self) -> Generator[Progress, None, Any]:
        """Yield ``prepare``, then the trainer's events; return :meth:`result`."""
        with _threads(self.threads):
            yield from relay(self._start(), self._keep_trainer)
        return self.result()

    @property
    def time_limit_minutes(self) -> float | None:
        """The run's time budget (minutes), or ``None``."""
        cfg = getattr(self.config, "train", self.config)
        minutes = getattr(cfg, "max_minutes", None)
        return float(minutes) if minutes else None

    def stopped_at_limit(self) -> bool:
        """Whether the time budget, not the number of epochs, ended the run."""
        return getattr(self.trainer, "stopped_by", None) == "time"

    def limit_text(self) -> str:
        """``"stopped at the 1-minute limit after 130 of 200 steps"`` when the time budget
        ended the run, else ``""``."""
        if not self.stopped_at_limit():
            return ""
        step, total = self.steps
        of = f" of {total}" if total and self.budget_in_steps else ""
        limit = minutes_text(self.time_limit_minutes)
        steps = "steps" if (total if of else step) != 1 else "step"
        return f"stopped at the {limit} limit after {step}{of} {steps}"

    def result(self) -> Any:  # pragma: no cover (abstract)
        raise NotImplementedError


class FineTune(_Training):
    """Fine-tune a model on corrected pairs (:func:`napari_sagegan.api.fine_tune`).

    Parameters
    ----------
    base : ModelEntry
        The model to start from (usually the viewer's current model).
    pairs : sequence of TrainingPair
        From the viewer (checked before the worker starts).
    config : TrainConfig
        Budget (``epochs``, ``max_minutes``, ``steps_per_epoch``), ``lr``, ``patch_size``...
    folder : (images_dir, masks_dir) or None
        Extra pairs read from disk in the worker.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    threads : int, optional
        Torch threads while running.

    Notes
    -----
    Nothing is written to disk: the best weights stay in memory (:meth:`result`) until the
    user saves them.
    """

    api_function, base_keyword, advice = "fine_tune", "init", ADVICE_RETRAIN

    def result(self) -> Any:
        """The best model so far as a checkpoint, also after a Cancel.

        ``None`` when training stopped before any model was kept (no epoch ended).
        """
        tr = self._trained()
        return None if tr is None else tr.best_checkpoint(extra={"base_model": self.base.name})

    #: What was used for what (``"training on 2 images (74 % of each), validating on their
    #: held-out 20 % ..."``), from the api's second ``prepare`` event.
    used = ""

    def watch(self, ev: Progress) -> None:
        if ev.stage == "prepare" and "trainer" in ev.data:
            self.used = ev.message

    def decision(self) -> dict | None:
        """Which model the fine-tune keeps and the scores of each on the validation images
        (:meth:`~napari_sagegan.engine.train.segmenter.SegmenterTrainer.decision`): the
        starting model stays when the new one is not better there; ``None`` without
        validation."""
        tr = self._trained()
        return None if tr is None else tr.decision()

    def decision_text(self) -> str:
        """:meth:`decision` in words, with both scores (``""`` without one)."""
        from napari_sagegan.engine.train.segmenter import describe_outcome

        d = self.decision()
        return describe_outcome(d) if d else ""


class Augment(_Training):
    """Train phase 2 on pairs from the viewer and/or a folder (:func:`napari_sagegan.api.augment`).

    Parameters
    ----------
    base : ModelEntry
        The phase-1 segmenter to start from.
    pairs : sequence of TrainingPair
        Pairs from the viewer (checked before the worker starts).
    config : GanConfig
        Budget, schedule and sizes.
    folder : (images_dir, masks_dir) or None
        Extra pairs read in the worker.
    """

    api_function, base_keyword, advice = "augment", "seg", ADVICE_AUGMENT
    budget_in_steps = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Validation F1@0.5 of the starting segmenter (epoch 0), when validated.
        self.start_f1: float | None = None
        #: The best validation F1@0.5 of phase 2's own epochs so far.
        self.best_f1: float | None = None
        #: Whether an epoch of phase 2 beat the starting segmenter.
        self.beat_start = False
        #: The layout suggested for the training masks (:func:`suggest_layout`), set at the
        #: end of a run.
        self.layout: tuple[str, str] | None = None

    def watch(self, ev: Progress) -> None:
        if ev.stage != "validate":
            return
        f1 = ev.data.get("val_f1@0.5")
        if int(ev.data.get("epoch", 0)) == 0:
            self.start_f1 = f1
            return
        if f1 is not None and (self.best_f1 is None or f1 > self.best_f1):
            self.best_f1 = f1
        self.beat_start |= bool(ev.data.get("improved"))

    def improved(self) -> bool | None:
        """Whether the segmenter kept is phase 2's (``False``: the starting one is kept;
        ``None``: no validation images, the last weights are kept)."""
        if self.start_f1 is None:
            return None
        return self.beat_start

    def run(self) -> Generator[Progress, None, Any]:
        result = yield from super().run()
        self.layout = suggest_layout(self.source_labels())
        return result

    def result(self) -> tuple[Any, Any] | None:
        """``(segmenter checkpoint, generator checkpoint)`` of the best so far, or ``None``."""
        tr = self._trained()
        return None if tr is None else (tr.segmenter_checkpoint(), tr.generator_checkpoint())

    def source_labels(self) -> list[np.ndarray]:
        """The training masks (network scale): the layouts of new pairs are drawn from them."""
        return list(self.trainer.train_labels) if self.trainer is not None else []


def suggest_layout(labels: Sequence[np.ndarray]) -> tuple[str, str]:
    """The mask layout that suits the training masks, and why (one line).

    A ``lattice`` fills the whole field at the masks' median nearest-neighbour spacing: on a
    dispersed sample (clusters, empty areas) that makes two to three times more particles
    than the masks hold. The masks are called ordered when they hold at least 60 % of the
    particles a hexagonal lattice at their spacing would (ordered monolayers: 75-85 %;
    dispersed particles and agglomerates: 30-40 %); then ``lattice`` is suggested, else
    ``real`` (the training masks, transformed).
    """
    from napari_sagegan.engine.synthetic.layouts import fit_stats

    masks = [np.asarray(m) for m in labels if np.any(np.asarray(m))]
    if not masks:
        return "real", ""
    try:
        stats = fit_stats(masks)
    except ValueError:
        return "real", ""
    area = sum(m.size for m in masks)
    n = sum(len(np.unique(m)) - 1 for m in masks)
    spacing = float(stats["spacing"])
    lattice = 2.0 / (np.sqrt(3.0) * spacing**2) * area  # hexagonal sites at that spacing
    ratio = n / max(lattice, 1.0)
    if ratio >= 0.6:
        return "lattice", (
            f"the masks look ordered ({n} particles, {ratio:.0%} of a lattice at their "
            f"{spacing:.0f} px spacing): 'lattice' suits them"
        )
    return "real", (
        f"the masks hold {n} particles where a lattice at their {spacing:.0f} px spacing "
        f"would hold about {lattice:.0f} (a dispersed sample): 'real' or 'paste' keep "
        "their density; 'lattice' would over-fill the field"
    )


def generate_pairs(
    generator: Any,
    source_labels: Sequence[np.ndarray],
    n: int,
    *,
    layout: str = "real",
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
) -> Generator[Progress, None, list[tuple[np.ndarray, np.ndarray]]]:
    """``n`` pairs ``(uint8 image, int32 labels)`` from a generator checkpoint
    (:func:`napari_sagegan.api.generate`), their layouts drawn from ``source_labels``."""
    from napari_sagegan import api

    with _threads(threads):
        return (
            yield from api.generate(
                generator,
                n,
                masks=list(source_labels) or None,
                layout=layout,
                seed=seed,
                device=device,
            )  # fmt: skip
        )


def generate_layers(
    generator: Any,
    source_labels: Sequence[np.ndarray],
    n: int,
    *,
    start: int = 1,
    **kwargs: Any,
) -> Generator[Progress, None, list[LayerData]]:
    """:func:`generate_pairs`, returned as Image + Labels layer data numbered from ``start``
    (:func:`~napari_sagegan.napari.layers.synthetic_layer_data`: contrast limits from the
    grey levels, labels in their display dtype), all made here in the worker."""
    pairs = yield from generate_pairs(generator, source_labels, n, **kwargs)
    return synthetic_layer_data(pairs, start)


def minutes_text(minutes: float | None) -> str:
    """``"1-minute"``, ``"2.5-minute"``, ``"30-second"``: a time limit as an adjective."""
    if not minutes:
        return "time"
    if minutes < 1:
        return f"{minutes * 60:.0f}-second"
    return f"{minutes:g}-minute"


# --------------------------------------------------------------------------- export

#: Name of the particle table written beside the label files.
CSV_NAME = "particles.csv"


def safe_file_stem(name: str) -> str:
    """A file name stem from a layer name (``"TEM hex labels [1]"`` -> ``"TEM_hex_labels_1"``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "labels"


def export_plan(names: Sequence[str], folder: Path, csv: bool) -> list[Path]:
    """The files "export all" writes: one ``.tif`` per layer (+ the CSV), names unique."""
    out, seen = [], set()
    for name in names:
        stem = safe_file_stem(name)
        candidate, i = stem, 1
        while candidate.lower() in seen:
            i += 1
            candidate = f"{stem}_{i}"
        seen.add(candidate.lower())
        out.append(folder / f"{candidate}.tif")
    if csv:
        out.append(folder / CSV_NAME)
    return out


def export_layers(
    items: Sequence[tuple], paths: Sequence[Path], csv: bool
) -> Generator[Progress, None, list[Path]]:
    """Write each ``(name, labels, scale, unit[, pixel_size_nm[, confidence]])`` to its path,
    then the CSV (worker thread).

    The TIFF gets ``scale`` in ``unit`` (resolution and unit, as Fiji reads them). The CSV
    has one row per particle of every layer: ``layer``, ``file``, ``pixel_size_nm`` (empty
    when unknown), sizes in pixels, ``touches_border`` and, when ``pixel_size_nm`` is known,
    sizes in nm (``area_nm2``, ``equivalent_diameter_nm``, centroids); without it, in
    ``unit`` when the scale has one; last, ``confidence`` (the network's, by label) when the
    item has one.
    """
    import pandas as pd

    from napari_sagegan.engine.infer.confidence import with_confidence
    from napari_sagegan.io.export import particle_table, write_labels_tiff
    from napari_sagegan.util.files import atomic_path

    tables = []
    for i, (item, path) in enumerate(zip(items, paths)):
        name, data, scale, unit = item[:4]
        nm = item[4] if len(item) > 4 else None
        write_labels_tiff(path, data, scale=scale, unit=unit)
        if csv:
            if nm:
                table = particle_table(data, (nm, nm), "nm")
            else:
                table = particle_table(data, scale, unit)
            table = table.drop(columns=["index"])
            table.insert(0, "layer", name)
            table.insert(1, "file", path.name)
            table.insert(2, "pixel_size_nm", float(nm) if nm else np.nan)
            if len(item) > 5 and item[5] is not None:
                table = with_confidence(table, item[5])
            tables.append(table)
        yield Progress("export", i + 1, len(items), message=f"wrote {path.name}")
    written = list(paths[: len(items)])
    if csv:
        with atomic_path(paths[-1]) as tmp:
            pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
        written.append(paths[-1])
    return written
