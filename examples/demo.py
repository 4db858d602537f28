"""`make demo`: the whole tool on a synthetic cohort, through the CLI a user would type.

1. generate a cohort of 14 Aperio-style slides (10 to train and validate, 4 held out), malignant ones with
   lesions whose masks are known;
2. ``wsltool train --labels slides.csv`` from slide-level labels only (a few CPU minutes);
3. ``wsltool infer`` on the held-out slides and ``wsltool export --png --geojson``;
4. print the slide-level results and score the stitched masks against the lesion masks.

Also prints ``wsltool info`` of the real Aperio sample slide from the test data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("WSLTOOL_TEST_DATA", Path.home() / ".cache" / "wsltool" / "testdata"))

#: Training settings of the demo: the slide-training defaults (measured on the synthetic cohort; see README).
TRAIN_ARGS: list[str] = []


def sh(args: list[str]) -> None:
    print("$ wsltool " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "wsltool.cli", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    svs = DATA / "cmu_small_region.svs"
    if svs.exists():
        sh(["info", str(svs)])

    from wsltool.testing.cohort import make_cohort

    cohort = out / "cohort"
    if not (cohort / "slides.csv").exists():
        print(f"generating a synthetic cohort in {cohort} ...", flush=True)
        make_cohort(cohort, {"train": (4, 4), "valid": (1, 1), "test": (2, 2)}, seed=args.seed)
    model = out / "model"
    # a second `make demo` (or one after an interruption) continues the run: nothing left to do once finished
    resume = ["--resume"] if (model / "last.pt").exists() else []
    sh(["train", "--labels", str(cohort / "slides.csv"), "--out", str(model), *TRAIN_ARGS, *resume])
    from PIL import Image

    from wsltool.store import HeatmapStore
    from wsltool.train.labels import read_labels

    rows = []
    for it in read_labels(cohort / "test.csv"):
        store = out / f"{it.path.stem}.zarr"
        sh(
            [
                "infer",
                str(it.path),
                "-o",
                str(store),
                "--model",
                str(model / "best.pt"),
                "--overlap",
                "96",  # 3/4 of the 128 px region: the dense heatmap setting (README, "Training from slide labels")
                "--workers",
                "1",
                "--overwrite",
                "--quiet",
            ]
        )
        sh(["export", str(store), "--png", "--geojson"])
        st = HeatmapStore.open(store)
        m, t = st.mask(0).astype(bool), st.tissue(0) > 0
        f = round(st.out_mpp / st.slide_mpp)
        les = np.asarray(Image.open(it.mask)) > 0
        h, w = m.shape
        full = np.zeros((h * f, w * f), bool)
        hh, ww = min(les.shape[0], h * f), min(les.shape[1], w * f)
        full[:hh, :ww] = les[:hh, :ww]
        g = full.reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5
        dice = 2 * (m & g).sum() / max(1, m.sum() + g.sum())
        rows.append(
            {
                "slide": it.path.name,
                "truth": it.label,
                "predicted": st.result["predicted"],
                "p_malignant": st.result["probs"][-1],
                "flagged_tissue_%": 100 * (m & t).sum() / max(1, t.sum()),
                "dice": float(dice) if it.label == "malignant" else None,
            }
        )
    print("\nheld-out slides (trained from slide labels only):")
    print(f"{'slide':28s} {'truth':10s} {'predicted':10s} {'p(mal)':>7s} {'flagged %':>9s} {'Dice':>6s}")
    for r in rows:
        d = f"{r['dice']:.2f}" if r["dice"] is not None else "-"
        print(
            f"{r['slide']:28s} {r['truth']:10s} {r['predicted']:10s} {r['p_malignant']:7.3f} "
            f"{r['flagged_tissue_%']:9.1f} {d:>6s}"
        )
    (out / "demo_results.json").write_text(json.dumps(rows, indent=1))
    print(
        f"\npreviews: {out}/*.png   stores: {out}/*.zarr   model: {model}/best.pt   ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
