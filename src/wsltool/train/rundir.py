"""Training output folders: a new run never silently replaces an earlier one.

No torch here: the napari plugin's viewer process uses :func:`next_free_dir` to pick a fresh folder.

Decision: a folder that already holds a run (``last.pt`` or ``best.pt``) is refused unless the caller resumes
it or explicitly asks to overwrite it (``wsltool train --overwrite``, as ``wsltool infer --overwrite`` does for
a finished store).  Overwriting moves the earlier run's files aside first (into a hidden ``.wsltool-replaced-*``
folder inside the run folder), so no stale ``best.pt`` or history lines of the old run mix with the new one; they
are deleted once the new run has written its first checkpoint, and put back if it fails before that (a bad image
in the first epoch, Ctrl-C), as ``wsltool infer --overwrite`` keeps the old store until the new one is complete.
(A run killed outright, SIGKILL or power loss, leaves the earlier run in that hidden folder.)  The napari Retrain
widget never overwrites: each run goes into the next free folder (``wsltool-retrain``, ``wsltool-retrain-2``,
...), so a pathologist's earlier model stays on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from wsltool.errors import ConfigError
from wsltool.paths import output_folder_problem

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
    """Refuse an output folder that cannot be made or written, before any work is done.

    The check is :func:`wsltool.paths.output_folder_problem`'s.

    Raises
    ------
    ConfigError
        ``out_dir`` exists and is not a folder, a parent is a file, or the place is not writable.
    """
    problem = output_folder_problem(out_dir)
    if problem:
        msg = f"{out_dir}: {problem}"
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


@contextmanager
def run_dir(out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Check (:func:`check_new_run`) and create ``out_dir`` for the training loop run inside the block.

    For a new run over an earlier one (``overwrite``), the earlier run's files are moved aside into a hidden
    folder in ``out_dir``: deleted when the block ends with a checkpoint of the new run in ``out_dir``, put back
    when it ends (raises, or stops early) before the new run wrote one.

    Parameters
    ----------
    out_dir
        The run's output folder.
    resume
        The block continues the run in ``out_dir``: nothing is moved.
    overwrite
        The caller asked to replace an earlier run.

    Yields
    ------
    Path
        ``out_dir``.
    """
    check_new_run(out_dir, resume=resume, overwrite=overwrite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = [] if resume else [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    aside = out / f".wsltool-replaced-{uuid.uuid4().hex[:8]}"
    if old:
        log.warning(
            "%s: replacing an earlier run (%s), kept in %s until this run's first checkpoint",
            out,
            ", ".join(old),
            aside,
        )
        aside.mkdir()
        for n in old:
            os.replace(out / n, aside / n)
    try:
        yield out
    finally:
        if old and existing_run(out):  # the new run has a checkpoint: it replaces the earlier one
            shutil.rmtree(aside, ignore_errors=True)
        elif old:  # it failed or stopped before its first checkpoint: the earlier run goes back
            try:
                for n in old:
                    os.replace(aside / n, out / n)
                aside.rmdir()
                log.warning("%s: this run ended before its first checkpoint; the earlier run is back in place", out)
            except OSError as exc:  # never hide the error that brought us here, nor delete what is still aside
                log.warning("%s: the earlier run could not be put back from %s (%s)", out, aside, exc)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of ``path``, None when absent: a checkpoint written (atomically, by rename) changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextmanager
def provisional_file(path: str | Path, *, until: Sequence[str | Path]) -> Iterator[Path]:
    """Let the caller write ``path`` (an input record such as ``splits.csv``) for a run that may fail to start.

    If the block raises (a bad image, Ctrl-C) before any file in ``until`` (the run's checkpoints) has been
    written or replaced, ``path`` is put back as it was (its earlier bytes, or absent), and the folders that
    did not exist before the block (``path``'s and the checkpoints') are removed where left empty.  So a run
    that never started leaves no trace that looks like a run, and an earlier run's record is not replaced by
    the one of a run that never began.  Once a checkpoint exists the file stays: it describes that
    checkpoint's run (and ``--resume`` continues it).  (An ``--overwrite`` run that fails before its first
    checkpoint puts the earlier run's checkpoints back, see :func:`run_dir`, so the earlier record comes back
    with them.)

    Parameters
    ----------
    path
        The file the block writes.
    until
        The run's checkpoint files (``last.pt`` of each run folder).

    Yields
    ------
    Path
        ``path``.
    """
    path = Path(path)
    marks = [Path(u) for u in until]
    new_dirs = {d for f in (path, *marks) for d in _missing_dirs(f.parent)}
    before = path.read_bytes() if path.is_file() else None
    stamps = [_stamp(m) for m in marks]
    try:
        yield path
    except BaseException:
        if [_stamp(m) for m in marks] == stamps:  # the run never wrote a checkpoint
            _take_back(path, before, new_dirs)
        raise


def _take_back(path: Path, before: bytes | None, new_dirs: set[Path]) -> None:
    """Put ``path`` back to ``before`` (None: absent) and remove the empty folders of ``new_dirs``."""
    tmp = path.with_name(f".{path.name}.restore")
    try:
        if before is None:
            path.unlink(missing_ok=True)
        elif path.is_symlink():  # restore what the link points at, and keep the link
            path.write_bytes(before)
        else:
            tmp.write_bytes(before)
            os.replace(tmp, path)
    except OSError as exc:  # never hide the error that brought us here
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("%s: could not be put back as it was before this run (%s)", path, exc)
    for d in sorted(new_dirs, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty (something else was written there), or already gone
            d.rmdir()


def next_free_dir(base: str | Path) -> Path:
    """``base`` when it holds no run, else the first of ``base-2``, ``base-3``, ... that holds none."""
    base = Path(base)
    cand, k = base, 1
    while existing_run(cand):
        k += 1
        cand = base.with_name(f"{base.name}-{k}")
    return cand


__all__ = [
    "RUN_FILES",
    "RUN_MARKERS",
    "check_new_run",
    "existing_run",
    "next_free_dir",
    "provisional_file",
    "run_dir",
]
