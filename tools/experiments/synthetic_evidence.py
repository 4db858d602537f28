"""Does min-max rank pixels above WILDCAT when the evidence sits only in the lesion, and not when it is everywhere?

The method's argument (method.md): WILDCAT's map finds the most discriminative part of a lesion; min-max asks
the classifier to be unsure on X-, the image outside the mask, so the mask must take *all* the evidence and
becomes complete.  On GlaS the two rank pixels alike (docs/glas.md, lessons 19-22), and lesson 24 measured
that GlaS's evidence is not only in the glands.  This experiment builds both situations with the same
lesions, so the difference between them is only where the evidence sits:

``object``
    H&E-like synthetic tissue (``wsltool.testing.slides``' colours); a malignant image has one or two
    lesions whose nuclei grade from almost benign at the rim to crowded, large and dark in the core (the
    rim is the weak evidence WILDCAT can leave out); benign images have none.  The stroma is the same in
    both classes.
``both``
    The same images, except that the stroma of malignant images also carries sparse small dark cells
    (four times the benign density): evidence outside the lesion, as GlaS's stroma (lesson 24).

Each image is 192 px; 48 train (24 per class), 16 valid (checkpoint selection without masks, as users
train), 32 test images; scored on the 16 malignant test images (benign images have no lesion, and M+ is
normalised per image): PxAP, pixel AUC, F1+ / F1- at 0.5, mask area; classification error on all 32.  The
model is the GlaS default (EfficientNet-Lite0, ImageNet weights, frozen BatchNorm, stride 16, warm-up half
the run) without its size prior (``size_prior="none"``: the default's [0.35, 0.65] of every crop is the glands'
share on GlaS, not a lesion's), against WILDCAT alone, same budget (16 epochs of 160 px crops).  The data are drawn from
``--data-seed`` (fixed), the training from ``--seed``.

Usage (about 2-3 min per run on one core)::

    .venv/bin/python tools/experiments/synthetic_evidence.py --prepare
    for c in object both; do for m in minmax wildcat; do for s in 0 1 2 3 4 5 6 7; do
        echo "--condition $c --method $m --seed $s"; done; done; done |
        xargs -P 2 -L 1 .venv/bin/python tools/experiments/synthetic_evidence.py
    .venv/bin/python tools/experiments/glas_paired.py --a '/tmp/synth_ev/runs/object_minmax_seed*' \\
        --b '/tmp/synth_ev/runs/object_wildcat_seed*'      # and the same for "both"
    .venv/bin/python tools/experiments/synthetic_evidence.py --condition object --seed 3 \\
        --overlay docs/img/synthetic_evidence_object_seed3.jpg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

CONDITIONS = ("object", "both")
SPLITS = {"train": 48, "valid": 16, "test": 32}
CLASSES = ("benign", "malignant")
BENIGN_NUCLEUS = ((120.0, 70.0, 160.0), 2.4)  # colour, radius (as wsltool.testing.slides' benign nuclei)
MALIGNANT_NUCLEUS = ((70.0, 30.0, 110.0), 3.6)


def synthetic_image(size: int, seed: int, malignant: bool, condition: str) -> tuple[np.ndarray, np.ndarray]:
    """One image and its lesion mask.

    Parameters
    ----------
    size
        Side in pixels.
    seed
        Seed of everything drawn; the same seed gives the same lesions and nuclei in both conditions (only
        the malignant stroma's small dark cells and the pixel noise differ).
    malignant
        Whether the image has lesions (and, in ``both``, malignant stroma).
    condition
        ``object`` or ``both`` (see the module docstring).

    Returns
    -------
    (rgb, lesion)
        ``uint8 (size, size, 3)`` and ``bool (size, size)``.
    """
    from PIL import Image
    from scipy import ndimage as ndi

    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; one of {CONDITIONS}")
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (size // 16 + 2, size // 16 + 2)).astype(np.float32)
    low = np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC))
    img = np.stack([225 + 8 * low, 150 + 10 * low, 190 + 8 * low], axis=-1)
    lesion = np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n_lesions = int(rng.integers(1, 3))
    for _ in range(n_lesions):  # drawn for benign images too, so both classes consume the same random stream
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.14, 0.22, 2) * size
        ang = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / rx
        v = (-(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)) / ry
        if malignant:
            lesion |= u * u + v * v < 1
    # grade: 0.25 at the lesion's rim (weak evidence), rising to 1 at half its depth and inward
    depth = ndi.distance_transform_edt(lesion)
    grade = np.zeros((size, size), np.float32)
    if lesion.any():
        grade = np.where(lesion, 0.25 + 0.75 * np.clip(depth / (0.5 * depth.max() + 1e-6), 0, 1), 0)
    # nuclei on a jittered 8 px grid: benign stroma keeps a third of them (a 14 px spacing), a lesion more
    spacing = 8.0
    g = np.arange(spacing / 2, size, spacing)
    cy_, cx_ = np.meshgrid(g, g, indexing="ij")
    cy_ = cy_ + rng.uniform(-0.35, 0.35, cy_.shape) * spacing
    cx_ = cx_ + rng.uniform(-0.35, 0.35, cx_.shape) * spacing
    keep_u = rng.uniform(0, 1, cy_.shape)
    r_jit = rng.uniform(-0.3, 0.3, cy_.shape)
    (c0, r0), (c1, r1) = BENIGN_NUCLEUS, MALIGNANT_NUCLEUS
    for y0, x0, ku, rj in zip(cy_.ravel(), cx_.ravel(), keep_u.ravel(), r_jit.ravel(), strict=True):
        a = float(grade[int(np.clip(y0, 0, size - 1)), int(np.clip(x0, 0, size - 1))])
        if ku > 0.33 + 0.67 * a:
            continue
        r = r0 + (r1 - r0) * a + rj
        col = np.array(c0) + (np.array(c1) - np.array(c0)) * a
        sub = (yy - y0) ** 2 + (xx - x0) ** 2 < r * r
        img[sub] = col
    # small dark cells in the stroma: sparse in benign images; in "both", four times denser in malignant ones
    n_cells = rng.poisson(15, 1)[0]
    extra = rng.poisson(45, 1)[0]
    if condition == "both" and malignant:
        n_cells += extra
    pos = rng.uniform(0, size, (n_cells, 2))
    for y0, x0 in pos:
        if lesion[int(y0), int(x0)]:
            continue
        img[(yy - y0) ** 2 + (xx - x0) ** 2 < 2.0**2] = (40.0, 15.0, 55.0)
    img = img + rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lesion


def prepare(work: Path, data_seed: int, size: int = 192) -> None:
    """Write both conditions' images, masks (``<name>_anno.png``) and ``labels.csv`` under ``work/<condition>``."""
    from PIL import Image

    for cond in CONDITIONS:
        d = work / cond
        d.mkdir(parents=True, exist_ok=True)
        rows = ["path,label,split"]
        k = 0
        for split, n in SPLITS.items():
            for i in range(n):
                malignant = i % 2 == 1
                rgb, les = synthetic_image(size, data_seed * 100_000 + k, malignant, cond)
                name = f"{split}_{i:03d}"
                Image.fromarray(rgb).save(d / f"{name}.png")
                Image.fromarray(les.astype(np.uint8) * 255).save(d / f"{name}_anno.png")
                rows.append(f"{name}.png,{CLASSES[int(malignant)]},{split}")
                k += 1
        (d / "labels.csv").write_text("\n".join(rows) + "\n")
    print(f"wrote {sum(SPLITS.values())} images per condition under {work}")


def run_dir(work: Path, condition: str, method: str, seed: int, tag: str = "") -> Path:
    """A run's folder: ``work/runs/<condition>_[<tag>_]<method>_seed<seed>``."""
    return work / "runs" / f"{condition}_{tag + '_' if tag else ''}{method}_seed{seed}"


def run_one(
    work: Path,
    condition: str,
    method: str,
    seed: int,
    epochs: int,
    crop: int,
    overrides: dict | None = None,
    tag: str = "",
) -> dict:
    """Train one model on a condition's train split; score it on the malignant test images.

    ``overrides`` are ``ModelConfig`` fields set for both methods (e.g. ``kmax``); ``tag`` goes into the run
    folder's name (:func:`run_dir`).
    """
    import torch

    from wsltool.config import ModelConfig, TrainConfig
    from wsltool.evaluate import evaluate
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.labels import read_labels
    from wsltool.train.loop import fit

    torch.set_num_threads(1)
    items = read_labels(work / condition / "labels.csv", class_names=CLASSES)
    by = {s: [it for it in items if it.split == s] for s in SPLITS}
    out = run_dir(work, condition, method, seed, tag)
    # the GlaS default without its size prior: [0.35, 0.65] of every crop is GlaS's gland share, not a lesion's
    base: dict = {"size_prior": "none"} if method == "minmax" else {"method": "wildcat"}
    mcfg = ModelConfig(**{**base, **(overrides or {})})
    res = fit(
        by["train"],
        by["valid"],
        CLASSES,
        mcfg,
        TrainConfig(epochs=epochs, crop=crop, seed=seed, num_threads=1),
        out,
        progress=False,
    )
    model, _ = load_checkpoint(res.best, class_names=CLASSES)
    _, all_test = evaluate(model, by["test"], CLASSES)
    _, mal = evaluate(model, [it for it in by["test"] if it.label == "malignant"], CLASSES)
    result = {k: mal[k] for k in ("pxap", "pixel_auc", "f1_pos", "f1_neg", "area", "gt_area")}
    result.update({"error": all_test["error"], "condition": condition, "method": method, "best_epoch": res.best_epoch})
    result["train"] = {"seed": seed, "epochs": epochs, "crop": crop}
    result["overrides"] = overrides or {}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "train"}))
    return result


