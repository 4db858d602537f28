"""Regenerate the napari screenshots of the README (``docs/img/napari_*.png``) and time the slide reader.

Needs an X display with OpenGL (napari renders through vispy); headless, run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python tools/screenshots.py
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python tools/screenshots.py --big-slide /tmp/big.svs

What it does, with the plugin's real code paths (the viewer process never imports torch):

1. ``napari_overlay.png``: the sample data (a generated H&E-like slide and its illustrative heatmap) with the
   Localize widget's mask contour at threshold 0.5 (canvas only).
2. ``napari_retrain.png``: the Retrain widget after training 2 epochs on a generated 6-slide cohort in its
   worker process (the table loaded from the cohort's CSV).
3. ``napari_localize.png``: the Localize widget after running the checkpoint just trained on the sample
   slide in its worker process (the checkpoint field was filled by Retrain).

``--big-slide PATH`` times the reader on a large slide (written first with
:func:`wsltool.testing.big.write_large_svs` when PATH does not exist, 56000 x 36000 px = 2.0 gigapixels):
the reader call, and the time until napari has drawn the whole slide on screen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000


def wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Process Qt events until ``pred()`` is true."""
    from qtpy.QtCore import QCoreApplication

    t0 = time.monotonic()
    while not pred():
        QCoreApplication.processEvents()
        time.sleep(0.05)
        if time.monotonic() - t0 > timeout:
            sys.exit(f"screenshots: timed out waiting for {what}")
    QCoreApplication.processEvents()


