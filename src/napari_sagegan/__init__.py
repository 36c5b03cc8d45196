"""napari-sagegan: nanoparticle segmentation in electron micrographs (SAGE-GAN).

Importing the package loads neither torch nor Qt; the engine lives in
:mod:`napari_sagegan.engine`, the command line in :mod:`napari_sagegan.cli`.
"""

try:
    from napari_sagegan._version import version as __version__
except ImportError:  # pragma: no cover - running from a source tree without setuptools-scm
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
