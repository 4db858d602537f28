"""The Localize and Retrain dock widgets (magicgui containers; thin: settings -> a worker-process job).

Both run their work through :class:`~wsltool.napari_plugin._jobs.ProcessJob`, polled by a Qt timer, so
the viewer stays responsive, never imports torch, and survives a crash of the job.  Bad input is
reported as a napari notification, never as a traceback.
"""

from __future__ import annotations

import logging
import tempfile
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
    TextEdit,
)
from qtpy.QtCore import QTimer

from wsltool.napari_plugin._jobs import ProcessJob
from wsltool.napari_plugin._reader import PARTIAL_SUFFIX
from wsltool.paths import output_folder_problem
from wsltool.train.rundir import next_free_dir

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

_LOCALIZERS: weakref.WeakSet[LocalizeWidget] = weakref.WeakSet()

LOCALIZE_TASK = "wsltool.napari_plugin._tasks:localize"
RETRAIN_TASK = "wsltool.napari_plugin._tasks:retrain"


def _notify(msg: str, kind: str = "error") -> None:
    """Show ``msg`` as a napari notification (``kind``: ``error``, ``warning`` or ``info``)."""
    from napari.utils import notifications

    log.info("%s: %s", kind, msg)
    getattr(notifications, f"show_{kind}")(msg)


def _file_problem(txt: str, suffix: str | None = None) -> str | None:
    """Why the text of a file field does not name a usable file (``suffix``: the ending it needs), or None."""
    if txt in ("", "."):  # magicgui shows an empty field as "."
        return "none chosen"
    p = Path(txt)
    if p.is_dir():
        return f"{txt} is a folder, not a file"
    if not p.is_file():
        return f"{txt} not found"
    if suffix is not None and p.suffix.lower() != suffix:
        return f"{txt} is not a {suffix} file"
    return None


def _other_slides_store(store: Path, slide: str) -> str | None:
    """The slide whose heatmap ``store`` holds when that is not ``slide`` (a store to keep), else None."""
    from wsltool.slide import open_slide
    from wsltool.store import HeatmapStore

    if not store.is_dir():
        return None
    try:
        recorded = HeatmapStore.open(store).provenance.get("slide") or {}
    except Exception:  # not a store (the run refuses it), or a damaged one (the run replaces it)
        return None
    other = recorded.get("path")
    if not other or Path(other).resolve() == Path(slide).resolve():
        return None
    try:  # the same slide moved or copied along with its store: the same bytes
        with open_slide(slide) as s:
            if recorded.get("fingerprint") and s.fingerprint() == recorded["fingerprint"]:
                return None
    except Exception:  # the run reports a slide it cannot open
        return None
    return str(other)


def _slide_layers(viewer: napari.Viewer) -> list[Any]:
    return [ly for ly in viewer.layers if (ly.metadata.get("wsltool") or {}).get("kind") == "slide"]


def _same_viewer(a: Any, b: Any) -> bool:
    """Whether two viewer references (napari may hand out proxies) are the same viewer."""
    return getattr(a, "__wrapped__", a) is getattr(b, "__wrapped__", b)


def _table_value(rows: list[tuple[str, str]]) -> dict[str, Any]:
    """A magicgui Table value ("split" layout: data, index and columns) for ``(path, label)`` rows."""
    # rows are numbered from 1, as a failed run's message counts them (wsltool.train.slides.train_from_rows)
    return {"data": [list(r) for r in rows], "index": tuple(range(1, len(rows) + 1)), "columns": ("path", "label")}


def _partial_path(store: Path) -> Path:
    """Where :meth:`wsltool.store.HeatmapStore.create` writes while a complete store is overwritten."""
    return store.with_name(f".{store.name}{PARTIAL_SUFFIX}")


