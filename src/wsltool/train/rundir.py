"""Training output folders: a new run never silently replaces an earlier one.

No torch here: the napari plugin's viewer process uses :func:`next_free_dir` to pick a fresh folder.

Decision: a folder that already holds a run (``last.pt`` or ``best.pt``) is refused unless the caller resumes
it or explicitly asks to overwrite it (``wsltool train --overwrite``, as ``wsltool infer --overwrite`` does for
a finished store).  Overwriting removes the earlier run's files first, so no stale ``best.pt`` or history lines
of the old run mix with the new one.  The napari Retrain widget never overwrites: each run goes into the next
free folder (``wsltool-retrain``, ``wsltool-retrain-2``, ...), so a pathologist's earlier model stays on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsltool.errors import ConfigError

log = logging.getLogger(__name__)

#: Files whose presence means a folder holds a training run.
RUN_MARKERS = ("last.pt", "best.pt")
#: Files the training loops write (removed before an overwriting run starts; ``splits.csv`` and ``slides.csv``
#: are written by the callers before the loop starts and rewritten by them).
RUN_FILES = (*RUN_MARKERS, "history.jsonl", "history.csv", "curves.png")


def existing_run(out_dir: str | Path) -> list[str]:
    """Names of the run markers (``last.pt``, ``best.pt``) present in ``out_dir`` (empty: no run there)."""
    out = Path(out_dir)
    return [n for n in RUN_MARKERS if (out / n).exists()]


def check_out_folder(out_dir: str | Path) -> None:
    """Refuse an output folder path that exists as something else (a file), before any work is done.

    Raises
    ------
    ConfigError
        ``out_dir`` exists and is not a folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        msg = f"{out}: exists and is not a folder"
        raise ConfigError(msg)


def check_new_run(out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to start a new run over an earlier one; nothing is written or removed.

    Parameters
    ----------
    out_dir
        The run's output folder.
    resume
        The run continues ``out_dir/last.pt``: an existing run is expected, not refused.
    overwrite
        The caller asked to replace an earlier run.

    Raises
    ------
    ConfigError
        ``out_dir`` is a file, or holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    check_out_folder(out_dir)
    found = existing_run(out_dir)
    if found and not resume and not overwrite:
        msg = (
            f"{out_dir}: already holds a training run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another output folder"
        )
        raise ConfigError(msg)


def start_run_dir(out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check (:func:`check_new_run`), create ``out_dir`` and, for a new run, remove an earlier run's files.

    Returns
    -------
    Path
        ``out_dir``.
    """
    check_new_run(out_dir, resume=resume, overwrite=overwrite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        old = [n for n in RUN_FILES if (out / n).exists()]
        if old:
            log.warning("%s: replacing an earlier run (%s)", out, ", ".join(old))
        for n in old:
            (out / n).unlink()
    return out


def next_free_dir(base: str | Path) -> Path:
    """``base`` when it holds no run, else the first of ``base-2``, ``base-3``, ... that holds none."""
    base = Path(base)
    cand, k = base, 1
    while existing_run(cand):
        k += 1
        cand = base.with_name(f"{base.name}-{k}")
    return cand


__all__ = ["RUN_FILES", "RUN_MARKERS", "check_new_run", "existing_run", "next_free_dir", "start_run_dir"]
