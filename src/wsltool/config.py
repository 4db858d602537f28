"""Frozen configuration dataclasses and their TOML round trip.

Every configurable part of wsltool takes one of these frozen dataclasses.  They are plain data
(numbers, strings, tuples), so they serialise to TOML for the CLI's ``--config`` files and to JSON
for the provenance attributes of heatmap stores and checkpoints.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from wsltool.errors import ConfigError

T = TypeVar("T")


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
        msg = errors[0] if errors else f"{where}: invalid value {value!r}"
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
