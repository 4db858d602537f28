"""Training from slide-level labels: multiple-instance region sampling + the min-max losses.

Each epoch (see :class:`wsltool.config.MilConfig`): score candidate tissue regions of every training
slide with the current model, take the top-k regions by positive-class probability (lesion candidates on
positive slides, hardest negatives on negative slides) plus random ones, train one pass on the
class-balanced, augmented set, then validate at slide level (slide score = top-k mean of region
probabilities; accuracy and ROC AUC).  Checkpoints: ``last.pt`` every epoch (with the state to
``--resume``) and ``best.pt`` by lowest validation error, then highest AUC, then lowest loss (ties go to
the later epoch).  A log (``history.jsonl`` and ``history.csv``) and a plot (``curves.png``) sit next to
them.  Plain images in the CSV are used whole, as one region each.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsltool.config import (
    MilConfig,
    ModelConfig,
    TilingConfig,
    TrainConfig,
    half_region_overlap,
    resolve_for_training,
    to_dict,
)
from wsltool.errors import CheckpointError, ConfigError, LabelsError, SlideError, WslError
from wsltool.models import build_model
from wsltool.train.checkpoint import (
    config_differences,
    model_differences,
    read_checkpoint,
    resume_training,
    save_checkpoint,
)
from wsltool.train.data import augment
from wsltool.train.labels import LabeledItem
from wsltool.train.loop import _optimizer, barrier_t, improves, lr_factor, set_infer_sigma, sigma_at
from wsltool.train.rundir import check_new_run, provisional_file, run_dir

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]

#: Model settings of slide-level training, pinned to what was measured on the synthetic cohort (README): the
#: TMI-style soft mask (w 5, sigma 0.15) without a size prior (the GlaS area prior of 30-70% per image is wrong
#: for slide regions, whose lesion share ranges 0-100%), masked passes on running BatchNorm statistics, the
#: max-entropy term updating every part, zero padding. They are pinned, not inherited from ``ModelConfig``'s
#: image-level defaults: with the GlaS-tuned defaults (w 8, sigma 0.5, frozen BatchNorm, localizer-only
#: max-entropy updates, replicate padding) slide training measured p(malignant) ~0.5 on every held-out slide
#: and Dice 0.  Lite0's 1280-channel head convolution is kept (``head_conv=True``), the image default's
#: WILDCAT warm-up is off (``minmax_start=0``) and the classifier shares the localizer's backbone
#: (``classifier_backbone="shared"``): everything on slides was measured that way.  Dropping the head
#: convolution (the image default since the GlaS probe) lowered the trained-slide test's Dice from 0.735 to
#: 0.674 on the synthetic slides; neither change has been measured on real slides.
SLIDE_MODEL_DEFAULTS: dict[str, Any] = {
    "head_conv": True,
    "minmax_start": 0,
    "classifier_backbone": "shared",
    "size_prior": "none",
    "w": 5.0,
    "sigma": 0.15,
    "bn_mode": "masked_running",
    "neg_updates": "all",
    "padding": "zeros",
}
#: Optimisation settings of slide-level training (a short constant-rate schedule, no warm-up).
SLIDE_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 20, "schedule": "constant", "warmup_epochs": 0}


@dataclass
class Source:
    """A training/validation slide (or image) with its candidate regions."""

    item: LabeledItem
    y: int
    kind: str  # "slide" | "image"
    origins: np.ndarray  # (N, 2) level-0 corners (slides)
    slide_mpp: float | None = None
    failed: str | None = None

    @property
    def n(self) -> int:
        """Number of candidate regions."""
        return 1 if self.kind == "image" else len(self.origins)


def roc_auc(y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties counted half; NaN with one class only."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (pos.size * neg.size))


def prepare_sources(items: Sequence[LabeledItem], class_names: Sequence[str], mil: MilConfig) -> list[Source]:
    """Open every slide, find its tissue and candidate regions; all problems are raised together.

    Raises
    ------
    LabelsError
        Listing every unreadable slide, slide without mpp, or slide without tissue.
    """
    from wsltool.slide import choose_backend, open_slide
    from wsltool.tiling import Grid
    from wsltool.tissue import detect_tissue

    problems: list[str] = []
    out: list[Source] = []
    tiling = TilingConfig(
        mpp=mil.mpp, region=mil.region, overlap=half_region_overlap(mil.region), min_tissue=mil.min_tissue
    )
    for it in items:
        y = list(class_names).index(it.label)
        mpp_txt = it.extra.get("mpp", "")
        try:
            smpp = float(mpp_txt) if mpp_txt else None
            if choose_backend(it.path) == "image" and smpp is None:
                out.append(Source(it, y, "image", np.zeros((1, 2))))
                continue
            with open_slide(it.path, mpp=smpp) as s:
                tissue = detect_tissue(s, mpp=max(4.0, mil.mpp * 4))
                grid = Grid.for_slide(s, tiling, tissue)
                if len(grid) == 0:  # little tissue: accept any region touching it
                    grid = Grid.for_slide(s, TilingConfig(**{**to_dict(tiling), "min_tissue": 0.01}), tissue)
            if len(grid) == 0:
                problems.append(f"line {it.row}: {it.path.name}: no tissue found")
                continue
            out.append(Source(it, y, "slide", grid.level0_origins, smpp))
        except ValueError as exc:
            if isinstance(exc, WslError):
                problems.append(f"line {it.row}: {exc}")
            else:
                problems.append(f"line {it.row}: mpp {mpp_txt!r} is not a number")
        except WslError as exc:
            problems.append(f"line {it.row}: {exc}")
    if problems:
        raise LabelsError((items[0].source or items[0].path.parent) if items else Path("."), problems)
    return out


class RegionReader:
    """Reads regions of a :class:`Source` as ``uint8 (n, 3, S, S)`` tensors (one open handle per slide)."""

    def __init__(self, mil: MilConfig) -> None:
        self.mil = mil
        self._open: dict[Path, Any] = {}

    def read(self, src: Source, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Regions ``idx`` of ``src`` (raises ``SlideError`` when the slide became unreadable)."""
        from PIL import Image

        from wsltool.slide import open_slide
        from wsltool.slide.image_backend import pil_to_rgb8

        r = self.mil.region
        if src.kind == "image":
            with Image.open(src.item.path) as im:
                arr = np.asarray(Image.fromarray(pil_to_rgb8(im)).resize((r, r), Image.Resampling.LANCZOS))
            t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
            return t[None].repeat(len(idx), 1, 1, 1)
        s = self._open.get(src.item.path)
        if s is None:
            s = open_slide(src.item.path, mpp=src.slide_mpp)
            self._open[src.item.path] = s
        out = torch.empty((len(idx), 3, r, r), dtype=torch.uint8)
        for k, i in enumerate(idx):
            x, y = src.origins[int(i)]
            out[k] = torch.from_numpy(np.array(s.read_region(float(x), float(y), r, r, mpp=self.mil.mpp))).permute(
                2, 0, 1
            )
        return out

    def close(self) -> None:
        """Close every handle."""
        for s in self._open.values():
            s.close()
        self._open.clear()


