"""Segment images with a trained segmenter: tiled inference + instance post-processing.

The public entry is :class:`Segmenter`; its :meth:`Segmenter.segment` is a generator of
:class:`~napari_sagegan.engine.progress.Progress` events that returns a
:class:`SegmentResult`. 2-D images ``(Y, X)`` and 3-D stacks ``(Z, Y, X)`` (segmented slice
by slice) are accepted as NumPy arrays, memmaps or dask arrays; only the tiles being
processed are read at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checkpoint import load_segmenter
from .config import InferConfig
from .device import describe_device, resolve_device
from .nets.attention_unet import AttentionUNet, fuse_batchnorm, maps_from_logits
from .postprocess import instances_from_maps
from .progress import Progress, run_to_end
from .tiling import n_tiles, predict_tiled

#: Above this many pixels per slice the probability maps are kept as float16.
_HALF_MAPS_PIXELS = 16_000_000


@dataclass
class SegmentResult:
    """Output of :meth:`Segmenter.segment`.

    Attributes
    ----------
    labels : np.ndarray
        Instance labels, int32, same Y-X (or Z-Y-X) shape as the input, 0 = background.
    prob : np.ndarray or None
        Particle probability in [0, 1], same shape (kept when ``keep_maps``).
    dist : np.ndarray or None
        Normalised distance-to-edge map in [0, 1] (networks with a distance head).
    attention : np.ndarray or None
        The last attention gate's map in [0, 1] (when asked for).
    device : str
        The device actually used.
    """

    labels: np.ndarray
    prob: np.ndarray | None = None
    dist: np.ndarray | None = None
    attention: np.ndarray | None = None
    device: str = "cpu"


def check_image(image: Any) -> tuple[int, ...]:
    """Validate an image's shape; return it. 2-D or 3-D (Z, Y, X) grayscale only."""
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) not in (2, 3):
        raise ValueError(
            f"expected a 2-D image (Y, X) or a 3-D stack (Z, Y, X), got an array of shape "
            f"{shape}; split channels or time points first"
        )
    if min(shape) < 1:
        raise ValueError(f"the image is empty (shape {shape})")
    if np.dtype(getattr(image, "dtype", np.float32)).kind not in "uifb":
        raise ValueError(f"expected a numeric image, got dtype {image.dtype}")
    return shape


