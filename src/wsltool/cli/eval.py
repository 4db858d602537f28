"""``wsltool eval --labels labels.csv --model best.pt``: error, F1+/F1-, chance, PxAP, pixel AUC, overlays."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add the ``eval`` sub-command."""
    from wsltool.cli.infer import add_tta_argument

    p = sub.add_parser("eval", help="evaluate a checkpoint on labelled images with masks (<name>_anno.png)")
    p.add_argument("--labels", required=True, help="labels CSV (path,label[,split][,mask]) or a GlaS folder")
    p.add_argument("--model", required=True, help="checkpoint (.pt) written by wsltool train")
    p.add_argument("--split", default=None, help="evaluate only rows of this split (e.g. valid)")
    p.add_argument("--out", default=None, help="folder for metrics.csv, summary.csv and overlays")
    p.add_argument("--overlays", type=int, default=0, help="overlay images for the first N items (needs --out)")
    p.add_argument("--threshold", type=float, default=None, help="mask threshold on M+ (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_tta_argument(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table."""
    import torch

    from wsltool.device import resolve_device
    from wsltool.errors import ConfigError, LabelsError
    from wsltool.evaluate import evaluate, format_summary
    from wsltool.models.ensemble import with_tta
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.glas import glas_items
    from wsltool.train.labels import read_labels
    from wsltool.train.rundir import check_out_folder

    if args.overlays and args.out is None:
        msg = "--overlays needs --out (the folder the overlay images go to)"
        raise ConfigError(msg)
    if args.out is not None:
        check_out_folder(args.out)  # before any image is evaluated
    device = str(resolve_device(args.device))
    src = Path(args.labels)
    items = glas_items(src) if src.is_dir() else read_labels(src)
    model, meta = load_checkpoint(args.model, map_location=device)
    model = with_tta(model, args.tta)
    names = meta["class_names"]
    unknown = sorted({it.label for it in items} - set(names))
    if unknown:
        raise LabelsError(src, [f"label {u!r} is not one of the checkpoint's classes {names}" for u in unknown])
    if args.split is not None:
        items = [it for it in items if it.split == args.split]
        if not items:
            raise LabelsError(src, [f"split {args.split!r} has no item"])
    with torch.inference_mode():
        _, summary = evaluate(
            model,
            items,
            names,
            threshold=args.threshold,
            out_dir=args.out,
            overlays=args.overlays,
            device=device,
            progress=not (args.json or args.no_progress),
        )
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
