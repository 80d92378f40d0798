"""Config loading: YAML + key.sub=value overrides, unknown keys and bad values fail naming file, key and reason."""

from __future__ import annotations

from typing import Literal

import pytest
import yaml

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


@pytest.mark.parametrize("override, value", [
    ("a=1e-3", 0.001), ("a=5e8", 5e8), ("a=-2.5E+2", -250.0), ("a=7", 7), ("a=.inf", float("inf")),
    ("a=2024-06-01", "2024-06-01"), ("a=on", "on"), ("a=no", "no"), ("a=True", True), ("a='1e-3'", "1e-3"),
])
def test_override_values_read_as_configs_are_written(override: str, value):
    """`1e-3` is a float also where no typed field rescues it (`deepspeed.overrides`); a date, `on` or `no` is text."""
    assert apply_overrides({}, [override]) == {"a": value}


def test_a_date_or_on_is_a_name_a_number_is_refused_and_text_round_trips(tmp_path):
    for name in ("2024-06-01", "on", "no"):
        assert load_config(Example, None, [f"name={name}"]).name == name
    with pytest.raises(ConfigError, match="name: Input should be a valid string"):  # not silently `7`
        load_config(Example, None, ["name=007"])
    assert load_config(Example, None, ['name="007"']).name == "007"
    for name in ("1e-3", "123", "on", "no", "2024-06-01", "null"):
        config = Example(name=name)
        text = dump_config(config)
        assert load_config(Example, write(tmp_path, text)) == config
        assert yaml.safe_load(text)["name"] == name  # any YAML 1.1 reader reads the same text


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(Example, path)
    message = str(error.value)
    assert str(path) in message
    assert "optim.learning_rate" in message
    assert "Extra inputs are not permitted" in message
    with pytest.raises(ConfigError, match=r"stesp: Extra inputs are not permitted \(did you mean steps\?\)"):
        load_config(Example, None, ["stesp=3"])
    with pytest.raises(ConfigError, match=r"optim.schedul: Extra .* \(did you mean optim.schedule\?\)"):
        load_config(Example, None, ["optim.schedul=cosine"])
    with pytest.raises(ConfigError, match=r"  zzz: Extra inputs are not permitted$"):  # nothing close: no guess
        load_config(Example, None, ["zzz=1"])


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


@pytest.mark.parametrize("storage_path", ["s3://bucket/exp#1", "s3://bucket/a%20b", "gs://bucket/my run", "s3://b/x?y"])
def test_a_run_storage_url_ray_train_would_read_apart_from_fsspec_is_refused(storage_path: str):
    from videodpo_ray.training.config import TrainConfig

    base = ["data.pairs_url=/pairs", "run.name=dpo"]
    with pytest.raises(ConfigError, match=r"run\.storage_path: .*Ray Train's URL parser reads a storage URL"):
        load_config(TrainConfig, None, [*base, f"run.storage_path={storage_path}"])
    local = load_config(TrainConfig, None, [*base, "run.storage_path=/tmp/exp#1 a%20b"])  # a local path is one path
    assert local.run.storage_path == "/tmp/exp#1 a%20b"
