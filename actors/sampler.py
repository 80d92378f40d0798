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
"""

from __future__ import annotations

import pyarrow as pa
import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.common import SamplingConfig
from videodpo_ray.stages.generate import model_label
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, seeds = batch.column("prompt").to_pylist(), batch.column("seed").to_pylist()
        with torch.no_grad():
            videos = self.model.sample(prompts, seeds, **self.sampling.sample_kwargs())
        videos, fps = videos.cpu(), self.sampling.fps
        batch = batch.append_column("video", pa.array([encode_mp4(video, fps=fps) for video in videos], pa.binary()))
        if self.gif:
            batch = batch.append_column("gif", pa.array([encode_gif(video, fps) for video in videos], pa.binary()))
        batch = batch.append_column("fps", pa.array([fps] * len(videos), pa.int32()))
        return batch.append_column("model", pa.array([self.label] * len(videos), pa.string()))
