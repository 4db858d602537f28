"""``wsltool infer SLIDE -o OUT.zarr --model CKPT``: one slide to a multiscale OME-Zarr heatmap store."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsltool.config import InferConfig


def register(sub: Any) -> None:
    """Add the ``infer`` sub-command."""
    p = sub.add_parser(
        "infer",
        help="localize: slide -> OME-Zarr heatmap store (M+, class maps, mask, tissue, slide score)",
        description="Run the localizer over a slide's tissue and write a multiscale OME-Zarr heatmap store. "
        "An interrupted run resumes when run again; a finished store is kept unless --overwrite.",
    )
    p.add_argument("slide", help="slide file")
    p.add_argument("-o", "--out", required=True, help="output store (OUT.zarr)")
    p.add_argument("--model", required=True, help="checkpoint (.pt) from `wsltool train`")
    p.add_argument("--mpp", type=float, default=None, help="input resolution (default: the checkpoint's)")
    p.add_argument("--slide-mpp", type=float, default=None, help="override the slide's level-0 mpp")
    p.add_argument("--region", type=int, default=None, help="region size in px (default: the checkpoint's)")
    p.add_argument("--overlap", type=int, default=None, help="overlap between regions in px (default: half the region)")
    p.add_argument("--out-factor", type=int, default=4, help="output pixel = N input pixels (default 4)")
    p.add_argument("--batch", type=int, default=8, help="regions per batch (default 8)")
    p.add_argument("--workers", type=int, default=2, help="reader processes (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--no-amp", action="store_true", help="disable float16 autocast on GPU (float32 throughout)")
    p.add_argument("--threshold", type=float, default=0.5, help="M+ threshold of the mask (default 0.5)")
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="slide score = mean of the top-k regions, k counted at half-region overlap and scaled with the "
        "grid's density (default 5)",
    )
    p.add_argument("--chunk", type=int, default=512, help="store chunk side in output px (default 512)")
    add_tta_argument(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace a finished store")
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start an interrupted (incomplete) store over instead of continuing it; a finished one is still "
        "kept unless --overwrite",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_tta_argument(p: Any) -> None:
    """``--tta none|flips|d4`` (shared by ``infer``, ``cohort`` and ``eval``)."""
    p.add_argument(
        "--tta",
        choices=["none", "flips", "d4"],
        default="none",
        help="test-time augmentation: average the maps over 4 (flips) or 8 (d4) flipped/rotated views; "
        "costs that many passes (default none)",
    )


#: The option that sets each :class:`~wsltool.config.InferConfig` field (``workers``: the caller's), so that a
#: value the config refuses is named as the user typed it (``--batch``, not ``InferConfig.batch_size``).
_OPTION_OF_FIELD = {
    "mpp": "--mpp",
    "region": "--region",
    "overlap": "--overlap",
    "out_factor": "--out-factor",
    "batch_size": "--batch",
    "device": "--device",
    "threshold": "--threshold",
    "top_k": "--top-k",
    "chunk": "--chunk",
    "tta": "--tta",
}


def config_from_args(args: argparse.Namespace, *, workers: int, workers_option: str = "--workers") -> InferConfig:
    """The :class:`~wsltool.config.InferConfig` of the inference options shared by ``infer`` and ``cohort``.

    Parameters
    ----------
    args
        Parsed options of ``infer`` or ``cohort infer``.
    workers
        Reader processes per slide.
    workers_option
        The option ``workers`` came from (``--workers`` for ``infer``, ``--readers`` for ``cohort infer``).

    Raises
    ------
    ConfigError
        A value out of range, named by its option.
    """
    from wsltool.config import InferConfig
    from wsltool.errors import ConfigError

    try:
        return InferConfig(
            mpp=args.mpp,
            region=args.region,
            overlap=args.overlap,
            out_factor=args.out_factor,
            batch_size=args.batch,
            workers=workers,
            device=args.device,
            amp=not args.no_amp,
            threshold=args.threshold,
            top_k=args.top_k,
            chunk=args.chunk,
            tta=args.tta,
        )
    except ConfigError as exc:
        options = {**_OPTION_OF_FIELD, "workers": workers_option}
        msg = re.sub(r"\bInferConfig\.(\w+)", lambda m: options.get(m.group(1), m.group(0)), str(exc))
        raise ConfigError(msg) from exc


def run(args: argparse.Namespace) -> int:
    """Run inference and print the one-line summary."""
    from wsltool.infer.run import infer_slide

    cfg = config_from_args(args, workers=args.workers)
    res = infer_slide(
        args.slide,
        args.out,
        args.model,
        cfg,
        slide_mpp=args.slide_mpp,
        overwrite=args.overwrite,
        resume=not args.no_resume,
        progress=not args.quiet,
    )
    print(res.summary(args.slide))
    return 0
