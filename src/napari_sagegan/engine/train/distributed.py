"""The segmenter's trainer on several processes: ``torchrun`` and DistributedDataParallel.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1`` in the environment), each process
(rank) of :class:`~napari_sagegan.engine.train.segmenter.SegmenterTrainer` trains the same
model on its share of every global batch and DistributedDataParallel (DDP) averages the
gradients, so that an update equals the one process's update with the same global batch and
seed (within float tolerance). Without ``WORLD_SIZE > 1`` nothing here is used and a run is
unchanged bit for bit.

How the update stays the one process's:

* **Samples.** Every rank draws the whole global batch with the same seeded sampler (the
  patches, their augmentation) and keeps its slice (:meth:`DistributedRun.shard`): the
  samples are those of one process whatever the number of processes, and a one-process run
  draws exactly as before. The cost: each rank prepares ``batch_size`` patches, not
  ``batch_size / N``.
* **BatchNorm.** Batch statistics are those of the global batch. On CUDA,
  :class:`torch.nn.SyncBatchNorm`; on the CPU, where torch's SyncBatchNorm refuses its
  input ("SyncBatchNorm expected input tensor to be on GPU", torch 2.13),
  :class:`GlobalBatchNorm2d`, which sums the per-channel sums over the ranks with an
  autograd-aware ``all_reduce`` (the gradient flows through the global statistics too).
* **Dropout.** :class:`GlobalBatchDropout` draws the mask of the whole global batch from
  the (identically seeded) torch generator and keeps this rank's slice: the same masks as
  one process on the CPU (on CUDA the one-process kernel draws differently, so CUDA runs
  are equal in distribution only).
* **Losses over the whole batch** (Tversky, soft Dice: ratios of sums) are computed from
  sums reduced over the ranks (:meth:`DistributedRun.loss`); per-pixel means (focal, CE,
  distance) are local, and DDP's average makes them global, the shares being equal.

Rank 0 alone validates, calibrates, chooses the model and writes the checkpoint (the bare
model, never the DDP wrapper: the file is the same as a one-process run's); it shares its
validation scores, its torch random state (:meth:`DistributedRun.share`) and its clock
(:meth:`DistributedRun.elapsed`, for ``max_minutes``) so that every rank takes the same
steps with the same learning rate and stops at the same step. A step's skip decision (not
finite) is agreed by all ranks (:meth:`DistributedRun.agree`).

The process group is ``gloo`` on the CPU and ``nccl`` on CUDA (each rank on
``cuda:LOCAL_RANK``), initialised once per process from torchrun's environment
(``env://``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and
destroyed when the process exits. When a rank stops (Ctrl-C, SIGTERM, an error, a closed
generator), it closes the group and the others stop with :class:`PeerStopped` at their next
collective (torchrun's own SIGTERM reaches every rank anyway).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Generator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...util.progress import Progress
from ..config import TrainConfig
from ..device import resolve_device
from .losses import _EPS, focal_loss

__all__ = [
    "DistributedRun",
    "GlobalBatchDropout",
    "GlobalBatchNorm2d",
    "PeerStopped",
    "convert_for_global_batch",
    "exit_now",
    "global_segmentation_loss",
    "is_follower",
    "launch_env",
    "per_rank_batch",
]

T = TypeVar("T")


class PeerStopped(RuntimeError):
    """Another process of a distributed run stopped (cancelled, interrupted or failed)."""


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of every rank's input is the sum of
    the ranks' output gradients (as ``torch.distributed.nn.functional.all_reduce``, which
    torch 2.13 deprecates in favour of a private module)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


def _all_reduce_autograd(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` outside
    it); a value that is not a number is refused with the variable's name."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "")
        try:
            values.append(int(text) if text.strip() else default)
        except ValueError:
            raise ValueError(
                f"the environment variable {name}={text!r} is not a whole number; it is set "
                "by torchrun (unset it to train in one process)"
            ) from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a distributed "
            "run (0 <= RANK < WORLD_SIZE); launch with torchrun, or unset them"
        )
    return rank, world, local


def is_follower() -> bool:
    """Whether this process is a rank other than 0 of a distributed run (it prints and
    writes nothing)."""
    rank, world, _ = launch_env()
    return world > 1 and rank > 0


def per_rank_batch(batch_size: int, world: int) -> int:
    """This rank's share of a global batch of ``batch_size`` patches over ``world``
    processes; refused when it does not divide."""
    if batch_size % world:
        multiple = -(-batch_size // world) * world
        raise ValueError(
            f"the batch size (--batch-size) {batch_size} cannot be shared by {world} training "
            f"processes: each computes batch_size / {world} patches of the same global batch, "
            f"so use a multiple of {world} (e.g. {multiple}) or a number of processes that "
            f"divides {batch_size}"
        )
    return batch_size // world


# --------------------------------------------------------------------------- modules


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of a distributed
    run (any backend, CPU included): per-channel sums are reduced over the ranks with an
    autograd-aware ``all_reduce``. Same parameters, buffers and state-dict keys as
    :class:`torch.nn.BatchNorm2d`; in eval mode, or without a process group, it is one.

    ``world`` is the number of ranks; every rank must hold the same number of samples.
    """

    world: int = 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (torch's name)
        if not self.training or self.world < 2 or not dist.is_initialized():
            return super().forward(input)
        self._check_input_dim(input)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        n = input.numel() // input.shape[1] * self.world  # equal shares
        mean = _all_reduce_autograd(input.sum(dims)) / n
        centred = input - mean.view(shape)
        var = _all_reduce_autograd(centred.pow(2).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else float(self.momentum)
                )
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)
        return out


