"""Real (random-weight or briefly trained) checkpoints for tests and demos (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def make_checkpoint(
    path: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    method: str = "minmax",
    input_size: int = 128,
    mpp: float = 1.0,
    class_names: Sequence[str] = ("benign", "malignant"),
    seed: int = 0,
    **model_kwargs: Any,
) -> Path:
    """Write a real checkpoint of an untrained model (random weights, fixed seed, no download).

    Useful wherever a test needs a loadable model but not a meaningful one (plumbing, widgets,
    cohort runs). The file is what :func:`wsltool.train.checkpoint.save_checkpoint` writes.
    """
    import torch

    from wsltool.config import ModelConfig
    from wsltool.models import build_model
    from wsltool.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    kw: dict[str, Any] = {"minmax_start": 0, **model_kwargs}  # a saved model records its warm-up as a number
    cfg = ModelConfig(method=method, backbone=backbone, pretrained="none", num_classes=len(class_names), **kw)  # type: ignore[arg-type]
    model = build_model(cfg)
    save_checkpoint(path, model, class_names=list(class_names), mpp=mpp, input_size=input_size)
    return Path(path)
