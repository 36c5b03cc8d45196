"""One self-describing checkpoint type for every kind of model, written atomically and loaded
without executing code.

A checkpoint file holds a dict of primitives and tensors::

    {"format": "napari-sagegan", "format_version": 1, "kind": "segmenter",
     "arch": {...}, "train": {...} | None, "infer": {...} | None,
     "target_diameter": float | None, "seed": int, "epoch": int, "step": int,
     "metrics": {name: float}, "versions": {"napari_sagegan": str, "torch": str},
     "half": bool, "state_dict": {...}, "optimizer": {...} | None, "extra": {...}}

Kinds (:data:`KINDS`): ``segmenter`` (the Attention U-Net, ``arch`` an
:class:`~napari_sagegan.engine.config.ArchConfig`), ``generator`` (phase 2's mask -> image
network, ``arch`` a :class:`~napari_sagegan.engine.nets.generator.GeneratorConfig``) and
``sagegan-gan`` (phase 2's resume state: the generator's weights plus, in ``extra``, the
segmenter, the discriminators and the optimisers).

:class:`Checkpoint` builds one from a model (:meth:`Checkpoint.from_model`), saves it to a
temporary file in the target folder and renames it (a crash never leaves a half-written
model), loads it with ``torch.load(weights_only=True)`` (a file that carries code, a pickled
object, is refused before anything runs) and rebuilds the model from ``arch`` with
``strict=True`` (:meth:`Checkpoint.build`). It is also a read-only mapping of its payload
(``ckpt["infer"]``, ``ckpt.get("metrics")``).

``target_diameter`` is the network scale the model was trained at (particle diameter in
network pixels; ``None``: the images' own scale). Files written before it had its own entry
keep it in ``train["target_diameter"]``, where it is still read.

Damage is caught at :meth:`Checkpoint.load`, never later as a model that finds nothing: the
zip archive's CRC-32 checksums are verified (``torch.load`` does not; bit rot inside one
weight entry would otherwise load silently), every tensor must be finite (NaN / inf weights
give empty segmentations), and every failure of the loader (a text file, a truncated file,
another kind, missing entries, weights that do not fit the architecture at
:meth:`Checkpoint.build`) is one :class:`CheckpointError` whose message names the file and
says what to do. :meth:`Checkpoint.save` refuses to write non-finite weights. On the bundled
fp16 model (4 MB, 2 M weights, 2-core CPU) the checksums take about 5 ms and the finiteness
check about 4 ms, beside 35 ms for ``torch.load`` and 270 ms for building the network.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..util.files import atomic_path

FORMAT = "napari-sagegan"
FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "default"
SEGMENTER = "segmenter"
GENERATOR = "generator"
GAN_STATE = "sagegan-gan"
#: The kinds of checkpoint, each with the network its ``arch`` describes.
KINDS = (SEGMENTER, GENERATOR, GAN_STATE)
_KEYS = (
    "format",
    "format_version",
    "kind",
    "arch",
    "train",
    "infer",
    "target_diameter",
    "seed",
    "epoch",
    "step",
    "metrics",
    "versions",
    "half",
    "state_dict",
    "optimizer",
    "extra",
)


class CheckpointError(ValueError):
    """A file that is not a usable napari-sagegan checkpoint."""


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor of ``tensors`` holds only finite values (no NaN,
    no +-inf); other tensors are ignored. CPU tensors are checked through NumPy (about 4 ms
    for the bundled model's 2 M fp16 weights, several times faster than ``torch.isfinite``),
    others with one synchronisation."""
    others = []
    for t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS:
            if not np.isfinite(t.numpy()).all():
                return False
        else:
            others.append(torch.isfinite(t).all())
    return bool(torch.stack(others).all()) if others else True


def first_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """The name (``a.b.c``) of the first floating-point tensor inside ``tree`` (nested dicts,
    lists and tuples) holding a NaN or an infinity; ``None`` when all are finite."""
    if isinstance(tree, torch.Tensor):
        return None if all_finite([tree]) else (prefix or "tensor")
    if isinstance(tree, Mapping):
        items: Iterable[tuple[Any, Any]] = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        bad = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if bad is not None:
            return bad
    return None


def _verify_zip(path: Path) -> None:
    """Check the CRC-32 of every entry of a zip checkpoint (what ``torch.save`` writes);
    other files are left to the loader."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise CheckpointError(
            f"{path} is damaged (its zip archive cannot be read: {err}); restore it from a "
            "backup or train the model again"
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"{path} is damaged: the data of its entry {bad!r} fails its checksum (the file "
            "changed after it was written); restore it from a backup or train the model again"
        )


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"napari_sagegan": str(__version__), "torch": torch.__version__.split("+")[0]}


def _as_dict(config: Any) -> dict | None:
    """A config (anything with ``to_dict``) or dict as a plain dict; ``None`` stays."""
    if config is None:
        return None
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def state_on_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state dict of ``module`` (unwrapped from ``torch.compile``)."""
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


