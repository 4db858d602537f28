"""``wsltool export OUT.zarr --geojson F --png F``: QuPath GeoJSON contours and a preview overlay."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add the ``export`` sub-command."""
    p = sub.add_parser("export", help="export a heatmap store as GeoJSON (QuPath) and/or a preview PNG")
    p.add_argument("store", help="heatmap store written by `wsltool infer`")
    p.add_argument("--geojson", nargs="?", const="", default=None, help="GeoJSON path (default STORE.geojson)")
    p.add_argument("--png", nargs="?", const="", default=None, help="preview PNG path (default STORE.png)")
    p.add_argument("--threshold", type=float, default=None, help="re-threshold M+ (default: the stored mask)")
    p.add_argument("--slide", default=None, help="slide file, if it moved since inference")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the requested exports."""
    from wsltool.errors import ConfigError, StoreError
    from wsltool.export import check_target, preview_png, write_geojson
    from wsltool.store import HeatmapStore

    store = Path(args.store)
    st = HeatmapStore.open(store)
    if not st.complete:
        msg = f"{store}: store is incomplete; finish it with `wsltool infer` first"
        raise StoreError(msg)
    if args.geojson is None and args.png is None:
        args.geojson = ""
    base = store.with_suffix("")
    gj_out = None if args.geojson is None else Path(args.geojson or f"{base}.geojson")
    png_out = None if args.png is None else Path(args.png or f"{base}.png")
    # every check before anything is written: both targets, the threshold; the PNG (which checks --slide)
    # is written first, so a wrong slide leaves no GeoJSON either
    for out, kind in ((gj_out, "geojson"), (png_out, "png")):
        if out is not None:
            check_target(out, kind)
    if args.threshold is not None and not 0 < args.threshold < 1:
        msg = f"--threshold must be in (0, 1), got {args.threshold}"
        raise ConfigError(msg)
    if png_out is not None:
        w, h = preview_png(store, png_out, slide_path=args.slide)
        print(f"{png_out}: {w}x{h} preview")
    if gj_out is not None:
        n = write_geojson(store, gj_out, threshold=args.threshold)
        print(f"{gj_out}: {n} contour(s) in level-0 pixel coordinates")
    return 0
