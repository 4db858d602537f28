"""``wsltool info SLIDE``: what a slide is (format, vendor, size, levels, mpp, objective)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    """Add the ``info`` sub-command."""
    p = sub.add_parser("info", help="print a slide's format, dimensions, levels and mpp")
    p.add_argument("slide", help="slide file (SVS, NDPI, MRXS, TIFF, OME-TIFF, DICOM folder, PNG/JPEG)")
    p.add_argument("--mpp", type=float, default=None, help="override the level-0 microns per pixel")
    p.add_argument("--backend", choices=["openslide", "tifffile", "image"], default=None, help="force a backend")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the slide's properties."""
    from wsltool.slide import open_slide

    with open_slide(args.slide, mpp=args.mpp, backend=args.backend) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    w, h = info["dimensions"]
    mpp = info["mpp"]
    mpp_txt = f"{mpp:g} um/px ({info['mpp_source']})" if mpp is not None else "none (pass --mpp)"
    if mpp is None and info["file_mpp"] is not None:
        mpp_txt = f"none: file says {info['file_mpp']:g}, implausible (pass --mpp)"
    lines = [
        f"path:        {info['path']}",
        f"format:      {info['format']} (backend {info['backend']})",
        f"vendor:      {info['vendor']}",
        f"dimensions:  {w}x{h}",
        f"levels:      {info['level_count']}: "
        + ", ".join(
            f"{a}x{b} (/{d:g})" for (a, b), d in zip(info["level_dimensions"], info["level_downsamples"], strict=True)
        ),
        f"mpp:         {mpp_txt}",
        f"objective:   {info['objective_power']:g}x" if info["objective_power"] else "objective:   unknown",
        f"associated:  {', '.join(info['associated_images']) or 'none'}",
    ]
    print("\n".join(lines))
    return 0
