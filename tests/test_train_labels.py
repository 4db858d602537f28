"""Labels CSV parsing and the GlaS release layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsltool.errors import LabelsError
from wsltool.train.glas import glas_items, glas_to_labels_csv
from wsltool.train.labels import read_labels


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_read_labels_relative_paths_and_splits(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "a.png")
    _touch(tmp_path / "img" / "b.png")
    (tmp_path / "labels.csv").write_text(
        "slide,label,split,site\nimg/a.png, benign ,train,x\nimg/b.png,malignant,valid,y\n"
    )
    items = read_labels(tmp_path / "labels.csv", class_names=["benign", "malignant"], require_splits=("train",))
    assert [it.path for it in items] == [tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"]
    assert [it.label for it in items] == ["benign", "malignant"]
    assert [it.split for it in items] == ["train", "valid"]
    assert items[0].extra == {"site": "x"}


def test_read_labels_collects_every_problem(tmp_path: Path) -> None:
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "b.png")
    _touch(tmp_path / "c.png")
    _touch(tmp_path / "d.png")
    (tmp_path / "l.csv").write_text(
        "path,label,split\n"
        "a.png,benign,train\n"
        "missing.png,benign,train\n"
        "b.png,tumour,train\n"
        "./a.png,benign,train\n"
        "c.png,,train\n"
        "d.png,benign,\n"
    )
    with pytest.raises(LabelsError) as ei:
        read_labels(tmp_path / "l.csv", class_names=["benign", "malignant"], require_splits=("train", "valid"))
    probs = ei.value.problems
    text = " | ".join(probs)
    assert "line 3: file not found: missing.png" in text
    assert "line 4: unknown label 'tumour'" in text
    assert "line 5: duplicate of line 2" in text
    assert "line 6: missing label" in text
    assert "line 7: empty split" in text
    assert "class 'malignant' has no item" in text
    assert "split 'valid' has no item" in text
    assert len(probs) == 7
    assert str(tmp_path / "l.csv") in str(ei.value)


def test_read_labels_bad_header_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("file,y\na,b\n")
    with pytest.raises(LabelsError, match="first column must be one of"):
        read_labels(tmp_path / "l.csv")
    with pytest.raises(LabelsError, match="file not found"):
        read_labels(tmp_path / "nope.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(LabelsError, match="empty file"):
        read_labels(tmp_path / "e.csv")


def _bmp(p: Path, mask: bool = False) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.random((40, 50)) > 0.5).astype(np.uint8) * 3 if mask else rng.integers(0, 255, (40, 50, 3), np.uint8)
    Image.fromarray(arr).save(p)


def test_glas_release_layout(tmp_path: Path) -> None:
    rel = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    rel.mkdir()
    names = {"train_1": " malignant", "train_2": " benign", "testA_1": " benign", "train_3": "benign "}
    for n in names:
        _bmp(rel / f"{n}.bmp")
        _bmp(rel / f"{n}_anno.bmp", mask=True)
    # as the release writes it: a space after each comma of the header and CRLF line ends
    rows = "".join(f"{n},{i},{g},{g.strip()}\r\n" for i, (n, g) in enumerate(names.items()))
    header = "name, Patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\r\n"
    (rel / "Grade.csv").write_bytes((header + rows).encode())
    listing = sorted(p.name for p in rel.iterdir())
    items = glas_items(rel)
    assert sorted(p.name for p in rel.iterdir()) == listing  # read in memory: nothing written beside the data
    by = {it.path.stem: it for it in items}
    assert by["train_1"].label == "malignant" and by["train_2"].label == "benign"
    assert by["train_2"].split == "valid"  # authors' valid split
    assert by["train_1"].split == "train" and by["testA_1"].split == "test"
    assert by["train_1"].mask == rel / "train_1_anno.bmp"
    assert by["train_1"].source == rel / "Grade.csv" and by["train_1"].row == 2
    # the CSV conversion, into a folder that does not exist yet
    out = glas_to_labels_csv(rel, tmp_path / "new" / "sub" / "labels.csv")
    assert [(it.path, it.label, it.split, it.mask) for it in read_labels(out)] == [
        (it.path, it.label, it.split, it.mask) for it in items
    ]
    (rel / "train_3.bmp").unlink()
    (rel / "Grade.csv").write_text((rel / "Grade.csv").read_text().replace(" benign", "normal", 1))
    with pytest.raises(LabelsError) as ei:
        glas_to_labels_csv(rel, tmp_path / "x.csv")
    assert "line 3: unknown grade 'normal' for train_2" in str(ei.value)
    assert "line 5: image not found: train_3.bmp" in str(ei.value)
    assert not (tmp_path / "x.csv").exists()


def test_glas_png_copy(tmp_path: Path) -> None:
    for n in ("train_1", "train_2"):
        _bmp(tmp_path / f"{n}.png")
    (tmp_path / "labels.csv").write_text(
        "name,grade,split,patient_id\ntrain_1,malignant,train,2\ntrain_2,benign,valid,5\n"
    )
    items = glas_items(tmp_path)
    assert [(it.path.name, it.label, it.split) for it in items] == [
        ("train_1.png", "malignant", "train"),
        ("train_2.png", "benign", "valid"),
    ]
