"""The training campaign of the bundled mask -> image generator (phase 2's G): resumable, in
chunks, logged, shipped only when better.

Usage::

    nice -n 19 python scripts/campaign_generator.py --hours 2      # CPU, in the background
    python scripts/campaign_generator.py --hours 0.2 --device cuda --batch 32 --threads 8
    python scripts/campaign_generator.py --ship   # package if better; section of the card

State (committed, so that a later run on any machine continues where this one stopped):
``campaign/generator.pt`` (the generator and its image discriminator, float16; one file that
replaces itself) and ``campaign/generator-curve.csv`` (one row per chunk: cumulative
optimiser steps, CPU-hours, validation SSIM of ``G(m)`` against the real image and of a flat
image, the baseline).

Data: the EMPS leave-source-out training part (all 321 images: the generator is never scored
on them) plus generated pairs of every modality the renderer knows (no burned-in annotations:
the generator draws particles and their background), resampled to the bundled segmenter's
network scale, the scale phase 2 works at. Validation: the 45 leave-source-out validation
images (whole articles the generator never saw).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

from campaign import STATE, append_curve, curve_rows, fmt  # noqa: E402

import emps  # noqa: E402

WEIGHTS = STATE / "generator.pt"
CURVE = STATE / "generator-curve.csv"
CURVE_KEYS = [
    "chunk",
    "steps",
    "cpu_hours",
    "wall_hours",
    "device",
    "val_ssim",
    "flat_ssim",
    "date",
]
#: Generated pairs mixed with the 321 EMPS training images.
N_GENERATED = 240
PACKAGED = ROOT / "src" / "napari_sagegan" / "models" / "generator.pt"


def recipe(seed: int = 0):
    """(train_images, train_labels, val_images, val_labels)."""
    from napari_sagegan.engine.synthetic.render import make_training_set

    train, val = emps.load_lso()
    gen = make_training_set(N_GENERATED, shape=(256, 256), seed=seed + 7)
    images = [i for _s, i, _l in train] + [i for i, _ in gen]
    labels = [lab for _s, _i, lab in train] + [lab for _, lab in gen]
    return images, labels, [i for _s, i, _l in val], [lab for _s, _i, lab in val]


def network_scale() -> float:
    """The bundled segmenter's network scale (particle diameter, px)."""
    from napari_sagegan.engine.checkpoint import Checkpoint

    return float(Checkpoint.load("default").target_diameter or 32.0)


def trainer_for(args, data, *, chunk: int, minutes: float):
    from napari_sagegan.engine.config import GanConfig, TrainConfig
    from napari_sagegan.engine.train.generator_pretrain import GeneratorTrainer

    images, labels, val_i, val_l = data
    train = TrainConfig(
        max_minutes=minutes,
        seed=args.seed + chunk,
        lr=args.lr,
        batch_size=args.batch,
        patch_size=args.patch,
        steps_per_epoch=args.steps_per_epoch,
        epochs=1_000_000,
        num_threads=args.threads,
        calibrate=False,
    )
    return GeneratorTrainer(
        images,
        labels,
        GanConfig(train=train),
        target_diameter=network_scale(),
        init=str(WEIGHTS) if WEIGHTS.exists() else None,
        device=args.device,
        val_images=val_i,
        val_labels=val_l,
    )


