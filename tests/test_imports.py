"""The dependency rule: the engine never loads Qt/napari; the package loads neither torch nor Qt."""

import subprocess
import sys

import pytest

QT_OR_NAPARI = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in out.stdout.strip().split(",")}


def test_package_import_loads_neither_torch_nor_qt():
    loaded = _loaded_after("import napari_sagegan")
    assert "torch" not in loaded
    assert not loaded & set(QT_OR_NAPARI)


@pytest.mark.parametrize(
    "module",
    [
        "engine.infer.segment",
        "engine.train.segmenter",
        "engine.synthetic.render",
        "engine.analysis.metrics",
        "engine.infer.scale",
        "engine.train.gan",
        "engine.synthetic.layouts",
        "io.images",
        "cli",
    ],
)
def test_engine_and_cli_load_no_qt_or_napari(module):
    loaded = _loaded_after(f"import napari_sagegan.{module}")
    assert not loaded & set(QT_OR_NAPARI), loaded & set(QT_OR_NAPARI)


def test_cli_help_does_not_load_torch():
    loaded = _loaded_after(
        "from napari_sagegan.cli import build_parser; build_parser().format_help()"
    )
    assert "torch" not in loaded
