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
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def default_model_path() -> Path:
    """Path of the segmenter bundled with the package."""
    return Path(__file__).resolve().parent.parent / "models" / "default.pt"


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Map ``None`` / ``"default"`` to the bundled model, else check that the file exists."""
    if model is None or str(model) == DEFAULT_MODEL_NAME:
        path = default_model_path()
        if not path.is_file():
            raise FileNotFoundError(
                "the bundled default model is missing from this installation "
                f"({path}); reinstall napari-sagegan or pass --model MODEL.pt"
            )
        return path
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    return path


def _read(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with messages a user understands."""
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
            "(nothing in it was run)"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {path}: the file is damaged or is not a PyTorch checkpoint ({err})"
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
        """Write the checkpoint to ``path`` atomically (temporary file, then rename)."""
        return atomic_torch_save(self.to_dict(), path)

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
            ckpt, name = source, "the checkpoint"
        elif isinstance(source, Mapping):
            ckpt, name = cls.from_dict(source), "the checkpoint"
        else:
            if kind not in (None, SEGMENTER) and (
                source is None or str(source) == DEFAULT_MODEL_NAME
            ):
                raise FileNotFoundError(
                    f"there is no bundled {kind} model; give a {kind}.pt file"
                    if kind != GENERATOR
                    else "there is no bundled generator; give a generator.pt file"
                )
            path = resolve_model_path(source)
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
            ckpt = cls.from_dict(payload, source=name)
        if kind is not None and ckpt.kind != kind:
            raise CheckpointError(
                f"{name} holds a {ckpt.kind!r} model, but a {kind!r} model is needed here"
            )
        return ckpt

    # ------------------------------------------------------------------ the model
    def arch_config(self) -> Any:
        """The architecture as its config object (``ArchConfig`` or ``GeneratorConfig``)."""
        config_cls, _ = _network(self.kind)
        try:
            return config_cls.from_dict(dict(self.arch))
        except (TypeError, ValueError) as err:
            what = "the checkpoint's" if self.kind == SEGMENTER else f"the {self.kind} checkpoint's"
            raise CheckpointError(f"{what} architecture is invalid: {err}") from err

    def build(self) -> torch.nn.Module:
        """The network rebuilt from :attr:`arch` with these weights (``strict=True``), in
        float32 and eval mode, on the CPU."""
        _, module_cls = _network(self.kind)
        model = module_cls(self.arch_config())
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            what = "checkpoint's" if self.kind == SEGMENTER else f"{self.kind}'s"
            raise CheckpointError(
                f"the {what} weights do not fit its architecture: {str(err).splitlines()[0]}"
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
