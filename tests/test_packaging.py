"""The build: napari finds the plugin, the manifest is valid, and the core's import boundaries hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_manifest_is_single_source() -> None:
    link = ROOT / "src" / "wsltool" / "napari.yaml"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "napari.yaml").resolve()


def test_npe2_validate() -> None:
    r = subprocess.run([str(BIN / "npe2"), "validate", "wsltool", "--imports"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid" in r.stdout


def test_napari_lists_plugin() -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("wsltool")
    assert mf.display_name == "wsltool"
    readers = {r.command for r in mf.contributions.readers or []}
    assert "wsltool.get_slide_reader" in readers


def _import_blocked(code: str, blocked: list[str]) -> subprocess.CompletedProcess[str]:
    prog = f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n{code}\n"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)


CORE = [
    "wsltool",
    "wsltool.errors",
    "wsltool.config",
    "wsltool.device",
    "wsltool.slide",
    "wsltool.slide.base",
    "wsltool.slide.openslide_backend",
    "wsltool.slide.tiff_backend",
    "wsltool.slide.image_backend",
    "wsltool.tissue",
    "wsltool.tiling",
    "wsltool.store",
    "wsltool.cli",
    "wsltool.testing",
]


@pytest.mark.parametrize("module", CORE)
def test_core_imports_without_torch_or_qt(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} does not exist")
    r = _import_blocked(f"import {module}", ["torch", "torchvision", "qtpy", "PyQt5", "PyQt6", "PySide6", "napari"])
    assert r.returncode == 0, r.stderr


def test_slide_reading_without_torch(real_svs: Path) -> None:
    r = _import_blocked(
        f"from wsltool.slide import open_slide\ns = open_slide({str(real_svs)!r})\n"
        "assert s.read_region(0, 0, 32, 32, mpp=1.0).shape == (32, 32, 3)\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]",
        ["torch", "torchvision", "qtpy", "PyQt6", "napari"],
    )
    assert r.returncode == 0, r.stderr


def test_only_plugin_imports_qt() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pkgutil, importlib, wsltool\n"
            "bad = []\n"
            "for m in pkgutil.walk_packages(wsltool.__path__, 'wsltool.'):\n"
            "    if m.name.startswith('wsltool.napari_plugin') or m.name.endswith('__main__'): continue\n"
            "    importlib.import_module(m.name)\n"
            "gui = ('qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari', 'magicgui')\n"
            "qt = [k for k in sys.modules if k.split('.')[0] in gui]\n"
            "assert not qt, qt\n",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
