"""Segment images with a trained segmenter: tiled inference + instance post-processing.

The public entry is :class:`Segmenter`; its :meth:`Segmenter.segment` is a generator of
:class:`~napari_sagegan.util.progress.Progress` events that returns a
:class:`SegmentResult`. 2-D images ``(Y, X)`` and 3-D stacks ``(Z, Y, X)`` (segmented slice
by slice) are accepted as NumPy arrays, memmaps or dask arrays; only the tiles being
processed are read at a time.

Why one module of ~550 lines: :meth:`Segmenter.segment` is one pipeline (particle size,
tiled maps, instances, annotations, the size check that votes between candidate scales) whose steps
share the segmenter's device, fused network and tile plan; the size search itself is in
:mod:`.autoscale`, the tiling in :mod:`.tiling`, the instances in :mod:`.postprocess`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Generator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ...util.progress import Progress, relay, run_to_end
from ..checkpoint import load_segmenter
from ..config import InferConfig
from ..data.intensity import NoFiniteValue, has_finite, nonfinite_mask
from ..device import autocast_dtype, describe_device, resolve_device
from ..nets.attention_unet import (
    AttentionUNet,
    fuse_batchnorm,
    maps_from_logits,
)
from .annotations import exclude as exclude_annotations
from .annotations import find_annotations
from .autoscale import LADDER, MIN_COUNT, search_scale
from .confidence import drop_unsure, particle_confidence
from .postprocess import instances_from_maps
from .scale import (
    ScaleInfo,
    band_factor,
    estimate_diameter,
    median_diameter,
)
from .tiling import _resolve_range, n_tiles, predict_tiled

#: Above this many pixels per slice the probability maps are kept as float16.
_HALF_MAPS_PIXELS = 16_000_000
#: Above this many pixels per slice the size vote keeps no pass but the one running (the
#: winner's is computed again), so its peak memory is one pass's.
_VOTE_KEEP_PIXELS = 16_000_000
#: Whether the scale search measures the particles of a crop it shrinks on the network's
#: grid (:meth:`Segmenter._network_crop_labels`) rather than on the crop's: 20 % less time
#: per search and the same rungs (sizes within 0.8 % on 23 EMPS and generated images), but
#: those small shifts moved F1@0.5 on the 60-px SEM set of benchmarks/bench_throughput.py
#: from 0.974 to 0.967, so it is off until a model less sensitive to them ships.
NETWORK_GRID_LADDER = False

#: The tile side of the default tiling in 16-bit arithmetic (bfloat16 / float16): the
#: same peak memory as the default float32 tile (1024 px: 583 MB for the bundled network's
#: forward pass, 1280 px in bfloat16: 574 MB, measured on this project's CPU), so an image
#: of 2048 network pixels takes 2 x 2 tiles instead of 3 x 3.
HALF_PRECISION_TILE = 1280
#: ``InferConfig.tile_size``'s default, which :data:`HALF_PRECISION_TILE` replaces.
_DEFAULT_TILE = InferConfig.__dataclass_fields__["tile_size"].default
#: InferConfig fields that describe the machine, not the model: a checkpoint's stored
#: values (the defaults of the version that wrote it) are not used.
_RUNTIME_FIELDS = frozenset(
    {
        "tile_size", "overlap", "batch_size", "device", "engine", "precision",
        "vote_below", "vote_stop", "tta",
    }
)  # fmt: skip


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
    scale : ScaleInfo or None
        The particle diameter used and the resampling factor (for a stack: the one used
        for every slice, planned on the middle slice), with the estimate's confidence.
    excluded : list of dict
        Burned-in annotations found and left out (scale bars, their labels, panel letters,
        SEM data bars): ``kind``, ``bbox`` (y0, x0, y1, x1), ``length_px`` for a scale bar,
        ``slice`` for a stack, and ``particles``: how many would-be particles they removed.
    nonfinite : int
        Pixels of the input that were NaN or infinite: treated as missing (the network saw
        the image's finite median there) and background in ``labels`` (0 in the maps).
    confidence : np.ndarray or None
        Per-particle confidence in [0, 1], indexed by label (``confidence[label]``; ``NaN``
        at 0), from the maps the labels were cut from
        (:func:`~.confidence.particle_confidence`); always computed, maps kept or not.
    unsure : int
        Particles left out because their confidence was under ``InferConfig.min_confidence``.
    """

    labels: np.ndarray
    prob: np.ndarray | None = None
    dist: np.ndarray | None = None
    attention: np.ndarray | None = None
    device: str = "cpu"
    scale: ScaleInfo | None = None
    excluded: list[dict[str, Any]] = field(default_factory=list)
    confidence: np.ndarray | None = None
    nonfinite: int = 0
    unsure: int = 0


