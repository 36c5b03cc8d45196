"""Export a segmenter for other tools: :func:`export_model` (ONNX, or a bioimage.io model
package). See :mod:`napari_sagegan.api` for the map.

The ONNX graph is the network the segmenter runs (BatchNorm folded), with the probability
maps computed in the graph (:mod:`napari_sagegan.engine.infer.engines`); what another tool
needs to use it is in the model's ``metadata_props`` (:func:`onnx_metadata`): the input
normalisation, the network scale (the particle diameter images are resampled to), the
thresholds and the rest of the model's inference settings, its architecture and scores.

The bioimage.io package (``format="bioimageio"``) is a folder, or a ``.zip``, holding
``rdf.yaml`` (model-zoo format 0.5), the ONNX weights, the TorchScript weights, a README,
and a test input / output pair (``.npy``) computed here by the same network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_sagegan.util.files import (
    atomic_path,
    new_file,
    new_folder,
    refuse_overwriting_inputs,
    staged_folder,
)
from napari_sagegan.util.progress import Progress

PathLike = str | os.PathLike
#: What :func:`export_model` writes.
FORMATS = ("onnx", "bioimageio")
#: The ``format`` entry of the ONNX metadata, and its version.
ONNX_FORMAT, ONNX_FORMAT_VERSION = "napari-sagegan-onnx", 1
#: Files of a bioimage.io package.
RDF, ONNX_FILE, TORCHSCRIPT_FILE = "rdf.yaml", "model.onnx", "model.torchscript.pt"
TEST_INPUT, TEST_OUTPUT, TEST_ATTENTION = "test_input.npy", "test_maps.npy", "test_attention.npy"
README = "README.md"
#: Side of the test image of a bioimage.io package, pixels.
TEST_SIDE = 256


@dataclass
class Exported:
    """What :func:`export_model` wrote: ``path`` (the ``.onnx`` file, the package folder or
    zip), its ``format`` and the ONNX ``metadata`` it carries."""

    path: Path
    format: str
    metadata: dict[str, str] = field(default_factory=dict)


def _check_out(out: PathLike, format: str) -> tuple[Path, bool]:
    """The output path, and whether it is a zip (a bioimage.io package); refused early."""
    path = Path(out).expanduser()
    if format == "onnx":
        if path.suffix.lower() != ".onnx":
            raise ValueError(
                f"--out {path} must be a file name ending in .onnx (e.g. model.onnx), for "
                "--format onnx"
            )
        return new_file(path, example="model.onnx"), False
    if path.suffix.lower() == ".zip":
        return new_file(path, example="model.zip"), True
    if path.suffix:
        raise ValueError(
            f"--out {path} must be a folder or a .zip file for --format bioimageio (e.g. "
            "sagegan-model/ or sagegan-model.zip)"
        )
    return new_folder(path, empty=True), False


def _load(model: Any):
    """The segmenter checkpoint ``model`` names; anything else is refused."""
    from napari_sagegan.engine.checkpoint import SEGMENTER, Checkpoint

    ckpt = Checkpoint.load(model, kind=None)
    if ckpt.kind != SEGMENTER:
        raise ValueError(
            f"{ckpt.source} holds a {ckpt.kind!r} model, not a segmenter: export writes "
            "segmenters only; give a segmenter checkpoint (written by train, augment's "
            "segmenter.pt) or 'default'"
        )
    return ckpt


def onnx_metadata(segmenter: Any, source: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported segmenter: what another tool needs to run it.

    Keys: ``format``, ``format_version``, ``napari_sagegan_version``, ``source``,
    ``input``, ``outputs``, ``divisor`` (input sides must be multiples of it),
    ``normalization`` (JSON: the percentile stretch to ``[-1, 1]``), ``target_diameter_px``
    (the network scale: particle diameter, network pixels, images are resampled to; empty
    when images are used at their own scale), ``threshold``, ``seed_threshold``,
    ``min_size_px``, ``min_confidence``, ``infer`` (JSON: all inference settings), ``arch`` (JSON),
    ``metrics`` (JSON) and ``usage``.
    """
    import inspect

    from napari_sagegan import __version__
    from napari_sagegan.engine.data.intensity import robust_range
    from napari_sagegan.engine.infer.engines import describe

    params = inspect.signature(robust_range).parameters
    infer = segmenter.default_infer_config()
    ckpt = segmenter.checkpoint
    target = segmenter.target_diameter
    meta = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "napari_sagegan_version": str(__version__),
        "source": source,
        **describe(segmenter.model),
        "normalization": json.dumps(
            {
                "method": "percentile stretch of the whole image, then clipped",
                "low_percentile": params["low"].default,
                "high_percentile": params["high"].default,
                "low_maps_to": -1.0,
                "high_maps_to": 1.0,
                "clip": [-1.0, 1.0],
                "non_finite_pixels": "the image's finite median",
            }
        ),
        "target_diameter_px": "" if target is None else f"{target:g}",
        "threshold": f"{infer.threshold:g}",
        "seed_threshold": f"{infer.seed_threshold:g}",
        "min_size_px": str(infer.min_size),
        "min_confidence": f"{infer.min_confidence:g}",
        "infer": json.dumps(infer.to_dict()),
        "arch": json.dumps(dict(ckpt.get("arch") or {})),
        "metrics": json.dumps(dict(ckpt.get("metrics") or {})),
        "usage": (
            "resample the image so that its particles are target_diameter_px across, "
            "normalise it as 'normalization' says, pad both sides to a multiple of 'divisor' "
            "(tiles of infer.tile_size with overlap), run; particles: maps[:, 0] > threshold, "
            "split at maps[:, 1] > seed_threshold (watershed), objects under min_size_px "
            "removed, then the particles whose confidence (napari_sagegan.engine.infer."
            "confidence: geometric mean of interior probability, contrast to a 2-px ring and "
            "distance peak) is under min_confidence"
        ),
    }
    return meta


