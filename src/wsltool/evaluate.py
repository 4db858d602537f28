"""Evaluation of image-level localization: classification error, F1+/F1-, chance level, PxAP, pixel AUC.

Per image (then averaged over images, x100): F1+ = Dice(mask, gland), F1- = Dice(1 - mask, 1 - gland), with
mask = (per-image normalised M+ >= threshold); the mask area and the *chance* Dice at that area (the expected
Dice of a random mask with the same area: ``2 a g / (a + g)`` for F1+, the same with ``1 - a, 1 - g`` for F1-).
Threshold-free: PxAP (average precision of the pixels, pooled over the data set, as Choe et al. CVPR 2020)
and the pooled pixel ROC AUC of M+.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsltool.errors import DataError
from wsltool.train.labels import LabeledItem

log = logging.getLogger(__name__)

BINS = 1000


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    s = int(pred.sum()) + int(gt.sum())
    if s == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / s


def chance_dice(area: float, gt_area: float) -> float:
    """Expected Dice of a random mask covering ``area`` of the image against a mask covering ``gt_area``."""
    if area + gt_area == 0:
        return 1.0
    return 2.0 * area * gt_area / (area + gt_area)


@dataclass
class PixelCurve:
    """Histogram accumulator of heatmap values for positives and negatives (pooled PxAP and ROC AUC)."""

    pos: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))

    def add(self, heat: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``heat`` in [0, 1], ``gt`` boolean, same shape."""
        b = np.clip((heat * BINS).astype(np.int64), 0, BINS - 1)
        self.pos += np.bincount(b[gt], minlength=BINS)
        self.neg += np.bincount(b[~gt], minlength=BINS)

    def auc(self) -> float:
        """Area under the ROC curve (ties within a bin count half)."""
        p, n = self.pos[::-1].astype(float), self.neg[::-1].astype(float)
        if p.sum() == 0 or n.sum() == 0:
            return float("nan")
        cn = np.cumsum(n) - n  # negatives strictly above each bin
        return float(((p * (n.sum() - cn - n)).sum() + 0.5 * (p * n).sum()) / (p.sum() * n.sum()))

    def ap(self) -> float:
        """Average precision (sum over thresholds of precision x recall increment)."""
        p, n = self.pos[::-1].astype(float), self.neg[::-1].astype(float)
        if p.sum() == 0:
            return float("nan")
        tp, fp = np.cumsum(p), np.cumsum(n)
        prec = tp / np.maximum(tp + fp, 1)
        return float((prec * p / p.sum()).sum())


