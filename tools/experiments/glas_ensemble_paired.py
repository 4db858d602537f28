"""Paired comparison of *ensembles* of two GlaS run families: disjoint seed groups, one ensemble per group.

``glas_ensemble.py`` scores every subset of one family's seeds, so its figures for k models share members and
cannot be compared pair by pair.  Here the seeds both families have are cut, in seed order, into disjoint groups
of ``k`` (a remainder is dropped); family A's ensemble of a group is compared with family B's ensemble of the
same seeds, and the groups play the part that seeds play in ``glas_paired.py`` (same statistics: 95 % t
interval, groups higher, sign-flip p; *clearly above* needs at least 8 groups, the interval above zero and
p < 0.05).  An ensemble's M+ is its members' normalised M+ averaged and normalised again, exactly as
``wsltool.models.Ensemble`` does; ``--tta`` averages each member over flipped / rotated views first.

Each checkpoint's maps on the 18 ``valid`` images are cached beside it (``maps_<checkpoint stem>_<tta>.npz``,
float16, keyed by the checkpoint's mtime), so a second comparison over the same runs loads no model.  Maps
are computed on ``--device`` (default: CUDA when available, as ``glas_ensemble.py``).

Usage::

    .venv/bin/python tools/experiments/glas_ensemble_paired.py --a '/tmp/glas2/W10_seed*' \\
        --b '/tmp/glas2/C2_seed*' --k 2 --tta none

Measured: docs/glas.md, lessons 19 (seeds 0-21), 21 (the confirmatory test, seeds 22-37) and 22 (120 epochs).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import wsltool  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

HERE = Path(__file__).resolve().parent
METRICS = ("pxap", "pixel_auc", "f1_pos", "f1_neg", "area")


def _sibling(name: str) -> Any:
    """Another script of this folder, loaded as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ens = _sibling("glas_ensemble")
ensemble_maps = _ens.ensemble_maps  # re-exported: the members' normalised maps averaged, normalised again
score = _ens.score  # re-exported: wsltool eval's localization metrics


def seed_groups(seeds: Sequence[int], k: int) -> list[tuple[int, ...]]:
    """``seeds`` (sorted) cut into consecutive disjoint groups of ``k``; a remainder shorter than ``k`` is dropped."""
    s = sorted(seeds)
    return [tuple(s[i : i + k]) for i in range(0, len(s) - k + 1, k)]


def checkpoint_maps(
    run: Path, ckpt: str, tta: str, images: Sequence[np.ndarray], device: Any = "cpu"
) -> list[np.ndarray]:
    """M+ of ``run/ckpt`` on ``images``, computed on ``device``.

    Cached in ``run/maps_<ckpt stem>_<tta>.npz`` (float16), keyed by the checkpoint's mtime and the number of
    images, not by the device (a cache written from a GPU run is read on the CPU and the other way round).
    """
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.glas import GLAS_CLASSES

    path = run / ckpt
    cache = run / f"maps_{Path(ckpt).stem}_{tta}.npz"
    stamp = str(path.stat().st_mtime_ns)
    if cache.is_file():
        z = np.load(cache)
        if str(z["stamp"]) == stamp and len(z.files) - 1 == len(images):
            return [z[f"m{j}"].astype(np.float64) for j in range(len(images))]
    model, _ = load_checkpoint(path, class_names=GLAS_CLASSES)
    maps: list[np.ndarray] = _ens.model_maps(model.to(device), tta, images, device)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    arrays: dict[str, Any] = {f"m{j}": m.astype(np.float16) for j, m in enumerate(maps)}
    np.savez(tmp, stamp=np.array(stamp), **arrays)
    tmp.replace(cache)
    return maps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", action="append", required=True, help="glob of family A's run folders (repeatable)")
    ap.add_argument("--b", action="append", required=True, help="glob of family B's run folders (repeatable)")
    ap.add_argument("--k", type=int, default=2, help="models per ensemble (disjoint groups of seeds)")
    ap.add_argument("--tta", default="none", choices=["none", "flips", "d4"])
    ap.add_argument("--ckpt", default="best.pt", help="checkpoint file inside each run folder")
    ap.add_argument("--data", default=_ens.DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    args = ap.parse_args(argv)

    import torch

    from wsltool.infer.run import resolve_device

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)  # the CLI's rule: "auto" = CUDA when available
    gp = _sibling("glas_paired")
    fam_a, fam_b = gp.load_family(args.a), gp.load_family(args.b)
    groups = seed_groups(sorted(set(fam_a) & set(fam_b)), args.k)
    if not groups:
        print(
            f"error: fewer than {args.k} shared seeds (A has {sorted(fam_a)}, B has {sorted(fam_b)})", file=sys.stderr
        )
        return 2
    images, gts = _ens.valid_set(args.data)

    res: dict[str, dict[int, dict]] = {"A": {}, "B": {}}
    for name, fam in (("A", fam_a), ("B", fam_b)):
        for g, seeds in enumerate(groups):
            members = [checkpoint_maps(Path(fam[s]["_dir"]), args.ckpt, args.tta, images, dev) for s in seeds]
            res[name][g] = score(ensemble_maps(members), gts)
            print(f"{name} group {g} seeds {list(seeds)}: PxAP {res[name][g]['pxap']:5.1f}", flush=True)
    print(f"groups of {args.k} (tta {args.tta}): {[list(g) for g in groups]}")
    print(f"PxAP: A's ensembles are {gp.report(res['A'], res['B'], METRICS)} B's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
