"""Many slides: one task per slide on Dask distributed (LocalCluster by default), or a ``--shard`` of them.

Every slide is safe to re-run and safe to race for:

- output ``OUTDIR/<slide-id>.zarr`` (a complete store is skipped; an incomplete one resumes);
- a lock file ``OUTDIR/<slide-id>.lock`` created atomically (``O_CREAT | O_EXCL``) holding host, pid and
  time, refreshed while the slide runs; a lock whose process is gone (same host) or that has not been
  refreshed for ``stale_after`` seconds (any host) is reclaimed; two runners never work on one slide;
- the outcome ``OUTDIR/<slide-id>.result.json`` (status ``done`` | ``failed``, probabilities, error...),
  from which ``OUTDIR/results.csv`` is rebuilt after every slide, so concurrent runners never lose rows.

A failure on one slide (corrupt file, out of memory) is recorded and does not stop the cohort. Bad input
(``WslError``: unreadable slide, missing mpp) fails at once; other errors are retried up to ``retries``
times.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsltool.config import InferConfig, from_dict, to_dict
from wsltool.errors import ConfigError, LabelsError, WslError

log = logging.getLogger(__name__)

RESULT_FIELDS = [
    "slide_id", "path", "status", "predicted", "probs", "tissue_mm2", "regions", "seconds", "attempts",
    "host", "error", "store",
]


@dataclass(frozen=True)
class CohortSlide:
    """One row of a cohort CSV."""

    slide_id: str
    path: Path
    mpp: float | None = None


def read_cohort(csv_path: str | Path) -> list[CohortSlide]:
    """Read ``COHORT.csv``: a ``path`` (or ``slide``) column, optional ``id`` and ``mpp`` columns.

    Paths are relative to the CSV's folder. Missing files and duplicate ids are reported together.

    Raises
    ------
    LabelsError
        Listing every problem found.
    """
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelsError(csv_path, ["file not found"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(csv_path, [f"cannot read as UTF-8 text ({exc})"]) from exc
    rows = list(csv.DictReader(text.splitlines()))
    fields = [f.strip().lower() for f in (rows[0].keys() if rows else [])]
    col = "path" if "path" in fields else ("slide" if "slide" in fields else None)
    if col is None:
        raise LabelsError(csv_path, ["needs a 'path' (or 'slide') column header"])
    problems: list[str] = []
    out: list[CohortSlide] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(rows, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        rel = row.get(col, "")
        if not rel:
            problems.append(f"line {n}: empty path")
            continue
        p = Path(rel) if Path(rel).is_absolute() else (csv_path.parent / rel)
        if not p.exists():
            problems.append(f"line {n}: {rel}: no such file")
        sid = row.get("id") or Path(rel).name.split(".")[0]
        if sid in seen:
            problems.append(f"line {n}: duplicate slide id {sid!r} (first on line {seen[sid]})")
        seen.setdefault(sid, n)
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                problems.append(f"line {n}: mpp {row['mpp']!r} is not a number")
        out.append(CohortSlide(sid, p, mpp))
    if not out and not problems:
        problems.append("no slides listed")
    if problems:
        raise LabelsError(csv_path, problems)
    return out


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` (0-based i) -> ``(i, N)``."""
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as exc:
        msg = f"--shard must look like i/N (e.g. 0/4), got {spec!r}"
        raise ConfigError(msg) from exc
    if n < 1 or not 0 <= i < n:
        msg = f"--shard {spec}: need 0 <= i < N"
        raise ConfigError(msg)
    return i, n


def shard(slides: list[CohortSlide], i: int, n: int) -> list[CohortSlide]:
    """The i-th of N disjoint shares (by position in the id-sorted list); together they cover every slide."""
    ordered = sorted(slides, key=lambda s: s.slide_id)
    return ordered[i::n]


