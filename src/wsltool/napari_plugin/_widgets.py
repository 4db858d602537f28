"""The Localize and Retrain dock widgets (magicgui containers; thin: settings -> a worker-process job).

Both run their work through :class:`~wsltool.napari_plugin._jobs.ProcessJob`, polled by a Qt timer, so
the viewer stays responsive, never imports torch, and survives a crash of the job.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

_LOCALIZERS: list[LocalizeWidget] = []


def _notify(msg: str, kind: str = "error") -> None:
    from napari.utils import notifications

    getattr(notifications, f"show_{kind}")(msg)


def _slide_layers(viewer: napari.Viewer) -> list[Any]:
    return [ly for ly in viewer.layers if (ly.metadata.get("wsltool") or {}).get("kind") == "slide"]


class LocalizeWidget(Container):
    """Run the localizer on an open slide; the heatmap grows on the slide as regions finish.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.slide = ComboBox(label="slide", choices=self._slide_choices)
        self.model = FileEdit(label="checkpoint", filter="*.pt", mode="r")
        self.slide_mpp = FloatSpinBox(label="slide mpp (0 = file)", value=0.0, min=0.0, max=20.0, step=0.01)
        self.mpp = FloatSpinBox(label="input mpp (0 = model)", value=0.0, min=0.0, max=20.0, step=0.05)
        self.overlap = SpinBox(label="overlap px", value=64, min=0, max=1024, step=8)
        self.out = FileEdit(label="output store", mode="d", value="")
        self.run_btn = PushButton(text="Localize")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="regions", value=0, min=0, max=1)
        self.result = Label(label="slide result", value="-")
        self.threshold = FloatSlider(label="mask threshold", value=0.5, min=0.05, max=0.95, step=0.05)
        self.export_btn = PushButton(text="Export GeoJSON + PNG", enabled=False)
        self.extend([self.slide, self.model, self.slide_mpp, self.mpp, self.overlap, self.out, self.run_btn,
                     self.cancel_btn, self.progress, self.result, self.threshold, self.export_btn])
        self.run_btn.changed.connect(self.start)
        self.cancel_btn.changed.connect(self.cancel)
        self.threshold.changed.connect(self._apply_threshold)
        self.export_btn.changed.connect(self.export)
        self.viewer.layers.events.inserted.connect(lambda e: self.slide.reset_choices())
        self.viewer.layers.events.removed.connect(lambda e: self.slide.reset_choices())
        self.job: ProcessJob | None = None
        self.store: Path | None = None
        self.last_result: dict[str, Any] | None = None
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)
        _LOCALIZERS.append(self)

    def _slide_choices(self, _w: Any = None) -> list[tuple[str, Any]]:
        return [(ly.name, ly) for ly in _slide_layers(self.viewer)]

    # -- actions ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Validate the inputs and start inference in a worker process."""
        layer = self.slide.value
        if layer is None:
            _notify("Localize: open a slide first (File > Open, or drag a slide onto the viewer)")
            return
        info = layer.metadata["wsltool"]
        model = Path(str(self.model.value))
        if not model.is_file() or model.suffix != ".pt":
            _notify(f"Localize: choose a checkpoint file (.pt); {model} is not one")
            return
        if info.get("mpp") is None and not self.slide_mpp.value:
            _notify(f"Localize: {Path(info['path']).name} has no usable mpp; set 'slide mpp'")
            return
        out_txt = str(self.out.value)
        out = Path(out_txt) if out_txt not in ("", ".") else Path(info["path"]).with_suffix(".wsltool.zarr")
        if out.suffix != ".zarr":
            out = out / (Path(info["path"]).stem + ".zarr")
        self.store = out
        cfg: dict[str, Any] = {"overlap": int(self.overlap.value), "workers": 1}
        if self.mpp.value:
            cfg["mpp"] = float(self.mpp.value)
        self.job = ProcessJob(
            "wsltool.napari_plugin._tasks:localize",
            slide=info["path"],
            out=str(out),
            model=str(model),
            slide_mpp=float(self.slide_mpp.value) or None,
            config=cfg,
            overwrite=True,
        ).start()
        self.run_btn.enabled, self.cancel_btn.enabled = False, True
        self.result.value = "running..."
        self.progress.value = 0
        self._timer.start()

    def cancel(self) -> None:
        """Stop the running job at its next batch (the store stays resumable)."""
        if self.job is not None:
            self.job.cancel()
            self.result.value = "cancelling..."

    def _poll(self) -> None:
        if self.job is None:
            return
        for kind, payload in self.job.poll():
            if kind == "progress":
                done, total = payload
                self.progress.max = max(1, total)
                self.progress.value = done
            elif kind == "band":
                self._show_store()
            elif kind == "done":
                self.last_result = payload
                probs = ", ".join(f"{k} {v:.2f}" for k, v in payload["probs"].items())
                self.result.value = f"{payload['predicted']} ({probs})"
                self._show_store()
                self.export_btn.enabled = True
            elif kind == "error":
                self.result.value = "cancelled" if self.job.cancelled else "failed"
                if not self.job.cancelled:
                    _notify(f"Localize: {payload}")
        if self.job.finished:
            self._timer.stop()
            self.run_btn.enabled, self.cancel_btn.enabled = True, False

    def _show_store(self) -> None:
        from wsltool.napari_plugin._reader import store_layers

        if self.store is None or not self.store.exists():
            return
        try:
            layers = store_layers(self.store)
        except Exception as exc:  # a store mid-swap: try at the next band
            log.debug("store not readable yet: %s", exc)
            return
        prefix = self.store.name.removesuffix(".zarr")
        for ly in [ly for ly in self.viewer.layers if ly.name.startswith(prefix + " ")]:
            self.viewer.layers.remove(ly)
        for data, kw, kind in layers:
            getattr(self.viewer, f"add_{kind}")(data, **kw)
        self._apply_threshold()

    def _apply_threshold(self, _v: Any = None) -> None:
        """Show the M+ >= threshold contour as the mask layer (recomputed from the stored M+)."""
        if self.store is None:
            return
        prefix = self.store.name.removesuffix(".zarr")
        mask_layers = [ly for ly in self.viewer.layers if ly.name == f"{prefix} mask"]
        heat = [ly for ly in self.viewer.layers if ly.name == f"{prefix} M+"]
        if not mask_layers or not heat:
            return
        import numpy as np

        from wsltool.store import HeatmapStore

        st = HeatmapStore.open(self.store)
        m = (st.mplus(0) >= float(self.threshold.value)) & (st.tissue(0) > 0)
        ly = mask_layers[0]
        if ly.multiscale:
            self.viewer.layers.remove(ly)
            self.viewer.add_labels(m.astype(np.uint8), name=f"{prefix} mask", scale=heat[0].scale,
                                   translate=heat[0].translate, opacity=0.6,
                                   metadata={"wsltool": {"kind": "mask", "store": str(self.store)}})
        else:
            ly.data = m.astype(np.uint8)

    def export(self) -> None:
        """Write GeoJSON contours (at the slider's threshold) and a preview PNG next to the store."""
        from wsltool.export import preview_png, write_geojson

        if self.store is None:
            return
        base = self.store.with_suffix("")
        try:
            n = write_geojson(self.store, f"{base}.geojson", threshold=float(self.threshold.value))
            preview_png(self.store, f"{base}.png")
        except Exception as exc:
            _notify(f"Export: {exc}")
            return
        _notify(f"Exported {n} contour(s) to {base}.geojson and a preview to {base}.png", "info")


