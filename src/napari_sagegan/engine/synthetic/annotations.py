"""Burned-in annotations for generated training images: scale bars, their labels, panel
letters and SEM data bars.

Real micrographs, and the published figures of EMPS, carry them; they are high-contrast,
solid, and exactly the size of a particle often enough to be counted as one. Training
images get them drawn on top (labelled as background, so the network learns to leave them
out), and the detector in :mod:`napari_sagegan.engine.infer.annotations` is tested on them.

Text is drawn with Pillow's built-in scalable font (no font file, nothing downloaded).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: What :func:`burn_in` can draw.
KINDS = ("scalebar", "letter", "databar")


def _text_mask(text: str, height: int) -> np.ndarray:
    """A boolean mask of ``text`` rendered about ``height`` pixels tall."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(8, int(height))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, right - left + 2), max(1, bottom - top + 2)), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, fill=255, font=font)
    return np.asarray(canvas) > 127


def _paste(dst: np.ndarray, mask: np.ndarray, y: int, x: int) -> tuple[int, int, int, int]:
    """OR ``mask`` into ``dst`` at (y, x), clipped; return the box written."""
    h, w = dst.shape
    mh, mw = mask.shape
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(h, y + mh), min(w, x + mw)
    if y1 > y0 and x1 > x0:
        dst[y0:y1, x0:x1] |= mask[y0 - y : y1 - y, x0 - x : x1 - x]
    return y0, x0, y1, x1


def _level(image: np.ndarray, bright: bool) -> float:
    """Annotations are drawn in the image's extreme grey values, as figure tools do."""
    return float(image.max() if bright else image.min())


def burn_in(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    kinds: tuple[str, ...] = KINDS,
    p: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw annotations on a generated micrograph and remove them from its labels.

    Each of ``kinds`` is drawn with probability ``p``: a scale bar (a solid rectangle 8-25 %
    of the image wide, with a label such as ``"50 nm"`` above or below it, black or
    white, optionally on a contrasting box) in a corner; a panel letter in the top-left
    corner; an SEM data bar (a solid band across the foot of the image, 6-12 % of its
    height, with a line of instrument text).

    Parameters
    ----------
    image : ndarray, shape (Y, X)
        The micrograph (any numeric dtype); not modified.
    labels : ndarray of int, shape (Y, X)
        Its instance labels; not modified.
    rng : numpy.random.Generator
        Randomness (position, size, text, polarity).
    kinds : tuple of str
        Any of :data:`KINDS`.
    p : float
        Probability of each kind.

    Returns
    -------
    image : ndarray, same dtype
    labels : ndarray, the particles' pixels under an annotation set to 0 (instances that
        lose more than half of their area are removed altogether)
    mask : ndarray of bool, the annotation pixels
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown annotation kind {k!r}; choose from {', '.join(KINDS)}")
    img = np.array(image, copy=True)
    lab = np.array(labels, copy=True)
    h, w = img.shape
    f = img.astype(np.float32)
    mask = np.zeros((h, w), bool)
    paint = np.zeros((h, w), np.float32)  # grey value per annotation pixel
    bottom = h  # the data bar pushes the scale bar up

    def put(m: np.ndarray, value: float) -> None:
        nonlocal paint
        paint = np.where(m, value, paint)  # later marks draw over earlier ones
        mask[:] |= m

    if "databar" in kinds and rng.random() < p and h >= 96:
        band = int(h * rng.uniform(0.06, 0.12))
        bright = rng.random() < 0.3
        m = np.zeros((h, w), bool)
        m[h - band :, :] = True
        put(m, _level(f, bright))
        txt = rng.choice(["HV 5.00 kV", "WD 8.1 mm", "Mag 50.0 kx", "SE2  EHT = 3.00 kV"])
        tm = np.zeros((h, w), bool)
        _paste(tm, _text_mask(str(txt), band * 0.5), h - band + band // 4, int(w * 0.05))
        put(tm, _level(f, not bright))
        bottom = h - band
    if "scalebar" in kinds and rng.random() < p and min(h, w) >= 48:
        bright = rng.random() < 0.6
        bar_w = max(8, int(w * rng.uniform(0.08, 0.25)))
        bar_h = max(2, int(round(h * rng.uniform(0.008, 0.025))))
        margin = max(3, int(min(h, w) * rng.uniform(0.02, 0.06)))
        right = rng.random() < 0.7
        x0 = w - margin - bar_w if right else margin
        y0 = bottom - margin - bar_h
        value = rng.choice([10, 20, 50, 100, 200, 500])
        unit = rng.choice(["nm", "µm", "nm"])
        text = _text_mask(f"{value} {unit}", max(8, min(h, w) * rng.uniform(0.03, 0.06)))
        th, tw = text.shape
        if rng.random() < 0.35:  # a contrasting box behind bar and label
            box = np.zeros((h, w), bool)
            by0 = max(0, y0 - th - 2 * margin // 2 - 4)
            box[by0 : min(h, y0 + bar_h + 4), max(0, x0 - 4) : min(w, x0 + bar_w + 4)] = True
            put(box, _level(f, not bright))
        bar = np.zeros((h, w), bool)
        bar[y0 : y0 + bar_h, x0 : x0 + bar_w] = True
        put(bar, _level(f, bright))
        tm = np.zeros((h, w), bool)
        _paste(tm, text, y0 - th - 2, x0 + (bar_w - tw) // 2)
        put(tm, _level(f, bright))
    if "letter" in kinds and rng.random() < p and min(h, w) >= 48:
        bright = rng.random() < 0.5
        letter = str(rng.choice(list("abcdefABCDEF")))
        if rng.random() < 0.3:
            letter = f"({letter})"
        tm = np.zeros((h, w), bool)
        size = max(10, min(h, w) * rng.uniform(0.05, 0.1))
        _paste(tm, _text_mask(letter, size), int(size * 0.3), int(size * 0.3))
        put(tm, _level(f, bright))
    if mask.any():
        out = np.where(mask, paint, f)
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            out = np.clip(np.round(out), info.min, info.max)
        img = out.astype(img.dtype)
        lab = _drop_covered(lab, mask)
    return img, lab, mask


def _drop_covered(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels with the annotation pixels cleared and half-covered instances removed."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return labels
    area = np.bincount(labels.ravel(), minlength=n + 1)
    covered = np.bincount(labels[mask].ravel(), minlength=n + 1)
    gone = covered * 2 > area
    gone[0] = False
    out = np.where(mask | gone[labels], 0, labels)
    return out.astype(labels.dtype, copy=False)


def with_annotations(pairs: Any, seed: int, p: float = 0.5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Burn annotations into a fraction ``p`` of (image, labels) pairs (seeded per pair)."""
    out = []
    for i, (img, lab) in enumerate(pairs):
        rng = np.random.default_rng([int(seed), 7331, i])
        if rng.random() < p:
            img, lab, _ = burn_in(img, lab, rng, p=0.7)
        out.append((img, lab))
    return out
