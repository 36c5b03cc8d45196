"""Self-describing checkpoints, written atomically and loaded without executing code.

A checkpoint is one file holding a dict of primitives and tensors::

    {"format": "napari-sagegan", "format_version": 1, "kind": "segmenter",
     "arch": {...ArchConfig}, "train": {...TrainConfig} | None, "infer": {...} | None,
     "seed": int, "epoch": int, "step": int, "metrics": {name: float},
     "versions": {"napari_sagegan": str, "torch": str},
     "state_dict": {...}, "optimizer": {...} | None, "extra": {...}}

It is written to a temporary file in the target folder and renamed, so a crash never leaves
a half-written model, and read with ``torch.load(weights_only=True)``: a file that carries
code (a pickled object) is refused before anything runs.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from napari_sagegan.engine.config import ArchConfig
from napari_sagegan.engine.nets.attention_unet import AttentionUNet
from napari_sagegan.util.files import atomic_path

FORMAT = "napari-sagegan"
FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "default"


class CheckpointError(ValueError):
    """A file that is not a usable napari-sagegan checkpoint."""


def _versions() -> dict[str, str]:
    from napari_sagegan import __version__

    return {"napari_sagegan": str(__version__), "torch": torch.__version__.split("+")[0]}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    kind: str = "segmenter",
    arch: ArchConfig,
    train: dict | None = None,
    infer: dict | None = None,
    seed: int = 0,
    epoch: int = 0,
    step: int = 0,
    metrics: dict[str, float] | None = None,
    optimizer: dict | None = None,
    extra: dict | None = None,
    half: bool = False,
) -> Path:
    """Write a checkpoint of ``model`` (saved from the unwrapped module, on the CPU).

    ``half`` stores floating-point weights as float16 (half the file size; they are cast
    back to float32 on load) - used for the bundled default model.
    """
    module = getattr(model, "_orig_mod", model)
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu")
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.clone()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "arch": arch.to_dict(),
        "train": train,
        "infer": infer,
        "seed": int(seed),
        "epoch": int(epoch),
        "step": int(step),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "versions": _versions(),
        "state_dict": state,
        "optimizer": optimizer,
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


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


def load_checkpoint(path: str | os.PathLike, kind: str | None = "segmenter") -> dict[str, Any]:
    """Load and validate a checkpoint; never executes code from the file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    CheckpointError
        The file is damaged, is not a napari-sagegan checkpoint, carries code (a pickled
        object that a safe load refuses), or is of another ``kind``.
    """
    path = resolve_model_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if (
            isinstance(ckpt, dict)
            and ckpt
            and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        ):
            hint = " It looks like a bare state dict, which does not say how to rebuild the model."
        raise CheckpointError(f"{path} is not a napari-sagegan checkpoint.{hint}")
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer napari-sagegan (format {ckpt['format_version']}); "
            "upgrade napari-sagegan to read it"
        )
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(
            f"{path} holds a {ckpt.get('kind')!r} model, but a {kind!r} model is needed here"
        )
    for key in ("arch", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is incomplete: it has no {key!r} entry")
    return ckpt


def build_segmenter(ckpt: dict[str, Any]) -> AttentionUNet:
    """Rebuild the segmenter described by a loaded checkpoint (``strict=True``), in eval mode."""
    try:
        arch = ArchConfig.from_dict(dict(ckpt["arch"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's architecture is invalid: {err}") from err
    model = AttentionUNet(arch)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint's weights do not fit its architecture: {str(err).splitlines()[0]}"
        ) from err
    model.eval()
    return model


def load_segmenter(path: str | os.PathLike | None) -> tuple[AttentionUNet, dict[str, Any]]:
    """Load a segmenter checkpoint (``None`` / ``"default"``: the bundled model)."""
    ckpt = load_checkpoint(path, kind="segmenter")
    return build_segmenter(ckpt), ckpt
