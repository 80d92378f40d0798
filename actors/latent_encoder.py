"""Latent-encoder actor: VAE-encodes the winner and loser videos of pair rows, so training never runs the VAE.

Used as `ds.map_batches(LatentEncoderActor, batch_format="pyarrow", batch_size=None, fn_constructor_kwargs={"model":
..., "dtype": ..., "text_dtype": ..., "init_seed": ..., "batch_size": b}, compute=...)` over pair rows with `prompt`
and `win_video` / `lose_video` mp4 bytes, one block per chunk: a call gets a whole chunk and cuts it into VAE batches
of `batch_size` pairs itself (`stages.common.batch_slices`), so a latent's float rounding, which depends on the
videos it is encoded with, is the same in every run. Every input column is passed through and the pair-shard latent
columns are added:
`win_latents`, `lose_latents` (`latents_to_bytes`), `latent_shape` (one video, no batch dim), `latent_dtype`
and `latent_model` (the model's `latent_space`, which training checks), and the prompt's text embedding
(`text_embedding`, `text_embedding_shape` (L, D), `text_embedding_dtype`), so training needs no text encoder. Column
`EMPTY_PROMPT_COLUMN` holds the empty prompt's embedding in the first row of each chunk of a call (null in the
others; a table without a `chunk` column is one chunk), so every chunk carries it for the driver to store once
(`empty_prompt_of`). Latents are the posterior mean, so encoding is deterministic; the model is built under
`init_seed` (training's `run.seed`) so random-init weights match the trainer's. Prompts are encoded one per call, as
the trainer does, so a stored embedding equals the trainer's own encoding.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.common import batch_slices
from videodpo_ray.tensor_bytes import LATENT_DTYPES, empty_prompt_bytes, latents_to_bytes
from videodpo_ray.video import decode_mp4

EMPTY_PROMPT_COLUMN = "empty_text_embedding"


def first_row_of_each_chunk(batch: pa.Table) -> list[bool]:
    """Which rows of a batch carry the empty-prompt embedding: the first of each `chunk` value (the first row only
    if the batch has no `chunk` column)."""
    chunks = batch.column("chunk").to_pylist() if "chunk" in batch.column_names else [None] * batch.num_rows
    seen: set[int | None] = set()
    firsts = []
    for chunk in chunks:
        firsts.append(chunk not in seen)
        seen.add(chunk)
    return firsts


def empty_prompt_of(chunk: int, rows: pa.Table) -> bytes:
    """The empty-prompt embedding that a chunk's encoded rows carry (RuntimeError if none does)."""
    for data in rows.column(EMPTY_PROMPT_COLUMN).to_pylist():
        if data is not None:
            return data
    raise RuntimeError(
        f"chunk {chunk}: none of its {rows.num_rows} encoded pair rows carries {EMPTY_PROMPT_COLUMN!r} (the latent "
        "encoder sets it on the first row of each chunk of a call)"
    )


class LatentEncoderActor:
    """Holds one model's VAE (on the GPU when the actor has one) and encodes a batch of pairs per call."""

    def __init__(self, model: ModelConfig, dtype: str = "float32", text_dtype: str | None = None,
                 init_seed: int = 0, batch_size: int | None = None) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(model, seed=init_seed).to(self.device).eval()
        self.dtype = LATENT_DTYPES[dtype]
        self.text_dtype = LATENT_DTYPES[text_dtype or dtype]
        self.empty_prompt: bytes | None = None  # tensor_bytes.empty_prompt_bytes of "", made on first use
        self.batch_size = batch_size  # pairs per VAE call; None: a call's rows together

    def embed(self, prompt: str) -> torch.Tensor:
        """One prompt's text embedding (L, D) on the CPU, in the text dtype."""
        with torch.no_grad():
            return self.model.encode_prompts([prompt])[0].to("cpu", self.text_dtype)

    def encode(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Latents of each uint8 (T, H, W, 3) video; videos of the same shape are encoded in one VAE call."""
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, video in enumerate(videos):
            by_shape[tuple(video.shape)].append(index)
        latents: list[torch.Tensor | None] = [None] * len(videos)
        for indices in by_shape.values():
            with torch.no_grad():
                encoded = self.model.encode_videos(torch.stack([videos[i] for i in indices]).to(self.device))
            for index, item in zip(indices, encoded.to("cpu", self.dtype)):
                latents[index] = item
        return latents

    def __call__(self, table: pa.Table) -> pa.Table:
        """Every pair of `table` encoded, in batches of `batch_size` pairs, with the empty prompt's embedding on the
        first row of each chunk."""
        encoded = pa.concat_tables([self.encode_batch(table.slice(offset, length))
                                    for offset, length in batch_slices(table.num_rows, self.batch_size)])
        if self.empty_prompt is None:
            self.empty_prompt = empty_prompt_bytes(self.embed(""))
        firsts = first_row_of_each_chunk(encoded)
        return encoded.append_column(EMPTY_PROMPT_COLUMN,
                                     pa.array([self.empty_prompt if first else None for first in firsts], pa.binary()))

    def encode_batch(self, batch: pa.Table) -> pa.Table:
        """One VAE batch: the input columns plus the latent and text-embedding columns."""
        ids = batch.column("pair_id").to_pylist()
        videos = []
        for side, name in (("win", "winner"), ("lose", "loser")):
            for pair_id, data in zip(ids, batch.column(f"{side}_video").to_pylist()):
                videos.append(decode_mp4(data, f"pair {pair_id} {name}")[0])
        encoded = [latents_to_bytes(item) for item in self.encode(videos)]
        win, lose = encoded[: len(ids)], encoded[len(ids) :]
        for pair_id, (_, win_shape, _), (_, lose_shape, _) in zip(ids, win, lose):
            if win_shape != lose_shape:
                raise ValueError(f"pair {pair_id}: winner latents {win_shape} and loser latents {lose_shape} differ")
        columns = {
            "win_latents": pa.array([data for data, _, _ in win], pa.binary()),
            "lose_latents": pa.array([data for data, _, _ in lose], pa.binary()),
            "latent_shape": pa.array([shape for _, shape, _ in win], pa.list_(pa.int64())),
            "latent_dtype": pa.array([dtype for _, _, dtype in win], pa.string()),
            "latent_model": pa.array([self.model.latent_space] * len(ids), pa.string()),
        }
        prompts = batch.column("prompt").to_pylist()
        embedded = {prompt: latents_to_bytes(self.embed(prompt)) for prompt in dict.fromkeys(prompts)}
        columns["text_embedding"] = pa.array([embedded[p][0] for p in prompts], pa.binary())
        columns["text_embedding_shape"] = pa.array([embedded[p][1] for p in prompts], pa.list_(pa.int64()))
        columns["text_embedding_dtype"] = pa.array([embedded[p][2] for p in prompts], pa.string())
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch
