"""Typed configs loaded from YAML with `key.sub=value` overrides, validated before any work starts."""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from videodpo_ray.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base for every config object: unknown keys are errors, values are validated on assignment. A number given for
    a text field is refused, not rewritten (`run.name=007` would be `7`): quote it (`'run.name="007"'`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigLoader(yaml.SafeLoader):
    """YAML as configs are written: `1e-3` is a float (YAML 1.1 reads it as text unless written `1.0e-3`), a date
    stays text (`run.name=2024-06-01`) and only true / false are booleans (`run.name=on` is text; a bool field still
    takes yes / on)."""


class ConfigDumper(yaml.SafeDumper):
    """Writes what `ConfigLoader`, and any YAML 1.1 reader, read back unchanged: text that either would read as
    something else (`1e-3`, `no`, a date) is quoted."""


_FLOAT = (r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
          r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith((":bool", ":float", ":timestamp"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
for _resolver in (ConfigLoader, ConfigDumper):  # the dumper keeps YAML 1.1's resolvers too
    _resolver.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))


def load_yaml(text: str | bytes) -> Any:
    """Parse config YAML (`ConfigLoader`)."""
    return yaml.load(text, Loader=ConfigLoader)


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key segment")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({error})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override set (nested dicts created as needed)."""
    result = copy.deepcopy(data)
    for override in overrides:
        parts, value = parse_override(override)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def _format_errors(cls: type[BaseModel], source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        close = difflib.get_close_matches(key, setting_names(cls), n=1) if item["type"] == "extra_forbidden" else []
        lines.append(f"  {key}: {item['msg']}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "\n".join(lines)


def setting_names(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every setting of a config class by its dotted name, through nested configs (optional ones too)."""
    names = []
    for name, info in cls.model_fields.items():
        nested = [t for t in (info.annotation, *typing.get_args(info.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        names += setting_names(nested[0], f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return names


def build_config(cls: type[ConfigT], data: dict[str, Any], source: str = "<config>") -> ConfigT:
    """Validate `data` as `cls`; raise ConfigError naming `source` and every bad key (an unknown one with the
    closest known setting)."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(cls, source, error)) from None


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: Sequence[str] = ()) -> ConfigT:
    """Load a YAML file (or nothing: the class defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"{source}: cannot read config ({error.strerror})") from None
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        source = f"{source} (with overrides {' '.join(overrides)})"
    return build_config(cls, apply_overrides(data, overrides), source)


def dump_config(config: StrictConfig) -> str:
    """The config as YAML text (round-trips through load_config)."""
    return yaml.dump(config.model_dump(mode="json"), Dumper=ConfigDumper, sort_keys=False)
