"""The npe2 manifest: valid, discovered through the entry point, every python_name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_sagegan

MANIFEST = Path(napari_sagegan.__file__).parent / "napari.yaml"


@pytest.fixture(scope="module")
def manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_file(MANIFEST)  # validates the schema


def _resolve(python_name: str):
    module, _, attr = python_name.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_manifest_is_valid_and_complete(manifest):
    assert manifest.name == "napari-sagegan"
    contrib = manifest.contributions
    ids = {c.id for c in contrib.commands}
    used = (
        [w.command for w in contrib.widgets]
        + [w.command for w in contrib.writers]
        + [s.command for s in contrib.sample_data]
        + [r.command for r in contrib.readers]
    )
    assert set(used) == ids  # every command is used, every use has a command
    assert {w.display_name for w in contrib.widgets} >= {
        "Segment",
        "Correct and retrain",
        "Export labels",
        "Measure particles",
        "Augment (SAGE-GAN)",
    }
    (writer,) = contrib.writers
    assert [str(t) for t in writer.layer_types] == ["labels"]
    assert ".tif" in writer.filename_extensions
    assert len(contrib.sample_data) >= 4
    (reader,) = contrib.readers
    patterns = set(reader.filename_patterns)
    assert {"*.dm3", "*.dm4", "*.emd", "*.ser", "*.mrc"} <= patterns
    # napari reads plain TIFFs itself: claiming them would make it ask for every TIFF
    assert not patterns & {"*.tif", "*.tiff"}


def test_napari_picks_the_plugin_for_em_files_and_leaves_tiffs_alone(tmp_path):
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    dm4 = [r.plugin_name for r in pm.iter_compatible_readers([str(tmp_path / "a.dm4")])]
    tif = [r.plugin_name for r in pm.iter_compatible_readers([str(tmp_path / "a.tif")])]
    assert "napari-sagegan" in dm4
    assert "napari-sagegan" not in tif


def test_every_python_name_imports_and_resolves(manifest):
    for command in manifest.contributions.commands:
        obj = _resolve(command.python_name)
        assert callable(obj), command.python_name


def test_entry_point_makes_napari_find_the_plugin():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    assert "napari-sagegan" in [m.name for m in pm.iter_manifests()]
    found = pm.get_manifest("napari-sagegan")
    assert [w.display_name for w in found.contributions.widgets][0] == "Segment"


def test_sample_data_give_images_with_their_labels(manifest):
    for contribution in manifest.contributions.sample_data:
        command = next(c for c in manifest.contributions.commands if c.id == contribution.command)
        layers = _resolve(command.python_name)()
        (image, image_kw, image_type), (labels, labels_kw, labels_type) = layers
        assert (image_type, labels_type) == ("image", "labels")
        assert image.shape == labels.shape and image.ndim in (2, 3)
        assert labels_kw["name"] == f"{image_kw['name']} ground truth"
        assert labels.max() > 5 and np.issubdtype(labels.dtype, np.integer)


def test_manifest_modules_load_no_torch_or_qt_until_a_widget_opens():
    code = (
        "import sys; import napari_sagegan.napari.sample_data, napari_sagegan.napari.writer, "
        "napari_sagegan.napari.layers, napari_sagegan.napari.state, "
        "napari_sagegan.napari.jobs, napari_sagegan.io.export; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.strip().split(","))
    assert not loaded & {"torch", "qtpy", "PyQt5", "PyQt6", "napari", "magicgui"}, loaded