def export_model(
    model: Any = "default",
    out: PathLike = "model.onnx",
    *,
    format: str = "onnx",
) -> Generator[Progress, None, Exported]:
    """Export a segmenter to ONNX, or to a bioimage.io model package.

    Parameters
    ----------
    model : path, ``"default"`` or Checkpoint
        A segmenter checkpoint (a generator or another kind is refused).
    out : path
        ``format="onnx"``: a ``.onnx`` file. ``format="bioimageio"``: a new or empty folder,
        or a ``.zip`` file. Written atomically (nothing is left on an error).
    format : {"onnx", "bioimageio"}
        What to write.

    Returns
    -------
    Exported
        The path written, the format and the ONNX metadata (:func:`onnx_metadata`).

    Raises
    ------
    ValueError
        An unknown format, a bad ``out`` (wrong suffix, a folder that is not empty), a
        checkpoint that is not a segmenter, or the ``onnx`` package missing.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ValueError(
            "exporting needs the onnx package, which is not installed: "
            "pip install 'napari-sagegan[onnx]'"
        )
    path, is_zip = _check_out(out, format)
    if isinstance(model, (str, os.PathLike)) and str(model) != "default":
        refuse_overwriting_inputs([path], [model])
    yield Progress("export", 0, 3, message="loading the model")
    ckpt = _load(model)

    from napari_sagegan.engine.infer.engines import onnx_bytes
    from napari_sagegan.engine.infer.segment import Segmenter

    seg = Segmenter(ckpt.build(), device="cpu", checkpoint=ckpt)
    source = Path(ckpt.source).name if ckpt.source != "the checkpoint" else "in memory"
    meta = onnx_metadata(seg, source)
    yield Progress("export", 1, 3, message="exporting the network to ONNX")
    data = onnx_bytes(seg.model, metadata=meta)
    yield Progress("export", 2, 3, message=f"writing {path}")
    if format == "onnx":
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    elif is_zip:
        import zipfile

        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, blob in _bioimageio_files(seg, data, meta).items():
                zf.writestr(name, blob)
    else:
        with staged_folder(path) as folder:
            for name, blob in _bioimageio_files(seg, data, meta).items():
                (folder / name).write_bytes(blob)
    yield Progress("export", 3, 3, message=f"wrote {path}")
    return Exported(path=path, format=format, metadata=meta)


# --------------------------------------------------------------------------- bioimage.io


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _npy(array: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def _bioimageio_files(seg: Any, onnx_data: bytes, meta: dict[str, str]) -> dict[str, bytes]:
    """Every file of the bioimage.io package, by name."""
    import io
    import warnings

    import numpy as np
    import torch
    import yaml

    from napari_sagegan.engine.data.intensity import apply_range, robust_range
    from napari_sagegan.engine.infer.engines import _MapsAndAttention
    from napari_sagegan.engine.synthetic.render import make_sample

    image, _ = make_sample("tem_hex", shape=(TEST_SIDE, TEST_SIDE), seed=0)
    test_in = np.asarray(image, np.float32)[None, None]
    net = _MapsAndAttention(seg.model).eval()
    x = torch.from_numpy(apply_range(test_in, *robust_range(test_in)))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # shape checks traced as constants: sides fixed to
        maps, psi = net(x)  # multiples of the divisor, as the rdf says
        traced = torch.jit.trace(net, x, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    files = {
        ONNX_FILE: onnx_data,
        TORCHSCRIPT_FILE: buf.getvalue(),
        TEST_INPUT: _npy(test_in),
        TEST_OUTPUT: _npy(maps.numpy()),
        TEST_ATTENTION: _npy(psi.numpy()),
    }
    files[README] = _readme(meta).encode()
    rdf = _rdf(seg, meta, files)
    files[RDF] = yaml.safe_dump(rdf, sort_keys=False).encode()
    return files


def _readme(meta: dict[str, str]) -> str:
    target = meta["target_diameter_px"] or "their own scale"
    return (
        "# napari-sagegan nanoparticle segmenter\n\n"
        "Attention U-Net (SAGE-GAN phase 1) that segments nanoparticles in electron "
        "micrographs. Exported by napari-sagegan "
        f"{meta['napari_sagegan_version']} from {meta['source']}.\n\n"
        f"- Input: {meta['input']}, normalised by a robust percentile stretch "
        "(see rdf.yaml's preprocessing).\n"
        f"- Particles should be about {target} px across: resample the image first.\n"
        "- Output `maps`: channel 0 the particle probability (threshold "
        f"{meta['threshold']}), channel 1 the normalised distance to the particle's edge "
        f"(seeds above {meta['seed_threshold']} split touching particles by watershed); "
        "`attention`: the last attention gate's map.\n\n"
        "napari-sagegan (`sagegan segment`) does all of this: tiling, resampling, the "
        "particle size search and the instance post-processing.\n\n"
        "# Validation\n\n"
        "The test output was computed by the network napari-sagegan runs (PyTorch, "
        "BatchNorm folded) on a generated TEM image; napari-sagegan's tests check that the "
        "ONNX weights reproduce it within 1e-4 and that ONNX Runtime gives PyTorch's maps "
        "and labels. Accuracy on real micrographs: see napari-sagegan's model card "
        "(docs/model-card.md) and docs/benchmarks.md.\n"
    )


def _rdf(seg: Any, meta: dict[str, str], files: dict[str, bytes]) -> dict[str, Any]:
    """The ``rdf.yaml`` of the package (bioimage.io model format 0.5)."""
    import torch

    from napari_sagegan.engine.infer.engines import OPSET

    config = seg.model.config
    step = config.divisor
    space = [
        {"type": "space", "id": axis, "size": {"min": step, "step": step}} for axis in ("y", "x")
    ]
    out_space = [
        {"type": "space", "id": axis, "size": {"tensor_id": "image", "axis_id": axis}}
        for axis in ("y", "x")
    ]
    norm = json.loads(meta["normalization"])
    channels = ["particle_probability"] + (["distance_to_edge"] if config.dist_head else [])
    target = meta["target_diameter_px"]
    return {
        "type": "model",
        "format_version": "0.5.4",
        "name": "napari-sagegan nanoparticle segmenter",
        "description": (
            "Attention U-Net segmenting nanoparticles in electron micrographs (particle "
            "probability and distance-to-edge maps)"
            + (f"; particles should be resampled to {target} px across" if target else "")
        ),
        "authors": [{"name": "napari-sagegan developers"}],
        "cite": [
            {
                "text": "Pal, Ajith, Bhattacharya, Ghosh: SAGE-GAN (2026)",
                "url": "https://arxiv.org/abs/2604.03637",
            }
        ],
        "license": "BSD-3-Clause",
        "documentation": README,
        "tags": ["electron-microscopy", "nanoparticles", "segmentation", "2d", "unet"],
        "inputs": [
            {
                "id": "image",
                "description": "grayscale micrograph, particles at the network scale",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["grey"]}] + space,
                "test_tensor": {"source": TEST_INPUT, "sha256": _sha256(files[TEST_INPUT])},
                "data": {"type": "float32"},
                "preprocessing": [
                    {
                        "id": "scale_range",
                        "kwargs": {
                            "axes": ["y", "x"],
                            "min_percentile": norm["low_percentile"],
                            "max_percentile": norm["high_percentile"],
                        },
                    },
                    {"id": "scale_linear", "kwargs": {"gain": 2.0, "offset": -1.0}},
                    {"id": "clip", "kwargs": {"min": -1.0, "max": 1.0}},
                ],
            }
        ],
        "outputs": [
            {
                "id": "maps",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channels}]
                + out_space,
                "test_tensor": {"source": TEST_OUTPUT, "sha256": _sha256(files[TEST_OUTPUT])},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            },
            {
                "id": "attention",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["attention"]}]
                + out_space,
                "test_tensor": {
                    "source": TEST_ATTENTION,
                    "sha256": _sha256(files[TEST_ATTENTION]),
                },
                "data": {"type": "float32", "range": [0.0, 1.0]},
            },
        ],
        "weights": {
            "onnx": {
                "source": ONNX_FILE,
                "sha256": _sha256(files[ONNX_FILE]),
                "opset_version": OPSET,
                "parent": "torchscript",  # both traced from the same PyTorch network
            },
            "torchscript": {
                "source": TORCHSCRIPT_FILE,
                "sha256": _sha256(files[TORCHSCRIPT_FILE]),
                "pytorch_version": torch.__version__.split("+")[0],
            },
        },
        "config": {"napari_sagegan": {k: v for k, v in meta.items() if k != "usage"}},
    }