#: The file of each bundled model, by kind (``"default"`` names it).
BUNDLED = {SEGMENTER: "default.pt", GENERATOR: "generator.pt"}


def default_model_path(kind: str = SEGMENTER) -> Path:
    """Path of the model of ``kind`` bundled with the package (the segmenter, or phase 2's
    mask -> image generator)."""
    return Path(__file__).resolve().parent.parent / "models" / BUNDLED.get(kind, "default.pt")


def has_bundled(kind: str = SEGMENTER) -> bool:
    """Whether this installation bundles a model of ``kind``."""
    return kind in BUNDLED and default_model_path(kind).is_file()


def resolve_model_path(model: str | os.PathLike | None, kind: str = SEGMENTER) -> Path:
    """Map ``None`` / ``"default"`` to the bundled model of ``kind``, else check that the
    file exists."""
    if model is None or str(model) == DEFAULT_MODEL_NAME:
        path = default_model_path(kind)
        if kind not in BUNDLED:
            raise FileNotFoundError(f"there is no bundled {kind} model; give a {kind}.pt file")
        if not path.is_file():
            what = "default model" if kind == SEGMENTER else "generator"
            flag = "--model MODEL.pt" if kind == SEGMENTER else "a generator.pt file"
            raise FileNotFoundError(
                f"the bundled {what} is missing from this installation ({path}); "
                f"reinstall napari-sagegan or give {flag}"
            )
        return path
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    return path


