"""A synthetic slide cohort with known lesions: the demo's and the tests' stand-in for a hospital cohort.

Benign slides carry H&E-like tissue with regular small nuclei; malignant slides additionally carry
lesions (crowded, large, dark, irregular nuclei) covering 5-30% of their tissue.  Every slide is a real
Aperio-style SVS (OpenSlide detects ``aperio``); the lesion and tissue masks are saved as PNGs at full
resolution for evaluation.  Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsltool.testing.slides import he_tissue, write_svs


@dataclass(frozen=True)
class CohortEntry:
    """One generated slide."""

    path: Path
    label: str
    split: str
    lesion_mask: Path
    tissue_mask: Path
    lesion_fraction: float


def make_cohort(
    outdir: str | Path,
    splits: dict[str, tuple[int, int]],
    *,
    size: tuple[int, int] = (1536, 2048),
    mpp: float = 0.5,
    seed: int = 0,
    lesion_range: tuple[float, float] = (0.05, 0.3),
    compression: str = "jpeg",
) -> list[CohortEntry]:
    """Write a cohort of SVS slides and ``<split>.csv`` label files.

    Parameters
    ----------
    outdir
        Output folder (created).
    splits
        ``{split: (n_benign, n_malignant)}``, e.g. ``{"train": (3, 3), "valid": (1, 1), "test": (2, 2)}``.
        Writes ``slides.csv`` (every split, with a ``split`` column) and one ``<split>.csv`` per split.
    size
        ``(height, width)`` of level 0 in pixels.
    mpp
        Microns per pixel written into the slides.
    seed
        Base seed; slide ``i`` uses ``seed * 1000 + i``.
    lesion_range
        Range of the lesion fraction of the tissue on malignant slides.
    compression
        ``"jpeg"`` (like scanners; needs imagecodecs) or ``"none"`` (where imagecodecs is absent).

    Returns
    -------
    list of CohortEntry
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: list[CohortEntry] = []
    i = 0
    for split, (n_benign, n_malignant) in splits.items():
        for label, n in (("benign", n_benign), ("malignant", n_malignant)):
            for _ in range(n):
                frac = float(rng.uniform(*lesion_range)) if label == "malignant" else 0.0
                c = he_tissue(
                    size[0], size[1], seed=seed * 1000 + i, n_blobs=int(rng.integers(2, 4)), lesion_fraction=frac
                )
                name = f"{split}_{i:03d}_{label}"
                p = write_svs(out / f"{name}.svs", c.rgb, mpp=mpp, factors=(4, 16), compression=compression)
                lm, tm = out / f"{name}_lesion.png", out / f"{name}_tissue.png"
                Image.fromarray(c.lesion.astype(np.uint8) * 255).save(lm)
                Image.fromarray(c.tissue.astype(np.uint8) * 255).save(tm)
                real = float(c.lesion.sum() / max(1, c.tissue.sum()))
                entries.append(CohortEntry(p, label, split, lm, tm, real))
                i += 1
    _write_csv(out / "slides.csv", entries, out, with_split=True)
    for split in splits:
        _write_csv(out / f"{split}.csv", [e for e in entries if e.split == split], out, with_split=False)
    return entries


def _write_csv(path: Path, entries: list[CohortEntry], base: Path, *, with_split: bool) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "mask"] if with_split else ["path", "label", "mask"])
        for e in entries:
            row = [e.path.relative_to(base).as_posix(), e.label]
            if with_split:
                row.append(e.split)
            row.append(e.lesion_mask.relative_to(base).as_posix())
            w.writerow(row)
