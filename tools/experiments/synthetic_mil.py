"""Slide-level training on the synthetic cohort: train, infer held-out slides, score against the lesion masks.

Usage (every ``--model/--train/--mil KEY=VALUE`` overrides a config field)::

    .venv/bin/python tools/experiments/synthetic_mil.py --out /tmp/exp/a --model size_prior=none \
        --train epochs=8 --mil mpp=2.0 --mil region=128

Prints per-slide Dice (stitched mask vs lesion mask at the output resolution), flagged tissue on benign slides,
slide-level AUC, pixel AUC of M+ within tissue, and timings; writes ``results.json`` and preview PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


def kv(items: list[str]) -> dict:
    from wsltool.config import parse_value

    return {k: parse_value(v) for k, _, v in (it.partition("=") for it in items)}


def lesion_at(store, lesion_png: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    m = store.mask(0).astype(bool)
    les = np.asarray(Image.open(lesion_png)) > 0
    f = int(round(store.out_mpp / store.slide_mpp))
    h, w = m.shape
    full = np.zeros((h * f, w * f), bool)
    hh, ww = min(les.shape[0], h * f), min(les.shape[1], w * f)
    full[:hh, :ww] = les[:hh, :ww]
    return m, full.reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5


def evaluate(ckpt: Path, cohort: Path, out: Path, infer_cfg: dict) -> dict:
    from wsltool.config import InferConfig
    from wsltool.export import preview_png
    from wsltool.infer.run import infer_slide
    from wsltool.store import HeatmapStore
    from wsltool.train.labels import read_labels
    from wsltool.train.slides import roc_auc

    rows = []
    for it in read_labels(cohort / "test.csv"):
        t0 = time.perf_counter()
        res = infer_slide(
            it.path, out / f"{it.path.stem}.zarr", str(ckpt), InferConfig(**infer_cfg), overwrite=True, resume=False
        )
        st = HeatmapStore.open(res.store)
        m, g = lesion_at(st, it.mask)
        t = st.tissue(0) > 0
        mp = st.mplus(0)
        dice = 2 * (m & g).sum() / max(1, m.sum() + g.sum()) if it.label == "malignant" else float("nan")
        rows.append(
            {
                "slide": it.path.name,
                "label": it.label,
                "p_malignant": res.probs[-1],
                "dice": float(dice),
                "flagged_tissue": float((m & t).sum() / max(1, t.sum())),
                "pixel_auc": roc_auc(g[t], mp[t]) if g[t].any() else float("nan"),
                "seconds": time.perf_counter() - t0,
            }
        )
        preview_png(res.store, out / f"{it.path.stem}.png", max_size=800)
    y = [int(r["label"] == "malignant") for r in rows]
    summary = {
        "slide_auc": roc_auc(y, [r["p_malignant"] for r in rows]),
        "dice_malignant": float(np.nanmean([r["dice"] for r in rows if r["label"] == "malignant"])),
        "flagged_benign": float(np.mean([r["flagged_tissue"] for r in rows if r["label"] == "benign"])),
        "pixel_auc": float(np.nanmean([r["pixel_auc"] for r in rows if r["label"] == "malignant"])),
    }
    return {"rows": rows, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cohort", type=Path, default=Path("/tmp/wsltool-cohort"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--train", action="append", default=[])
    ap.add_argument("--mil", action="append", default=[])
    ap.add_argument("--infer", action="append", default=[])
    a = ap.parse_args()
    import torch

    from wsltool.config import MilConfig, ModelConfig, TrainConfig
    from wsltool.testing.cohort import make_cohort
    from wsltool.train.labels import read_labels
    from wsltool.train.slides import train_from_items

    torch.set_num_threads(2)
    if not (a.cohort / "slides.csv").exists():
        make_cohort(a.cohort, {"train": (4, 4), "valid": (1, 1), "test": (2, 2)}, seed=a.seed)
    items = [it for it in read_labels(a.cohort / "slides.csv") if it.split in ("train", "valid")]
    from wsltool.train.slides import SLIDE_MODEL_DEFAULTS

    mcfg = ModelConfig(**{**SLIDE_MODEL_DEFAULTS, **kv(a.model)})
    tcfg = TrainConfig(**{"epochs": 8, "schedule": "constant", "warmup_epochs": 0, **kv(a.train)})
    mil = MilConfig(**kv(a.mil))
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fit = train_from_items(items, a.out, model_cfg=mcfg, train_cfg=tcfg, mil=mil, progress=True)
    train_s = time.perf_counter() - t0
    icfg = {"overlap": mil.region // 4, "out_factor": 4 if mil.region <= 128 else 8, "workers": 0, **kv(a.infer)}
    ev = evaluate(fit.best, a.cohort, a.out, icfg)
    ev.update(
        {
            "train_seconds": train_s,
            "model": kv(a.model),
            "train": kv(a.train),
            "mil": kv(a.mil),
            "best_epoch": fit.best_epoch,
            "regions_per_s": float(np.mean([h["regions_per_s"] for h in fit.history])),
        }
    )
    (a.out / "results.json").write_text(json.dumps(ev, indent=1))
    for r in ev["rows"]:
        print(
            f"  {r['slide']:28s} p={r['p_malignant']:.3f} dice={r['dice']:.3f} flagged={r['flagged_tissue']:.3f} "
            f"pxAUC={r['pixel_auc']:.3f}"
        )
    print("SUMMARY", json.dumps(ev["summary"]), f"train {train_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
