"""The one interface the model families implement, and everything the families share.

Jobs and actors only ever talk to `VideoDiffusionModel`; every family difference (latent layout, noising,
prediction target, sampler, text encoder) stays in that family's module. This module owns what all families do
the same way (configs: `models/config.py`; peft, dtype and compile helpers: `models/modules.py`; strict loading:
`models/loading.py`; what the diffusers-transformer families share: `models/transformer_family.py`):
- the finetune modes and their frozen reference (`configure_training`), the trainable weights (copies, loaded
  strictly), the preset registry (`PRESETS` / `presets()` / `preset()`) and `save_pretrained`;
- `predict` (checked input shapes, policy or frozen reference) and `sample` (per-seed noise, the family's
  `denoise`, decode); the formulas the families share (pixel ranges, classifier-free guidance) are in `functional.py`;
- the fast paths: frozen weights in the compute dtype (`freeze_for_sampling`), the one bf16 `autocast`,
  channels-last convolutions, `torch.compile` with an eager fallback.

Conventions shared by every family: videos in and out of the model are uint8 tensors (B, T, H, W, 3); latents are
the family's own layout (`latent_layout`), already multiplied by the VAE scale factor; text embeddings are what the
denoiser's cross-attention takes, (B, L, D); timesteps are int64 (B,) on the 0..num_train_timesteps-1 grid.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from videodpo_ray.errors import ConfigError
from videodpo_ray.models.config import ModelConfig
from videodpo_ray.models.functional import latent_space_name
from videodpo_ray.models.loading import check_state_dict
from videodpo_ray.models.modules import (
    AUTOCAST_LAYERS,
    CompileBackend,
    adapters_disabled,
    compile_module,
    hold_frozen_in,
    inject_lora_adapter,
)

if TYPE_CHECKING:  # peft is imported where LoRA is used: building a model without LoRA must not pay for it
    from peft.tuners.tuners_utils import BaseTunerLayer

PredictionType = Literal["epsilon", "v_prediction", "flow_prediction"]
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# --- the interface --------------------------------------------------------------------------------------------------
class VideoDiffusionModel(nn.Module, ABC):
    """A text-to-video latent diffusion model with a policy and a frozen reference for DPO.

    A family sets `PRESETS`, the abstract methods, and in `__init__` the `denoiser` (the module DPO trains: its
    parameter names are the trainable state's keys) and `video_size`, then calls `configure_training()`. The DPO
    reference is then `reference_denoiser` (a frozen copy, full / temporal finetuning) or the denoiser with its LoRA
    adapters off (`reference_model()`).
    """

    family: ClassVar[str]
    prediction_type: ClassVar[PredictionType]
    PRESETS: ClassVar[Mapping[str, Any]]  # variant name -> the family's preset object
    lora_targets: ClassVar[Sequence[str]] = DEFAULT_LORA_TARGETS  # modules a fresh LoRA adapts by default
    temporal_modules: ClassVar[Sequence[str]] = ()  # name parts of the layers finetune="temporal" trains
    latent_layout: ClassVar[str]  # the axes of the latents `predict` takes, e.g. "B, C, T, H, W"
    fixed_text_length: ClassVar[bool] = True  # False: the denoiser takes any number of text tokens
    denoiser: nn.Module  # the UNet or transformer that DPO trains
    vae: nn.Module  # a diffusers autoencoder (its `config` defines the latent space)
    video_size: tuple[int, int, int]  # (frames, height, width) that `sample` produces by default
    default_num_inference_steps: int  # `sample`'s defaults (the family's reference sampler)
    default_guidance_scale: float

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != self.family:
            raise ConfigError(f"model.family={config.family!r} cannot build {type(self).__name__} ({self.family!r})")
        self.config = config
        self.reference_denoiser: nn.Module | None = None
        self._tuner_layers: list[BaseTunerLayer] = []
        self._trainable_names: list[str] = []
        self._compiled = False

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # --- presets ------------------------------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> tuple[str, ...]:
        """The names `ModelConfig.variant` may take."""
        return tuple(cls.PRESETS)

    @classmethod
    def preset(cls, variant: str) -> Any:
        """The preset object of `variant`; ConfigError listing the presets when there is none."""
        if variant not in cls.PRESETS:
            raise ConfigError(f"model.variant={variant!r}: {cls.family} presets are {', '.join(cls.presets())}")
        return cls.PRESETS[variant]

    @classmethod
    def tiny(cls, config: ModelConfig | None = None) -> "VideoDiffusionModel":
        """The random-init "tiny" preset (small enough for CPU tests), with `config`'s training settings."""
        config = (config or ModelConfig(family=cls.family)).model_copy(update={"variant": "tiny"})
        if config.path is not None or config.text_encoder_path is not None:
            raise ConfigError(f"{cls.__name__}.tiny() builds random weights; load checkpoints with from_config")
        return cls.from_config(config)

    @classmethod
    @abstractmethod
    def from_config(cls, config: ModelConfig) -> "VideoDiffusionModel":
        """Build the model a config describes: a preset with random init, or weights from `config.path`."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the base weights in the layout `ModelConfig(family, variant, path=directory)` loads back."""
        if self.config.finetune == "lora":
            raise ConfigError("save_pretrained writes base weights only; export a LoRA with trainable_state_dict()")
        (directory := Path(directory)).mkdir(parents=True, exist_ok=True)
        self.write_pretrained(directory)
        return directory

    @abstractmethod
    def write_pretrained(self, directory: Path) -> None:
        """The family's part of save_pretrained: write every component into the existing `directory`."""

    # --- finetune modes and the reference -----------------------------------------------------------------------
    def configure_training(self) -> None:
        """Freeze all but what `config.finetune` trains and set up the DPO reference (call once, after the
        denoiser exists): "lora" injects a fresh adapter (`inject_lora`), reference = adapters off; "full" and
        "temporal" keep a frozen copy. With mixed_precision "bf16" frozen denoiser weights are held in bf16: all of
        LoRA's base weights; in the copy and the layers "temporal" leaves alone, AUTOCAST_LAYERS only (at step 0
        the reference predicts exactly what the float32 policy does under autocast). Trained weights stay float32."""
        denoiser, finetune = self.denoiser, self.config.finetune
        denoiser.requires_grad_(False)
        if finetune == "temporal" and not self.temporal_modules:
            raise ConfigError(f"model.finetune='temporal': {self.family} has no temporal layers; use 'full' or 'lora'")
        if finetune == "lora":
            self._tuner_layers = self.inject_lora()
        else:
            for name, parameter in denoiser.named_parameters():
                parameter.requires_grad_(finetune == "full" or any(p in f".{name}" for p in self.temporal_modules))
            self.reference_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if self.config.mixed_precision == "bf16":  # a copy computes as the float32 policy it copies (see below)
            layers = None if finetune == "lora" else AUTOCAST_LAYERS
            for module in (denoiser, self.reference_denoiser):
                if module is not None:
                    hold_frozen_in(module, torch.bfloat16, layers)
        self.set_gradient_checkpointing(self.config.gradient_checkpointing is True)  # "auto": as the trainer settles
        self._trainable_names = [name for name, p in denoiser.named_parameters() if p.requires_grad]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the denoiser's activations in backward (True) or keep them (False)."""
        if enabled:
            self.denoiser.enable_gradient_checkpointing()
        else:
            self.denoiser.disable_gradient_checkpointing()

    def inject_lora(self) -> list[BaseTunerLayer]:
        """Add the trainable LoRA of `config.lora` to the denoiser; return the tuner layers."""
        return inject_lora_adapter(self.denoiser, self.config.lora.peft_config(self.lora_targets))

    @contextmanager
    def reference_adapters(self) -> Iterator[None]:
        """The denoiser's adapters in their reference state for the duration (default: all off)."""
        with adapters_disabled(self._tuner_layers):
            yield

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The frozen DPO reference: the copy, or the denoiser in its reference adapter state."""
        if self.reference_denoiser is not None:
            yield self.reference_denoiser
            return
        with self.reference_adapters():
            yield self.denoiser

    def train(self, mode: bool = True) -> "VideoDiffusionModel":
        """`nn.Module.train`, except that the frozen reference copy stays in eval mode (its dropout, if any, off)."""
        super().train(mode)
        if self.reference_denoiser is not None:
            self.reference_denoiser.eval()
        return self

    def merge_lora(self) -> None:
        """Fold the active LoRA adapter into the base weights and remove every adapter: the denoiser keeps its
        output (up to float rounding) in the base architecture, and the model saves like a full model."""
        if not self._tuner_layers:
            raise ConfigError(f"{type(self).__name__} has no LoRA adapter to merge (finetune={self.config.finetune!r})")
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.denoiser.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(self.denoiser.get_submodule(parent_name), child, module.get_base_layer())
        self._tuner_layers, self._trainable_names = [], []
        self.config = self.config.model_copy(update={"finetune": "full"})

    # --- fast paths -------------------------------------------------------------------------------------------
    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """bf16 autocast on `device` when mixed_precision is "bf16", else a no-op: every denoiser forward runs in it."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16")

    def freeze_for_sampling(self) -> None:
        """Sampling only, for good: drop the DPO reference, freeze every weight and, with mixed_precision "bf16",
        store every module (denoiser, VAE, text encoder) in bf16: no float32 master copy where nothing trains."""
        self.reference_denoiser = None
        self._trainable_names = []
        self.requires_grad_(False).eval()
        if self.config.mixed_precision == "bf16":
            hold_frozen_in(self, torch.bfloat16)

    def use_channels_last(self) -> None:
        """Every convolution weight (denoiser, reference, VAE) in channels-last layout (NHWC, NDHWC for 3D), so
        cuDNN convolves without layout transposes. Same values up to the convolution algorithm's rounding."""
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}
        for parameter in self.parameters():
            if parameter.dim() in formats:
                parameter.data = parameter.data.contiguous(memory_format=formats[parameter.dim()])

    def compile_denoiser(self, backend: CompileBackend = "inductor") -> None:
        """`compile_module` the denoiser and the reference copy, once per model (eager with a warning on failure)."""
        if self._compiled:
            return
        for module in (self.denoiser, self.reference_denoiser):
            if module is not None:
                compile_module(module, backend)
        self._compiled = True

    def compile_for_sampling(self, backend: CompileBackend = "inductor") -> None:
        """`compile_denoiser`, and the VAE decoder where the family names one that compiles as it is
        (`compilable_decoder`), once per model."""
        if not self._compiled and self.compilable_decoder is not None:
            compile_module(self.compilable_decoder, backend)
        self.compile_denoiser(backend)

    @property
    def compilable_decoder(self) -> nn.Module | None:
        """The VAE decoder `compile_for_sampling` compiles; None: the decoder stays eager (the 3D causal decoders
        carry Python-side frame caches from call to call)."""
        return None

    # --- sampling helpers ---------------------------------------------------------------------------------------
    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The denoiser in eval mode for the duration (sampling), then back in the mode it was in."""
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            yield
        finally:
            self.denoiser.train(was_training)

    def seeded_noise(self, seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Starting latents (B, *shape) on the model's device: item i is N(0, 1) from a CPU generator seeded with
        seeds[i], so a video depends on its own seed only, on any device. Also the generators, past that draw: a
        stochastic sampler draws each sample's later noise from its own."""
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        noise = torch.stack([torch.randn(tuple(shape), generator=generator) for generator in generators])
        return noise.to(self.device), generators

    # --- text ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) for the denoiser; the empty string gives the CFG/unconditional embedding."""

    def empty_prompt_embedding(self) -> torch.Tensor:
        """The embedding of "" (1, L, D), used for classifier-free guidance and CFG prompt dropout."""
        return self.encode_prompts([""])

    # --- VAE ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> scaled latents in the family's layout (the posterior mean unless a generator)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 (B, T, H, W, 3)."""

    def latent_settings(self) -> dict[str, Any]:
        """What fixes the latents `encode_videos` makes: the VAE's config (layout, scale, latent mean and std)."""
        return {key: value for key, value in self.vae.config.items() if not key.startswith("_")}

    @property
    def latent_space(self) -> str:
        """The pair shards' `latent_model`: `family:` + a digest of `latent_settings()` (CogVideoX 2B != 5B)."""
        return latent_space_name(self.family, self.latent_settings())

    # --- diffusion ----------------------------------------------------------------------------------------------
    @abstractmethod
    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps (B,) int64 drawn from the family's training distribution."""

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t from x_0, noise and t with the family's forward process."""

    @abstractmethod
    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict: the noise (epsilon) or the velocity v."""

    @property
    @abstractmethod
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of the text embeddings the denoiser takes."""

    def check_prediction_inputs(self, noisy_latents: torch.Tensor, text_embeddings: torch.Tensor) -> None:
        """ValueError naming the shapes `predict` takes unless the inputs fit `latent_layout` and `text_shape`."""
        channels = self.denoiser.config.in_channels
        if noisy_latents.ndim != 5 or noisy_latents.shape[self.latent_layout.split(", ").index("C")] != channels:
            expected = self.latent_layout.replace("C", str(channels))
            raise ValueError(f"expected latents ({expected}), got {tuple(noisy_latents.shape)}")
        length, width = self.text_shape
        if text_embeddings.ndim != 3 or text_embeddings.shape[2] != width or (
            self.fixed_text_length and text_embeddings.shape[1] != length
        ):
            shown = length if self.fixed_text_length else "L"
            raise ValueError(f"expected text embeddings (B, {shown}, {width}), got {tuple(text_embeddings.shape)}")

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        *,
        reference: bool = False,
    ) -> torch.Tensor:
        """Denoiser output for x_t (float32). reference=True runs the frozen reference model without grad."""
        self.check_prediction_inputs(noisy_latents, text_embeddings)
        if not reference:
            return self.run_denoiser(self.denoiser, noisy_latents, timesteps, text_embeddings)
        with torch.no_grad(), self.reference_model() as denoiser:
            return self.run_denoiser(denoiser, noisy_latents, timesteps, text_embeddings)

    @abstractmethod
    def run_denoiser(
        self, denoiser: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """`denoiser` (the policy or the reference) on checked inputs, with the family's training-time conditioning."""

    @abstractmethod
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latents of one video of that size in the family's layout; ValueError naming a size it cannot make."""

    @abstractmethod
    def denoise(
        self,
        noise: torch.Tensor,
        text_embeddings: torch.Tensor,
        generators: Sequence[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The family's sampler with the policy, from `noise` to clean latents; a stochastic one draws sample i's
        noise from generators[i]."""

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Videos uint8 (B, T, H, W, 3), one per prompt; video i depends only on (prompts[i], seeds[i]). Sizes,
        steps and guidance default to the family's (`video_size`, `default_*`)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        size = [value or default for value, default in zip((num_frames, height, width), self.video_size)]
        noise, generators = self.seeded_noise(seeds, self.latent_shape(*size))
        steps = num_inference_steps or self.default_num_inference_steps
        guidance = self.default_guidance_scale if guidance_scale is None else guidance_scale
        text = self.encode_prompts(prompts).to(self.device)
        latents = self.denoise(noise, text, generators, num_inference_steps=steps, guidance_scale=guidance)
        return self.decode_latents(latents)

    # --- training -----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (everything else is frozen)."""
        parameters = dict(self.denoiser.named_parameters())
        return [parameters[name] for name in self._trainable_names]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable weights, by denoiser parameter name (LoRA factors alone, or the full/temporal
        denoiser weights): changing them leaves the model as it is."""
        return {name: p.detach().clone() for name, p in zip(self._trainable_names, self.trainable_parameters())}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load what trainable_state_dict() exported; a missing, unexpected or mis-shaped key is a CheckpointError."""
        parameters = dict(zip(self._trainable_names, self.trainable_parameters()))
        check_state_dict(
            parameters, state_dict, "trainable state dict", target=f"the trainable parameters of {type(self).__name__}"
        )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state_dict[name])
