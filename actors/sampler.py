"""Sampler actor: a text-to-video model built once per actor, turning sample requests into mp4 videos.

Used as `ds.map_batches(SamplerActor, batch_format="pyarrow", fn_constructor_kwargs={"model": ..., "sampling": ...,
"init_seed": ...}, compute=ray.data.ActorPoolStrategy(...), batch_size=b)` over the rows of
`stages.generate.sample_requests`; every input column is passed through and `video` (mp4 bytes), `fps` and `model`
are added. Video i depends only on the row's (prompt, seed), so batching and actor placement never change a sample.
The model is built under `init_seed` (like training's `run.seed`), so random-init weights are the same in every
actor and in the trainer.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.generate import SamplingConfig, model_label
from videodpo_ray.video import encode_mp4


class SamplerActor:
    """Holds one model (on the GPU when the actor has one) and samples a batch of requests per call."""

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, init_seed: int = 0) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(model, seed=init_seed).to(self.device).eval()
        self.label = model_label(model)
        self.sampling = sampling

    def __call__(self, batch: pa.Table) -> pa.Table:
        settings = self.sampling.model_dump(exclude={"fps"})
        with torch.no_grad():
            videos = self.model.sample(batch.column("prompt").to_pylist(), batch.column("seed").to_pylist(), **settings)
        encoded = [encode_mp4(video, fps=self.sampling.fps) for video in videos.cpu()]
        batch = batch.append_column("video", pa.array(encoded, pa.binary()))
        batch = batch.append_column("fps", pa.array([self.sampling.fps] * len(encoded), pa.int32()))
        return batch.append_column("model", pa.array([self.label] * len(encoded), pa.string()))
