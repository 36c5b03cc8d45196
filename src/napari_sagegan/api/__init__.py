"""The capabilities of napari-sagegan, one function each: the map of the library.

The command line (:mod:`napari_sagegan.cli`), the napari docks and scripts all call these;
none of them orchestrates work of its own. Each function takes arrays or paths, resolves
the pixel size (:func:`napari_sagegan.io.pixel_size.resolve_pixel_size`) and the particle
diameter (:func:`particle_diameter`) here and only here, and returns a progress generator:
it yields :class:`~napari_sagegan.util.progress.Progress` events and returns its result
(drive it with :func:`~napari_sagegan.util.progress.run_to_end`; ``close()`` cancels).
With ``out=`` a function also writes its files, into a hidden staging folder or temporary
files that are moved into place at the end, so bad input, an error or a cancel leave
nothing half-written.

- :func:`segment` -- instance labels of micrographs (tiled, resampled to the model's
  particle size); returns a list of :class:`Segmented`. ``out=``: ``<stem>.tif`` label
  TIFFs, ``--csv`` tables, ``segment_report.json``.
- :func:`segment_blocks` -- one image larger than memory (a TIFF, a zarr folder, a dask
  array) segmented block by block with overlap, particles stitched across block borders,
  into a chunked zarr folder or a tiled TIFF; returns a :class:`BlockSegmented`.
  :func:`segment_blocks_into` does several into a folder with ``segment_report.json``.
  Needs the ``large`` extra (zarr, dask).
- :func:`segment_distributed` -- :func:`segment` of image files on a dask.distributed
  cluster (a LocalCluster or a running scheduler), written as each image finishes,
  resumable; returns one dict per input. Needs the ``distributed`` extra.
- :func:`estimate_size` -- the particle size :func:`segment` would use for one image, with
  its confidence, found before segmenting; and, for an image without a pixel size, the
  pixel size its scale bar proposes (for the user to confirm); returns :class:`SizeEstimate`.
- :func:`fine_tune` -- train or fine-tune a segmenter on (image, labels) pairs (phase 1);
  returns :class:`Trained`. ``out=``: the best checkpoint.
- :func:`augment` -- SAGE-GAN phase 2 (the segmenter with a mask -> image generator) and
  synthetic pairs; returns :class:`Augmented`. ``out=``: both models, images/, masks/.
- :func:`generate` -- synthetic (uint8 image, int32 labels) pairs from a trained generator.
  ``out=``: images/ and masks/.
- :func:`measure` -- particle tables (size, shape, order, g(r)); returns
  :class:`Measured`. ``out=``: CSV + summary JSON.
- :func:`evaluate` -- Dice and instance F1 of labels against ground truth; returns
  ``{"per_image", "mean"}``. ``out=``: JSON.
- :func:`export_model` -- a segmenter as an ONNX file (metadata: normalisation, network
  scale, thresholds) or a bioimage.io model package; returns :class:`Exported`.
- :func:`particle_diameter` -- the one conversion of a particle diameter (px, or nm with
  the pixel size) into pixels.

The functions live in the modules of this package (:mod:`~napari_sagegan.api.segment`,
:mod:`~napari_sagegan.api.distributed`, :mod:`~napari_sagegan.api.train`,
:mod:`~napari_sagegan.api.analysis`, :mod:`~napari_sagegan.api.export_model`) and are
used from
here: ``from napari_sagegan import api; api.segment(...)``. Importing the package loads
neither torch nor Qt: the engine is imported inside the functions.
"""

from napari_sagegan.api.analysis import Measured, evaluate, measure
from napari_sagegan.api.blocks import BlockSegmented, segment_blocks, segment_blocks_into
from napari_sagegan.api.distributed import segment_distributed
from napari_sagegan.api.export_model import Exported, export_model
from napari_sagegan.api.segment import (
    REPORT_FORMAT,
    REPORT_NAME,
    REPORT_VERSION,
    Micrograph,
    Segmented,
    SizeEstimate,
    describe_annotations,
    describe_scale_bar,
    estimate_size,
    particle_diameter,
    segment,
)
from napari_sagegan.api.train import (
    Augmented,
    Trained,
    augment,
    fine_tune,
    fit_patch_size,
    generate,
)

__all__ = [
    "REPORT_FORMAT",
    "REPORT_NAME",
    "REPORT_VERSION",
    "Augmented",
    "BlockSegmented",
    "Exported",
    "Measured",
    "Micrograph",
    "Segmented",
    "SizeEstimate",
    "Trained",
    "augment",
    "describe_annotations",
    "describe_scale_bar",
    "estimate_size",
    "evaluate",
    "export_model",
    "fine_tune",
    "fit_patch_size",
    "generate",
    "measure",
    "particle_diameter",
    "segment",
    "segment_blocks",
    "segment_blocks_into",
    "segment_distributed",
]
