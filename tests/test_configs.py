"""Configs save themselves: one base (to_dict / save / load, tolerant of unknown keys) for every config."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import CONFIG_CLASSES

from sbmoe.config.base import ConfigBase
from sbmoe.config.jobs import EvaluateConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import MissingInputError, UsageError

CONFIGS = CONFIG_CLASSES


@pytest.mark.parametrize("config_class", CONFIGS)
def test_every_config_round_trips_through_its_file(config_class, tmp_path):
    assert issubclass(config_class, ConfigBase)
    config = config_class()
    assert config.to_dict() == dataclasses.asdict(config)
    config.save(tmp_path / "config.json")
    assert config_class.load(tmp_path / "config.json") == config


def test_load_names_unknown_keys_maps_renamed_ones_and_refuses_wrong_types(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"num_experts": 3, "top_k": 2, "from_the_future": 1}), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"ignoring unknown ModelConfig keys \['from_the_future'\]"):
        config = ModelConfig.load(path)
    assert (config.num_experts, config.experts_top_k) == (3, 2)  # top_k: an older name
    path.write_text(json.dumps({"num_experts": "three"}), encoding="utf-8")
    with pytest.raises(UsageError, match="num_experts must be int, got 'three'"):
        ModelConfig.load(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UsageError, match="expected a JSON object of ModelConfig fields"):
        ModelConfig.load(path)
    with pytest.raises(MissingInputError):
        ModelConfig.load(tmp_path / "missing.json")


def test_a_job_compares_settings_built_from_its_config_as_the_artifact_records_them(tmp_path):
    from sbmoe.core.artifacts import EVALUATION, evaluation_settings, recorded_settings
    from sbmoe.core.io import write_json

    config = EvaluateConfig(top_k=5)
    write_json(
        tmp_path / "config.json",
        {"evaluate_config": config.to_dict(), "model_fingerprint": "f", "data": {"name": "c", "root": "/c"}},
    )
    (tmp_path / "metrics.json").write_text("{}")
    assert recorded_settings(tmp_path, EVALUATION) == evaluation_settings("f", config, "c")
