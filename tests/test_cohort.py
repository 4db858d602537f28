"""Cohort runs end to end: real slides, a real checkpoint, real Dask LocalClusters (worker processes).

Every run goes through ``wsltool cohort infer`` in a subprocess (the way users and job arrays run it),
except the retry test, which injects failures into ``run_slide`` in this process.  Stores of the cohort
runs are compared with single-slide :func:`~wsltool.infer.run.infer_slide` runs of the same slides.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsltool.cohort import CohortSlide, read_cohort, read_events, run_slide, shard
from wsltool.config import InferConfig, to_dict
from wsltool.store import HeatmapStore
from wsltool.testing import he_tissue, write_svs

REPO = Path(__file__).resolve().parents[1]
CFG = InferConfig(mpp=1.0, overlap=0, out_factor=8, workers=0, device="cpu")
# one torch thread everywhere: CPU convolutions round differently with other thread counts, and the stores
# are compared bit for bit with single-slide runs
CLI_CFG = [
    "--mpp",
    "1.0",
    "--overlap",
    "0",
    "--out-factor",
    "8",
    "--readers",
    "0",
    "--device",
    "cpu",
    "--torch-threads",
    "1",
    "--quiet",
]
N_GOOD = 5


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Five good slides (two with lesions), a text file named .svs, a truncated SVS, a checkpoint, references."""
    from wsltool.infer.run import infer_slide
    from wsltool.testing.models import make_checkpoint

    d = tmp_path_factory.mktemp("cohort")
    (d / "slides").mkdir()
    good = []
    for i in range(N_GOOD):
        c = he_tissue(768, 1024, seed=10 + i, lesion_fraction=0.25 if i % 2 else 0.0)
        good.append(write_svs(d / "slides" / f"case{i}.svs", c.rgb, mpp=0.5))
    (d / "slides" / "notaslide.svs").write_text("this is not a slide\n")
    data = good[0].read_bytes()
    (d / "slides" / "truncated.svs").write_bytes(data[: len(data) // 2])
    (d / "good.csv").write_text("path\n" + "".join(f"slides/{p.name}\n" for p in good))
    (d / "all.csv").write_text(
        "path,id\n" + "".join(f"slides/{p.name},\n" for p in good) + "slides/notaslide.svs,bad\n"
        "slides/truncated.svs,cut\n"
    )
    model = make_checkpoint(d / "model.pt", input_size=128)
    refs = {}
    for p in good:
        res = infer_slide(p, d / "ref" / f"{p.stem}.zarr", model, CFG)
        refs[p.stem] = (HeatmapStore.open(d / "ref" / f"{p.stem}.zarr"), res)
    return {"dir": d, "model": model, "good": good, "refs": refs}


def _cli(csv_path: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "wsltool.cli",
        "cohort",
        "infer",
        str(csv_path),
        "-o",
        str(out),
        "--model",
        str(model),
        *CLI_CFG,
        *extra,
    ]


def _run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _table(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def _assert_same_as_reference(cohort: dict[str, Any], out: Path, sid: str) -> None:
    ref, res = cohort["refs"][sid]
    got = HeatmapStore.open(out / f"{sid}.zarr")
    assert got.complete
    np.testing.assert_array_equal(got.mplus(), ref.mplus())
    assert got.result is not None and ref.result is not None
    assert got.result["probs"] == ref.result["probs"]
    assert got.result["regions"] == ref.result["regions"] == res.regions


def _starts(out: Path) -> Counter[str]:
    return Counter(e["slide"] for e in read_events(out) if e["event"] == "start")


def test_cohort_with_corrupt_slides_matches_single_slide_runs(cohort: dict[str, Any], tmp_path: Path) -> None:
    d, out = cohort["dir"], tmp_path / "out"
    # one reader process per slide: Dask workers must be non-daemonic for DataLoader workers to start
    p = _run(_cli(d / "all.csv", out, cohort["model"], "--workers", "2", "--readers", "1"))
    assert p.returncode == 1, p.stderr  # a slide failed
    assert "daemonic" not in p.stderr
    assert f"{N_GOOD + 2} slides: {N_GOOD} done, 0 already finished, 2 failed" in p.stdout
    table = _table(out)
    assert len(table) == N_GOOD + 2
    for path in cohort["good"]:
        sid = path.stem
        _assert_same_as_reference(cohort, out, sid)
        row, res = table[sid], cohort["refs"][sid][1]
        assert row["status"] == "done" and row["error"] == "" and row["attempts"] == "1"
        assert row["predicted"] == res.predicted
        assert int(row["regions"]) == res.regions
        assert row["probs"] == ";".join(f"{n}={p:.6g}" for n, p in zip(res.class_names, res.probs, strict=True))
        assert float(row["tissue_mm2"]) == pytest.approx(res.tissue_mm2, abs=1e-4)
        assert float(row["seconds"]) > 0 and Path(row["store"]) == out / f"{sid}.zarr"
        assert Path(row["model"]) == Path(cohort["model"]).absolute()
    # the slides differ (the table cannot have mixed them up)
    assert len({table[p.stem]["regions"] for p in cohort["good"]}) >= 2
    for sid, problem in (("bad", "not a slide"), ("cut", "truncated file")):
        row = table[sid]
        assert row["status"] == "failed" and row["attempts"] == "1", row  # WslError: no retry
        assert problem in row["error"] and "\n" not in row["error"]
        assert row["predicted"] == "" and row["store"] == "" and Path(row["model"]) == Path(cohort["model"]).absolute()
    assert set(_starts(out).values()) == {1}
    assert not list(out.glob("*.lock"))
    # the summary script reads the same output
    s = _run([sys.executable, str(REPO / "tools" / "cohort" / "summarize.py"), str(out)], timeout=60)
    assert s.returncode == 1, s.stderr
    assert f"{N_GOOD} done" in s.stdout and "2 failed" in s.stdout and "not a slide" in s.stdout


def test_killed_run_resumes_without_redoing_finished_slides(cohort: dict[str, Any], tmp_path: Path) -> None:
    d, out = cohort["dir"], tmp_path / "out"
    proc = subprocess.Popen(
        _cli(d / "good.csv", out, cohort["model"], "--workers", "1"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            done = list(out.glob("*.result.json"))
            if done and list(out.glob("*.lock")):  # one slide finished, the next one is under way
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: client, scheduler, nanny, worker
    finally:
        proc.wait(30)
    finished = {p.name.removesuffix(".result.json"): p.stat().st_mtime_ns for p in out.glob("*.result.json")}
    locks = {p.name.removesuffix(".lock") for p in out.glob("*.lock")}
    assert 1 <= len(finished) < N_GOOD, "the run was not killed midway"
    assert locks, "no slide was under way when the run was killed"
    store_mtimes = {sid: (out / f"{sid}.zarr" / "zarr.json").stat().st_mtime_ns for sid in finished}

    p = _run(_cli(d / "good.csv", out, cohort["model"], "--workers", "2"))
    assert p.returncode == 0, p.stderr
    assert f"{N_GOOD - len(finished)} done, {len(finished)} already finished, 0 failed" in p.stdout
    for sid, mtime in finished.items():  # finished slides untouched
        assert (out / f"{sid}.result.json").stat().st_mtime_ns == mtime
        assert (out / f"{sid}.zarr" / "zarr.json").stat().st_mtime_ns == store_mtimes[sid]
    starts = [e for e in read_events(out) if e["event"] == "start"]
    for sid in locks:  # the dead run's locks were reclaimed by the second run
        second = [e for e in starts if e["slide"] == sid][-1]
        assert second["reclaimed_lock"], second
    assert all(n == 1 for sid, n in _starts(out).items() if sid in finished)
    assert not list(out.glob("*.lock*"))
    for path in cohort["good"]:
        assert _table(out)[path.stem]["status"] == "done"
        _assert_same_as_reference(cohort, out, path.stem)  # the interrupted slide resumed correctly
    # another threshold / top-k re-checks each finished slide and keeps its store and result (README)
    p = _run(_cli(d / "good.csv", out, cohort["model"], "--workers", "1", "--threshold", "0.6", "--top-k", "9"))
    assert p.returncode == 0, p.stderr
    assert f"{N_GOOD} slides: {N_GOOD} done, 0 already finished, 0 failed" in p.stdout  # re-checked, none redone
    assert p.stderr.count("finished store kept with its threshold 0.5 (asked: 0.6)") == N_GOOD
    for path in cohort["good"]:
        assert _table(out)[path.stem]["status"] == "done"
        _assert_same_as_reference(cohort, out, path.stem)


def test_two_runners_at_once_split_the_work(cohort: dict[str, Any], tmp_path: Path) -> None:
    d, out = cohort["dir"], tmp_path / "out"
    cmd = _cli(d / "good.csv", out, cohort["model"], "--workers", "1")
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    events = read_events(out)
    starts, dones = _starts(out), [e for e in events if e["event"] == "done"]
    assert starts == Counter({p.stem: 1 for p in cohort["good"]})  # each slide computed exactly once
    assert sorted(e["slide"] for e in dones) == sorted(p.stem for p in cohort["good"])
    assert len({e["pid"] for e in dones}) == 2, "one runner did all the work"
    for path in cohort["good"]:
        _assert_same_as_reference(cohort, out, path.stem)
        assert _table(out)[path.stem]["status"] == "done"
    assert not list(out.glob("*.lock*"))


def test_shards_cover_every_slide_once(cohort: dict[str, Any], tmp_path: Path) -> None:
    d, out = cohort["dir"], tmp_path / "out"
    procs = [
        subprocess.Popen(
            _cli(d / "good.csv", out, cohort["model"], "--shard", f"{i}/2"),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    slides = read_cohort(d / "good.csv")
    by_pid: dict[int, set[str]] = {}
    for e in read_events(out):
        if e["event"] == "done":
            by_pid.setdefault(e["pid"], set()).add(e["slide"])
    for i, p in enumerate(procs):
        assert by_pid[p.pid] == {s.slide_id for s in shard(slides, i, 2)}
        assert f"{len(by_pid[p.pid])} slides: {len(by_pid[p.pid])} done" in outs[i][0]
    assert _starts(out) == Counter({s.slide_id: 1 for s in slides})
    assert all(r["status"] == "done" for r in _table(out).values())


def test_retries_resume_transient_failures_but_not_bad_input(
    cohort: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsltool.infer import run as infer_run

    real = infer_run.infer_slide
    calls: list[str] = []
    mode = {"crash_after_band": 1, "always": False}

    def flaky(slide: Any, out: Any, model: Any, cfg: Any, **kw: Any) -> Any:
        """The real inference, with injected faults: a crash after a written band, or out of memory."""
        calls.append(Path(slide).stem)
        if mode["always"]:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def band() -> None:
            if mode["crash_after_band"] > 0:
                mode["crash_after_band"] -= 1
                raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Killed.")

        return real(slide, out, model, cfg, **{**kw, "on_band": band})

    monkeypatch.setattr(infer_run, "infer_slide", flaky)
    cfg, model = to_dict(CFG), str(cohort["model"])
    sid = cohort["good"][1].stem
    s = CohortSlide(sid, cohort["good"][1])

    row = run_slide(
        s, tmp_path, model, cfg, retries=1, retry_wait=0, torch_threads=1
    )  # transient: second attempt resumes
    assert row["status"] == "done" and row["attempts"] == 2
    assert row["computed"] < row["regions"]  # the retry reused the first attempt's regions
    _assert_same_as_reference(cohort, tmp_path, sid)
    ev = [e["event"] for e in read_events(tmp_path) if e["slide"] == sid]
    assert ev == ["start", "retry", "done"]

    mode["always"] = True  # persistent non-WslError: retries exhausted, then failed
    s2 = CohortSlide("other", cohort["good"][2])
    row = run_slide(s2, tmp_path, model, cfg, retries=2, retry_wait=0)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error"].startswith("RuntimeError: CUDA out of memory")
    assert [e["event"] for e in read_events(tmp_path) if e["slide"] == "other"] == [
        "start",
        "retry",
        "retry",
        "error",
        "failed",
    ]

    mode["always"] = False
    calls.clear()  # bad input (WslError): one attempt only
    bad = CohortSlide("bad", cohort["dir"] / "slides" / "notaslide.svs")
    row = run_slide(bad, tmp_path, model, cfg, retries=3, retry_wait=0)
    assert row["status"] == "failed" and row["attempts"] == 1 and calls == ["notaslide"]
    assert json.loads((tmp_path / "bad.result.json").read_text())["status"] == "failed"

    # a finished slide is skipped without calling inference again
    calls.clear()
    assert run_slide(s, tmp_path, model, cfg)["status"] == "skipped" and calls == []
    # ... but not with other settings: the finished store is checked and never silently replaced
    row = run_slide(s, tmp_path, model, {**cfg, "out_factor": 4}, retry_wait=0)
    assert row["status"] == "failed" and "other settings" in row["error"] and calls == [sid]


def test_store_killed_while_being_created_starts_over(cohort: dict[str, Any], tmp_path: Path) -> None:
    """Regression: a run killed inside ``HeatmapStore.create`` left a store the resume could not open."""
    import threading

    import zarr

    from wsltool.infer.run import InferCancelledError, infer_slide

    path, out = cohort["good"][0], tmp_path / "s.zarr"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(InferCancelledError):
        infer_slide(path, out, cohort["model"], CFG, cancel=cancel)
    g = zarr.open_group(out, mode="r+")  # as if killed before the multiscales metadata was written
    g.attrs.put({k: v for k, v in g.attrs.asdict().items() if k != "ome"})
    infer_slide(path, out, cohort["model"], CFG)
    got, ref = HeatmapStore.open(out), cohort["refs"][path.stem][0]
    np.testing.assert_array_equal(got.mplus(), ref.mplus())
    assert got.result == ref.result


FLAKY_PRELOAD = '''
"""Dask worker preload: every slide fails with a transient (non-WslError) error."""
import wsltool.infer.run as r


def _boom(*args, **kwargs):
    raise RuntimeError("simulated transient failure")


r.infer_slide = _boom
'''


def test_retries_reach_the_dask_tasks(tmp_path: Path) -> None:
    """Regression: ``Client.submit`` took ``retries=`` for itself, so every slide ran with run_slide's default."""
    from wsltool.testing.models import make_checkpoint

    model = make_checkpoint(tmp_path / "model.pt", input_size=128)
    (tmp_path / "a.svs").write_text("never read: the workers' inference is replaced by a failing one\n")
    (tmp_path / "c.csv").write_text("path\na.svs\n")
    (tmp_path / "flaky.py").write_text(FLAKY_PRELOAD)
    out, retries = tmp_path / "out", 3
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(tmp_path / "flaky.py")])}
    cmd = _cli(tmp_path / "c.csv", out, model, "--workers", "1", "--retries", str(retries), "--retry-wait", "0")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert p.returncode == 1, p.stderr
    assert "1 slides: 0 done, 0 already finished, 1 failed" in p.stdout
    res = json.loads((out / "a.result.json").read_text())
    assert res["status"] == "failed" and res["attempts"] == retries + 1
    assert res["error"] == "RuntimeError: simulated transient failure"
    assert [e["event"] for e in read_events(out)] == ["start", "retry", "retry", "retry", "error", "failed"]
    assert "a: failed: RuntimeError: simulated transient failure" in p.stderr  # named on stderr, not only in the CSV
