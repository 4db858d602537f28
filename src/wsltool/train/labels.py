"""Labels CSV parsing: ``path,label[,split]`` (also ``slide,label[,split]``), every problem reported at once.

The reader knows nothing of images or slides: a row names a file and its label.  Paths are relative to the
CSV's folder.  Problems (missing files, unknown or missing labels, duplicates, a class without any item,
an empty split, unreadable CSV) are collected and raised together as :class:`~wsltool.errors.LabelsError`
before any work starts.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsltool.errors import LabelsError

log = logging.getLogger(__name__)

#: Accepted names of the first (file) column and of the label column (case-insensitive).
PATH_COLUMNS = ("path", "slide", "image", "name")
LABEL_COLUMNS = ("label", "grade", "class")


@dataclass(frozen=True)
class LabeledItem:
    """One row of a labels CSV.

    Attributes
    ----------
    path
        Absolute path of the file.
    label
        Class name (stripped of surrounding spaces).
    split
        Split name (``train``, ``valid``, ...) or None when the CSV has no split column.
    mask
        Optional ground-truth mask path (``mask`` column), absolute.
    row
        Line number in the CSV (for messages).
    extra
        Other columns, as strings.
    source
        The labels file the row came from (for messages; None when built in code).
    """

    path: Path
    label: str
    split: str | None = None
    mask: Path | None = None
    row: int = 0
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    source: Path | None = field(default=None, compare=False, hash=False)


def _resolve(base: Path, text: str, suffixes: Sequence[str]) -> Path:
    p = Path(text)
    p = p if p.is_absolute() else base / p
    if not p.exists() and not p.suffix:
        for s in suffixes:
            q = p.with_name(p.name + s)
            if q.exists():
                return q
    return p


def read_labels(
    csv_path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    suffixes: Sequence[str] = (),
    require_splits: Sequence[str] = (),
) -> list[LabeledItem]:
    """Read and validate a labels CSV.

    Parameters
    ----------
    csv_path
        CSV with a header: a file column (``path``, ``slide``, ``image`` or ``name``), a label column
        (``label``, ``grade`` or ``class``), optional ``split`` and ``mask`` columns; other columns are kept
        in ``extra``.
    class_names
        Known classes; labels outside them are problems, and so is a class with no item.  When None, the
        classes are the sorted distinct labels.
    suffixes
        Tried in order when a path without suffix does not exist (e.g. ``(".png", ".bmp")``).
    require_splits
        Splits that must hold at least one item (e.g. ``("train",)``).

    Returns
    -------
    list of LabeledItem
        In CSV order.

    Raises
    ------
    LabelsError
        With every problem found.
    """
    path = Path(csv_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelsError(path, ["file not found"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(path, [f"cannot read as UTF-8 text ({type(exc).__name__})"]) from exc
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise LabelsError(path, ["empty file: expected a header 'path,label[,split]'"])
    header = [h.strip().lower() for h in rows[0]]
    problems: list[str] = []
    pcol = header[0] if header and header[0] in PATH_COLUMNS else None
    lcol = next((c for c in LABEL_COLUMNS if c in header), None)
    if pcol is None:
        problems.append(f"first column must be one of {', '.join(PATH_COLUMNS)}, got {rows[0][0].strip()!r}")
    if lcol is None:
        problems.append(f"no label column (one of {', '.join(LABEL_COLUMNS)})")
    if problems:
        raise LabelsError(path, problems)
    assert lcol is not None
    li = header.index(lcol)
    si = header.index("split") if "split" in header else None
    mi = header.index("mask") if "mask" in header else None
    base = path.parent
    items: list[LabeledItem] = []
    seen: dict[Path, int] = {}
    first_label: dict[str, tuple[str, int]] = {}  # casefolded label -> (its first spelling, line)
    known = None if class_names is None else [str(c) for c in class_names]
    for n, r in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in r] + [""] * (len(header) - len(r))
        if len(r) > len(header):
            problems.append(f"line {n}: {len(r)} fields, header has {len(header)}")
            continue
        name, label = cells[0], cells[li]
        if not name:
            problems.append(f"line {n}: empty path")
            continue
        p = _resolve(base, name, suffixes)
        bad = False
        if not p.exists():
            where = "" if Path(name).is_absolute() else f" (looked for {p}: paths are relative to the CSV's folder)"
            problems.append(f"line {n}: file not found: {name}{where}")
            bad = True
        if not label:
            problems.append(f"line {n}: missing label for {name}")
            bad = True
        elif known is not None and label not in known:
            problems.append(f"line {n}: unknown label {label!r} for {name} (known: {', '.join(known)})")
            bad = True
        elif label.casefold() in first_label and first_label[label.casefold()][0] != label:
            other, m = first_label[label.casefold()]
            problems.append(f"line {n}: label {label!r} differs from {other!r} (line {m}) only in case")
            bad = True
        else:
            first_label.setdefault(label.casefold(), (label, n))
        key = p.resolve()
        if key in seen:
            problems.append(f"line {n}: duplicate of line {seen[key]}: {name}")
            bad = True
        else:
            seen[key] = n
        split = None
        if si is not None:
            split = cells[si]
            if not split:
                problems.append(f"line {n}: empty split for {name}")
                bad = True
        mask = None
        if mi is not None and cells[mi]:
            mask = _resolve(base, cells[mi], suffixes)
            if not mask.exists():
                problems.append(f"line {n}: mask not found: {cells[mi]}")
                bad = True
        if bad:
            continue
        extra = {h: cells[i] for i, h in enumerate(header) if i not in (0, li, si, mi)}
        items.append(LabeledItem(p, label, split, mask, n, extra, path))
    if len(rows) == 1:
        problems.append("no rows after the header")
    if known is not None:
        present = {it.label for it in items}
        problems.extend(f"class {c!r} has no item" for c in known if c not in present and items)
    if si is not None:
        splits = {it.split for it in items}
        problems.extend(f"split {s!r} has no item" for s in require_splits if s not in splits)
    if problems:
        raise LabelsError(path, problems)
    log.info("%s: %d items, classes %s", path, len(items), sorted({it.label for it in items}))
    return items


#: Split names training knows: ``train`` trains, ``valid`` validates (checkpoint selection), ``test`` is left out.
TRAIN_SPLITS = ("train", "valid", "test")


def check_train_splits(items: Sequence[LabeledItem]) -> None:
    """Refuse split names training does not know, instead of silently leaving their rows out.

    Decision: no aliases (``val``, ``validation``): a misspelt split would otherwise train on the wrong rows
    or select checkpoints on none, and the error says which names are known.

    Raises
    ------
    LabelsError
        Naming the labels file the items came from and every offending line.
    """
    bad = [
        f"line {it.row}: unknown split {it.split!r} for {it.path.name} (known: {', '.join(TRAIN_SPLITS)})"
        for it in items
        if it.split is not None and it.split not in TRAIN_SPLITS
    ]
    if bad:
        raise LabelsError(items[0].source or items[0].path.parent, bad)


def class_names_of(items: Sequence[LabeledItem]) -> list[str]:
    """Sorted distinct labels of ``items``."""
    return sorted({it.label for it in items})
