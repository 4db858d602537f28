"""Where does the benign / malignant evidence sit in GlaS: in the glands, in the stroma, in the glands' outline?

Lesson 7 of docs/glas.md explains why min-max ranks pixels no better than WILDCAT on GlaS: the stroma is as
class-specific as the glands, so X- (the image outside the mask) keeps evidence and the max-entropy term,
which asks the classifier to be unsure on X-, cannot be satisfied by any mask.  That explanation was never
measured (lesson 23).  This script measures it on the real images, using the gland masks (train and valid
only) to build what X+ and X- would be under a *perfect* mask, and trains the image classifier of WILDCAT
alone (the default budget: 20 epochs of 224 px crops) on each:

``glands``
    X+ of a perfect mask: the gland pixels, everything else the fill value of X+ / X- (0 in normalised pixel
    space = grey 128 for EfficientNet-Lite0).
``stroma``
    X- of a perfect mask: gland pixels grey.  Carries the stroma's texture *and* the glands' outline.
``stroma16``
    X- of a perfect mask at the model's map resolution: the gland fraction of each 16 px cell, upsampled
    bilinearly and made pseudo-binary with the default w 8 / sigma 0.5, as ``MinMaxNet`` builds X-.
``silhouette``
    The outline alone: gland pixels grey, the rest one flat colour (the mean stroma colour of the train
    images).  No texture at all; if this classifies, the mask's shape gives the class away.

For each variant and seed it reports the valid classification error, and with ``--report`` it scores the
``glands`` classifier (trained on perfect X+) on the ``stroma`` / ``stroma16`` valid images, which is what the
max-entropy term sees with a perfect mask: its mean entropy and its mean cross-entropy to the uniform
answer (the term itself; both are ln 2 = 0.693 for a uniform prediction), and how often it still names the
right class.

Usage (about 5-8 min per run on one core; runs are independent, so run two side by side)::

    .venv/bin/python tools/experiments/glas_evidence.py --prepare
    for v in glands stroma stroma16 silhouette; do for s in 0 1; do echo "--variant $v --seed $s"; done; done |
        xargs -P 2 -L 1 .venv/bin/python tools/experiments/glas_evidence.py
    .venv/bin/python tools/experiments/glas_evidence.py --report

Reads train and valid masks; never reads test images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

VARIANTS = ("glands", "stroma", "stroma16", "silhouette")
GREY = 128  # 0 in normalised pixel space (mean 0.5, std 0.5): the fill of X+ and X-


def map_mask(
    gt: np.ndarray, stride: int | None = None, w: float | None = None, sigma: float | None = None
) -> np.ndarray:
    """A perfect mask as ``MinMaxNet`` would draw it: gland fraction per cell, bilinear, sigmoid(w (m - sigma)).

    Parameters
    ----------
    gt
        Gland mask ``bool (H, W)``.
    stride, w, sigma
        Map stride and the pseudo-binary mask's sharpness and threshold (default: ``ModelConfig()``'s).

    Returns
    -------
    numpy.ndarray
        ``float (H, W)`` in (0, 1).
    """
    import torch
    import torch.nn.functional as F

    from wsltool.config import ModelConfig
    from wsltool.models.minmax import pseudo_binary

    cfg = ModelConfig()
    stride = stride or cfg.output_stride
    t = torch.from_numpy(gt.astype(np.float32))[None, None]
    h, w_ = gt.shape
    cells = F.adaptive_avg_pool2d(t, (math.ceil(h / stride), math.ceil(w_ / stride)))
    up = F.interpolate(cells, size=(h, w_), mode="bilinear", align_corners=False)
    return pseudo_binary(up, cfg.w if w is None else w, cfg.sigma if sigma is None else sigma)[0, 0].numpy()


def variant_image(img: np.ndarray, gt: np.ndarray, variant: str, flat: np.ndarray) -> np.ndarray:
    """The image as seen under a perfect mask (see the module docstring).

    Parameters
    ----------
    img
        ``uint8 (H, W, 3)``.
    gt
        Gland mask ``bool (H, W)``.
    variant
        One of ``VARIANTS``.
    flat
        The flat colour of ``silhouette`` (``uint8 (3,)``).

    Returns
    -------
    numpy.ndarray
        ``uint8 (H, W, 3)``.
    """
    x = img.astype(np.float32) - GREY  # normalised space, up to the scale
    if variant == "glands":
        m = gt.astype(np.float32)
    elif variant == "stroma":
        m = 1.0 - gt.astype(np.float32)
    elif variant == "stroma16":
        m = (1.0 - map_mask(gt)).astype(np.float32)
    elif variant == "silhouette":
        x = np.broadcast_to(flat.astype(np.float32) - GREY, img.shape).copy()
        m = 1.0 - gt.astype(np.float32)
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    return np.clip(np.rint(x * m[..., None] + GREY), 0, 255).astype(np.uint8)


def _items(data: Path) -> list[Any]:
    from wsltool.train.glas import glas_items

    return [it for it in glas_items(data) if it.split in ("train", "valid")]


def prepare(data: Path, work: Path) -> None:
    """Write every variant of the train and valid images under ``work/<variant>/``."""
    from PIL import Image

    from wsltool.train.data import find_mask, read_image, read_mask

    items = _items(data)
    pairs = []
    for it in items:
        mp = find_mask(it)
        assert mp is not None, it.path
        img = read_image(it.path)
        pairs.append((it, img, read_mask(mp, img.shape[:2])))
    stroma_px = np.concatenate([img[~gt] for it, img, gt in pairs if it.split == "train"])
    flat = np.rint(stroma_px.mean(0)).astype(np.uint8)
    for v in VARIANTS:
        (work / v).mkdir(parents=True, exist_ok=True)
        for it, img, gt in pairs:
            Image.fromarray(variant_image(img, gt, v, flat)).save(work / v / f"{it.path.stem}.png")
    (work / "flat.json").write_text(json.dumps({"flat": flat.tolist()}))
    print(f"wrote {len(VARIANTS)} x {len(pairs)} images under {work} (silhouette colour {flat.tolist()})")


def variant_items(data: Path, work: Path, variant: str) -> list[Any]:
    """The train / valid items with their image swapped for the variant's (the mask column keeps the original)."""
    import dataclasses

    from wsltool.train.data import find_mask

    return [
        dataclasses.replace(it, path=work / variant / f"{it.path.stem}.png", mask=find_mask(it)) for it in _items(data)
    ]