class RetrainWidget(Container):
    """Train (or fine-tune) a localizer from slide-level labels set in a table.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.table = Table(value={"data": [], "columns": ["path", "label"]}, label="slides")
        self.add_open = PushButton(text="Add open slides")
        self.csv = FileEdit(label="or load slides.csv", filter="*.csv", mode="r", value="")
        self.labels_txt = ComboBox(label="label for added", choices=["benign", "malignant"], value="benign")
        self.epochs = SpinBox(label="epochs", value=10, min=1, max=1000)
        self.finetune = CheckBox(label="fine-tune checkpoint below", value=False)
        self.init = FileEdit(label="checkpoint", filter="*.pt", mode="r", value="")
        self.out = FileEdit(label="output folder", mode="d", value=tempfile.gettempdir())
        self.run_btn = PushButton(text="Train")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="epochs", value=0, min=0, max=1)
        self.log = TextEdit(label="log", value="")
        self.status = Label(label="checkpoint", value="-")
        self.extend([self.table, self.labels_txt, self.add_open, self.csv, self.epochs, self.finetune, self.init,
                     self.out, self.run_btn, self.cancel_btn, self.progress, self.log, self.status])
        self.add_open.changed.connect(self.add_open_slides)
        self.csv.changed.connect(self.load_csv)
        self.run_btn.changed.connect(self.start)
        self.cancel_btn.changed.connect(self.cancel)
        self.job: ProcessJob | None = None
        self.checkpoint: Path | None = None
        self.history: list[dict[str, Any]] = []
        self._timer = QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._poll)

    def rows(self) -> list[tuple[str, str]]:
        """The table as ``(path, label)`` pairs."""
        data = self.table.data.to_list() if len(self.table.data) else []
        return [(str(r[0]), str(r[1])) for r in data]

    def set_rows(self, rows: list[tuple[str, str]]) -> None:
        """Replace the table's content."""
        self.table.value = {"data": [list(r) for r in rows], "columns": ["path", "label"]}

    def add_open_slides(self) -> None:
        """Add every open slide layer with the label chosen in 'label for added'."""
        have = {p for p, _ in self.rows()}
        new = [(ly.metadata["wsltool"]["path"], self.labels_txt.value) for ly in _slide_layers(self.viewer)]
        self.set_rows(self.rows() + [r for r in new if r[0] not in have])

    def load_csv(self, _v: Any = None) -> None:
        """Fill the table from a ``path,label[,split]`` CSV (paths relative to the CSV)."""
        from wsltool.errors import LabelsError
        from wsltool.train.labels import read_labels

        p = Path(str(self.csv.value))
        if not p.is_file():
            return
        try:
            items = read_labels(p)
        except LabelsError as exc:
            _notify(f"Retrain: {exc}")
            return
        self.set_rows([(str(it.path), it.label) for it in items])

    def start(self) -> None:
        """Check the table and start training in a worker process."""
        rows = self.rows()
        labels = {lab for _, lab in rows}
        if len(rows) < 2 or len(labels) < 2:
            _notify("Retrain: the table needs slides of at least two classes")
            return
        init = None
        if self.finetune.value:
            p = Path(str(self.init.value))
            if not p.is_file():
                _notify(f"Retrain: fine-tuning needs a checkpoint; {p} is not a file")
                return
            init = str(p)
        out = Path(str(self.out.value)) / "wsltool-retrain"
        self.history = []
        self.log.value = ""
        self.progress.max, self.progress.value = int(self.epochs.value), 0
        self.job = ProcessJob(
            "wsltool.napari_plugin._tasks:retrain", rows=rows, out_dir=str(out), epochs=int(self.epochs.value),
            init_from=init, train={"batch_size": 8, "num_threads": 0},
        ).start()
        self.run_btn.enabled, self.cancel_btn.enabled = False, True
        self.status.value = "training..."
        self._timer.start()

    def cancel(self) -> None:
        """Stop after the current batch; ``last.pt`` and ``best.pt`` stay usable."""
        if self.job is not None:
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
                    f"{k}={payload[k]:.3f}" for k in keys if isinstance(payload.get(k), float))
                self.log.value = (self.log.value + "\n" + line).strip()
            elif kind == "done":
                self.checkpoint = Path(payload["best"])
                stopped = " (stopped early)" if payload.get("stopped") else ""
                self.status.value = f"{self.checkpoint}{stopped}"
                for w in _LOCALIZERS:  # usable right away by Localize
                    w.model.value = self.checkpoint
            elif kind == "error":
                self.status.value = "failed"
                _notify(f"Retrain: {payload}")
        if self.job.finished:
            self._timer.stop()
            self.run_btn.enabled, self.cancel_btn.enabled = True, False


def localize_widget(napari_viewer: napari.Viewer) -> LocalizeWidget:
    """npe2 widget factory: Localize."""
    return LocalizeWidget(napari_viewer)


def retrain_widget(napari_viewer: napari.Viewer) -> RetrainWidget:
    """npe2 widget factory: Retrain."""
    return RetrainWidget(napari_viewer)
