"""Read original VideoCrafter2 / T2V-Turbo checkpoints (local or fsspec URL) and convert them to diffusers components.

An original `model.ckpt` holds `model.diffusion_model.*` (lvdm UNet), `first_stage_model.*` (LDM kl-f8 VAE),
optionally `cond_stage_model.model.*` (OpenCLIP text tower) and the schedule buffers. `load_components` accepts
either such a file or a directory written by `save_components`:

    model_index.json              {"family", "scale_factor", "turbo_lora_merged"}
    unet/config.json, unet/lvdm_config.json, unet/diffusion_pytorch_model.safetensors
    vae/config.json, vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json, text_encoder/model.safetensors     (only when the checkpoint has one)
    scheduler/scheduler_config.json

Remote files and directories are read through `storage.local_file` / `storage.local_directory` (downloaded once
to the weights cache). Loading is strict everywhere (`models.base.load_state_dict_strict`): missing, unexpected or
mis-shaped keys raise `CheckpointError` listing them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file as load_safetensors_file
from transformers import CLIPTextConfig, CLIPTextModel

from videodpo_ray import storage
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.loading import describe_key_mismatch, load_state_dict_strict
from videodpo_ray.models.lvdm_layout import (
    UNET_PREFIX,
    LvdmUNetConfig,
    infer_lvdm_unet_config,
    merge_lora_list,
    to_diffusers_state_dict,
    to_reference_state_dict,
)
from videodpo_ray.models.openclip_text import OpenCLIPTextEncoder, convert_openclip_text_state_dict
from videodpo_ray.models.vc2_schedule import SCHEDULE_FILE, VC2NoiseSchedule, VC2ScheduleConfig
from videodpo_ray.models.vc2_unet import VC2UNet3DConditionModel

VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
MODEL_INDEX = "model_index.json"
LVDM_CONFIG = "lvdm_config.json"
DEFAULT_SCALE_FACTOR = 0.18215
TIME_COND_PROJ_KEY = "time_cond_proj.weight"  # T2V-Turbo: in no released file; zero base (see models.md)
TURBO_TIME_COND_PROJ_DIM = 256  # T2V-Turbo's guidance-scale embedding width


@dataclass
class VC2Components:
    """The loaded pieces of a VC2 / T2V-Turbo model."""

    unet: VC2UNet3DConditionModel
    unet_layout: LvdmUNetConfig  # the lvdm config: key space of the original UNet and of T2V-Turbo LoRA lists
    vae: AutoencoderKL
    text_encoder: OpenCLIPTextEncoder | None
    schedule: VC2ScheduleConfig
    scale_factor: float = DEFAULT_SCALE_FACTOR
    turbo_lora_merged: bool = False
    family: str = "vc2"  # whose weights: model_index.json's family ("vc2" for an original checkpoint)


# --- reading -----------------------------------------------------------------------------------------------------
def read_torch_file(url: str) -> Any:
    """torch.load(weights_only=True) of a local path or fsspec URL (remote files through the weights cache)."""
    return torch.load(storage.local_file(url), map_location="cpu", weights_only=True)


def read_checkpoint(url: str) -> dict[str, torch.Tensor]:
    """The flat state dict of an original checkpoint (`{"state_dict": ...}` or a bare state dict)."""
    content = read_torch_file(url)
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{url}: expected a dict of tensors (or {{'state_dict': ...}})")
    return state


def read_lora_list(url: str) -> list[torch.Tensor]:
    """A T2V-Turbo `unet_lora.pt`: a plain list [up0, down0, up1, down1, ...]."""
    content = read_torch_file(url)
    if not isinstance(content, (list, tuple)):
        raise CheckpointError(f"{url}: expected a list of LoRA tensors, got {type(content).__name__}")
    return [tensor.detach() for tensor in content]


def read_unet_kwargs(url: str) -> dict[str, Any]:
    """lvdm UNetModel kwargs from a JSON/YAML file (local or fsspec URL): `{"unet": {...}}` or an lvdm config
    (model.params.unet_config.params)."""
    try:
        data = yaml.safe_load(storage.read_bytes(url))
    except FileNotFoundError:
        raise CheckpointError(f"{url}: file not found") from None
    if isinstance(data, dict) and isinstance(data.get("unet"), dict):
        return data["unet"]
    try:
        return dict(data["model"]["params"]["unet_config"]["params"])
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{url}: no UNet kwargs (expected a 'unet' section or model.params.unet_config.params)"
        ) from None


def _split(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict, dict, dict]:
    unet, vae, text, buffers, unknown = {}, {}, {}, {}, []
    for key, tensor in state.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX) :]] = tensor
        elif key.startswith(VAE_PREFIX):
            vae[key] = tensor
        elif key.startswith(TEXT_PREFIX):
            text[key[len(TEXT_PREFIX) :]] = tensor
        elif "." not in key:
            buffers[key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(describe_key_mismatch(source, [], unknown))
    if not unet or not vae:
        raise CheckpointError(f"{source}: no {UNET_PREFIX}* (UNet) or {VAE_PREFIX}* (VAE) keys; not a VC2 checkpoint")
    return unet, vae, text, buffers


def _f32(value: torch.Tensor) -> float:
    """A float32 buffer entry as the decimal it was written from (0.00085, not 0.0008500000112690032)."""
    return float(f"{value.item():.7g}")


def schedule_from_buffers(buffers: dict[str, torch.Tensor], source: str) -> VC2ScheduleConfig:
    """The schedule config a checkpoint's buffers describe (defaults where absent), checked against every buffer."""
    values: dict[str, Any] = {}
    if "betas" in buffers:
        betas = buffers["betas"].double()
        values |= {"num_train_timesteps": len(betas), "linear_start": _f32(betas[0]), "linear_end": _f32(betas[-1])}
    if "scale_arr" in buffers:
        scale = buffers["scale_arr"].double()
        steps = values.get("num_train_timesteps", 1000)
        values |= {
            "use_scale": True,
            "scale_a": _f32(scale[0]),
            "scale_b": _f32(scale[-1]),
            "mid_step": len(scale) - steps,
        }
    config = VC2ScheduleConfig(**values)
    schedule = VC2NoiseSchedule(config)
    checks = {"alphas_cumprod": schedule.alphas_cumprod, "scale_arr": schedule.scale_arr}
    for name, expected in checks.items():
        if name in buffers and (
            buffers[name].shape != expected.shape or (buffers[name].double() - expected.double()).abs().max() > 1e-5
        ):
            raise CheckpointError(f"{source}: buffer {name} does not match the VC2 schedule {config.model_dump()}")
    return config


