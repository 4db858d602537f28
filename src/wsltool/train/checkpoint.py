"""Checkpoints: weights + everything needed to use them, loaded without executing code from the file.

File content (``torch.save`` of plain containers only): ``{"format": "wsltool-checkpoint", "format_version": 1,
"state_dict": {...}, "meta": {...}, "train_state": {...} or absent}``.  ``meta`` holds ``class_names``, ``mpp``,
``input_size``, ``method``, ``config`` (the ModelConfig as a dict, including the normalisation), ``train_config``,
``wsltool_version``, ``fingerprint`` (SHA-256 of the weights) and free ``extra`` entries.  Loading uses
``torch.load(weights_only=True)``: a pickle that would build arbitrary objects is refused.

An *ensemble* checkpoint (:func:`save_ensemble`) has the same layout; its ``meta["ensemble"]`` lists the members
(``config``, ``fingerprint``, ``source``) and its ``state_dict`` holds ``members.<i>.<key>``; it loads as a
:class:`wsltool.models.ensemble.Ensemble` whose ``localize`` averages the members'.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsltool import __version__
from wsltool.config import ModelConfig, from_dict, to_dict
from wsltool.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

#: ModelConfig fields added after checkpoints were first written, with the behaviour the model had before the
#: field existed.  A checkpoint that lacks a field was trained that way; filling it with today's default would
#: silently change the network it loads (new fields change defaults; old checkpoints must not).
LEGACY_MODEL_FIELDS: dict[str, Any] = {
    "neg_updates": "all",
    "padding": "zeros",
    "head_conv": True,
    "multi_level": False,
    "minmax_start": 0,
    "classifier_backbone": "shared",
}

FORMAT = "wsltool-checkpoint"
FORMAT_VERSION = 1


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and bytes of the tensors of a state_dict (hex, 16 chars)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    class_names: Sequence[str],
    mpp: float | None = None,
    input_size: int | None = None,
    train_config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a checkpoint atomically (temporary file, then rename).

    Parameters
    ----------
    path
        Destination file.
    model
        A model from :func:`wsltool.models.build_model` (it carries its ``cfg``).
    class_names
        Class names in label-index order.
    mpp
        Microns per pixel of the training images (None when unknown).
    input_size
        Training crop side.
    train_config
        The training configuration as a dict.
    train_state
        Optimiser/scheduler state and epoch for ``--resume`` (plain tensors and numbers only).
    extra
        Other JSON-like metadata.

    Returns
    -------
    dict
        The ``meta`` written.
    """
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    if len(class_names) != cfg.num_classes:
        msg = f"{path}: {len(class_names)} class names for a {cfg.num_classes}-class model"
        raise CheckpointError(msg)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {
        "class_names": list(class_names),
        "mpp": mpp,
        "input_size": input_size,
        "method": cfg.method,
        "config": to_dict(cfg),
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},  # type: ignore[operator]
        "train_config": train_config or {},
        "wsltool_version": __version__,
        "fingerprint": weights_fingerprint(sd),
        "infer_sigma": getattr(model, "infer_sigma", None),  # set when TrainConfig.sigma_end moved sigma
        "extra": extra or {},
    }
    blob: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "state_dict": sd, "meta": meta}
    if train_state is not None:
        blob["train_state"] = train_state
    _save_atomic(blob, Path(path))
    return meta


