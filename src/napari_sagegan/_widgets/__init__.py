"""napari dock widgets (thin: they gather values, run :mod:`napari_sagegan._tasks` generators
in a worker thread and turn the results into layers). Loaded lazily through napari.yaml."""