def overlay(work: Path, condition: str, seed: int, out: Path, tag: str = "", n: int = 3) -> None:
    """``image | lesion | M+ of min-max | M+ of WILDCAT`` for the first ``n`` malignant test images (one seed)."""
    import torch
    from PIL import Image

    from wsltool.evaluate import jet
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.data import find_mask, read_image, read_mask
    from wsltool.train.labels import read_labels

    items = read_labels(work / condition / "labels.csv", class_names=CLASSES)
    mal = [it for it in items if it.split == "test" and it.label == "malignant"][:n]
    models: list[Any] = [  # MinMaxNet / BaselineNet: nn.Modules with localize()
        load_checkpoint(run_dir(work, condition, m, seed, tag) / "best.pt", class_names=CLASSES)[0]
        for m in ("minmax", "wildcat")
    ]
    rows = []
    for it in mal:
        img = read_image(it.path)
        mp = find_mask(it)
        assert mp is not None, it.path
        gt = read_mask(mp, img.shape[:2])
        row = [img, np.repeat(255 * gt[..., None].astype(np.uint8), 3, axis=2)]
        for model in models:
            with torch.inference_mode():
                o = model.localize(torch.from_numpy(img.copy()).permute(2, 0, 1)[None], size=img.shape[:2])
            row.append((255 * jet(np.clip(o["mplus"][0].numpy(), 0, 1))).astype(np.uint8))
        rows.append(np.concatenate(row, axis=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, quality=85)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/synth_ev"))
    ap.add_argument("--prepare", action="store_true", help="write both conditions' images and exit")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument(
        "--size",
        type=int,
        default=192,
        help="image side for --prepare (lesions scale with it; nuclei and the count of dark cells do not)",
    )
    ap.add_argument("--condition", choices=CONDITIONS)
    ap.add_argument("--method", choices=("minmax", "wildcat"), default="minmax")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--crop", type=int, default=160)
    ap.add_argument("--set", action="append", default=[], help="ModelConfig field for both methods, key=value")
    ap.add_argument("--tag", default="", help="run-name tag for runs with --set")
    ap.add_argument("--overlay", type=Path, help="write the overlay figure of --condition / --seed here and exit")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.work, args.data_seed, args.size)
    elif args.overlay and args.condition:
        overlay(args.work, args.condition, args.seed, args.overlay, args.tag)
    elif args.condition:
        from wsltool.config import parse_value

        sets = {k: parse_value(v) for k, _, v in (kv.partition("=") for kv in args.set)}
        run_one(args.work, args.condition, args.method, args.seed, args.epochs, args.crop, sets, args.tag)
    else:
        ap.error("give --prepare or --condition")
    return 0


if __name__ == "__main__":
    sys.exit(main())