def vae_config_from_shapes(vae: dict[str, torch.Tensor], scale_factor: float) -> dict[str, Any]:
    """AutoencoderKL kwargs for an LDM kl-f8-style VAE, read off its tensor shapes."""
    p = VAE_PREFIX
    levels = 1 + max(int(key.split(".")[3]) for key in vae if key.startswith(f"{p}encoder.down."))
    layers = 1 + max(int(key.split(".")[5]) for key in vae if key.startswith(f"{p}encoder.down.0.block."))
    block_out = [vae[f"{p}encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return {
        "in_channels": vae[f"{p}encoder.conv_in.weight"].shape[1],
        "out_channels": vae[f"{p}decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": vae[f"{p}decoder.conv_in.weight"].shape[1],
        "norm_num_groups": 32,  # LDM's Normalize is GroupNorm(32) everywhere
        "scaling_factor": scale_factor,
    }


def convert_vae(vae: dict[str, torch.Tensor], scale_factor: float, source: str) -> AutoencoderKL:
    """LDM `first_stage_model.*` -> diffusers AutoencoderKL (diffusers' own key conversion, then a strict load)."""
    try:
        config = vae_config_from_shapes(vae, scale_factor)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source}: cannot read the VAE layout ({error!r} missing)") from None
    converted = convert_ldm_vae_checkpoint(vae, config)
    if len(converted) != len(vae):
        mapped = len(converted)
        raise CheckpointError(f"{source}: {len(vae) - mapped} of {len(vae)} VAE keys have no diffusers counterpart")
    model = AutoencoderKL(**config)
    load_state_dict_strict(model, converted, f"{source} (VAE)")
    return model


def convert_text_encoder(text: dict[str, torch.Tensor], source: str) -> OpenCLIPTextEncoder:
    """OpenCLIP text-tower keys (no prefix) -> OpenCLIPTextEncoder at the penultimate layer, strictly."""
    config, converted = convert_openclip_text_state_dict(text, source=source)
    model = CLIPTextModel(config)
    load_state_dict_strict(model, converted, f"{source} (text encoder)")
    return OpenCLIPTextEncoder(model.eval())


def _text_encoder_from_directory(directory: Path) -> OpenCLIPTextEncoder:
    model = CLIPTextModel(CLIPTextConfig.from_dict(_read_json(directory / "config.json")))
    load_state_dict_strict(model, _read_safetensors(directory / "model.safetensors"), str(directory))
    return OpenCLIPTextEncoder(model.eval())


def load_text_encoder(url: str) -> OpenCLIPTextEncoder:
    """A converted `text_encoder/` directory, or an OpenCLIP checkpoint (a whole CLIP: its `visual.*` tower is
    dropped; a VC2 model.ckpt: its `cond_stage_model.model.*` keys are used); local or fsspec URL."""
    if storage.exists(storage.join(url, "config.json")):
        return _text_encoder_from_directory(storage.local_directory(url))
    state = read_checkpoint(url)
    if any(key.startswith(TEXT_PREFIX) for key in state):
        state = {key[len(TEXT_PREFIX) :]: value for key, value in state.items() if key.startswith(TEXT_PREFIX)}
    return convert_text_encoder({k: v for k, v in state.items() if not k.startswith("visual.")}, url)


def build_unet(reference: dict[str, torch.Tensor], layout: LvdmUNetConfig, source: str) -> VC2UNet3DConditionModel:
    """A VC2 UNet from a reference (lvdm-key) state dict; T2V-Turbo's absent time_cond_proj gets a zero base."""
    allow = [TIME_COND_PROJ_KEY] if layout.time_cond_proj_dim is not None else []
    converted = to_diffusers_state_dict(reference, layout, source=source, allow_missing=allow)
    unet = VC2UNet3DConditionModel(**layout.diffusers_config())
    zero = ["time_embedding.cond_proj.weight"] if allow and TIME_COND_PROJ_KEY not in reference else []
    load_state_dict_strict(unet, converted, f"{source} (UNet)", zero_missing=zero)
    return unet


def merge_turbo_lora(
    unet: VC2UNet3DConditionModel, layout: LvdmUNetConfig, lora: Sequence[torch.Tensor], source: str
) -> None:
    """Merge a T2V-Turbo LoRA list into `unet` in place: in reference key space, in reference module order."""
    reference = to_reference_state_dict(unet.state_dict(), layout)
    merged = merge_lora_list(reference, lora, layout, source=source)
    load_state_dict_strict(unet, to_diffusers_state_dict(merged, layout, source=source), f"{source} (merged UNet)")


def components_from_checkpoint(
    url: str,
    *,
    unet_kwargs: dict[str, Any] | None = None,
    time_cond_proj_dim: int | None = None,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    text_encoder: bool = True,
) -> VC2Components:
    """Convert an original checkpoint in memory. `unet_kwargs` (lvdm UNetModel kwargs) default to the shapes'
    reading; `text_encoder=False` leaves its text tower out."""
    unet_state, vae_state, text_state, buffers = _split(read_checkpoint(url), url)
    overrides = {"time_cond_proj_dim": time_cond_proj_dim} if time_cond_proj_dim is not None else {}
    if unet_kwargs is not None:
        layout = LvdmUNetConfig(**(dict(unet_kwargs) | overrides))
    else:
        layout = infer_lvdm_unet_config(unet_state, **overrides)
    if "scale_factor" in buffers:
        scale_factor = float(buffers["scale_factor"])
    return VC2Components(
        unet=build_unet(unet_state, layout, url),
        unet_layout=layout,
        vae=convert_vae(vae_state, scale_factor, url),
        text_encoder=convert_text_encoder(text_state, url) if text_state and text_encoder else None,
        schedule=schedule_from_buffers(buffers, url),
        scale_factor=scale_factor,
    )


# --- the converted directory -------------------------------------------------------------------------------------
def save_components(components: VC2Components, directory: str | Path, family: str = "vc2") -> Path:
    """Write a converted directory (safetensors + config.json per component)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "unet" / LVDM_CONFIG).write_text(components.unet_layout.model_dump_json(indent=2) + "\n")
    components.vae.save_pretrained(out / "vae", safe_serialization=True)
    if components.text_encoder is not None:
        components.text_encoder.text_model.save_pretrained(out / "text_encoder", safe_serialization=True)
    components.schedule.save(out / "scheduler")
    index = {
        "family": family,
        "scale_factor": components.scale_factor,
        "turbo_lora_merged": components.turbo_lora_merged,
    }
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return json.loads(path.read_text())


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return load_safetensors_file(str(path))


def is_converted_directory(url: str) -> bool:
    """Whether `url` (local or fsspec) is a directory written by `save_components`."""
    return storage.exists(storage.join(url, MODEL_INDEX))


def components_from_directory(
    url: str, *, time_cond_proj_dim: int | None = None, text_encoder: bool = True
) -> VC2Components:
    """Load a directory written by `save_components` (local path or fsspec URL, through the weights cache), strictly;
    `text_encoder=False` leaves its text_encoder/ unread."""
    directory = storage.local_directory(url)
    index = _read_json(directory / MODEL_INDEX)
    layout = LvdmUNetConfig(**_read_json(directory / "unet" / LVDM_CONFIG))
    unet_config = _read_json(directory / "unet" / "config.json")
    zero = []
    if time_cond_proj_dim is not None and layout.time_cond_proj_dim is None:
        layout = layout.model_copy(update={"time_cond_proj_dim": time_cond_proj_dim})
        unet_config["time_cond_proj_dim"] = time_cond_proj_dim
        zero = ["time_embedding.cond_proj.weight"]
    unet = VC2UNet3DConditionModel.from_config(unet_config)
    unet_weights = _read_safetensors(directory / "unet" / "diffusion_pytorch_model.safetensors")
    load_state_dict_strict(unet, unet_weights, f"{url}/unet", zero_missing=zero)
    vae = AutoencoderKL.from_config(_read_json(directory / "vae" / "config.json"))
    load_state_dict_strict(
        vae, _read_safetensors(directory / "vae" / "diffusion_pytorch_model.safetensors"), f"{url}/vae"
    )
    text_directory = directory / "text_encoder"
    return VC2Components(
        unet=unet,
        unet_layout=layout,
        vae=vae,
        text_encoder=_text_encoder_from_directory(text_directory) if text_encoder and text_directory.is_dir() else None,
        schedule=VC2ScheduleConfig(**_read_json(directory / "scheduler" / SCHEDULE_FILE)),
        scale_factor=float(index["scale_factor"]),
        turbo_lora_merged=bool(index.get("turbo_lora_merged", False)),
        family=str(index.get("family", "vc2")),
    )


def load_components(
    url: str,
    *,
    time_cond_proj_dim: int | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    text_encoder: bool = True,
) -> VC2Components:
    """A converted directory or an original checkpoint file (local or fsspec URL); `text_encoder=False`: without
    its text encoder."""
    if is_converted_directory(url):
        return components_from_directory(url, time_cond_proj_dim=time_cond_proj_dim, text_encoder=text_encoder)
    return components_from_checkpoint(
        url, unet_kwargs=unet_kwargs, time_cond_proj_dim=time_cond_proj_dim, text_encoder=text_encoder
    )


def convert_vc2_checkpoint(
    checkpoint: str, out: str | Path, *, config: str | None = None, lora: str | None = None
) -> Path:
    """The `videodpo-ray convert vc2` job: original checkpoint (+ optional T2V-Turbo LoRA list to merge) -> directory.

    `config`: a JSON/YAML file with the lvdm UNet kwargs (else they are read off the tensor shapes). With `lora`
    the UNet gets T2V-Turbo's time_cond_proj (zero base) and the LoRA merged at scale 1; family "t2v_turbo".
    """
    unet_kwargs = read_unet_kwargs(config) if config else None
    components = components_from_checkpoint(
        checkpoint, unet_kwargs=unet_kwargs, time_cond_proj_dim=TURBO_TIME_COND_PROJ_DIM if lora else None
    )
    if lora:
        merge_turbo_lora(components.unet, components.unet_layout, read_lora_list(lora), lora)
        components.turbo_lora_merged = True
    return save_components(components, out, family="t2v_turbo" if lora else "vc2")
