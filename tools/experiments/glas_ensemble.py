"""Average the heatmaps of several checkpoints on GlaS valid: does a seed ensemble localize better?

Each model's per-image normalised M+ is averaged over the models, normalised again per image, and scored with
the same metrics as ``wsltool eval`` (pooled pixel AUC / PxAP, per-image F1+ / F1- at 0.5).

Usage::

    .venv/bin/python tools/experiments/glas_ensemble.py /tmp/glas2/W10_seed{0,1,2,3}/best.pt

Measured (README, "GlaS"): the default's four seeds, pixel AUC 75.0 / PxAP 72.7 / F1+ 67.6 / F1- 62.8 (single
runs: 70.8 / 68.4 / 63.2 / 61.0 on average); WILDCAT's four seeds 73.4 / 71.6 / 67.7 / 56.1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


def main() -> int:
    import torch

    from wsltool.evaluate import PixelCurve, image_metrics
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.glas import GLAS_CLASSES, glas_items

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoints to average")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glas"))
    ap.add_argument("--work", default="/tmp/glas_ensemble")
    args = ap.parse_args()

    valid = []
    for it in glas_items(args.data, work_dir=args.work):
        if it.split == "valid":
            img = read_image(it.path)
            mp = find_mask(it)
            assert mp is not None, it.path
            valid.append((img, read_mask(mp, img.shape[:2])))
    sums = [np.zeros(gt.shape, np.float64) for _, gt in valid]
    for path in args.models:
        model, _ = load_checkpoint(path, class_names=GLAS_CLASSES)
        model.eval()
        for j, (img, _) in enumerate(valid):
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
            with torch.inference_mode():
                sums[j] += model.localize(x)["mplus"][0].numpy()
    curve = PixelCurve()
    f1p, f1n = [], []
    for s, (_, gt) in zip(sums, valid, strict=True):
        h = (s - s.min()) / (s.max() - s.min() + 1e-8)
        curve.add(h, gt)
        m = image_metrics(h, gt)
        f1p.append(m["f1_pos"])
        f1n.append(m["f1_neg"])
    print(
        f"{len(args.models)} models: pixel AUC {100 * curve.auc():.1f}  PxAP {100 * curve.ap():.1f}  "
        f"F1+ {100 * np.mean(f1p):.1f}  F1- {100 * np.mean(f1n):.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
