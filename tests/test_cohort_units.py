"""Cohort runner pieces that need no model: CSV validation, shards, lock files, results table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsltool.cohort import CohortSlide, SlideLock, parse_shard, read_cohort, shard, write_results
from wsltool.errors import ConfigError, LabelsError


def _touch(p: Path) -> Path:
    p.write_bytes(b"x")
    return p


def test_read_cohort_relative_paths_and_ids(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    _touch(tmp_path / "s" / "a.svs")
    _touch(tmp_path / "s" / "b.ome.tiff")
    (tmp_path / "c.csv").write_text("path,mpp\ns/a.svs,\ns/b.ome.tiff,0.25\n")
    rows = read_cohort(tmp_path / "c.csv")
    assert [r.slide_id for r in rows] == ["a", "b"]
    assert rows[0].path == tmp_path / "s" / "a.svs"
    assert rows[1].mpp == 0.25 and rows[0].mpp is None


def test_read_cohort_reports_all_problems(tmp_path: Path) -> None:
    _touch(tmp_path / "a.svs")
    (tmp_path / "c.csv").write_text("slide,mpp\na.svs,\nmissing.svs,\na.svs,x\n,\n")
    with pytest.raises(LabelsError) as ei:
        read_cohort(tmp_path / "c.csv")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "line 3: missing.svs: no such file" in msg
    assert "line 4: duplicate slide id 'a'" in msg
    assert "line 4: mpp 'x' is not a number" in msg
    assert "line 5: empty path" in msg
    assert len(ei.value.problems) == 4


def test_read_cohort_bad_header(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("file\na.svs\n")
    with pytest.raises(LabelsError, match="needs a 'path'"):
        read_cohort(tmp_path / "c.csv")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_every_slide_once(n: int) -> None:
    slides = [CohortSlide(f"s{i:02d}", Path(f"s{i}.svs")) for i in range(11)]
    parts = [shard(slides, i, n) for i in range(n)]
    ids = [s.slide_id for p in parts for s in p]
    assert sorted(ids) == sorted(s.slide_id for s in slides)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("spec", ["3/3", "-1/2", "a/b", "1", "0/0"])
def test_parse_shard_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_shard(spec)


def test_lock_exclusive_and_reclaims_dead_owner(tmp_path: Path) -> None:
    p = tmp_path / "x.lock"
    a, b = SlideLock(p), SlideLock(p)
    assert a.acquire()
    assert not b.acquire()  # held by a live process (this one)
    info = json.loads(p.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    a.release()
    assert not p.exists()
    # a lock left by a dead process on this host is reclaimed
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    p.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "time": 0}))
    assert b.acquire()
    b.release()
    # a lock from another host is reclaimed only when stale
    p.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}))
    assert not SlideLock(p, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(p, (old, old))
    assert SlideLock(p, stale_after=60).acquire()


def test_results_table_merges_result_files(tmp_path: Path) -> None:
    slides = [CohortSlide("a", Path("a.svs")), CohortSlide("b", Path("b.svs")), CohortSlide("c", Path("c.svs"))]
    (tmp_path / "a.result.json").write_text(json.dumps(
        {"slide_id": "a", "path": "a.svs", "status": "done", "predicted": "malignant",
         "probs": {"benign": 0.1, "malignant": 0.9}, "regions": 12}))
    (tmp_path / "b.result.json").write_text(json.dumps(
        {"slide_id": "b", "path": "b.svs", "status": "failed", "error": "b.svs: not a slide"}))
    out = write_results(tmp_path, slides)
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == ["done", "failed", "pending"]
    assert rows[0]["probs"] == "benign=0.1;malignant=0.9" and rows[0]["regions"] == "12"
    assert rows[1]["error"] == "b.svs: not a slide"
