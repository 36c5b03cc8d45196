"""Qt-free glue for the Augment widget: SAGE-GAN phase 2 and synthetic pairs as layers.

- :class:`Augment`: train phase 2 from (image, labels) pairs and a segmenter model entry, in
  a worker thread; Cancel keeps the best so far (:meth:`Augment.result`).
- :func:`generate_pairs`: N synthetic pairs from the trained generator.
- :func:`synthetic_layer_data`: the pairs as napari layer-data tuples, named
  ``"SAGE-GAN synth 01"`` / ``"SAGE-GAN synth 01 labels"`` with metadata linking each
  Labels layer to its image (so the retrain widget lists them as training pairs).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_sagegan.napari.tasks import (
    META_KEY,
    ModelEntry,
    TrainingPair,
    gather_pairs,
    torch_threads,
)
from napari_sagegan.util.progress import Progress

#: Name prefix of generated pairs.
SYNTH_PREFIX = "SAGE-GAN synth"
#: Name of the live preview layer.
PREVIEW_NAME = "SAGE-GAN preview"


class Augment:
    """Train phase 2 on pairs from the viewer and/or a folder; meant for a worker thread.

    Parameters
    ----------
    base : ModelEntry
        The phase-1 segmenter to start from.
    pairs : sequence of TrainingPair
        Pairs from the viewer (checked before the worker starts).
    config : GanConfig
        Budget, schedule and sizes.
    folder : (images_dir, masks_dir) or None
        Extra pairs read in the worker.
    """

    def __init__(
        self,
        base: ModelEntry,
        pairs: Sequence[TrainingPair],
        config: Any,
        *,
        folder: tuple[str, str | None] | None = None,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.base = base
        self.pairs = list(pairs)
        self.config = config
        self.folder = folder
        self.device = device
        self.threads = threads
        self.trainer: Any = None

    def run(self) -> Generator[Progress, None, Any]:
        from napari_sagegan.engine.train.gan import GanTrainer

        with torch_threads(self.threads):
            yield Progress("prepare", 0, None, message="loading the segmenter and the pairs")
            seg = self.base.load()
            images, labels = gather_pairs(
                self.pairs,
                self.folder,
                "tick (image, labels) layers or choose a folder of image/mask pairs",
            )
            config = self.config
            smallest = min(min(im.shape) for im in images)
            if config.patch_size > smallest and smallest >= 32:
                config = config.replace(patch_size=int(smallest // 16 * 16))
            self.trainer = GanTrainer(images, labels, config, seg=seg, device=self.device)
            yield Progress(
                "prepare",
                1,
                None,
                message=(
                    f"{len(self.trainer.seg.train_images)} training images, "
                    f"{len(self.trainer.seg.val_images)} for validation, on "
                    f"{self.trainer.seg.device_name}"
                ),
            )
            yield from self.trainer.run()
        return self.result()

    def result(self) -> tuple[dict, dict] | None:
        """``(segmenter checkpoint, generator checkpoint)`` of the best so far, or ``None``."""
        tr = self.trainer
        if tr is None or not tr.history:
            return None
        return tr.segmenter_checkpoint(), tr.generator_checkpoint()

    def source_labels(self) -> list[np.ndarray]:
        """The training masks (network scale): the layouts of new pairs are drawn from them."""
        return list(self.trainer.seg.train_labels) if self.trainer is not None else []


def generate_pairs(
    gen_ckpt: dict,
    source_labels: Sequence[np.ndarray],
    n: int,
    *,
    layout: str = "real",
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
) -> Generator[Progress, None, list[tuple[np.ndarray, np.ndarray]]]:
    """``n`` pairs ``(uint8 image, int32 labels)`` from a generator checkpoint dict."""
    from napari_sagegan.engine.synthetic.layouts import make_masks, synthesize_pairs, to_uint8
    from napari_sagegan.engine.train.gan import build_generator

    with torch_threads(threads):
        yield Progress("prepare", 0, n, message="drawing new masks")
        stats = (gen_ckpt.get("extra") or {}).get("mask_stats")
        masks = make_masks(list(source_labels) or None, n, layout=layout, stats=stats, seed=seed)
        gen = build_generator(gen_ckpt)
        pairs = yield from synthesize_pairs(gen, masks, seed=seed, device=device)
    return [(to_uint8(img), lab) for img, lab in pairs]


def synthetic_layer_data(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], start: int = 1
) -> list[tuple[Any, dict, str]]:
    """Image + Labels layer tuples for generated pairs, numbered from ``start``."""
    out = []
    for i, (image, labels) in enumerate(pairs, start):
        name = f"{SYNTH_PREFIX} {i:02d}"
        meta = {META_KEY: {"image": name, "synthetic": True}}
        out.append((image, {"name": name, "metadata": meta, "colormap": "gray"}, "image"))
        out.append((labels, {"name": f"{name} labels", "metadata": dict(meta)}, "labels"))
    return out


def is_synthetic(layer: Any) -> bool:
    """A layer made by :func:`synthetic_layer_data`."""
    meta = (getattr(layer, "metadata", None) or {}).get(META_KEY) or {}
    return bool(meta.get("synthetic"))
