"""Sampler actor: a text-to-video model built once per actor, turning sample requests into mp4 videos.

Used as `ds.map_batches(SamplerActor, batch_format="pyarrow", fn_constructor_kwargs={"model": ..., "sampling": ...,
"init_seed": ...}, compute=ray.data.ActorPoolStrategy(...), batch_size=b)` over rows with `prompt` and `seed`
(`stages.generate.sample_requests`, `stages.sample.request_table`); every input column is passed through and
`video` (mp4 bytes), `fps` and `model` are added (and `gif` when asked). Video i depends only on the row's
(prompt, seed) and its batch, so actor placement never changes a sample. The model is built under `init_seed`
(like training's `run.seed`), so random-init weights are the same in every actor and in the trainer; with
`tuned_export` it is the exported training run's model with its trained weights. It is then frozen for sampling
(no DPO reference copy; every weight in bf16 when `model.mixed_precision` is "bf16"), optionally in channels-last
layout and compiled (`SamplingConfig`). A call samples its whole batch at once: with CFG every denoiser call
carries 2 x batch rows (batch 4 -> 8, the throughput plateau of VC2 on an H200; T2V-Turbo has no CFG pass: use 8).

A batch that keeps failing is split to find the prompts that fail alone (`stages.generate.sample_isolating_failures`):
their rows come back with a null `video` and the error in `failed_reason`; out of memory is raised, never recorded.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.common import SamplingConfig
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
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        built = load_exported_model(tuned_export) if tuned_export else build_model(model, seed=init_seed)
        built.freeze_for_sampling()
        if sampling.channels_last:
            built.use_channels_last()
        self.model = built.to(self.device)
        if sampling.compile:
            self.model.compile_denoiser()
        self.label = model_label(model) + (f"+{tuned_export}" if tuned_export else "")
        self.sampling = sampling
        self.gif = gif
        self.max_attempts = max_attempts

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3) on the CPU for one batch of requests."""
        with torch.no_grad():
            return self.model.sample(prompts, seeds, **self.sampling.sample_kwargs()).cpu()

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, seeds = batch.column("prompt").to_pylist(), batch.column("seed").to_pylist()
        rows = list(range(batch.num_rows))
        videos, failures = sample_isolating_failures(
            lambda subset: list(self.sample([prompts[i] for i in subset], [seeds[i] for i in subset])),
            rows,
            self.max_attempts,
            infrastructure_errors=(torch.OutOfMemoryError, MemoryError),
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
