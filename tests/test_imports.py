"""The dependency rule, ``util <- {io, engine} <- api <- {cli, napari} <- napari/_qt``.

Each layer is imported whole in a fresh interpreter and must not have loaded what lies
above it (nor torch / Qt where it must stay without them); no module imports another that
imports it back, even lazily inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "napari_sagegan"
QT = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui")
QT_OR_NAPARI = (*QT, "napari")
OURS = "napari_sagegan"


def _modules(layer: str) -> list[str]:
    """Every module of a layer (``"util"``, ``"napari"`` ...), ``napari/_qt`` left out."""
    base = PACKAGE / layer
    files = [base.with_suffix(".py")] if base.with_suffix(".py").exists() else base.rglob("*.py")
    names = []
    for f in sorted(files):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        if "_qt" in parts or parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _loaded_after(statement: str) -> set[str]:
    """Modules loaded by ``statement``: top-level names, and our own modules in full."""
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names = out.stdout.strip().split(",")
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith(OURS)}


def _ours(loaded: set[str], *layers: str) -> set[str]:
    return {m for m in loaded for layer in layers if m.startswith(f"{OURS}.{layer}")}


def test_package_import_loads_neither_torch_nor_qt():
    loaded = _loaded_after("import napari_sagegan")
    assert "torch" not in loaded
    assert not loaded & set(QT_OR_NAPARI)


#: layer -> (third-party packages it must not load, our layers it must not load)
RULES = {
    "util": (("torch", *QT_OR_NAPARI), ("io", "engine", "api", "cli", "napari")),
    "io": (("torch", *QT_OR_NAPARI), ("engine", "api", "cli", "napari")),
    "engine": (QT_OR_NAPARI, ("io", "api", "cli", "napari")),
    "api": (("torch", *QT_OR_NAPARI), ("cli", "napari")),
    "cli": (("torch", *QT_OR_NAPARI), ("napari",)),
    "napari": (QT, ()),
}


@pytest.mark.parametrize("layer", list(RULES))
def test_each_layer_loads_nothing_above_it(layer):
    modules = _modules(layer)
    assert modules, layer
    loaded = _loaded_after("; ".join(f"import {m}" for m in modules))
    packages, layers = RULES[layer]
    assert not loaded & set(packages), (layer, loaded & set(packages))
    assert not _ours(loaded, *layers), (layer, _ours(loaded, *layers))


@pytest.mark.parametrize("module", ["reader", "writer", "sample_data"])
def test_npe2_contributions_load_no_qt(module):
    loaded = _loaded_after(f"import napari_sagegan.napari.{module}")
    assert not loaded & set(QT), loaded & set(QT)


def test_cli_help_does_not_load_torch():
    loaded = _loaded_after(
        "from napari_sagegan.cli import build_parser; build_parser().format_help()"
    )
    assert "torch" not in loaded
    assert not loaded & set(QT_OR_NAPARI)


def _import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports anywhere in its text (top level or lazily)."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(OURS):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t not in (name, OURS)}
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = _import_graph()
    assert "napari_sagegan.api" in graph and "napari_sagegan.cli.segment" in graph
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
