"""Model families behind one interface: the family registry and `build_model`, the only entry point jobs use.

A family is one module with a `VideoDiffusionModel` subclass (and its `PRESETS`) plus one line in `FAMILIES`.
Importing this package loads neither torch nor diffusers (configs are parsed before either is paid for); family
modules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from videodpo_ray.errors import ConfigError
from videodpo_ray.models.config import FAMILIES, LoraConfig, ModelConfig, families

if TYPE_CHECKING:
    from videodpo_ray.models.base import VideoDiffusionModel


def model_class(family: str) -> type[VideoDiffusionModel]:
    """The VideoDiffusionModel subclass for a family name."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; registered: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(config: ModelConfig, seed: int | None = None) -> VideoDiffusionModel:
    """Build the model a ModelConfig describes; with `seed`, under that torch seed, so random-init parts are
    identical in every actor, on every rank and in every run (the caller's RNG state is left untouched)."""
    import torch

    if seed is None:
        return model_class(config.family).from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config.family).from_config(config)


__all__ = ["FAMILIES", "LoraConfig", "ModelConfig", "build_model", "families", "model_class"]
