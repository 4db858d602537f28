"""Tiling engine benchmark (issue 3): RegionStream vs a plain openslide loop, tissue detection, peak RSS.

Run: ``.venv/bin/python tools/bench/tiling.py`` (``make bench`` runs every benchmark).  Prints figures;
asserts nothing.  Generates (once, cached in ``bench-out/``) an Aperio-style JPEG SVS of 40000 x 30000 px
with ~30% tissue and a 4x smaller one (20000 x 15000).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import TreeRSS, machine, timer

OUT = Path("bench-out")


def make_slide(w: int, h: int) -> Path:
    from wsltool.testing.big import write_large_svs

    p = OUT / f"bench_{w}x{h}.svs"
    if not p.exists():
        t0 = time.perf_counter()
        tmp = p.with_suffix(".tmp.svs")
        write_large_svs(tmp, w, h, tissue_fraction=0.3, seed=7)
        tmp.replace(p)
        print(f"generated {p} ({p.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return p


def grid_for(path: Path, region: int):
    from wsltool.config import TilingConfig
    from wsltool.slide import open_slide
    from wsltool.tiling import Grid
    from wsltool.tissue import detect_tissue

    with open_slide(path) as s, timer() as t:
        tissue = detect_tissue(s)
        grid = Grid.for_slide(s, TilingConfig(mpp=s.mpp, region=region, overlap=0, min_tissue=0.1), tissue)
    return grid, tissue, t[0]


def saved_grid(path: Path, region: int) -> Path:
    """Tissue grid computed once and saved, so the measured processes only stream (or loop)."""
    import numpy as np

    out = OUT / f"{path.stem}_grid{region}.npz"
    if not out.exists():
        grid, _, _ = grid_for(path, region)
        np.savez(out, origins=grid.level0_origins, grid_origins=grid.origins, mpp=grid.config.mpp)
    return out


def stream_pass(path: Path, region: int, workers: int, limit: int | None) -> dict:
    """Run in a fresh process: stream the grid and report regions/s and peak memory of the process tree."""
    import numpy as np

    from wsltool.stream import RegionStream, make_loader

    g = np.load(saved_grid(path, region))
    n_all = len(g["origins"])
    idx = list(range(n_all))[:limit] if limit else None
    stream = RegionStream(path, g["origins"], g["grid_origins"], region, float(g["mpp"]), indices=idx)
    n = 0
    with TreeRSS() as rss, timer() as t:
        for x, _ in make_loader(stream, batch_size=8, num_workers=workers):
            n += x.shape[0]
    return {"regions": n, "seconds": t[0], "per_s": n / t[0], "peak_rss_mb": rss.peak / 2**20}


def openslide_loop(path: Path, region: int, limit: int | None) -> dict:
    import numpy as np
    import openslide

    g = np.load(saved_grid(path, region))
    origins = g["origins"][:limit] if limit else g["origins"]
    osr = openslide.OpenSlide(str(path))
    with timer() as t:
        for x, y in origins:
            a = np.asarray(osr.read_region((int(x), int(y)), 0, (region, region)))[..., :3]
            _ = np.ascontiguousarray(a)
    n = len(origins)
    return {"regions": n, "seconds": t[0], "per_s": n / t[0]}


def sub(mode: str, path: Path, region: int, workers: int, limit: int | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--mode",
        mode,
        "--path",
        str(path),
        "--region",
        str(region),
        "--workers",
        str(workers),
        "--limit",
        str(limit or 0),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="main")
    ap.add_argument("--path", type=Path)
    ap.add_argument("--region", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="regions per pass (0 = all tissue regions)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating loop/stream passes (best of each)")
    a = ap.parse_args()
    if a.mode == "stream":
        print(json.dumps(stream_pass(a.path, a.region, a.workers, a.limit or None)))
        return
    if a.mode == "loop":
        print(json.dumps(openslide_loop(a.path, a.region, a.limit or None)))
        return
    OUT.mkdir(exist_ok=True)
    big = make_slide(40_000, 30_000)
    small = make_slide(20_000, 15_000)
    grid, tissue, t_tissue = grid_for(big, a.region)
    saved_grid(big, a.region)
    saved_grid(small, a.region)
    print(f"machine: {machine()}")
    print(
        f"slide {big.name}: tissue {100 * tissue.fraction:.1f}% detected in {t_tissue:.2f} s "
        f"(tissue + grid), {len(grid)} tissue regions of {a.region} px at 0.5 mpp"
    )
    limit = a.limit or None
    # alternate the two twice and keep the best of each: load from other processes varies over time
    loops, streams = [], []
    for _ in range(a.repeats):
        loops.append(sub("loop", big, a.region, 0, limit))
        streams.append(sub("stream", big, a.region, a.workers, limit))
    loop = max(loops, key=lambda r: r["per_s"])
    stream = max(streams, key=lambda r: r["per_s"])
    print(
        f"openslide.read_region loop (1 thread): {loop['per_s']:.1f} regions/s ({loop['regions']} in "
        f"{loop['seconds']:.1f} s)"
    )
    print(
        f"RegionStream ({a.workers} workers):     {stream['per_s']:.1f} regions/s ({stream['regions']} in "
        f"{stream['seconds']:.1f} s)"
    )
    print(f"ratio stream/loop: {stream['per_s'] / loop['per_s']:.2f} (target >= 1.7; best of {a.repeats} each)")
    small_stream = sub("stream", small, a.region, a.workers, limit)
    ratio = stream["peak_rss_mb"] / small_stream["peak_rss_mb"]
    print(
        f"peak memory (PSS) of the stream (process tree): {stream['peak_rss_mb']:.0f} MB for 40000x30000, "
        f"{small_stream['peak_rss_mb']:.0f} MB for 20000x15000: ratio {ratio:.2f} (target within 15%)"
    )


if __name__ == "__main__":
    main()
