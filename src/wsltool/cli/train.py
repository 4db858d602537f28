"""``wsltool train --labels labels.csv --out DIR``: train a min-max (or baseline) model from image-level labels."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsltool.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the ``train`` sub-command."""
    p = sub.add_parser(
        "train",
        help="train a localizer from image- or slide-level labels (path,label[,split] CSV)",
        description="Images train at image level; slides (or a mix) train with multiple-instance region sampling "
        "(MilConfig: --set mpp=, region=, top_k=, n_random=, score_cap=...). Without a split column, slides get a "
        "stratified validation split written to OUT/splits.csv.",
    )
    p.add_argument(
        "--labels",
        required=True,
        help="labels CSV (path,label[,split]; rows with split 'valid' validate), or a GlaS folder",
    )
    p.add_argument("--out", required=True, help="output folder (last.pt, best.pt, history.jsonl)")
    p.add_argument("--config", default=None, help="TOML file with [model], [train] and [mil] tables")
    p.add_argument("--method", choices=["minmax", "wildcat", "cam"], default=None)
    p.add_argument("--backbone", default=None, help="efficientnet_lite0 (default), resnet18/34/50/101, tiny (tests)")
    p.add_argument("--pretrained", default=None, help="'imagenet', 'none' or a state_dict file")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S1,S2,...",
        help="images: train one model per seed into OUT/seed_<S>/ and write OUT/ensemble.pt, whose heatmap "
        "averages theirs (GlaS: 4 seeds lift pixel AUC by ~4 points over one; README)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any ModelConfig/TrainConfig/MilConfig field (repeatable), e.g. size_prior=none, top_k=4",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="images: their microns per pixel (stored in the checkpoint); slides: the training resolution",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a training run already in OUT (without it, or --resume, such a folder is refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and print where the checkpoints are."""
    import tomllib

    from wsltool.config import MilConfig, ModelConfig, TrainConfig, from_dict, parse_value
    from wsltool.device import resolve_device
    from wsltool.errors import ConfigError, LabelsError
    from wsltool.train.glas import glas_items
    from wsltool.train.labels import check_train_splits, class_names_of, read_labels
    from wsltool.train.rundir import check_new_run, existing_run

    mil_data: dict[str, Any] = {}
    args.mil_data = mil_data
    mdata: dict[str, Any] = {}
    tdata: dict[str, Any] = {}
    if args.config:
        try:
            raw = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            msg = f"{args.config}: cannot read TOML ({exc})"
            raise ConfigError(msg) from exc
        unknown = sorted(set(raw) - {"model", "train", "mil"})
        if unknown:
            msg = f"{args.config}: unknown section(s) {', '.join(unknown)} (sections: model, train, mil)"
            raise ConfigError(msg)
        mdata.update(raw.get("model", {}))
        tdata.update(raw.get("train", {}))
        mil_data.update(raw.get("mil", {}))
    for key, val in (("method", args.method), ("backbone", args.backbone), ("pretrained", args.pretrained)):
        if val is not None:
            mdata[key] = val
    for key, val in (
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("crop", args.crop),
        ("lr", args.lr),
        ("seed", args.seed),
    ):
        if val is not None:
            tdata[key] = val
    mfields = {f.name for f in dataclasses.fields(ModelConfig)}
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    mil_fields = {f.name for f in dataclasses.fields(MilConfig)}
    for kv in args.set:
        k, eq, v = kv.partition("=")
        if not eq:
            msg = f"--set expects KEY=VALUE, got {kv!r}"
            raise ConfigError(msg)
        if k not in mfields | tfields | mil_fields:
            msg = f"--set {k}: unknown setting (not a field of ModelConfig, TrainConfig or MilConfig)"
            raise ConfigError(msg)
        (mdata if k in mfields else tdata if k in tfields else mil_data)[k] = parse_value(v)
    args.device = str(resolve_device(args.device or "auto"))  # a bad --device fails before any work
    src = Path(args.labels)
    items = glas_items(src) if src.is_dir() else read_labels(src, require_splits=())
    check_train_splits(items)
    classes = class_names_of(items)
    if len(classes) < 2:
        raise LabelsError(src, [f"need at least 2 classes, found {classes}"])
    mdata.setdefault("num_classes", len(classes))
    model_cfg = from_dict(ModelConfig, mdata, source="model config")
    train_cfg = from_dict(TrainConfig, tdata, source="train config")
    seeds = _parse_seeds(args.seeds)
    if seeds and args.seed is not None:
        msg = "--seed and --seeds exclude each other (--seeds sets each member's seed)"
        raise ConfigError(msg)
    readable_slides, unreadable = _item_kinds(items)
    if readable_slides or unreadable:  # slides, or files the slide path reports with every other problem
        if seeds:
            msg = (
                "--seeds trains image ensembles; for slides, train each seed with --seed "
                "and combine the checkpoints with `wsltool ensemble`"
            )
            raise ConfigError(msg)
        return _run_slides(args, items, classes, mdata, tdata, src, readable_slides=readable_slides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would train alone and write the same files
        msg = (
            f"{src} lists images: image training runs in one process (torchrun trains slide CSVs); "
            "train several models with --seeds instead"
        )
        raise ConfigError(msg)
    if mil_data:  # multiple-instance settings mean nothing to image training: say so rather than drop them
        msg = f"{', '.join(sorted(mil_data))}: multiple-instance (slide) setting(s), but {src} lists images only"
        raise ConfigError(msg)
    out_dirs = [Path(args.out)] if not seeds else [Path(args.out) / f"seed_{sd}" for sd in seeds]
    for out_k in out_dirs:  # before anything is written (splits.csv)
        check_new_run(out_k, resume=args.resume, overwrite=args.overwrite)
        if seeds and args.resume and existing_run(out_k) and not (out_k / "last.pt").exists():
            # a seed run with best.pt but no last.pt can be neither continued nor replaced silently
            msg = f"{out_k}: holds best.pt but no last.pt, so it cannot be resumed; --overwrite trains the seeds again"
            raise ConfigError(msg)
    ens = Path(args.out) / "ensemble.pt"
    if seeds and ens.exists() and not (args.resume or args.overwrite):  # an ensemble of other seeds' runs
        msg = f"{ens}: already exists; pass --resume to rebuild it from these seeds, --overwrite, or another --out"
        raise ConfigError(msg)
    has_split = any(it.split is not None for it in items)
    with contextlib.ExitStack() as written:  # a run that fails before its first checkpoint takes splits.csv back
        if not has_split and len(items) >= 4:  # same rule as for slides: a seeded stratified split, written out
            from wsltool.train.rundir import provisional_file
            from wsltool.train.slides import stratified_split, write_labels_csv

            items = stratified_split(items, 0.25, seed=int(tdata.get("seed", 0)))
            split_csv = written.enter_context(
                provisional_file(Path(args.out) / "splits.csv", until=[o / "last.pt" for o in out_dirs])
            )
            split_csv.parent.mkdir(parents=True, exist_ok=True)
            write_labels_csv(split_csv, items)
            has_split = True
        _fit_images(args, items, has_split, src, classes, model_cfg, train_cfg, seeds, out_dirs)
    return 0


def _fit_images(
    args: argparse.Namespace,
    items: list[Any],
    has_split: bool,
    src: Path,
    classes: list[str],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seeds: list[int],
    out_dirs: list[Path],
) -> None:
    """Image-level training of one model per seed (one when ``seeds`` is empty), then their ensemble."""
    from wsltool.errors import LabelsError
    from wsltool.train.loop import fit
    from wsltool.train.rundir import existing_run, set_aside

    train = [it for it in items if not has_split or it.split == "train"]
    valid = [it for it in items if has_split and it.split == "valid"]
    if not train:
        raise LabelsError(src, ["split 'train' has no item"])
    runs = list(zip([dataclasses.replace(train_cfg, seed=sd) for sd in seeds] or [train_cfg], out_dirs, strict=True))
    results = []
    replacing = contextlib.ExitStack()
    if seeds and args.overwrite:  # every seed's earlier run (and their ensemble) comes back, or none does
        replacing.enter_context(set_aside(out_dirs, [Path(args.out) / "ensemble.pt"]))
    # --resume over seeds: a seed whose folder holds no run yet (the invocation was interrupted before it) starts
    # fresh, once some seed has a checkpoint; with none anywhere, "nothing to resume" as for a single run
    any_started = any((o / "last.pt").exists() for o in out_dirs)
    with replacing:
        for cfg_k, out_k in runs:
            resume_k = args.resume and (not seeds or not any_started or bool(existing_run(out_k)))
            if args.resume and not resume_k:
                log.info("%s: no checkpoint yet; this seed starts from the beginning", out_k)
            res = fit(
                train,
                valid,
                classes,
                model_cfg,
                cfg_k,
                out_k,
                resume=resume_k,
                overwrite=args.overwrite,
                device=args.device,
                progress=not args.no_progress,
                mpp=args.mpp,
            )
            results.append(res)
            seed_note = f" (seed {cfg_k.seed})" if seeds else ""
            print(
                f"trained {len(train)} images ({len(valid)} validation), classes {', '.join(classes)}, "
                f"{res.seconds:.0f} s{seed_note}"
            )
            print(_best_line(res, "valid_error", "valid error {:.1f}%"))
            print(f"last: {res.last}")
    if seeds:
        from wsltool.train.checkpoint import save_ensemble

        ens = Path(args.out) / "ensemble.pt"
        save_ensemble(ens, [r.best for r in results], overwrite=True)  # checked above, before training
        print(f"ensemble: {ens} (the best.pt of {len(results)} seeds, heatmaps averaged)")


def _parse_seeds(text: str | None) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (at least two distinct seeds); None -> ``[]``."""
    from wsltool.errors import ConfigError

    if text is None:
        return []
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        msg = f"--seeds expects two or more distinct integers separated by commas, got {text!r}"
        raise ConfigError(msg)
    return seeds


def _best_line(res: Any, key: str, fmt: str) -> str:
    """``best: PATH (epoch N, <metric>)`` for a fit result; the metric is left out when it was not measured."""
    best: dict[str, Any] = next((h for h in res.history if h["epoch"] == res.best_epoch), {})
    value = best.get(key)
    metric = f", {fmt.format(value)}" if value is not None else ""
    return f"best: {res.best} (epoch {res.best_epoch + 1}{metric})"


def _item_kinds(items: list[Any]) -> tuple[bool, bool]:
    """``(any slide, any unreadable file)`` among the items, in one pass that stops at the first slide.

    Either makes training multiple-instance: an item no reader recognises is reported, with every other
    problem, by the slide path.
    """
    from wsltool.errors import WslError
    from wsltool.slide import choose_backend

    unreadable = False
    for it in items:
        try:
            if choose_backend(it.path) != "image":
                return True, unreadable
        except WslError:
            unreadable = True
    return False, unreadable


def _run_slides(
    args: argparse.Namespace,
    items: list[Any],
    classes: list[str],
    mdata: dict[str, Any],
    tdata: dict[str, Any],
    src: Path,
    *,
    readable_slides: bool,
) -> int:
    """Slide-level (multiple-instance) training: ``wsltool.train.slides.train_from_items``."""
    from wsltool.config import MilConfig, ModelConfig, TrainConfig, from_dict
    from wsltool.errors import ConfigError
    from wsltool.train.slides import SLIDE_MODEL_DEFAULTS, SLIDE_TRAIN_DEFAULTS, train_from_items

    mil = dict(args.mil_data)
    if args.mpp is not None:
        mil["mpp"] = args.mpp
    if "crop" in tdata:  # as MIL keys on images: a setting the run would not use is refused, not dropped
        if readable_slides:
            msg = (
                f"crop: an image-training setting, but {src} lists slides; slide training reads regions of "
                "--set region=N px (MilConfig.region)"
            )
            raise ConfigError(msg)
        del tdata["crop"]  # the only 'slides' are unreadable files: their problems are reported next
    model_cfg = from_dict(ModelConfig, {**SLIDE_MODEL_DEFAULTS, **mdata}, source="model config")
    train_cfg = from_dict(TrainConfig, {**SLIDE_TRAIN_DEFAULTS, **tdata}, source="train config")
    mil_cfg = from_dict(MilConfig, mil, source="MIL config")
    res = train_from_items(
        items,
        args.out,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        mil=mil_cfg,
        class_names=classes,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"trained from {len(items)} slide labels, classes {', '.join(classes)}, {res.seconds:.0f} s")
    print(_best_line(res, "valid_auc", "slide AUC {:.3f}"))
    print(f"last: {res.last}; log: {Path(args.out) / 'history.csv'}, {Path(args.out) / 'curves.png'}")
    return 0