#: How much more confident (mean per-particle confidence, :mod:`.confidence`) the network
#: must be in the particles of another candidate size than in those of the scale ladder's
#: answer for that size to be used. Chosen in an exploratory run on 40 EMPS training images
#: (the best of 0, 0.02, 0.05, 0.1, 0.15; that script is not in the repository, and
#: ``python benchmarks/bench_vote.py --margins 0,0.05,0.1,0.15`` now makes the same
#: comparison, not rerun yet); on the 45
#: leave-source-out images the vote raised the mean F1@0.5 with the size found from 0.590
#: to 0.742 (`python benchmarks/bench_size.py --model default`).
VOTE_MARGIN = 0.02
#: Candidate sizes closer than this factor to one already tried give the same pass.
_SAME_SIZE = 1.25


def _distinct_sizes(tries: list[ScaleInfo]) -> list[ScaleInfo]:
    """``tries`` without the sizes within :data:`_SAME_SIZE` of an earlier one, nor those
    under the smallest rung of the ladder (a classical estimate of noise)."""
    out: list[ScaleInfo] = []
    for t in tries:
        d = t.diameter
        if out and (d is None or d < LADDER[0]):
            continue
        if any(
            abs(math.log(d / o.diameter)) < math.log(_SAME_SIZE) for o in out if d and o.diameter
        ):
            continue
        out.append(t)
    return out


