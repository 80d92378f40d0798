"""What a model is, as configuration: the family registry, `ModelConfig` and `LoraConfig`.

Torch-free on purpose: every job parses and validates its config from here before it imports torch, Ray or
diffusers, so bad input fails in about a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import Field, field_validator

from videodpo_ray.config import StrictConfig

if TYPE_CHECKING:  # peft is imported where LoRA is used: parsing a config must not pay for it (seconds)
    from peft import LoraConfig as PeftLoraConfig

FAMILIES: dict[str, str] = {
    "vc2": "videodpo_ray.models.vc2:VideoCrafter2",
    "t2v_turbo": "videodpo_ray.models.t2v_turbo:T2VTurbo",
    "cogvideox": "videodpo_ray.models.cogvideox:CogVideoX",
    "wan": "videodpo_ray.models.wan:Wan",
}
"""Family name -> "module:class" of its VideoDiffusionModel subclass."""

FinetuneMode = Literal["full", "lora", "temporal"]


def families() -> tuple[str, ...]:
    """The registered family names (what `ModelConfig.family` may be)."""
    return tuple(FAMILIES)


class LoraConfig(StrictConfig):
    """A fresh peft LoRA on the denoiser."""

    rank: int = 64
    alpha: float | None = None  # None -> alpha = rank (scale 1.0)
    target_modules: list[str] | None = None  # None -> the family's default attention/projection targets
    dropout: float = 0.0

    def peft_config(self, default_targets: Sequence[str]) -> PeftLoraConfig:
        """The peft LoraConfig (targets: `target_modules` or the family's `default_targets`)."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.target_modules or default_targets),
            lora_dropout=self.dropout,
        )


class ModelConfig(StrictConfig):
    """Which model to build and how it trains; shared by the sampler, the encoder and the train job."""

    family: str = "vc2"  # a registered family: `families()`
    variant: str = "tiny"  # a preset of the family: `model_class(family).presets()`
    path: str | None = None  # converted directory, original checkpoint, or fsspec URL; None -> random init
    turbo_lora_path: str | None = None  # T2V-Turbo released unet_lora.pt
    turbo_lora_mode: Literal["train_released", "merge_and_new"] = "merge_and_new"
    text_encoder_path: str | None = None
    finetune: FinetuneMode = "full"
    lora: LoraConfig = LoraConfig()
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast; frozen weights stored in bf16
    # recompute activations in backward; "auto": the train job measures whether its micro-batch fits without
    # (`training.memory`); samplers ignore it
    gradient_checkpointing: bool | Literal["auto"] = False
    fps: int = 16  # fps conditioning in training (VC2 family)
    # False: build the model without its text encoder (a trainer whose pair shards store every text embedding);
    # encode_prompts then raises. Never written out (not in any manifest, config dump or checkpoint).
    build_text_encoder: bool = Field(True, exclude=True)

    @field_validator("family")
    @classmethod
    def _registered_family(cls, family: str) -> str:
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; registered: {', '.join(FAMILIES)}")
        return family
