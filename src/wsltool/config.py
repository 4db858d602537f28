"""Frozen configuration dataclasses and their TOML round trip.

Every configurable part of wsltool takes one of these frozen dataclasses.  They are plain data
(numbers, strings, tuples), so they serialise to TOML for the CLI's ``--config`` files and to JSON
for the provenance attributes of heatmap stores and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from wsltool.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return a configuration dataclass as a plain dict (tuples become lists, ``None`` is dropped).

    Parameters
    ----------
    cfg
        A dataclass instance.

    Returns
    -------
    dict
        JSON/TOML-ready mapping.
    """

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v) if getattr(v, f.name) is not None}
        if isinstance(v, tuple | list):
            return [clean(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    out = clean(cfg)
    assert isinstance(out, dict)
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build a configuration dataclass from a mapping, refusing unknown keys and wrong types.

    Parameters
    ----------
    cls
        The dataclass type to build.
    data
        Mapping of field names to values (for example parsed TOML).
    source
        Where the data came from, for error messages.

    Returns
    -------
    object
        An instance of ``cls``.

    Raises
    ------
    ConfigError
        On an unknown key or a value of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        msg = f"{cls!r} is not a dataclass"
        raise TypeError(msg)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        msg = f"{source}: unknown key(s) for {cls.__name__}: {', '.join(unknown)}"
        raise ConfigError(msg)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{source}: {cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        msg = f"{source}: {exc}"
        raise ConfigError(msg) from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        # every alternative named: "expected int or expected one of 'half', got 'third'"
        parts = dict.fromkeys(e.removeprefix(f"{where}: ").split(", got ")[0] for e in errors)
        msg = f"{where}: {' or '.join(parts)}, got {value!r}" if parts else f"{where}: invalid value {value!r}"
        raise ConfigError(msg)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            msg = f"{where}: expected a list, got {value!r}"
            raise ConfigError(msg)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if origin is typing.Literal:
        if value not in args:
            msg = f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}"
            raise ConfigError(msg)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, source=where)  # type: ignore[arg-type]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        msg = f"{where}: expected {tp.__name__}, got {value!r}"
        raise ConfigError(msg)
    if tp is int and isinstance(value, bool):
        msg = f"{where}: expected int, got {value!r}"
        raise ConfigError(msg)
    return value


def parse_value(text: str) -> Any:
    """Parse a ``KEY=VALUE`` command-line value: int, float, ``true``/``false``, ``null`` (None), else the string.

    ``none`` stays a string: several settings take it as a value (``size_prior=none``, ``pretrained=none``).
    """
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return None if low == "null" else text


def load_toml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load a configuration dataclass from a TOML file (optionally from one table of it).

    Raises
    ------
    ConfigError
        When the file is missing, not TOML, or holds invalid keys/values.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        msg = f"{p}: configuration file not found"
        raise ConfigError(msg) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        msg = f"{p}: not a valid TOML file ({exc})"
        raise ConfigError(msg) from exc
    if section is not None:
        data = data.get(section, {})
    return from_dict(cls, data, source=str(p))


def save_toml(cfg: Any, path: str | Path) -> None:
    """Write a configuration dataclass to a TOML file."""
    Path(path).write_text(tomli_w.dumps(to_dict(cfg)), encoding="utf-8")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """How a slide is cut into regions for the model.

    Parameters
    ----------
    mpp
        Microns per pixel at which regions are read (the model's input resolution).
    region
        Region side in pixels at ``mpp``.
    overlap
        Overlap between neighbouring regions in pixels at ``mpp`` (stride = region - overlap).
    min_tissue
        A region is kept when the fraction of tissue inside it exceeds this value.
    tissue_mpp
        Resolution at which the tissue mask is computed.
    """

    mpp: float = 1.0
    region: int = 512
    overlap: int = 64
    min_tissue: float = 0.1
    tissue_mpp: float = 8.0

    def __post_init__(self) -> None:
        _check(0.05 <= self.mpp <= 100, f"TilingConfig.mpp must be in [0.05, 100], got {self.mpp}")
        _check(self.region >= 16, f"TilingConfig.region must be >= 16 px, got {self.region}")
        _check(0 <= self.overlap < self.region, f"TilingConfig.overlap must be in [0, region), got {self.overlap}")
        _check(0.0 <= self.min_tissue <= 1.0, f"TilingConfig.min_tissue must be in [0, 1], got {self.min_tissue}")
        _check(self.tissue_mpp > 0, f"TilingConfig.tissue_mpp must be > 0, got {self.tissue_mpp}")

    @property
    def stride(self) -> int:
        """Step between region origins, in pixels at ``mpp``."""
        return self.region - self.overlap


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """How a slide is turned into a heatmap store.

    Parameters
    ----------
    mpp
        Input resolution; ``None`` takes the checkpoint's training mpp.
    region
        Region side in px at ``mpp``; ``None`` takes the checkpoint's input size.
    overlap
        Overlap between regions in px at ``mpp``; overlaps are blended with a smooth window.  ``None``: half
        the region (every output pixel is the blend of 4 regions' views).  Three quarters of the region (16
        views) gives the densest heatmaps and costs 4x more; on the synthetic cohort it lifted the stitched
        Dice from 0.57/0.76 (half) to 0.66/0.81 (README, "Training from slide labels").
    out_factor
        Output pixel = ``out_factor`` input pixels (``out_mpp = mpp * out_factor``, default 4: 4 um at 1 um/px);
        must divide both the region size and the stride so that regions land on whole output pixels.
    batch_size
        Regions per model batch.
    workers
        Region reader processes (0 reads in the main process).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
    amp
        float16 autocast on CUDA (a batch that overflows float16 is redone in float32); ignored on CPU.
    min_tissue
        Regions with less tissue than this fraction are skipped.
    tissue_mpp
        Resolution of the tissue mask.
    threshold
        M+ threshold of the binary mask.
    top_k
        Slide score = mean of the ``top_k`` highest region probabilities of each class, ``top_k`` counted at
        the density of the training validation grid (stride = half a region) and scaled with the grid's
        density otherwise (``top_k * (region / 2 / stride) ** 2``), so that the score covers the same tissue
        area whatever the overlap: with 3/4 overlap, top-5 becomes top-20.
    chunk
        Chunk side of the output store in output pixels (also the height of the row bands that are
        flushed as soon as final: memory grows with ``chunk x slide width``).
    tta
        Test-time augmentation: ``"none"``, ``"flips"`` (4 views) or ``"d4"`` (8 views: quarter turns x flip),
        each region's maps averaged over the views turned back; costs that many forward passes.  On GlaS valid
        ``d4`` lifted the default's pixel AUC by about 2 points per model (README, "GlaS").
    """

    mpp: float | None = None
    region: int | None = None
    overlap: int | None = None
    out_factor: int = 4
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    min_tissue: float = 0.05
    tissue_mpp: float = 8.0
    threshold: float = 0.5
    top_k: int = 5
    chunk: int = 512
    tta: typing.Literal["none", "flips", "d4"] = "none"

    def __post_init__(self) -> None:
        _check(16 <= self.chunk <= 4096, f"InferConfig.chunk must be in [16, 4096], got {self.chunk}")
        _check(
            self.mpp is None or 0.05 <= self.mpp <= 100, f"InferConfig.mpp must be in [0.05, 100] um/px, got {self.mpp}"
        )
        _check(self.region is None or self.region >= 16, f"InferConfig.region must be >= 16, got {self.region}")
        _check(self.overlap is None or self.overlap >= 0, f"InferConfig.overlap must be >= 0, got {self.overlap}")
        _check(self.out_factor >= 1, f"InferConfig.out_factor must be >= 1, got {self.out_factor}")
        _check(self.batch_size >= 1, f"InferConfig.batch_size must be >= 1, got {self.batch_size}")
        _check(self.workers >= 0, f"InferConfig.workers must be >= 0, got {self.workers}")
        _check(0.0 < self.threshold < 1.0, f"InferConfig.threshold must be in (0, 1), got {self.threshold}")
        _check(self.top_k >= 1, f"InferConfig.top_k must be >= 1, got {self.top_k}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"InferConfig.device must be auto, cpu or cuda[:N], got {self.device!r}",
        )


@dataclasses.dataclass(frozen=True)
class MilConfig:
    """Multiple-instance region sampling for training from slide-level labels.

    Every epoch, each training slide's tissue regions are scored by the current model (at most
    ``score_cap`` per slide, a fresh random subset each epoch); the ``top_k`` regions with the highest
    positive-class probability are taken from every slide (on positive slides they are the likely
    lesions; on negative slides they are the hardest negatives), plus ``n_random`` random tissue regions
    per slide. The first ``warmup_epochs`` take random regions only (the untrained model's ranking is
    noise). Batches are class-balanced by oversampling.

    Parameters
    ----------
    mpp
        Training resolution (um/px).
    region
        Region side in px at ``mpp`` (the model's input size).
    top_k
        Top-scored regions per slide per epoch.
    n_random
        Random regions per slide per epoch.
    score_cap
        Most regions scored per slide per epoch.
    min_tissue
        A candidate region must hold at least this tissue fraction.
    warmup_epochs
        Epochs with random sampling only.
    slide_top_k
        Slide score = mean of the ``slide_top_k`` highest region probabilities (validation, inference).
    positive_class
        The class whose evidence is localized (default: the last class name, e.g. ``malignant``).
    readers
        Region reader processes.
    """

    mpp: float = 1.0
    region: int = 128
    top_k: int = 4
    n_random: int = 2
    score_cap: int = 48
    min_tissue: float = 0.5
    warmup_epochs: int = 1
    slide_top_k: int = 5
    positive_class: str | None = None
    readers: int = 0

    def __post_init__(self) -> None:
        _check(0.05 <= self.mpp <= 100, f"MilConfig.mpp must be in [0.05, 100] um/px, got {self.mpp}")
        _check(self.region >= 32, f"MilConfig.region must be >= 32, got {self.region}")
        _check(
            self.top_k >= 0 and self.n_random >= 0 and self.top_k + self.n_random >= 1,
            "MilConfig.top_k + n_random must be >= 1",
        )
        _check(self.score_cap >= max(1, self.top_k), "MilConfig.score_cap must be >= top_k")
        _check(0.0 <= self.min_tissue <= 1.0, f"MilConfig.min_tissue must be in [0, 1], got {self.min_tissue}")
        _check(self.slide_top_k >= 1, f"MilConfig.slide_top_k must be >= 1, got {self.slide_top_k}")
        _check(self.readers >= 0, f"MilConfig.readers must be >= 0, got {self.readers}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The localizer/classifier model (method.md).  Defaults are wsltool's measured GlaS default.

    Parameters
    ----------
    method
        ``"minmax"`` (min-max entropy), ``"wildcat"`` or ``"cam"`` (baselines).
    backbone
        Registry name (``efficientnet_lite0``, ``resnet18/34/50/101``).
    pretrained
        ``"imagenet"`` (shipped weights, efficientnet_lite0 only), ``"none"`` or a state_dict file path.
    output_stride
        Backbone output stride: 16 or 32 (8 for the ``tiny`` test backbone).
    head_conv
        ``efficientnet_lite0``: take features after its 1280-channel ImageNet head convolution (True) or from
        the last MBConv block, 320 channels (False, default: those features locate glands, see README);
        ignored by other backbones.
    multi_level
        Concatenate the backbone's stride-16 stage (Lite0: 112 channels, ResNets: ``layer3``) with its last
        features before the heads.
    num_classes
        Number of image classes.
    modalities, kmax, kmin, alpha, head_dropout
        WILDCAT head (M maps per class, top-kmax + alpha * bottom-kmin pooling, dropout on sorted activations).
    w, sigma
        Pseudo-binary mask ``sigmoid(w (M+ - sigma))``.
    cls_scale
        Scale of X+ / X- for the classifier.
    detach_mask
        Detach M+ before masking (2019 paper code) or let the classifier losses reach the localizer (TMI).
        Detached, the max-entropy term can only train the classifier, so it needs ``neg_updates="all"`` (or
        ``neg_weight=0``); with ``"localizer"`` it would train nothing, and that combination is refused.
    size_prior
        ``"none"``, ``"absolute"`` (TMI: both regions non-empty), ``"range"`` (area in [area_min, area_max])
        or ``"batch_range"`` (the batch's mean area in [area_min, area_max], each image only non-empty);
        applied through the extended log-barrier, only when the mask is not detached (else it has no gradient).
        Areas are fractions of the image, where TMI writes sums of m and 1 - m: the gradient is the same
        wherever the barrier's log branch applies (sum = N x fraction), and the loss reads alike at any crop
        size; the linear extension then starts at a mask below 1/t^2 of the image (4 % at t = 5, 1 % at t = 10)
        instead of below 1/t^2 pixels, which caps the push away from an empty mask at slope t there.
        ``"range"`` is the default: on GlaS at 20 epochs ``"batch_range"`` tied it on PxAP at 2.2 less F1-
        (8 seeds); at 40 epochs it ranked higher over 5 seeds and not clearly so over 10 (docs/glas.md,
        lessons 17 and 18).
    area_min, area_max
        Bounds of the ``"range"`` and ``"batch_range"`` size priors (area fraction of the soft mask).
    minmax_start
        First epoch (0-based) with the min-max terms (X+, X-, size prior); earlier epochs train the localizer
        alone with its cross-entropy, as WILDCAT, so the mask starts from class evidence.  Default ``"half"``:
        half the run's epochs (``TrainConfig.epochs // 2``, resolved by :func:`resolve_minmax_start` when
        training starts; the checkpoint records the number).  Started at epoch 0 the mask settled on glands or
        on stroma depending on the seed (GlaS valid pixel AUC 73 / 58 / 36 / 45 over four seeds); 10 of 20
        epochs gave PxAP 67.9 over 22 seeds, level with WILDCAT's 67.0 (lesson 19).  At 60 epochs of 384 px
        crops a fixed 10-epoch warm-up gave PxAP 69.7, 20 epochs 72.7 (4 seeds) and 30, half the run, 74.6
        over 8 seeds (docs/glas.md, lesson 15); over 18 seeds 74.2, level with WILDCAT's 73.0 (lesson 20).
        An integer is a number of epochs (a warning when longer than half the run, an error when the min-max
        terms would never run).
    erase_passes, erase_sigma, erase_start
        Recursive erasing: passes u (0 or 1 = off), trust decay, first epoch with erasing.  With erasing the
        logged ``loc`` is the localizer's cross-entropy summed over the passes (what is back-propagated, so
        ``total`` stays ``loc + pos + neg [+ size]``); ``passes`` logs how many ran.
    bn_mode
        ``"train"``: BatchNorm statistics from every pass (X, X+, X-, as the paper code);
        ``"masked_running"``: X+ / X- passes use the running statistics of X and do not update them;
        ``"frozen"``: every BatchNorm layer stays in eval mode (pretrained statistics).
    threshold
        Threshold of the normalised M+ for the pixel mask at inference.
    neg_weight
        Weight of the max-entropy term on X- in the total loss (1: method.md; 0 leaves the min-entropy side alone,
        an ablation).
    neg_updates
        What the max-entropy term on X- trains: ``"all"`` (paper: localizer, backbone and classifier) or
        ``"localizer"`` (backbone and classifier parameters held fixed for that term, so the classifier cannot
        satisfy it by learning to be uncertain on masked-looking images; only the mask can).
    classifier_backbone
        ``"shared"`` (default; method.md and both papers: the classifier runs on X+ / X- through the
        localizer's backbone) or ``"own"`` (a second copy of the backbone for the classifier, set to the
        localizer's backbone when the min-max terms start, so both begin from the warmed-up features and only
        then part; same FLOPs, twice the backbone parameters).  GlaS valid, 8 seeds: PxAP 68.1 (own) vs 68.2
        (shared), pixel AUC 70.7 both; six seeds had suggested +0.8 for ``"own"`` (docs/glas.md, lesson 14).
    padding
        Convolution padding of the backbone: ``"zeros"`` (as pretrained) or ``"replicate"`` (no border
        features for the mask to latch onto).
    mean, std
        Input normalisation (pixels in [0, 1]); empty = the backbone's default.
    """

    method: typing.Literal["minmax", "wildcat", "cam"] = "minmax"
    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"
    output_stride: int = 16
    head_conv: bool = False
    multi_level: bool = False
    num_classes: int = 2
    modalities: int = 5
    kmax: float = 0.3
    kmin: float = 0.0
    alpha: float = 0.0
    head_dropout: float = 0.1
    w: float = 8.0
    sigma: float = 0.5
    cls_scale: float = 0.5
    detach_mask: bool = False
    size_prior: typing.Literal["none", "absolute", "range", "batch_range"] = "range"
    area_min: float = 0.35
    area_max: float = 0.65
    minmax_start: int | typing.Literal["half"] = "half"
    erase_passes: int = 0
    erase_sigma: float = 10.0
    erase_start: int = 1
    bn_mode: typing.Literal["train", "masked_running", "frozen"] = "frozen"
    threshold: float = 0.5
    neg_weight: float = 1.0
    neg_updates: typing.Literal["all", "localizer"] = "localizer"
    classifier_backbone: typing.Literal["shared", "own"] = "shared"
    padding: typing.Literal["zeros", "replicate"] = "replicate"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check(
            self.output_stride in (8, 16, 32),
            f"ModelConfig.output_stride must be 8, 16 or 32, got {self.output_stride}",
        )
        _check(self.num_classes >= 2, f"ModelConfig.num_classes must be >= 2, got {self.num_classes}")
        _check(self.modalities >= 1, f"ModelConfig.modalities must be >= 1, got {self.modalities}")
        _check(self.kmax > 0, f"ModelConfig.kmax must be > 0, got {self.kmax}")
        _check(self.kmin >= 0, f"ModelConfig.kmin must be >= 0, got {self.kmin}")
        _check(0 <= self.head_dropout < 1, f"ModelConfig.head_dropout must be in [0, 1), got {self.head_dropout}")
        _check(self.w > 0, f"ModelConfig.w must be > 0, got {self.w}")
        _check(0 < self.cls_scale <= 1, f"ModelConfig.cls_scale must be in (0, 1], got {self.cls_scale}")
        _check(
            0 <= self.area_min < self.area_max <= 1,
            f"ModelConfig.area_min/area_max must satisfy 0 <= min < max <= 1, got {self.area_min}, {self.area_max}",
        )
        _check(
            self.classifier_backbone in ("shared", "own"),
            f"ModelConfig.classifier_backbone must be 'shared' or 'own', got {self.classifier_backbone!r}",
        )
        _check(self.neg_weight >= 0, f"ModelConfig.neg_weight must be >= 0, got {self.neg_weight}")
        _check(
            not (self.method == "minmax" and self.detach_mask and self.neg_updates == "localizer" and self.neg_weight),
            "ModelConfig: detach_mask=True with neg_updates='localizer' leaves the max-entropy term nothing to "
            "train (the mask is detached, every other part held); set neg_updates='all' (the 2019 paper) or "
            "neg_weight=0",
        )
        _check(
            self.minmax_start == "half" or (isinstance(self.minmax_start, int) and self.minmax_start >= 0),
            f"ModelConfig.minmax_start must be 'half' or an epoch >= 0, got {self.minmax_start!r}",
        )
        _check(self.erase_passes >= 0, f"ModelConfig.erase_passes must be >= 0, got {self.erase_passes}")
        _check(self.erase_sigma > 0, f"ModelConfig.erase_sigma must be > 0, got {self.erase_sigma}")
        _check(0 < self.threshold < 1, f"ModelConfig.threshold must be in (0, 1), got {self.threshold}")
        _check(
            len(self.mean) in (0, 3) and len(self.std) in (0, 3) and len(self.mean) == len(self.std),
            "ModelConfig.mean/std must both be empty or both have 3 values",
        )
        _check(all(s > 0 for s in self.std), "ModelConfig.std values must be > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Image-level training.

    Parameters
    ----------
    epochs
        Number of epochs.
    batch_size
        Images per minibatch.
    crop
        Side of the random training crops (reflect-padded when the image is smaller).
    optimizer
        ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
    lr, weight_decay, momentum
        Optimiser settings.
    backbone_lr_mult
        Learning-rate multiplier of the (pretrained) backbone.
    schedule
        ``"cosine"``, ``"step"`` (x gamma every step_epochs) or ``"constant"``.
    step_epochs, gamma
        Step schedule.
    warmup_epochs
        Linear warm-up epochs.
    barrier_t0, barrier_growth, barrier_tmax
        Log-barrier parameter t: t0 at epoch 0, x growth per epoch, capped at tmax.
    sigma_end
        Pseudo-binary sigma reached linearly at the last epoch (None: constant ``ModelConfig.sigma``).
    color_jitter
        Strength of the H&E colour augmentation (0 = off).
    seed
        Random seed (training is reproducible on CPU for a given seed and thread count).
    num_threads
        torch CPU threads (0 = torch default).
    amp
        bfloat16 autocast (float16 with loss scaling where bfloat16 is unsupported) on CUDA, for image
        training; slide training runs in float32.  On an H200 it did not speed up the default Lite0 model
        (README, "GPU path").
    workers
        DataLoader worker processes.
    eval_every
        Validate every this many epochs (and at the last epoch).
    select
        Checkpoint (``best.pt``) selection without masks: ``"error_loss"`` (validation error, then validation
        loss), ``"error"`` (validation error alone: method.md's rule), ``"loss"`` or ``"last"``; ties go to the
        later epoch.  The default breaks method.md's ties on error by the loss because on GlaS the valid error
        reaches 0 within a few epochs, after which "later epoch" alone would just pick the last one.
    """

    epochs: int = 20
    batch_size: int = 8
    crop: int = 224
    optimizer: typing.Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    backbone_lr_mult: float = 0.1
    schedule: typing.Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = 40
    gamma: float = 0.1
    warmup_epochs: int = 1
    barrier_t0: float = 5.0
    barrier_growth: float = 1.01
    barrier_tmax: float = 10.0
    sigma_end: float | None = None
    color_jitter: float = 1.0
    seed: int = 0
    num_threads: int = 0
    amp: bool = True
    workers: int = 0
    eval_every: int = 1
    select: typing.Literal["error_loss", "error", "loss", "last"] = "error_loss"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        _check(self.crop >= 32, f"TrainConfig.crop must be >= 32, got {self.crop}")
        _check(self.lr > 0, f"TrainConfig.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.backbone_lr_mult >= 0, f"TrainConfig.backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}")
        _check(self.step_epochs >= 1, f"TrainConfig.step_epochs must be >= 1, got {self.step_epochs}")
        _check(
            self.barrier_t0 > 0 and self.barrier_tmax >= self.barrier_t0,
            "TrainConfig.barrier_t0 must be > 0 and <= barrier_tmax",
        )
        _check(self.color_jitter >= 0, f"TrainConfig.color_jitter must be >= 0, got {self.color_jitter}")
        _check(self.num_threads >= 0, f"TrainConfig.num_threads must be >= 0, got {self.num_threads}")
        _check(self.workers >= 0, f"TrainConfig.workers must be >= 0, got {self.workers}")
        _check(self.eval_every >= 1, f"TrainConfig.eval_every must be >= 1, got {self.eval_every}")


def resolve_minmax_start(model_cfg: ModelConfig, epochs: int) -> ModelConfig:
    """The model settings with ``minmax_start`` as the epoch it will be for a run of ``epochs`` epochs.

    ``"half"`` becomes ``epochs // 2`` (for every method, so that a checkpoint always records a number).  A
    number is honoured: for min-max with a warning when it exceeds half the run (the classifier then trains on
    X+ / X- for fewer epochs than the localizer warmed up), refused when the min-max terms would never run;
    other methods ignore it.

    Parameters
    ----------
    model_cfg
        Model settings, possibly with ``minmax_start="half"``.
    epochs
        Epochs of the run (``TrainConfig.epochs``).

    Returns
    -------
    ModelConfig
        Settings whose ``minmax_start`` is an ``int``: what the checkpoint records.

    Raises
    ------
    ConfigError
        When a min-max model's ``minmax_start`` is a number >= ``epochs``.
    """
    start = model_cfg.minmax_start
    if start == "half":
        return dataclasses.replace(model_cfg, minmax_start=epochs // 2)
    if model_cfg.method == "minmax" and isinstance(start, int):
        if start >= epochs:
            msg = (
                f"minmax_start={start} with {epochs} epochs: the min-max terms would never run and the classifier "
                f"would stay untrained; use at most {epochs - 1}, or 'half'"
            )
            raise ConfigError(msg)
        if start > epochs // 2:
            log.warning(
                "minmax_start=%d with %d epochs: a warm-up longer than half the run; the classifier trains on "
                "X+ / X- for the last %d epochs only",
                start,
                epochs,
                epochs - start,
            )
    return model_cfg


def resolve_for_training(model_cfg: ModelConfig, epochs: int) -> ModelConfig:
    """The model settings a training run of ``epochs`` epochs uses, as its checkpoints record them.

    :func:`resolve_minmax_start`, and: a min-max model with a detached mask trains without a size prior (the
    prior acts through the mask's gradient, which a detached mask does not pass), so ``size_prior`` becomes
    ``"none"`` with a warning rather than being recorded as a term that never acted.

    Parameters
    ----------
    model_cfg
        Model settings as given.
    epochs
        Epochs of the run (``TrainConfig.epochs``).

    Returns
    -------
    ModelConfig
        The settings the run trains with.
    """
    cfg = resolve_minmax_start(model_cfg, epochs)
    if cfg.method == "minmax" and cfg.detach_mask and cfg.size_prior != "none":
        log.warning(
            "detach_mask=True: the size prior %r cannot act on a detached mask; training with size_prior='none'",
            cfg.size_prior,
        )
        cfg = dataclasses.replace(cfg, size_prior="none")
    return cfg


def half_region_overlap(region: int) -> int:
    """The grid overlap of slide training/validation and the default of inference: half the region.

    The slide score's top-k (``InferConfig.top_k``) is counted at this density, so both sides must agree.
    """
    return region // 2


#: The 2019 paper settings (min-max entropy, arXiv 1907.12934 and its public code) as a ModelConfig preset.
PAPER_2019 = {
    "minmax_start": 0,
    "classifier_backbone": "shared",
    "padding": "zeros",
    "neg_updates": "all",
    "kmax": 0.09,
    "kmin": 0.09,
    "alpha": 0.0,
    "head_dropout": 0.75,
    "w": 8.0,
    "sigma": 0.5,
    "detach_mask": True,
    "size_prior": "none",
    "erase_passes": 4,
    "erase_start": 1,
    "bn_mode": "train",
    "output_stride": 32,
}
