"""Output folders: the one check, made before any work, of a folder a run will create or write into.

No torch and no Qt: ``wsltool train``/``eval`` (:func:`wsltool.train.rundir.check_out_folder`), the cohort
runner (:func:`wsltool.cohort.check_out_dir`) and the napari Retrain widget all ask it, so they refuse the
same folders with the same words.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["output_folder_problem"]


def output_folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why a run cannot write into ``folder`` (created with its parents when missing), or None when it can.

    Parameters
    ----------
    folder
        The output folder, existing or not.

    Returns
    -------
    str or None
        ``"exists and is not a folder"``; ``"cannot create the output folder: P is not a folder"`` where the
        deepest existing parent ``P`` is a file; ``"P is not writable"`` where the deepest existing folder
        (``folder`` itself or a parent) cannot be written; None when the run can write there.  The caller puts
        ``folder`` in front of it.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    for place in (out, *out.parents):  # the deepest that exists (Path.exists is False under a file)
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                return f"cannot create the output folder: {place} is not a folder"
            if not os.access(place, os.W_OK | os.X_OK):
                return f"{place} is not writable"
            return None
    return None
