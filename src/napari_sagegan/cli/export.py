"""``sagegan export``: the segmenter as an ONNX file or a bioimage.io model package, for
other tools.

::

    sagegan export MODEL.pt|default --out model.onnx [--format onnx|bioimageio]

``--format onnx`` (the default) writes one ``.onnx`` file whose metadata says how to use
it (input normalisation, network scale, thresholds); ``--format bioimageio`` a folder (new
or empty) or a ``.zip`` with ``rdf.yaml``, the weights and a test input / output. Written
atomically. The work is :func:`napari_sagegan.api.export_model`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from napari_sagegan.cli._common import drive, spare_inputs

#: The formats (:data:`napari_sagegan.api.export_model.FORMATS`; not imported for --help).
FORMATS = ("onnx", "bioimageio")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``export`` on the ``sagegan`` sub-parsers."""
    e = sub.add_parser(
        "export", help="write the segmenter as ONNX or a bioimage.io package, for other tools"
    )
    e.add_argument("model", metavar="MODEL", help="segmenter checkpoint (.pt) or 'default'")
    e.add_argument(
        "--out",
        required=True,
        help="model.onnx for --format onnx; a new or empty folder, or a .zip, for bioimageio",
    )
    e.add_argument("--format", default="onnx", choices=FORMATS, help="what to write")
    e.set_defaults(func=run)
    return e


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan export``; returns the exit status (0)."""
    spare_inputs([args.model], args.out)
    from napari_sagegan import api

    result = drive(api.export_model(args.model, args.out, format=args.format), "export")
    target = result.metadata.get("target_diameter_px") or "their own scale"
    print(
        f"sagegan: wrote {result.path} ({args.format}; input {result.metadata['input']}; "
        f"particles at {target} px, threshold {result.metadata['threshold']})"
    )
    return 0