def _save_atomic(blob: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    if path.is_dir():
        msg = f"{path}: is a folder, not a checkpoint file"
        raise CheckpointError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports an unwritable place as a RuntimeError
        tmp.unlink(missing_ok=True)
        msg = f"{path}: cannot write the checkpoint ({str(exc).splitlines()[0]})"
        raise CheckpointError(msg) from exc


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the raw checkpoint dict safely (``weights_only=True``).

    Raises
    ------
    CheckpointError
        Missing or unreadable file, unsafe or corrupt pickle, or not a wsltool checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        msg = f"{path}: is a folder, not a checkpoint file (a training run's is {path / 'best.pt'})"
        raise CheckpointError(msg)
    if not path.is_file():
        msg = f"{path}: checkpoint not found"
        raise CheckpointError(msg)
    try:  # an unreadable file is named as such, not as corrupt (is_zipfile says False on any OSError)
        with path.open("rb") as fh:
            fh.read(4)
    except OSError as exc:
        msg = f"{path}: cannot read the checkpoint ({exc.strerror or exc})"
        raise CheckpointError(msg) from exc
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a bare pickle is never unpickled
        msg = f"{path}: corrupt or not a checkpoint (not a torch zip archive; plain pickle files are never loaded)"
        raise CheckpointError(msg)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError/EOFError for corrupt files
        kind = (
            "refused: it would execute code or build non-tensor objects"
            if "global" in str(exc).lower()  # "Unsupported global" / "unsupported GLOBAL x.y": names code to run
            else f"corrupt or not a checkpoint ({type(exc).__name__})"
        )
        msg = f"{path}: {kind}"
        raise CheckpointError(msg) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        msg = f"{path}: not a wsltool checkpoint"
        raise CheckpointError(msg)
    if blob.get("format_version") != FORMAT_VERSION:
        msg = f"{path}: checkpoint format {blob.get('format_version')} not supported (expected {FORMAT_VERSION})"
        raise CheckpointError(msg)
    return blob


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from a checkpoint, in eval mode.

    Parameters
    ----------
    path
        Checkpoint file.
    map_location
        Device for the weights and the model.
    class_names, num_classes
        When given, the checkpoint must be for this task (same classes / class count).

    Returns
    -------
    (model, meta)
        ``meta`` holds ``class_names``, ``mpp``, ``input_size``, ``method``, ``config``, ``normalization``,
        ``wsltool_version``, ``fingerprint``, ``train_config``, ``extra`` and ``infer_sigma`` (the pseudo-binary
        sigma the model classifies with when training scheduled it; None otherwise).

    Raises
    ------
    CheckpointError
        Unsafe/corrupt file (including weights whose bytes no longer match the saved fingerprint), invalid
        config, weights that do not fit, or a checkpoint for another task.
    """
    from wsltool.models import build_model
    from wsltool.models.ensemble import Ensemble

    path = Path(path)
    blob = read_checkpoint(path, map_location)
    meta = blob.get("meta")
    sd = blob.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(sd, dict):
        msg = f"{path}: checkpoint lacks meta or state_dict"
        raise CheckpointError(msg)
    stored = meta.get("fingerprint")
    if isinstance(stored, str) and stored != weights_fingerprint(sd):  # zip members carry no checksum torch reads
        msg = f"{path}: corrupt (its weights do not match the fingerprint saved with them)"
        raise CheckpointError(msg)
    members = meta.get("ensemble")
    if members is not None and (not isinstance(members, list) or not members):
        msg = f"{path}: invalid ensemble member list"
        raise CheckpointError(msg)
    cfgs = [_model_config(m.get("config") if isinstance(m, dict) else None, path) for m in members or [meta]]
    cfg = cfgs[0]
    if any(c.num_classes != cfg.num_classes for c in cfgs):
        msg = f"{path}: ensemble members differ in their number of classes"
        raise CheckpointError(msg)
    names = list(meta.get("class_names") or [])
    if len(names) != cfg.num_classes:
        msg = f"{path}: {len(names)} class names for a {cfg.num_classes}-class model"
        raise CheckpointError(msg)
    if num_classes is not None and num_classes != cfg.num_classes:
        msg = f"{path}: checkpoint is for {cfg.num_classes} classes, the task has {num_classes}"
        raise CheckpointError(msg)
    if class_names is not None and list(class_names) != names:
        msg = f"{path}: checkpoint classes {names} differ from the task's {list(class_names)}"
        raise CheckpointError(msg)
    model: nn.Module = build_model(cfg) if members is None else Ensemble([build_model(c) for c in cfgs])
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        msg = f"{path}: weights do not fit the configured model ({str(exc).splitlines()[0]})"
        raise CheckpointError(msg) from exc
    sigmas = [m.get("infer_sigma") if isinstance(m, dict) else None for m in members or [meta]]
    nets: list[Any] = [model] if members is None else list(model.members)  # type: ignore[arg-type]
    for net, sg in zip(nets, sigmas, strict=True):
        if sg is not None and hasattr(net, "infer_sigma"):
            net.infer_sigma = float(sg)
    model.to(map_location).eval()
    meta = dict(meta)
    meta["path"] = str(path)
    return model, meta


def _model_config(data: Any, path: Path) -> ModelConfig:
    """The ModelConfig stored in a checkpoint (legacy fields filled as trained, weights not fetched)."""
    if not isinstance(data, dict):
        msg = f"{path}: checkpoint lacks a model configuration"
        raise CheckpointError(msg)
    try:
        return from_dict(ModelConfig, {**LEGACY_MODEL_FIELDS, **data, "pretrained": "none"}, source=str(path))
    except (ConfigError, KeyError, TypeError) as exc:
        msg = f"{path}: invalid model configuration ({exc})"
        raise CheckpointError(msg) from exc


def save_ensemble(path: str | Path, sources: Sequence[str | Path], *, overwrite: bool = False) -> dict[str, Any]:
    """Combine trained checkpoints into one ensemble checkpoint whose ``localize`` averages theirs.

    Parameters
    ----------
    path
        Destination file (written atomically; never one of ``sources``).
    sources
        Two or more checkpoints for the same task: same class names and the same ``mpp`` (slides are read at
        it).  Members may differ in method, backbone or seed.  An ensemble is not a valid source.
    overwrite
        Replace an existing ``path``.  Without it an existing file is refused before any member is read, as
        ``wsltool train`` refuses a folder that holds a run: a model a user may have shipped is never replaced
        by accident.

    Returns
    -------
    dict
        The ``meta`` written: the first member's, with ``ensemble`` (one entry per member: ``config``,
        ``fingerprint``, ``source``, ``train_config``) and the fingerprint of all weights.

    Raises
    ------
    CheckpointError
        Fewer than two sources, ``path`` exists (without ``overwrite``), an unreadable source, a nested
        ensemble, or members for different tasks.
    """
    path = Path(path)
    srcs = [Path(s) for s in sources]
    if len(srcs) < 2:
        msg = f"{path}: an ensemble needs at least two checkpoints, got {len(srcs)}"
        raise CheckpointError(msg)
    if any(s.resolve() == path.resolve() for s in srcs):
        msg = f"{path}: the ensemble would overwrite one of its members"
        raise CheckpointError(msg)
    if path.is_dir():
        msg = f"{path}: is a folder, not a checkpoint file"
        raise CheckpointError(msg)
    if path.exists() and not overwrite:
        msg = f"{path}: already exists; pass --overwrite to replace it, or choose another file"
        raise CheckpointError(msg)
    sd: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    seen: dict[str, Path] = {}
    for i, src in enumerate(srcs):
        model, meta = load_checkpoint(src)  # validates the file and its weights
        if "ensemble" in meta:
            msg = f"{src}: is an ensemble already; combine its members instead"
            raise CheckpointError(msg)
        if i == 0:
            first = meta
        elif meta["class_names"] != first["class_names"]:
            msg = f"{src}: classes {meta['class_names']} differ from {srcs[0]}'s {first['class_names']}"
            raise CheckpointError(msg)
        elif meta.get("mpp") != first.get("mpp"):
            msg = f"{src}: trained at {meta.get('mpp')} um/px, {srcs[0]} at {first.get('mpp')} um/px"
            raise CheckpointError(msg)
        fp = meta.get("fingerprint") or weights_fingerprint(model.state_dict())  # verified by load_checkpoint
        if fp in seen:  # the same model twice would only weigh it double
            msg = f"{src}: holds the same weights as {seen[fp]}; an ensemble needs different models"
            raise CheckpointError(msg)
        seen[fp] = src
        sd.update({f"members.{i}.{k}": v.detach().cpu() for k, v in model.state_dict().items()})
        entries.append(
            {
                "config": meta["config"],
                "fingerprint": meta.get("fingerprint"),
                "infer_sigma": meta.get("infer_sigma"),
                "source": str(src),
                "train_config": meta.get("train_config", {}),
            }
        )
    methods = sorted({e["config"].get("method", "minmax") for e in entries})
    meta = {k: v for k, v in first.items() if k not in ("path", "infer_sigma")}  # sigmas: per member
    meta.update(
        {
            "method": methods[0] if len(methods) == 1 else "+".join(methods),
            "ensemble": entries,
            "wsltool_version": __version__,
            "fingerprint": weights_fingerprint(sd),
            "extra": {"members": len(entries)},
        }
    )
    _save_atomic({"format": FORMAT, "format_version": FORMAT_VERSION, "state_dict": sd, "meta": meta}, path)
    return meta


def config_differences(
    saved: dict[str, Any] | None, given: dict[str, Any], prefix: str = "", ignore: Sequence[str] = ()
) -> list[str]:
    """The settings whose values differ between a checkpoint's saved configuration and the given one.

    Parameters
    ----------
    saved
        A configuration as saved in a checkpoint's meta (``to_dict`` of a dataclass); None when absent.
    given
        ``to_dict`` of the configuration of the run being resumed.
    prefix
        Put before each name (``"train."``), to tell configurations apart.
    ignore
        Names not compared (settings the run does not use).

    Returns
    -------
    list of str
        ``"name: saved X, given Y"`` for each differing key, sorted by name; empty when they agree.
    """
    saved = saved or {}
    return [
        f"{prefix}{k}: saved {saved.get(k)!r}, given {given.get(k)!r}"
        for k in sorted(set(saved) | set(given))
        if saved.get(k) != given.get(k) and k not in ignore
    ]


def model_differences(saved: dict[str, Any], model_cfg: ModelConfig) -> list[str]:
    """:func:`config_differences` of a checkpoint's model configuration, skipping what the method does not use.

    WILDCAT and CAM never use ``minmax_start``: a run started when its default was another number resumes.
    A min-max model with a detached mask never uses ``size_prior`` (:func:`wsltool.config.resolve_for_training`
    records ``"none"``; runs saved before that recorded the default and resume too).
    """
    unused: tuple[str, ...] = ()
    if model_cfg.method != "minmax":
        unused = ("minmax_start",)
    elif model_cfg.detach_mask:
        unused = ("size_prior",)
    return config_differences(saved, to_dict(model_cfg), ignore=unused)


def resume_training(
    last_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    map_location: str | torch.device,
    differences: Callable[[dict[str, Any]], list[str]],
) -> tuple[int, list[float] | None, int, list[dict[str, Any]]]:
    """Load ``last.pt`` into ``model`` and ``optimizer`` to continue an interrupted training.

    Parameters
    ----------
    last_path
        The ``last.pt`` written by the training loop.
    model, optimizer
        Built with the configuration of the run being resumed.
    map_location
        Device of the loaded tensors.
    differences
        Called with the checkpoint's ``meta``; returns the settings that differ (see
        :func:`config_differences`), and any refuses to resume, naming them.

    Returns
    -------
    (start_epoch, best_key, best_epoch, history)

    Raises
    ------
    CheckpointError
        Nothing to resume, or a configuration that differs from the one given.
    """
    if not last_path.exists():
        msg = f"{last_path}: nothing to resume"
        raise CheckpointError(msg)
    blob = read_checkpoint(last_path, map_location)
    diffs = differences(blob["meta"])
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        msg = f"{last_path}: configuration differs from the one given ({shown}); cannot resume"
        raise CheckpointError(msg)
    model.load_state_dict(blob["state_dict"])
    st = blob["train_state"]
    optimizer.load_state_dict(st["optimizer"])
    best_key = [float(v) for v in st["best_key"]] if st.get("best_key") else None
    log.info("resuming %s at epoch %d", last_path.parent, int(st["epoch"]) + 1)
    return int(st["epoch"]) + 1, best_key, int(st.get("best_epoch", -1)), json.loads(st.get("history", "[]"))
