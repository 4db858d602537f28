"""Redraw ``docs/img/demo_overlay.png`` from a finished ``make demo`` (``demo-out/``).

Usage: ``.venv/bin/python tools/demo_figure.py [--demo demo-out] [--slide test_012_malignant]``.
Left: the slide at the heatmap's resolution with M+ (inferno) and the mask outline (green); right: the true
lesion mask the model never saw, with the same outline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from wsltool.slide import open_slide
from wsltool.store import HeatmapStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo-out"))
    ap.add_argument("--slide", default="test_012_malignant")
    ap.add_argument("--out", type=Path, default=Path("docs/img/demo_overlay.png"))
    a = ap.parse_args()
    st = HeatmapStore.open(a.demo / f"{a.slide}.zarr")
    mp, mask = st.mplus(0), st.mask(0) > 0
    h, w = mp.shape
    with open_slide(a.demo / "cohort" / f"{a.slide}.svs") as s:
        rgb = s.read_region(0, 0, w, h, mpp=st.out_mpp)
    f = round(st.out_mpp / st.slide_mpp)
    les = np.asarray(Image.open(a.demo / "cohort" / f"{a.slide}_lesion.png")) > 0
    full = np.zeros((h * f, w * f), bool)
    full[: min(h * f, les.shape[0]), : min(w * f, les.shape[1])] = les[: h * f, : w * f]
    truth = full.reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.8))
    ax[0].imshow(rgb)
    shown = np.ma.masked_where((mp < 0.1) | (st.tissue(0) == 0), mp)
    ax[0].imshow(shown, cmap="inferno", vmin=0, vmax=1, alpha=0.6)
    ax[1].imshow(truth, cmap="gray")
    for x in ax:
        x.contour(mask, [0.5], colors="lime", linewidths=1.2)
        x.set_axis_off()
    ax[0].set_title(f"{a.slide}: M+ and mask (p malignant {st.result['probs'][-1]:.3f})")
    ax[1].set_title("true lesion mask (never seen in training)")
    fig.savefig(a.out, dpi=80, bbox_inches="tight")
    print(a.out)


if __name__ == "__main__":
    main()
