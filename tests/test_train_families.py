"""Each tiny model family trains 5 DPO steps: 2 CPU workers, ZeRO-2, pair shards and the run on moto S3."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from jobs.train import run_training
from videodpo_ray import shards, storage, tensor_bytes
from videodpo_ray.config import load_config
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig
from videodpo_ray.training.synthetic import TINY_VIDEO_SIZES, synthetic_pair_rows

# (family, finetune, latents): "stored" = every pair carries latents and its prompt's text embedding; "mixed" = shard
# 0 has only the mp4s, which the workers encode with the model's VAE each step, and no pair has a text embedding
FAMILIES = [
    ("vc2", "full", "stored"),
    ("t2v_turbo", "lora", "mixed"),
    ("cogvideox", "lora", "stored"),
    ("wan", "lora", "mixed"),  # flow matching: Flow-DPO through the same dpo_step
]


@pytest.mark.parametrize("family,finetune,latents", FAMILIES, ids=[f"{f}-{t}-{s}" for f, t, s in FAMILIES])
def test_tiny_family_trains_five_steps(family, finetune, latents, s3_bucket, ray_cluster):
    model_config = ModelConfig(family=family, variant="tiny", finetune=finetune, lora={"rank": 4})
    initial = build_model(model_config, seed=0)
    frames, height, width = TINY_VIDEO_SIZES[family]
    data_url = f"{s3_bucket}/data"
    for index in range(2):
        rows = synthetic_pair_rows(initial, num_pairs=4, first_index=4 * index, num_frames=frames, height=height,
                                   width=width, with_videos=latents == "mixed" and index == 0,
                                   with_latents=latents == "stored" or index == 1,
                                   with_text_embeddings=latents == "stored")
        shards.write_shard(shards.make_table("pairs", rows), data_url, "pairs", index)
    if latents == "stored":  # the workers train without a text encoder; "mixed" ones encode the prompts (LRU cache)
        empty = tensor_bytes.empty_prompt_bytes(initial.encode_prompts([""])[0])
        storage.write_bytes_atomic(tensor_bytes.empty_prompt_url(data_url), empty)
    config = load_config(TrainConfig, None, [
        f"model={model_config.model_dump_json()}",
        f"data.pairs_url={data_url}", "data.max_steps=5", "data.epochs=2",
        "optim.lr=1e-3", "scaling.num_workers=2", "deepspeed.zero_stage=2",
        f"run.name=tiny-{family}", f"run.storage_path={s3_bucket}/train", "run.checkpoint_every=5",
    ])
    result = run_training(config)
    assert result.error is None
    assert result.metrics["reference_unchanged"] is True
    # what the workers built: without its text encoder exactly when every pair stores its text embedding (the T5 /
    # umT5 encoders of CogVideoX and Wan load on first use, outside the module tree: the counts are equal for them)
    with_text = sum(parameter.numel() for parameter in initial.parameters())
    bare = build_model(model_config.model_copy(update={"build_text_encoder": False}), seed=0)
    without_text = sum(parameter.numel() for parameter in bare.parameters())
    assert without_text < with_text or family in ("cogvideox", "wan")
    assert result.metrics["built_parameters"] == (without_text if latents == "stored" else with_text)

    # 4 steps of 2 pairs make epoch 0 (all 8 pairs once), step 4 starts epoch 1
    with result.checkpoint.as_directory() as directory:
        log = ckpt.read_pair_log(Path(directory, ckpt.PAIR_LOG).read_text())
    assert [(entry["step"], entry["epoch"], len(entry["pair_ids"])) for entry in log] == [
        (0, 0, 2), (1, 0, 2), (2, 0, 2), (3, 0, 2), (4, 1, 2)]
    assert len({pair_id for entry in log[:4] for pair_id in entry["pair_ids"]}) == 8

    # step 0: policy == reference, so loss = ln 2 x mean weight of that step's pairs (weights from the shards)
    weights = {}
    for info in shards.list_shards(data_url, "pairs"):
        rows = shards.read_shard(info).select(["pair_id", "weight"]).to_pylist()
        weights.update({row["pair_id"]: row["weight"] for row in rows})
    scalars = ckpt.read_tensorboard_scalars(ckpt.run_dir(config))
    assert sorted(scalars["loss"]) == [0, 1, 2, 3, 4]
    step0_weight = sum(weights[pair_id] for pair_id in log[0]["pair_ids"]) / 2
    assert scalars["loss"][0] == pytest.approx(math.log(2) * step0_weight, rel=1e-6)
    assert scalars["implicit_accuracy"][0] == 0.0 and scalars["reward_margin"][0] == 0.0
    assert all(math.isfinite(value) for value in scalars["loss"].values())
    # the workers' memory high-water mark (peak resident set on CPU) in GiB: a torch process holds a few hundred MiB
    peaks = [scalars["peak_memory_gib"][step] for step in range(5)]
    assert all(0.2 < peak < 24 for peak in peaks) and peaks == sorted(peaks)

    # the export loads into the model layer; the policy moved, the reference did not
    export_url = result.metrics["export_url"]
    assert storage.exists(storage.join(export_url, ckpt.EXPORT_WEIGHTS))
    trained = ckpt.load_exported_model(export_url)
    before = initial.trainable_state_dict()
    after = trained.trainable_state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    row = shards.read_shard(shards.list_shards(data_url, "pairs")[1]).slice(0, 1).to_pylist()[0]
    probe = tensor_bytes.latents_from_bytes(row["win_latents"], row["latent_shape"], row["latent_dtype"])[None]
    timesteps = torch.tensor([500])
    embeddings = initial.encode_prompts([row["prompt"]])
    with torch.no_grad():
        torch.testing.assert_close(trained.predict(probe, timesteps, embeddings, reference=True),
                                   initial.predict(probe, timesteps, embeddings, reference=True), rtol=0, atol=0)
        assert not torch.equal(trained.predict(probe, timesteps, embeddings),
                               initial.predict(probe, timesteps, embeddings))
