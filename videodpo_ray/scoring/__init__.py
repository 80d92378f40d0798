"""Per-video scorers for OmniScore / VBench dimensions: one module per dimension behind one registry.

Dimension module contract (every module named in `DIMENSIONS` follows it):

    NAME: str
        the dimension name; also the key of its raw value (`videodpo_ray.omniscore.DIMENSIONS` spelling).
    MODELS: tuple[weights.ModelInfo, ...]
        every model / weights file the dimension loads, with its licence and source (() when model-free).
    CUDA_DTYPE: torch.dtype
        the dtype VBench ran the model in on CUDA (float16 for its CLIP models, else float32); CPU is always float32.
    load_model(spec: ModelSpec) -> torch.nn.Module | None
        the real-size model on CPU in float32, weights from `spec.weights` (local path, fsspec URL or hub id)
        loaded strictly with `weights.load_state_dict` + `weights.load_filtered`; None when model-free.
    tiny_model() -> torch.nn.Module | None
        the same classes with a tiny random-init config (seeded; tests and demos).
    score(frames: np.ndarray, model, prompt: str | None = None, fps: float | None = None) -> float
        frames uint8 (T, H, W, 3) RGB; moves its inputs to the model's device and dtype (`weights.device_dtype`).
    score_batch(videos: Sequence[np.ndarray], model, prompts=None, fps=None) -> list[float]
        `score` for many videos at once (prompts / fps: sequences aligned with videos, or None); same values up to
        float batching noise, faster than calling `score` per video.
  optional:
    OUTPUTS: tuple[str, ...] and score_outputs_batch(videos, model, prompts=None, fps=None) -> list[dict[str, float]]
        for a dimension with several outputs: NAME plus extra keys (dynamic_degree adds "dynamic_degree_vbench");
        OUTPUTS lists the keys every dict has. Without them the only output is NAME (from score_batch).
    place(model, device, dtype) -> model
        when `model.to(device=device, dtype=dtype)` is not right (e.g. a float32 head behind a float16 tower).

Use `load_scorer_model(name, spec, device)` (or `place_model` for a model built otherwise) to get a ready model and
`score_outputs(name, ...)` to score; both import the dimension module lazily, so a dimension's dependencies load
only when it is configured.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from videodpo_ray.config import StrictConfig
from videodpo_ray.dimensions import (
    DIMENSIONS as DIMENSION_TABLE,
)
from videodpo_ray.dimensions import (
    OMNISCORE_DIMENSIONS,
    OMNISCORE_QUALITY_DIMENSIONS,
    OMNISCORE_SEMANTIC_DIMENSIONS,
)

if TYPE_CHECKING:  # torch is imported where a model runs: parsing a config must not pay for it (seconds)
    import torch

DIMENSIONS: dict[str, str] = {
    "subject_consistency": "videodpo_ray.scoring.subject_consistency",
    "background_consistency": "videodpo_ray.scoring.background_consistency",
    "temporal_flickering": "videodpo_ray.scoring.temporal_flickering",
    "motion_smoothness": "videodpo_ray.scoring.motion_smoothness",
    "dynamic_degree": "videodpo_ray.scoring.dynamic_degree",
    "aesthetic_quality": "videodpo_ray.scoring.aesthetic_quality",
    "imaging_quality": "videodpo_ray.scoring.imaging_quality",
    "overall_consistency": "videodpo_ray.scoring.overall_consistency",
    "clip_score": "videodpo_ray.scoring.clip_score",
    "toy_semantic": "videodpo_ray.scoring.toy_semantic",
}
"""Dimension name -> module implementing the contract above."""

MODEL_FREE: frozenset[str] = frozenset({"temporal_flickering"})
"""Dimensions that need no weights."""

DType = Literal["auto", "float32", "float16", "bfloat16"]


class ModelSpec(StrictConfig):
    """Where one dimension's weights come from and how its model runs."""

    weights: str | None = None
    """Main weights: local path, fsspec URL (s3://, gs://, ...) or hub id, as the dimension documents."""
    head: str | None = None
    """Second weights file where the dimension has one (aesthetic_quality: the LAION linear head)."""
    tiny: bool = False
    """Random-init tiny model of the same classes instead of real weights (tests, demos)."""
    dtype: DType = "auto"
    """On CUDA: "auto" is the dimension's CUDA_DTYPE (what VBench used); CPU always runs float32."""


class OmniScoreConfig(StrictConfig):
    """The dimensions OmniScore blends, (4 Q + S) / 5 with Q and S the weighted means of `quality` and `semantic`
    (`omniscore.omniscore`). The default is the paper's; the toy world uses its own (never VBench)."""

    quality: list[str] = Field(default_factory=lambda: list(OMNISCORE_QUALITY_DIMENSIONS), min_length=1)
    semantic: list[str] = Field(default_factory=lambda: list(OMNISCORE_SEMANTIC_DIMENSIONS), min_length=1)

    @model_validator(mode="after")
    def _known(self) -> "OmniScoreConfig":
        unknown = [d for d in (*self.quality, *self.semantic) if d not in DIMENSION_TABLE]
        if unknown:
            known = ", ".join(DIMENSION_TABLE)
            raise ValueError(f"omniscore: unknown dimension(s) {', '.join(unknown)}; known: {known}")
        return self

    @property
    def dimensions(self) -> list[str]:
        return [*self.quality, *self.semantic]


