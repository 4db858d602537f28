"""GlaS (MICCAI 2015 gland segmentation) in its two layouts.

- The PNG copy: ``<name>.png``, ``<name>_anno.png`` and ``labels.csv`` (``name,grade,split,patient_id``).
- The official release: ``<name>.bmp``, ``<name>_anno.bmp`` and ``Grade.csv`` with columns
  ``name, Patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)`` (labels may carry spaces).

:func:`glas_items` reads either; :func:`glas_to_labels_csv` converts the release into a wsltool labels CSV
(``path,label,split,mask``).  The train/valid split of the official training images is the one used by the
min-max entropy authors (their split_0 / fold_0); official test images get split ``test``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from wsltool.errors import LabelsError
from wsltool.train.labels import LabeledItem, read_labels

log = logging.getLogger(__name__)

#: The 18 validation images of the authors' split (the other 67 official training images are ``train``).
GLAS_VALID = (
    "train_2",
    "train_5",
    "train_12",
    "train_18",
    "train_24",
    "train_26",
    "train_36",
    "train_38",
    "train_51",
    "train_52",
    "train_54",
    "train_63",
    "train_65",
    "train_68",
    "train_72",
    "train_74",
    "train_77",
    "train_83",
)
GLAS_CLASSES = ("benign", "malignant")


def _release_rows(folder: Path) -> list[tuple[str, str]]:
    grade = folder / "Grade.csv"
    try:
        rows = list(csv.reader(grade.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as exc:
        raise LabelsError(grade, [f"cannot read ({type(exc).__name__})"]) from exc
    if not rows:
        raise LabelsError(grade, ["empty file"])
    header = [h.strip().lower() for h in rows[0]]
    if "name" not in header or "grade (glas)" not in header:
        raise LabelsError(grade, ["expected columns 'name' and 'grade (GlaS)'"])
    ni, gi = header.index("name"), header.index("grade (glas)")
    return [(r[ni].strip(), r[gi].strip().lower()) for r in rows[1:] if len(r) > max(ni, gi) and r[ni].strip()]


def glas_to_labels_csv(folder: str | Path, out_csv: str | Path) -> Path:
    """Convert the official GlaS release (BMP + ``Grade.csv``) into a labels CSV.

    Parameters
    ----------
    folder
        The release folder.
    out_csv
        CSV to write (``path,label,split,mask``; absolute paths).

    Returns
    -------
    Path
        ``out_csv``.

    Raises
    ------
    LabelsError
        When ``Grade.csv`` is missing or malformed, or images/masks are missing (all problems together).
    """
    folder = Path(folder)
    rows = _release_rows(folder)
    problems = []
    out = []
    for name, grade in rows:
        img, mask = folder / f"{name}.bmp", folder / f"{name}_anno.bmp"
        if not img.exists():
            problems.append(f"image not found: {img.name}")
            continue
        split = "test" if name.lower().startswith("test") else ("valid" if name in GLAS_VALID else "train")
        out.append((str(img), grade, split, str(mask) if mask.exists() else ""))
    if problems:
        raise LabelsError(folder / "Grade.csv", problems)
    out_csv = Path(out_csv)
    with out_csv.open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["path", "label", "split", "mask"])
        wr.writerows(out)
    return out_csv


def glas_items(folder: str | Path, work_dir: str | Path | None = None) -> list[LabeledItem]:
    """Read GlaS in either layout.

    Parameters
    ----------
    folder
        A folder with ``labels.csv`` (PNG copy) or ``Grade.csv`` (official release).
    work_dir
        Where the converted CSV of the release layout is written (default: ``folder``).

    Returns
    -------
    list of LabeledItem
    """
    folder = Path(folder)
    if (folder / "labels.csv").exists():
        return read_labels(folder / "labels.csv", class_names=GLAS_CLASSES, suffixes=(".png", ".bmp"))
    if (folder / "Grade.csv").exists():
        out = Path(work_dir or folder) / "wsltool_labels.csv"
        glas_to_labels_csv(folder, out)
        return read_labels(out, class_names=GLAS_CLASSES)
    raise LabelsError(folder, ["neither labels.csv nor Grade.csv found"])
