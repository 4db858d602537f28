"""Many slides: one task per slide on Dask distributed (LocalCluster by default), or a ``--shard`` of them.

Every slide is safe to re-run and safe to race for:

- output ``OUTDIR/<slide-id>.zarr`` (a complete store is skipped; an incomplete one resumes);
- a lock file ``OUTDIR/<slide-id>.lock`` created atomically (``O_CREAT | O_EXCL``) holding host, pid, time
  and a random token, refreshed by a heartbeat thread while the slide runs; a lock whose process is gone
  (same host) or that has not been refreshed for ``stale_after`` seconds (any host) is reclaimed; two
  runners never work on one slide;
- the outcome ``OUTDIR/<slide-id>.result.json`` (status ``done`` | ``failed``, probabilities, error...),
  from which ``OUTDIR/results.csv`` is rebuilt as slides finish, so concurrent runners never lose rows;
- an append-only audit log ``OUTDIR/events.jsonl`` (one JSON line per start, retry, done, failed, with
  host and pid): who computed what, and when.

A failure on one slide (corrupt file, out of memory) is recorded and does not stop the cohort. Bad input
(``WslError``: unreadable slide, missing mpp) fails at once; other errors are retried up to ``retries``
times, each retry resuming the half-written store.  A slide that failed is tried again on the next run; a
failure never replaces a finished (``done``) result of an earlier run (:func:`record_failure`).  What would
fail every slide (the CSV, the checkpoint, a setting it refuses, an option) is refused by :func:`run_cohort`
before anything is written.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsltool.config import InferConfig, from_dict, to_dict
from wsltool.errors import CheckpointError, ConfigError, LabelsError, WslError
from wsltool.paths import output_folder_problem

log = logging.getLogger(__name__)

RESULT_FIELDS = [
    "slide_id",
    "path",
    "status",
    "predicted",
    "probs",
    "tissue_mm2",
    "regions",
    "seconds",
    "attempts",
    "host",
    "error",
    "store",
    "model",
]

#: Statuses a slide can end a run with.
STATUSES = ("done", "skipped", "failed", "locked")


@dataclass(frozen=True)
class CohortSlide:
    """One row of a cohort CSV."""

    slide_id: str
    path: Path
    mpp: float | None = None


def _bad_id(sid: str) -> str | None:
    """Why ``sid`` cannot name files in OUTDIR (``<id>.zarr``, ``<id>.result.json``, ``<id>.lock``), or None."""
    if not sid:
        return "is empty"
    if "/" in sid or "\\" in sid or ".." in sid or sid.startswith(".") or "\0" in sid:
        return "must not contain '/', '\\' or '..' nor start with '.' (it names files in OUTDIR)"
    return None


def read_cohort(csv_path: str | Path) -> list[CohortSlide]:
    """Read ``COHORT.csv``: a ``path`` (or ``slide``) column, optional ``id`` and ``mpp`` columns.

    Paths are relative to the CSV's folder and are returned absolute (workers of a remote Dask cluster do
    not share this process's working directory). Missing files, duplicate ids and ids that cannot name a
    file inside OUTDIR (empty, containing a slash, a backslash or ``..``, or starting with ``.``) are reported
    together, each with its line number in the file (blank lines count).

    Raises
    ------
    LabelsError
        Listing every problem found.
    """
    csv_path = Path(csv_path).absolute()
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelsError(csv_path, ["file not found"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(csv_path, [f"cannot read as UTF-8 text ({exc})"]) from exc
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames
    if not header:
        raise LabelsError(csv_path, ["empty file: needs a 'path' (or 'slide') column header"])
    fields = [f.strip().lower() for f in header if f is not None]
    col = "path" if "path" in fields else ("slide" if "slide" in fields else None)
    if col is None:
        raise LabelsError(csv_path, ["needs a 'path' (or 'slide') column header"])
    problems: list[str] = []
    out: list[CohortSlide] = []
    seen: dict[str, int] = {}
    for raw in reader:
        n = reader.line_num  # the file's line (blank lines, which the reader skips, count)
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        rel = row.get(col, "")
        if not rel:
            problems.append(f"line {n}: empty path")
            continue
        p = Path(rel) if Path(rel).is_absolute() else (csv_path.parent / rel)
        if not p.exists():
            problems.append(f"line {n}: {rel}: no such file")
        sid = row.get("id") or Path(rel).name.split(".")[0]
        why = _bad_id(sid)
        if why is not None:
            problems.append(f"line {n}: slide id {sid!r} {why}")
            continue
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
        problems.append("lists no slides (a header and no rows)")
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


# -- small file helpers -------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    """A temporary sibling unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def log_event(outdir: Path, slide_id: str, event: str, **extra: Any) -> None:
    """Append one line to ``OUTDIR/events.jsonl`` (a single ``O_APPEND`` write, safe across processes)."""
    rec = {
        "time": round(time.time(), 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slide": slide_id,
        "event": event,
        **extra,
    }
    line = (json.dumps(rec) + "\n").encode()
    try:
        fd = os.open(outdir / "events.jsonl", os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:  # the audit log must never fail a slide
        log.warning("cannot append to %s: %s", outdir / "events.jsonl", exc)


def read_events(outdir: str | Path) -> list[dict[str, Any]]:
    """The records of ``OUTDIR/events.jsonl`` (an unreadable line is skipped)."""
    p = Path(outdir) / "events.jsonl"
    out = []
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# -- locks --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlideLock:
    """An exclusive, stale-reclaiming lock file for one slide (works on shared file systems with O_EXCL).

    Parameters
    ----------
    path
        The lock file.
    stale_after
        Seconds without a refresh after which a lock of another host is considered abandoned (a lock of
        this host is abandoned as soon as its process is gone).

    Attributes
    ----------
    held
        True while this object holds the lock.
    reclaimed
        True when :meth:`acquire` removed an abandoned lock first.
    """

    def __init__(self, path: Path, stale_after: float = 3600.0) -> None:
        self.path = path
        self.stale_after = stale_after
        self.held = False
        self.reclaimed = False
        self._token = uuid.uuid4().hex
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def _read(self) -> tuple[str, float] | None:
        """Lock content and mtime; None when there is no lock."""
        try:
            return self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _is_stale(self, content: str, mtime: float) -> bool:
        try:
            info = json.loads(content)
        except ValueError:
            # half-written by a live creator (a few microseconds) or garbage left by a crash
            return time.time() - mtime > 10.0
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return True
        return time.time() - mtime > self.stale_after

    def _stale(self) -> bool:
        cur = self._read()
        return cur is not None and self._is_stale(*cur)

    def _reclaim(self) -> bool:
        """Remove an abandoned lock, serialised by a second O_EXCL file so two reclaimers cannot both win."""
        guard = self.path.with_name(self.path.name + ".reclaim")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a reclaimer that died inside this tiny window
                if time.time() - guard.stat().st_mtime > 60:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            cur = self._read()  # look again, now that no other reclaimer can act
            if cur is None:
                return True
            if not self._is_stale(*cur):
                return False
            log.warning("reclaiming abandoned lock %s (%s)", self.path, cur[0].strip())
            self.path.unlink(missing_ok=True)
            self.reclaimed = True
            return True
        finally:
            guard.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another live runner holds it."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale() and self._reclaim():
                    continue
                return False
            info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": self._token}
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self.held = True
            return True
        return False

    def owned(self) -> bool:
        """True when the lock file on disk is still this object's."""
        cur = self._read()
        if cur is None:
            return False
        try:
            return bool(json.loads(cur[0]).get("token") == self._token)
        except ValueError:
            return False

    def refresh(self) -> None:
        """Mark the lock alive (updates its mtime)."""
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("lock %s disappeared while held", self.path)

    def start_heartbeat(self, every: float | None = None) -> None:
        """Refresh the lock from a daemon thread every ``every`` seconds (default ``stale_after / 4``)."""
        period = every if every is not None else max(1.0, min(60.0, self.stale_after / 4))

        def beat() -> None:
            while not self._stop.wait(period):
                self.refresh()

        self._stop.clear()
        self._beat = threading.Thread(target=beat, name=f"lock-{self.path.name}", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this object's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.held:
            if self.owned():
                self.path.unlink(missing_ok=True)
            else:
                log.warning("lock %s was taken over by another runner", self.path)
            self.held = False


# -- one slide ----------------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple[str, float], Any] = {}
_MODEL_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _cached_model(path: str) -> Any:
    """Load a checkpoint once per worker process (keyed by path and mtime)."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            from wsltool.train.checkpoint import load_checkpoint

            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = load_checkpoint(path, map_location="cpu")
        return _MODEL_CACHE[key]


def _worker_config(cfg: InferConfig, gpu_per_worker: bool) -> InferConfig:
    """Adapt the settings to the process a task runs in (daemonic Dask worker; one GPU per worker)."""
    import dataclasses

    if cfg.workers and multiprocessing.current_process().daemon:
        log.log(
            logging.DEBUG if _WARNED else logging.WARNING,
            "daemonic worker process cannot start reader processes: reading in the worker instead "
            "(start Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False to use readers)",
        )
        cfg = dataclasses.replace(cfg, workers=0)
        _WARNED.add("daemon")
    if gpu_per_worker and cfg.device in ("auto", "cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > 1:
            try:
                from distributed import get_worker

                name = get_worker().name
            except (ImportError, ValueError):
                name = None
            if isinstance(name, int):
                cfg = dataclasses.replace(cfg, device=f"cuda:{name % n}")
    return cfg


def run_settings(model: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """What a finished slide must have been made with to be skipped.

    The inference settings and the checkpoint's size and modification time (cheap to check): after a change
    of either, finished slides are not skipped but checked again by ``infer_slide``.
    """
    st = Path(model).stat()
    return {"config": config, "model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns}


def _done_record(result_path: Path, store: Path) -> dict[str, Any] | None:
    """The recorded result when it says ``done`` and its store is complete (whatever the settings), else None."""
    from wsltool.store import HeatmapStore

    if not (result_path.exists() and store.exists()):
        return None
    try:
        prev = json.loads(result_path.read_text())
        if isinstance(prev, dict) and prev.get("status") == "done" and HeatmapStore.open(store).complete:
            return dict(prev)
    except (OSError, ValueError, WslError):
        pass
    return None


def _finished(result_path: Path, store: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded result when the slide is done with these settings and its store is complete, else None."""
    prev = _done_record(result_path, store)
    if prev is not None and prev.get("settings") == json.loads(json.dumps(settings)):
        return prev
    return None


_OVERWRITE_HINT = re.compile(r"[;,]?\s*(?:use|pass) --overwrite\b[^;]*")


def cohort_error(error: str, slide_id: str) -> str:
    """``error`` with ``wsltool infer``'s ``--overwrite`` hint replaced by what a cohort run can do.

    ``cohort infer`` has no ``--overwrite``: a store in the way (made with other settings or another
    checkpoint) is never replaced; the user deletes it, or writes the run into another OUTDIR.
    """
    if "--overwrite" not in error:
        return error
    return (
        f"{_OVERWRITE_HINT.sub('', error)}; cohort infer never replaces it: delete {slide_id}.zarr and "
        f"{slide_id}.result.json from OUTDIR to recompute this slide, or use another OUTDIR"
    )


def record_failure(outdir: Path, row: dict[str, Any], **event: Any) -> dict[str, Any]:
    """Record that a slide failed in this run, without erasing a finished result of an earlier run.

    A ``done`` record whose store is still complete (an earlier run with other settings or another checkpoint,
    or a slide file since damaged) is kept as it is, so ``results.csv`` keeps its scores; this run's failure is
    then only in the returned row (``kept_result`` true: counted as failed in this run's summary and logged)
    and in ``events.jsonl``. Otherwise the failed row is written to ``<slide-id>.result.json``.

    Parameters
    ----------
    outdir
        Cohort output folder.
    row
        The failed row (``slide_id``, ``status`` ``failed``, ``error``...).
    **event
        Extra fields of the ``failed`` event.

    Returns
    -------
    dict
        ``row``, with ``kept_result`` set.

    Raises
    ------
    OSError
        The result file cannot be written.
    """
    sid = str(row["slide_id"])
    result_path = outdir / f"{sid}.result.json"
    kept = _done_record(result_path, outdir / f"{sid}.zarr") is not None
    row = {**row, "kept_result": kept}
    try:
        if not kept:
            _write_json(result_path, row)
    finally:  # the audit log says it failed even when the result file cannot be written
        log_event(outdir, sid, "failed", error=row.get("error", ""), kept_result=kept, **event)
    return row


def run_slide(
    slide: CohortSlide,
    outdir: str | Path,
    model: str,
    config: dict[str, Any],
    *,
    retries: int = 1,
    retry_wait: float = 2.0,
    stale_after: float = 3600.0,
    torch_threads: int | None = None,
    gpu_per_worker: bool = False,
) -> dict[str, Any]:
    """Process one slide (skip, resume or run) and record its outcome; never raises for slide problems.

    Parameters
    ----------
    slide
        The slide.
    outdir
        Cohort output folder.
    model
        Checkpoint path (loaded once per process).
    config
        :class:`~wsltool.config.InferConfig` as a dict.
    retries
        Extra attempts after a failure that is not a ``WslError``; each resumes the half-written store.
    retry_wait
        Seconds to wait before retry k (times k).
    stale_after
        Lock age (other hosts) after which a lock is considered abandoned.
    torch_threads
        ``torch.set_num_threads`` for this process (Dask workers start with one thread).
    gpu_per_worker
        Pin Dask worker ``k`` of a LocalCluster to GPU ``k`` (multi-GPU machines).

    Returns
    -------
    dict
        The result row (see :data:`RESULT_FIELDS`); ``status`` is ``done``, ``skipped`` (finished
        earlier), ``locked`` (another runner has it) or ``failed`` (``kept_result`` true when a finished
        result of an earlier run was kept on disk, see :func:`record_failure`).

    Raises
    ------
    ConfigError
        ``retries``, ``retry_wait``, ``stale_after`` or ``torch_threads`` out of range (see
        :func:`check_run_options`).
    """
    from wsltool.infer import run as infer_run

    check_run_options(retries=retries, retry_wait=retry_wait, stale_after=stale_after, torch_threads=torch_threads)

    outdir = Path(outdir)
    store = outdir / f"{slide.slide_id}.zarr"
    result_path = outdir / f"{slide.slide_id}.result.json"
    base = {
        "slide_id": slide.slide_id,
        "path": str(slide.path),
        "store": str(store),
        "host": socket.gethostname(),
        "model": str(model),  # which checkpoint made (or failed to make) the row: a table may mix runs
    }
    settings = run_settings(model, config)
    prev = _finished(result_path, store, settings)
    if prev is not None:
        return {**prev, "status": "skipped"}
    lock = SlideLock(outdir / f"{slide.slide_id}.lock", stale_after=stale_after)
    if not lock.acquire():
        return {**base, "status": "locked"}
    try:
        prev = _finished(result_path, store, settings)  # another runner may have finished it meanwhile
        if prev is not None:
            return {**prev, "status": "skipped"}
        lock.start_heartbeat()
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        cfg = _worker_config(from_dict(InferConfig, config, source="cohort config"), gpu_per_worker)
        log_event(outdir, slide.slide_id, "start", resume=store.exists(), reclaimed_lock=lock.reclaimed)
        attempts, error = 0, ""
        t0 = time.perf_counter()
        while attempts <= retries:
            if attempts:
                time.sleep(retry_wait * attempts)
            attempts += 1
            try:
                res = infer_run.infer_slide(
                    slide.path, store, _cached_model(model), cfg, slide_mpp=slide.mpp, on_band=lock.refresh
                )
            except WslError as exc:  # bad input: retrying will not help
                error = cohort_error(str(exc), slide.slide_id)
                break
            except Exception as exc:  # transient (memory, I/O, a killed reader process): retry
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: attempt %d failed: %s", slide.slide_id, attempts, error)
                log_event(
                    outdir,
                    slide.slide_id,
                    "retry" if attempts <= retries else "error",
                    attempt=attempts,
                    error=error.replace("\n", " "),
                )
                continue
            row = {
                **base,
                "status": "done",
                "predicted": res.predicted,
                "probs": dict(zip(res.class_names, res.probs, strict=True)),
                "tissue_mm2": round(res.tissue_mm2, 4),
                "regions": res.regions,
                "computed": res.computed,
                "seconds": round(time.perf_counter() - t0, 2),
                "attempts": attempts,
                "error": "",
                "pid": os.getpid(),
                "finished": time.time(),
                "settings": settings,
            }
            _write_json(result_path, row)
            log_event(outdir, slide.slide_id, "done", attempts=attempts, computed=res.computed)
            return row
        row = {
            **base,
            "store": str(store) if store.exists() else "",
            "status": "failed",
            "attempts": attempts,
            "error": error.replace("\n", " "),
            "seconds": round(time.perf_counter() - t0, 2),
            "pid": os.getpid(),
            "finished": time.time(),
        }
        return record_failure(outdir, row, attempts=attempts)
    finally:
        lock.release()


# -- the table ----------------------------------------------------------------------------------


def _fmt_probs(probs: Any) -> str:
    if isinstance(probs, dict):
        return ";".join(f"{k}={float(v):.6g}" for k, v in probs.items())
    return str(probs or "")


def write_results(outdir: str | Path, slides: list[CohortSlide]) -> Path:
    """Rebuild ``OUTDIR/results.csv`` from the ``<id>.result.json`` of ``slides`` (not yet run: ``pending``).

    The table is the given cohort's: result files of other slides in OUTDIR (another cohort CSV written
    there) are left out of it, and left in place.
    """
    outdir = Path(outdir)
    rows = []
    for s in sorted(slides, key=lambda s: s.slide_id):
        rp = outdir / f"{s.slide_id}.result.json"
        try:
            r = json.loads(rp.read_text())
        except (OSError, ValueError):
            r = {"slide_id": s.slide_id, "path": str(s.path), "status": "pending"}
        r["probs"] = _fmt_probs(r.get("probs"))
        rows.append({k: r.get(k, "") for k in RESULT_FIELDS})
    out = outdir / "results.csv"
    tmp = _tmp_name(out)
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
    return out


@dataclass
class CohortSummary:
    """Counts of a cohort run (``total`` is the number of slides this run was given)."""

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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_cluster_size() -> tuple[int, int]:
    """``(worker processes, torch threads per worker)`` for a LocalCluster on this machine.

    GPU: one process per GPU. CPU: one process per four cores (at least one), each with ``cores / workers``
    torch threads; each Dask worker runs one slide at a time. On 2 loaded cores one worker with two threads
    was as fast as or faster than two single-threaded workers (docs/cohort.md): a second worker pays the
    torch import and the model load again and has no idle core to overlap into.
    """
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), max(1, _cpu_count() // torch.cuda.device_count())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    cores = _cpu_count()
    workers = max(1, cores // 4)
    return workers, max(1, cores // workers)


def check_run_options(
    *,
    retries: int = 1,
    retry_wait: float = 2.0,
    stale_after: float = 3600.0,
    n_workers: int | None = None,
    torch_threads: int | None = None,
) -> None:
    """Refuse run options out of range, before anything starts (named as the ``cohort infer`` options).

    Raises
    ------
    ConfigError
        ``retries`` < 0, ``retry_wait`` < 0, ``stale_after`` <= 0, ``n_workers`` < 1 or ``torch_threads`` < 1
        (NaN is refused too).
    """
    checks = (
        ("--retries", retries, retries is not None and retries >= 0, ">= 0"),
        ("--retry-wait", retry_wait, retry_wait is not None and 0 <= retry_wait < math.inf, ">= 0 seconds"),
        ("--stale-after", stale_after, stale_after is not None and stale_after > 0, "> 0 seconds"),
        ("--workers", n_workers, n_workers is None or n_workers >= 1, ">= 1"),
        ("--torch-threads", torch_threads, torch_threads is None or torch_threads >= 1, ">= 1"),
    )
    for name, value, ok, need in checks:
        if not ok:
            msg = f"{name} must be {need}, got {value}"
            raise ConfigError(msg)


def check_scheduler_address(address: str) -> None:
    """Refuse a malformed Dask scheduler address (``tcp://host:8786``) without connecting to it.

    Raises
    ------
    ConfigError
        Unknown scheme, or no host and port.
    """
    from distributed.comm.addressing import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme, _ = parse_address(address)
        get_backend(scheme)  # ValueError for a scheme distributed does not know
        if scheme in ("tcp", "tls", "ws", "wss"):  # host:port schemes (inproc and ucx backends parse their own)
            get_address_host_port(address)
    except (ValueError, TypeError) as exc:
        msg = f"--scheduler {address!r} is not a Dask scheduler address ({exc}); expected e.g. tcp://host:8786"
        raise ConfigError(msg) from exc


def check_out_dir(outdir: Path) -> None:
    """Refuse an OUTDIR that cannot be made or written, before anything is created.

    The check is :func:`wsltool.paths.output_folder_problem`'s.

    Raises
    ------
    ConfigError
        ``outdir`` exists and is not a folder, one of its parents is a file, or the place is not writable.
    """
    problem = output_folder_problem(outdir)
    if problem:
        msg = f"{outdir}: {problem}; give a folder (new or from an earlier run) as OUTDIR"
        raise ConfigError(msg)


def check_model(model: Path, config: InferConfig, *, local: bool = True) -> dict[str, Any]:
    """Load the checkpoint once, as every slide will (same loader, on CPU), and check the settings against it.

    The region, overlap and output-factor rules are ``infer_slide``'s (:func:`wsltool.infer.run.region_geometry`);
    checked here, a checkpoint or setting that every slide would fail on is one error before any slide is
    scheduled.

    Parameters
    ----------
    model
        Checkpoint path.
    config
        Inference settings of the run.
    local
        The slides run on this machine (shard or LocalCluster): the device is checked too.

    Returns
    -------
    dict
        The checkpoint's meta.

    Raises
    ------
    CheckpointError
        Missing, corrupt or unsafe file, a folder, not a localizer, or ``--region`` far from its input size.
    ConfigError
        Overlap not smaller than the region, ``--out-factor`` not dividing region and stride, unknown or
        absent device.
    """
    from wsltool.infer.run import region_geometry
    from wsltool.train.checkpoint import load_checkpoint

    net, meta = load_checkpoint(model, map_location="cpu")
    if not hasattr(net, "localize"):
        msg = f"{model}: model has no localize() method"
        raise CheckpointError(msg)
    region_geometry(config, meta)  # infer_slide's rule, raising its errors
    if local:
        from wsltool.device import resolve_device

        resolve_device(config.device)
    return dict(meta)


def run_cohort(
    csv_path: str | Path,
    outdir: str | Path,
    model: str | Path,
    config: InferConfig | None = None,
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    torch_threads: int | None = None,
    shard_spec: str | None = None,
    retries: int = 1,
    retry_wait: float = 2.0,
    stale_after: float = 3600.0,
    progress: bool | Callable[[int, int], None] = False,
) -> CohortSummary:
    """Run every slide of a cohort CSV into ``outdir``.

    Everything that would fail every slide is checked first, before ``outdir`` is created or any slide
    scheduled: the options, ``shard_spec``, the scheduler address, the CSV, ``outdir`` itself, the
    checkpoint (loaded once) and the inference settings against it.

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
        LocalCluster worker processes, >= 1 (default: :func:`default_cluster_size`).
    torch_threads
        Torch threads per task, >= 1. Default: cores / workers on a LocalCluster; torch's own default in a
        shard run; unchanged on an existing cluster (Dask starts its workers with ``OMP_NUM_THREADS=1``).
    shard_spec
        ``"i/N"``: run only the i-th share in this process, without Dask (for job arrays).
    retries
        Extra attempts for transient failures (>= 0).
    retry_wait
        Seconds before retry k (times k), >= 0.
    stale_after
        Seconds after which a lock of another host that is not refreshed is reclaimed (> 0).
    progress
        ``True`` for a tqdm bar over slides, or ``fn(done, total)``.

    Returns
    -------
    CohortSummary
        Counts and wall time of this run (``results.csv`` holds the whole cohort).

    Raises
    ------
    WslError
        ``ConfigError`` (an option, OUTDIR, the scheduler address or a setting the checkpoint refuses),
        ``LabelsError`` (the CSV), ``CheckpointError`` (the checkpoint); nothing was written then.
    """
    check_run_options(
        retries=retries,
        retry_wait=retry_wait,
        stale_after=stale_after,
        n_workers=n_workers,
        torch_threads=torch_threads,
    )
    shard_ix = None if shard_spec is None else parse_shard(shard_spec)
    if scheduler and shard_ix is None:
        check_scheduler_address(scheduler)
    slides = read_cohort(csv_path)
    outdir = Path(outdir).absolute()
    check_out_dir(outdir)
    model = Path(model).absolute()
    infer_cfg = config or InferConfig()
    check_model(model, infer_cfg, local=not (scheduler and shard_ix is None))
    outdir.mkdir(parents=True, exist_ok=True)
    cfg = to_dict(infer_cfg)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = None
    todo = slides if shard_ix is None else shard(slides, *shard_ix)
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="slide")
    last_table = [0.0, 0.0]  # time of the last rewrite, seconds it took

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        if row["status"] == "failed":
            kept = " (its finished result of an earlier run is kept)" if row.get("kept_result") else ""
            log.warning("%s: failed%s: %s", row.get("slide_id"), kept, row.get("error", ""))
        else:
            log.info("%s: %s", row.get("slide_id"), row["status"])
        now = time.perf_counter()
        # rebuilding the table reads every result file: at most every few seconds on big cohorts
        if now - last_table[0] >= max(2.0, 10 * last_table[1]):
            write_results(outdir, slides)
            last_table[0], last_table[1] = time.perf_counter(), time.perf_counter() - now
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{row['status']} {row.get('slide_id')}")
        elif callable(progress):
            progress(len(rows), len(todo))

    kw: dict[str, Any] = {"retries": retries, "retry_wait": retry_wait, "stale_after": stale_after}
    # finished slides are counted here, without starting a cluster for them
    settings = run_settings(model, cfg)
    pending = []
    for s in todo:
        prev = _finished(outdir / f"{s.slide_id}.result.json", outdir / f"{s.slide_id}.zarr", settings)
        if prev is None:
            pending.append(s)
        else:
            record({**prev, "status": "skipped"})
    if pending and shard_ix is not None:
        for s in pending:
            record(run_slide(s, outdir, str(model), cfg, torch_threads=torch_threads, **kw))
    elif pending:
        import dask
        from distributed import Client, LocalCluster, as_completed

        # DataLoader reader processes need non-daemonic Dask workers; a slide that kills its worker
        # (segfault in a slide library, out of memory) is given up after ``retries`` more tries
        dask_settings = {"distributed.worker.daemon": False, "distributed.scheduler.allowed-failures": retries}
        with dask.config.set(dask_settings):
            cluster = None
            gpu_per_worker = False
            if scheduler:
                try:
                    client = Client(scheduler)
                except ValueError as exc:  # a malformed address the check above let through
                    msg = f"--scheduler {scheduler!r}: {exc}"
                    raise ConfigError(msg) from exc
            else:
                nw, nt = default_cluster_size()
                workers = n_workers or nw
                if torch_threads is None:
                    torch_threads = nt if n_workers is None else max(1, _cpu_count() // workers)
                gpu_per_worker = _has_gpu()
                log.info("LocalCluster: %d worker processes x %d torch threads", workers, torch_threads)
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
                client = Client(cluster)
            try:
                # the slide options are bound here: ``Client.submit`` would take ``retries=`` (and any other
                # of its own keywords) for itself instead of passing it to run_slide
                task = functools.partial(run_slide, torch_threads=torch_threads, gpu_per_worker=gpu_per_worker, **kw)
                futs = [
                    client.submit(task, s, outdir, str(model), cfg, key=f"slide-{s.slide_id}", pure=False)
                    for s in pending
                ]
                by_key = {f.key: s for f, s in zip(futs, pending, strict=True)}
                for fut in as_completed(futs):
                    try:
                        record(fut.result())
                    except Exception as exc:  # the worker died (killed, out of memory) or the task broke
                        sl = by_key[fut.key]
                        sid = sl.slide_id
                        err = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                        row = {
                            "slide_id": sid,
                            "path": str(sl.path),
                            "status": "failed",
                            "error": err,
                            "host": "",
                            "finished": time.time(),
                        }
                        try:
                            row = record_failure(outdir, row, by="client")
                        except OSError as wexc:
                            log.error("%s: cannot record the failure: %s", sid, wexc)
                        record(row)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    if bar is not None:
        bar.close()
    write_results(outdir, slides)
    count = {k: sum(r["status"] == k for r in rows) for k in STATUSES}
    return CohortSummary(
        len(todo), count["done"], count["skipped"], count["failed"], count["locked"], time.perf_counter() - t0
    )


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False
