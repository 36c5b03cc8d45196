"""The per-viewer state of the plugin: models, training sets, the phase-2 generator (no Qt).

One :class:`ViewerState` per napari viewer, found from the viewer with
:func:`viewer_state` (created on first use, dropped with the viewer): every dock of a viewer
reads and changes the same state, and docks never look for each other. Plain Python, so it
is tested without a viewer; a dock is a view that subscribes to the parts it shows
(:meth:`Observable.subscribe`) and is called back after every change.

- :class:`ModelStore` (``state.models``): the segmenters the user can pick
  (:class:`ModelEntry`: the bundled default, files, fine-tuned ones), the current one and
  the previous one for roll-back.
- :class:`TrainingSet` (``state.retrain_set``, ``state.augment_set``): which Labels layers
  are ticked as training pairs for fine-tuning and for phase 2.
- :class:`Phase2` (``state.phase2``): the trained phase-2 generator, the masks new pairs are
  drawn from, and how many pairs were generated.
- :class:`ParticleSize` (``state.particle_size``): the particle-size setting every dock that
  segments uses (Segment, and Re-segment in Correct and retrain).
- :class:`ResultLayers` (``state.results``): whether a new segmentation replaces an
  unedited earlier result of the same image or comes as new layers (the default).
- :class:`TestTimeViews` (``state.views``): the test-time views the docks that segment use.
- :class:`PixelSizes` (``state.pixel_sizes``): the pixel size the user set for an image
  (once per image, in Segment or Measure); every dock uses it
  (:mod:`napari_sagegan.napari.calibration` writes it into the layers).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.engine.config import TTA_VIEWS
from napari_sagegan.napari.layers import PairCandidate


class Observable:
    """Something a dock shows: it calls its subscribers back after every change.

    A bound method is held weakly, so a closed dock is not kept alive by the state.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[], Callable[[], None] | None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change."""
        ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else None
        self._listeners.append(ref if ref is not None else (lambda: callback))

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._listeners = [r for r in self._listeners if r() not in (None, callback)]

    @property
    def n_subscribers(self) -> int:
        """How many subscribers are still alive (e.g. docks showing this part)."""
        return sum(r() is not None for r in self._listeners)

    def _changed(self) -> None:
        alive = []
        for ref in list(self._listeners):
            cb = ref()
            if cb is not None:
                alive.append(ref)
                cb()
        self._listeners = alive


# --------------------------------------------------------------------------- models


@dataclass(eq=False)
class ModelEntry:
    """A segmenter the user can pick: the bundled default, a file or a fine-tuned model.

    Attributes
    ----------
    name : str
        What the user sees (``"bundled default"``, the file name, ``"fine-tuned 1"``).
    source : str
        ``"default"``, a checkpoint path, or ``"memory"`` for a model not saved yet.
    ckpt : Checkpoint or None
        The loaded :class:`~napari_sagegan.engine.checkpoint.Checkpoint` (a mapping:
        ``arch``, ``state_dict``, ``infer``, ``metrics``, ...); loaded on first use by
        :meth:`load` (in the worker thread).
    """

    name: str
    source: str
    ckpt: Any = None
    _segmenters: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> Any:
        """The checkpoint, read from disk on first use.

        Raises
        ------
        FileNotFoundError, napari_sagegan.engine.checkpoint.CheckpointError
            Missing file (the bundled default not installed) or an unusable file.
        """
        with self._lock:
            if self.ckpt is None:
                from napari_sagegan.engine.checkpoint import Checkpoint

                self.ckpt = Checkpoint.load(self.source, kind="segmenter")
            return self.ckpt

    def segmenter(self, device: str = "auto") -> Any:
        """A :class:`~napari_sagegan.engine.infer.segment.Segmenter` on ``device`` (cached)."""
        from napari_sagegan.engine.checkpoint import Checkpoint
        from napari_sagegan.engine.infer.segment import Segmenter

        ckpt = Checkpoint.load(self.load(), kind="segmenter")
        with self._lock:
            seg = self._segmenters.get(device)
            if seg is None:
                seg = Segmenter(ckpt.build(), device=device, checkpoint=ckpt)
                self._segmenters[device] = seg
            return seg

    @property
    def metrics(self) -> dict[str, float]:
        """The checkpoint's stored validation metrics (empty until loaded)."""
        return dict((self.ckpt or {}).get("metrics") or {})

    def check_available(self) -> None:
        """Raise ``FileNotFoundError`` when the model file is missing (cheap, main thread)."""
        if self.ckpt is not None or self.source == "memory":
            return
        from napari_sagegan.engine.checkpoint import resolve_model_path

        try:
            resolve_model_path(self.source)
        except FileNotFoundError as err:
            if self.source == "default":
                raise FileNotFoundError(
                    "the bundled default model is not installed in this copy of "
                    "napari-sagegan; load a model file (Load model...) or train one with "
                    "`sagegan train`"
                ) from err
            raise

    def save(self, path: str | os.PathLike) -> Path:
        """Write this model as a napari-sagegan checkpoint file (atomically); ``.pt`` is
        added to a path without a suffix."""
        from napari_sagegan.engine.checkpoint import Checkpoint

        path = Path(path).expanduser()
        if path.suffix == "":
            path = path.with_suffix(".pt")
        return Checkpoint.load(self.load(), kind="segmenter").save(path)