class GlobalBatchDropout(nn.Module):
    """Dropout whose mask is this rank's slice of a mask drawn for the whole global batch
    (``world`` ranks, this one ``rank``), so that it is one process's mask on the CPU."""

    def __init__(self, p: float, rank: int, world: int) -> None:
        super().__init__()
        self.p, self.rank, self.world = float(p), int(rank), int(world)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if not self.training or self.p == 0.0:
            return input
        b = input.shape[0]
        keep = 1.0 - self.p
        noise = torch.empty(
            (b * self.world, *input.shape[1:]), dtype=input.dtype, device=input.device
        )
        noise.bernoulli_(keep).div_(keep)  # as torch's dropout on the CPU draws it
        return input * noise[self.rank * b : (self.rank + 1) * b]

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.rank}, world={self.world}"


def convert_for_global_batch(module: nn.Module, rank: int, world: int, *, cuda: bool) -> nn.Module:
    """Replace the BatchNorm2d and Dropout layers of ``module`` (in place) by their
    global-batch versions: :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`GlobalBatchNorm2d`
    otherwise; :class:`GlobalBatchDropout`. The parameter and buffer objects stay the same (an
    optimiser built before keeps working, the state-dict keys do not change)."""
    if cuda:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, GlobalBatchDropout(child.p, rank, world))
            elif type(child) is nn.BatchNorm2d:  # only left on the CPU
                new = GlobalBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine,
                    child.track_running_stats,
                )  # fmt: skip
                new.world = world
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    setattr(new, key, getattr(child, key))
                new.train(child.training)
                setattr(parent, name, new)
    return module


# --------------------------------------------------------------------------- the run