class _JobHost:
    """What both widgets share: a worker-process job polled by a Qt timer, ended with the dock."""

    job: ProcessJob | None
    _timer: QTimer

    def _on_destroyed(self, _obj: Any = None) -> None:
        """The dock was closed: stop polling and end a running job (it must not outlive the viewer)."""
        self._timer.stop()
        if self.job is not None and not self.job.finished:
            self.job.kill()

    @property
    def running(self) -> bool:
        """Whether a job is running."""
        return self.job is not None and not self.job.finished


class LocalizeWidget(_JobHost, Container):
    """Run the localizer on an open slide; the heatmap grows on the slide as regions finish.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    config
        Extra :class:`wsltool.config.InferConfig` settings merged into what the fields give (for
        example ``{"workers": 0, "batch_size": 16}``).
    """

    def __init__(self, napari_viewer: napari.Viewer, *, config: dict[str, Any] | None = None) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.config: dict[str, Any] = {"workers": 1, **(config or {})}
        self.slide = ComboBox(label="slide", choices=self._slide_choices, nullable=False)
        self.model = FileEdit(label="checkpoint", filter="*.pt", mode=FileDialogMode.EXISTING_FILE)
        self.slide_mpp = FloatSpinBox(label="slide mpp (0 = file)", value=0.0, min=0.0, max=20.0, step=0.01)
        self.mpp = FloatSpinBox(label="input mpp (0 = model)", value=0.0, min=0.0, max=20.0, step=0.05)
        self.region = SpinBox(label="region px (0 = model)", value=0, min=0, max=4096, step=16)
        self.overlap = SpinBox(label="overlap px (-1 = half the region)", value=-1, min=-1, max=2048, step=8)
        self.tta = ComboBox(
            label="view averaging",
            choices=[("none", "none"), ("4 views (flips), 4x time", "flips"), ("8 views (d4), 8x time", "d4")],
            value="none",
            tooltip="average each region's maps over flipped/rotated views (test-time augmentation)",
        )
        self.out = FileEdit(label="output store", mode=FileDialogMode.EXISTING_DIRECTORY)
        self.run_btn = PushButton(text="Localize")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="regions", value=0, min=0, max=1)
        self.result = Label(label="slide result", value="-")
        self.threshold = FloatSlider(label="mask threshold", value=0.5, min=0.05, max=0.95, step=0.05)
        self.export_btn = PushButton(text="Export GeoJSON + PNG")
        self.extend(
            [
                self.slide,
                self.model,
                self.slide_mpp,
                self.mpp,
                self.region,
                self.overlap,
                self.tta,
                self.out,
                self.run_btn,
                self.cancel_btn,
                self.progress,
                self.result,
                self.threshold,
                self.export_btn,
            ]
        )
        self.run_btn.changed.connect(self.start)
        self.cancel_btn.changed.connect(self.cancel)
        self.threshold.changed.connect(self._apply_threshold)
        self.export_btn.changed.connect(self.export)
        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        self.job: ProcessJob | None = None
        self.store: Path | None = None
        self.last_result: dict[str, Any] | None = None
        self._last_refresh = 0.0
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)
        self.native.destroyed.connect(self._on_destroyed)
        _LOCALIZERS.add(self)

    def _slide_choices(self, _w: Any = None) -> list[tuple[str, Any]]:
        return [(ly.name, ly) for ly in _slide_layers(self.viewer)]

    def _layers_changed(self, _e: Any = None) -> None:
        try:
            self.slide.reset_choices()
        except RuntimeError:  # the Qt widget is gone (viewer closed)
            pass

    # -- actions ---------------------------------------------------------------------------------
    def start(self, _v: Any = None) -> None:
        """Validate the inputs and start inference in a worker process."""
        if self.running:
            return
        layer = self.slide.value
        if layer is None:
            _notify("Localize: open a slide first (File > Open, or drag a slide onto the viewer)")
            return
        info = layer.metadata["wsltool"]
        model_txt = str(self.model.value or "")
        model = Path(model_txt)
        problem = _file_problem(model_txt, ".pt")
        if problem:
            _notify(f"Localize: choose a checkpoint file (.pt): {problem}")
            return
        if info.get("mpp") is None and not self.slide_mpp.value:
            _notify(
                f"Localize: {Path(info['path']).name} has no usable mpp (microns per pixel) in its metadata;"
                " set 'slide mpp'"
            )
            return
        out_txt = str(self.out.value or "")
        out = Path(out_txt) if out_txt not in ("", ".") else Path(info["path"]).with_suffix(".wsltool.zarr")
        if out.suffix != ".zarr":
            out = out / (Path(info["path"]).stem + ".zarr")
        other = _other_slides_store(out, str(info["path"]))
        if other is not None:  # re-localizing a slide replaces its own store, never another slide's
            _notify(f"Localize: {out} holds the heatmap of {other}; choose another output, or delete that store")
            return
        self.store = out.absolute()
        if self.slide_mpp.value:  # the heatmap comes in micrometres at this mpp: put the slide there too
            mpp = float(self.slide_mpp.value)
            layer.scale = (mpp, mpp)
            layer.units = ("micrometer", "micrometer")
            info["mpp_override"] = mpp
        overlap = int(self.overlap.value)
        cfg: dict[str, Any] = {"overlap": overlap if overlap >= 0 else None, "tta": self.tta.value, **self.config}
        if self.mpp.value:
            cfg["mpp"] = float(self.mpp.value)
        if self.region.value:
            cfg["region"] = int(self.region.value)
        try:
            self.job = ProcessJob(
                LOCALIZE_TASK,
                slide=str(info["path"]),
                out=str(self.store),
                model=str(model.absolute()),
                slide_mpp=float(self.slide_mpp.value) or None,
                config=cfg,
                overwrite=True,
            ).start()
        except Exception as exc:  # e.g. no more processes
            _notify(f"Localize: cannot start the worker process: {exc}")
            return
        self.run_btn.enabled, self.cancel_btn.enabled = False, True
        self.result.value = "running..."
        self.progress.max, self.progress.value = 1, 0
        self.last_result = None
        self._last_refresh = 0.0
        self._timer.start()

    def cancel(self, _v: Any = None) -> None:
        """Stop the running job at its next batch (the store stays incomplete and resumable)."""
        if self.running and self.job is not None:
            self.job.cancel()
            self.result.value = "cancelling..."

    def _poll(self) -> None:
        if self.job is None:
            return
        for kind, payload in self.job.poll():
            if kind == "progress":
                done, total = payload
                self.progress.max = max(1, int(total))
                self.progress.value = min(int(done), self.progress.max)
            elif kind == "band":
                if time.monotonic() - self._last_refresh > 1.0:
                    self._show_store()
            elif kind == "done":
                self.last_result = payload
                probs = ", ".join(f"{k} {v:.2f}" for k, v in payload["probs"].items())
                self.result.value = f"{payload['predicted']} ({probs}); {payload['regions']} regions"
                self.progress.value = self.progress.max
                self._show_store()
            elif kind == "error":
                if self.job.cancelled:
                    self.result.value = "cancelled (run again to resume)"
                    self._show_store()
                else:
                    self.result.value = "failed"
                    _notify(f"Localize: {payload}")
        if self.job.finished:
            self._timer.stop()
            self.run_btn.enabled, self.cancel_btn.enabled = True, False

    def _show_store(self) -> None:
        """(Re)load the store's layers over the slide; while running, the part written so far."""
        from wsltool.napari_plugin._reader import store_layers

        if self.store is None:
            return
        src = self.store
        partial = _partial_path(self.store)
        if self.running and partial.exists():
            src = partial
        if not src.exists():
            return
        prefix = self.store.name.removesuffix(".zarr")
        try:
            layers = store_layers(src, name=prefix)
        except Exception as exc:  # a store mid-write or mid-swap: try again at the next band
            log.debug("store not readable yet: %s", exc)
            return
        self._last_refresh = time.monotonic()
        old = {}
        for ly in [ly for ly in self.viewer.layers if ly.name.startswith(prefix + " ")]:
            old[ly.name.removesuffix(" (incomplete)")] = (ly.visible, ly.opacity)
            self.viewer.layers.remove(ly)
        for data, kw, kind in layers:
            key = kw["name"].removesuffix(" (incomplete)")
            if key in old:
                kw["visible"], kw["opacity"] = old[key]
            getattr(self.viewer, f"add_{kind}")(data, **kw)
        self._apply_threshold()

    def current_store(self) -> Path | None:
        """The store the threshold and export act on: this widget's last one, else the top heatmap layer's."""
        if self.store is not None and self.store.exists():
            return self.store
        for ly in reversed(list(self.viewer.layers)):
            meta = ly.metadata.get("wsltool") or {}
            if meta.get("kind") == "heatmap" and meta.get("complete"):
                return Path(meta["store"])
        return None

    def _apply_threshold(self, _v: Any = None) -> None:
        """Show ``M+ >= threshold`` within tissue as the mask layer (recomputed from the stored M+)."""
        import numpy as np

        from wsltool.napari_plugin._reader import MASK_RGBA, label_colormap
        from wsltool.store import HeatmapStore

        store = self.current_store()
        if store is None:
            return
        mask_layers = [
            ly
            for ly in self.viewer.layers
            if (ly.metadata.get("wsltool") or {}).get("store") == str(store)
            and (ly.metadata.get("wsltool") or {}).get("label") == "mask"
        ]
        if not mask_layers:
            return
        try:
            st = HeatmapStore.open(store)
            if not st.complete:
                return
            m = ((st.mplus(0) >= float(self.threshold.value)) & (st.tissue(0) > 0)).astype(np.uint8)
        except Exception as exc:
            log.debug("threshold: store not readable: %s", exc)
            return
        ly = mask_layers[0]
        if ly.multiscale:  # replace the stored (multiscale) mask by the re-thresholded level 0
            idx = self.viewer.layers.index(ly)
            kw = {
                "name": ly.name,
                "scale": ly.scale,
                "translate": ly.translate,
                "units": ly.units,
                "opacity": 0.9,
                "colormap": label_colormap(MASK_RGBA),
                "metadata": dict(ly.metadata),
            }
            self.viewer.layers.remove(ly)
            ly = self.viewer.add_labels(m, **kw)
            self.viewer.layers.move(self.viewer.layers.index(ly), idx)
        else:
            ly.data = m
        ly.contour = 1
        ly.visible = True

    def export(self, _v: Any = None) -> None:
        """Write GeoJSON contours (at the slider's threshold) and a preview PNG next to the store."""
        from wsltool.export import preview_png, write_geojson

        store = self.current_store()
        if store is None:
            _notify("Export: no finished heatmap store (run Localize or open a store first)")
            return
        base = store.with_suffix("")
        try:
            n = write_geojson(store, f"{base}.geojson", threshold=float(self.threshold.value))
            preview_png(store, f"{base}.png")
        except Exception as exc:
            _notify(f"Export: {exc}")
            return
        _notify(f"Exported {n} contour(s) to {base}.geojson and a preview to {base}.png", "info")


