"""Cohort runner pieces that need no model: CSV validation, shards, lock files, results table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    # the table is the given CSV's: another cohort's slides in the same OUTDIR are left out, not deleted
    rows = list(csv.DictReader(write_results(tmp_path, slides[1:]).open()))
    assert [r["slide_id"] for r in rows] == ["b", "c"] and (tmp_path / "a.result.json").is_file()


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


# -- audit fixes: ids, line numbers, up-front checks, finished results never lost --------------------


@pytest.mark.parametrize("sid", ["../evil", "sub/x", "a\\b", ".hidden", "x..y"])
def test_read_cohort_rejects_ids_that_leave_outdir(tmp_path: Path, sid: str) -> None:
    _touch(tmp_path / "a.svs")
    _touch(tmp_path / "b.svs")
    (tmp_path / "c.csv").write_text(f"path,id\nb.svs,fine\na.svs,{sid}\n")
    with pytest.raises(LabelsError) as ei:
        read_cohort(tmp_path / "c.csv")
    assert ei.value.problems == [
        f"line 3: slide id {sid!r} must not contain '/', '\\' or '..' nor start with '.' (it names files in OUTDIR)"
    ]


def test_read_cohort_rejects_an_empty_default_id(tmp_path: Path) -> None:
    _touch(tmp_path / ".svs")  # the default id is the name up to the first dot: ''
    (tmp_path / "c.csv").write_text("path\n.svs\n")
    with pytest.raises(LabelsError) as ei:
        read_cohort(tmp_path / "c.csv")
    assert ei.value.problems == ["line 2: slide id '' is empty"]


def test_read_cohort_header_only_lists_no_slides(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("path\n")
    with pytest.raises(LabelsError) as ei:
        read_cohort(tmp_path / "c.csv")
    assert ei.value.problems == ["lists no slides (a header and no rows)"]
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(LabelsError, match="empty file: needs a 'path'"):
        read_cohort(tmp_path / "e.csv")


def test_read_cohort_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    _touch(tmp_path / "a.svs")
    (tmp_path / "c.csv").write_text("path\n\n,\na.svs\n\n\na.svs\n")
    with pytest.raises(LabelsError) as ei:
        read_cohort(tmp_path / "c.csv")
    assert ei.value.problems == ["line 3: empty path", "line 7: duplicate slide id 'a' (first on line 4)"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two small real slides, two real checkpoints (other weights), a cohort CSV and CPU settings."""
    from wsltool.config import InferConfig
    from wsltool.testing import he_tissue, write_svs
    from wsltool.testing.models import make_checkpoint

    d = tmp_path_factory.mktemp("small")
    for i, sid in enumerate("ab"):
        c = he_tissue(512, 768, seed=20 + i, lesion_fraction=0.25 * i)
        write_svs(d / f"{sid}.svs", c.rgb, mpp=0.5)
    (d / "c.csv").write_text("path\na.svs\nb.svs\n")
    m = make_checkpoint(d / "m.pt")
    m2 = make_checkpoint(d / "m2.pt", seed=1)
    data = m.read_bytes()
    (d / "trunc.pt").write_bytes(data[: len(data) // 2])
    (d / "text.pt").write_text("not a checkpoint\n")
    (d / "folder.pt").mkdir()
    cfg = InferConfig(mpp=1.0, overlap=0, out_factor=8, workers=0, device="cpu")
    return {"dir": d, "csv": d / "c.csv", "m": m, "m2": m2, "cfg": cfg}


def _read(p: Path) -> Any:
    return json.loads(p.read_text())


def test_a_failed_rerun_keeps_finished_results(
    small_run: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import csv

    from wsltool.cohort import read_events, run_cohort, run_slide
    from wsltool.config import to_dict

    out, cfg = tmp_path / "out", small_run["cfg"]
    s = run_cohort(small_run["csv"], out, small_run["m"], cfg, shard_spec="0/1")
    assert (s.done, s.failed) == (2, 0)
    before = {sid: _read(out / f"{sid}.result.json") for sid in "ab"}
    table = (out / "results.csv").read_text()
    assert all(r["status"] == "done" and r["probs"] for r in before.values())

    # another checkpoint: every slide fails in this run (its store is in the way), nothing finished is lost
    s = run_cohort(small_run["csv"], out, small_run["m2"], cfg, shard_spec="0/1")
    assert (s.done, s.skipped, s.failed) == (0, 0, 2)
    assert {sid: _read(out / f"{sid}.result.json") for sid in "ab"} == before
    assert (out / "results.csv").read_text() == table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"] and all("malignant=" in r["probs"] for r in rows)
    assert {r["model"] for r in rows} == {str(Path(small_run["m"]).absolute())}  # the kept rows' checkpoint
    failed = [e for e in read_events(out) if e["event"] == "failed"]
    assert sorted(e["slide"] for e in failed) == ["a", "b"] and all(e["kept_result"] for e in failed)
    for e in failed:  # the hint names what a cohort user can do: cohort infer has no --overwrite
        assert "--overwrite" not in e["error"] and "other settings" in e["error"]
        assert f"delete {e['slide']}.zarr and {e['slide']}.result.json from OUTDIR" in e["error"]
        assert "or use another OUTDIR" in e["error"]
    kept = [r.getMessage() for r in caplog.records if "earlier run is kept" in r.getMessage()]
    assert len(kept) == 2 and all("delete" in m for m in kept)

    # a corrupt checkpoint reaching a slide (run_slide called directly): failed in this run, result kept
    a = CohortSlide("a", small_run["dir"] / "a.svs")
    row = run_slide(a, out, str(small_run["dir"] / "trunc.pt"), to_dict(cfg), retry_wait=0)
    assert row["status"] == "failed" and row["kept_result"] and "trunc.pt: corrupt" in row["error"]
    assert _read(out / "a.result.json") == before["a"]

    # ... but a done record whose store is gone no longer holds: the failure replaces it
    import shutil

    shutil.rmtree(out / "a.zarr")
    row = run_slide(a, out, str(small_run["dir"] / "trunc.pt"), to_dict(cfg), retry_wait=0)
    assert row["kept_result"] is False
    assert _read(out / "a.result.json")["status"] == "failed"


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("model", "extra", "words"),
    [
        ("trunc.pt", [], "trunc.pt: corrupt or not a checkpoint"),
        ("text.pt", [], "text.pt: corrupt or not a checkpoint"),
        ("folder.pt", [], "folder.pt: is a folder, not a checkpoint file"),
        ("missing.pt", [], "missing.pt: checkpoint not found"),
        ("m.pt", ["--overlap", "500"], "--overlap 500 must be smaller than the region 128 (the checkpoint's"),
        ("m.pt", ["--region", "1000"], "m.pt: --region 1000 px is far from the checkpoint's input size 128 px"),
        ("m.pt", ["--out-factor", "3"], "--out-factor 3 must divide the region 128 (the"),
        ("m.pt", ["--out-factor", "16", "--overlap", "8"], "try --overlap 16 or --out-factor 8"),
        ("m.pt", ["--retries", "-1"], "--retries must be >= 0, got -1"),
        ("m.pt", ["--retry-wait", "-5"], "--retry-wait must be >= 0 seconds, got -5.0"),
        ("m.pt", ["--retry-wait", "nan"], "--retry-wait must be >= 0 seconds, got nan"),
        ("m.pt", ["--torch-threads", "-1"], "--torch-threads must be >= 1, got -1"),
        ("m.pt", ["--torch-threads", "0"], "--torch-threads must be >= 1, got 0"),
        ("m.pt", ["--stale-after", "-1"], "--stale-after must be > 0 seconds, got -1.0"),
        ("m.pt", ["--stale-after", "0"], "--stale-after must be > 0 seconds, got 0.0"),
        ("m.pt", ["--workers", "-1"], "--workers must be >= 1, got -1"),
        ("m.pt", ["--workers", "0"], "--workers must be >= 1, got 0"),
        ("m.pt", ["--shard", "2/2"], "--shard 2/2: need 0 <= i < N"),
        ("m.pt", ["--readers", "-1"], "--readers must be >= 0, got -1"),
    ],
)
def test_bad_checkpoint_settings_and_options_refused_before_anything(
    small_run: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    extra: list[str],
    words: str,
) -> None:
    from wsltool.cli import main

    out = tmp_path / "out"
    shard = [] if "--shard" in extra else ["--shard", "0/1"]  # no Dask: every option is checked all the same
    args = ["cohort", "infer", str(small_run["csv"]), "-o", str(out), "--model", str(small_run["dir"] / model)]
    capsys.readouterr()
    assert main([*args, "--quiet", "--mpp", "1", "--readers", "0", "--device", "cpu", *shard, *extra]) == 2
    err = _err(capsys)
    assert err.startswith("wsltool cohort: error: ") and words in err, err
    assert not out.exists()  # nothing created, not even an empty OUTDIR


def test_bad_scheduler_and_outdir_give_one_line(
    small_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsltool.cli import main

    base = ["cohort", "infer", str(small_run["csv"]), "--model", str(small_run["m"]), "--quiet"]
    capsys.readouterr()
    out = tmp_path / "out"
    for addr, words in (("notanaddress", "missing port number"), ("foo://x:1", "unknown address scheme")):
        assert main([*base, "-o", str(out), "--scheduler", addr]) == 2
        err = _err(capsys)
        assert f"--scheduler {addr!r} is not a Dask scheduler address" in err and words in err, err
        assert not out.exists()
    from wsltool.cohort import check_scheduler_address

    for good in ("tcp://head:8786", "tls://10.0.0.1:8786", "ucx://head:13337", "tcp://[::1]:8786"):
        check_scheduler_address(good)  # every scheme distributed knows, without connecting
    f = tmp_path / "f.txt"
    f.write_text("keep")
    assert main([*base, "-o", str(f), "--shard", "0/1"]) == 2
    assert f"{f}: exists and is not a folder" in _err(capsys)
    assert main([*base, "-o", str(f / "sub"), "--shard", "0/1"]) == 2
    assert f"{f / 'sub'}: cannot create the output folder: {f} is not a folder" in _err(capsys)
    assert f.read_text() == "keep"
