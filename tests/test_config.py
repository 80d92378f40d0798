"""Config loading: YAML + key.sub=value overrides, unknown keys and bad values fail naming file, key and reason."""

from __future__ import annotations

from typing import Literal

import pytest

from videodpo_ray.config import StrictConfig, apply_overrides, dump_config, load_config
from videodpo_ray.errors import ConfigError


class Optim(StrictConfig):
    lr: float = 1e-4
    schedule: Literal["constant", "cosine"] = "constant"


class Example(StrictConfig):
    name: str = "run"
    steps: int = 10
    optim: Optim = Optim()
    tags: list[str] = []


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config(Example) == Example()


def test_file_and_overrides_are_applied_in_order(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 0.001\n")
    config = load_config(Example, path, ["optim.schedule=cosine", "steps=7", "tags=[a, b]"])
    assert config.steps == 7
    assert config.optim.lr == 0.001
    assert config.optim.schedule == "cosine"
    assert config.tags == ["a", "b"]


def test_override_values_are_parsed_as_yaml():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=true", "d=null", "e=hello world"])
    assert data == {"a": {"b": 2.5, "c": True}, "d": None, "e": "hello world"}


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(Example, path)
    message = str(error.value)
    assert str(path) in message
    assert "optim.learning_rate" in message
    assert "Extra inputs are not permitted" in message


def test_bad_value_names_key_and_reason(tmp_path):
    path = write(tmp_path, "steps: many\n")
    with pytest.raises(ConfigError, match=r"steps: Input should be a valid integer"):
        load_config(Example, path)


def test_bad_override_is_reported_with_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.schedule.*constant.*cosine"):
        load_config(Example, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(Example, None, ["steps"])
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        load_config(Example, write(tmp_path, "steps: 3\n"), ["steps.inner=1"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Example, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Example, write(tmp_path, "steps: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Example, write(tmp_path, "- 1\n- 2\n"))


def test_dump_round_trips(tmp_path):
    config = Example(steps=3, optim=Optim(lr=0.5, schedule="cosine"), tags=["x"])
    assert load_config(Example, write(tmp_path, dump_config(config))) == config
