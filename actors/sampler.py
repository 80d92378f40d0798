"""Sampler actor: a text-to-video model built once per actor, turning sample requests into mp4 videos.

Used as `ds.map_batches(SamplerActor, batch_format="pyarrow", batch_size=None, fn_constructor_kwargs={"model": ...,
"sampling": ..., "init_seed": ..., "batch_size": b}, compute=ray.data.ActorPoolStrategy(...))` over rows with
`prompt` and `seed` (`stages.generate.sample_requests`, `stages.sample.request_table`); every input column is passed
through and `video` (mp4 bytes), `fps`, `model`, `failed_reason` and `attempts` are added (and `gif` when asked).
Video i depends only on the row's (prompt, seed) and its batch, so actor placement never changes a sample: a call
gets a whole chunk and cuts it into batches of `batch_size` itself (`stages.common.batch_slices`), the same batches
in every run. The model is built under `init_seed` (like training's `run.seed`), so random-init weights are the same
in every actor and in the trainer; with `tuned_export` it is the exported training run's model with its trained
weights. It is then frozen for sampling (no DPO reference copy; every weight in bf16 when `model.mixed_precision` is
"bf16"), optionally in channels-last layout and compiled (`SamplingConfig`). A batch is sampled at once: with CFG
every denoiser call carries 2 x batch rows (batch 4 -> 8, the throughput plateau of VC2 on an H200; T2V-Turbo has
no CFG pass: use 8).

A batch that keeps failing is split to find the prompts that fail alone (`stages.generate.sample_isolating_failures`):
their rows come back with a null `video` and the error in `failed_reason`. Out of memory and CUDA, cuBLAS, cuDNN or
NCCL faults (`errors.is_infrastructure_error`, the scorer's rule too) are raised, never recorded: the chunk fails
loudly and stays uncommitted.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.common import SamplingConfig, batch_slices
from videodpo_ray.stages.generate import model_label, sample_isolating_failures
from videodpo_ray.training.checkpoint import load_exported_model
from videodpo_ray.video import encode_gif, encode_mp4


class SamplerActor:
    """Holds one model (on the GPU when the actor has one) and samples a batch of requests per call."""

    def __init__(
        self,
        model: ModelConfig,
        sampling: SamplingConfig,
        init_seed: int = 0,
        tuned_export: str | None = None,
        gif: bool = False,
        max_attempts: int = 2,
        batch_size: int | None = None,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        built = load_exported_model(tuned_export) if tuned_export else build_model(model, seed=init_seed)
        built.freeze_for_sampling()
        if sampling.channels_last:
            built.use_channels_last()
        self.model = built.to(self.device)
        if sampling.compile:
            self.model.compile_for_sampling()
        self.label = model_label(model) + (f"+{tuned_export}" if tuned_export else "")
        self.sampling = sampling
        self.gif = gif
        self.max_attempts = max_attempts
        self.batch_size = batch_size

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3) on the CPU for one batch of requests."""
        with torch.no_grad():
            return self.model.sample(prompts, seeds, **self.sampling.sample_kwargs()).cpu()

    def __call__(self, table: pa.Table) -> pa.Table:
        """Every row of `table` sampled, in batches of `batch_size` rows (None: one batch)."""
        parts = [self.sample_batch(table.slice(offset, length)) for offset, length in
                 batch_slices(table.num_rows, self.batch_size)]
        return pa.concat_tables(parts)

    def sample_batch(self, batch: pa.Table) -> pa.Table:
        """One sampler batch: the request columns plus video, (gif,) fps, model, failed_reason and attempts."""
        prompts, seeds = batch.column("prompt").to_pylist(), batch.column("seed").to_pylist()
        rows = list(range(batch.num_rows))
        videos, failures = sample_isolating_failures(
            lambda subset: list(self.sample([prompts[i] for i in subset], [seeds[i] for i in subset])),
            rows,
            self.max_attempts,
        )
        fps = self.sampling.fps
        mp4 = [encode_mp4(videos[i], fps=fps) if i in videos else None for i in rows]
        batch = batch.append_column("video", pa.array(mp4, pa.binary()))
        if self.gif:
            gifs = [encode_gif(videos[i], fps) if i in videos else None for i in rows]
            batch = batch.append_column("gif", pa.array(gifs, pa.binary()))
        batch = batch.append_column("fps", pa.array([fps] * len(rows), pa.int32()))
        batch = batch.append_column("model", pa.array([self.label] * len(rows), pa.string()))
        reasons = [failures[i].error if i in failures else None for i in rows]
        batch = batch.append_column("failed_reason", pa.array(reasons, pa.string()))
        attempts = [failures[i].attempts if i in failures else 1 for i in rows]
        return batch.append_column("attempts", pa.array(attempts, pa.int32()))