def _mean_confidence(conf: np.ndarray) -> float:
    """Mean confidence of a pass's particles (``conf[0]`` is the background); 0 for none."""
    vals = np.asarray(conf[1:], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else 0.0


def _leads(vote: float, first: float, leader: float | None) -> bool:
    """Whether a pass scoring ``vote`` takes the lead of a vote (as :func:`_vote` decides
    over all passes at once): it beats the first pass's ``first`` by :data:`VOTE_MARGIN`
    and the leading other pass's ``leader`` (``None``: the first pass leads)."""
    return vote > first + VOTE_MARGIN and (leader is None or vote > leader)


def _vote(passes: list[tuple[float, float, ScaleInfo, Any]]) -> tuple[float, float, ScaleInfo, Any]:
    """The pass whose size is used: the first one (the ladder's answer) unless another's
    particles have a mean confidence more than :data:`VOTE_MARGIN` higher (then the most
    confident of those)."""
    first = passes[0]
    others = [p for p in passes[1:] if p[0] > first[0] + VOTE_MARGIN]
    return max(others, key=lambda p: p[0]) if others else first


def _as_answer(chosen: ScaleInfo, first: ScaleInfo) -> ScaleInfo:
    """``chosen`` as the size answered, where ``first`` was the ladder's answer: a size
    another pass won with says how sure the ladder was of it (half as sure as of its own)."""
    if chosen is first or chosen.confidence != 0.0 or not first.confidence:
        return chosen
    return ScaleInfo(
        chosen.diameter, chosen.source, chosen.factor, 0.5 * first.confidence, chosen.alternatives
    )


def _round_up(value: int, divisor: int) -> int:
    return -(-int(value) // int(divisor)) * int(divisor)


def _resampled(fn, factor: float, divisor: int):
    """Wrap a tile prediction function so the network sees tiles resampled by ``factor``.

    ``(N, 1, h, w)`` is resized to ``(N, 1, H, W)`` with ``H = round_up(h * factor,
    divisor)`` (bilinear, anti-aliased when shrinking), predicted, and the maps resized
    back to ``(h, w)``.
    """
    import torch.nn.functional as F

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = (
            max(divisor, _round_up(round(h * factor), divisor)),
            max(divisor, _round_up(round(w * factor), divisor)),
        )
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
        if x.is_contiguous(memory_format=torch.channels_last):
            xs = xs.contiguous(memory_format=torch.channels_last)
        maps = fn(xs).float()
        return F.interpolate(
            maps, size=(h, w), mode="bilinear", align_corners=False, antialias=factor > 1
        ).clamp_(0.0, 1.0)

    return wrapped


#: The mirror images :func:`_view_averaged` adds, as flipped dims (applied after the
#: transpose of the views 4-7).
_FLIPS = ((), (-1,), (-2,), (-2, -1))


def _view_averaged(fn, views: int):
    """Wrap a tile prediction function so that its maps are the mean over ``views`` views
    of the tile, each mapped back: 2, the tile and its left-right mirror image; 4, also the
    up-down and both mirror images; 8, also those four transposed (every symmetry of the
    square). Test-time augmentation: ``views`` network passes per tile, run one after the
    other (the memory of one)."""

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        maps = None
        for v in range(views):
            dims = _FLIPS[v % 4]
            xv = x.transpose(-1, -2) if v >= 4 else x
            out = fn(torch.flip(xv, dims) if dims else xv).float()
            out = torch.flip(out, dims) if dims else out
            out = out.transpose(-1, -2) if v >= 4 else out
            maps = out if maps is None else maps.add_(out)
        return maps.mul_(1.0 / views)

    return wrapped


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


def reference_slice(image: Any) -> int | None:
    """The slice a stack's particle size is planned on: the middle one, or the nearest
    with a finite pixel (``None`` for a 2-D image).

    Raises
    ------
    NoFiniteValue
        No pixel of the image is finite (all NaN or infinite): there is nothing to segment.
    """
    shape = check_image(image)
    if len(shape) == 2:
        if not has_finite(image):
            raise NoFiniteValue()
        return None
    mid = shape[0] // 2
    for z in sorted(range(shape[0]), key=lambda k: (abs(k - mid), k)):
        if has_finite(image[z]):
            return z
    raise NoFiniteValue()


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
        """The checkpoint's recommended inference settings, with ``overrides`` applied.

        A stored setting this version does not know (written by a version that had it, such
        as the removed ``vote_window``) is ignored, so that older model files keep loading;
        an unknown key in ``overrides`` is refused."""
        known = {f.name for f in fields(InferConfig)}
        stored = {
            k: v for k, v in dict(self.checkpoint.get("infer") or {}).items()
            if k in known and k not in _RUNTIME_FIELDS
        }  # fmt: skip
        stored.update({k: v for k, v in overrides.items() if v is not None})
        return InferConfig.from_dict(stored)

    def _predict_fn(self, with_attention: bool, engine: str = "torch", precision: str = "fp32"):
        model, device = self.model, self.device
        dtype = autocast_dtype(precision, device)
        if engine == "auto" and dtype is not None:
            engine = "torch"  # torch in bfloat16 / float16 beats the float32 engines
        if engine != "torch":  # ONNX Runtime / OpenVINO, built once; None: torch
            from .engines import engine_predict_fn

            cache = self.__dict__.setdefault("_engines", {})
            fast = engine_predict_fn(model, device, engine, with_attention, cache)
            if fast is not None:
                return fast

        def fn(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            ctx = (
                torch.autocast(device.type, dtype=dtype)
                if dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                logits, psi = model(x, return_attention=True)
            maps = maps_from_logits(logits)
            if with_attention and psi is not None:
                maps = torch.cat([maps, psi.float()], dim=1)
            return maps

        return fn

    @property
    def target_diameter(self) -> float | None:
        """Particle diameter (pixels) the network was trained to see; ``None``: the model
        was trained at its images' own scale and images are used as they are."""
        from ..checkpoint import target_diameter_of

        return target_diameter_of(self.checkpoint)

    def plan_scale(self, image: Any, config: InferConfig | None = None) -> ScaleInfo:
        """The first choice of particle diameter and resampling factor for a 2-D image.

        The user's ``config.diameter`` wins; else, with ``config.auto_scale``, the classical
        estimate (:func:`~.scale.estimate_diameter`), which :meth:`segment` then only uses
        as a first guess for the network's own scale search (``config.scale_search``). A
        model without a network scale always runs at the image's own scale.
        """
        config = config or self.default_infer_config()
        target = self.target_diameter
        if config.diameter:
            d, source = float(config.diameter), "user"
        elif config.auto_scale and target:
            d, source = estimate_diameter(image), "estimate"
            if d is None and not config.scale_search:
                return ScaleInfo(None, "none", 1.0)
            if d is None:  # the network's search needs no first guess
                return ScaleInfo(None, "estimate", 1.0)
        else:
            return ScaleInfo(None, "none", 1.0)
        return ScaleInfo(d, source, band_factor(d, target, config.scale_band))

    def _searches(self, info: ScaleInfo, config: InferConfig) -> bool:
        return info.source == "estimate" and config.scale_search and bool(self.target_diameter)

    def _rungs(self, yx: tuple[int, int]) -> int:
        return sum(1 for d in LADDER if d <= max(8.0, min(yx) / 2.0))

    def ladder_steps(self, yx: tuple[int, int], info: ScaleInfo, config: InferConfig) -> int:
        """Progress steps the network's particle-size search adds for an image of Y-X shape
        ``yx`` planned as ``info`` (0 when the size is given or the search is off)."""
        return self._rungs(yx) if self._searches(info, config) else 0

    def estimate_scale(
        self, image: Any, config: InferConfig | None = None
    ) -> Generator[Progress, None, ScaleInfo]:
        """The particle size :meth:`segment` will use for a 2-D image (or a stack's middle
        slice), for an "Estimate" button: the ladder, then the same check by full passes
        (network and instances) at the candidate sizes (:meth:`_vote_sizes`); nothing of
        them is kept.

        Yields ``Progress(stage="scale")`` per rung of the ladder and per tile of the
        check; returns a :class:`~.scale.ScaleInfo` with its confidence.
        """
        config = config or self.default_infer_config()
        check_image(image)
        ref_z = reference_slice(image)
        ref = image if ref_z is None else image[ref_z]
        info = self.plan_scale(ref, config)
        if not self._searches(info, config):
            return info
        yx = tuple(int(v) for v in ref.shape[-2:])
        rungs = self._rungs(yx)
        found = yield from self._search(ref, config, info, lambda ev: ev)
        if (
            found.source != "network"
            or found.diameter is None
            or len(self._size_candidates(found, config)) < 2
        ):
            return found  # nothing to vote on: no full pass
        # the check segment() makes: the candidate sizes in full, the most confident wins
        state = {"done": rungs, "total": rungs + self._tiles(yx, config, found.factor)}

        def report(ev: Progress) -> Progress:
            return Progress(
                "scale",
                state["done"] + ev.step,
                state["total"],
                message=f"particle size: checking {found.diameter:.0f} px and the next best",
            )

        chosen, _, _ = yield from self._vote_sizes(
            ref, config.replace(tta=1), found, False, report, None, state, yx, need_pass=False
        )  # the vote of segment(): single passes
        return _as_answer(chosen, found)

    def _search(
        self, ref: Any, config: InferConfig, info: ScaleInfo, report
    ) -> Generator[Progress, None, ScaleInfo]:
        """Run the network's scale ladder on ``ref`` (see :mod:`.autoscale`)."""
        target = float(self.target_diameter)
        ann = find_annotations(ref) if config.exclude_annotations else None
        # the ladder measures sizes; its confidences were tuned on single passes
        crop_cfg = config.replace(tile_size=max(config.tile_size, 256), overlap=0.0, tta=1)

        def crop_labels(crop: np.ndarray, factor: float, box: tuple[int, int, int, int]):
            # one crop of at most CROP x CROP network pixels: one step of the search
            if NETWORK_GRID_LADDER and factor < 1.0 and nonfinite_mask(crop) is None:
                # a crop larger than the network's view of it: its particles are measured
                # at the network's resolution, not resampled back (up to 1/factor^2 fewer
                # pixels to post-process; the same network input)
                return self._network_crop_labels(crop, factor, crop_cfg, config, ann, box)
            maps = run_to_end(self.predict_maps(crop, crop_cfg, factor=factor))
            min_size = max(1, int(round(config.min_size / factor**2)))
            lab = instances_from_maps(
                maps[0],
                maps[1] if self.model.config.dist_head else None,
                threshold=config.threshold,
                seed_threshold=config.seed_threshold,
                split=config.split,
                fill_holes=False,
                min_size=min_size,
            )
            if ann is not None and ann.items:
                y0, x0, y1, x1 = box
                sub = type(ann)(ann.mask[y0:y1, x0:x1], ann.items)
                exclude_annotations(lab, sub)
            missing = nonfinite_mask(crop)
            if missing is not None:  # particles cut by missing pixels are not measured
                from scipy import ndimage as ndi

                cut = np.unique(lab[ndi.binary_dilation(missing)])
                lab[np.isin(lab, cut[cut > 0])] = 0
                lab[missing] = 0
            return lab

        found = yield from relay(
            search_scale(crop_labels, ref, target, guess=info.diameter, min_size=config.min_size),
            report,
        )
        if found.diameter is None:  # the network found nothing anywhere: the first guess
            if info.diameter is None:
                return ScaleInfo(None, "none", 1.0, confidence=0.0)
            return ScaleInfo(info.diameter, "estimate", info.factor, confidence=0.0)
        d = found.diameter
        if info.diameter and abs(math.log(d / info.diameter)) <= math.log(1.3):
            # two independent estimates that corroborate each other: their geometric mean
            d = math.sqrt(d * info.diameter)
        return ScaleInfo(
            d,
            "network",
            band_factor(d, target, config.scale_band),
            confidence=found.confidence,
            alternatives=tuple(found.alternatives()[:2])
            + ((info.diameter,) if info.diameter else ()),
        )

    def _network_crop_labels(
        self,
        crop: np.ndarray,
        factor: float,
        crop_cfg: InferConfig,
        config: InferConfig,
        ann: Any,
        box: tuple[int, int, int, int],
    ) -> tuple[np.ndarray, float]:
        """The scale search's instance labels of a finite ``crop`` shrunk by ``factor < 1``,
        on the network's grid: ``(labels, scale)``, ``scale`` being label pixels per crop
        pixel. The network sees what :func:`_resampled` gives it (the crop normalised by its
        own robust range, then resized bilinearly with anti-aliasing to a multiple of the
        network's divisor), and the maps are post-processed there instead of being resized
        back to the crop first."""
        import torch.nn.functional as F

        from ..data.intensity import apply_range

        divisor = self.model.config.divisor
        h, w = crop.shape
        size = (
            max(divisor, _round_up(round(h * factor), divisor)),
            max(divisor, _round_up(round(w * factor), divisor)),
        )
        lo, hi, _ = _resolve_range(crop, None)
        x = torch.from_numpy(apply_range(crop, lo, hi).astype(np.float32))[None, None]
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        net_cfg = crop_cfg.replace(tile_size=max(crop_cfg.tile_size, *size))
        maps = run_to_end(self.predict_maps(small[0, 0].numpy(), net_cfg, value_range=(-1.0, 1.0)))
        lab = instances_from_maps(
            maps[0],
            maps[1] if self.model.config.dist_head else None,
            threshold=config.threshold,
            seed_threshold=config.seed_threshold,
            split=config.split,
            fill_holes=False,
            min_size=max(1, int(config.min_size)),
        )
        if ann is not None and ann.items:  # the annotations' mask, on the network's grid
            y0, x0, y1, x1 = box
            ys = np.minimum((np.arange(size[0]) + 0.5) * h / size[0], h - 1).astype(int)
            xs = np.minimum((np.arange(size[1]) + 0.5) * w / size[1], w - 1).astype(int)
            mask = ann.mask[y0:y1, x0:x1][np.ix_(ys, xs)]
            exclude_annotations(lab, type(ann)(mask, ann.items))
        return lab, math.sqrt(size[0] / h * size[1] / w)

    def network_tile(self, config: InferConfig) -> int:
        """The side of the tiles the network sees: ``config.tile_size``, except that the
        default one becomes :data:`HALF_PRECISION_TILE` where the network computes in 16
        bits (``config.precision`` on this device), which holds the same memory."""
        half = config.engine in ("torch", "auto") and (
            autocast_dtype(config.precision, self.device) is not None
        )
        if half and config.tile_size == _DEFAULT_TILE:
            return HALF_PRECISION_TILE
        return int(config.tile_size)

    def predict_maps(
        self,
        image: Any,
        config: InferConfig | None = None,
        *,
        with_attention: bool = False,
        factor: float = 1.0,
        value_range: tuple[float, float] | None = None,
    ) -> Generator[Progress, None, np.ndarray]:
        """Probability maps ``(K, Y, X)`` of a 2-D image: particle prob, [dist], [attention].

        With ``factor != 1`` every tile is resampled by ``factor`` before the network and
        its maps resampled back, so the maps are on the image's grid; tiles are cut
        ``tile_size / factor`` image pixels wide, so the network still sees ``tile_size``.
        ``value_range``: the grey levels mapped to -1 and +1 (default: the image's robust
        percentiles); the blocks of a larger image pass the whole image's (:mod:`.blocks`).
        """
        config = config or self.default_infer_config()
        shape = check_image(image)
        if len(shape) != 2:
            raise ValueError(f"predict_maps expects a 2-D image, got shape {shape}")
        out_dtype = np.float16 if shape[0] * shape[1] > _HALF_MAPS_PIXELS else np.float32
        fn = self._predict_fn(with_attention, config.engine, config.precision)
        if config.tta > 1:
            fn = _view_averaged(fn, config.tta)
        divisor = self.model.config.divisor
        tile = net_tile = self.network_tile(config)
        if abs(factor - 1.0) > 1e-6:
            fn = _resampled(fn, factor, divisor)
            tile, divisor = max(8, int(round(net_tile / factor))), 1
        maps = yield from predict_tiled(
            fn,
            image,
            tile_size=tile,
            overlap=config.overlap_for(net_tile),
            batch_size=config.batch_size,
            divisor=divisor,
            device=self.device,
            out_dtype=out_dtype,
            channels_last=self.device.type == "cpu",
            value_range=value_range,
        )
        return maps

    def plan(self, image: Any, config: InferConfig | None = None) -> tuple[ScaleInfo, int]:
        """The scale :meth:`segment` will use for an image or stack, and its tile count.

        Pass the returned ``ScaleInfo`` to :meth:`segment` (``scale=``) to skip a second
        classical estimate. The count covers every slice and the network's scale ladder
        (one step per rung); a retry at another size, if any, adds to it.
        """
        config = config or self.default_infer_config()
        shape = check_image(image)
        ref_z = reference_slice(image)
        ref = image if ref_z is None else image[ref_z]
        info = self.plan_scale(ref, config)
        n = self._tiles(shape[-2:], config, info.factor)
        extra = self._rungs(shape[-2:]) if self._searches(info, config) else 0
        return info, n * (1 if len(shape) == 2 else shape[0]) + extra

    def _tiles(self, yx: tuple[int, int], config: InferConfig, factor: float) -> int:
        net_tile = self.network_tile(config)
        overlap = config.overlap_for(net_tile)
        if abs(factor - 1.0) > 1e-6:
            return n_tiles(yx, max(8, int(round(net_tile / factor))), overlap, 1)
        return n_tiles(yx, net_tile, overlap, self.model.config.divisor)

    def _plane(
        self,
        plane: Any,
        config: InferConfig,
        info: ScaleInfo,
        with_attention: bool,
        report,
        value_range: tuple[float, float] | None = None,
    ) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray, list[dict[str, Any]], int]]:
        """Segment one 2-D plane at ``info``'s scale; ``report(ev)`` turns tile events into
        the caller's events. Returns ``(labels, maps, excluded, n_missing)``.

        Missing (non-finite) pixels are background in the labels and 0 in the maps; what
        is left of a particle they cut is kept when it still has ``min_size`` pixels. A
        plane with no finite pixel is not run through the network."""
        has_dist = self.model.config.dist_head
        missing = nonfinite_mask(plane)
        if missing is not None and missing.all():
            k = 1 + int(has_dist) + int(with_attention)
            zeros = np.zeros((k, *missing.shape), np.float32)
            return np.zeros(missing.shape, np.int32), zeros, [], int(missing.size)
        maps = yield from relay(
            self.predict_maps(
                plane,
                config,
                with_attention=with_attention,
                factor=info.factor,
                value_range=value_range,
            ),
            report,
        )
        min_size = config.min_size
        if abs(info.factor - 1.0) > 1e-6:  # min_size is in network pixels
            min_size = max(1, int(round(config.min_size / info.factor**2)))
        lab = instances_from_maps(
            maps[0],
            maps[1] if has_dist else None,
            threshold=config.threshold,
            seed_threshold=config.seed_threshold,
            split=config.split,
            fill_holes=config.fill_holes,
            min_size=min_size,
        )
        renumber = False
        if missing is not None:
            maps[:, missing] = 0
            n_before = int(lab.max())
            lab[missing] = 0
            keep = np.bincount(lab.ravel(), minlength=n_before + 1) >= min_size
            keep[0] = True
            if not keep.all():  # particles gone, or cut down to specks
                lab[~keep[lab]] = 0
                renumber = True
        excluded: list[dict[str, Any]] = []
        if config.exclude_annotations:
            ann = find_annotations(plane)
            if ann.items:
                gone = exclude_annotations(lab, ann)
                renumber = renumber or bool(gone)
                excluded = [a.to_dict() for a in ann.items]
                if excluded:
                    excluded[0]["particles"] = len(gone)
        if renumber:
            from skimage.segmentation import relabel_sequential

            lab = relabel_sequential(lab)[0]
        n_missing = int(missing.sum()) if missing is not None else 0
        return lab.astype(np.int32, copy=False), maps, excluded, n_missing

    @staticmethod
    def _agreement(lab: np.ndarray, info: ScaleInfo, min_area: int) -> float:
        """How far the particles of a pass are from the size it assumed: ``|log(measured /
        assumed)|``; ``inf`` with fewer than :data:`~.autoscale.MIN_COUNT` + 1 particles."""
        if info.diameter is None or int(lab.max()) < MIN_COUNT + 1:
            return math.inf
        measured = median_diameter(lab, min_area=min_area)
        return abs(math.log(measured / info.diameter)) if measured else math.inf

    def _size_candidates(self, info: ScaleInfo, config: InferConfig) -> list[ScaleInfo]:
        """The sizes :meth:`_vote_sizes` segments in full: the ladder's answer, then (when
        the ladder is less sure than ``config.vote_below``) its alternatives, distinct."""
        if (config.refine_scale and not config.scale_search) or (
            info.confidence >= config.vote_below
        ):
            return [info]  # no vote: one pass at the ladder's answer
        return _distinct_sizes(
            [info]
            + [
                ScaleInfo(
                    d, info.source, band_factor(d, self.target_diameter, config.scale_band), 0.0
                )
                for d in info.alternatives
            ]
        )

    def _vote_sizes(
        self,
        ref: Any,
        config: InferConfig,
        info: ScaleInfo,
        with_attention: bool,
        report,
        value_range: tuple[float, float] | None,
        state: dict[str, int],
        yx: tuple[int, int],
        need_pass: bool = True,
    ) -> Generator[Progress, None, tuple[ScaleInfo, float, Any]]:
        """The full pass checks the size: every distinct candidate (the ladder's answer,
        its alternatives, the classical estimate) is segmented in full and the network's own
        confidence in the particles it cut decides (:func:`_vote`); a first pass whose particles reach
        ``config.vote_stop`` ends the vote. Returns the chosen size,
        its pass's agreement cost (:meth:`_agreement`) and its pass (``(labels, maps,
        excluded, n_missing)``, ``None`` when a large image's winner was not kept and
        ``need_pass`` is false: the size alone is wanted); ``state["done"]`` /
        ``state["total"]`` count the tiles."""
        tries = self._size_candidates(info, config)
        has_dist = self.model.config.dist_head
        # memory: the first pass's score and the leading pass (its output dropped before
        # the next pass on a large image, and computed again if it wins)
        large = yx[0] * yx[1] > _VOTE_KEEP_PIXELS
        first_vote, leader, out = 0.0, None, None
        for k, cand in enumerate(tries):
            if large and leader is not None:
                leader = (*leader[:3], None)
            n_t = self._tiles(yx, config, cand.factor)
            if k:
                state["total"] += n_t
            out = yield from self._plane(ref, config, cand, with_attention, report, value_range)
            state["done"] += n_t
            min_area = max(1, int(round(config.min_size / cand.factor**2)))
            cost = self._agreement(out[0], cand, min_area)
            vote = 0.0
            if len(tries) > 1:  # a vote to hold: how sure the network is of these particles
                vote = _mean_confidence(
                    particle_confidence(
                        out[0], out[1][0], out[1][1] if has_dist else None,
                        threshold=config.threshold,
                    )
                )  # fmt: skip
            if k == 0:
                first_vote, leader = vote, (vote, cost, cand, out)
                if not config.scale_search or vote >= config.vote_stop:
                    break  # no search, or the network is sure enough of the first pass
            elif _leads(vote, first_vote, leader[0] if leader[2] is not tries[0] else None):
                leader = (vote, cost, cand, out)
            out = None
        _, cost, chosen, out = leader
        if out is None and need_pass:  # a large image's winner, not kept: its pass again
            n_t = self._tiles(yx, config, chosen.factor)
            state["total"] += n_t
            out = yield from self._plane(ref, config, chosen, with_attention, report, value_range)
            state["done"] += n_t
        return chosen, cost, out

    def segment(
        self,
        image: Any,
        config: InferConfig | None = None,
        *,
        with_attention: bool = False,
        keep_maps: bool = False,
        scale: ScaleInfo | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> Generator[Progress, None, SegmentResult]:
        """Segment a 2-D image or a 3-D stack (slice by slice) into instance labels.

        With a model trained at a network scale, the image is resampled so its particles
        come out at that size. The size is the user's (``config.diameter``) or found by
        the network (``config.scale_search``, :mod:`.autoscale`: a ladder of scales on a
        central crop, the classical estimate as a first guess); a stack is planned once,
        on its middle slice. A found size is then checked by the full pass: the image is
        segmented at each distinct candidate size (the ladder's answer, its next-best rungs,
        the classical estimate) and the ladder's answer is kept unless the network is
        clearly more confident in the particles of another (:data:`VOTE_MARGIN`). Burned-in
        annotations are left out (``config.exclude_annotations``).

        Yields ``Progress(stage="tiles", step, total)`` over the ladder's rungs and all
        tiles of all slices (the total grows when another size is tried). ``scale``: a plan
        from :meth:`plan`. ``value_range``: the grey levels mapped to -1 and +1 for every
        slice (default: each slice's robust percentiles; see :meth:`predict_maps`).
        """
        config = config or self.default_infer_config()
        shape = check_image(image)
        slices = [None] if len(shape) == 2 else list(range(shape[0]))
        yx = shape[-2:]
        ref_z = reference_slice(image)
        ref = image if ref_z is None else image[ref_z]
        info = scale if scale is not None else self.plan_scale(ref, config)
        searching = self._searches(info, config)
        rungs = self._rungs(yx) if searching else 0
        state = {"done": 0, "total": rungs + self._tiles(yx, config, info.factor) * len(slices)}

        def report(z):
            def make(ev: Progress) -> Progress:
                where = f"slice {z + 1}/{len(slices)}, " if z is not None else ""
                return Progress(
                    "tiles",
                    state["done"] + ev.step,
                    state["total"],
                    eta_s=None,
                    message=f"{where}tile {ev.step}/{ev.total}",
                    data={"slice": z, "device": self.device_name, "scale": info},
                )

            return make

        def report_scale(ev: Progress) -> Progress:
            return Progress(
                "tiles",
                min(ev.step, rungs),
                state["total"],
                message=ev.message,
                data={"stage": "scale", "device": self.device_name},
            )

        first: tuple[np.ndarray, np.ndarray, list, int] | None = None
        if searching:
            info = yield from self._search(ref, config, info, report_scale)
            state["done"] = rungs
            state["total"] = rungs + self._tiles(yx, config, info.factor) * len(slices)
        if (
            info.source in ("network", "estimate")
            and info.diameter is not None
            and (config.scale_search or config.refine_scale)
        ):
            # with test-time views the candidates still vote by single passes (the vote's
            # confidences were tuned on them; views made it choose worse sizes: 0.735 vs
            # 0.743 mean F1@0.5 in docs/benchmarks.md), then the winner is segmented again
            views = config.tta
            if (
                views > 1
                and not config.refine_scale
                and len(self._size_candidates(info, config)) < 2
            ):
                chosen, cost = info, 0.0  # nothing to vote on: the one pass, with its views
            else:
                chosen, cost, first = yield from self._vote_sizes(
                    ref, config.replace(tta=1), info, with_attention, report(ref_z),
                    value_range, state, yx, need_pass=views == 1 or config.refine_scale,
                )  # fmt: skip
            if config.refine_scale and math.isfinite(cost) and cost > math.log(1.3):
                measured = median_diameter(first[0], min_area=1)
                chosen = ScaleInfo(
                    measured, "network", band_factor(measured, self.target_diameter, config.scale_band),
                    chosen.confidence, chosen.alternatives,
                )  # fmt: skip
                first = None
            if views > 1:
                first = None  # the winner's pass again, below, with the views
            info = _as_answer(chosen, info)
            left = len(slices) - (1 if first is not None else 0)
            state["total"] = state["done"] + self._tiles(yx, config, info.factor) * left
        # 2-D: the slice's labels are the result (no second full-size copy)
        labels = np.zeros(shape, dtype=np.int32) if len(shape) == 3 else None
        keep = keep_maps or with_attention
        has_dist = self.model.config.dist_head
        prob = dist = att = None
        offset = 0
        excluded: list[dict[str, Any]] = []
        nonfinite = unsure = 0
        scores: list[np.ndarray] = [np.full(1, np.nan, np.float32)]  # index 0: background
        for z in slices:
            if first is not None and z == ref_z:
                lab, maps, ex, n_missing = first
                first = None
            else:
                plane = image if z is None else image[z]
                lab, maps, ex, n_missing = yield from self._plane(
                    plane, config, info, with_attention, report(z), value_range
                )
                state["done"] += self._tiles(yx, config, info.factor)
            nonfinite += n_missing
            for item in ex:
                excluded.append(item if z is None else {**item, "slice": int(z)})
            # per-particle confidence, from the maps these labels were cut from; the
            # particles under the calibrated minimum are left out
            conf = particle_confidence(
                lab, maps[0], maps[1] if has_dist else None, threshold=config.threshold
            )
            lab, conf, n_low = drop_unsure(lab, conf, config.min_confidence)
            unsure += n_low
            n = int(conf.size) - 1
            scores.append(conf[1:])  # the stack labels offset + 1 .. offset + n
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
            scale=info,
            excluded=excluded,
            confidence=np.concatenate(scores),
            nonfinite=nonfinite,
            unsure=unsure,
        )

    def segment_sync(
        self, image: Any, config: InferConfig | None = None, **kw: Any
    ) -> SegmentResult:
        """Run :meth:`segment` to the end (no progress)."""
        return run_to_end(self.segment(image, config, **kw))