class ScorerConfig(StrictConfig):
    """Which dimensions a scorer computes and where each model's weights are."""

    dimensions: list[str] = list(OMNISCORE_DIMENSIONS)
    omniscore: OmniScoreConfig = OmniScoreConfig()
    """What the `omniscore` column blends; computed when every one of its dimensions is configured."""
    models: dict[str, ModelSpec] = {}
    tiny: bool = False
    """Every model random-init tiny (overrides `models.*.tiny`)."""
    device: str = "auto"
    """"auto": cuda when available, else cpu."""

    @model_validator(mode="after")
    def _check(self) -> "ScorerConfig":
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown dimension(s) {', '.join(unknown)}; known: {', '.join(DIMENSIONS)}")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions listed twice: {self.dimensions}")
        unused = [name for name in self.models if name not in self.dimensions]
        if unused:
            raise ValueError(f"models given for dimension(s) not in `dimensions`: {', '.join(unused)}")
        if not self.tiny:
            missing = [
                d for d in self.dimensions if d not in MODEL_FREE and not self.spec(d).tiny and not self.spec(d).weights
            ]
            if missing:
                raise ValueError(
                    "no weights for "
                    + ", ".join(missing)
                    + ": set models.<dimension>.weights (or tiny: true for random-init test models)"
                )
        return self

    def dimensions_missing_for_omniscore(self) -> list[str]:
        """What `omniscore` blends that no configured dimension outputs: empty when the scorer computes OmniScore."""
        outputs = {key for name in self.dimensions for key in dimension_outputs(name)}
        return [name for name in self.omniscore.dimensions if name not in outputs]

    def spec(self, dimension: str) -> ModelSpec:
        """The model spec of `dimension`, with the config-wide `tiny` applied."""
        spec = self.models.get(dimension, ModelSpec())
        return spec.model_copy(update={"tiny": True}) if self.tiny else spec

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def dimension_module(name: str) -> ModuleType:
    """The module implementing dimension `name` (imported on first use)."""
    try:
        module_name = DIMENSIONS[name]
    except KeyError:
        raise ValueError(f"unknown dimension {name!r}; known: {', '.join(DIMENSIONS)}") from None
    return importlib.import_module(module_name)


def resolve_dtype(dtype: DType, device: torch.device, cuda_dtype: torch.dtype) -> torch.dtype:
    """float32 on CPU; on CUDA the configured dtype, "auto" meaning the dimension's VBench dtype."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return cuda_dtype if dtype == "auto" else getattr(torch, dtype)


def load_scorer_model(name: str, spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module | None:
    """Load dimension `name`'s model (tiny or real per `spec`), in eval mode on `device` in its dtype."""
    module = dimension_module(name)
    model = module.tiny_model() if spec.tiny else module.load_model(spec)
    return place_model(name, model, device, spec.dtype)


def place_model(
    name: str, model: torch.nn.Module | None, device: torch.device | str, dtype: DType = "auto"
) -> torch.nn.Module | None:
    """Move dimension `name`'s model to `device` in its dtype (see `resolve_dtype`), eval mode, no gradients."""
    import torch

    if model is None:
        return None
    module = dimension_module(name)
    device = torch.device(device)
    resolved = resolve_dtype(dtype, device, module.CUDA_DTYPE)
    place = getattr(module, "place", None)
    model = place(model, device, resolved) if place else model.to(device=device, dtype=resolved)
    return model.eval().requires_grad_(False)


def dimension_outputs(name: str) -> tuple[str, ...]:
    """The output keys of dimension `name` (its OUTPUTS, else just the name)."""
    return tuple(getattr(dimension_module(name), "OUTPUTS", (name,)))


def score_outputs(
    name: str,
    videos: Sequence[np.ndarray],
    model: torch.nn.Module | None,
    prompts: Sequence[str | None] | None = None,
    fps: Sequence[float | None] | None = None,
) -> list[dict[str, float]]:
    """Every output of dimension `name` for each video: {name: value} plus the dimension's extra outputs."""
    module = dimension_module(name)
    outputs_batch = getattr(module, "score_outputs_batch", None)
    if outputs_batch is None:
        return [{name: value} for value in module.score_batch(videos, model, prompts=prompts, fps=fps)]
    results = outputs_batch(videos, model, prompts=prompts, fps=fps)
    expected = set(dimension_outputs(name))
    for result in results:
        if set(result) != expected:
            raise RuntimeError(f"{name}: outputs {sorted(result)} differ from its OUTPUTS {sorted(expected)}")
    return results
