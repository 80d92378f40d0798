"""Tensors as bytes in the pair shards: latents and text embeddings (raw little-endian values, their shape and dtype
name) and the run's empty-prompt embedding file beside the shards (foundation: data formats only)."""

from __future__ import annotations

import math
from typing import Sequence

import safetensors
import safetensors.torch
import torch

from videodpo_ray import storage
from videodpo_ray.errors import ShardError

LATENT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"


def latents_to_bytes(latents: torch.Tensor) -> tuple[bytes, list[int], str]:
    """Raw little-endian bytes of a float32 / float16 / bfloat16 tensor, its shape and dtype name."""
    names = {dtype: name for name, dtype in LATENT_DTYPES.items()}
    if latents.dtype not in names:
        raise ValueError(f"latents_to_bytes: dtype {latents.dtype} not supported, use one of {sorted(LATENT_DTYPES)}")
    flat = latents.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes(), list(latents.shape), names[latents.dtype]


def latents_from_bytes(data: bytes, shape: Sequence[int], dtype: str) -> torch.Tensor:
    """Inverse of `latents_to_bytes`: a new CPU tensor of `shape` and `dtype` ("float32", "float16", "bfloat16")."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latents_from_bytes: unknown latent dtype {dtype!r}, expected one of {sorted(LATENT_DTYPES)}")
    if any(size < 0 for size in shape):
        raise ValueError(f"latents_from_bytes: negative size in shape {list(shape)}")
    torch_dtype = LATENT_DTYPES[dtype]
    expected = math.prod(shape) * torch_dtype.itemsize
    if len(data) != expected:
        shape_text = f"{dtype} tensor of shape {list(shape)} ({expected} bytes)"
        raise ValueError(f"latents_from_bytes: {len(data)} bytes do not hold a {shape_text}")
    if expected == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(tuple(shape))


def empty_prompt_url(root: str) -> str:
    """`{root}/pairs/empty_prompt.safetensors`: the empty-prompt (CFG dropout) text embedding of the pair shards'
    model, written (atomically) once per pair output, before its first shard with text embeddings is committed."""
    return storage.join(root, "pairs", EMPTY_PROMPT_FILE)


def empty_prompt_bytes(embedding: torch.Tensor) -> bytes:
    """The empty-prompt embedding (L, D) as the content of `empty_prompt_url` (safetensors, key "text_embedding")."""
    return safetensors.torch.save({"text_embedding": embedding.detach().to("cpu").contiguous()})


def read_empty_prompt_embedding(root: str) -> torch.Tensor:
    """The stored empty-prompt embedding (L, D); ShardError naming the file when it is missing or unreadable."""
    url = empty_prompt_url(root)
    try:
        return safetensors.torch.load(storage.read_bytes(url))["text_embedding"]
    except FileNotFoundError:
        raise ShardError(f"{url}: missing; the pair shards store text embeddings but not the empty prompt's") from None
    except (safetensors.SafetensorError, KeyError) as error:
        raise ShardError(f"{url}: unreadable empty-prompt embedding ({error!r})") from error
