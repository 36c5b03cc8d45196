"""Training on several processes: ``torchrun`` with DistributedDataParallel (gloo, CPU) trains
a tiny model to the same weights as one process with the same global batch and seed, rank 0
alone writes the one checkpoint, and a batch that does not divide is refused.

The two-process runs are real ``python -m torch.distributed.run`` launches; this file is
also their worker (``python tests/test_ddp.py worker OUT``). One thread per process.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
#: Weights of two processes against one after a few Adam steps: the sums are reduced in
#: another order (gloo's all-reduce, the global BatchNorm statistics), nothing else differs.
ATOL, RTOL = 2e-5, 1e-4
#: The tiny network of these runs (the ``tiny`` preset: dropout 0.5 in the decoder).
ARCH = {"base_channels": 4, "depth": 2, "dropout": 0.5}
#: Measured (the worker's runs, 2026): the weights other than the biases below differ by at
#: most 6e-6 between two processes and one. The bias of a convolution that a BatchNorm
#: follows has a gradient of 0 in exact arithmetic (BatchNorm removes any constant); its
#: float residue (~1e-9) depends on the order of the sums, and Adam scales it to steps of the
#: learning rate's size: those biases (and the running means they shift) differ as much
#: between one process on 1 and on 2 threads (0.017) as between one process and two (0.021).
#: They are left out of the weight comparison; the network's function in training mode,
#: where BatchNorm cancels them exactly, is compared instead (:func:`_assert_same_model`).


def _toy(n: int = 6, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sys.path.insert(0, str(HERE.parent))
    from conftest import disc_image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(10, 54, 2)) for _ in range(3)]
        img, lab = disc_image((64, 64), centres, radius=int(rng.integers(5, 8)), seed=i)
        images.append(img)
        labels.append(lab)
    return images, labels


#: The runs the worker makes, in order, in the same processes: name -> TrainConfig fields.
RUNS = {
    # validation on rank 0 (scores shared, plateau schedule), calibration. No augmentation:
    # with it (any one operation, even flips) the first step's gradients of the attention
    # gates differ between two processes and one on an AMD EPYC (Zen 4) CPU, although every
    # rank draws the same augmented global batch as one process (checked by hashing the
    # batches) and one process on 1 and 2 threads agrees to 2e-6; not yet explained (2026-12)
    "focal_tversky": dict(loss="focal_tversky", val_fraction=0.34, epochs=2, augment_p=0.0),
    # the other whole-batch loss, no validation (the latest weights are written)
    "ce_dice": dict(loss="ce_dice", val_fraction=0.0, epochs=1, augment_p=0.0),
    # a time budget: rank 0's clock decides when every rank stops
    "budget": dict(val_fraction=0.0, epochs=10_000, max_minutes=0.01, augment_p=0.0),
}


def _worker(out: Path, device: str = "cpu") -> None:
    """Train :data:`RUNS` in this process (one rank, or the only process) and dump each run's
    latest weights, history and step count to ``out/<run>/rank<R>.pt``."""
    from napari_sagegan.engine.checkpoint import state_on_cpu
    from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig
    from napari_sagegan.engine.train.segmenter import SegmenterTrainer
    from napari_sagegan.util.progress import run_to_end

    torch.set_num_threads(1)
    images, labels = _toy()
    rank = int(os.environ.get("RANK", "0"))
    for name, fields in RUNS.items():
        base = dict(
            patch_size=32, batch_size=4, steps_per_epoch=3, lr=3e-3, seed=0,
            min_instance_area=5, num_threads=1, target_diameter=None,
        )  # fmt: skip
        base.update(fields)
        folder = out / name
        (folder / "ckpt").mkdir(parents=True, exist_ok=True)
        trainer = SegmenterTrainer(
            images, labels, TrainConfig(**base),
            arch=ArchConfig(**ARCH),
            out=folder / "ckpt" / "m.pt", device=device,
            infer=InferConfig(tile_size=64, min_size=5),
        )  # fmt: skip
        start = state_on_cpu(trainer.model)
        run_to_end(trainer.run())
        torch.save(
            {
                "start": start,
                "state": state_on_cpu(trainer.model),
                "history": trainer.history,
                "step": trainer.step,
                "stopped_by": trainer.stopped_by,
            },
            folder / f"rank{rank}.pt",
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
    ]  # fmt: skip


def _torchrun(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = _torchrun_cmd(nproc, *args)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@functools.cache
def _pre_bn_biases() -> frozenset[str]:
    """State keys of the biases of convolutions followed by a BatchNorm (see above)."""
    from torch import nn

    from napari_sagegan.engine.config import ArchConfig
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    keys = set()
    for name, mod in AttentionUNet(ArchConfig(**ARCH)).named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, x), (_, y) in zip(kids, kids[1:]):
                if isinstance(x, nn.Conv2d) and isinstance(y, nn.BatchNorm2d):
                    keys.add(f"{name}.{a}.bias")
    return frozenset(keys)


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same weights within :data:`ATOL` / :data:`RTOL` (all but the biases BatchNorm
    cancels, and the running means they shift), and the same function in training mode."""
    from napari_sagegan.engine.config import ArchConfig
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    assert a.keys() == b.keys()
    skip = _pre_bn_biases()
    assert skip and skip <= a.keys()
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        elif k not in skip and not k.endswith("running_mean"):
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)
    x = torch.from_numpy(np.stack(_toy(4, seed=3)[0])[:, None, :32, :32] / 127.5 - 1).float()
    outs = []
    for state in (a, b):
        net = AttentionUNet(ArchConfig(**ARCH))
        net.load_state_dict(state)
        torch.manual_seed(0)  # the same dropout masks
        with torch.no_grad():
            outs.append(net.train()(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker run by two torchrun processes and, meanwhile, by this one."""
    two = tmp_path_factory.mktemp("two")
    one = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    with subprocess.Popen(
        _torchrun_cmd(2, str(HERE), "worker", str(two)), env=_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as proc:  # fmt: skip
        try:
            _worker(one)
        finally:
            torch.set_num_threads(threads)
            log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, log[-3000:]
    return one, two


def test_two_processes_train_the_same_weights_as_one(runs):
    one, two = runs
    for name in ("focal_tversky", "ce_dice"):
        ref = _load(one / name / "rank0.pt")
        ranks = [_load(two / name / f"rank{r}.pt") for r in (0, 1)]
        # the ranks hold one model (DDP), and it is the one process's, step for step
        for k, v in ranks[0]["state"].items():
            assert torch.equal(v, ranks[1]["state"][k]), (name, k)
        _assert_same_model(ranks[0]["state"], ref["state"])
        assert ranks[0]["step"] == ref["step"] == 3 * RUNS[name]["epochs"]
        # the losses reported are the global batch's, and validation ran on the same weights
        for mine, theirs in zip(ranks[0]["history"], ref["history"], strict=True):
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                # validation runs in eval mode, where the running means (see ATOL) move a
                # few pixels of the maps: its scores agree to 1e-2, the losses to 1e-5
                tol = 1e-2 if key.startswith("val_") else 1e-5
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=tol), (name, key)
        # and training moved the weights: not a comparison of two untrained models
        moved = max(
            (v - ref["start"][k]).abs().max().item()
            for k, v in ref["state"].items()
            if v.is_floating_point() and k not in _pre_bn_biases()
        )
        assert moved > 100 * ATOL
    hist = _load(one / "focal_tversky" / "rank0.pt")["history"]
    assert "val_f1@0.5" in hist[-1]


def test_rank0_writes_the_one_checkpoint(runs):
    from napari_sagegan.engine.checkpoint import Checkpoint

    one, two = runs
    for name in RUNS:
        assert [p.name for p in (two / name / "ckpt").iterdir()] == ["m.pt"]
        mine = Checkpoint.load(two / name / "ckpt" / "m.pt")
        ref = Checkpoint.load(one / name / "ckpt" / "m.pt")
        # the same file as a one-process run: the bare model, loadable as usual
        assert mine.kind == ref.kind and mine.metrics.keys() == ref.metrics.keys()
        assert set(mine.state_dict) == set(mine.build().state_dict())
        if name == "budget":  # a run of other steps (it stopped on time)
            continue
        for key, value in ref.metrics.items():
            assert mine.metrics[key] == pytest.approx(value, abs=1e-2), (name, key)
    # without validation the file holds the latest weights: the one process's. (With it,
    # the best of epochs whose scores differ by less than the tolerance is either.)
    mine = Checkpoint.load(two / "ce_dice" / "ckpt" / "m.pt")
    _assert_same_model(
        mine.state_dict, Checkpoint.load(one / "ce_dice" / "ckpt" / "m.pt").state_dict
    )
    # rank 0 calibrated the model it wrote
    assert "calibration" in Checkpoint.load(two / "focal_tversky" / "ckpt" / "m.pt").extra


def test_a_time_budget_stops_every_rank_at_the_same_step(runs):
    _, two = runs
    ranks = [_load(two / "budget" / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["stopped_by"] == ranks[1]["stopped_by"] == "time"
    assert ranks[0]["step"] == ranks[1]["step"] < 3 * RUNS["budget"]["epochs"]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k


def test_a_batch_that_does_not_divide_is_refused(monkeypatch, tmp_path, capsys):
    from napari_sagegan.cli import main
    from napari_sagegan.engine.config import TrainConfig
    from napari_sagegan.engine.train.segmenter import SegmenterTrainer

    images, labels = _toy(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"batch size \(--batch-size\) 3 cannot be shared by 2"):
        SegmenterTrainer(images, labels, TrainConfig(batch_size=3, patch_size=32), device="cpu")
    import tifffile

    for d in ("im", "mk"):
        (tmp_path / d).mkdir()
    tifffile.imwrite(tmp_path / "im" / "a.tif", images[0])
    tifffile.imwrite(tmp_path / "mk" / "a.tif", labels[0].astype(np.uint16))
    rc = main([
        "train", "--images", str(tmp_path / "im"), "--masks", str(tmp_path / "mk"),
        "--out", str(tmp_path / "m.pt"), "--batch-size", "3", "--epochs", "1",
        "--device", "cpu",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "use a multiple of 2 (e.g. 4)" in err
    assert not (tmp_path / "m.pt").exists()


def _write_folders(tmp_path: Path, n: int) -> None:
    import tifffile

    images, labels = _toy(n)
    for d in ("im", "mk", "out"):
        (tmp_path / d).mkdir()
    for i, (img, lab) in enumerate(zip(images, labels)):
        tifffile.imwrite(tmp_path / "im" / f"p{i}.tif", img)
        tifffile.imwrite(tmp_path / "mk" / f"p{i}.tif", lab.astype(np.uint16))


def _cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train", "--images", str(tmp_path / "im"), "--masks", str(tmp_path / "mk"),
        "--out", str(tmp_path / "out" / "m.pt"), "--preset", "tiny", "--steps-per-epoch",
        "2", "--batch-size", "4", "--patch-size", "32", "--val-fraction", "0",
        "--target-diameter", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_the_documented_command_runs_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2 -m napari_sagegan.cli train ...``: one report (rank 0's)
    and one checkpoint, of the usual format."""
    from napari_sagegan.engine.checkpoint import Checkpoint

    _write_folders(tmp_path, 3)
    proc = _torchrun(2, "-m", "napari_sagegan.cli", *_cli_args(tmp_path, "--epochs", "1"))
    _check(proc)
    assert proc.stdout.count("sagegan: wrote") == 1, proc.stdout
    assert proc.stderr.count("steps per epoch") == 1, proc.stderr  # rank 0's report alone
    assert "in each of 2 processes" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.pt"]
    assert Checkpoint.load(tmp_path / "out" / "m.pt").step == 2


def test_a_stopped_rank_stops_the_other(tmp_path):
    """SIGTERM to rank 0 alone: it stops cleanly (the model it wrote stays whole) and rank 1,
    waiting for it at the next collective, stops too instead of hanging."""
    import time

    psutil = pytest.importorskip("psutil")
    from napari_sagegan.engine.checkpoint import Checkpoint

    _write_folders(tmp_path, 3)
    cmd = _torchrun_cmd(2, "-m", "napari_sagegan.cli", *_cli_args(tmp_path, "--epochs", "100000"))
    proc = subprocess.Popen(cmd, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "out" / "m.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # rank 0 writes the latest model after every epoch
        assert (tmp_path / "out" / "m.pt").exists(), "no checkpoint was written"
        ranks = {c.environ().get("RANK"): c for c in psutil.Process(proc.pid).children()}
        ranks["0"].terminate()
        t0 = time.monotonic()
        log = proc.communicate(timeout=60)[0]
        assert time.monotonic() - t0 < 30, log
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "interrupted; the best model so far is in" in log, log[-3000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.pt"]
    assert Checkpoint.load(tmp_path / "out" / "m.pt").step >= 2


def test_the_loss_of_one_share_is_the_one_process_loss():
    """With one process (no reduction), the share's loss is
    :func:`~napari_sagegan.engine.train.losses.segmentation_loss`, term for term and for its
    gradient (the formulas of the whole-batch terms are written twice)."""
    from napari_sagegan.engine.config import TrainConfig
    from napari_sagegan.engine.train.distributed import global_segmentation_loss
    from napari_sagegan.engine.train.losses import segmentation_loss

    g = torch.Generator().manual_seed(0)
    fg = (torch.rand(3, 16, 16, generator=g) > 0.6).long()
    dist = torch.rand(3, 16, 16, generator=g) * fg
    for loss in ("focal_tversky", "ce_dice"):
        cfg = TrainConfig(loss=loss)
        grads, totals = [], []
        for fn in (segmentation_loss, global_segmentation_loss):
            logits = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
            logits.requires_grad_(True)
            out = fn(logits, fg, dist, cfg)
            out[0].backward()
            grads.append(logits.grad)
            totals.append((float(out[0]), out[1]))
        assert torch.equal(grads[0], grads[1]), loss
        assert totals[0][0] == totals[1][0] and totals[0][1] == totals[1][1], loss


@pytest.mark.gpu
def test_two_gpus_train_like_one(tmp_path):
    """nccl on CUDA, SyncBatchNorm, one process per GPU (needs 2 GPUs): the ranks hold one
    model and rank 0 writes the one checkpoint. (Against one GPU the weights are not compared:
    CUDA's one-process dropout kernel draws other masks than the sliced global-batch mask.)"""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    proc = _torchrun(2, str(HERE), "worker", str(tmp_path / "two"), "cuda")
    _check(proc)
    ranks = [_load(tmp_path / "two" / "ce_dice" / f"rank{r}.pt") for r in (0, 1)]
    for k, v in ranks[0]["state"].items():
        torch.testing.assert_close(v, ranks[1]["state"][k], atol=1e-6, rtol=1e-5)
    assert [p.name for p in (tmp_path / "two" / "ce_dice" / "ckpt").iterdir()] == ["m.pt"]


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "worker":
    _worker(Path(sys.argv[2]), *(sys.argv[3:4]))
