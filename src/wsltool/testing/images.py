"""A tiny labelled image set for CLI tests: random 48x56 PNGs, gland-like masks, ``labels.csv`` with splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_tiny_image_set(root: str | Path, n: int = 6) -> Path:
    """Write ``im<i>.png`` + ``im<i>_anno.png`` (a 20x28 rectangle) and ``labels.csv``; returns the CSV.

    Labels alternate benign / malignant; the first four rows are ``train``, the rest ``valid``.  Seeded, so
    every call writes the same bytes.
    """
    root = Path(root)
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), np.uint8)).save(root / f"im{i}.png")
        m = np.zeros((48, 56), np.uint8)
        m[10:30, 12:40] = 255
        Image.fromarray(m).save(root / f"im{i}_anno.png")
        rows.append(f"im{i}.png,{['benign', 'malignant'][i % 2]},{'train' if i < 4 else 'valid'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"
