from __future__ import annotations

from pathlib import Path

import pytest

from wsltool.config import InferConfig, ModelConfig, from_dict, load_toml, parse_value, save_toml, to_dict
from wsltool.errors import ConfigError


def test_parse_value() -> None:
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("null") is None
    assert parse_value("none") == "none"  # a legal value of several settings: size_prior=none, pretrained=none
    assert from_dict(ModelConfig, {"size_prior": parse_value("none")}).size_prior == "none"


def test_from_dict_round_trip_and_errors() -> None:
    cfg = InferConfig(mpp=1.0, overlap=16)
    assert from_dict(InferConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(InferConfig, {"overlapp": 3})
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(InferConfig, {"overlap": "a"})


def test_minmax_start_half_round_trips_through_toml(tmp_path: Path) -> None:
    """The default warm-up, ``"half"``, is plain data: TOML and ``--set`` take it, as they take an epoch."""
    save_toml(ModelConfig(), tmp_path / "m.toml")
    assert load_toml(ModelConfig, tmp_path / "m.toml").minmax_start == "half"
    assert from_dict(ModelConfig, {"minmax_start": parse_value("30")}).minmax_start == 30
    assert from_dict(ModelConfig, {"minmax_start": parse_value("half")}).minmax_start == "half"
    with pytest.raises(ConfigError, match="minmax_start: expected int or expected one of 'half', got 'third'"):
        from_dict(ModelConfig, {"minmax_start": "third"})