def run_chunk(args, data) -> None:
    rows = curve_rows(CURVE)
    last = rows[-1] if rows else {}
    chunk = int(last.get("chunk", 0)) + 1
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    trainer = trainer_for(args, data, chunk=chunk, minutes=args.chunk_minutes)
    steps0 = trainer.step
    print(f"generator chunk {chunk}: from step {steps0}, {trainer.device_name}", flush=True)
    for ev in trainer.run():
        if ev.stage == "validate":
            print(f"  {ev.message} ({(time.perf_counter() - t_wall) / 60:.1f} min)", flush=True)
    s = trainer.scores()  # the weights that continue (the current ones, not a "best")
    STATE.mkdir(parents=True, exist_ok=True)
    trainer.save(WEIGHTS, best=False, half=True, trainer_state=True)
    row = {
        "chunk": chunk,
        "steps": trainer.step,
        "cpu_hours": f"{float(last.get('cpu_hours', 0)) + (time.process_time() - t_cpu) / 3600:.3f}",
        "wall_hours": f"{float(last.get('wall_hours', 0)) + (time.perf_counter() - t_wall) / 3600:.3f}",
        "device": trainer.device_name.split(" ")[0],
        "val_ssim": fmt(s["ssim"]),
        "flat_ssim": fmt(s["flat_ssim"]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    append_curve(CURVE, CURVE_KEYS, row)
    print(f"  chunk {chunk} done ({trainer.step - steps0} steps): {json.dumps(row)}", flush=True)


# --------------------------------------------------------------------------- shipping
#: Side of the validation crops (network pixels) scored by :func:`ship`.
CROP = 128
CARD_BEGIN = "<!-- generator card: written by scripts/campaign_generator.py --ship -->"
CARD_END = "<!-- end of generator card -->"


def crops_at_scale(images, labels, scale: float, per_image: int, seed: int):
    """Random ``CROP``-px crops (image in [-1, 1], binary mask) of the pairs resampled to the
    network scale; images smaller than a crop are skipped."""
    from napari_sagegan.engine.data.intensity import normalize
    from napari_sagegan.engine.data.pairs import prepare_pairs

    pairs = prepare_pairs(images, labels, val_fraction=0.0, seed=0).at_scale(scale)
    rng = np.random.default_rng(seed)
    xs, ms = [], []
    for im, lab in zip(pairs.train_images, pairs.train_labels):
        im, lab = np.asarray(im), np.asarray(lab)
        if min(im.shape) < CROP:
            continue
        x = normalize(im)
        for _ in range(per_image):
            y0 = int(rng.integers(0, im.shape[0] - CROP + 1))
            x0 = int(rng.integers(0, im.shape[1] - CROP + 1))
            xs.append(x[y0 : y0 + CROP, x0 : x0 + CROP])
            ms.append((lab[y0 : y0 + CROP, x0 : x0 + CROP] > 0).astype(np.float32))
    return np.stack(xs).astype(np.float32), np.stack(ms)


def draw(model, masks: np.ndarray, seed: int) -> np.ndarray:
    """``G(m)`` for every mask (fixed latents), in [-1, 1]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(masks), 16):
            m = torch.from_numpy(masks[i : i + 16])[:, None]
            z = torch.randn(len(m), model.config.z_dim, generator=gen)
            out.append(model(m, z).clamp(-1, 1)[:, 0].numpy())
    return np.concatenate(out)


def naive_render(masks: np.ndarray, real: np.ndarray, seed: int) -> np.ndarray:
    """The baseline a learned generator must beat: each mask drawn as two flat grey levels
    (the real crops' mean particle and background values) with Gaussian noise of the real
    crops' standard deviation inside each class."""
    rng = np.random.default_rng(seed)
    fg = masks > 0.5
    mu_f, mu_b = float(real[fg].mean()), float(real[~fg].mean())
    sd = float(np.sqrt(0.5 * (real[fg].var() + real[~fg].var())))
    out = np.where(fg, mu_f, mu_b) + rng.normal(0, sd, masks.shape)
    return np.clip(out, -1, 1).astype(np.float32)


def ssim_to(fake: np.ndarray, real: np.ndarray) -> float:
    import torch

    from napari_sagegan.engine.train.losses import ssim_index

    with torch.no_grad():
        return float(
            ssim_index(torch.from_numpy(fake)[:, None], torch.from_numpy(real)[:, None]).mean()
        )


def classifier_accuracy(real_tr, fake_tr, real_te, fake_te, *, steps: int = 300, seed: int = 0):
    """Held-out accuracy of a small CNN trained to tell real crops from synthetic ones (0.5:
    indistinguishable; 1.0: always told apart). Trained on the training articles' crops,
    tested on the validation articles'."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(16, 32, 3, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(32, 64, 3, 2, 1), nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.from_numpy(np.concatenate([real_tr, fake_tr]))[:, None]
    y = torch.cat([torch.ones(len(real_tr)), torch.zeros(len(fake_tr))])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        xb = x[idx]
        if torch.rand((), generator=gen) < 0.5:
            xb = xb.flip(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(net(xb)[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xt = torch.from_numpy(np.concatenate([real_te, fake_te]))[:, None]
        yt = torch.cat([torch.ones(len(real_te)), torch.zeros(len(fake_te))])
        pred = (net(xt)[:, 0] > 0).float()
    return float((pred == yt).float().mean())


def evaluate_generators(models: dict, seed: int = 0) -> dict[str, dict[str, float]]:
    """SSIM against the paired real crops and the real-vs-synthetic classifier's held-out
    accuracy of each generator in ``models`` (name -> module), of the naive two-level
    renderer and (SSIM only) of a flat image, on EMPS crops at the network scale."""
    train, val = emps.load_lso()
    scale = network_scale()
    tr_x, tr_m = crops_at_scale(
        [i for _s, i, _l in train], [lab for *_, lab in train], scale, 1, seed
    )
    te_x, te_m = crops_at_scale(
        [i for _s, i, _l in val], [lab for *_, lab in val], scale, 4, seed + 1
    )
    drawn = {name: (draw(m, tr_m, seed), draw(m, te_m, seed + 1)) for name, m in models.items()}
    drawn["naive two-level renderer"] = (
        naive_render(tr_m, tr_x, seed),
        naive_render(te_m, te_x, seed + 1),
    )
    out = {}
    for name, (f_tr, f_te) in drawn.items():
        out[name] = {
            "ssim": ssim_to(f_te, te_x),
            "classifier_accuracy": classifier_accuracy(tr_x, f_tr, te_x, f_te, seed=seed),
        }
        print(name, out[name], flush=True)
    flat = np.broadcast_to(te_x.mean(axis=(1, 2), keepdims=True), te_x.shape).copy()
    out["flat image (each crop's mean)"] = {
        "ssim": ssim_to(flat, te_x),
        "classifier_accuracy": float("nan"),
    }
    out["_n"] = {"train_crops": float(len(tr_x)), "val_crops": float(len(te_x))}
    return out


def ship(force: bool = False) -> bool:
    """Score the campaign's generator (and the bundled one, when there is one) on the
    validation articles; package the campaign's when a real-vs-synthetic classifier tells
    its images from real ones less often than the naive renderer's and the bundled
    generator's; write the generator section of docs/model-card.md either way."""
    from napari_sagegan.engine.checkpoint import Checkpoint

    if not WEIGHTS.exists():
        raise SystemExit(f"no campaign generator at {WEIGHTS}: run the campaign first")
    ck = Checkpoint.load(WEIGHTS, kind="generator")
    models = {"campaign generator": ck.build().eval()}
    if PACKAGED.exists():
        models["bundled generator"] = Checkpoint.load(PACKAGED, kind="generator").build().eval()
    res = evaluate_generators(models)
    c = res["campaign generator"]
    flat, naive = res["flat image (each crop's mean)"], res["naive two-level renderer"]
    # The criterion is realism (the classifier), not SSIM to the paired image: over mixed
    # modalities the mask does not say whether particles are dark or bright, so a generator
    # that draws either (as it must, to adapt to any user's style) loses SSIM to a flat
    # image on the other half; phase 2 fixes the style on the user's own pairs.
    better = c["classifier_accuracy"] < naive["classifier_accuracy"]
    if "bundled generator" in res:
        better = (
            better and c["classifier_accuracy"] <= res["bundled generator"]["classifier_accuracy"]
        )
    if better or force:
        extra = {k: v for k, v in dict(ck.extra).items() if k != "trainer"}
        Checkpoint.from_model(
            ck.build(),
            kind="generator",
            arch=ck.arch,
            train=ck.train,
            target_diameter=ck.target_diameter,
            seed=ck.seed,
            epoch=ck.epoch,
            step=ck.step,
            metrics={
                "lso_ssim": c["ssim"],
                "lso_flat_ssim": flat["ssim"],
                "lso_classifier_accuracy": c["classifier_accuracy"],
            },
            half=True,
            extra=extra,
        ).save(PACKAGED)
    write_card(res, shipped=better or force, ck=ck)
    print(("replaced" if better or force else "kept the bundled generator; not") + f" {PACKAGED}")
    return better or force


def write_card(res: dict, *, shipped: bool, ck) -> None:
    """Replace the generator section of docs/model-card.md (the rest stays)."""
    from napari_sagegan.util.files import atomic_write_text

    card = ROOT / "docs" / "model-card.md"
    text = card.read_text() if card.exists() else "# Model card\n"
    rows = curve_rows(CURVE)
    curve = "\n".join(
        [
            "| chunk | optimiser steps | CPU-hours | SSIM of G(m) | SSIM of a flat image |",
            "|---|---|---|---|---|",
        ]
        + [
            f"| {r['chunk']} | {r['steps']} | {float(r['cpu_hours']):.2f} | {r['val_ssim']} | {r['flat_ssim']} |"
            for r in rows
        ]
    )
    table = "\n".join(
        [
            "| images | SSIM to the real image | real-vs-synthetic classifier accuracy |",
            "|---|---|---|",
        ]
        + [
            f"| {name} | {m['ssim']:.3f} | "
            + (
                ""
                if m["classifier_accuracy"] != m["classifier_accuracy"]
                else f"{m['classifier_accuracy']:.3f}"
            )
            + " |"
            for name, m in res.items()
            if not name.startswith("_")
        ]
    )
    n = res["_n"]
    section = f"""{CARD_BEGIN}
## The bundled generator (phase 2's mask -> image network)

`src/napari_sagegan/models/generator.pt` (float16), used by `sagegan augment
--init-generator default` and `sagegan generate --generator default`. Trained by
`scripts/campaign_generator.py` on its own before phase 2 (`engine/train/generator_pretrain.py`:
the generator's identity terms of phase 2, L1 + multi-scale SSIM, and its image
discriminator with DiffAugment) on the {len(emps.load_lso()[0])} EMPS training images of the
leave-source-out split and {N_GENERATED} generated pairs of every modality, resampled to
the segmenter's network scale ({ck.target_diameter:g} px particles); {ck.step} optimiser steps.

Learning curve (`campaign/generator-curve.csv`; validation: {N_VAL_NOTE}):

{curve}

On {int(n["val_crops"])} crops of the validation images ({CROP} px, 4 per image, of
articles never trained on), with the masks of those crops: SSIM of the drawn image to the
real one, and the held-out accuracy of a small CNN trained for 300 steps to tell real crops
from drawn ones ({int(n["train_crops"])} crops of the training articles each way; 0.5: it
cannot tell them apart, 1.0: it always can):

{table}

Command: `python scripts/campaign_generator.py --ship`. Shipped: the
**{"campaign" if shipped else "previous (or no)"}** generator.

* **Limits:** a fraction of a CPU-hour of pre-training. Its images are told from real ones
  less often than a naive renderer's but still most of the time, and their SSIM to the paired
  real image is below a flat image's: over mixed modalities a mask does not say whether the
  particles are dark or bright, so a drawing of the other polarity scores below a grey
  field. It is a starting point that phase 2 adapts to the user's pairs; whether that beats
  phase 2 from random weights on few-shot episodes is not measured yet (docs/benchmarks.md).
{CARD_END}"""
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(card, text)


N_VAL_NOTE = "centre crops of the leave-source-out validation images, fixed latents"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0, help="wall-clock budget of this run")
    ap.add_argument("--chunk-minutes", type=float, default=15.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", action="store_true", help="compare and package; no training")
    ap.add_argument("--force", action="store_true", help="with --ship: package even if not better")
    args = ap.parse_args(argv)
    if args.ship:
        ship(force=args.force)
        return
    import torch

    torch.set_num_threads(max(1, args.threads))
    data = recipe(args.seed)
    deadline = time.perf_counter() + args.hours * 3600
    first = True
    while first or time.perf_counter() + args.chunk_minutes * 60 * 1.2 < deadline:
        first = False
        run_chunk(args, data)
        if os.environ.get("SAGEGAN_CAMPAIGN_ONE_CHUNK"):
            break


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
