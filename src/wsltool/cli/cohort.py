"""``wsltool cohort infer COHORT.csv -o OUTDIR --model CKPT``: many slides, on Dask or as a shard."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``cohort`` sub-command group."""
    p = sub.add_parser("cohort", help="batch runs over slide cohorts (Dask distributed or job-array shards)")
    csub = p.add_subparsers(dest="cohort_command", metavar="ACTION", required=True)
    q = csub.add_parser(
        "infer",
        help="infer every slide of COHORT.csv into OUTDIR/<slide-id>.zarr, with OUTDIR/results.csv",
        description="One task per slide. Finished slides are skipped, half-done ones resume, failures are "
        "recorded and do not stop the cohort. Default: a Dask LocalCluster sized to this machine.",
    )
    q.add_argument("cohort", help="CSV with a 'path' column (optional 'id', 'mpp'); paths relative to the CSV")
    q.add_argument("-o", "--out", required=True, help="output folder")
    q.add_argument("--model", required=True, help="checkpoint")
    q.add_argument("--scheduler", default=None, help="existing Dask scheduler address (tcp://host:8786)")
    q.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes")
    q.add_argument("--shard", default=None, help="run only share i of N (0-based, e.g. 0/4), without Dask")
    q.add_argument("--retries", type=int, default=1, help="extra attempts for transient failures (default 1)")
    q.add_argument("--mpp", type=float, default=None, help="input resolution (default: the checkpoint's)")
    q.add_argument("--overlap", type=int, default=64)
    q.add_argument("--out-factor", type=int, default=8)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--readers", type=int, default=1, help="reader processes per slide (default 1)")
    q.add_argument("--device", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the cohort and print the summary line; exit 1 when any slide failed."""
    from wsltool.cohort import run_cohort
    from wsltool.config import InferConfig

    cfg = InferConfig(
        mpp=args.mpp,
        overlap=args.overlap,
        out_factor=args.out_factor,
        batch_size=args.batch,
        workers=args.readers,
        device=args.device,
    )
    summary = run_cohort(
        args.cohort,
        args.out,
        args.model,
        cfg,
        scheduler=args.scheduler,
        n_workers=args.workers,
        shard_spec=args.shard,
        retries=args.retries,
        progress=not args.quiet,
    )
    print(summary.line())
    print(f"results: {args.out}/results.csv")
    return 1 if summary.failed else 0