class ModelStore(Observable):
    """The models known to one viewer, the current one and the previous one.

    The previous model is kept for comparison and roll-back (:meth:`use_previous`). At
    most :attr:`MAX_ENTRIES` models are kept in memory; the oldest ones that are neither
    current nor previous are dropped first.
    """

    MAX_ENTRIES = 8

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[ModelEntry] = [ModelEntry("bundled default", "default")]
        self.current: ModelEntry = self.entries[0]
        self.previous: ModelEntry | None = None
        self._n_tuned = 0

    def find(self, name: str) -> ModelEntry | None:
        """The entry shown as ``name``, or ``None``."""
        return next((e for e in self.entries if e.name == name), None)

    def select(self, entry: ModelEntry) -> None:
        """Make ``entry`` the current model (the current one becomes the previous one)."""
        if entry not in self.entries:
            self.entries.append(entry)
        if entry is not self.current:
            self.previous, self.current = self.current, entry
        self._trim()
        self._changed()

    def add_file(self, path: str | os.PathLike) -> ModelEntry:
        """Load a checkpoint file (validated now) and make it current."""
        from napari_sagegan.engine.checkpoint import Checkpoint

        path = Path(path).expanduser()
        for entry in self.entries:
            if entry.source == str(path):
                entry.ckpt = None  # the file may have changed: read it again
                entry._segmenters.clear()
                entry.load()
                self.select(entry)
                return entry
        entry = ModelEntry(path.name, str(path), Checkpoint.load(path, kind="segmenter"))
        self.select(entry)
        return entry

    def add_tuned(self, ckpt: Any, kind: str = "fine-tuned") -> ModelEntry:
        """Register a fine-tuned model (kept in memory) and make it current; ``kind`` starts
        its name (``"re-calibrated"``: a model's own weights with new thresholds; ``"blended"``:
        weights between the starting and the fine-tuned model's)."""
        self._n_tuned += 1
        entry = ModelEntry(f"{kind} {self._n_tuned}", "memory", ckpt)
        self.select(entry)
        return entry

    def use_previous(self) -> ModelEntry:
        """Swap the current and the previous model (roll-back, and back again)."""
        if self.previous is None:
            raise ValueError("there is no previous model to go back to")
        self.current, self.previous = self.previous, self.current
        self._changed()
        return self.current

    def _trim(self) -> None:
        keep = {id(self.current), id(self.previous)}
        while len(self.entries) > self.MAX_ENTRIES:
            for i, entry in enumerate(self.entries):
                if id(entry) not in keep and entry.source != "default":
                    del self.entries[i]
                    break
            else:
                break


# --------------------------------------------------------------------------- training sets


def tick_edited(candidate: PairCandidate, choice: bool | None) -> bool:
    """The rule of both training sets (fine-tuning and phase 2): a layer the user corrected
    is ticked; every other one (results nobody checked, duplicates, masks opened from
    files, generated pairs) is not; the user's own tick or untick always wins."""
    return bool(candidate.edited) if choice is None else bool(choice)


def tick_real(candidate: PairCandidate, choice: bool | None) -> bool:
    """Phase 2's rule: real pairs ticked, generated ones not, until the user chooses."""
    return (not candidate.synthetic) if choice is None else choice


