"""The work the docks run in a worker thread: :mod:`napari_sagegan.api` calls, adapted to layers.

Each job is a progress generator over an api function: it takes what the dock read from the
layers on the main thread (:class:`~napari_sagegan.napari.layers.ImageInput`,
:class:`~napari_sagegan.napari.layers.TrainingPair`, a
:class:`~napari_sagegan.napari.state.ModelEntry`), loads the model inside the worker, limits
torch's threads while a viewer is open (:func:`~napari_sagegan.engine.device.torch_threads`),
and turns the api's results into what the docks add to the viewer. No Qt, no napari.

- :func:`segment_layers`: :func:`napari_sagegan.api.segment`, one
  :class:`~napari_sagegan.napari.layers.LayerResult` per image as soon as it is done.
- :func:`estimate_size`: :func:`napari_sagegan.api.estimate_size`, the particle size of one
  image layer before segmenting it (and a scale bar's pixel-size proposal).
- :class:`FineTune`: :func:`napari_sagegan.api.fine_tune`; Cancel keeps the best model so
  far (:meth:`FineTune.result`).
- :class:`Augment`: :func:`napari_sagegan.api.augment` (phase 2), the same way.
- :func:`generate_pairs`: :func:`napari_sagegan.api.generate`.
- :func:`export_plan` / :func:`export_layers`: every Labels layer to a Fiji-ready TIFF, plus
  one particle CSV (no api capability covers this: it is the viewer's "export all").
- :func:`warm_up`: the imports a worker would otherwise make (they stall the GUI).
"""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.napari.layers import ADVICE_OPEN, ImageInput, LayerResult, TrainingPair
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
        :class:`LayerResult` (with its particle table), so finished images survive Cancel,
        and ``data["annotations"]``: a line naming the burned-in annotations left out
        (``""`` when none).

    Returns
    -------
    list of LayerResult
    """
    from napari_sagegan import api
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
        result = LayerResult(
            image=im,
            labels=res.labels,
            features=particle_table(res.labels, im.scale, im.unit),
            attention=res.attention,
            model=entry.name,
            device=res.device,
            scale=res.scale,
        )
        results.append(result)
        return Progress(ev.stage, tiles[0], tiles[1], tiles[2], ev.message,
                        {**ev.data, "result": result,
                         "annotations": res.describe_excluded()})  # fmt: skip

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
        trainer = ev.data.get("trainer")
        if trainer is None:
            return ev
        self.trainer = trainer
        data = {k: v for k, v in ev.data.items() if k != "trainer"}  # not through Qt
        return Progress(ev.stage, ev.step, ev.total, ev.eta_s, ev.message, data)

    def run(self) -> Generator[Progress, None, Any]:
        """Yield ``prepare``, then the trainer's events; return :meth:`result`."""
        with _threads(self.threads):
            yield from relay(self._start(), self._keep_trainer)
        return self.result()

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

    def result(self) -> tuple[Any, Any] | None:
        """``(segmenter checkpoint, generator checkpoint)`` of the best so far, or ``None``."""
        tr = self._trained()
        return None if tr is None else (tr.segmenter_checkpoint(), tr.generator_checkpoint())

    def source_labels(self) -> list[np.ndarray]:
        """The training masks (network scale): the layouts of new pairs are drawn from them."""
        return list(self.trainer.train_labels) if self.trainer is not None else []


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
    items: Sequence[tuple[str, Any, tuple, Any]], paths: Sequence[Path], csv: bool
) -> Generator[Progress, None, list[Path]]:
    """Write each ``(name, labels, scale, unit)`` to its path, then the CSV (worker thread)."""
    import pandas as pd

    from napari_sagegan.io.export import particle_table, write_labels_tiff
    from napari_sagegan.util.files import atomic_path

    tables = []
    for i, ((name, data, scale, unit), path) in enumerate(zip(items, paths)):
        write_labels_tiff(path, data, scale=scale, unit=unit)
        if csv:
            table = particle_table(data, scale, unit).drop(columns=["index"])
            table.insert(0, "layer", name)
            table.insert(1, "file", path.name)
            tables.append(table)
        yield Progress("export", i + 1, len(items), message=f"wrote {path.name}")
    written = list(paths[: len(items)])
    if csv:
        with atomic_path(paths[-1]) as tmp:
            pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
        written.append(paths[-1])
    return written