class RetrainWidget(_JobHost, Container):
    """Train (or fine-tune) a localizer from slide-level labels set in a table.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    mil, model, train
        Extra :class:`~wsltool.config.MilConfig`, :class:`~wsltool.config.ModelConfig` and
        :class:`~wsltool.config.TrainConfig` settings (for example a small ``region`` for quick runs).
    """

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        *,
        mil: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
        train: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.mil_settings: dict[str, Any] = dict(mil or {})
        self.model_settings: dict[str, Any] = dict(model or {})
        self.train_settings: dict[str, Any] = {"batch_size": 8, "num_threads": 0, **(train or {})}
        self.table = Table(value=_table_value([]), label="slides")
        self.labels_txt = ComboBox(label="label for added", choices=["benign", "malignant"], value="benign")
        self.add_open = PushButton(text="Add open slides")
        self.csv = FileEdit(label="or load slides.csv", filter="*.csv", mode=FileDialogMode.EXISTING_FILE)
        self.epochs = SpinBox(label="epochs", value=10, min=1, max=1000)
        self.finetune = CheckBox(label="fine-tune checkpoint below", value=False)
        self.init = FileEdit(label="checkpoint", filter="*.pt", mode=FileDialogMode.EXISTING_FILE)
        self.out = FileEdit(
            label="output folder",
            mode=FileDialogMode.OPTIONAL_FILE,
            value=Path(tempfile.gettempdir()),  # runs go into <folder>/wsltool-retrain[-N]
        )
        self.run_btn = PushButton(text="Train")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="epochs", value=0, min=0, max=1)
        self.log = TextEdit(label="log", value="")
        self.status = Label(label="checkpoint", value="-")
        self.extend(
            [
                self.table,
                self.labels_txt,
                self.add_open,
                self.csv,
                self.epochs,
                self.finetune,
                self.init,
                self.out,
                self.run_btn,
                self.cancel_btn,
                self.progress,
                self.log,
                self.status,
            ]
        )
        self.add_open.changed.connect(self.add_open_slides)
        self.csv.changed.connect(self.load_csv)
        self.csv.line_edit.native.editingFinished.connect(self._csv_typed)
        self.run_btn.changed.connect(self.start)
        self.cancel_btn.changed.connect(self.cancel)
        self.job: ProcessJob | None = None
        self.checkpoint: Path | None = None
        self.last_result: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self._timer = QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._poll)
        self.native.destroyed.connect(self._on_destroyed)

    def _cells(self) -> list[tuple[str, str]]:
        """Every row of the table as ``(path, label)`` text, blank cells as ``""``."""
        return [tuple("" if v is None else str(v).strip() for v in r[:2]) for r in self.table.data.to_list()]  # type: ignore[misc]

    def rows(self) -> list[tuple[str, str]]:
        """The table as ``(path, label)`` pairs (rows with an empty path or label are left out)."""
        return [(p, lab) for p, lab in self._cells() if p and lab]

    def set_rows(self, rows: list[tuple[str, str]]) -> None:
        """Replace the table's content."""
        self.table.value = _table_value(rows)

    def add_open_slides(self, _v: Any = None) -> None:
        """Add every open slide layer with the label chosen in 'label for added'."""
        have = {p for p, _ in self.rows()}
        new = [(ly.metadata["wsltool"]["path"], self.labels_txt.value) for ly in _slide_layers(self.viewer)]
        self.set_rows(self.rows() + [r for r in new if r[0] not in have])

    def load_csv(self, _v: Any = None) -> None:
        """Fill the table from a ``path,label[,split]`` CSV (paths relative to the CSV).

        Called on every change of the field, so as soon as it names a file; while a path is being typed it
        names none yet, and nothing is said until the typing ends (:meth:`_csv_typed`).
        """
        from wsltool.errors import LabelsError
        from wsltool.train.labels import read_labels

        txt = str(self.csv.value or "")
        p = Path(txt)
        if txt in ("", ".") or not p.is_file():
            return
        try:
            items = read_labels(p)
        except LabelsError as exc:
            _notify(f"Retrain: {exc}")
            return
        self.set_rows([(str(it.path), it.label) for it in items])

    def _csv_typed(self) -> None:
        """Typing in the slides.csv field has ended: say why the text names no file to load."""
        txt = str(self.csv.value or "")
        problem = None if txt in ("", ".") else _file_problem(txt)
        if problem:
            _notify(f"Retrain: cannot load slides.csv: {problem}")

    def _inputs_enabled(self, enabled: bool) -> None:
        """The table and what fills it: fixed while a run trains from them (its errors name their rows)."""
        self.table.enabled = self.csv.enabled = self.add_open.enabled = enabled

    def start(self, _v: Any = None) -> None:
        """Check the table and start training in a worker process."""
        if self.running:
            return
        cells = self._cells()
        for n, (path, label) in enumerate(cells, 1):
            if bool(path) != bool(label):
                have, lack = ("path", "label") if path else ("label", "path")
                _notify(f"Retrain: row {n} has a {have} but no {lack}: fill it in or clear both cells")
                return
        rows = self.rows()
        if len(rows) != len(cells):  # blank rows out, so that the rows a failed run names are those shown
            self.set_rows(rows)
        labels = {lab for _, lab in rows}
        if len(rows) < 2 or len(labels) < 2:
            _notify("Retrain: the table needs slides of at least two classes")
            return
        missing = [p for p, _ in rows if not Path(p).exists()]
        if missing:
            _notify(f"Retrain: {len(missing)} slide(s) not found: {', '.join(missing[:3])}")
            return
        init = None
        if self.finetune.value:
            txt = str(self.init.value or "")
            problem = _file_problem(txt)
            if problem:
                _notify(f"Retrain: fine-tuning needs a checkpoint file: {problem}")
                return
            init = str(Path(txt).absolute())
        out_txt = str(self.out.value or "")
        folder = Path(out_txt if out_txt not in ("", ".") else tempfile.gettempdir())
        problem = output_folder_problem(folder.absolute())
        if problem:
            _notify(f"Retrain: output folder: {folder.absolute()}: {problem}")
            return
        base = folder / "wsltool-retrain"
        out = next_free_dir(base)  # an earlier model stays: wsltool-retrain, wsltool-retrain-2, ...
        self.history = []
        self.log.value = ""
        self.last_result = None
        self.progress.max, self.progress.value = int(self.epochs.value), 0
        try:
            self.job = ProcessJob(
                RETRAIN_TASK,
                rows=rows,
                out_dir=str(out.absolute()),
                epochs=int(self.epochs.value),
                init_from=init,
                mil=self.mil_settings,
                train=self.train_settings,
                model=self.model_settings,
            ).start()
        except Exception as exc:
            _notify(f"Retrain: cannot start the worker process: {exc}")
            return
        self.run_btn.enabled, self.cancel_btn.enabled = False, True
        self._inputs_enabled(False)
        self.status.value = "training..."
        self._timer.start()

    def cancel(self, _v: Any = None) -> None:
        """Stop after the current batch; ``last.pt`` and ``best.pt`` stay usable."""
        if self.running and self.job is not None:
            self.job.cancel()
            self.status.value = "cancelling..."

    def _poll(self) -> None:
        if self.job is None:
            return
        for kind, payload in self.job.poll():
            if kind == "epoch":
                self.history.append(payload)
                self.progress.value = min(self.progress.max, int(payload["epoch"]) + 1)
                keys = ("total", "valid_error", "valid_auc")
                line = f"epoch {payload['epoch'] + 1}: " + " ".join(
                    f"{k}={payload[k]:.3f}" for k in keys if isinstance(payload.get(k), float)
                )
                self.log.value = (self.log.value + "\n" + line).strip()
            elif kind == "done":
                self.last_result = payload
                self.checkpoint = Path(payload["best"])
                stopped = ", stopped early" if payload.get("stopped") else ""
                metric = ""
                if payload.get("valid_error") is not None:
                    auc = payload.get("valid_auc")
                    auc_txt = "n/a" if auc is None else f"{auc:.2f}"
                    metric = f", valid error {payload['valid_error']:.1f}%, AUC {auc_txt}"
                self.status.value = f"{self.checkpoint.name} (epoch {payload['best_epoch'] + 1}{metric}{stopped})"
                self.status.tooltip = str(self.checkpoint)
                self.init.value = self.checkpoint
                for w in list(_LOCALIZERS):  # usable right away by Localize
                    if _same_viewer(w.viewer, self.viewer):
                        try:
                            w.model.value = self.checkpoint
                        except RuntimeError:  # its Qt widget was closed
                            pass
            elif kind == "error":
                self.status.value = "failed"
                _notify(f"Retrain: {payload}")
        if self.job.finished:
            self._timer.stop()
            self.run_btn.enabled, self.cancel_btn.enabled = True, False
            self._inputs_enabled(True)
