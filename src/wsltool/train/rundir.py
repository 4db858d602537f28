"""Training output folders: a new run never silently replaces an earlier one.

No torch here: the napari plugin's viewer process uses :func:`next_free_dir` to pick a fresh folder.

Decision: a folder that already holds a run (``last.pt`` or ``best.pt``) is refused unless the caller resumes
it or explicitly asks to overwrite it (``wsltool train --overwrite``, as ``wsltool infer --overwrite`` does for
a finished store).  Overwriting moves the earlier run's files aside first (into a hidden ``.wsltool-replaced-*``
folder inside the run folder), so no stale ``best.pt`` or history lines of the old run mix with the new one; they
are deleted once the new run has written its first checkpoint, and put back if it fails before that (an error
in the first epoch, Ctrl-C), as ``wsltool infer --overwrite`` keeps the old store until the new one is complete.
Several seeds (``--seeds``) are one run here: all their folders, and their ``ensemble.pt``, are set aside
together and come back together (:func:`set_aside`).  (A run killed outright, SIGKILL or power loss, leaves the
earlier run in the hidden folders.)  The napari Retrain widget never overwrites: each run goes into the next
free folder (``wsltool-retrain``, ``wsltool-retrain-2``, ...), so a pathologist's earlier model stays on disk.
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
#: Files the training loops write (set aside when an overwriting run starts, see :func:`set_aside`; ``splits.csv``
#: and ``slides.csv`` are written by the callers before the loop starts, see :func:`provisional_file`).
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

    For a new run over an earlier one (``overwrite``), the earlier run's files are set aside
    (:func:`set_aside`): deleted when the block ends with a checkpoint of the new run in ``out_dir``, put
    back when it ends (an error, Ctrl-C) before the new run wrote one.

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
    with contextlib.nullcontext() if resume else set_aside([out]):
        yield out


@contextmanager
def set_aside(folders: Sequence[str | Path], files: Sequence[str | Path] = ()) -> Iterator[None]:
    """Keep the earlier run(s) in ``folders`` until the new run inside the block has a checkpoint.

    The :data:`RUN_FILES` of each folder, and ``files`` (an ensemble built from them), are moved into a
    hidden ``.wsltool-replaced-<token>`` folder beside them.  When the block ends, if any of ``folders``
    holds a checkpoint (:data:`RUN_MARKERS`) the new run wrote, everything set aside is deleted: the new
    run, even a partial one (``--resume`` continues it), replaces all of the earlier one.  Otherwise each
    file is put back, so an invocation that trains several seeds is replaced whole or not at all.  A
    run killed outright (SIGKILL, power loss) leaves the earlier files in the hidden folders.

    Parameters
    ----------
    folders
        Run folders (one per seed).
    files
        Other files of the earlier run, set aside and put back with them.
    """
    token = uuid.uuid4().hex[:8]
    wanted = [Path(f) / n for f in folders for n in RUN_FILES] + [Path(f) for f in files]
    moved: list[tuple[Path, Path]] = []  # (where it was, where it is now)
    began = False  # the new run began (everything was set aside): only then can a checkpoint be its own
    try:
        for src in wanted:
            if src.exists() or src.is_symlink():
                dst = src.parent / f".wsltool-replaced-{token}" / src.name
                dst.parent.mkdir(exist_ok=True)
                os.replace(src, dst)
                moved.append((src, dst))
        if moved:
            kept = ", ".join(str(d) for d in sorted({dst.parent for _, dst in moved}))
            log.warning("replacing an earlier run: its files are kept in %s until this run's first checkpoint", kept)
        began = True
        yield
    finally:
        asides = sorted({dst.parent for _, dst in moved})
        if began and any(existing_run(f) for f in folders):  # the new run has a checkpoint: it replaces the earlier
            for d in asides:
                shutil.rmtree(d, ignore_errors=True)
        elif moved:  # it ended before its first checkpoint (or while setting aside): the earlier run goes back
            failed = []
            for src, dst in moved:
                try:
                    os.replace(dst, src)
                except OSError as exc:  # never hide the error that brought us here, nor delete what is aside
                    failed.append(f"{dst} ({exc.strerror or exc})")
            for d in asides:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only once empty: a file that could not go back stays there
            if failed:
                log.warning("the earlier run could not be put back whole; still set aside: %s", "; ".join(failed))
            else:
                back = ", ".join(str(f) for f in sorted({src.parent for src, _ in moved}))
                log.warning("this run ended before its first checkpoint; the earlier run is back in %s", back)


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
    "set_aside",
]
