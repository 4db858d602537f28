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
    (tmp_path / "a.result.json").write_text(
        json.dumps(
            {
                "slide_id": "a",
                "path": "a.svs",
                "status": "done",
                "predicted": "malignant",
                "probs": {"benign": 0.1, "malignant": 0.9},
                "regions": 12,
            }
        )
    )
    (tmp_path / "b.result.json").write_text(
        json.dumps({"slide_id": "b", "path": "b.svs", "status": "failed", "error": "b.svs: not a slide"})
    )
    out = write_results(tmp_path, slides)
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == ["done", "failed", "pending"]
    assert rows[0]["probs"] == "benign=0.1;malignant=0.9" and rows[0]["regions"] == "12"
    assert rows[1]["error"] == "b.svs: not a slide"


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_lock_reclaim_race_has_one_winner(tmp_path: Path) -> None:
    import threading

    p = tmp_path / "x.lock"
    p.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0}))
    locks = [SlideLock(p) for _ in range(8)]
    barrier = threading.Barrier(len(locks))
    won: list[SlideLock] = []

    def go(lock: SlideLock) -> None:
        barrier.wait()
        if lock.acquire():
            won.append(lock)

    threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0].owned()
    assert not (tmp_path / "x.lock.reclaim").exists()
    won[0].release()
    assert not p.exists()


def test_lock_release_never_removes_another_runners_lock(tmp_path: Path) -> None:
    p = tmp_path / "x.lock"
    a = SlideLock(p)
    assert a.acquire()
    p.unlink()  # e.g. reclaimed by another host after stale_after
    b = SlideLock(p)
    assert b.acquire()
    a.release()
    assert p.exists() and b.owned()
    b.release()
    assert not p.exists()


def test_lock_heartbeat_keeps_it_fresh(tmp_path: Path) -> None:
    p = tmp_path / "x.lock"
    a = SlideLock(p, stale_after=60)
    assert a.acquire()
    old = time.time() - 1000
    os.utime(p, (old, old))
    a.start_heartbeat(every=0.05)
    time.sleep(0.3)
    assert time.time() - p.stat().st_mtime < 5
    a.release()
    assert not p.exists()


def test_half_written_lock_is_reclaimed_only_when_old(tmp_path: Path) -> None:
    p = tmp_path / "x.lock"
    p.write_text('{"host": "vm", "pi')  # a creator killed mid-write, or one still writing
    assert not SlideLock(p).acquire()
    old = time.time() - 60
    os.utime(p, (old, old))
    lk = SlideLock(p)
    assert lk.acquire() and lk.reclaimed


def test_dask_jobqueue_example_imports_without_dask_jobqueue() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "cohort" / "dask_jobqueue_example.py"
    spec = importlib.util.spec_from_file_location("dask_jobqueue_example", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.main) and callable(mod.make_cluster)


def test_slurm_array_script_is_valid_bash(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "tools" / "cohort" / "slurm_array.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # outside sbatch it refuses clearly
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(script), "c.csv", str(tmp_path), "m.pt"], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "--array" in p.stderr


def test_summarize_script(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "tools" / "cohort" / "summarize.py"
    res = [
        {"slide_id": "a", "status": "done", "predicted": "malignant", "seconds": 10.0, "attempts": 1},
        {"slide_id": "b", "status": "done", "predicted": "benign", "seconds": 20.0, "attempts": 2},
        {"slide_id": "c", "status": "failed", "error": "c.svs: not a slide", "attempts": 1},
    ]
    for r in res:
        (tmp_path / f"{r['slide_id']}.result.json").write_text(json.dumps(r))
    ev = [
        {"time": 1000.0, "pid": 1, "host": "h", "event": "start"},
        {"time": 1036.0, "pid": 1, "host": "h", "event": "done"},
        {"time": 1030.0, "pid": 2, "host": "h", "event": "done"},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev) + "garbage\n")
    write_results(tmp_path, [CohortSlide(s, Path(f"{s}.svs")) for s in "abcd"])  # d: pending
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert "4 slides: 2 done, 1 failed, 1 pending" in p.stdout
    assert "15.0 s per slide" in p.stdout
    assert "200.0 slides/h over 36 s" in p.stdout and "2 worker process(es)" in p.stdout
    assert "FAILED c (attempts 1): c.svs: not a slide" in p.stdout
    p = subprocess.run([sys.executable, str(script), str(tmp_path), "--json"], capture_output=True, text=True)
    s = json.loads(p.stdout)
    assert s["counts"] == {"done": 2, "failed": 1, "pending": 1} and s["slides_per_hour"] == 200.0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert subprocess.run([sys.executable, str(script), str(empty)], capture_output=True).returncode == 2
