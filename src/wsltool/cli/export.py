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
    from wsltool.errors import StoreError
    from wsltool.export import preview_png, write_geojson
    from wsltool.store import HeatmapStore

    store = Path(args.store)
    st = HeatmapStore.open(store)
    if not st.complete:
        msg = f"{store}: store is incomplete; finish it with `wsltool infer` first"
        raise StoreError(msg)
    if args.geojson is None and args.png is None:
        args.geojson = ""
    base = store.with_suffix("")
    if args.geojson is not None:
        out = Path(args.geojson or f"{base}.geojson")
        n = write_geojson(store, out, threshold=args.threshold)
        print(f"{out}: {n} contour(s) in level-0 pixel coordinates")
    if args.png is not None:
        out = Path(args.png or f"{base}.png")
        w, h = preview_png(store, out, slide_path=args.slide)
        print(f"{out}: {w}x{h} preview")
    return 0