class TrainingSet(Observable):
    """Which Labels layers are ticked as training pairs (by name).

    Parameters
    ----------
    rule : callable
        ``rule(candidate, choice) -> ticked``: ``choice`` is the user's last tick for
        that layer (``None``: never chosen); see :func:`tick_edited`, :func:`tick_real`.

    Attributes
    ----------
    choices : dict of str to bool
        The ticks as last listed or chosen (what :meth:`ticked` reads).
    chosen : dict of str to bool
        The ticks the user chose (:meth:`choose`); the rule decides the others.
    """

    def __init__(self, rule: Callable[[PairCandidate, bool | None], bool]) -> None:
        super().__init__()
        self.rule = rule
        self.choices: dict[str, bool] = {}
        self.chosen: dict[str, bool] = {}

    def rows(self, candidates: Iterable[PairCandidate]) -> list[tuple[PairCandidate, bool]]:
        """The listable candidates (their image is open) with their tick.

        The ticks listed are remembered (as a list widget remembers its ticks); the user's
        choices for layers no longer listed are forgotten.
        """
        out = [(c, self.rule(c, self.chosen.get(c.name))) for c in candidates if c.image]
        self.choices = {c.name: ticked for c, ticked in out}
        self.chosen = {k: v for k, v in self.chosen.items() if k in self.choices}
        return out

    def ticked(self) -> list[str]:
        """The names ticked when the rows were last listed or chosen since."""
        return [name for name, ticked in self.choices.items() if ticked]

    def choose(self, names: str | Sequence[str], ticked: bool = True) -> None:
        """Record the user's tick (or untick) of one or several layers."""
        names = [names] if isinstance(names, str) else list(names)
        changed = False
        for name in names:
            changed |= self.choices.get(name) is not bool(ticked)
            self.choices[name] = self.chosen[name] = bool(ticked)
        if changed:
            self._changed()


# --------------------------------------------------------------------------- phase 2


class Phase2(Observable):
    """The result of phase-2 training that "Generate pairs" draws from.

    Attributes
    ----------
    generator : Checkpoint or None
        The generator checkpoint (``None`` until phase 2 was trained in this viewer).
    source_labels : list of np.ndarray
        The training masks at network scale: new layouts are drawn from them.
    n_made : int
        Pairs generated so far (numbers the next ones, seeds the next draw).
    """

    def __init__(self) -> None:
        super().__init__()
        self.generator: Any = None
        self.source_labels: list[np.ndarray] = []
        self.n_made = 0

    def set_generator(self, generator: Any, source_labels: Sequence[np.ndarray]) -> None:
        """Keep a newly trained generator and its source masks."""
        self.generator = generator
        self.source_labels = list(source_labels)
        self._changed()

    def made(self, n: int) -> int:
        """Count ``n`` new pairs; returns the number of the first one."""
        start = self.n_made + 1
        self.n_made += int(n)
        self._changed()
        return start


# --------------------------------------------------------------------------- particle size


class ParticleSize(Observable):
    """The typical particle diameter the docks segment with: one setting per viewer.

    Attributes
    ----------
    value : float
        The diameter, in :attr:`unit`; ``0`` estimates it for each image.
    unit : str
        ``"px"`` or ``"nm"`` (nm needs each image's pixel size).
    """

    UNITS = ("px", "nm")

    def __init__(self) -> None:
        super().__init__()
        self.value = 0.0
        self.unit = "px"

    @property
    def auto(self) -> bool:
        """No size set: it is estimated for each image."""
        return not self.value > 0

    def set(self, value: float, unit: str | None = None) -> None:
        """Change the setting (``value <= 0``: estimate); subscribers are told of a change.

        Raises
        ------
        ValueError
            An unknown unit.
        """
        unit = self.unit if unit is None else unit
        if unit not in self.UNITS:
            raise ValueError(f"the particle size unit must be px or nm, got {unit!r}")
        value = max(float(value), 0.0)
        if (value, unit) != (self.value, self.unit):
            self.value, self.unit = value, unit
            self._changed()

    def pixels(self, pixel_size_nm: float | None) -> float | None:
        """The size in pixels of an image of ``pixel_size_nm`` nm per pixel: ``None`` when
        it is estimated, or in nm and the image's pixel size is unknown."""
        if self.auto:
            return None
        if self.unit == "nm":
            return max(self.value / pixel_size_nm, 1.0) if pixel_size_nm else None
        return max(self.value, 1.0)

    def arguments(self, images: Sequence[Any]) -> dict[str, float | None]:
        """``{"diameter": px, "diameter_nm": nm}`` for :func:`napari_sagegan.api.segment`
        (both ``None``: estimated), checked against ``images``
        (:class:`~napari_sagegan.napari.layers.ImageInput` s).

        Raises
        ------
        ValueError
            The size is in nm and an image has no pixel size (the message says what to do).
        """
        if self.auto:
            return {"diameter": None, "diameter_nm": None}
        if self.unit == "nm":
            unknown = [im.name for im in images if not im.pixel_size_nm]
            if unknown:
                raise ValueError(
                    f"The particle size is in nm, but the pixel size of {unknown[0]!r} is "
                    "unknown: give the size in px, or open the image with its calibration."
                )
            return {"diameter": None, "diameter_nm": self.value}
        return {"diameter": max(self.value, 1.0), "diameter_nm": None}


