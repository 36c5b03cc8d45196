"""Device choice: ``auto | cpu | cuda | mps``, resolved once and shown to the user; and how
many CPU threads torch may use beside a GUI (:func:`gui_threads`, :func:`torch_threads`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


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
