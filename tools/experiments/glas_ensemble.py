"""Seed ensembles and test-time augmentation on GlaS valid: how much does averaging M+ buy, and with how many models?

For every checkpoint, the per-image M+ of the 18 valid images is computed once without and once with test-time
augmentation (``wsltool.models.with_tta``); ensembles average the members' maps exactly as
``wsltool.models.Ensemble`` does (mean of the normalised M+, normalised again).  Every subset of the given
checkpoints is scored, and the mean over subsets of each size is printed: the figure a user gets from training
k seeds.  Metrics as ``wsltool eval`` (pooled pixel AUC / PxAP, per-image F1+ / F1- at 0.5).

Usage::

    .venv/bin/python tools/experiments/glas_ensemble.py /tmp/glas2/W10_seed{0,1,2,3,4,5}/best.pt --tta d4

Measured: docs/glas.md, "Averaging seeds and views".
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


def main() -> int:
    import torch

    from wsltool.evaluate import PixelCurve, image_metrics
    from wsltool.models import with_tta
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.glas import GLAS_CLASSES, glas_items

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoints (members)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glas"))
    ap.add_argument("--work", default="/tmp/glas_ensemble")
    ap.add_argument("--tta", default="d4", choices=["flips", "d4"], help="augmentation compared with none")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    valid = []
    for it in glas_items(args.data, work_dir=args.work):
        if it.split == "valid":
            img = read_image(it.path)
            mp = find_mask(it)
            assert mp is not None, it.path
            valid.append((img, read_mask(mp, img.shape[:2])))

    def score(maps: list[np.ndarray]) -> np.ndarray:
        curve = PixelCurve()
        f1p, f1n = [], []
        for h, (_, gt) in zip(maps, valid, strict=True):
            curve.add(h, gt)
            m = image_metrics(h, gt)
            f1p.append(m["f1_pos"])
            f1n.append(m["f1_neg"])
        return 100 * np.array([curve.auc(), curve.ap(), np.mean(f1p), np.mean(f1n)])

    def fmt(v: np.ndarray) -> str:
        return f"pixel AUC {v[0]:5.1f}  PxAP {v[1]:5.1f}  F1+ {v[2]:5.1f}  F1- {v[3]:5.1f}"

    maps: dict[str, list[list[np.ndarray]]] = {"none": [], args.tta: []}
    for path in args.models:
        model, _ = load_checkpoint(path, class_names=GLAS_CLASSES)
        model = model.to(dev)
        for mode in maps:
            net = with_tta(model, mode)
            per = []
            for img, _ in valid:
                x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].to(dev)
                with torch.inference_mode():
                    per.append(net.localize(x)["mplus"][0].float().cpu().numpy().astype(np.float64))
            maps[mode].append(per)
            print(f"{path}  tta {mode:5s}  {fmt(score(per))}", flush=True)
    n = len(args.models)
    for mode, members in maps.items():
        for k in range(1, n + 1):
            vals = []
            for sub in itertools.combinations(range(n), k):
                avg = [sum(members[i][j] for i in sub) / k for j in range(len(valid))]
                vals.append(score([(a - a.min()) / (a.max() - a.min() + 1e-8) for a in avg]))
            v = np.array(vals)
            print(
                f"tta {mode:5s}  {k} model(s), mean over {len(vals):3d} subsets: {fmt(v.mean(0))}"
                f"   (pixel AUC min {v[:, 0].min():.1f}, max {v[:, 0].max():.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
