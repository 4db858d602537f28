"""Reproduce wsltool's GlaS table (train on the 67 `train` images, report on the 18 `valid` images).

Usage (CPU, about 10-20 min per run on 2 cores):

    python examples/glas/run_glas.py --data ../shared/data/glas --out /tmp/glas2 --run default
    python examples/glas/run_glas.py --run paper2019|wildcat|cam|default --name NAME [--set key=value ...]
    python examples/glas/run_glas.py --table /tmp/glas2       # collect every run's results into a table

Runs go to ``--out/--name`` (default ``/tmp/glas2/<preset>``); ``--set`` takes any ModelConfig/TrainConfig
field (``--set epochs=40 --set seed=3``).  A folder that already holds a run is refused unless ``--resume``
or ``--overwrite``, as in ``wsltool train``.

`--data` takes the PNG copy (labels.csv) or the official release (BMP + Grade.csv).  Never run on test images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from wsltool.config import PAPER_2019, parse_value

PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "paper2019": dict(PAPER_2019),  # the one definition lives in wsltool.config
    "wildcat": {"method": "wildcat"},
    "cam": {"method": "cam"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glas"))
    ap.add_argument("--out", default="/tmp/glas2")
    ap.add_argument("--run", default="default", help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--name", default=None, help="run folder name (default: the preset)")
    ap.add_argument("--set", action="append", default=[], help="ModelConfig/TrainConfig override key=value")
    ap.add_argument("--overlays", type=int, default=6)
    ap.add_argument("--table", default=None, help="print the table of the runs under this folder and exit")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out/--name")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out/--name")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a shared 2-core machine: 2 threads oversubscribe)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.table:
        return table(Path(args.table))
    from wsltool.errors import WslError

    try:
        return run(args)
    except WslError as exc:  # one line, as the wsltool CLI prints it
        print(f"run_glas.py: error: {exc}", file=sys.stderr)
        return exc.exit_code


def run(args: argparse.Namespace) -> int:
    """Train one preset on GlaS train, select on valid, evaluate on valid and write result.json."""
    import torch

    from wsltool.config import ModelConfig, TrainConfig, from_dict
    from wsltool.errors import ConfigError
    from wsltool.evaluate import evaluate, format_summary
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.glas import GLAS_CLASSES, glas_items
    from wsltool.train.loop import fit

    torch.set_num_threads(args.threads)
    mfields = {f.name for f in dataclasses.fields(ModelConfig)}
    mcfg: dict[str, object] = dict(PRESETS[args.run])
    tcfg: dict[str, object] = {"num_threads": args.threads}
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in mfields | tfields:
            msg = f"--set {k}: unknown setting (not a field of ModelConfig or TrainConfig)"
            raise ConfigError(msg)
        (mcfg if k in mfields else tcfg)[k] = parse_value(v)
    model_cfg = from_dict(ModelConfig, mcfg)
    train_cfg = from_dict(TrainConfig, tcfg)
    name = args.name or args.run
    out = Path(args.out) / name
    items = glas_items(args.data)
    train = [it for it in items if it.split == "train"]
    valid = [it for it in items if it.split == "valid"]
    t0 = time.perf_counter()
    res = fit(
        train,
        valid,
        GLAS_CLASSES,
        model_cfg,
        train_cfg,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=False,
    )
    train_s = time.perf_counter() - t0
    model, meta = load_checkpoint(res.best, class_names=GLAS_CLASSES)
    _, summary = evaluate(model, valid, GLAS_CLASSES, out_dir=out / "eval_valid", overlays=args.overlays)
    summary.update(
        {
            "run": name,
            "best_epoch": res.best_epoch,
            "train_seconds": train_s,
            "train_images_per_s": len(train) * train_cfg.epochs / max(train_s, 1e-9),
            "model": meta["config"],
            "train": meta["train_config"],
        }
    )
    if res.best_epoch != res.history[-1]["epoch"]:  # also report the last epoch (checkpoint-selection ablation)
        last_model, _ = load_checkpoint(res.last, class_names=GLAS_CLASSES)
        _, last = evaluate(last_model, valid, GLAS_CLASSES)
    else:
        last = dict(summary)
    summary["last_epoch"] = {k: v for k, v in last.items() if isinstance(v, int | float)}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0


def table(root: Path) -> int:
    cols = ["error", "f1_pos", "f1_neg", "area", "chance_pos", "chance_neg", "pxap", "pixel_auc"]
    print("| run | checkpoint | " + " | ".join(cols) + " | train min | train img/s | eval img/s |")
    print("|---" * (len(cols) + 5) + "|")
    for p in sorted(root.glob("*/result.json")):
        r = json.loads(p.read_text())
        rows = [(f"best (epoch {r['best_epoch'] + 1})", r)]
        if "last_epoch" in r:
            rows.append(("last", r["last_epoch"]))
        for ck, s in rows:
            vals = " | ".join(f"{s[c]:.1f}" for c in cols)
            print(
                f"| {r['run']} | {ck} | {vals} | {r['train_seconds'] / 60:.1f} | "
                f"{r['train_images_per_s']:.1f} | {s['images_per_s']:.1f} |"
            )
    seeds_table(root, cols)
    return 0


def seeds_table(root: Path, cols: list[str]) -> None:
    """Runs that differ only in their seed, pooled: mean and range of the best checkpoints."""
    from wsltool.config import ModelConfig, TrainConfig, to_dict
    from wsltool.train.checkpoint import LEGACY_MODEL_FIELDS  # fields a run from before they existed lacks

    # a field a run lacks had its legacy value (or, for fields added with a behaviour-preserving default, the
    # default); fields that no longer exist, and min-max-only fields of the baselines, do not separate runs
    mdef, tdef = to_dict(ModelConfig()), to_dict(TrainConfig())
    groups: dict[str, list[dict]] = {}
    for p in sorted(root.glob("*/result.json")):
        r = json.loads(p.read_text())
        model = {k: v for k, v in {**mdef, **LEGACY_MODEL_FIELDS, **r["model"]}.items() if k in mdef}
        if model["method"] != "minmax":
            for k in ("minmax_start", "neg_weight", "neg_updates", "classifier_backbone"):
                model.pop(k)
        train = {k: v for k, v in {**tdef, **r["train"]}.items() if k in tdef and k not in ("seed", "num_threads")}
        key = json.dumps([model, train], sort_keys=True)
        groups.setdefault(key, []).append(r)
    print("\nOver seeds (best checkpoint): mean [min, max]")
    print("| runs | seeds | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for rs in groups.values():
        if len(rs) < 2:
            continue
        cells = []
        for c in cols:
            v = [r[c] for r in rs]
            cells.append(f"{sum(v) / len(v):.1f} [{min(v):.1f}, {max(v):.1f}]")
        names = ", ".join(r["run"] for r in rs)
        seeds = ", ".join(str(r["train"]["seed"]) for r in rs)
        print(f"| {names} | {seeds} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