class Segmenter:
    """A segmenter network ready for inference on one device.

    Parameters
    ----------
    model : AttentionUNet
        The network; an inference copy (BatchNorm folded, on ``device``) is made here, so
        the caller's model is left untouched.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    checkpoint : dict, optional
        The checkpoint it came from (for its metadata, e.g. the recommended thresholds).
    """

    def __init__(self, model: AttentionUNet, device: str = "auto", checkpoint: dict | None = None):
        self.device = resolve_device(device)
        self.checkpoint = checkpoint or {}
        # BatchNorm folded into the convolutions: same output, fewer passes over memory
        self.model = fuse_batchnorm(model).to(self.device)
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, model: str | os.PathLike | None = "default", device: str = "auto") -> Segmenter:
        """Load a checkpoint file (``"default"``: the bundled model)."""
        net, ckpt = load_segmenter(model)
        return cls(net, device=device, checkpoint=ckpt)

    @property
    def device_name(self) -> str:
        return describe_device(self.device)

    def default_infer_config(self, **overrides: Any) -> InferConfig:
        """The checkpoint's recommended inference settings, with ``overrides`` applied."""
        stored = dict(self.checkpoint.get("infer") or {})
        stored.update({k: v for k, v in overrides.items() if v is not None})
        return InferConfig.from_dict(stored)

    def _predict_fn(self, with_attention: bool):
        model, device = self.model, self.device

        def fn(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            ctx = (
                torch.autocast("cuda", dtype=torch.float16)
                if device.type == "cuda"
                else contextlib.nullcontext()
            )
            with ctx:
                logits, psi = model(x, return_attention=True)
            maps = maps_from_logits(logits)
            if with_attention and psi is not None:
                maps = torch.cat([maps, psi.float()], dim=1)
            return maps

        return fn

    def predict_maps(
        self, image: Any, config: InferConfig | None = None, *, with_attention: bool = False
    ) -> Generator[Progress, None, np.ndarray]:
        """Probability maps ``(K, Y, X)`` of a 2-D image: particle prob, [dist], [attention]."""
        config = config or self.default_infer_config()
        shape = check_image(image)
        if len(shape) != 2:
            raise ValueError(f"predict_maps expects a 2-D image, got shape {shape}")
        out_dtype = np.float16 if shape[0] * shape[1] > _HALF_MAPS_PIXELS else np.float32
        maps = yield from predict_tiled(
            self._predict_fn(with_attention),
            image,
            tile_size=config.tile_size,
            overlap=config.overlap,
            batch_size=config.batch_size,
            divisor=self.model.config.divisor,
            device=self.device,
            out_dtype=out_dtype,
            channels_last=self.device.type == "cpu",
        )
        return maps

    def segment(
        self,
        image: Any,
        config: InferConfig | None = None,
        *,
        with_attention: bool = False,
        keep_maps: bool = False,
    ) -> Generator[Progress, None, SegmentResult]:
        """Segment a 2-D image or a 3-D stack (slice by slice) into instance labels.

        Yields ``Progress(stage="tiles", step, total)`` over all tiles of all slices.
        """
        config = config or self.default_infer_config()
        shape = check_image(image)
        slices = [None] if len(shape) == 2 else list(range(shape[0]))
        yx = shape[-2:]
        per_slice = n_tiles(yx, config.tile_size, config.overlap, self.model.config.divisor)
        total = per_slice * len(slices)
        # 2-D: the slice's labels are the result (no second full-size copy)
        labels = np.zeros(shape, dtype=np.int32) if len(shape) == 3 else None
        keep = keep_maps or with_attention
        prob = dist = att = None
        offset = 0
        done = 0
        for z in slices:
            plane = image if z is None else image[z]
            gen = self.predict_maps(plane, config, with_attention=with_attention)
            try:
                while True:
                    try:
                        ev = next(gen)
                    except StopIteration as stop:
                        maps = stop.value
                        break
                    yield Progress(
                        "tiles",
                        done + ev.step,
                        total,
                        eta_s=None,
                        message=(
                            f"slice {z + 1}/{len(slices)}, tile {ev.step}/{ev.total}"
                            if z is not None
                            else f"tile {ev.step}/{ev.total}"
                        ),
                        data={"slice": z, "device": self.device_name},
                    )
            finally:
                gen.close()
            done += per_slice
            has_dist = self.model.config.dist_head
            lab = instances_from_maps(
                maps[0],
                maps[1] if has_dist else None,
                threshold=config.threshold,
                seed_threshold=config.seed_threshold,
                split=config.split,
                fill_holes=config.fill_holes,
                min_size=config.min_size,
            )
            lab = lab.astype(np.int32, copy=False)
            n = int(lab.max())
            if z is None:
                labels = lab
            else:
                labels[z] = np.where(lab > 0, lab + offset, 0)
            offset += n
            if keep:
                if prob is None:
                    prob = np.zeros(shape, dtype=np.float32)
                    dist = np.zeros(shape, dtype=np.float32) if has_dist else None
                    att = np.zeros(shape, dtype=np.float32) if with_attention else None
                idx = slice(None) if z is None else z
                prob[idx] = maps[0]
                if has_dist:
                    dist[idx] = maps[1]
                if with_attention:
                    att[idx] = maps[-1]
            del maps
        return SegmentResult(
            labels=labels,
            prob=prob if keep_maps else None,
            dist=dist if keep_maps else None,
            attention=att,
            device=self.device_name,
        )

    def segment_sync(
        self, image: Any, config: InferConfig | None = None, **kw: Any
    ) -> SegmentResult:
        """Run :meth:`segment` to the end (no progress)."""
        return run_to_end(self.segment(image, config, **kw))
