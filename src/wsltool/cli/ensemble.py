"""``wsltool ensemble A.pt B.pt ... -o ENS.pt``: one checkpoint whose localization averages several models'."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``ensemble`` sub-command."""
    p = sub.add_parser(
        "ensemble",
        help="combine checkpoints (e.g. the same recipe trained with several seeds) into one averaged model",
        description="The result loads wherever a checkpoint does (infer, eval, cohort, napari); its M+ is the "
        "members' normalised M+ averaged. Inference costs one forward pass per member.",
    )
    p.add_argument("models", nargs="+", help="two or more checkpoints for the same classes and mpp")
    p.add_argument("-o", "--out", required=True, help="ensemble checkpoint to write (an existing file is refused)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the ensemble checkpoint and say what it holds."""
    from wsltool.train.checkpoint import save_ensemble

    meta = save_ensemble(args.out, args.models, overwrite=args.overwrite)
    print(f"{args.out}: {len(meta['ensemble'])} members ({meta['method']}), classes {', '.join(meta['class_names'])}")
    return 0
