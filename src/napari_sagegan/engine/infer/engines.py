"""Optional inference engines: the segmenter run by ONNX Runtime or OpenVINO on the CPU.

The network the segmenter runs (its BatchNorm-folded inference copy,
:func:`~napari_sagegan.engine.nets.attention_unet.fuse_batchnorm`) is exported to ONNX in
memory (:func:`onnx_bytes`; no file is written) and handed to an engine, which returns a
tile prediction function with the torch one's contract: ``(N, 1, H, W)`` float32 tiles in
``[-1, 1]`` (``H``, ``W`` multiples of the network's divisor) in, probability maps
``(N, 1 + dist [+ attention], H, W)`` out, as a CPU tensor. The exported graph outputs

- ``maps`` ``(N, 1 + dist, H, W)``: channel 0 the particle probability (softmax of the two
  class logits), channel 1 (with a distance head) the normalised distance to the edge
  (sigmoid), i.e. :func:`~napari_sagegan.engine.nets.attention_unet.maps_from_logits`;
- ``attention`` ``(N, 1, H, W)``: the last attention gate's map.

Engines (:data:`ENGINES`): ``torch`` (PyTorch eager, the reference), ``onnxruntime``
(``CPUExecutionProvider``), ``openvino`` (``CPU``), ``auto`` (the first of
:data:`AUTO_ORDER` that is installed, else torch, silently). An engine that is not
installed, or whose session fails to build, falls back to torch with one warning per
segmenter; so does an engine asked for on a GPU (these run on the CPU only). The engines'
packages are imported only here, and only when one is asked for (the ``onnx`` and
``openvino`` extras of the package).

Measured on a 2-core CPU (docs/benchmarks.md, ``bench-engines``): see there for the speed
of each engine against torch at equal output.
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nets.attention_unet import maps_from_logits

#: The engines :class:`~napari_sagegan.engine.config.InferConfig` accepts.
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
#: What ``auto`` tries, in order (the fastest at equal output first, docs/benchmarks.md).
AUTO_ORDER = ("onnxruntime", "openvino")
#: ONNX opset of the exported graph.
OPSET = 17
#: The packages each engine needs (the export needs onnx), and the extra of napari-sagegan
#: that installs them.
_PACKAGES = {
    "onnxruntime": (("onnxruntime", "onnx"), "onnx"),
    "openvino": (("openvino", "onnx"), "openvino"),
}
INPUT_NAME, OUTPUT_NAMES = "image", ("maps", "attention")

PredictFn = Callable[[torch.Tensor], torch.Tensor]


class EngineUnavailable(RuntimeError):
    """An engine that cannot run here (its package is missing, or its session fails)."""


class _MapsAndAttention(nn.Module):
    """The graph that is exported: logits turned into maps, plus the attention map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, psi = self.net(x, return_attention=True)
        return maps_from_logits(logits), psi


def check_engine(engine: str) -> str:
    """``engine`` when it is one of :data:`ENGINES`, else a ``ValueError`` saying which are."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def onnx_bytes(
    net: nn.Module, *, metadata: Mapping[str, str] | None = None, opset: int = OPSET
) -> bytes:
    """Export an inference network (BatchNorm folded, eval mode) to an ONNX model in memory.

    Parameters
    ----------
    net : AttentionUNet
        The network the segmenter runs (``Segmenter.model``); it is not modified.
    metadata : mapping of str to str, optional
        Written as the model's ``metadata_props`` (needs the ``onnx`` package).
    opset : int
        ONNX opset (17 or later).

    Returns
    -------
    bytes
        A serialised ``ModelProto`` with input ``image`` ``(N, 1, H, W)`` and outputs
        ``maps``, ``attention`` (see the module's docstring); batch, height and width are
        dynamic. The input's sides must be multiples of ``2**depth``.
    """
    config = net.config
    side = 2 * config.divisor
    example = torch.zeros(1, config.in_channels, side, side)
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    wrapper = _MapsAndAttention(net).eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the TorchScript exporter: deprecated in favour of dynamo, but it needs no extra
        # package, takes seconds, and gives the same graph
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: axes for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )
    data = buf.getvalue()
    if metadata:
        import onnx

        proto = onnx.load_from_string(data)
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        proto.producer_name = "napari-sagegan"
        data = proto.SerializeToString()
    return data


def _threads() -> int:
    return max(1, int(torch.get_num_threads()))


def onnxruntime_runner(model: bytes) -> Callable[[np.ndarray], list[np.ndarray]]:
    """An ONNX Runtime session (CPU) of ``model``; returns ``run(x) -> [maps, attention]``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})

    return run


