"""Strict weight loading, shared by every model family and by the scorers (`scoring/weights.py`).

- `describe_key_mismatch`: the one formatter of missing / unexpected / mis-shaped key lists;
- `check_state_dict` / `load_state_dict_strict`: a state dict must match the module exactly;
- `raise_on_loading_info`: the same check for diffusers / transformers `from_pretrained(..., output_loading_info=True)`;
- `load_pretrained_component`: one diffusers component from a model directory, strictly, in float32;
- `check_preset_config`: a loaded component's config must match the variant it is loaded as.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from videodpo_ray.errors import CheckpointError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def describe_key_mismatch(
    source: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mis_shaped: Iterable[str] = (),
    *,
    target: str = "the model",
    limit: int = 20,
) -> str:
    """ "{source}: weights do not match {target}" and the sorted missing / unexpected / mis-shaped keys (up to
    `limit` of each, with a count)."""
    message = f"{source}: weights do not match {target}"
    for title, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint != model)", mis_shaped),
    ):
        keys = sorted(keys)
        if keys:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            message += f"\n  {title} ({len(keys)}): {', '.join(keys[:limit])}{more}"
    return message


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    target: str = "the model",
    allow_missing: Iterable[str] = (),
    error: type[CheckpointError] = CheckpointError,
) -> None:
    """Raise `error` naming every key of `expected` absent from `state_dict` (except `allow_missing`), every key
    `expected` lacks, and every shape that differs."""
    allowed = set(allow_missing)
    missing = [key for key in expected if key not in state_dict and key not in allowed]
    unexpected = [key for key in state_dict if key not in expected]
    mis_shaped = [
        f"{key} {tuple(value.shape)} != {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if missing or unexpected or mis_shaped:
        raise error(describe_key_mismatch(source, missing, unexpected, mis_shaped, target=target))


def load_state_dict_strict(
    module: ModuleT,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    zero_missing: Sequence[str] = (),
    error: type[CheckpointError] = CheckpointError,
) -> ModuleT:
    """`module.load_state_dict` that first names every missing, unexpected or mis-shaped key in one `error`;
    `zero_missing` keys may be absent and are then loaded as zeros."""
    expected = module.state_dict()
    check_state_dict(
        expected, state_dict, source, target=type(module).__name__, allow_missing=zero_missing, error=error
    )
    full = dict(state_dict)
    for key in zero_missing:
        full.setdefault(key, torch.zeros_like(expected[key]))
    module.load_state_dict(full, strict=True)
    return module


def raise_on_loading_info(source: str | Path, info: Mapping[str, Any], target: str = "the model") -> None:
    """Raise CheckpointError if a `from_pretrained(..., output_loading_info=True)` info dict reports any missing,
    unexpected or mis-shaped key (or an error message)."""
    mis_shaped = [
        f"{item[0]} {tuple(item[1])} != {tuple(item[2])}" if isinstance(item, tuple) and len(item) == 3 else str(item)
        for item in info.get("mismatched_keys") or ()
    ]
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    errors = [f"\n  {message}" for message in info.get("error_msgs") or ()]
    if missing or unexpected or mis_shaped or errors:
        message = describe_key_mismatch(str(source), missing, unexpected, mis_shaped, target=target)
        raise CheckpointError(message + "".join(errors))


def load_pretrained_component(model_class: Any, directory: Path, subfolder: str) -> Any:
    """A diffusers model from `directory`/`subfolder`, strictly, in float32 (released weights are often bf16)."""
    source = directory / subfolder
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source}: no config.json (expected a diffusers-format model directory)")
    try:
        model, info = model_class.from_pretrained(str(source), output_loading_info=True, dtype=torch.float32)
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{source}: cannot load {model_class.__name__}: {error}") from error
    raise_on_loading_info(source, info, target=model_class.__name__)
    return model


def check_preset_config(source: Path, loaded: Any, expected: dict[str, Any], keys: Sequence[str], variant: str) -> None:
    """Raise if the loaded component config disagrees with the variant's preset on any of `keys`."""
    differences = []
    for key in keys:
        have, want = loaded.get(key), expected.get(key)
        if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
            have, want = list(have), list(want)
        if have != want:
            differences.append(f"{key} = {have!r}, variant {variant!r} expects {want!r}")
    if differences:
        raise CheckpointError(
            f"{source}: checkpoint does not match ModelConfig.variant={variant!r}: " + "; ".join(differences)
        )
