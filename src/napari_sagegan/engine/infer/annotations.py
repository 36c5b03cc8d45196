"""Burned-in annotations are not particles: find scale bars, their labels, panel letters
and SEM data bars, and read a scale bar's length.

Figures in articles, and many micrographs straight from the microscope, carry annotations
drawn in one flat grey value (usually the darkest or brightest of the image): a solid
scale bar with its label, a panel letter in a corner, or a data bar across the foot of an
SEM image with the instrument's text. The network mostly learns to leave them out (training
images carry them, labelled as background), and this classical detector catches the rest:

* a **data bar**: the bottom rows of the image where most pixels share one flat value, at
  least 3 % of the image's height, taken whole with everything written on it;
* a **scale bar**: a component of flat extreme-valued pixels that fills its bounding box
  (>= 85 %), at least 4 times as wide as it is high and 3 % of the image wide, in the top
  or bottom third of the image;
* its **label** and **panel letters**: small flat components of an extreme value next to
  a scale bar (within a few bar heights above or below it, or a flat panel behind it), or
  thin-stroked glyphs in a top corner.

Particles mostly overlapping these regions are removed by the segmenter
(``InferConfig.exclude_annotations``), and the regions are reported. When the file has no
pixel size, :func:`scale_bar_pixel_size` proposes one from the bar's length and its label
(read with Tesseract OCR when that program is installed; optional).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Flat: within this fraction of the grey-value range of the image's extreme.
_FLAT_TOL = 0.01
#: A data bar: at least this fraction of the image height ...
_DATABAR_MIN = 0.03
#: ... made of rows where at least this fraction of the pixels share the band's value.
_DATABAR_ROW = 0.6


@dataclass(frozen=True)
class Annotation:
    """One burned-in annotation: ``kind`` (``"databar"``, ``"scalebar"``, ``"label"`` or
    ``"letter"``), its bounding box ``(y0, x0, y1, x1)`` (image pixels, end exclusive) and,
    for a scale bar, its length in pixels."""

    kind: str
    bbox: tuple[int, int, int, int]
    length_px: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "bbox": [int(v) for v in self.bbox]}
        if self.length_px is not None:
            out["length_px"] = float(self.length_px)
        return out


@dataclass
class Annotations:
    """All annotations found in an image: their union ``mask`` (bool, image shape) and the
    items."""

    mask: np.ndarray
    items: list[Annotation] = field(default_factory=list)

    @property
    def scale_bars(self) -> list[Annotation]:
        return [a for a in self.items if a.kind == "scalebar"]


def _levels(x: np.ndarray) -> tuple[float, float, float]:
    lo, hi = float(np.min(x)), float(np.max(x))
    return lo, hi, max(hi - lo, 1e-6)


def _data_bar(x: np.ndarray, span: float) -> int:
    """Height of a flat band at the foot of the image (0: none)."""
    h = x.shape[0]
    if h < 64:
        return 0
    foot = x[-max(1, h // 4) :]
    vals = np.round(foot / (span * _FLAT_TOL)).astype(np.int64)
    # the band's value: the commonest value of the last row
    last = vals[-1]
    u, c = np.unique(last, return_counts=True)
    mode = u[np.argmax(c)]
    if c.max() < _DATABAR_ROW * last.size:
        return 0
    share = (np.abs(vals - mode) <= 1).mean(axis=1)[::-1]  # bottom row first
    k = 0
    while k < share.size and share[k] >= _DATABAR_ROW:
        k += 1
    # the band's text may break a row or two: allow short gaps
    while k < share.size:
        nxt = share[k : k + 3]
        if nxt.size and (nxt >= _DATABAR_ROW).any() and (share[k:][:3] >= 0.3).all():
            k += int(np.argmax(nxt >= _DATABAR_ROW)) + 1
            while k < share.size and share[k] >= _DATABAR_ROW:
                k += 1
        else:
            break
    if k < _DATABAR_MIN * h or k >= share.size:  # too thin, or no end: a flat image
        return 0
    # a data bar stands out from the micrograph above it
    band = float(np.median(x[h - k :]))
    above = float(np.median(x[: h - k]))
    return k if abs(band - above) > 0.1 * span else 0


def find_annotations(image: Any) -> Annotations:
    """Find burned-in annotations in a 2-D image (see the module docstring).

    Parameters
    ----------
    image : array-like, shape (Y, X)
        Raw grey values.

    Returns
    -------
    Annotations
    """
    from scipy import ndimage as ndi

    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"find_annotations needs a 2-D image, got shape {x.shape}")
    h, w = x.shape
    mask = np.zeros((h, w), bool)
    items: list[Annotation] = []
    if not np.isfinite(x).all():
        x = np.where(np.isfinite(x), x, np.nanmedian(x) if np.isfinite(x).any() else 0.0)
    lo, hi, span = _levels(x)
    band = _data_bar(x, span)
    if band:
        mask[h - band :, :] = True
        items.append(Annotation("databar", (h - band, 0, h, w)))
    tol = _FLAT_TOL * span
    bars: list[tuple[int, int, int, int]] = []
    glyph_boxes: list[tuple[tuple[int, int, int, int], np.ndarray]] = []
    boxes: list[tuple[tuple[int, int, int, int], np.ndarray]] = []  # panels behind a bar
    for level in (hi, lo):
        flat = (np.abs(x - level) <= tol) & ~mask
        if not flat.any() or flat.mean() > 0.5:  # the background itself: not annotations
            continue
        lab, n = ndi.label(flat)
        if n == 0:
            continue
        objs = ndi.find_objects(lab)
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        for i, sl in enumerate(objs, 1):
            if sl is None:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            bh, bw = y1 - y0, x1 - x0
            fill = areas[i] / float(bh * bw)
            in_band = y1 <= h / 3 or y0 >= 2 * h / 3
            if (
                fill >= 0.85
                and bh >= 2
                and bw >= 4 * bh
                and bw >= 0.03 * w
                and bw <= 0.6 * w
                and in_band
            ):
                bars.append((y0, x0, y1, x1))
                mask[sl] |= lab[sl] == i
                items.append(Annotation("scalebar", (y0, x0, y1, x1), float(bw)))
            elif areas[i] >= 4 and bh <= 0.15 * h and bw <= 0.3 * w:
                glyph_boxes.append(((y0, x0, y1, x1), (lab[sl] == i)))
            elif fill >= 0.5 and bh <= 0.4 * h and bw <= 0.7 * w:
                boxes.append(((y0, x0, y1, x1), (lab[sl] == i)))
    # a flat panel drawn behind a scale bar and its label
    for (y0, x0, y1, x1), comp in boxes:
        if any(y0 <= by0 and x0 <= bx0 and by1 <= y1 and bx1 <= x1 for by0, bx0, by1, bx1 in bars):
            mask[y0:y1, x0:x1] |= comp
            items.append(Annotation("label", (y0, x0, y1, x1)))
    # labels next to bars, letters in corners
    for (y0, x0, y1, x1), comp in glyph_boxes:
        kind = None
        for by0, bx0, by1, bx1 in bars:
            bh = max(by1 - by0, 2)
            reach = max(6 * bh, int(0.08 * h))
            near_y = (by0 - reach <= y1 <= by0 + 1) or (by1 - 1 <= y0 <= by1 + reach)
            near_x = x1 >= bx0 - (bx1 - bx0) // 2 and x0 <= bx1 + (bx1 - bx0) // 2
            if near_y and near_x:
                kind = "label"
                break
        corner = max(0.15 * min(h, w), 24)
        tall = (y1 - y0) >= max(6, 0.025 * min(h, w))
        # glyphs are strokes: thin next to their height (a solid flat particle is not)
        thin = ndi.distance_transform_edt(np.pad(comp, 1)).max() <= 0.2 * (y1 - y0)
        if kind is None and tall and thin and y1 <= corner and (x1 <= corner or x0 >= w - corner):
            kind = "letter"
        if kind is not None:
            mask[y0:y1, x0:x1] |= comp
            items.append(Annotation(kind, (y0, x0, y1, x1)))
    return Annotations(_merge_labels(mask, items), items)


def _merge_labels(mask: np.ndarray, items: list[Annotation]) -> np.ndarray:
    """Close the gaps between the glyphs of a label, so that the particles a label's
    letters would give are covered whole."""
    from scipy import ndimage as ndi

    out = mask.copy()
    for a in items:
        if a.kind in ("label", "letter"):
            y0, x0, y1, x1 = a.bbox
            out[y0:y1, x0:x1] = (
                ndi.binary_closing(mask[y0:y1, x0:x1], iterations=2) | mask[y0:y1, x0:x1]
            )
    return out


def exclude(labels: np.ndarray, annotations: Annotations, overlap: float = 0.5) -> list[int]:
    """Remove (in place) the instances lying mostly (``> overlap``) on annotations; return
    their ids."""
    if not annotations.items or not labels.any():
        return []
    n = int(labels.max())
    area = np.bincount(labels.ravel(), minlength=n + 1)
    on = np.bincount(labels[annotations.mask].ravel(), minlength=n + 1)
    gone = np.flatnonzero((on > overlap * area) & (area > 0))
    gone = gone[gone > 0]
    if gone.size:
        labels[np.isin(labels, gone)] = 0
    return [int(g) for g in gone]


_UNITS_NM = {"nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6, "pm": 1e-3, "a": 0.1, "å": 0.1}


def parse_scale_label(text: str) -> float | None:
    """The length written on a scale bar's label, in nm (``"100 nm"`` -> 100.0,
    ``"2 µm"`` -> 2000.0, ``"0.5um"`` -> 500.0); ``None`` when no length is found."""
    t = text.strip().lower().replace(",", ".").replace("μ", "µ")
    m = re.search(r"(\d+(?:\.\d+)?)\s*(nm|um|µm|mm|pm|å|a)\b", t)
    if not m:
        return None
    value = float(m.group(1))
    return value * _UNITS_NM[m.group(2)] if value > 0 else None


def _ocr(crop: np.ndarray) -> str | None:
    """Text of a small crop with Tesseract, or ``None`` when it is not installed."""
    exe = shutil.which("tesseract")
    if exe is None or crop.size == 0:
        return None
    import io

    from PIL import Image

    a = crop.astype(np.float32)
    a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-6)).astype(np.uint8)
    if a.mean() < 128:  # tesseract reads dark text on a light ground best
        a = 255 - a
    buf = io.BytesIO()
    Image.fromarray(a).resize((a.shape[1] * 3, a.shape[0] * 3)).save(buf, format="PNG")
    try:
        out = subprocess.run(
            [exe, "stdin", "stdout", "--psm", "7"],
            input=buf.getvalue(),
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None


@dataclass(frozen=True)
class ScaleBarReading:
    """A pixel size proposed from a scale bar: its ``length_px``, the label's ``text`` and
    ``length_nm`` when read, and the resulting ``pixel_size_nm`` (``None`` unless both are
    known). A proposal for the user to confirm, never applied silently."""

    length_px: float
    text: str | None
    length_nm: float | None
    pixel_size_nm: float | None


def scale_bar_pixel_size(
    image: Any, annotations: Annotations | None = None
) -> ScaleBarReading | None:
    """Measure the longest scale bar and read its label (OCR, optional) into a proposed
    pixel size; ``None`` when the image has no scale bar."""
    x = np.asarray(image, dtype=np.float32)
    ann = annotations if annotations is not None else find_annotations(x)
    bars = sorted(ann.scale_bars, key=lambda a: -(a.length_px or 0))
    if not bars:
        return None
    bar = bars[0]
    y0, x0, y1, x1 = bar.bbox
    text = None
    labels = [a for a in ann.items if a.kind == "label"]
    if labels:
        ly0 = min(a.bbox[0] for a in labels)
        lx0 = min(a.bbox[1] for a in labels)
        ly1 = max(a.bbox[2] for a in labels)
        lx1 = max(a.bbox[3] for a in labels)
        pad = 3
        text = _ocr(x[max(0, ly0 - pad) : ly1 + pad, max(0, lx0 - pad) : lx1 + pad])
    nm = parse_scale_label(text) if text else None
    px = nm / bar.length_px if nm and bar.length_px else None
    return ScaleBarReading(float(bar.length_px or (x1 - x0)), text, nm, px)


def describe(items: list[Annotation]) -> str:
    """E.g. ``"excluded: scale bar (120 px), its label, SEM data bar"``."""
    if not items:
        return ""
    words = {
        "databar": "SEM data bar",
        "scalebar": "scale bar",
        "label": "scale-bar label",
        "letter": "panel letter",
    }
    parts = []
    for kind in ("scalebar", "label", "letter", "databar"):
        n = sum(1 for a in items if a.kind == kind)
        if n:
            w = words[kind]
            if kind == "scalebar":
                lens = ", ".join(f"{a.length_px:.0f} px" for a in items if a.kind == kind)
                w += f" ({lens})"
            elif kind == "label" and n > 1:
                w += f" ({n} glyphs)"
            parts.append(w)
    return "annotations left out: " + ", ".join(parts)
