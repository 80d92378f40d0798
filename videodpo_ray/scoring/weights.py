"""Loading scorer weights: from a local path or any fsspec URL (s3://, gs://, https://, hf://org/repo/file for the
Hugging Face hub), as safetensors or a torch pickle read with weights_only=True, checked strictly against the model.

Remote files reach the machine through `storage.local_file` (downloaded once to the weights cache), and the strict
check is the models' one (`models.base.load_state_dict_strict`), raising `WeightsError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from safetensors.torch import load_file as load_safetensors_file

from videodpo_ray import storage
from videodpo_ray.errors import WeightsError
from videodpo_ray.models.loading import load_state_dict_strict

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Files looked for, in order, when a weights location is a directory (a Hugging Face model folder)."""


@dataclass(frozen=True)
class ModelInfo:
    """One model a scorer can load: what it is, where its weights come from and under which licence."""

    name: str
    licence: str
    source: str


def _weights_file(location: str) -> str:
    """`location` itself, or the Hugging Face weights file inside it when it is a directory."""
    fs, path = storage.filesystem_for(location)
    if not fs.isdir(path):
        return location
    for name in HF_WEIGHT_FILES:
        candidate = location.rstrip("/") + "/" + name
        if fs.exists(path.rstrip("/") + "/" + name):
            return candidate
    raise WeightsError(f"{location}: directory has none of {', '.join(HF_WEIGHT_FILES)}")


def load_state_dict(location: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict (tensors on CPU) from a local path or fsspec URL; a directory means its HF weights file.

    `key`: the entry of a training checkpoint that holds the state dict (e.g. AMT "state_dict", ViCLIP "model")."""
    if not location:
        raise WeightsError("no weights location given (set models.<dimension>.weights)")
    path = _weights_file(location)
    try:
        local = storage.local_file(path)
    except (OSError, ValueError) as error:  # CheckpointError (not found) is a ValueError
        raise WeightsError(f"{path}: cannot read weights ({error})") from None
    try:
        if path.endswith(".safetensors"):
            state_dict = load_safetensors_file(str(local))
        else:
            state_dict = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any parse failure is reported the same way
        problem = f"{type(error).__name__}: {error}"
        raise WeightsError(f"{path}: not a safetensors / torch weights file ({problem})") from None
    if key is not None:
        if not isinstance(state_dict, dict) or key not in state_dict:
            found = ", ".join(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise WeightsError(f"{path}: checkpoint has no {key!r} entry (found: {found})")
        state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path}: expected a flat mapping of tensor names to tensors")
    return state_dict


def load_filtered(
    model: ModuleT,
    state_dict: dict[str, torch.Tensor],
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
    ignore_suffixes: tuple[str, ...] = (),
) -> ModuleT:
    """Load `state_dict` into `model`, failing with every missing, unexpected and mis-shaped key listed.

    Keys starting with `ignore_prefixes` (e.g. a text tower in a full CLIP checkpoint loaded into an image tower) or
    ending with `ignore_suffixes` (buffers older checkpoints saved, e.g. "position_ids") are dropped first.
    """
    kept = {
        key: value
        for key, value in state_dict.items()
        if not key.startswith(ignore_prefixes) and not key.endswith(ignore_suffixes)
    }
    return load_state_dict_strict(model, kept, source, error=WeightsError)


def seeded(build: Callable[[], ModuleT], seed: int = 0) -> ModuleT:
    """Build a random-init model deterministically without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's first parameter (where its inputs must go)."""
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype
