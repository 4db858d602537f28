"""Image-level training: min-max (or baseline) losses, validation, checkpoints, resume.

Checkpoint selection needs no masks (``TrainConfig.select``): ``"error_loss"`` (default) = lowest validation
classification error, then lowest validation loss (cross-entropy of the method's classifier); ``"error"`` = lowest
validation error alone (method.md); ``"loss"`` = lowest validation loss; ``"last"`` = the last validated epoch.
Ties go to the later epoch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsltool.config import ModelConfig, TrainConfig, resolve_for_training, to_dict
from wsltool.errors import ConfigError
from wsltool.models import build_model
from wsltool.train.checkpoint import config_differences, model_differences, resume_training, save_checkpoint
from wsltool.train.data import ImageSet
from wsltool.train.labels import LabeledItem
from wsltool.train.rundir import check_new_run, run_dir

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    best
        Path of the best checkpoint (``best.pt``).
    last
        Path of the last checkpoint (``last.pt``).
    history
        One dict per epoch (losses, validation error/loss, lr, seconds).
    best_epoch
        Epoch of ``best``.
    seconds
        Training wall time of this call.
    """

    best: Path
    last: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at a (fractional) epoch: linear warm-up then the schedule."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, epoch / cfg.epochs)))
    if cfg.schedule == "step":
        return float(cfg.gamma ** int(epoch // cfg.step_epochs))
    return 1.0


def selection_key(rec: dict[str, Any], select: str) -> tuple[float, float]:
    """Key (lower is better, ties -> later epoch) of a validated epoch for the ``select`` rule."""
    if select == "error_loss":
        return (float(rec["valid_error"]), float(rec["valid_loss"]))
    if select == "error":
        return (float(rec["valid_error"]), 0.0)
    if select == "loss":
        return (float(rec["valid_loss"]), 0.0)
    return (0.0, 0.0)  # "last"


def barrier_t(epoch: int, cfg: TrainConfig) -> float:
    """Log-barrier parameter t of the size prior at ``epoch``.

    ``barrier_t0 * barrier_growth ** epoch``, capped at ``barrier_tmax`` (TMI: 5, x1.01 per epoch, 10).
    """
    return float(min(cfg.barrier_t0 * cfg.barrier_growth**epoch, cfg.barrier_tmax))


def sigma_at(epoch: int, model_cfg: ModelConfig, cfg: TrainConfig) -> float | None:
    """Pseudo-binary sigma at ``epoch``: ``ModelConfig.sigma`` moved linearly to ``sigma_end`` at the last epoch.

    None when ``sigma_end`` is None (the model's constant ``sigma``).  TMI: 0.15 -> 0.2.
    """
    if cfg.sigma_end is None:
        return None
    return float(model_cfg.sigma + (cfg.sigma_end - model_cfg.sigma) * epoch / max(1, cfg.epochs - 1))


def set_infer_sigma(model: torch.nn.Module, sigma: float | None) -> None:
    """Let ``model`` validate and infer with the sigma it trains with this epoch (min-max models only)."""
    if hasattr(model, "infer_sigma"):
        setattr(model, "infer_sigma", sigma)  # noqa: B010 (a MinMaxNet attribute, not a declared Module one)


def improves(key: tuple[float, ...] | None, best_key: tuple[float, ...] | None) -> bool:
    """Whether an epoch with selection ``key`` becomes the best so far.

    Lower is better; a tie goes to the later epoch; ``None`` (the epoch was not validated) never does.
    """
    return key is not None and (best_key is None or key <= best_key)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    is_bb = ("backbone.", "cls_backbone.")  # pretrained parts (the classifier's own copy included)
    bb = [p for n, p in model.named_parameters() if n.startswith(is_bb) and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if not n.startswith(is_bb) and p.requires_grad]
    groups = [{"params": heads, "base_lr": cfg.lr}]
    if cfg.backbone_lr_mult > 0:
        groups.append({"params": bb, "base_lr": cfg.lr * cfg.backbone_lr_mult})
    else:
        for p in bb:
            p.requires_grad_(False)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def validate(model: Any, data: ImageSet, device: str) -> dict[str, float]:
    """Validation error (%) and loss (cross-entropy of the method's classifier) on whole images."""
    model.eval()
    wrong, loss = 0, 0.0
    with torch.inference_mode():
        for img, y in zip(data.images, data.labels, strict=True):
            p = model.localize(img[None].to(device), size=(8, 8))["probs"][0].cpu()
            wrong += int(int(p.argmax()) != y)
            loss += float(-torch.log(p[y].clamp_min(1e-8)))
    n = max(1, len(data))
    return {"valid_error": 100.0 * wrong / n, "valid_loss": loss / n}


def fit(
    train_items: Sequence[LabeledItem],
    valid_items: Sequence[LabeledItem],
    class_names: Sequence[str],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    mpp: float | None = None,
) -> FitResult:
    """Train a model on labelled images; write ``last.pt``, ``best.pt`` and ``history.jsonl`` to ``out_dir``.

    Parameters
    ----------
    train_items, valid_items
        Training and validation images (validation may be empty: then the last epoch is the best).
    class_names
        Class order (label index).
    model_cfg, train_cfg
        Configurations.
    out_dir
        Output folder.
    resume
        Continue from ``out_dir/last.pt`` (same configurations required).
    overwrite
        Replace a run already in ``out_dir`` (without it, or ``resume``, such a folder is refused before
        anything is written: :mod:`wsltool.train.rundir`).  The earlier run's files are removed only once the
        model is built and any resume state is loaded.
    device
        ``"cpu"``, ``"cuda"``...; default CUDA when available.
    progress
        Show a tqdm progress bar with the losses.
    mpp
        Microns per pixel of the images, stored in the checkpoint.

    Returns
    -------
    FitResult
    """
    from tqdm import tqdm

    if model_cfg.num_classes != len(class_names):
        msg = f"model has {model_cfg.num_classes} classes, the labels have {len(class_names)}"
        raise ConfigError(msg)
    model_cfg = resolve_for_training(model_cfg, train_cfg.epochs)  # as the checkpoints record it
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    check_new_run(out, resume=resume, overwrite=overwrite)
    torch.manual_seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    model: Any = build_model(model_cfg).to(dev)
    opt = _optimizer(model, train_cfg)
    use_amp = train_cfg.amp and dev.startswith("cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    start = 0
    history: list[dict[str, Any]] = []
    best_key: tuple[float, float] | None = None
    best_epoch = -1
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        start, saved_key, best_epoch, history = resume_training(
            last_path,
            model,
            opt,
            dev,
            lambda meta: (
                model_differences(meta["config"], model_cfg)
                + config_differences(meta.get("train_config"), to_dict(train_cfg), "train.")
            ),
        )
        best_key = (saved_key[0], saved_key[1]) if saved_key else None
    train_set = ImageSet(train_items, class_names, crop=train_cfg.crop, color_jitter=train_cfg.color_jitter)
    valid_set = ImageSet(valid_items, class_names) if valid_items else None
    with run_dir(out, resume=resume, overwrite=overwrite):  # an earlier run comes back if this one fails first
        t_start = time.perf_counter()
        n_batches = math.ceil(len(train_set) / train_cfg.batch_size)
        for epoch in range(start, train_cfg.epochs):
            torch.manual_seed(train_cfg.seed * 100003 + epoch)  # reproducible per epoch, also after --resume
            gen = torch.Generator().manual_seed(train_cfg.seed * 7919 + epoch)
            loader = torch.utils.data.DataLoader(
                train_set,
                batch_size=train_cfg.batch_size,
                shuffle=True,
                drop_last=len(train_set) > train_cfg.batch_size,
                generator=gen,
                num_workers=train_cfg.workers,
            )
            model.train()
            t_ep = time.perf_counter()
            sums: dict[str, float] = {}
            correct, seen = 0, 0
            bar = tqdm(
                loader,
                total=n_batches,
                disable=not progress,
                desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                unit="batch",
                leave=False,
            )
            t_bar = barrier_t(epoch, train_cfg)
            sigma = sigma_at(epoch, model_cfg, train_cfg)
            set_infer_sigma(model, sigma)
            n_done = 0
            for i, (xb, yb) in enumerate(bar):
                n_done += 1
                f = lr_factor(epoch + i / n_batches, train_cfg)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
                x = xb.to(dev, non_blocking=True)
                y = yb.to(dev)
                xn = model.normalize(x)
                with torch.autocast(dev.split(":")[0], dtype=amp_dtype, enabled=use_amp):
                    losses = model.training_losses(xn, y, epoch=epoch, barrier_t=t_bar, sigma=sigma)
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses["total"]).backward()
                scaler.step(opt)
                scaler.update()
                correct += int((losses["_scores"].argmax(1) == y).sum())
                seen += int(y.numel())
                for k, v in losses.items():
                    if not k.startswith("_"):
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.set_postfix({k: f"{v / (i + 1):.3f}" for k, v in sums.items() if k != "passes"})
            rec: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "barrier_t": t_bar}
            rec.update({k: v / max(1, n_done) for k, v in sums.items()})
            rec["train_loc_error"] = 100.0 * (1 - correct / max(1, seen))
            rec["train_seconds"] = time.perf_counter() - t_ep
            last_epoch = epoch == train_cfg.epochs - 1
            if valid_set is not None and ((epoch + 1) % train_cfg.eval_every == 0 or last_epoch):
                rec.update(validate(model, valid_set, dev))
                key: tuple[float, float] | None = selection_key(rec, train_cfg.select)
            elif valid_set is None:
                key = (0.0, 0.0)
            else:
                key = None
            is_best = improves(key, best_key)
            if is_best:
                best_key, best_epoch = key, epoch
            rec["best"] = is_best
            history.append(rec)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
            with (out / "history.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            state = {
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "best_key": list(best_key) if best_key else None,
                "best_epoch": best_epoch,
                "history": json.dumps(history),
            }
            common: dict[str, Any] = {
                "class_names": class_names,
                "mpp": mpp,
                "input_size": train_cfg.crop,
                "train_config": to_dict(train_cfg),
            }
            save_checkpoint(last_path, model, train_state=state, extra={"epoch": epoch}, **common)
            if is_best:
                save_checkpoint(
                    best_path,
                    model,
                    extra={"epoch": epoch, "valid_error": rec.get("valid_error"), "valid_loss": rec.get("valid_loss")},
                    **common,
                )
            if progress:
                msg = " ".join(f"{k}={v:.3f}" for k, v in rec.items() if isinstance(v, float) and k != "lr")
                tqdm.write(f"epoch {epoch + 1}/{train_cfg.epochs} {msg}{' *' if is_best else ''}")
    return FitResult(best_path, last_path, history, best_epoch, time.perf_counter() - t_start)


__all__ = [
    "FitResult",
    "barrier_t",
    "fit",
    "improves",
    "lr_factor",
    "selection_key",
    "set_infer_sigma",
    "sigma_at",
    "validate",
]