def openvino_runner(model: bytes) -> Callable[[np.ndarray], list[np.ndarray]]:
    """An OpenVINO model compiled for the CPU; returns ``run(x) -> [maps, attention]``."""
    import openvino as ov

    core = ov.Core()
    # float32 throughout: on a CPU with native bfloat16 OpenVINO would otherwise compute in
    # it by default, and this engine's maps are to be torch's float32 ones
    compiled = core.compile_model(
        core.read_model(model),
        "CPU",
        {"INFERENCE_NUM_THREADS": _threads(), "INFERENCE_PRECISION_HINT": "f32"},
    )
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in OUTPUT_NAMES]
    lock = threading.Lock()  # one request, reused: one tile batch at a time

    def run(x: np.ndarray) -> list[np.ndarray]:
        with lock:
            result = request.infer({INPUT_NAME: x})
            return [np.array(result[o]) for o in outputs]  # copies: the buffers are reused

    return run


RUNNERS: dict[str, Callable[[bytes], Callable[[np.ndarray], list[np.ndarray]]]] = {
    "onnxruntime": onnxruntime_runner,
    "openvino": openvino_runner,
}


def predict_fn_from_runner(
    run: Callable[[np.ndarray], list[np.ndarray]], with_attention: bool
) -> PredictFn:
    """A tile prediction function (torch tensors in and out) around an engine's ``run``."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        tiles = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        maps, psi = run(tiles)
        if with_attention:
            maps = np.concatenate([maps, psi], axis=1)
        return torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))

    return fn


def installed(engine: str) -> bool:
    """Whether the package ``engine`` needs can be imported (without importing it)."""
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in _PACKAGES[engine][0])


def _build(net: nn.Module, engine: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    packages, extra = _PACKAGES[engine]
    builder = RUNNERS[engine]
    for package in packages:
        try:
            __import__(package)
        except ImportError as err:
            raise EngineUnavailable(
                f"the {engine} engine needs the {package} package, which is not installed "
                f"(pip install 'napari-sagegan[{extra}]')"
            ) from err
    try:
        return builder(onnx_bytes(net))
    except Exception as err:  # noqa: BLE001  (export and engines raise many kinds)
        text = " ".join(str(err).split())[:200] or type(err).__name__
        raise EngineUnavailable(f"the {engine} session could not be built ({text})") from err


def engine_predict_fn(
    net: nn.Module,
    device: torch.device,
    engine: str,
    with_attention: bool,
    cache: dict[str, Any],
) -> PredictFn | None:
    """The tile prediction function of ``engine`` for ``net``, or ``None``: use torch.

    The engine's session is built on first use from ``net`` in memory and kept in ``cache``
    (one dict per segmenter), as is a failure, so that a missing or failing engine warns
    once and torch takes over.

    Parameters
    ----------
    net : AttentionUNet
        The segmenter's inference network (BatchNorm folded).
    device : torch.device
        The segmenter's device; the engines run on the CPU only.
    engine : str
        One of :data:`ENGINES`.
    with_attention : bool
        Append the attention map as the last channel.
    cache : dict
        Where sessions (and failures) are kept between calls.
    """
    check_engine(engine)
    if engine == "torch":
        return None
    if engine == "auto":
        if device.type != "cpu":
            return None
        engine = next((e for e in AUTO_ORDER if installed(e)), "torch")
        if engine == "torch":
            return None
    if device.type != "cpu":
        if f"warned:{device.type}:{engine}" not in cache:
            cache[f"warned:{device.type}:{engine}"] = True
            warnings.warn(
                f"the {engine} engine runs on the CPU only; using torch on {device.type}",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    if engine not in cache:
        try:
            cache[engine] = _build(net, engine)
        except EngineUnavailable as err:
            cache[engine] = None
            warnings.warn(f"{err}; using torch instead", RuntimeWarning, stacklevel=3)
    run = cache[engine]
    return None if run is None else predict_fn_from_runner(run, with_attention)


def describe(net: nn.Module) -> dict[str, str]:
    """The exported graph's inputs and outputs, as ONNX metadata (``str`` values)."""
    config = net.config
    outputs = ["particle probability"] + (
        ["normalised distance to edge"] if config.dist_head else []
    )
    return {
        "input": (
            f"image (N, {config.in_channels}, H, W) float32 in [-1, 1]; H and W multiples of "
            f"{config.divisor}"
        ),
        "outputs": json.dumps({"maps": outputs, "attention": ["last attention gate"]}),
        "divisor": str(config.divisor),
    }
