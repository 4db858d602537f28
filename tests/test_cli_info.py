from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from wsltool import __version__
from wsltool.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsltool.cli", *args], capture_output=True, text=True, check=False)


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"wsltool {__version__}"


def test_info_real_svs(real_svs: Path) -> None:
    r = run_cli("info", str(real_svs))
    assert r.returncode == 0, r.stderr
    assert "vendor:      aperio" in r.stdout
    assert "dimensions:  2220x2967" in r.stdout
    assert "mpp:         0.499 um/px (metadata)" in r.stdout
    assert "objective:   20x" in r.stdout


def test_info_json(real_svs: Path, capsys) -> None:
    assert main(["info", "--json", str(real_svs)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "aperio"
    assert info["dimensions"] == [2220, 2967]
    assert info["mpp"] == 0.499
    assert set(info["associated_images"]) == {"label", "macro", "thumbnail"}


def test_info_text_file_renamed_svs(tmp_path: Path) -> None:
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    r = run_cli("info", str(bad))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(bad) in lines[0]
    assert "not a slide" in lines[0]
    assert "Traceback" not in r.stderr


def test_info_missing_file(tmp_path: Path) -> None:
    r = run_cli("info", str(tmp_path / "nope.svs"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"wsltool info: error: {tmp_path / 'nope.svs'}: no such file"


def test_info_mpp_override(real_pyramid_tiff: Path) -> None:
    r = run_cli("info", str(real_pyramid_tiff))
    assert r.returncode == 0
    assert "implausible (pass --mpp)" in r.stdout
    r = run_cli("info", "--mpp", "0.5", str(real_pyramid_tiff))
    assert "mpp:         0.5 um/px (override)" in r.stdout
