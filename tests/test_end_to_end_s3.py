"""Generate -> pair -> train on S3 (the moto server) with the tiny model on the session's Ray cluster: 12 prompts x
N = 4, exactly one best-worst pair per prompt, weights as configured, the model's latent and text-embedding shapes,
and a trainer that builds no text encoder; resubmitted for another export dtype, the finished run only exports again."""

from __future__ import annotations

import json

import pytest
import torch

from videodpo_ray import shards, storage, tensor_bytes
from videodpo_ray.config import load_config
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.generate import GenerateConfig
from videodpo_ray.stages.pair import PairConfig
from videodpo_ray.stages.prompts import prompt_rows
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig

pytestmark = pytest.mark.slow
TINY_VC2 = ModelConfig(family="vc2", variant="tiny")
PROMPTS = prompt_rows([f"a {colour} {thing}" for colour in ("red", "green", "blue", "grey")
                       for thing in ("fox in the snow", "car at night", "kite over a beach")])


def test_twelve_prompts_to_pair_shards_on_s3_then_training_without_a_text_encoder(ray_cluster, s3_bucket: str):
    from jobs.generate import generate
    from jobs.pair import make_pairs
    from jobs.train import run_training

    data = f"{s3_bucket}/run"
    generated = generate(GenerateConfig(
        prompts="unused", out=data, model=TINY_VC2, samples_per_prompt=4, prompts_per_chunk=6,
        sampling={"num_frames": 4, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8},
        scorer={"tiny": True}, sampler_pool={"batch_size": 4}, scorer_pool={"batch_size": 8, "num_gpus": 0},
    ), prompts=PROMPTS)
    assert (generated.sampled, generated.failures) == ([0, 1], [])
    paired = make_pairs(PairConfig(data=data, model=TINY_VC2, text_embedding_dtype="bfloat16",
                                   pairing={"weighting": {"scheme": "product", "alpha": 1.0}}))
    assert paired.written == [0, 1]

    scores = {}
    for info in shards.list_shards(data, "scores"):
        for row in shards.read_shard(info).to_pylist():
            scores.setdefault(row["prompt_id"], {})[row["sample_id"]] = row["omniscore"]
    rows = [row for info in shards.list_shards(data, "pairs") for row in shards.read_shard(info).to_pylist()]
    assert sorted(row["prompt_id"] for row in rows) == sorted(p.prompt_id for p in PROMPTS)  # one pair per prompt
    model = build_model(TINY_VC2, seed=0).eval()
    with torch.no_grad():
        latent_shape = list(model.encode_videos(torch.zeros(1, 4, 32, 32, 3, dtype=torch.uint8)).shape[1:])
        text_shape = list(model.encode_prompts(["a prompt"]).shape[1:])
    for row in rows:
        samples = scores[row["prompt_id"]]
        assert len(samples) == 4 and len(set(samples.values())) == 4  # no ties among the 4 samples
        assert row["win_sample_id"] == max(samples, key=samples.get)  # best-worst
        assert row["lose_sample_id"] == min(samples, key=samples.get)
        assert (row["win_score"], row["lose_score"]) == (max(samples.values()), min(samples.values()))
        expected_weight = 0.72 / (row["win_score"] * row["lose_score"])  # the released code's product weights
        assert row["weight"] == pytest.approx(expected_weight, rel=1e-6)
        assert row["latent_shape"] == latent_shape and row["latent_dtype"] == "float32"
        assert row["text_embedding_shape"] == text_shape and row["text_embedding_dtype"] == "bfloat16"
        stored = tensor_bytes.latents_from_bytes(row["win_latents"], row["latent_shape"], row["latent_dtype"])
        assert list(stored.shape) == latent_shape and torch.isfinite(stored).all()

    config = load_config(TrainConfig, None, [
        f"model={TINY_VC2.model_dump_json()}", f"data.pairs_url={data}", "data.max_steps=1",
        "scaling.num_workers=1", "run.name=e2e", f"run.storage_path={s3_bucket}/train",
    ])
    result = run_training(config)
    assert result.error is None and result.metrics["done"] is True
    bare = build_model(TINY_VC2.model_copy(update={"build_text_encoder": False}), seed=0)
    assert result.metrics["built_parameters"] == sum(parameter.numel() for parameter in bare.parameters())
    assert result.metrics["built_parameters"] < sum(parameter.numel() for parameter in model.parameters())

    # resubmitted unchanged: recognised as finished before any worker; asking for another export dtype: the workers
    # restore the final step and only write the export again (no step, no new checkpoint)
    export_info = storage.join(ckpt.run_dir(config), ckpt.EXPORT_DIR, ckpt.EXPORT_INFO)
    assert json.loads(storage.read_bytes(export_info))["dtype"] == "float32"
    checkpoints = sorted(entry.url for entry in storage.list_entries(ckpt.run_dir(config)))
    assert ckpt.export_outdated(config) is None
    in_bf16 = config.model_copy(update={"export": config.export.model_copy(update={"dtype": "bfloat16"})})
    assert "holds step 1 in float32, the config asks for step 1 in bfloat16" in ckpt.export_outdated(in_bf16)
    again = run_training(in_bf16)
    assert again.error is None and again.checkpoint.path == result.checkpoint.path  # no step, no new checkpoint
    info = json.loads(storage.read_bytes(export_info))
    assert (info["step"], info["dtype"]) == (1, "bfloat16") and ckpt.export_outdated(in_bf16) is None
    assert sorted(entry.url for entry in storage.list_entries(ckpt.run_dir(config))) == checkpoints
    model_config, weights, _ = ckpt.load_export(storage.join(ckpt.run_dir(config), ckpt.EXPORT_DIR))
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values() if tensor.is_floating_point())
