"""The compute engine: plain PyTorch + NumPy. It never imports Qt, napari or magicgui."""