def score_regions(model: Any, x: torch.Tensor, pos: int, device: str, batch: int = 16) -> np.ndarray:
    """Positive-class probability of each region (eval mode, no gradients)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for k in range(0, len(x), batch):
            p = model.localize(x[k : k + batch].to(device), size=(4, 4))["probs"][:, pos]
            out.append(p.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def slide_score(
    model: Any, reader: RegionReader, src: Source, mil: MilConfig, pos: int, device: str, rng: np.random.Generator
) -> float:
    """Slide-level positive probability: top-k mean over (at most ``score_cap``) regions."""
    n = src.n
    idx = np.arange(n) if n <= mil.score_cap else np.sort(rng.choice(n, mil.score_cap, replace=False))
    p = score_regions(model, reader.read(src, idx), pos, device)
    k = max(1, min(mil.slide_top_k, len(p)))
    return float(np.sort(p)[::-1][:k].mean())


def _select(
    model: Any,
    reader: RegionReader,
    src: Source,
    mil: MilConfig,
    pos: int,
    device: str,
    epoch: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, int]:
    n = src.n
    want = mil.top_k + mil.n_random
    if src.kind == "image":
        return reader.read(src, [0]), 0
    if epoch < mil.warmup_epochs or mil.top_k == 0:
        idx = rng.choice(n, min(n, want), replace=False)
        return reader.read(src, idx), 0
    cand = rng.choice(n, min(n, mil.score_cap), replace=False)
    xc = reader.read(src, cand)
    p = score_regions(model, xc, pos, device)
    order = np.argsort(-p, kind="stable")[: mil.top_k]
    top = xc[order]
    rest = np.setdiff1d(np.arange(n), cand[order])
    rnd = rng.choice(rest, min(len(rest), mil.n_random), replace=False) if len(rest) else np.zeros(0, int)
    parts = [top] + ([reader.read(src, rnd)] if len(rnd) else [])
    return torch.cat(parts), len(top)


@dataclass
class SlideFitResult:
    """Outcome of :func:`fit_slides`."""

    best: Path
    last: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for k in ("total", "loc", "pos", "neg", "size"):
        if any(k in h for h in history):
            axes[0].plot(ep, [h.get(k, np.nan) for h in history], label=k)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training losses")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    for k in ("valid_error", "valid_auc"):
        if any(k in h for h in history):
            vals = [h.get(k, np.nan) for h in history]
            axes[1].plot(
                ep,
                [v * (100 if k == "valid_auc" else 1) for v in vals],
                label=k + (" x100" if k == "valid_auc" else ""),
            )
    axes[1].set_xlabel("epoch")
    axes[1].set_title("slide-level validation")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    keys = sorted({k for h in history for k in h})
    with (out / "history.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    _plot(history, out / "curves.png")


def fit_slides(
    train_items: Sequence[LabeledItem],
    valid_items: Sequence[LabeledItem],
    class_names: Sequence[str],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    mil: MilConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SlideFitResult:
    """Train a localizer from slide-level labels.

    Parameters
    ----------
    train_items, valid_items
        Labelled slides (or images); validation may be empty (then the last epoch is the best).
    class_names
        Class order; the positive class is ``mil.positive_class`` or the last name.
    model_cfg, train_cfg, mil
        Model, optimisation and region-sampling settings (``train_cfg.crop`` is ignored: regions are
        ``mil.region`` px).
    out_dir
        Output folder: ``last.pt``, ``best.pt``, ``history.jsonl``, ``history.csv``, ``curves.png``.
    resume
        Continue from ``out_dir/last.pt`` (same configurations required).
    overwrite
        Replace a run already in ``out_dir``; without it (or ``resume``) such a folder is refused before
        anything is written (:mod:`wsltool.train.rundir`).
    init_from
        Start from the weights of this checkpoint (fine-tuning) instead of ``model_cfg.pretrained``.
    device
        Torch device; default CUDA when available.
    progress
        Print one line per epoch.
    on_epoch
        Called with each epoch's record (the napari plugin shows them live).
    should_stop
        Polled between batches; when it returns True, training stops after saving ``last.pt``.

    Returns
    -------
    SlideFitResult
    """
    if model_cfg.num_classes != len(class_names):
        msg = f"model has {model_cfg.num_classes} classes, the labels have {len(class_names)}"
        raise ConfigError(msg)
    pos_name = mil.positive_class or class_names[-1]
    if pos_name not in class_names:
        msg = f"positive class {pos_name!r} is not one of {', '.join(class_names)}"
        raise ConfigError(msg)
    pos = list(class_names).index(pos_name)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    from wsltool.train import distributed

    model_cfg = resolve_for_training(model_cfg, train_cfg.epochs)
    out = Path(out_dir)
    check_new_run(out, resume=resume, overwrite=overwrite)
    dist_info, dev = distributed.setup(device)
    t_prep = time.perf_counter()
    train_src = prepare_sources(train_items, class_names, mil)
    valid_src = prepare_sources(valid_items, class_names, mil) if valid_items else []
    log.info(
        "prepared %d training and %d validation slides in %.1f s",
        len(train_src),
        len(valid_src),
        time.perf_counter() - t_prep,
    )
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(dev)
    loss_module = distributed.wrap(model, dist_info, dev)
    if init_from is not None:
        blob = read_checkpoint(init_from, dev)
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as exc:
            msg = f"{init_from}: weights do not fit this model ({str(exc).splitlines()[0]})"
            raise CheckpointError(msg) from exc
    opt = _optimizer(model, train_cfg)
    last_path, best_path = out / "last.pt", out / "best.pt"
    start = 0
    history: list[dict[str, Any]] = []
    best_key: tuple[float, ...] | None = None
    best_epoch = -1
    if resume:

        def differences(meta: dict[str, Any]) -> list[str]:
            saved = meta.get("train_config", {})
            return (
                model_differences(meta["config"], model_cfg)
                + config_differences(saved.get("train"), to_dict(train_cfg), "train.")
                + config_differences(saved.get("mil"), to_dict(mil), "mil.")
            )

        start, saved_key, best_epoch, history = resume_training(last_path, model, opt, dev, differences)
        best_key = tuple(saved_key) if saved_key else None
    # only rank 0 writes files; an earlier run (--overwrite) comes back if this one fails before a checkpoint
    with run_dir(out, resume=resume, overwrite=overwrite) if dist_info.main else contextlib.nullcontext(out):
        reader = RegionReader(mil)
        t_start = time.perf_counter()
        common: dict[str, Any] = {
            "class_names": list(class_names),
            "mpp": mil.mpp,
            "input_size": mil.region,
            "train_config": {"train": to_dict(train_cfg), "mil": to_dict(mil), "positive_class": pos_name},
        }
        try:
            for epoch in range(start, train_cfg.epochs):
                t_ep = time.perf_counter()
                rng = np.random.default_rng(train_cfg.seed * 100003 + epoch)
                gen = torch.Generator().manual_seed(train_cfg.seed * 7919 + epoch)
                torch.manual_seed(train_cfg.seed * 31 + epoch)
                # 1. region sampling (MIL)
                xs, ys, skipped = [], [], []
                n_top = 0
                for src in train_src:
                    try:
                        x, k = _select(model, reader, src, mil, pos, dev, epoch, rng)
                    except SlideError as exc:
                        log.warning("skipping %s this epoch: %s", src.item.path.name, exc)
                        skipped.append(src.item.path.name)
                        continue
                    xs.append(x)
                    ys.extend([src.y] * len(x))
                    n_top += k
                if not xs:
                    msg = "no training region could be read"
                    raise WslError(msg)
                xall = torch.cat(xs)
                yall = np.asarray(ys)
                # 2. class balance by oversampling
                counts = np.bincount(yall, minlength=len(class_names))
                order = []
                for c in range(len(class_names)):
                    idx = np.nonzero(yall == c)[0]
                    if idx.size == 0:
                        continue
                    extra = rng.choice(idx, counts.max() - idx.size, replace=True) if counts.max() > idx.size else []
                    order.extend(idx.tolist() + list(extra))
                order_arr = rng.permutation(np.asarray(order))
                if dist_info.enabled:  # every rank sampled the same regions: take this rank's share, equal counts
                    per = max(1, len(order_arr) // dist_info.world)
                    order_arr = order_arr[dist_info.rank :: dist_info.world][:per]
                t_sample = time.perf_counter() - t_ep
                # 3. one pass of the min-max losses
                model.train()
                bs = train_cfg.batch_size
                n_batches = max(1, len(order_arr) // bs) if len(order_arr) >= bs else 1
                sums: dict[str, float] = {}
                t_bar = barrier_t(epoch, train_cfg)
                sigma = sigma_at(epoch, model_cfg, train_cfg)
                set_infer_sigma(model, sigma)  # slide validation scores with this epoch's mask
                stopped = False
                for b in range(n_batches):
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    sel = order_arr[b * bs : (b + 1) * bs]
                    f = lr_factor(epoch + b / n_batches, train_cfg)
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * f
                    xb = torch.stack([augment(xall[i], mil.region, train_cfg.color_jitter, gen) for i in sel])
                    yb = torch.as_tensor(yall[sel], dtype=torch.long, device=dev)
                    net: Any = model
                    losses = loss_module(net.normalize(xb.to(dev)), yb, epoch, t_bar, sigma)
                    opt.zero_grad(set_to_none=True)
                    losses["total"].backward()
                    opt.step()
                    for k, v in losses.items():
                        if not k.startswith("_"):
                            sums[k] = sums.get(k, 0.0) + float(v.detach())
                distributed.sync_buffers(model, dist_info)
                done_b = max(1, b + (0 if stopped else 1))
                rec: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
                rec.update({k: v / done_b for k, v in sums.items()})
                rec.update(
                    {
                        "regions": len(order_arr),
                        "top_regions": n_top,
                        "skipped_slides": len(skipped),
                        "sample_seconds": round(t_sample, 2),
                    }
                )
                rec["train_seconds"] = round(time.perf_counter() - t_ep, 2)
                rec["regions_per_s"] = round(len(order_arr) / max(1e-9, time.perf_counter() - t_ep - t_sample), 2)
                # 4. slide-level validation
                key: tuple[float, ...] | None
                if valid_src and dist_info.main:
                    vrng = np.random.default_rng(12345)
                    scores, labels = [], []
                    for src in valid_src:
                        try:
                            scores.append(slide_score(model, reader, src, mil, pos, dev, vrng))
                            labels.append(int(src.y == pos))
                        except SlideError as exc:
                            log.warning("validation skips %s: %s", src.item.path.name, exc)
                    s_arr, l_arr = np.asarray(scores), np.asarray(labels)
                    err = 100.0 * float(np.mean((s_arr >= 0.5) != (l_arr == 1))) if len(s_arr) else 100.0
                    auc = roc_auc(l_arr, s_arr)
                    vloss = float(np.mean(-np.log(np.clip(np.where(l_arr == 1, s_arr, 1 - s_arr), 1e-6, 1))))
                    rec.update({"valid_error": err, "valid_auc": auc, "valid_loss": vloss})
                    key = (err, -(auc if not math.isnan(auc) else 0.0), vloss)
                else:
                    key = (0.0,)
                is_best = not stopped and improves(key, best_key)
                if is_best:
                    best_key, best_epoch = key, epoch
                rec["best"] = is_best
                rec["seconds"] = round(time.perf_counter() - t_ep, 2)
                history.append(rec)
                state = {
                    "optimizer": opt.state_dict(),
                    "epoch": epoch if not stopped else epoch - 1,
                    "best_key": list(best_key) if best_key else None,
                    "best_epoch": best_epoch,
                    "history": json.dumps(history if not stopped else history[:-1]),
                }
                if not dist_info.main:  # only rank 0 validates and writes files
                    if stopped:
                        break
                    continue
                save_checkpoint(last_path, model, train_state=state, extra={"epoch": epoch}, **common)
                if is_best:
                    save_checkpoint(
                        best_path,
                        model,
                        extra={"epoch": epoch, **{k: rec.get(k) for k in ("valid_error", "valid_auc", "valid_loss")}},
                        **common,
                    )
                _write_history(out, history)
                if progress:
                    txt = " ".join(f"{k}={v:.3f}" for k, v in rec.items() if isinstance(v, float) and k != "lr")
                    print(f"epoch {epoch + 1}/{train_cfg.epochs} {txt}{' *' if is_best else ''}", flush=True)
                if on_epoch is not None:
                    on_epoch(rec)
                if stopped:
                    break
        finally:
            reader.close()
            dump = os.environ.get("WSLTOOL_DDP_DUMP")  # test hook: each rank records its final weights
            if dump:
                from wsltool.train.checkpoint import weights_fingerprint

                Path(dump, f"rank{dist_info.rank}.json").write_text(
                    json.dumps(
                        {
                            "rank": dist_info.rank,
                            "world": dist_info.world,
                            "fingerprint": weights_fingerprint(model.state_dict()),
                            "wrote_files": dist_info.main,
                        }
                    )
                )
            distributed.barrier(dist_info)
            distributed.teardown(dist_info)
    if dist_info.main and not best_path.exists() and last_path.exists():
        import shutil

        shutil.copyfile(last_path, best_path)
    return SlideFitResult(best_path, last_path, history, best_epoch, time.perf_counter() - t_start)


__all__ = [
    "SLIDE_MODEL_DEFAULTS",
    "SLIDE_TRAIN_DEFAULTS",
    "MilConfig",
    "SlideFitResult",
    "fit_slides",
    "prepare_sources",
    "roc_auc",
    "stratified_split",
    "train_from_items",
    "train_from_rows",
]


def stratified_split(items: Sequence[LabeledItem], valid_fraction: float = 0.25, seed: int = 0) -> list[LabeledItem]:
    """Assign ``train``/``valid`` per class with a seed.

    ``round(fraction * n)`` items of each class go to ``valid``: at least one when the class has two or
    more items, never all of them.
    """
    import dataclasses

    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault(it.label, []).append(i)
    valid: set[int] = set()
    for idx in by_class.values():
        n = len(idx)
        k = min(n - 1, max(1 if n >= 2 else 0, round(valid_fraction * n)))
        valid.update(rng.choice(idx, k, replace=False).tolist() if k else [])
    return [dataclasses.replace(it, split="valid" if i in valid else "train") for i, it in enumerate(items)]


def write_labels_csv(path: Path, items: Sequence[LabeledItem]) -> Path:
    """Write ``path,label[,split]`` (absolute paths) for ``items`` (no split column when no item has one)."""
    with_split = any(it.split for it in items)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"] if with_split else ["path", "label"])
        for it in items:
            w.writerow([str(it.path), it.label, *([it.split or ""] if with_split else [])])
    return path


def train_from_items(
    items: Sequence[LabeledItem],
    out_dir: str | Path,
    *,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    mil: MilConfig | None = None,
    valid_fraction: float = 0.25,
    class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> SlideFitResult:
    """Split (when the items carry no split), write ``out_dir/splits.csv`` and run :func:`fit_slides`.

    Items whose split is ``train`` train, ``valid`` validate; other splits (``test``) are ignored.  A folder
    that already holds a run is refused before ``splits.csv`` is written, unless ``resume`` or ``overwrite``
    is passed (in ``kwargs``, on to :func:`fit_slides`).
    """
    out = Path(out_dir)
    check_new_run(out, resume=bool(kwargs.get("resume")), overwrite=bool(kwargs.get("overwrite")))
    names = list(class_names) if class_names else sorted({it.label for it in items})
    # the file a split problem is reported against: the split we write, else the labels file the items came from
    split_file: Path = next((it.source for it in items if it.source is not None), out / "splits.csv")
    with contextlib.ExitStack() as written:  # a run that fails before its first checkpoint takes splits.csv back
        if any(it.split is None for it in items):
            items = stratified_split(items, valid_fraction, seed=(train_cfg or TrainConfig()).seed)
            # (a stratified split leaves every class training items: split problems are the labels file's)
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank splits alike; rank 0 writes
                split_csv = written.enter_context(provisional_file(out / "splits.csv", until=[out / "last.pt"]))
                out.mkdir(parents=True, exist_ok=True)
                write_labels_csv(split_csv, items)
                log.info("no split column: stratified split written to %s", split_csv)
        tr = [it for it in items if it.split == "train"]
        va = [it for it in items if it.split == "valid"]
        problems = []
        if not tr:
            problems.append("split 'train' has no item")
        problems.extend(f"class {c!r} has no training item" for c in names if not any(it.label == c for it in tr))
        if problems:
            raise LabelsError(split_file, problems)
        mcfg = model_cfg or ModelConfig(**{**SLIDE_MODEL_DEFAULTS, "num_classes": len(names)})
        return fit_slides(tr, va, names, mcfg, train_cfg or TrainConfig(), mil or MilConfig(), out, **kwargs)


def train_from_rows(
    rows: Sequence[tuple[str, str]],
    out_dir: Path,
    *,
    epochs: int = 10,
    init_from: str | None = None,
    mil: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **kwargs: Any,
) -> SlideFitResult:
    """Train from ``(path, label)`` pairs (the napari Retrain widget's table); validation split is made here.

    Relative paths are taken from the current folder.  The pairs are written to ``out_dir/slides.csv``; a run
    that fails before its first checkpoint takes that file back, and a problem with the pairs is reported
    against :data:`RETRAIN_TABLE` by row (1 = the first pair), not against the file.
    """
    check_new_run(out_dir, resume=bool(kwargs.get("resume")), overwrite=bool(kwargs.get("overwrite")))
    # the table is written as the run's input; a run that fails before its first checkpoint takes it back
    with provisional_file(out_dir / "slides.csv", until=[out_dir / "last.pt"]) as csv_path:
        out_dir.mkdir(parents=True, exist_ok=True)
        # absolute: a relative path is the caller's (the current folder), not relative to out_dir/slides.csv
        write_labels_csv(csv_path, [LabeledItem(Path(p).absolute(), lab) for p, lab in rows])
        try:
            return _train_from_table(csv_path, out_dir, epochs, init_from, mil, train, model, **kwargs)
        except LabelsError as exc:
            if exc.path != csv_path:
                raise
            # the file is taken back (or an earlier run's restored) as the run fails: name the table's rows
            raise LabelsError(RETRAIN_TABLE, [_table_rows(p) for p in exc.problems]) from exc


#: What a problem in :func:`train_from_rows`' table is reported against (its ``slides.csv`` is taken back).
RETRAIN_TABLE = "the Retrain table"


def _table_rows(problem: str) -> str:
    """A ``slides.csv`` problem in table rows: line 2 is row 1 (under the header); "no rows" for an empty table.

    Only where :func:`wsltool.train.labels.read_labels` and the slide checks put line numbers: a path such as
    ``scan (line 2).svs`` stays as it is.
    """
    if problem == "no rows after the header":
        return "no rows"

    def row(n: str) -> str:
        return f"row {int(n) - 1}"

    problem = re.sub(r"^line (\d+): ", lambda m: f"{row(m[1])}: ", problem, count=1)
    problem = re.sub(r"^(row \d+: )duplicate of line (\d+): ", lambda m: f"{m[1]}duplicate of {row(m[2])}: ", problem)
    return re.sub(r" \(line (\d+)\) only in case$", lambda m: f" ({row(m[1])}) only in case", problem)


def _train_from_table(
    csv_path: Path,
    out_dir: Path,
    epochs: int,
    init_from: str | None,
    mil: dict[str, Any] | None,
    train: dict[str, Any] | None,
    model: dict[str, Any] | None,
    **kwargs: Any,
) -> SlideFitResult:
    """:func:`train_from_rows` once the table is written to ``csv_path``."""
    from wsltool.config import from_dict
    from wsltool.train.labels import read_labels

    items = read_labels(csv_path)
    names = sorted({it.label for it in items})
    tcfg = from_dict(TrainConfig, {**SLIDE_TRAIN_DEFAULTS, **(train or {}), "epochs": epochs}, source="retrain")
    mcfg = from_dict(
        ModelConfig, {**SLIDE_MODEL_DEFAULTS, **(model or {}), "num_classes": len(names)}, source="retrain"
    )
    if init_from:
        meta = read_checkpoint(init_from, "cpu")["meta"]
        # fine-tuning starts from a trained localizer: no WILDCAT warm-up again (an image checkpoint records
        # its own, e.g. 30 of 60 epochs, which a 10-epoch retrain could not even reach)
        mcfg = from_dict(
            ModelConfig,
            {**meta["config"], "pretrained": "none", "minmax_start": SLIDE_MODEL_DEFAULTS["minmax_start"]},
            source=str(init_from),
        )
        if list(meta["class_names"]) != names:
            msg = f"{init_from}: checkpoint classes {meta['class_names']} differ from the table's {names}"
            raise CheckpointError(msg)
    return train_from_items(
        items,
        out_dir,
        model_cfg=mcfg,
        train_cfg=tcfg,
        mil=from_dict(MilConfig, mil or {}, source="retrain"),
        class_names=names,
        init_from=init_from,
        **kwargs,
    )
