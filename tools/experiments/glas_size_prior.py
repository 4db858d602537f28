"""Does a per-image size prior fit GlaS crops, and does a model's mask size follow the glands?

Two diagnostics behind lesson 17 of docs/glas.md:

1. The gland fraction of random training crops (``--crops 224 384``, 50 per image of the 67 ``train`` images)
   against the default ``range`` prior's bounds: the share of crops the per-image prior pulls the wrong way.
2. For each run directory given (``/tmp/glas2/<run>``, as ``examples/glas/run_glas.py`` writes them), how the
   mask area at threshold 0.5 follows the gland area over the 18 ``valid`` images: slope and correlation of a
   straight-line fit, from the run's ``eval_valid/metrics.csv``; runs named ``<tag>_seed<n>`` are averaged
   per tag.

Usage::

    .venv/bin/python tools/experiments/glas_size_prior.py /tmp/glas2/W10_seed* /tmp/glas2/BR_seed*

A few seconds.  Reads train masks for (1) and valid masks only through the runs' metrics for (2); never
reads test images.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def crop_fractions(data: Path, crop: int, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Gland fraction of random ``crop`` x ``crop`` windows of the ``train`` images' masks."""
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.glas import glas_items

    out = []
    for it in glas_items(data):
        if it.split != "train":
            continue
        mp = find_mask(it)
        if mp is None:
            continue
        m = read_mask(mp, read_image(it.path).shape[:2])
        for _ in range(per_image):
            y = int(rng.integers(0, m.shape[0] - crop + 1))
            x = int(rng.integers(0, m.shape[1] - crop + 1))
            out.append(float(m[y : y + crop, x : x + crop].mean()))
    return np.asarray(out)


def area_fit(run: Path) -> tuple[float, float]:
    """Slope and correlation of mask area on gland area over a run's valid images."""
    with (run / "eval_valid" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    a = np.array([float(r["area"]) for r in rows])
    g = np.array([float(r["gt_area"]) for r in rows])
    return float(np.polyfit(g, a, 1)[0]), float(np.corrcoef(a, g)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run directories with eval_valid/metrics.csv")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data" / "glas")
    ap.add_argument("--crops", type=int, nargs="+", default=[224, 384])
    ap.add_argument("--per-image", type=int, default=50)
    ap.add_argument("--bounds", type=float, nargs=2, default=[0.35, 0.65])
    args = ap.parse_args()
    lo, hi = args.bounds
    for crop in args.crops:
        fr = crop_fractions(args.data, crop, args.per_image, np.random.default_rng(0))
        below, above = 100 * (fr < lo).mean(), 100 * (fr > hi).mean()
        print(
            f"{crop} px crops (n={fr.size}): gland fraction mean {fr.mean():.3f} sd {fr.std():.3f}; "
            f"below {lo}: {below:.1f} %, above {hi}: {above:.1f} %, outside: {below + above:.1f} %"
        )
    fits: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in args.runs:
        if (run / "eval_valid" / "metrics.csv").exists():
            fits[re.sub(r"_seed\d+$", "", run.name)].append(area_fit(run))
    for tag, vals in fits.items():
        s, c = np.mean(vals, axis=0)
        print(f"{tag}: mask area on gland area, slope {s:.2f}, correlation {c:.2f} (mean over {len(vals)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
