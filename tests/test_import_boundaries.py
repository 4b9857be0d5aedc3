"""Compute never imports Qt, magicgui or a napari viewer; `import histoscope` stays light."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import histoscope

SRC = Path(histoscope.__file__).parent
GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "napari.qt",
               "napari._qt", "napari.viewer", "napari.window")  # fmt: skip


def _compute_files() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if "_widgets" not in p.relative_to(SRC).parts]


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_gui_import_outside_widgets():
    offenders = {
        str(path.relative_to(SRC)): sorted(
            n for n in _imported_names(path) if n.startswith(GUI_MODULES)
        )
        for path in _compute_files()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"GUI imports outside histoscope._widgets: {offenders}"


def test_boundary_check_sees_widget_imports():
    widget_imports = set().union(*(_imported_names(p) for p in (SRC / "_widgets").rglob("*.py")))
    assert any(n.startswith(GUI_MODULES) for n in widget_imports)


def test_importing_compute_modules_loads_no_gui_and_no_torch():
    modules = sorted(
        m.name
        for m in pkgutil.walk_packages([str(SRC)], prefix="histoscope.")
        if "_widgets" not in m.name
    )
    code = (
        "import importlib, json, sys\n"
        "import histoscope\n"
        "light = 'torch' not in sys.modules\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"gui = sorted(k for k in sys.modules if k.startswith({GUI_MODULES!r}))\n"
        "print(json.dumps({'light': light, 'gui': gui}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["light"], "`import histoscope` must not import torch"
    assert result["gui"] == [], f"compute modules pulled in GUI modules: {result['gui']}"
