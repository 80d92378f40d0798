"""Model families behind one interface: the family registry and `build_model`, the only entry point jobs use.

A family is one module with a `VideoDiffusionModel` subclass (and its `PRESETS`) plus one line in `FAMILIES`.
Family modules are imported on first use, so importing this package does not load diffusers models.
"""

from __future__ import annotations

import importlib

import torch

from videodpo_ray.errors import ConfigError
from videodpo_ray.models.base import LoraConfig, ModelConfig, VideoDiffusionModel

FAMILIES: dict[str, str] = {
    "vc2": "videodpo_ray.models.vc2:VideoCrafter2",
    "t2v_turbo": "videodpo_ray.models.t2v_turbo:T2VTurbo",
    "cogvideox": "videodpo_ray.models.cogvideox:CogVideoX",
    "wan": "videodpo_ray.models.wan:Wan",
}
"""Family name -> "module:class" of its VideoDiffusionModel subclass."""


def families() -> tuple[str, ...]:
    """The registered family names (what `ModelConfig.family` may be)."""
    return tuple(FAMILIES)


def model_class(family: str) -> type[VideoDiffusionModel]:
    """The VideoDiffusionModel subclass for a family name."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; registered: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(config: ModelConfig, seed: int | None = None) -> VideoDiffusionModel:
    """Build the model a ModelConfig describes; with `seed`, under that torch seed, so random-init parts are
    identical in every actor, on every rank and in every run (the caller's RNG state is left untouched)."""
    if seed is None:
        return model_class(config.family).from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config.family).from_config(config)


__all__ = ["FAMILIES", "LoraConfig", "ModelConfig", "VideoDiffusionModel", "build_model", "families", "model_class"]
