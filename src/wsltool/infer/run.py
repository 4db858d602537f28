"""``infer_slide``: slide file + checkpoint -> OME-Zarr heatmap store.  The one call every shell makes.

The CLI (``wsltool infer``), the cohort runner and the napari plugin all call :func:`infer_slide`.
Flow: open the slide (mpp first) -> tissue mask -> region grid over tissue -> stream regions through
DataLoader workers -> model (batched; channels_last on CPU; float16 autocast on GPU) -> per-region maps at
the output resolution -> :class:`~wsltool.infer.stitch.Stitcher` (smooth blending, chunk rows flushed
as soon as final) -> :class:`~wsltool.store.HeatmapStore` (pyramid, labels, provenance, result).
Memory is bounded by a few output chunk rows plus the loader's prefetch queue, whatever the slide size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsltool import __version__
from wsltool.config import InferConfig, TilingConfig, half_region_overlap, to_dict
from wsltool.device import resolve_device
from wsltool.errors import CheckpointError, ConfigError, WslError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class InferCancelledError(WslError):
    """Inference was cancelled (the store stays incomplete and can be resumed)."""

    exit_code = 130


@dataclass
class InferResult:
    """What :func:`infer_slide` produced.

    Attributes
    ----------
    store
        Path of the heatmap store.
    class_names
        The model's classes.
    probs
        Slide-level class probabilities (top-k mean of region probabilities).
    predicted
        The predicted class name.
    regions
        Regions over tissue (computed now + reused from an earlier run).
    computed
        Regions computed in this run (fewer than ``regions`` when resuming).
    tissue_mm2
        Tissue area in square millimetres.
    seconds
        Wall time of this run.
    timings
        Seconds per stage.
    """

    store: Path
    class_names: list[str]
    probs: list[float]
    predicted: str
    regions: int
    computed: int
    tissue_mm2: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self, slide: str | Path) -> str:
        """One line: slide, tissue area, regions, time, slide-level result, output path."""
        pr = ", ".join(f"{n} {p:.3f}" for n, p in zip(self.class_names, self.probs, strict=True))
        reused = f" ({self.regions - self.computed} reused)" if self.computed < self.regions else ""
        return (
            f"{Path(slide).name}: tissue {self.tissue_mm2:.2f} mm2, {self.regions} regions{reused}, "
            f"{self.seconds:.1f} s, {self.predicted} ({pr}) -> {self.store}"
        )


def region_geometry(cfg: InferConfig, meta: dict[str, Any]) -> tuple[int, int, int]:
    """The region size, overlap and output factor a run of ``cfg`` uses with a checkpoint of ``meta``.

    One rule for :func:`infer_slide` and the cohort's up-front check: the region defaults to the checkpoint's
    input size and may be 0.5x-2x of it; the overlap defaults to half the region and must be smaller; the
    output factor must divide the region and the stride (region - overlap), so that output pixels tile the
    grid exactly.

    Parameters
    ----------
    cfg
        Inference settings.
    meta
        The checkpoint's meta (``input_size``; ``path`` names it in messages when present).

    Returns
    -------
    (region, overlap, out_factor)

    Raises
    ------
    CheckpointError
        ``--region`` far from the checkpoint's input size.
    ConfigError
        An overlap not smaller than the region, or an output factor that does not divide region and stride;
        the message suggests values that do.
    """
    trained = meta.get("input_size")
    region = cfg.region or int(trained or 512)
    what = f"--region {region}" if cfg.region else f"region {region} (the checkpoint's input size)"
    if trained and not 0.5 * trained <= region <= 2 * trained:
        where = f"{meta['path']}: " if meta.get("path") else ""
        msg = (
            f"{where}--region {region} px is far from the checkpoint's input size {trained} px (allowed 0.5x-2x): "
            "the model's pooling was trained on that context; omit --region"
        )
        raise CheckpointError(msg)
    overlap = half_region_overlap(region) if cfg.overlap is None else cfg.overlap
    if overlap >= region:
        msg = f"--overlap {overlap} must be smaller than the {what}"
        raise ConfigError(msg)
    f, stride = cfg.out_factor, region - overlap
    if region % f or stride % f:
        both = math.gcd(region, stride)
        fits = max(d for d in range(1, min(f, both) + 1) if both % d == 0)
        hint = f"--out-factor {fits}"
        if not region % f:  # the factor fits the region: an overlap that is a multiple of it fits too
            hint = f"--overlap {min(region - f, -(-overlap // f) * f)} or {hint}"
        msg = f"--out-factor {f} must divide the {what} and the stride {stride} (region - overlap); try {hint}"
        raise ConfigError(msg)
    return region, overlap, f


#: Memory layout of the network and its input per device type (tools/bench/gpu.py, README "GPU path").
#: CPU (2 cores): channels_last, Lite0 7.3 vs 4.1 and ResNet-18 6.8 vs 5.4 regions/s.  CUDA (H200): NCHW, Lite0
#: 1470 vs 745 regions/s (cuDNN's depthwise convolutions are slow in channels_last; end to end 168 vs 77),
#: ResNet-18 3031 vs 3085 (within 2 %).  The benchmark overrides this to compare both end to end.
MEMORY_FORMAT: dict[str, str] = {"cpu": "channels_last", "cuda": "contiguous"}


#: Autocast dtype of inference on CUDA (``InferConfig.amp``).  float16, not bfloat16: on an H200 it was both
#: faster (Lite0 1596 vs 1470, ResNet-18 3344 vs 3031 regions/s, batch 64) and 18x closer to float32 (relative
#: error of the class maps 7e-5 vs 1.3e-3); a batch whose outputs overflow float16 is recomputed in float32.
#: Training keeps bfloat16 (no loss scaling needed).
AMP_DTYPE = "float16"


def localize_batch(net: Any, x: Any, size: tuple[int, int], amp: bool) -> tuple[dict[str, Any], bool]:
    """``net.localize`` on one batch, under float16 autocast when ``amp``.

    A batch whose outputs are not all finite (float16 overflow) is recomputed without autocast.

    Returns
    -------
    (out, redone)
        The outputs, and whether the batch was recomputed in float32.
    """
    import torch

    with torch.autocast(x.device.type, dtype=getattr(torch, AMP_DTYPE), enabled=amp):
        out = net.localize(x, size=size)
    if amp and not bool(torch.stack([torch.isfinite(v).all() for v in out.values()]).all()):  # one sync
        return net.localize(x, size=size), True
    return out, False


def memory_format(device: Any) -> Any:
    """The ``torch.memory_format`` the network runs in on ``device`` (see :data:`MEMORY_FORMAT`)."""
    import torch

    name = MEMORY_FORMAT.get(torch.device(device).type, "channels_last")
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def _load_model(model: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """A checkpoint path or an in-memory ``(module, meta)`` pair -> model on ``device`` + meta."""
    import copy

    import torch

    from wsltool.models.fuse import fuse_batchnorm

    if isinstance(model, str | Path):
        from wsltool.train.checkpoint import load_checkpoint

        net, meta = load_checkpoint(model, map_location="cpu")
    else:
        net, meta = model
        if isinstance(net, torch.nn.Module):
            net = copy.deepcopy(net)  # the caller's module keeps its mode and its BatchNorm layers
    if not hasattr(net, "localize"):
        msg = "model has no localize() method"
        raise CheckpointError(msg)
    net = net.eval()
    if isinstance(net, torch.nn.Module):
        fuse_batchnorm(net)  # inference only: BatchNorm folded into the convolutions (same outputs)
    net = net.to(device).to(memory_format=memory_format(device))
    return net, dict(meta)


def region_maps(out: dict[str, Any], positive: int) -> Any:
    """Per-region output channels, comparable across regions of a slide.

    The method's M+ is min-max normalised *per image*, which is right for an image known to hold
    the object, but on a slide most regions hold none: a benign region would still light up at 0.5.
    wsltool therefore stores, per region,

    - channel 0, ``M+``: normalised M+ x the region's positive-class probability (the classifier's,
      on X+ for min-max), so benign regions fade to 0 and lesions keep the method's localization;
    - channels 1..C: the pixel-wise softmax over classes of the localizer's class maps.

    Parameters
    ----------
    out
        ``model.localize`` output (``probs`` (B, C), ``mplus`` (B, h, w), ``class_maps`` (B, C, h, w)).
    positive
        Index of the positive (malignant) class.

    Returns
    -------
    torch.Tensor
        ``(B, 1 + C, h, w)`` float32 in [0, 1].
    """
    import torch

    gate = out["probs"][:, positive].float()[:, None, None]
    m = out["mplus"].float() * gate
    cls = torch.softmax(out["class_maps"].float(), dim=1)
    return torch.cat([m[:, None], cls], dim=1)


def infer_slide(
    slide_path: str | Path,
    out_path: str | Path,
    model: str | Path | tuple[Any, dict[str, Any]],
    config: InferConfig | None = None,
    *,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    resume: bool = True,
    progress: ProgressFn | bool = False,
    cancel: threading.Event | None = None,
    on_band: Callable[[], None] | None = None,
) -> InferResult:
    """Run the localizer over the tissue of one slide and write a heatmap store.

    Parameters
    ----------
    slide_path
        Slide file (anything :func:`wsltool.slide.open_slide` reads).
    out_path
        Output OME-Zarr store (``*.zarr``).
    model
        Checkpoint path, or ``(module, meta)`` as returned by ``load_checkpoint``.
    config
        Inference settings (mpp, region, overlap, batch, workers, device...).
    slide_mpp
        Level-0 mpp override for slides whose metadata lacks it (recorded in the store).
    overwrite
        Replace a finished store (the old one stays intact until the new one is complete).
    resume
        Continue an incomplete store made with the same slide, model and settings.
    progress
        ``True`` for a tqdm bar, or a callback ``fn(done, total)``.
    cancel
        Set it to stop early; the store stays incomplete and resumable.
    on_band
        Called after each chunk row is flushed (the napari plugin refreshes its layer).

    Returns
    -------
    InferResult
        Slide-level result and bookkeeping.

    Raises
    ------
    WslError
        ``SlideError`` for unreadable slides, ``MppError`` without usable mpp, ``CheckpointError`` for a
        bad or mismatched checkpoint, ``StoreExistsError``/``StoreError`` for the output.
    """
    import torch

    from wsltool.infer.aggregate import topk_mean
    from wsltool.infer.stitch import Stitcher
    from wsltool.models.ensemble import with_tta
    from wsltool.slide import open_slide
    from wsltool.store import HeatmapStore
    from wsltool.stream import STREAM_CACHE_BYTES, RegionStream, make_loader
    from wsltool.tiling import Grid
    from wsltool.tissue import detect_tissue

    cfg = config or InferConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    slide_path, out_path = Path(slide_path), Path(out_path)

    slide = open_slide(slide_path, mpp=slide_mpp)
    slide.limit_cache(STREAM_CACHE_BYTES)  # this handle reads the tissue overview once
    try:
        base_mpp = slide.mpp  # MppError when absent
        device = resolve_device(cfg.device)
        t0 = time.perf_counter()
        net, meta = _load_model(model, device)
        net = with_tta(net, cfg.tta)
        timings["load_model"] = time.perf_counter() - t0
        class_names = list(meta["class_names"])
        pos_name = (meta.get("train_config") or {}).get("positive_class") or class_names[-1]
        pos = class_names.index(pos_name) if pos_name in class_names else len(class_names) - 1
        mpp = cfg.mpp or meta.get("mpp") or 1.0
        region, overlap, f = region_geometry(cfg, meta)
        stride = region - overlap
        out_mpp = mpp * f
        # top_k counts regions at the validation grid's density (stride = half a region); denser grids see each
        # spot in more regions, so k grows with them and the slide score covers the same tissue area
        top_k = max(1, round(cfg.top_k * ((region - half_region_overlap(region)) / stride) ** 2))
        tiling = TilingConfig(
            mpp=mpp, region=region, overlap=overlap, min_tissue=cfg.min_tissue, tissue_mpp=cfg.tissue_mpp
        )
        provenance = {
            "wsltool_version": __version__,
            "slide": {
                "path": str(slide_path.resolve()),
                "fingerprint": slide.fingerprint(),
                "dimensions": list(slide.dimensions),
                "format": slide.format,
                "mpp": base_mpp,
                "mpp_source": slide.mpp_source,
            },
            "mpp": {"requested": cfg.mpp, "effective": mpp, "out": out_mpp},
            "tiling": to_dict(tiling),
            "model": {
                "path": str(model) if isinstance(model, str | Path) else None,
                "fingerprint": meta.get("fingerprint"),
                "method": meta.get("method"),
                "class_names": class_names,
            },
            "config": to_dict(dataclasses.replace(cfg, mpp=mpp, region=region, overlap=overlap)),
            "aggregation": f"top-{top_k} mean of region class probabilities",
        }
        # output checks before any heavy work
        t0 = time.perf_counter()
        tissue = detect_tissue(slide, mpp=cfg.tissue_mpp)
        grid = Grid.for_slide(slide, tiling, tissue)
        timings["tissue_and_grid"] = time.perf_counter() - t0
        gw, gh = grid.grid_size
        shape_yx = (-(-gh // f), -(-gw // f))
        boxes = np.array([(gy // f, gx // f, region // f, region // f) for gx, gy in grid.origins], dtype=np.int64)
        store = HeatmapStore.create(
            out_path,
            shape_yx=shape_yx,
            out_mpp=out_mpp,
            slide_mpp=base_mpp,
            channel_names=["M+", *class_names],
            provenance=provenance,
            chunk=cfg.chunk,
            overwrite=overwrite,
            resume=resume,
        )
        if store.complete:  # resume=True met a finished, matching store: nothing to do
            res = store.result or {}
            log.info("%s: already complete", out_path)
            kept = [
                f"{name} {old} (asked: {new})"
                for name, old, new in (
                    ("threshold", store.threshold, cfg.threshold),
                    ("aggregation", res.get("aggregation"), provenance["aggregation"]),
                )
                if old is not None and old != new
            ]
            if kept:  # the maps match; what finalize derived from them is the earlier run's
                outline = " (or `wsltool export --threshold` for another outline)" if "threshold" in kept[0] else ""
                log.warning(
                    "%s: finished store kept with its %s; to redo it, replace it (`wsltool infer --overwrite`, "
                    "or delete it before a cohort run)%s",
                    out_path,
                    "; ".join(kept),
                    outline,
                )
            return InferResult(
                store=out_path,
                class_names=class_names,
                probs=list(res.get("probs", [])),
                predicted=str(res.get("predicted", "")),
                regions=int(res.get("regions", len(grid))),
                computed=0,
                tissue_mm2=float(res.get("tissue_mm2", tissue.area_mm2)),
                seconds=time.perf_counter() - t_start,
                timings=timings,
            )
        stitcher = Stitcher(store, boxes, overlap=overlap // f, resume=resume)
        pending = np.asarray(stitcher.pending_indices(), dtype=np.int64)
        probs_arr = store.region_table(len(grid), len(class_names))
        n_total, n_todo = len(grid), int(pending.size)
        log.info("%s: %d regions over tissue, %d to compute", slide_path.name, n_total, n_todo)

        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=n_total, initial=n_total - n_todo, unit="region", desc=slide_path.name)
        t0 = time.perf_counter()
        if n_todo:
            stream = RegionStream.from_grid(slide_path, grid, indices=pending, slide_mpp=slide_mpp)
            loader = make_loader(
                stream,
                batch_size=cfg.batch_size,
                num_workers=min(cfg.workers, max(1, n_todo // cfg.batch_size)) if cfg.workers else 0,
                pin_memory=device.type == "cuda",
            )
            use_amp = cfg.amp and device.type == "cuda"
            out_size = (region // f, region // f)
            fallbacks = 0
            fmt = memory_format(device)
            done = n_total - n_todo
            with torch.inference_mode():
                for x, info in loader:
                    if cancel is not None and cancel.is_set():
                        msg = f"{slide_path}: cancelled; run again to resume"
                        raise InferCancelledError(msg)
                    x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
                    out, redone = localize_batch(net, x, out_size, use_amp)
                    fallbacks += redone
                    if redone and fallbacks == 1:
                        log.warning("%s: float16 overflow in a batch; such batches run in float32", slide_path)
                    maps = region_maps(out, pos).cpu().numpy()
                    p = out["probs"].float().cpu().numpy()
                    idx = info[:, 0].numpy()
                    probs_arr[idx] = p
                    flushed = 0
                    for k, i in enumerate(idx):
                        flushed += stitcher.add(int(i), maps[k])
                    if flushed and on_band is not None:
                        on_band()
                    done += len(idx)
                    if bar is not None:
                        bar.update(len(idx))
                    elif callable(progress):
                        progress(done, n_total)
        if bar is not None:
            bar.close()
        timings["regions"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        region_probs = probs_arr[:] if n_total else np.zeros((0, len(class_names)))
        slide_probs = topk_mean(region_probs, top_k)
        pred = class_names[int(np.argmax(slide_probs))]
        tissue_mm2 = float(tissue.area_mm2)
        result = {
            "class_names": class_names,
            "probs": [float(v) for v in slide_probs],
            "predicted": pred,
            "regions": n_total,
            "tissue_mm2": tissue_mm2,
            "aggregation": provenance["aggregation"],
        }
        stitcher.finalize(result, tissue.mask, cfg.threshold, tissue_mpp=tissue.mpp)
        timings["finalize"] = time.perf_counter() - t0
        seconds = time.perf_counter() - t_start
        store.set_timings({**timings, "total": seconds})
        return InferResult(
            store=out_path,
            class_names=class_names,
            probs=result["probs"],
            predicted=pred,
            regions=n_total,
            computed=n_todo,
            tissue_mm2=tissue_mm2,
            seconds=seconds,
            timings=timings,
        )
    finally:
        slide.close()
