"""The one fit loop both trainers drive: epochs of steps under a time budget, with an ETA,
periodic validation, best-model selection and a history.

:class:`Fit` is the base of :class:`~napari_sagegan.engine.train.segmenter.SegmenterTrainer`
(phase 1) and :class:`~napari_sagegan.engine.train.gan.GanTrainer` (phase 2), which only
define their step and their validation (the hooks below). :meth:`Fit.run` is a generator of
:class:`~napari_sagegan.util.progress.Progress` events:

* ``"train"`` after every optimisation step: ``data = {"epoch": e, **losses}``, an ETA that
  never exceeds the time left in the budget;
* whatever :meth:`Fit.after_step` yields (phase 2's ``"preview"`` images);
* ``"validate"`` every ``val_every`` epochs and after the last one (also when the budget
  ends an epoch early): ``data = {**record, "improved": bool}``, where the record holds the
  epoch, the step count, the epoch's mean losses and the ``val_*`` scores.

It returns :meth:`Fit.result`. A caller stops it between any two events with ``close()``:
the best weights so far stay in :attr:`Fit.best_state` (and on disk when the trainer writes
them at every improvement).

Selection is on validation instance F1 at IoU 0.5, ties broken by Dice
(:meth:`Fit.beats`); without validation images the latest weights are kept.

Numerics. A trainer applies each optimiser update through :meth:`Fit.finite_update`: when
the loss, a gradient or a BatchNorm statistic is not finite (NaN / inf), or the update made
a weight non-finite, the update is undone (the modules' weights and buffers are restored from
:meth:`Fit.snapshot`, taken before the forward pass) and the step counts as *skipped*
(:attr:`Fit.skipped_steps`, ``skipped_steps`` in the epoch's record when there were any).
When :attr:`Fit.max_nonfinite_steps` steps in a row are skipped, or more than half of a run's
steps, the latest ones, are skipped in a row when it ends, the run stops with
:class:`TrainingDiverged`. Weights that are not finite are never kept as the best
(:meth:`Fit.keep_best`) and validation scores that are not finite never count as an
improvement (:meth:`Fit.beats`).

Several processes (torchrun): when :attr:`Fit.ddp` is set, the budget and the schedule run on
rank 0's clock (:meth:`Fit.elapsed`) and every rank skips a non-finite step or none
(:meth:`Fit.finite_update`); see :mod:`~napari_sagegan.engine.train.distributed`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ...util.progress import Progress, run_to_end
from ..analysis.metrics import evaluate_pair, mean_metrics
from ..checkpoint import all_finite
from ..config import InferConfig, TrainConfig
from ..data.pairs import TrainingPairs, prepare_pairs
from ..device import describe_device, resolve_device


class TrainingDiverged(ValueError):
    """Training stopped because its loss or weights stopped being finite numbers."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (third-party code may use the legacy global)
    torch.manual_seed(seed)


def validate_segmenter(
    model: torch.nn.Module,
    images: Sequence[Any],
    labels: Sequence[Any],
    infer: InferConfig,
    *,
    device: torch.device,
) -> dict[str, float]:
    """Segment ``images`` with ``model`` (tiled, as at inference) and score them against
    ``labels``: the mean of :func:`~napari_sagegan.engine.analysis.metrics.evaluate_pair`
    (``dice``, ``f1@0.5``, ...); ``{}`` without images. The model is left in train mode."""
    from ..infer.confidence import drop_unsure, particle_confidence
    from ..infer.postprocess import instances_from_maps
    from ..infer.tiling import predict_tiled
    from ..nets.attention_unet import maps_from_logits

    if not images:
        return {}
    model.eval()
    arch = model.config

    def fn(x: torch.Tensor) -> torch.Tensor:
        return maps_from_logits(model(x.to(device)))

    rows = []
    for image, lab in zip(images, labels):
        maps = run_to_end(
            predict_tiled(
                fn,
                image,
                tile_size=infer.tile_size,
                overlap=infer.overlap_for(infer.tile_size),
                batch_size=infer.batch_size,
                divisor=arch.divisor,
                device=device,
                channels_last=False,
            )
        )
        pred = instances_from_maps(
            maps[0],
            maps[1] if arch.dist_head else None,
            threshold=infer.threshold,
            seed_threshold=infer.seed_threshold,
            split=infer.split,
            fill_holes=infer.fill_holes,
            min_size=infer.min_size,
        )
        if infer.min_confidence > 0:  # the calibrated cut, as at inference
            conf = particle_confidence(
                pred, maps[0], maps[1] if arch.dist_head else None, threshold=infer.threshold
            )
            pred = drop_unsure(pred, conf, infer.min_confidence)[0]
        rows.append(evaluate_pair(pred, np.asarray(lab)))
    model.train()
    return mean_metrics(rows)