# --------------------------------------------------------------------------- pixel size


class PixelSizes(Observable):
    """The pixel sizes the user set, one per image (nm per pixel, by layer name).

    For an image whose file records none (or records a wrong one): set once, in the Segment
    or the Measure dock, and used by every dock of the viewer (segmenting in nm, measuring,
    exporting). A pixel size read from a file is not kept here: it is in the layer itself
    (:func:`napari_sagegan.napari.layers.layer_pixel_size`).

    Attributes
    ----------
    values : dict of str to float
        Image layer name -> nm per pixel.
    watching : bool
        The viewer's new layers are calibrated from their files
        (:func:`napari_sagegan.napari.calibration.watch_viewer`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}
        self.watching = False

    def get(self, name: str) -> float | None:
        """The pixel size set for image ``name``, or ``None``."""
        return self.values.get(str(name))

    def set(self, name: str, nm: float | None) -> None:
        """Set (``nm > 0``) or forget (``None``, ``0``) the pixel size of image ``name``.

        Raises
        ------
        ValueError
            A pixel size that is not a plausible positive number (the message says so).
        """
        from napari_sagegan.util.units import check_pixel_size

        name = str(name)
        if nm is None or not float(nm) > 0:
            changed = self.values.pop(name, None) is not None
        else:
            value = check_pixel_size(float(nm))
            changed = self.values.get(name) != value
            self.values[name] = value
        if changed:
            self._changed()


# --------------------------------------------------------------------------- results


class ResultLayers(Observable):
    """What a new segmentation does to an earlier result of the same image: one setting per
    viewer (Segment shows it; Re-segment in Correct and retrain follows it).

    Attributes
    ----------
    replace : bool
        ``True``: refresh the unedited result layer of that image in place
        (:func:`~napari_sagegan.napari.layers.replaceable_layer`); ``False`` (default):
        add new layers and keep every earlier one. A corrected layer is never replaced.
    """

    MODES = ("add new layers", "replace unedited results")

    def __init__(self) -> None:
        super().__init__()
        self.replace = False

    @property
    def mode(self) -> str:
        """The setting as the Segment dock shows it (one of :attr:`MODES`)."""
        return self.MODES[int(self.replace)]

    def set(self, replace: bool | str) -> None:
        """Change the setting (a bool, or one of :attr:`MODES`).

        Raises
        ------
        ValueError
            An unknown mode name.
        """
        if isinstance(replace, str):
            if replace not in self.MODES:
                raise ValueError(f"unknown result mode {replace!r}; one of {self.MODES}")
            replace = replace == self.MODES[1]
        if bool(replace) != self.replace:
            self.replace = bool(replace)
            self._changed()


class TestTimeViews(Observable):
    """How many views of each tile the network's maps are averaged over
    (:attr:`~napari_sagegan.engine.config.InferConfig.tta`): one setting per viewer (Segment
    shows it; Re-segment in Correct and retrain follows it).

    Attributes
    ----------
    views : int
        1 (none, the default), 2, 4 or 8.
    """

    __test__ = False  # not a pytest test class
    CHOICES = TTA_VIEWS

    def __init__(self) -> None:
        super().__init__()
        self.views = 1

    def set(self, views: int | str) -> None:
        """Change the setting (a number, or the Segment dock's text starting with it).

        Raises
        ------
        ValueError
            Not one of :attr:`CHOICES`.
        """
        n = int(str(views).split()[0]) if str(views).strip() else 0
        if n not in self.CHOICES:
            raise ValueError(f"test-time views must be one of {self.CHOICES}, got {views!r}")
        if n != self.views:
            self.views = n
            self._changed()


# --------------------------------------------------------------------------- per viewer


class ViewerState:
    """Everything the plugin's docks share in one viewer (see the module docstring)."""

    def __init__(self) -> None:
        self.models = ModelStore()
        self.retrain_set = TrainingSet(tick_edited)
        self.augment_set = TrainingSet(tick_edited)  # the same default as fine-tuning
        self.results = ResultLayers()
        self.phase2 = Phase2()
        self.particle_size = ParticleSize()
        self.pixel_sizes = PixelSizes()
        self.views = TestTimeViews()


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def viewer_state(viewer: Any) -> ViewerState:
    """The :class:`ViewerState` of ``viewer`` (created on first use, dropped with it)."""
    state = _STATES.get(viewer)
    if state is None:
        state = ViewerState()
        _STATES[viewer] = state
    return state
