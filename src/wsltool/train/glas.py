"""GlaS (MICCAI 2015 gland segmentation) in its two layouts.

- The PNG copy: ``<name>.png``, ``<name>_anno.png`` and ``labels.csv`` (``name,grade,split,patient_id``).
- The official release: ``<name>.bmp``, ``<name>_anno.bmp`` and ``Grade.csv`` with columns
  ``name, Patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)`` (labels may carry spaces).

:func:`glas_items` reads either in memory (nothing is written beside the data or anywhere else);
:func:`glas_to_labels_csv` converts the release into a wsltool labels CSV (``path,label,split,mask``) for users
who want one.  The train/valid split of the official training images is the one used by the
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


def release_items(folder: str | Path) -> list[LabeledItem]:
    """Read the official GlaS release (BMP + ``Grade.csv``) in memory; nothing is written.

    Parameters
    ----------
    folder
        The release folder.

    Returns
    -------
    list of LabeledItem
        In ``Grade.csv`` order, with the authors' split (``train`` / ``valid``; ``test`` for the official test
        images) and the ``<name>_anno.bmp`` mask when it exists.

    Raises
    ------
    LabelsError
        When ``Grade.csv`` is missing or malformed, grades are not benign / malignant, or images are missing
        (all problems together).
    """
    folder = Path(folder)
    grade_csv = folder / "Grade.csv"
    problems = []
    items = []
    for n, (name, grade) in enumerate(_release_rows(folder), start=2):
        img, mask = folder / f"{name}.bmp", folder / f"{name}_anno.bmp"
        if not img.exists():
            problems.append(f"line {n}: image not found: {img.name}")
            continue
        if grade not in GLAS_CLASSES:
            problems.append(f"line {n}: unknown grade {grade!r} for {name} (known: {', '.join(GLAS_CLASSES)})")
            continue
        split = "test" if name.lower().startswith("test") else ("valid" if name in GLAS_VALID else "train")
        items.append(LabeledItem(img, grade, split, mask if mask.exists() else None, n, source=grade_csv))
    if not items and not problems:
        problems.append("no rows after the header")
    if problems:
        raise LabelsError(grade_csv, problems)
    log.info("%s: %d items", grade_csv, len(items))
    return items


def glas_to_labels_csv(folder: str | Path, out_csv: str | Path) -> Path:
    """Convert the official GlaS release (BMP + ``Grade.csv``) into a labels CSV.

    Parameters
    ----------
    folder
        The release folder.
    out_csv
        CSV to write (``path,label,split,mask``; absolute paths); its folder is created.  Written only when
        the release reads without a problem.

    Returns
    -------
    Path
        ``out_csv``.

    Raises
    ------
    LabelsError
        As :func:`release_items`.
    """
    items = release_items(folder)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(out_csv.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["path", "label", "split", "mask"])
        wr.writerows((str(it.path), it.label, it.split, str(it.mask or "")) for it in items)
    tmp.replace(out_csv)
    return out_csv


def glas_items(folder: str | Path) -> list[LabeledItem]:
    """Read GlaS in either layout, without writing anything.

    Parameters
    ----------
    folder
        A folder with ``labels.csv`` (PNG copy) or ``Grade.csv`` (official release).

    Returns
    -------
    list of LabeledItem
    """
    folder = Path(folder)
    if (folder / "labels.csv").exists():
        return read_labels(folder / "labels.csv", class_names=GLAS_CLASSES, suffixes=(".png", ".bmp"))
    if (folder / "Grade.csv").exists():
        return release_items(folder)
    raise LabelsError(folder, ["neither labels.csv nor Grade.csv found"])
