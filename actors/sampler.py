"""Sampler actor: a text-to-video model built once per actor, turning sample requests into mp4 videos.

Used as `ds.map_batches(SamplerActor, batch_format="pyarrow", fn_constructor_kwargs={"model": ..., "sampling": ...,
"init_seed": ...}, compute=ray.data.ActorPoolStrategy(...), batch_size=b)` over rows with `prompt` and `seed`
(`stages.generate.sample_requests`, `stages.sample.request_table`); every input column is passed through and
`video` (mp4 bytes), `fps` and `model` are added (and `gif` when asked). Video i depends only on the row's
(prompt, seed) and its batch, so actor placement never changes a sample. The model is built under `init_seed`
(like training's `run.seed`), so random-init weights are the same in every actor and in the trainer; with
`tuned_export` it is the exported training run's model with its trained weights.
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
        self.model = built.to(self.device).eval()
        self.label = model_label(model) + (f"+{tuned_export}" if tuned_export else "")
        self.sampling = sampling
        self.gif = gif

    def __call__(self, batch: pa.Table) -> pa.Table:
        settings = self.sampling.model_dump(exclude={"fps"})
        with torch.no_grad():
            videos = self.model.sample(batch.column("prompt").to_pylist(), batch.column("seed").to_pylist(), **settings)
        videos, fps = videos.cpu(), self.sampling.fps
        batch = batch.append_column("video", pa.array([encode_mp4(video, fps=fps) for video in videos], pa.binary()))
        if self.gif:
            batch = batch.append_column("gif", pa.array([encode_gif(video, fps) for video in videos], pa.binary()))
        batch = batch.append_column("fps", pa.array([fps] * len(videos), pa.int32()))
        return batch.append_column("model", pa.array([self.label] * len(videos), pa.string()))
