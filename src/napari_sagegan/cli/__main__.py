"""``python -m napari_sagegan.cli``: the ``sagegan`` command."""

import sys

from napari_sagegan.cli import main

sys.exit(main())
