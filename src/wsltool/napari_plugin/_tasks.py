"""Tasks that run in the plugin's worker process (they may import torch; the viewer never imports this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Emit = Callable[..., None]


def localize(
    *,
    emit: Emit,
    cancelled: Callable[[], bool],
    slide: str,
    out: str,
    model: str,
    slide_mpp: float | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run :func:`wsltool.infer.run.infer_slide`, reporting ``progress`` and ``band`` messages."""
    import threading

    from wsltool.config import InferConfig, from_dict
    from wsltool.infer.run import infer_slide

    cfg = from_dict(InferConfig, config or {}, source="napari localize")

    class _Cancel(threading.Event):
        def is_set(self) -> bool:
            return cancelled()

    res = infer_slide(
        slide,
        out,
        model,
        cfg,
        slide_mpp=slide_mpp,
        overwrite=overwrite,
        progress=lambda done, total: emit("progress", (done, total)),
        cancel=_Cancel(),
        on_band=lambda: emit("band"),
    )
    return {
        "store": str(res.store),
        "predicted": res.predicted,
        "probs": dict(zip(res.class_names, res.probs, strict=True)),
        "regions": res.regions,
        "seconds": res.seconds,
        "summary": res.summary(slide),
    }


def retrain(
    *,
    emit: Emit,
    cancelled: Callable[[], bool],
    rows: list[tuple[str, str]],
    out_dir: str,
    epochs: int = 10,
    init_from: str | None = None,
    mil: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train from ``(slide path, label)`` rows with :func:`wsltool.train.slides.train_from_rows`."""
    from wsltool.train.slides import train_from_rows

    res = train_from_rows(
        rows,
        Path(out_dir),
        epochs=epochs,
        init_from=init_from,
        mil=mil,
        train=train,
        model=model,
        on_epoch=lambda rec: emit("epoch", rec),
        should_stop=cancelled,
    )
    last = res.history[-1] if res.history else {}
    return {
        "best": str(res.best),
        "epochs": len(res.history),
        "best_epoch": res.best_epoch,
        "valid_error": last.get("valid_error"),
        "valid_auc": last.get("valid_auc"),
        "stopped": cancelled(),
    }
