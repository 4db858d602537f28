"""Seed ensembles and test-time augmentation on GlaS valid: how much does averaging M+ buy, and with how many models?

For every checkpoint, the per-image M+ of the 18 valid images is computed once without and once with test-time
augmentation (``wsltool.models.with_tta``); ensembles average the members' maps exactly as
``wsltool.models.Ensemble`` does (mean of the normalised M+, normalised again).  Every subset of the given
checkpoints is scored, and the mean over subsets of each size is printed: the figure a user gets from training
k seeds.  Metrics as ``wsltool eval`` (pooled pixel AUC / PxAP, per-image F1+ / F1- at 0.5).

Usage::

    .venv/bin/python tools/experiments/glas_ensemble.py /tmp/glas2/W10_seed{0,1,2,3,4,5}/best.pt --tta d4

Measured: docs/glas.md, "Averaging seeds and views".  ``glas_ensemble_paired.py`` reuses this file's helpers.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

DEFAULT_DATA = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glas")


def valid_set(data: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The GlaS ``valid`` images (RGB uint8) and their gland masks (boolean), in the data set's order."""
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.glas import glas_items

    images, gts = [], []
    for it in glas_items(data):
        if it.split == "valid":
            img = read_image(it.path)
            mp = find_mask(it)
            assert mp is not None, it.path
            images.append(img)
            gts.append(read_mask(mp, img.shape[:2]))
    return images, gts


def model_maps(model: Any, tta: str, images: Sequence[np.ndarray], device: Any = "cpu") -> list[np.ndarray]:
    """Normalised M+ of ``model`` on each image (``tta``: ``"none"``, ``"flips"`` or ``"d4"``)."""
    import torch

    from wsltool.models import with_tta

    net = with_tta(model, tta)
    maps = []
    for img in images:
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].to(device)
        with torch.inference_mode():
            maps.append(net.localize(x)["mplus"][0].float().cpu().numpy().astype(np.float64))
    return maps


def ensemble_maps(members: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Per image, the members' maps averaged and min-max normalised again (as ``wsltool.models.Ensemble``)."""
    out = []
    for j in range(len(members[0])):
        a = np.mean([np.asarray(m[j], dtype=np.float64) for m in members], axis=0)
        out.append((a - a.min()) / (a.max() - a.min() + 1e-8))
    return out


def score(maps: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict[str, float]:
    """``wsltool eval``'s localization metrics (x100) of per-image maps in [0, 1] against boolean masks."""
    from wsltool.evaluate import PixelCurve, image_metrics

    curve = PixelCurve()
    rows = []
    for h, gt in zip(maps, gts, strict=True):
        curve.add(h, gt)
        rows.append(image_metrics(h, gt))
    r = {k: 100.0 * float(np.mean([x[k] for x in rows])) for k in ("f1_pos", "f1_neg", "area")}
    r["pxap"] = 100.0 * curve.ap()
    r["pixel_auc"] = 100.0 * curve.auc()
    return r


def main() -> int:
    import torch

    from wsltool.infer.run import resolve_device
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.glas import GLAS_CLASSES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoints (members)")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--tta", default="d4", choices=["flips", "d4"], help="augmentation compared with none")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)  # the CLI's rule: "auto" = CUDA when available
    images, gts = valid_set(args.data)

    def fmt(r: dict[str, float]) -> str:
        return f"pixel AUC {r['pixel_auc']:5.1f}  PxAP {r['pxap']:5.1f}  F1+ {r['f1_pos']:5.1f}  F1- {r['f1_neg']:5.1f}"

    maps: dict[str, list[list[np.ndarray]]] = {"none": [], args.tta: []}
    for path in args.models:
        model, _ = load_checkpoint(path, class_names=GLAS_CLASSES)
        model = model.to(dev)
        for mode in maps:
            per = model_maps(model, mode, images, dev)
            maps[mode].append(per)
            print(f"{path}  tta {mode:5s}  {fmt(score(per, gts))}", flush=True)
    n = len(args.models)
    for mode, members in maps.items():
        for k in range(1, n + 1):
            vals = [score(ensemble_maps([members[i] for i in sub]), gts) for sub in itertools.combinations(range(n), k)]
            mean = {key: float(np.mean([v[key] for v in vals])) for key in vals[0]}
            aucs = [v["pixel_auc"] for v in vals]
            print(
                f"tta {mode:5s}  {k} model(s), mean over {len(vals):3d} subsets: {fmt(mean)}"
                f"   (pixel AUC min {min(aucs):.1f}, max {max(aucs):.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
