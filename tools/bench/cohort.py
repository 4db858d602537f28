"""Cohort benchmark (issue 8): slides per hour, ``wsltool cohort infer`` (Dask LocalCluster) vs a shell loop.

Run: ``.venv/bin/python tools/bench/cohort.py [--slides 8] [--size 2048x3072]``.  Prints figures; asserts
nothing; it reports how far the two ways' heatmaps differ.  Generates a cohort of H&E-like Aperio SVS slides
(half with lesions) and a random-weight EfficientNet-Lite0 checkpoint under ``bench-out/cohort/``, then,
side by side in one run:

1. the loop: ``for s in slides: wsltool infer s -o s.zarr --model ...`` (one process per slide, as users
   write it in a shell), timed from the first start to the last exit;
2. ``wsltool cohort infer cohort.csv -o OUT --model ...`` with its default LocalCluster, timed from start
   to exit (cluster start-up and shutdown included).

Both use the same inference settings (``--mpp 1 --overlap 0 --out-factor 4 --device cpu`` and
``--readers`` reader processes per slide).  On a small CPU machine the gain of the cohort run comes from
paying Python, torch and model start-up once per worker instead of once per slide (and, with several
workers and idle cores, from overlapping one slide's reading, tissue detection and writing with another's
compute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

OUT = Path("bench-out") / "cohort"
SETTINGS = ["--mpp", "1.0", "--overlap", "0", "--out-factor", "4", "--device", "cpu", "--quiet"]


def make_cohort(n: int, h: int, w: int) -> tuple[Path, Path, list[Path]]:
    from wsltool.testing import he_tissue, write_svs
    from wsltool.testing.models import make_checkpoint

    d = OUT / f"slides_{w}x{h}"
    d.mkdir(parents=True, exist_ok=True)
    slides = []
    t0 = time.perf_counter()
    for i in range(n):
        p = d / f"slide{i:02d}.svs"
        if not p.exists():
            c = he_tissue(h, w, seed=100 + i, n_blobs=3, lesion_fraction=0.2 if i % 2 else 0.0)
            write_svs(p.with_suffix(".tmp"), c.rgb, mpp=0.5)
            p.with_suffix(".tmp").replace(p)
        slides.append(p)
    (d / "cohort.csv").write_text("path\n" + "".join(f"{p.name}\n" for p in slides))
    ckpt = OUT / "model.pt"
    if not ckpt.exists():
        make_checkpoint(ckpt, input_size=128, head_conv=True)  # the network slide training builds
    print(f"cohort: {n} slides of {w}x{h} (WxH) px at 0.5 um/px in {d} ({time.perf_counter() - t0:.0f} s to prepare)")
    return d / "cohort.csv", ckpt, slides


def wsltool() -> list[str]:
    exe = Path(sys.executable).parent / "wsltool"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "wsltool.cli"]


def run_loop(slides: list[Path], ckpt: Path, out: Path, readers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for s in slides:
        subprocess.run(
            [
                *wsltool(),
                "infer",
                str(s),
                "-o",
                str(out / f"{s.stem}.zarr"),
                "--model",
                str(ckpt),
                *SETTINGS,
                "--workers",
                str(readers),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return time.perf_counter() - t0


def run_cohort(csv_path: Path, ckpt: Path, out: Path, readers: int, workers: int | None) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--workers", str(workers)] if workers else []
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            *wsltool(),
            "cohort",
            "infer",
            str(csv_path),
            "-o",
            str(out),
            "--model",
            str(ckpt),
            *SETTINGS,
            "--readers",
            str(readers),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - t0, p.stdout.splitlines()[0]


def max_difference(a: Path, b: Path, slides: list[Path]) -> float:
    """Largest |M+ difference| between the two runs' stores over every slide."""
    import numpy as np

    from wsltool.store import HeatmapStore

    return max(
        float(
            np.abs(
                HeatmapStore.open(a / f"{s.stem}.zarr").mplus().astype(np.float32)
                - HeatmapStore.open(b / f"{s.stem}.zarr").mplus().astype(np.float32)
            ).max()
        )
        for s in slides
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", default="2048x3072", help="HxW of level 0 in px (default 2048x3072)")
    ap.add_argument("--readers", type=int, default=0, help="reader processes per slide, both ways (default 0)")
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: auto-sized)")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    csv_path, ckpt, slides = make_cohort(args.slides, h, w)
    load = [os.getloadavg()[0]]
    t_loop = run_loop(slides, ckpt, OUT / "loop", args.readers)
    load.append(os.getloadavg()[0])
    t_coh, summary = run_cohort(csv_path, ckpt, OUT / "run", args.readers, args.workers)
    load.append(os.getloadavg()[0])
    from wsltool.cohort import default_cluster_size

    n = len(slides)
    nw, nt = default_cluster_size()
    workers = args.workers or nw
    threads = nt if not args.workers else max(1, len(os.sched_getaffinity(0)) // workers)
    print(
        f"machine: {machine()}; 1-min load average {load[0]:.1f} at start, {load[1]:.1f} after the loop, "
        f"{load[2]:.1f} after the cohort run (this process's own work included)"
    )
    print(f"settings: {' '.join(SETTINGS)} --readers {args.readers}")
    print(f"{'way':<46} {'wall s':>8} {'slides/h':>9}")
    print(f"{'shell loop of `wsltool infer` (process/slide)':<46} {t_loop:8.1f} {3600 * n / t_loop:9.0f}")
    label = f"`wsltool cohort infer` ({workers} workers x {threads} threads)"
    print(f"{label:<46} {t_coh:8.1f} {3600 * n / t_coh:9.0f}")
    print(f"ratio cohort / loop: {t_loop / t_coh:.2f}x slides per hour")
    print(f"cohort summary: {summary}")
    diff = max_difference(OUT / "loop", OUT / "run", slides)
    print(
        f"max |M+ difference| loop vs cohort: {diff:.4g} (0 when the torch thread counts are equal; CPU "
        "convolutions round differently with other thread counts)"
    )


if __name__ == "__main__":
    main()