class Fit:
    """Base of the trainers: the loop, the budget, the selection and the history.

    A subclass sets, in its ``__init__``: :attr:`train_config` (epochs, steps per epoch,
    budget, validation period, patch and batch size), :attr:`pairs`, :attr:`sampler` (for
    the default epoch length), :attr:`device`, and optionally :attr:`start_epoch`,
    :attr:`step`, :attr:`history` and the ``best_*`` attributes when resuming. It defines
    :meth:`train_step`, :meth:`validate_epoch` and :meth:`result`, and may override the
    other hooks.
    """

    train_config: TrainConfig
    pairs: TrainingPairs
    device: torch.device
    sampler: Any
    #: Record keys averaged over the epoch (``None``: every key of the step's losses).
    record_keys: tuple[str, ...] | None = None
    #: Skipped (non-finite) steps in a row after which the run stops (:class:`TrainingDiverged`).
    max_nonfinite_steps: int = 20
    #: The processes this run shares its steps with under torchrun
    #: (:class:`~napari_sagegan.engine.train.distributed.DistributedRun`; ``None``: one).
    ddp: Any = None

    def _setup(
        self,
        images: Sequence[Any],
        labels: Sequence[Any],
        config: TrainConfig,
        *,
        device: str,
        val_images: Sequence[Any] | None,
        val_labels: Sequence[Any] | None,
        holdout: str = "images",
        margin: int = 0,
        extra: Sequence[tuple[Any, Any]] = (),
        diameters: Sequence[float | None] | None = None,
    ) -> TrainingPairs:
        """Check and split the pairs (at their own scale), set torch's threads, seed every
        generator and resolve the device (``holdout``, ``margin``, ``extra``, ``diameters``:
        see :func:`~napari_sagegan.engine.data.pairs.prepare_pairs`)."""
        pairs = prepare_pairs(
            images,
            labels,
            val_fraction=config.val_fraction,
            seed=config.seed,
            val_images=val_images,
            val_labels=val_labels,
            holdout=holdout,
            margin=margin,
            extra=extra,
            diameters=diameters,
        )
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        seed_everything(config.seed)
        self.device = resolve_device(device)
        return pairs

    def _init_fit(self) -> None:
        self.start_epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: tuple[float, float] = (-1.0, -1.0)
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_by = "epochs"  # "epochs" | "time"
        self.calibration: dict[str, Any] | None = None  # set by after_fit, if it calibrates
        self.skipped_steps = 0  # updates undone because something was not finite
        #: How far the run is, in [0, 1]: its steps or its time budget, whichever is further
        #: (updated before every step; learning-rate schedules read it).
        self.run_fraction = 0.0
        self._bad_run = 0  # skipped steps in a row
        self._step_bad = False  # the current step skipped an update
        self._step_guarded = False  # the current step went through finite_update

    # ------------------------------------------------------------------ numerics
    @staticmethod
    def snapshot(*modules: torch.nn.Module) -> dict[torch.nn.Module, dict[str, torch.Tensor]]:
        """Copies of the weights and buffers of ``modules`` (on their device), taken before a
        step's forward pass so that :meth:`finite_update` can undo the step."""
        with torch.no_grad():
            return {m: {k: v.clone() for k, v in m.state_dict().items()} for m in modules}

    @staticmethod
    def restore(
        snap: dict[torch.nn.Module, dict[str, torch.Tensor]],
        modules: Sequence[torch.nn.Module] | None = None,
    ) -> None:
        """Copy a :meth:`snapshot` back into ``modules`` (default: all of it), in place."""
        with torch.no_grad():
            for m in snap if modules is None else modules:
                current = m.state_dict()
                for k, v in snap[m].items():
                    current[k].copy_(v)

    def finite_update(
        self,
        loss: torch.Tensor | float,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        snap: dict[torch.nn.Module, dict[str, torch.Tensor]],
        modules: Sequence[torch.nn.Module] | None = None,
    ) -> bool:
        """Step ``optimizers`` after a backward pass, unless something is not finite.

        Checks that ``loss``, every gradient of the optimisers' parameters and every floating
        buffer of ``modules`` (BatchNorm statistics, updated by the forward pass) are finite,
        steps, and checks that the parameters still are. Otherwise ``modules`` (default: all
        of ``snap``'s) are restored from ``snap``, the gradients cleared and the step marked
        skipped. Returns whether the update was applied.
        """
        self._step_guarded = True
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = (optimizers,)
        modules = list(snap) if modules is None else list(modules)
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        ok = (
            math.isfinite(float(loss))
            and all_finite(p.grad for p in params if p.grad is not None)
            and all_finite(b for m in modules for b in m.buffers())
        )
        if self.ddp is not None:  # every process skips, or none
            ok = self.ddp.agree(ok)
        if ok:
            for opt in optimizers:
                opt.step()
            ok = all_finite(params)
            if self.ddp is not None:
                ok = self.ddp.agree(ok)
        if not ok:
            self.restore(snap, modules)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            self._step_bad = True
        return ok

    def _diverged(self, done: int) -> TrainingDiverged:
        lr = self.train_config.lr
        return TrainingDiverged(
            "training diverged: the loss or the weights were not finite (NaN or infinite) "
            f"for {self._bad_run} steps in a row, up to step {done}; lower the learning rate "
            f"(--lr, now {lr:g})"
        )

    # ------------------------------------------------------------------ data
    @property
    def train_images(self) -> list[np.ndarray]:
        return self.pairs.train_images

    @property
    def train_labels(self) -> list[np.ndarray]:
        return self.pairs.train_labels

    @property
    def val_images(self) -> list[Any]:
        return self.pairs.val_images

    @property
    def val_labels(self) -> list[Any]:
        return self.pairs.val_labels

    @property
    def device_name(self) -> str:
        """The device, for the user (e.g. ``cpu (4 threads)``)."""
        return describe_device(self.device)

    @property
    def steps_per_epoch(self) -> int:
        """``train_config.steps_per_epoch``, or (0) one pass over the training images' area."""
        cfg = self.train_config
        if cfg.steps_per_epoch > 0:
            return cfg.steps_per_epoch
        per_batch = cfg.patch_size**2 * cfg.batch_size
        return max(1, math.ceil(self.sampler.pixels / per_batch))

    def elapsed(self, t0: float) -> float:
        """Seconds since ``t0`` (``time.perf_counter``); on several processes rank 0's, so
        that the budget and the schedule are the same for every rank."""
        seconds = time.perf_counter() - t0
        return seconds if self.ddp is None else self.ddp.elapsed(seconds)

    # ------------------------------------------------------------------ selection
    def beats(self, metrics: dict[str, float]) -> bool:
        """Whether weights scoring ``metrics`` beat the best so far: higher F1@0.5, ties
        broken by Dice; always when there are no validation metrics; never when a score is
        not finite."""
        if not metrics:
            return True
        score = (metrics["f1@0.5"], metrics["dice"])
        return all(math.isfinite(v) for v in score) and score > self.best_score

    def keep_best(self, metrics: dict[str, float], state: dict[str, torch.Tensor]) -> bool:
        """Make ``state`` (a CPU copy of the weights) the best so far, scoring ``metrics``;
        refused (``False``) when a weight or buffer of ``state`` is not finite."""
        if not all_finite(state.values()):
            return False
        self.best_score = (metrics.get("f1@0.5", 0.0), metrics.get("dice", 0.0))
        self.best_metrics = dict(metrics)
        self.best_state = state
        return True

    # ------------------------------------------------------------------ hooks
    def before_fit(self, total: int) -> Iterator[Progress]:
        """Runs (and may yield) before the first step."""
        return iter(())

    def train_step(self, epoch: int) -> dict[str, float]:
        """One optimisation step of (1-based) ``epoch``; increments :attr:`step` and returns
        the losses (``"loss"`` at least) for the ``train`` event."""
        raise NotImplementedError

    def step_note(self, parts: dict[str, float]) -> str:
        """End of the ``train`` event's message."""
        return f"loss {parts['loss']:.4f}"

    def after_step(self, done: int, total: int) -> Iterator[Progress]:
        """Extra events after a ``train`` event."""
        return iter(())

    def validate_epoch(self, epoch: int, record: dict[str, Any]) -> tuple[str, bool]:
        """Validate after ``epoch``: add the ``val_*`` scores to ``record``, select; returns
        the ``validate`` event's message and whether the best model changed."""
        raise NotImplementedError

    def after_validation(self, epoch: int, improved: bool) -> None:
        """After the record is in :attr:`history`: write files."""

    def after_fit(self) -> Iterator[Progress]:
        """After the last epoch (not after a cancel): e.g. calibrate the best model."""
        return iter(())

    def result(self) -> Any:
        """What :meth:`run` returns (also valid after a cancel)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop
    def run(self) -> Generator[Progress, None, Any]:
        """Train; yields progress after every step and validation; returns :meth:`result`."""
        cfg = self.train_config
        spe = self.steps_per_epoch
        total = spe * max(0, cfg.epochs - self.start_epoch)
        budget = cfg.max_minutes * 60.0 if cfg.max_minutes else None
        t0 = time.perf_counter()
        yield from self.before_fit(total)
        done = 0
        for epoch in range(self.start_epoch + 1, cfg.epochs + 1):
            sums: dict[str, float] = {}
            n = 0
            skipped = 0
            out_of_time = False
            for _ in range(spe):
                self._step_bad = self._step_guarded = False
                self.run_fraction = min(1.0, done / total) if total else 0.0
                if budget:
                    spent = self.elapsed(t0) / budget
                    self.run_fraction = min(1.0, max(self.run_fraction, spent))
                parts = self.train_step(epoch)
                if not self._step_guarded and not math.isfinite(float(parts.get("loss", 0.0))):
                    self._step_bad = True  # a step without finite_update: cannot be undone
                done += 1
                if self._step_bad:
                    skipped += 1
                    self.skipped_steps += 1
                    self._bad_run += 1
                    if self._bad_run >= self.max_nonfinite_steps:
                        raise self._diverged(done)
                else:
                    self._bad_run = 0
                    n += 1
                for k in self.record_keys or parts:
                    sums.setdefault(k, 0.0)
                    if not self._step_bad:
                        sums[k] += parts[k]
                elapsed = self.elapsed(t0)
                eta = elapsed / done * (total - done)
                if budget is not None:
                    eta = min(eta, max(0.0, budget - elapsed))
                yield Progress(
                    "train",
                    done,
                    total,
                    eta_s=eta,
                    message=f"epoch {epoch}/{cfg.epochs} step {done}/{total} "
                    + self.step_note(parts)
                    + (" (skipped: not finite)" if self._step_bad else ""),
                    data={"epoch": epoch, **parts},
                )
                yield from self.after_step(done, total)
                if budget is not None and elapsed >= budget:
                    out_of_time = True
                    break
            if epoch == cfg.epochs or out_of_time:
                if self._bad_run * 2 > done:  # a short run that (mostly) never got a step
                    raise self._diverged(done)
            record: dict[str, Any] = {"epoch": epoch, "step": self.step}
            record.update({k: v / n if n else math.nan for k, v in sums.items()})
            if skipped:
                record["skipped_steps"] = skipped
            if epoch % cfg.val_every == 0 or epoch == cfg.epochs or out_of_time:
                message, improved = self.validate_epoch(epoch, record)
                self.history.append(record)
                self.after_validation(epoch, improved)
                yield Progress(
                    "validate",
                    done,
                    total,
                    eta_s=None,
                    message=message,
                    data={**record, "improved": improved},
                )
            else:
                self.history.append(record)
            if out_of_time:
                self.stopped_by = "time"
                break
        yield from self.after_fit()
        return self.result()