# -- locks --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlideLock:
    """An exclusive, stale-reclaiming lock file for one slide (works on shared file systems with O_EXCL)."""

    def __init__(self, path: Path, stale_after: float = 3600.0) -> None:
        self.path = path
        self.stale_after = stale_after
        self.held = False

    def _stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return True  # unreadable/half-written lock: reclaimable
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return True
        return age > self.stale_after

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another live runner holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    log.warning("reclaiming stale lock %s", self.path)
                    try:
                        # rename first so two reclaimers cannot both delete a fresh lock
                        tomb = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
                        self.path.rename(tomb)
                        tomb.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, fh)
            self.held = True
            return True
        return False

    def refresh(self) -> None:
        """Mark the lock alive (updates its mtime)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if held."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# -- one slide ----------------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple[str, float], Any] = {}


def _cached_model(path: str) -> Any:
    """Load a checkpoint once per worker process (keyed by path and mtime)."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime)
    if key not in _MODEL_CACHE:
        from wsltool.train.checkpoint import load_checkpoint

        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_checkpoint(path, map_location="cpu")
    return _MODEL_CACHE[key]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_slide(
    slide: CohortSlide,
    outdir: str | Path,
    model: str,
    config: dict[str, Any],
    *,
    retries: int = 1,
    stale_after: float = 3600.0,
) -> dict[str, Any]:
    """Process one slide (skip, resume or run) and record its outcome; never raises for slide problems.

    Returns
    -------
    dict
        The result row (see :data:`RESULT_FIELDS`); ``status`` is ``done``, ``skipped`` (finished
        earlier), ``locked`` (another runner has it) or ``failed``.
    """
    from wsltool.infer.run import infer_slide
    from wsltool.store import HeatmapStore

    outdir = Path(outdir)
    store = outdir / f"{slide.slide_id}.zarr"
    result_path = outdir / f"{slide.slide_id}.result.json"
    base = {"slide_id": slide.slide_id, "path": str(slide.path), "store": str(store), "host": socket.gethostname()}
    if result_path.exists() and store.exists():
        try:
            prev = json.loads(result_path.read_text())
            if prev.get("status") == "done" and HeatmapStore.open(store).complete:
                return {**prev, "status": "skipped"}
        except (OSError, ValueError, WslError):
            pass
    lock = SlideLock(outdir / f"{slide.slide_id}.lock", stale_after=stale_after)
    if not lock.acquire():
        return {**base, "status": "locked"}
    try:
        cfg = from_dict(InferConfig, config, source="cohort config")
        attempts, error = 0, ""
        t0 = time.perf_counter()
        while attempts <= retries:
            attempts += 1
            try:
                res = infer_slide(slide.path, store, _cached_model(model), cfg, slide_mpp=slide.mpp,
                                  on_band=lock.refresh)
            except WslError as exc:  # bad input: retrying will not help
                error = str(exc)
                break
            except Exception as exc:  # transient (memory, I/O): retry
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: attempt %d failed: %s", slide.slide_id, attempts, error)
                continue
            row = {
                **base,
                "status": "done",
                "predicted": res.predicted,
                "probs": dict(zip(res.class_names, [round(p, 4) for p in res.probs], strict=True)),
                "tissue_mm2": round(res.tissue_mm2, 3),
                "regions": res.regions,
                "seconds": round(time.perf_counter() - t0, 2),
                "attempts": attempts,
                "error": "",
            }
            _write_json(result_path, row)
            return row
        row = {**base, "status": "failed", "attempts": attempts, "error": error.replace("\n", " "),
               "seconds": round(time.perf_counter() - t0, 2)}
        _write_json(result_path, row)
        return row
    finally:
        lock.release()


# -- the table ----------------------------------------------------------------------------------


def write_results(outdir: str | Path, slides: list[CohortSlide]) -> Path:
    """Rebuild ``OUTDIR/results.csv`` from every ``*.result.json`` (slides not yet run are ``pending``)."""
    outdir = Path(outdir)
    rows = []
    for s in sorted(slides, key=lambda s: s.slide_id):
        rp = outdir / f"{s.slide_id}.result.json"
        try:
            r = json.loads(rp.read_text())
        except (OSError, ValueError):
            r = {"slide_id": s.slide_id, "path": str(s.path), "status": "pending"}
        probs = r.get("probs") or {}
        r["probs"] = ";".join(f"{k}={v}" for k, v in probs.items()) if isinstance(probs, dict) else probs
        rows.append({k: r.get(k, "") for k in RESULT_FIELDS})
    out = outdir / "results.csv"
    tmp = outdir / f".results.csv.{os.getpid()}.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
    return out


