"""Which map is a baseline's heatmap?  The softmax-weighted class maps (what wsltool ships) or one class's map.

The issue asks for WILDCAT "with its class map as the heatmap".  wsltool scores every method with the same
formula as min-max's M+: the class maps weighted by the softmax of the scores, normalised per image.  This tool
measures, on the same checkpoints, the alternatives a reader may have in mind:

- ``weighted``: what wsltool ships (``localize()["mplus"]``);
- ``predicted``: the map of the class the model predicts, normalised per image;
- ``true``: the map of the image's true class (needs the label: a reference, not usable at inference).

Pooled PxAP and pixel AUC on GlaS ``valid`` (x100), as ``wsltool eval``.

Usage::

    .venv/bin/python tools/experiments/glas_heatmap_definition.py /tmp/glas3/CAM_seed*/best.pt

Measured: docs/glas.md, "Which map is a baseline's heatmap".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

KINDS = ("weighted", "predicted", "true")


def _normalise(m: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation, exactly as M+ (``wsltool.models.minmax.normalize_per_image``)."""
    import torch

    from wsltool.models.minmax import normalize_per_image

    return normalize_per_image(torch.from_numpy(np.ascontiguousarray(m))[None])[0].numpy()


def heatmaps(out: dict[str, np.ndarray], label: int) -> dict[str, np.ndarray]:
    """The three heatmaps of one image from ``localize``'s output (batch of one, as numpy).

    Parameters
    ----------
    out
        ``probs`` (1, C), ``mplus`` (1, H, W), ``class_maps`` (1, C, H, W).
    label
        Index of the image's true class.

    Returns
    -------
    dict
        ``weighted`` (the shipped M+), ``predicted`` and ``true`` class maps, each normalised to [0, 1].
    """
    pred = int(out["probs"][0].argmax())
    return {
        "weighted": out["mplus"][0],
        "predicted": _normalise(out["class_maps"][0, pred]),
        "true": _normalise(out["class_maps"][0, label]),
    }


def main() -> int:
    import torch

    from wsltool.evaluate import PixelCurve
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.glas import GLAS_CLASSES, glas_items

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glas"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    valid = []
    for it in glas_items(args.data):
        if it.split == "valid":
            img = read_image(it.path)
            mp = find_mask(it)
            assert mp is not None
            valid.append((img, read_mask(mp, img.shape[:2]), GLAS_CLASSES.index(it.label)))
    print("| checkpoint | " + " | ".join(f"PxAP {k} | AUC {k}" for k in KINDS) + " |")
    print("|---" * (1 + 2 * len(KINDS)) + "|")
    diffs: dict[str, list[float]] = {k: [] for k in KINDS[1:]}
    for ck in args.checkpoints:
        model, _ = load_checkpoint(ck, class_names=GLAS_CLASSES)
        curves = {k: PixelCurve() for k in KINDS}
        for img, gt, label in valid:
            with torch.inference_mode():
                o = model.localize(torch.from_numpy(img.copy()).permute(2, 0, 1)[None], size=img.shape[:2])
            for k, h in heatmaps({k: v.numpy() for k, v in o.items()}, label).items():
                curves[k].add(h, gt)
        ap_ = {k: 100 * c.ap() for k, c in curves.items()}
        auc = {k: 100 * c.auc() for k, c in curves.items()}
        for k in diffs:
            diffs[k].append(ap_[k] - ap_["weighted"])
        print(f"| {ck} | " + " | ".join(f"{ap_[k]:.1f} | {auc[k]:.1f}" for k in KINDS) + " |")
    for k, d in diffs.items():
        print(f"PxAP {k} minus weighted: mean {np.mean(d):+.2f}, range [{min(d):+.2f}, {max(d):+.2f}], n {len(d)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