def save_png(img: Any, path: Path) -> None:
    """Save an RGB(A) array or a QPixmap as PNG, palette-quantised when needed to stay under 300 KB."""
    import numpy as np
    from PIL import Image

    if not isinstance(img, np.ndarray):  # QPixmap -> array
        qimg = img.toImage()
        tmp = path.with_suffix(".tmp.png")
        qimg.save(str(tmp))
        arr = np.asarray(Image.open(tmp).convert("RGB"))
        tmp.unlink()
    else:  # a canvas: crop the empty (black) margins around the slide
        arr = img[..., :3]
        rows, cols = np.flatnonzero(arr.any(axis=(1, 2))), np.flatnonzero(arr.any(axis=(0, 2)))
        if rows.size and cols.size:
            arr = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    im = Image.fromarray(np.ascontiguousarray(arr))
    im.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({path.stat().st_size // 1024} KB)")


def grab(widget: Any) -> Any:
    """A QPixmap of a magicgui widget, cut below its last control (no empty dock space)."""
    from qtpy.QtCore import QRect

    native = widget.native
    height = min(native.height(), native.sizeHint().height() + 8)
    return native.grab(QRect(0, 0, native.width(), height))


def time_big_slide(path: Path) -> None:
    """Time the reader and the first full draw of a large slide."""
    import napari
    import numpy as np

    from wsltool.napari_plugin._reader import read_slide

    if not path.exists():
        from wsltool.testing.big import write_large_svs

        print(f"writing {path} (56000 x 36000 px)...", flush=True)
        t0 = time.perf_counter()
        write_large_svs(path, 56000, 36000, tissue_fraction=0.3, seed=7)
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    wait(lambda: True, 1, "the window")
    t0 = time.perf_counter()
    [(data, kw, _)] = read_slide(str(path))
    t_read = time.perf_counter() - t0
    layer = viewer.add_image(data, **kw)
    viewer.reset_view()
    img = viewer.screenshot(canvas_only=True, flash=False)  # draws: loads the coarse level's chunks in view
    t_show = time.perf_counter() - t0
    gpx = data[0].shape[0] * data[0].shape[1] / 1e9
    tissue = float((np.asarray(img)[..., :3].astype(int).std(axis=-1) > 8).mean())
    print(
        f"{path.name}: {data[0].shape[1]} x {data[0].shape[0]} px ({gpx:.2f} gigapixels), {len(data)} levels "
        f"{[tuple(int(v) for v in a.shape[:2]) for a in data]}, mpp {kw['scale'][0]}"
    )
    print(f"  reader (open + lazy pyramid): {t_read:.2f} s; first full view drawn: {t_show:.2f} s")
    print(f"  level drawn: {layer.data_level}; coloured (tissue) fraction of the view {tissue:.2f}")
    # zoom to full resolution on tissue: napari now reads the level-0 tiles in view
    low = np.asarray(data[-1])
    ys, xs = np.nonzero(low.std(axis=-1) > 8)
    ds = data[0].shape[0] / low.shape[0]
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (ys[len(ys) // 2] * ds * kw["scale"][0], xs[len(xs) // 2] * ds * kw["scale"][1])
    camera.zoom = 1.0 / kw["scale"][0]  # one screen pixel per slide pixel
    t0 = time.perf_counter()
    img = viewer.screenshot(canvas_only=True, flash=False)
    tissue = float((np.asarray(img)[..., :3].astype(int).std(axis=-1) > 8).mean())
    print(
        f"  zoom to full resolution on tissue, view drawn: {time.perf_counter() - t0:.2f} s "
        f"(level {layer.data_level}; tissue fraction of the view {tissue:.2f})"
    )
    viewer.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--big-slide", type=Path, default=None, help="time the reader on this (2-gigapixel) slide")
    ap.add_argument("--no-screenshots", action="store_true", help="only the timing")
    args = ap.parse_args(argv)

    if args.big_slide is not None:
        time_big_slide(args.big_slide)
    if args.no_screenshots:
        return 0

    import napari

    from wsltool.napari_plugin._sample import make_sample
    from wsltool.napari_plugin._widgets import LocalizeWidget, RetrainWidget
    from wsltool.testing.cohort import make_cohort

    work = args.work or Path(tempfile.mkdtemp(prefix="wsltool-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    slide, store = make_sample(work)
    make_cohort(work / "cohort", {"all": (3, 3)}, size=(768, 1024), seed=2)

    viewer = napari.Viewer(show=True, title="wsltool")
    viewer.window._qt_window.resize(1500, 950)
    viewer.open(str(slide), plugin="wsltool")
    viewer.open(str(store), plugin="wsltool")
    loc = LocalizeWidget(viewer)
    loc_dock = viewer.window.add_dock_widget(loc, name="Localize", area="right")
    ret = RetrainWidget(
        viewer,
        mil={"region": 128, "score_cap": 16},
        model={"backbone": "efficientnet_lite0", "pretrained": "none"},
    )
    ret_dock = viewer.window.add_dock_widget(ret, name="Retrain", area="right", tabify=True)
    loc.threshold.value = 0.5  # the mask at the store's threshold, as a contour
    loc._apply_threshold()
    viewer.reset_view()
    wait(lambda: True, 1, "the first draw")
    save_png(viewer.screenshot(canvas_only=True, flash=False), args.out / "napari_overlay.png")

    # Retrain: a cohort CSV, 2 epochs in the worker process
    ret.csv.value = work / "cohort" / "all.csv"
    ret.epochs.value = 2
    ret.out.value = work
    ret.run_btn.native.click()
    wait(lambda: not ret.running, 900, "training")
    if ret.checkpoint is None:
        sys.exit(f"screenshots: training failed: {ret.status.value}")
    ret_dock.raise_()
    wait(lambda: True, 1, "the Retrain tab")
    save_png(grab(ret), args.out / "napari_retrain.png")

    # Localize: the new checkpoint (filled in by Retrain) on the sample slide
    loc.slide.value = viewer.layers[slide.name]
    loc.overlap.value = 0
    loc.out.value = work / "run.zarr"
    loc.config["workers"] = 0
    loc.run_btn.native.click()
    wait(lambda: not loc.running, 600, "localization")
    if loc.last_result is None:
        sys.exit(f"screenshots: localization failed: {loc.result.value}")
    loc_dock.raise_()
    wait(lambda: True, 1, "the Localize tab")
    save_png(grab(loc), args.out / "napari_localize.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
