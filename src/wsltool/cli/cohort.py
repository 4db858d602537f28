"""``wsltool cohort infer COHORT.csv -o OUTDIR --model CKPT``: many slides, on Dask or as a shard."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def register(sub: Any) -> None:
    """Add the ``cohort`` sub-command group."""
    p = sub.add_parser("cohort", help="batch runs over slide cohorts (Dask distributed or job-array shards)")
    csub = p.add_subparsers(dest="cohort_command", metavar="ACTION", required=True)
    q = csub.add_parser(
        "infer",
        help="infer every slide of COHORT.csv into OUTDIR/<slide-id>.zarr, with OUTDIR/results.csv",
        description="One task per slide. Finished slides are skipped, half-done ones resume, failures are "
        "recorded and do not stop the cohort (exit status 1 when a slide failed). Default: a Dask LocalCluster "
        "sized to this machine; --scheduler uses an existing Dask cluster; --shard i/N runs one share without "
        "Dask (job arrays). Several runners may work on the same OUTDIR at once. The CSV, the checkpoint and the "
        "options are checked before OUTDIR is created or any slide starts. A finished slide is never replaced: "
        "a later run that fails on it (e.g. another checkpoint) counts it as failed and keeps its result; "
        "delete its store and result file, or use another OUTDIR, to recompute it.",
    )
    q.add_argument("cohort", help="CSV with a 'path' column (optional 'id', 'mpp'); paths relative to the CSV")
    q.add_argument("-o", "--out", required=True, help="output folder")
    q.add_argument("--model", required=True, help="checkpoint")
    q.add_argument("--scheduler", default=None, help="existing Dask scheduler address (tcp://host:8786)")
    q.add_argument(
        "--workers",
        type=int,
        default=None,
        help="LocalCluster worker processes, >= 1 (default: one per GPU, or one per 4 CPU cores)",
    )
    q.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per slide task, >= 1 (default: cores / workers on a LocalCluster)",
    )
    q.add_argument("--shard", default=None, help="run only share i of N (0-based, e.g. 0/4), without Dask")
    q.add_argument("--retries", type=int, default=1, help="extra attempts for transient failures, >= 0 (default 1)")
    q.add_argument("--retry-wait", type=float, default=2.0, help="seconds before retry k, times k, >= 0 (default 2)")
    q.add_argument(
        "--stale-after",
        type=float,
        default=3600.0,
        help="seconds (> 0) after which an unrefreshed lock of "
        "another host is reclaimed (default 3600; locks of dead processes on this host at once)",
    )
    from wsltool.cli.infer import add_tta_argument
    from wsltool.config import InferConfig

    d = InferConfig()  # the same defaults as `wsltool infer`
    q.add_argument("--mpp", type=float, default=None, help="input resolution (default: the checkpoint's)")
    q.add_argument("--region", type=int, default=None, help="region size in px (default: the checkpoint's)")
    q.add_argument(
        "--overlap", type=int, default=d.overlap, help="overlap between regions in px (default: half the region)"
    )
    q.add_argument(
        "--out-factor", type=int, default=d.out_factor, help=f"output pixel = N input pixels (default {d.out_factor})"
    )
    q.add_argument("--batch", type=int, default=d.batch_size, help=f"regions per batch (default {d.batch_size})")
    q.add_argument("--readers", type=int, default=1, help="reader processes per slide (default 1)")
    q.add_argument("--device", default=d.device, help=f"auto | cpu | cuda[:N] (default {d.device})")
    q.add_argument("--no-amp", action="store_true", help="disable float16 autocast on GPU (float32 throughout)")
    q.add_argument(
        "--threshold", type=float, default=d.threshold, help=f"M+ threshold of the mask (default {d.threshold})"
    )
    q.add_argument(
        "--top-k", type=int, default=d.top_k, help=f"slide score = mean of the top-k regions (default {d.top_k})"
    )
    q.add_argument("--chunk", type=int, default=d.chunk, help=f"store chunk side in output px (default {d.chunk})")
    add_tta_argument(q)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=run)


def _quiet_dask() -> None:
    """Dask logs every scheduler, nanny and worker event at INFO: keep its warnings only."""
    import distributed  # noqa: F401  (configures its loggers on import)

    for name in [*logging.root.manager.loggerDict, "distributed"]:
        if name.split(".")[0] in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Run the cohort and print the summary line; exit 1 when any slide failed.

    Bad input (CSV, checkpoint, an option out of range, a malformed ``--scheduler``) raises a ``WslError``
    from :func:`~wsltool.cohort.run_cohort` before anything is written; ``wsltool.cli.main`` prints it as one
    line and exits 2.
    """
    from wsltool.cli.infer import config_from_args
    from wsltool.cohort import run_cohort

    if not getattr(args, "verbose", 0) and args.shard is None:
        _quiet_dask()
    cfg = config_from_args(args, workers=args.readers, workers_option="--readers")
    summary = run_cohort(
        args.cohort,
        args.out,
        args.model,
        cfg,
        scheduler=args.scheduler,
        n_workers=args.workers,
        torch_threads=args.torch_threads,
        shard_spec=args.shard,
        retries=args.retries,
        retry_wait=args.retry_wait,
        stale_after=args.stale_after,
        progress=not args.quiet,
    )
    print(summary.line())
    print(f"results: {args.out}/results.csv")
    return 1 if summary.failed else 0