def train_one(data: Path, work: Path, variant: str, seed: int, epochs: int) -> None:
    """Train WILDCAT alone on one variant; write ``work/runs/<variant>_seed<seed>/result.json``."""
    import torch

    from wsltool.config import ModelConfig, TrainConfig
    from wsltool.evaluate import evaluate
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.glas import GLAS_CLASSES
    from wsltool.train.loop import fit

    torch.set_num_threads(1)
    items = variant_items(data, work, variant)
    train = [it for it in items if it.split == "train"]
    valid = [it for it in items if it.split == "valid"]
    out = work / "runs" / f"{variant}_seed{seed}"
    res = fit(
        train,
        valid,
        GLAS_CLASSES,
        ModelConfig(method="wildcat"),
        TrainConfig(epochs=epochs, seed=seed, num_threads=1),
        out,
        progress=False,
    )
    model, _ = load_checkpoint(res.best, class_names=GLAS_CLASSES)
    _, summary = evaluate(model, valid, GLAS_CLASSES)
    result = {"variant": variant, "seed": seed, "best_epoch": res.best_epoch, "error": summary["error"]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def _entropy(rows: list[dict]) -> tuple[float, float]:
    """Mean binary entropy and mean cross-entropy to uniform (the max-entropy term; nats) of the predictions."""
    p = np.clip(np.array([r["p_pred"] for r in rows]), 1e-7, 1 - 1e-7)
    h = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    return float(h.mean()), float((-0.5 * (np.log(p) + np.log(1 - p))).mean())


def report(data: Path, work: Path) -> None:
    """Print the error per variant and seed, and the ``glands`` classifiers scored on X- of a perfect mask."""
    from wsltool.evaluate import evaluate
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.glas import GLAS_CLASSES

    print("| variant | seed | valid error % | best epoch |")
    print("|---|---|---|---|")
    for p in sorted((work / "runs").glob("*/result.json")):
        r = json.loads(p.read_text())
        print(f"| {r['variant']} | {r['seed']} | {r['error']:.1f} | {r['best_epoch'] + 1} |")
    print("\nClassifier trained on perfect X+ (`glands`), applied to the valid images of:")
    print("| trained on | seed | applied to | error % | mean entropy | mean cross-entropy to uniform (nats) |")
    print("|---|---|---|---|---|---|")
    for ck in sorted((work / "runs").glob("glands_seed*/best.pt")):
        model, _ = load_checkpoint(ck, class_names=GLAS_CLASSES)
        for v in ("glands", "stroma", "stroma16"):
            valid = [it for it in variant_items(data, work, v) if it.split == "valid"]
            rows, summary = evaluate(model, valid, GLAS_CLASSES)
            h, ce = _entropy(rows)
            seed = ck.parent.name.rsplit("seed", 1)[1]
            print(f"| glands | {seed} | {v} | {summary['error']:.1f} | {h:.3f} | {ce:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data" / "glas")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glas_evidence"))
    ap.add_argument("--prepare", action="store_true", help="write the variant images and exit")
    ap.add_argument("--report", action="store_true", help="print the tables of the finished runs and exit")
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.data, args.work)
    elif args.report:
        report(args.data, args.work)
    elif args.variant:
        train_one(args.data, args.work, args.variant, args.seed, args.epochs)
    else:
        ap.error("give --prepare, --report or --variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