class DistributedRun:
    """This process's place in a torchrun launch, and the few collectives the trainer needs.

    Build it with :meth:`from_env` (``None`` outside torchrun). ``device`` is this rank's
    (``cuda:LOCAL_RANK`` on CUDA).
    """

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        # gloo reduces CPU tensors; nccl those on the rank's GPU
        self._dev = device if device.type == "cuda" else torch.device("cpu")

    @classmethod
    def from_env(cls, device: str, batch_size: int) -> DistributedRun | None:
        """The run this process belongs to under torchrun (``WORLD_SIZE > 1``), with the
        process group initialised (gloo on the CPU, nccl on CUDA; once per process), or
        ``None`` outside torchrun. ``batch_size`` (the global batch) must divide by the
        number of processes."""
        rank, world, local = launch_env()
        if world < 2:
            return None
        per_rank_batch(batch_size, world)
        dev = resolve_device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(
                f"training on several processes runs on the CPU (gloo) or on CUDA GPUs "
                f"(nccl), not on {dev.type}; use --device cpu or --device cuda"
            )
        if dev.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK {local} has no GPU: this machine has "
                    f"{torch.cuda.device_count()}; start at most that many processes per "
                    "machine (--nproc_per_node)"
                )
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo",
                init_method="env://",
                rank=rank,
                world_size=world,
                **({"device_id": dev} if dev.type == "cuda" else {}),
            )
            atexit.register(_destroy)
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise ValueError(
                f"a process group of {dist.get_world_size()} processes is already set up, "
                f"but WORLD_SIZE is {world}"
            )
        return cls(rank, world, local, dev)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, writes and prints."""
        return self.rank == 0

    def describe(self) -> str:
        return f"process {self.rank} of {self.world}"

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, *, find_unused: bool = False) -> nn.Module:
        """Convert ``model``'s BatchNorm and Dropout layers (in place) and wrap it in DDP; the
        bare ``model`` keeps the same parameters (save it, never the wrapper)."""
        from torch.nn.parallel import DistributedDataParallel

        convert_for_global_batch(model, self.rank, self.world, cuda=self.device.type == "cuda")
        return DistributedDataParallel(
            model,
            device_ids=[self.local_rank] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )

    def shard(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's equal slice of each global-batch tensor (first axis)."""
        out = []
        for t in batch:
            b = per_rank_batch(t.shape[0], self.world)
            out.append(t[self.rank * b : (self.rank + 1) * b])
        return tuple(out)

    # ------------------------------------------------------------------ losses
    def loss(
        self,
        logits: torch.Tensor,
        fg: torch.Tensor,
        dist_target: torch.Tensor | None,
        config: TrainConfig,
    ) -> tuple[torch.Tensor, dict[str, float], float]:
        """This rank's loss, whose DDP-averaged gradient is the gradient of
        :func:`~napari_sagegan.engine.train.losses.segmentation_loss` on the global batch;
        returns ``(loss, parts, total)`` with the global batch's terms and total (the same
        on every rank)."""
        return global_segmentation_loss(
            logits, fg, dist_target, config, reduce=_all_reduce_autograd, mean=self.mean
        )

    # ------------------------------------------------------------------ collectives
    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over the ranks of each of ``values``."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self._dev)
        self._collective(dist.all_reduce, t)
        return (t / self.world).tolist()

    def elapsed(self, seconds: float) -> float:
        """Rank 0's ``seconds`` (its clock decides the budget and the schedule for all)."""
        t = torch.tensor([seconds], dtype=torch.float64, device=self._dev)
        self._collective(dist.broadcast, t, src=0)
        return float(t.item())

    def agree(self, ok: bool) -> bool:
        """Whether every rank says ``ok``."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._dev)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def share(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank, with rank 0's torch random state (so that random
        numbers rank 0 alone drew, e.g. while validating, never desynchronise the ranks)."""
        state = [
            obj,
            torch.get_rng_state(),
            torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        ]
        self._collective(dist.broadcast_object_list, state, src=0)
        obj, cpu_state, cuda_state = state
        if not self.is_main:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, self.device)
        return obj

    def _collective(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except RuntimeError as err:
            raise (self._peer_stopped(err) if _lost_peer(err) else err) from err

    def _peer_stopped(self, err: BaseException) -> PeerStopped:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = first.split("] ", 1)[-1].split(". ")[0]  # gloo: "[file:line] what. hint"
        return PeerStopped(
            f"another training process stopped ({first[:160]}); {self.describe()} stops too"
        )

    def guard(self, gen: Generator[Progress, None, T]) -> Generator[Progress, None, T]:
        """Run ``gen`` (the trainer's loop); when it stops early on this rank (closed,
        interrupted, failed) close the process group so that the other ranks stop at their
        next collective instead of waiting; a collective that fails because another rank
        stopped raises :class:`PeerStopped`."""
        try:
            return (yield from gen)
        except PeerStopped:
            _destroy()
            raise
        except RuntimeError as err:
            _destroy()
            raise (self._peer_stopped(err) if _lost_peer(err) else err) from err
        except BaseException:
            _destroy()
            raise


def _lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away (gloo
    raises a plain ``RuntimeError`` "Connection closed by peer"; c10d a ``DistError``)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(
        word in text for word in ("connection closed by peer", "connection reset", "gloo", "nccl")
    )


def exit_now(code: int) -> None:
    """End this process at once with ``code``, after flushing its output: after a stop on
    several processes, where tearing the process group down at exit can wait forever on
    gloo's threads (seen once in six SIGTERMs to one rank, torch 2.13). Files are already
    complete: checkpoints are written atomically, before this is called."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the loss


def global_segmentation_loss(
    logits: torch.Tensor,
    fg: torch.Tensor,
    dist_target: torch.Tensor | None,
    config: TrainConfig,
    *,
    reduce: Any = None,
    mean: Any = None,
) -> tuple[torch.Tensor, dict[str, float], float]:
    """:func:`~napari_sagegan.engine.train.losses.segmentation_loss` for one rank's share of
    a global batch.

    The whole-batch ratio terms (Tversky, soft Dice) are computed from sums reduced over the
    ranks by ``reduce`` (an autograd-aware all-reduce sum; identity by default: one process),
    so that every rank's loss holds the global term and the gradient that reaches a rank's
    own pixels is its share of the global one times the number of ranks, which DDP's average
    divides again. Per-pixel means stay local (DDP's average makes them global). ``mean``
    averages the terms' values over the ranks (identity by default) for the report.

    Returns ``(loss, parts, total)``: this rank's loss tensor, the global batch's terms and
    their sum (floats, the same on every rank).
    """
    reduce = reduce or (lambda t: t)
    cls = logits[:, :2].float()
    parts: dict[str, torch.Tensor] = {}
    q = torch.softmax(cls, dim=1)[:, 1]
    g = fg.float()
    if config.loss == "focal_tversky":
        parts["focal"] = focal_loss(cls, fg, config.focal_alpha, config.focal_gamma)
        s = reduce(torch.stack([(q * g).sum(), (q * (1.0 - g)).sum(), ((1.0 - q) * g).sum()]))
        tp, fp_sum, fn_sum = s[0], s[1], s[2]
        parts["tversky"] = 1.0 - (tp + _EPS) / (
            tp + config.tversky_fp * fp_sum + config.tversky_fn * fn_sum + _EPS
        )
    else:
        parts["ce"] = F.cross_entropy(cls, fg)
        s = reduce(torch.stack([(q * g).sum(), q.sum(), g.sum()]))
        parts["dice"] = 1.0 - (2.0 * s[0] + _EPS) / (s[1] + s[2] + _EPS)
    if dist_target is not None and logits.shape[1] > 2 and config.dist_weight > 0:
        parts["dist"] = config.dist_weight * F.binary_cross_entropy_with_logits(
            logits[:, 2].float(), dist_target
        )
    total = sum(parts.values())
    names = list(parts)
    local = [float(parts[k].detach()) for k in names]
    values = mean(local) if mean is not None else local
    out = dict(zip(names, values))
    return total, out, float(sum(values))