def image_metrics(mplus: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """F1+, F1-, mask area, gland area and chance levels for one image (fractions, not x100)."""
    pred = mplus >= threshold
    a, g = float(pred.mean()), float(gt.mean())
    return {
        "f1_pos": dice(pred, gt),
        "f1_neg": dice(~pred, ~gt),
        "area": a,
        "gt_area": g,
        "chance_pos": chance_dice(a, g),
        "chance_neg": chance_dice(1 - a, 1 - g),
    }


def jet(v: np.ndarray) -> np.ndarray:
    """The jet colour map: heat ``(H, W)`` in [0, 1] -> RGB ``(H, W, 3)`` in [0, 1] (0 dark blue, 1 dark red)."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], -1)


def overlay_png(
    img: np.ndarray, gt: np.ndarray | None, heat: np.ndarray, mask: np.ndarray, path: Path, scale: float = 0.5
) -> None:
    """Write ``image | ground truth | heatmap | mask`` side by side as a PNG (downscaled by ``scale``)."""
    from PIL import Image

    f = img.astype(np.float32) / 255
    panels = [f]
    if gt is not None:
        panels.append(np.where(gt[..., None], f * 0.5 + np.array([0, 0.5, 0]), f * 0.4))
    panels.append(0.45 * f + 0.55 * jet(heat))
    panels.append(np.where(mask[..., None], f * 0.5 + np.array([0.5, 0, 0]), f * 0.4))
    sep = np.ones((f.shape[0], 6, 3), np.float32)
    row = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
    im = Image.fromarray((np.clip(row, 0, 1) * 255).astype(np.uint8))
    if scale != 1:
        im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, optimize=True)


def evaluate(
    model: Any,
    items: Sequence[LabeledItem],
    class_names: Sequence[str],
    *,
    threshold: float | None = None,
    out_dir: str | Path | None = None,
    overlays: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate a model (anything with ``localize``) on labelled images, with masks when they exist.

    Parameters
    ----------
    model
        Model in eval mode, on ``device``.
    items
        Labelled images; masks are found by :func:`wsltool.train.data.find_mask`.
    class_names
        Class order of the model.
    threshold
        Mask threshold on the normalised M+ (default: the model's ``cfg.threshold``, else 0.5).
    out_dir
        When given: ``metrics.csv`` (per image), ``summary.csv`` and ``overlays/`` are written there, as one
        set and only once every item was evaluated: an earlier evaluation's three are replaced together (its
        overlays too, so none is left beside another model's metrics), and a failed one leaves them as they
        were.
    overlays
        Number of overlay images (first N items with a mask).
    device
        Device of the model.
    progress
        Show a progress bar.

    Returns
    -------
    (rows, summary)
        Per-image rows and the summary: ``error``, ``f1_pos``, ``f1_neg``, ``area``, ``chance_pos``,
        ``chance_neg`` (x100, means over images with masks), ``pxap``, ``pixel_auc`` (x100), ``n``,
        ``n_masks``, ``images_per_s``.
    """
    if threshold is None:
        threshold = float(getattr(getattr(model, "cfg", None), "threshold", 0.5))
    out = Path(out_dir) if out_dir is not None else None
    stage = out / ".overlays.partial" if out is not None and overlays > 0 else None  # renamed once complete
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    try:
        rows, summary = _evaluate_items(model, items, class_names, threshold, stage, overlays, device, progress)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if out is not None:
        _write_results(out, rows, summary, stage)
    return rows, summary


def _evaluate_items(
    model: Any,
    items: Sequence[LabeledItem],
    class_names: Sequence[str],
    threshold: float,
    stage: Path | None,
    overlays: int,
    device: str,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The loop of :func:`evaluate`: per-image rows and the summary; overlays go to ``stage``."""
    import torch
    from tqdm import tqdm

    from wsltool.train.data import find_mask, read_image, read_mask

    curve = PixelCurve()
    rows: list[dict[str, Any]] = []
    n_over = 0
    t0 = time.perf_counter()
    for it in tqdm(items, disable=not progress, desc="eval", unit="img"):
        img = read_image(it.path)
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].to(device)
        with torch.inference_mode():
            o = model.localize(x, size=img.shape[:2])
        probs = o["probs"][0].cpu().numpy()
        heat = o["mplus"][0].cpu().numpy()
        pred = int(probs.argmax())
        if it.label not in class_names:
            msg = f"{it.path}: label {it.label!r} is not one of the model's classes {list(class_names)}"
            raise DataError(msg)
        row: dict[str, Any] = {
            "path": str(it.path),
            "label": it.label,
            "pred": class_names[pred],
            "p_pred": float(probs[pred]),
            "correct": int(class_names[pred] == it.label),
        }
        mp = find_mask(it)
        if mp is not None:
            gt = read_mask(mp, img.shape[:2])
            row.update(image_metrics(heat, gt, threshold))
            curve.add(heat, gt)
            if stage is not None and n_over < overlays:
                overlay_png(img, gt, heat, heat >= threshold, stage / f"{it.path.stem}.png")
                n_over += 1
        rows.append(row)
    dt = time.perf_counter() - t0
    with_mask = [r for r in rows if "f1_pos" in r]
    summary: dict[str, Any] = {
        "n": len(rows),
        "n_masks": len(with_mask),
        "error": 100.0 * (1 - np.mean([r["correct"] for r in rows])) if rows else float("nan"),
        "threshold": threshold,
        "images_per_s": len(rows) / dt if dt > 0 else float("nan"),
    }
    for k in ("f1_pos", "f1_neg", "area", "gt_area", "chance_pos", "chance_neg"):
        summary[k] = 100.0 * float(np.mean([r[k] for r in with_mask])) if with_mask else float("nan")
    summary["pxap"] = 100.0 * curve.ap() if with_mask else float("nan")
    summary["pixel_auc"] = 100.0 * curve.auc() if with_mask else float("nan")
    return rows, summary


def _write_results(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], stage: Path | None) -> None:
    """Write ``metrics.csv`` and ``summary.csv`` (each renamed into place) and move ``stage`` to ``overlays``."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "metrics.csv.tmp").open("w", newline="", encoding="utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    with (out / "summary.csv.tmp").open("w", newline="", encoding="utf-8") as fh:
        wr2 = csv.writer(fh)
        wr2.writerow(list(summary))
        wr2.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in summary.values()])
    final = out / "overlays"
    if final.exists():
        log.info("%s: replacing an earlier evaluation's overlays", final)
        shutil.rmtree(final)
    if stage is not None and stage.exists():
        stage.rename(final)
    os.replace(out / "metrics.csv.tmp", out / "metrics.csv")
    os.replace(out / "summary.csv.tmp", out / "summary.csv")


def format_summary(summary: dict[str, Any]) -> str:
    """One-table text rendering of a summary (for the CLI)."""
    cols = [
        ("error", "error %"),
        ("f1_pos", "F1+"),
        ("f1_neg", "F1-"),
        ("area", "area %"),
        ("chance_pos", "chance F1+"),
        ("chance_neg", "chance F1-"),
        ("pxap", "PxAP"),
        ("pixel_auc", "pixel AUC"),
    ]
    head = " | ".join(f"{t:>10}" for _, t in cols)
    vals = " | ".join(f"{summary.get(k, float('nan')):10.2f}" for k, _ in cols)
    return f"{head}\n{vals}\n(n = {summary['n']}, with masks {summary['n_masks']}, threshold {summary['threshold']})"