def _read(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with messages a user understands; the zip archive's
    checksums are verified first."""
    _verify_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err).upper():
            raise CheckpointError(
                f"{path} was refused: it contains Python objects or code, not just weights "
                "(a safe load runs nothing from it). Use a checkpoint written by napari-sagegan."
            ) from err
        raise CheckpointError(
            f"cannot read {path}: the file is damaged or is not a PyTorch checkpoint "
            "(nothing in it was run); give a model file written by napari-sagegan"
        ) from err
    except (MemoryError, KeyboardInterrupt, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001  (the unpickler raises IndexError, KeyError, ...)
        # torch's own errors (zip archive, storages) say what failed; the unpickler's
        # IndexError / KeyError on a text file say nothing useful
        text = " ".join(str(err).split())
        detail = text if isinstance(err, (RuntimeError, OSError)) and text else ""
        raise CheckpointError(
            f"cannot read {path}: the file is damaged or is not a PyTorch checkpoint "
            f"({detail or 'nothing in it was run'}); give a model file written by "
            "napari-sagegan"
        ) from err


def target_diameter_of(ckpt: Mapping[str, Any]) -> float | None:
    """The network scale of a checkpoint or payload (particle diameter in network pixels;
    ``None``: images' own scale). Read from ``target_diameter``, or, in files written before
    it had its own entry (the bundled model among them), from ``train["target_diameter"]``."""
    if "target_diameter" in ckpt:
        value = ckpt["target_diameter"]
    else:
        value = (ckpt.get("train") or {}).get("target_diameter")
    return float(value) if value else None


def _network(kind: str) -> tuple[type, type]:
    """``(config class, module class)`` of the network a checkpoint of ``kind`` holds."""
    if kind == SEGMENTER:
        from .config import ArchConfig
        from .nets.attention_unet import AttentionUNet

        return ArchConfig, AttentionUNet
    if kind in (GENERATOR, GAN_STATE):
        from .nets.generator import GeneratorConfig, StyleUNetGenerator

        return GeneratorConfig, StyleUNetGenerator
    raise CheckpointError(
        f"the checkpoint holds a {kind!r} model, which this version of napari-sagegan cannot "
        f"rebuild (it knows: {', '.join(KINDS)})"
    )


@dataclass(eq=False)
class Checkpoint(Mapping):
    """A model with everything needed to rebuild, reuse and resume it.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    arch : dict
        The architecture config (``to_dict``) the weights are rebuilt from.
    state_dict : dict of str to torch.Tensor
        The weights, on the CPU.
    train : dict or None
        The training config (``TrainConfig`` for a segmenter, ``GanConfig`` for phase 2).
    infer : dict or None
        The model's recommended inference settings (``InferConfig``: threshold,
        seed_threshold, ...), read by the segmenter as its defaults.
    target_diameter : float or None
        The model's network scale: particle diameter in network pixels that images are
        resampled to (``None``: images are used at their own scale).
    seed, epoch, step : int
        Seed of the run, epochs and optimisation steps done.
    metrics : dict of str to float
        Validation scores of these weights.
    optimizer : dict or None
        Optimiser state, for resuming.
    extra : dict
        Kind-specific primitives and tensors (history, mask statistics, resume state).
    versions : dict of str to str
        Package versions that wrote it (filled in by :meth:`from_model`).
    half : bool
        Store floating-point weights as float16 (half the file; cast back on :meth:`build`).
    format_version : int
        Format of the file it was read from (:data:`FORMAT_VERSION` when written now).
    source : str
        Where it was loaded from (the file, for messages); not part of the payload.
    """

    kind: str
    arch: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    train: dict[str, Any] | None = None
    infer: dict[str, Any] | None = None
    target_diameter: float | None = None
    seed: int = 0
    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    half: bool = False
    format_version: int = FORMAT_VERSION
    source: str = "the checkpoint"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module | None,
        *,
        kind: str = SEGMENTER,
        arch: Any,
        state_dict: dict[str, torch.Tensor] | None = None,
        train: Any = None,
        infer: Any = None,
        target_diameter: float | None = None,
        seed: int = 0,
        epoch: int = 0,
        step: int = 0,
        metrics: dict[str, float] | None = None,
        optimizer: dict | None = None,
        extra: dict | None = None,
        half: bool = False,
    ) -> Checkpoint:
        """A checkpoint of ``model`` (its weights copied to the CPU from the unwrapped
        module) or of ``state_dict`` when given. ``arch``, ``train`` and ``infer`` are
        configs or dicts. ``target_diameter`` defaults to ``train``'s."""
        if state_dict is None:
            if model is None:
                raise ValueError("Checkpoint.from_model needs a model or a state_dict")
            state = state_on_cpu(model)
        else:
            state = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
        train_dict = _as_dict(train)
        if target_diameter is None and train_dict is not None:
            target_diameter = train_dict.get("target_diameter")
        return cls(
            kind=kind,
            arch=_as_dict(arch) or {},
            state_dict=state,
            train=train_dict,
            infer=_as_dict(infer),
            target_diameter=None if target_diameter is None else float(target_diameter),
            seed=int(seed),
            epoch=int(epoch),
            step=int(step),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            optimizer=optimizer,
            extra=dict(extra or {}),
            versions=_versions(),
            half=bool(half),
        )

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any], *, source: str = "the checkpoint") -> Checkpoint:
        """A checkpoint from a loaded payload (a file's dict, or an in-memory dict holding at
        least ``arch`` and ``state_dict``; ``kind`` defaults to ``segmenter``)."""
        for key in ("arch", "state_dict"):
            if key not in payload:
                raise CheckpointError(f"{source} is incomplete: it has no {key!r} entry")
        train = payload.get("train")
        diameter = target_diameter_of(payload)
        return cls(
            kind=str(payload.get("kind", SEGMENTER)),
            arch=dict(payload["arch"]),
            state_dict=dict(payload["state_dict"]),
            train=None if train is None else dict(train),
            infer=None if payload.get("infer") is None else dict(payload["infer"]),
            target_diameter=None if diameter is None else float(diameter),
            seed=int(payload.get("seed", 0)),
            epoch=int(payload.get("epoch", 0)),
            step=int(payload.get("step", 0)),
            metrics=dict(payload.get("metrics") or {}),
            optimizer=payload.get("optimizer"),
            extra=dict(payload.get("extra") or {}),
            versions=dict(payload.get("versions") or {}),
            half=bool(payload.get("half", False)),
            format_version=int(payload.get("format_version", FORMAT_VERSION)),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The payload written to disk (floating weights as float16 when ``half``)."""
        state = self.state_dict
        if self.half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "arch": self.arch,
            "train": self.train,
            "infer": self.infer,
            "target_diameter": self.target_diameter,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "metrics": self.metrics,
            "versions": self.versions or _versions(),
            "half": self.half,
            "state_dict": state,
            "optimizer": self.optimizer,
            "extra": self.extra,
        }

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint to ``path`` atomically (temporary file, then rename).

        Raises
        ------
        CheckpointError
            A weight (or a tensor in ``extra``) is NaN or infinite: such a model would only
            give empty segmentations, and ``path`` is left as it was.
        """
        bad = first_nonfinite({"state_dict": self.state_dict, "extra": self.extra})
        if bad is not None:
            raise CheckpointError(
                f"refusing to write {path}: the model's {bad} holds NaN or infinite values "
                "(training diverged); lower the learning rate and train again"
            )
        return atomic_torch_save(self.to_dict(), path)

    def check_finite(self) -> Checkpoint:
        """Raise :class:`CheckpointError` (naming :attr:`source`) when a weight, a tensor in
        ``extra`` or the optimiser state holds NaN or infinite values; return ``self``."""
        bad = first_nonfinite(
            {"state_dict": self.state_dict, "extra": self.extra, "optimizer": self.optimizer}
        )
        if bad is not None:
            raise CheckpointError(
                f"{self.source} is damaged: its {bad} holds NaN or infinite values, so the "
                "model cannot segment anything; use another checkpoint or train it again"
            )
        return self

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | Mapping[str, Any] | Checkpoint | None,
        kind: str | None = SEGMENTER,
    ) -> Checkpoint:
        """Load and validate a checkpoint; never executes code from a file.

        Parameters
        ----------
        source : path, ``"default"``, ``None``, dict or Checkpoint
            A file (``None`` / ``"default"``: the bundled segmenter), a payload already in
            memory, or a checkpoint (returned as it is after the kind check).
        kind : str or None
            The kind needed here (``None``: any).

        Raises
        ------
        FileNotFoundError
            The file does not exist (or there is no bundled model of that kind).
        CheckpointError
            The file is damaged, is not a napari-sagegan checkpoint, carries code (a pickled
            object that a safe load refuses), was written by a newer version, or is of
            another ``kind``.
        """
        if isinstance(source, Checkpoint):
            ckpt, name = source, source.source
        elif isinstance(source, Mapping):
            ckpt, name = cls._from_payload(source, "the checkpoint"), "the checkpoint"
        else:
            path = resolve_model_path(source, kind or SEGMENTER)
            payload = _read(path)
            name = str(path)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                hint = ""
                if (
                    isinstance(payload, dict)
                    and payload
                    and all(isinstance(v, torch.Tensor) for v in payload.values())
                ):
                    hint = (
                        " It looks like a bare state dict, which does not say how to rebuild "
                        "the model."
                    )
                raise CheckpointError(f"{path} is not a napari-sagegan checkpoint.{hint}")
            if int(payload.get("format_version", 0)) > FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} was written by a newer napari-sagegan (format "
                    f"{payload['format_version']}); upgrade napari-sagegan to read it"
                )
            if kind is not None and payload.get("kind") != kind:
                raise CheckpointError(
                    f"{path} holds a {payload.get('kind')!r} model, but a {kind!r} model is "
                    "needed here"
                )
            ckpt = cls._from_payload(payload, name)
        if kind is not None and ckpt.kind != kind:
            raise CheckpointError(
                f"{name} holds a {ckpt.kind!r} model, but a {kind!r} model is needed here"
            )
        return ckpt.check_finite()

    @classmethod
    def _from_payload(cls, payload: Mapping[str, Any], name: str) -> Checkpoint:
        """:meth:`from_dict` with every malformed entry (a field of the wrong type, weights
        that are not tensors) reported as a :class:`CheckpointError` naming ``name``."""
        try:
            ckpt = cls.from_dict(payload, source=name)
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(
                f"{name} is damaged or incomplete ({type(err).__name__}: {err}); use a "
                "checkpoint written by napari-sagegan"
            ) from err
        if not all(isinstance(v, torch.Tensor) for v in ckpt.state_dict.values()):
            raise CheckpointError(
                f"{name} is damaged or incomplete: its state_dict holds entries that are not "
                "tensors; use a checkpoint written by napari-sagegan"
            )
        return ckpt

    # ------------------------------------------------------------------ the model
    def arch_config(self) -> Any:
        """The architecture as its config object (``ArchConfig`` or ``GeneratorConfig``)."""
        config_cls, _ = _network(self.kind)
        try:
            return config_cls.from_dict(dict(self.arch))
        except (TypeError, ValueError) as err:
            what = "segmenter" if self.kind == SEGMENTER else self.kind
            raise CheckpointError(
                f"{self.source}: the {what} architecture it describes is invalid ({err}); use a "
                "checkpoint written by napari-sagegan"
            ) from err

    def build(self) -> torch.nn.Module:
        """The network rebuilt from :attr:`arch` with these weights (``strict=True``), in
        float32 and eval mode, on the CPU."""
        _, module_cls = _network(self.kind)
        model = module_cls(self.arch_config())
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            what = "segmenter" if self.kind == SEGMENTER else self.kind
            detail = " ".join(str(err).split())
            detail = detail if len(detail) <= 240 else detail[:237] + "..."
            raise CheckpointError(
                f"{self.source}: the {what} weights do not fit its architecture ({detail}); "
                "the file is damaged or was edited: use a checkpoint written by napari-sagegan"
            ) from err
        return model.eval()

    # ------------------------------------------------------------------ read-only mapping
    def __getitem__(self, key: str) -> Any:
        if key == "format":
            return FORMAT
        if key not in _KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def load_segmenter(
    path: str | os.PathLike | None,
) -> tuple[torch.nn.Module, Checkpoint]:
    """Load a segmenter checkpoint (``None`` / ``"default"``: the bundled model) and
    rebuild its network: ``(AttentionUNet in eval mode, Checkpoint)``."""
    ckpt = Checkpoint.load(path, kind=SEGMENTER)
    return ckpt.build(), ckpt