@dataclass
class CohortSummary:
    """Counts of a cohort run."""

    total: int
    done: int
    skipped: int
    failed: int
    locked: int
    seconds: float

    def line(self) -> str:
        """One summary line."""
        rate = 3600 * (self.done / self.seconds) if self.seconds > 0 else 0.0
        return (
            f"{self.total} slides: {self.done} done, {self.skipped} already finished, {self.failed} failed, "
            f"{self.locked} held by another runner; {self.seconds:.0f} s ({rate:.1f} slides/h)"
        )


def default_cluster_size() -> tuple[int, int]:
    """(workers, threads per worker): one process per GPU; on CPU one process per 2 cores, 1 thread each."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), 1
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return max(1, (os.cpu_count() or 2) // 2), 1


def run_cohort(
    csv_path: str | Path,
    outdir: str | Path,
    model: str | Path,
    config: InferConfig | None = None,
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    shard_spec: str | None = None,
    retries: int = 1,
    progress: bool | Callable[[int, int], None] = False,
) -> CohortSummary:
    """Run every slide of a cohort CSV into ``outdir``.

    Parameters
    ----------
    csv_path
        Cohort CSV (``path`` column; optional ``id``, ``mpp``).
    outdir
        Output folder: one store per slide, lock files, results.
    model
        Checkpoint path.
    config
        Inference settings for every slide.
    scheduler
        Address of an existing Dask scheduler (``tcp://host:8786``); default: a LocalCluster.
    n_workers
        LocalCluster worker processes (default: :func:`default_cluster_size`).
    shard_spec
        ``"i/N"``: run only the i-th share in this process, without Dask (for job arrays).
    retries
        Extra attempts for transient failures.
    progress
        ``True`` for a tqdm bar over slides, or ``fn(done, total)``.
    """
    slides = read_cohort(csv_path)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not Path(model).is_file():
        from wsltool.errors import CheckpointError

        msg = f"{model}: checkpoint not found"
        raise CheckpointError(msg)
    cfg = to_dict(config or InferConfig())
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = None
    todo = slides if shard_spec is None else shard(slides, *parse_shard(shard_spec))
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="slide")

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        write_results(outdir, slides)
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(len(rows), len(todo))

    if shard_spec is not None:
        for s in todo:
            record(run_slide(s, outdir, str(model), cfg, retries=retries))
    else:
        import dask
        from distributed import Client, LocalCluster, as_completed

        # DataLoader reader processes need non-daemonic Dask workers
        with dask.config.set({"distributed.worker.daemon": False}):
            if scheduler:
                client = Client(scheduler)
                cluster = None
            else:
                nw, nt = default_cluster_size()
                cluster = LocalCluster(
                    n_workers=n_workers or nw, threads_per_worker=nt, processes=True, dashboard_address=None
                )
                client = Client(cluster)
            try:
                futs = [
                    client.submit(run_slide, s, outdir, str(model), cfg, retries=retries, key=f"slide-{s.slide_id}",
                                  pure=False)
                    for s in todo
                ]
                for fut in as_completed(futs):
                    try:
                        record(fut.result())
                    except Exception as exc:  # the worker died (killed, OOM): record and go on
                        sid = fut.key.removeprefix("slide-") if isinstance(fut.key, str) else str(fut.key)
                        row = {"slide_id": sid, "status": "failed", "error": f"worker lost: {exc}"}
                        _write_json(outdir / f"{sid}.result.json", row)
                        record(row)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    if bar is not None:
        bar.close()
    write_results(outdir, slides)
    count = {k: sum(r["status"] == k for r in rows) for k in ("done", "skipped", "failed", "locked")}
    return CohortSummary(len(todo), count["done"], count["skipped"], count["failed"], count["locked"],
                         time.perf_counter() - t0)
