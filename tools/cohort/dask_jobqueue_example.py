"""Run a cohort on a Slurm cluster through dask-jobqueue: Slurm jobs become Dask workers, one slide per task.

Usage (on a login node, or in a small long-running job; it submits the worker jobs itself)::

    pip install dask-jobqueue
    python tools/cohort/dask_jobqueue_example.py cohort.csv /scratch/run1 model.pt --jobs 8 --cpus 8 \\
        --memory 32GB --walltime 04:00:00 --partition cpu --venv /path/to/venv

Each Slurm job runs one Dask worker process with one task slot (one slide at a time) and ``--cpus``
CPUs for torch (and ``--gpus`` GPUs).  Workers are started non-daemonic
(``DASK_DISTRIBUTED__WORKER__DAEMON=False``) so that each slide can use DataLoader reader processes.
Jobs can die or hit their wall time: Dask re-runs the slide on another worker, and because slides resume
from their half-written store and skip finished ones, re-running this script after anything goes wrong is
always safe.  For PBS/LSF/SGE use ``PBSCluster``/``LSFCluster``/``SGECluster`` with the same arguments.

Without Dask at all, ``tools/cohort/slurm_array.sh`` runs the same cohort as a plain job array.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def make_cluster(args: argparse.Namespace) -> Any:
    """A ``SLURMCluster`` whose every job is one single-slot Dask worker."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        sys.exit("this example needs dask-jobqueue: pip install dask-jobqueue (https://jobqueue.dask.org)")

    prologue = ["export DASK_DISTRIBUTED__WORKER__DAEMON=False"]  # readers are child processes
    if args.venv:
        prologue.insert(0, f"source {Path(args.venv) / 'bin' / 'activate'}")
    extra = [f"--gres=gpu:{args.gpus}"] if args.gpus else []
    return SLURMCluster(
        cores=1,  # Dask task slots per job: one slide at a time
        processes=1,
        job_cpu=args.cpus,  # CPUs Slurm books for the job (torch threads, reader processes)
        memory=args.memory,
        walltime=args.walltime,
        queue=args.partition,
        account=args.account,
        job_name="wsltool-cohort",
        job_script_prologue=prologue,
        job_extra_directives=extra,
        log_directory=str(Path(args.outdir) / "dask-logs"),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cohort", help="cohort CSV (path column; optional id, mpp)")
    ap.add_argument("outdir", help="output folder on a file system every node sees")
    ap.add_argument("model", help="checkpoint")
    ap.add_argument("--jobs", type=int, default=4, help="Slurm jobs = Dask workers (default 4)")
    ap.add_argument("--cpus", type=int, default=8, help="CPUs per job (default 8)")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per job (default 0)")
    ap.add_argument("--memory", default="32GB", help="memory per job (default 32GB)")
    ap.add_argument("--walltime", default="04:00:00", help="wall time per job (default 04:00:00)")
    ap.add_argument("--partition", default=None, help="Slurm partition")
    ap.add_argument("--account", default=None, help="Slurm account")
    ap.add_argument("--venv", default=None, help="virtual environment to activate in the jobs")
    ap.add_argument("--readers", type=int, default=2, help="reader processes per slide (default 2)")
    ap.add_argument("--retries", type=int, default=1, help="extra attempts for transient failures (default 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from wsltool.cohort import run_cohort
    from wsltool.config import InferConfig

    cluster = make_cluster(args)
    cluster.scale(jobs=args.jobs)
    print(cluster.job_script())
    try:
        summary = run_cohort(
            args.cohort,
            args.outdir,
            args.model,
            InferConfig(workers=args.readers),
            scheduler=cluster.scheduler_address,
            torch_threads=args.cpus,  # Dask starts workers with OMP_NUM_THREADS=1; give torch the job's CPUs
            retries=args.retries,
            progress=True,
        )
    finally:
        cluster.close()
    print(summary.line())
    print(f"results: {args.outdir}/results.csv")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
