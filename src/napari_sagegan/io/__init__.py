"""Qt-free readers and writers for micrographs and instance label images.

The submodules are imported on demand (``from napari_sagegan.io.images import read_image``);
importing this package loads neither torch nor Qt.
"""
