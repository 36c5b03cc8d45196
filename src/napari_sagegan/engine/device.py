"""Device choice: ``auto | cpu | cuda | mps``, resolved once and shown to the user; the
arithmetic the network runs in (:func:`autocast_dtype`); and how many CPU threads torch may
use beside a GUI (:func:`gui_threads`, :func:`torch_threads`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
#: What the network's convolutions may compute in (``InferConfig.precision``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: CPU feature flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX512-BF16 (Intel
#: Cooper Lake and later, AMD Zen 4 and later) and AMX.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name``.

    ``auto`` picks CUDA, then Apple MPS, then the CPU. Asking for a device that this machine
    lacks raises a ``ValueError`` that says so and suggests ``cpu``.
    """
    name = (name or "auto").lower()
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but no CUDA GPU is available; use --device cpu"
        )
    if name == "mps" and not _mps_available():
        raise ValueError(
            "device 'mps' was asked for but Apple MPS is not available; use --device cpu"
        )
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """A short human-readable name, e.g. ``cuda (NVIDIA H100)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n != 1 else ''})"
    return device.type


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` among
    the flags of ``cpuinfo``). Elsewhere (no such file, other CPUs) ``False``: there
    bfloat16 is emulated and slower than float32."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool(_BF16_FLAGS & set(line.split(":", 1)[-1].split()))
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network's forward pass is autocast to on ``device``, or ``None`` for
    float32 throughout.

    ``fp32``: none. ``bf16`` / ``fp16``: that type (fp16 on the GPU only). ``auto``: float16
    on a CUDA GPU; bfloat16 on a CPU that computes it natively (:func:`cpu_has_native_bf16`:
    2.3-3.7x the float32 speed of the bundled network on a 2-core AMD EPYC, its maps within
    0.05 of float32's and the same F1 and size bias on the EMPS validation,
    docs/benchmarks.md); float32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(
                "precision fp16 needs a CUDA GPU (float16 convolutions on a CPU are slower "
                "than float32); use bf16 or fp32 on the CPU"
            )
        return torch.float16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def gui_threads() -> int:
    """Torch threads for work running beside a GUI's event loop: all cores but one.

    On a 2-core laptop that is 1 thread, which leaves a core to the event loop.
    """
    import os

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Limit torch's intra-op threads to ``n`` while the block runs (``None``: unchanged).

    Used while a viewer is open (see :func:`gui_threads`): one compute thread on a 2-core
    laptop leaves the other core to the event loop, which keeps the GUI responsive.
    """
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
