"""Text embeddings in the pair shards: the encoder actor stores them, training on them builds no text encoder and
gives the loss of training that encodes the prompts; without them, a bounded CPU cache encodes per batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.latent_encoder import EMPTY_PROMPT_COLUMN, LatentEncoderActor
from videodpo_ray import shards, storage, tensor_bytes
from videodpo_ray.errors import ShardError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.pair import pair_shard
from videodpo_ray.training.data import (
    PairLoader,
    PromptEmbeddingCache,
    batch_text_embeddings,
    pair_latents,
    prompts_to_encode,
    stores_text_embeddings,
)
from videodpo_ray.training.plan import PairPlan
from videodpo_ray.training.step import dpo_step
from videodpo_ray.video import encode_mp4

TINY_VC2 = ModelConfig(family="vc2", variant="tiny")
PROMPTS = ["a red fox", "a red fox", "waves on a shore", "a cat on a sofa"]
pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tiny models: far faster on one thread


def _mp4(seed: int) -> bytes:
    return encode_mp4(np.random.default_rng(seed).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), fps=8)


def _requests() -> pa.Table:
    """Pair rows as the pair stage hands them to the encoder actors (videos and prompts attached)."""
    return pa.Table.from_pylist([
        {"pair_id": f"p{i}/w/l", "prompt_id": f"p{i}", "prompt": prompt, "win_sample_id": f"p{i}-w",
         "lose_sample_id": f"p{i}-l", "win_score": 0.8, "lose_score": 0.3, "weight": 1.0 + i / 4, "fps": 8,
         "win_video": _mp4(2 * i), "lose_video": _mp4(2 * i + 1)}
        for i, prompt in enumerate(PROMPTS)
    ])


@pytest.fixture(scope="module")
def encoded_pairs(tmp_path_factory) -> str:
    """A pair shard and the empty-prompt file, written as the pair job writes them (float32 embeddings)."""
    root = str(tmp_path_factory.mktemp("pairs"))
    rows = LatentEncoderActor(TINY_VC2, "float32", init_seed=0)(_requests())
    storage.write_bytes_atomic(tensor_bytes.empty_prompt_url(root), rows.column(EMPTY_PROMPT_COLUMN)[0].as_py())
    shards.write_shard(pair_shard(rows, keep_videos=False), root, "pairs", 0)
    return root


def test_encoder_actor_stores_each_prompts_embedding_in_the_configured_dtype():
    model = build_model(TINY_VC2, seed=0)
    rows = LatentEncoderActor(TINY_VC2, "float32", text_dtype="bfloat16", init_seed=0)(_requests())
    table = pair_shard(rows, keep_videos=False)
    for row in table.to_pylist():
        expected = model.encode_prompts([row["prompt"]])[0]
        assert row["text_embedding_shape"] == list(expected.shape) and row["text_embedding_dtype"] == "bfloat16"
        stored = tensor_bytes.latents_from_bytes(row["text_embedding"], row["text_embedding_shape"], "bfloat16")
        assert torch.equal(stored, expected.to(torch.bfloat16))
    empty = rows.column(EMPTY_PROMPT_COLUMN).to_pylist()
    assert empty[0] is not None and empty[1:] == [None] * (len(PROMPTS) - 1)  # once per batch, not per row


@pytest.mark.parametrize("family", ["vc2", "t2v_turbo", "cogvideox", "wan"])
def test_a_model_built_without_text_encoder_has_none_and_the_same_other_weights(family):
    config = ModelConfig(family=family, variant="tiny")
    full = build_model(config, seed=3)
    bare = build_model(config.model_copy(update={"build_text_encoder": False}), seed=3)
    assert "build_text_encoder" not in config.model_dump()  # never in manifests, dumps or checkpoints
    assert getattr(bare, "text_encoder", None) is None and getattr(bare, "_prompt_encoder", None) is None
    with pytest.raises(RuntimeError, match="text encoder"):
        bare.encode_prompts(["a prompt"])
    weights = dict(full.named_parameters())
    bare_weights = dict(bare.named_parameters())
    assert bare_weights and set(bare_weights) <= set(weights)
    for name, tensor in bare_weights.items():
        assert torch.equal(tensor, weights[name]), name


def test_training_on_stored_embeddings_builds_no_text_encoder_and_gives_the_encoded_loss(encoded_pairs):
    listed = shards.list_shards(encoded_pairs, "pairs")
    assert stores_text_embeddings(listed)
    bare = build_model(TINY_VC2.model_copy(update={"build_text_encoder": False}), seed=0)
    assert bare.text_encoder is None
    full = build_model(TINY_VC2, seed=0)
    cache = PromptEmbeddingCache(full, max_entries=2)
    plan = PairPlan(listed, seed=0, num_workers=1, pairs_per_worker=2, grad_accum=1)
    empty = tensor_bytes.read_empty_prompt_embedding(encoded_pairs)
    torch.testing.assert_close(empty, cache.encode(""), rtol=0, atol=0)
    for batch in list(PairLoader(plan, epoch=0, rank=0, start_step=0, latent_space=full.latent_space, prefetch=0))[:1]:
        dropped = [False, True]  # one pair trained on its prompt, one on the empty prompt (CFG dropout)
        stored = batch_text_embeddings(batch.pairs, dropped, empty, {})
        bare_pairs = [replace(pair, text_embedding=None) for pair in batch.pairs]  # imported data: no embeddings
        wanted = prompts_to_encode(bare_pairs, dropped)
        assert wanted == [batch.pairs[0].prompt]
        encoded = batch_text_embeddings(bare_pairs, dropped, cache.encode(""), cache.lookup(wanted, wanted))
        torch.testing.assert_close(stored, encoded, rtol=0, atol=0)
        win, lose = pair_latents(bare, batch, torch.device("cpu"))
        weights = torch.tensor([pair.weight for pair in batch.pairs])
        losses = [
            dpo_step(model, win, lose, embeddings, weights, beta_dpo=5000.0, generator=torch.Generator().manual_seed(1))
            .loss for model, embeddings in ((bare, stored), (full, encoded))
        ]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_shards_without_embeddings_are_recognised(tmp_path, encoded_pairs):
    table = shards.read_shard(shards.list_shards(encoded_pairs, "pairs")[0])
    column = table.schema.get_field_index("text_embedding")
    imported = table.set_column(column, "text_embedding", pa.nulls(table.num_rows, pa.binary()))
    shards.write_shard(table, str(tmp_path), "pairs", 0)
    shards.write_shard(imported, str(tmp_path), "pairs", 1)
    listed = shards.list_shards(str(tmp_path), "pairs")
    assert stores_text_embeddings(listed[:1]) and not stores_text_embeddings(listed)


def test_prompt_cache_never_holds_more_than_its_bound():
    calls: list[list[str]] = []

    class Encoder(torch.nn.Module):
        def encode_prompts(self, prompts):
            calls.append(list(prompts))
            return torch.stack([torch.full((3, 2), float(len(prompt))) for prompt in prompts])

    cache = PromptEmbeddingCache(Encoder(), max_entries=3)
    for step in range(20):
        everyone = [f"prompt {(step + k) % 7}" for k in range(4)]  # 4 distinct prompts a step, more than the bound
        found = cache.lookup(everyone, everyone[:2])
        assert set(found) == set(everyone[:2]) and len(cache.entries) <= 3
        assert all(embedding.device.type == "cpu" for embedding in cache.entries.values())
    assert all(len(call) == 1 for call in calls)  # one prompt per encode call
    cache.lookup(["prompt 0"], ["prompt 0"])
    before = len(calls)
    cache.lookup(["prompt 0"], ["prompt 0"])  # recently used: cached
    assert len(calls) == before
    with pytest.raises(ValueError, match="max_entries"):
        PromptEmbeddingCache(Encoder(), max_entries=0)


def test_empty_prompt_embedding_round_trip_and_missing_file(tmp_path):
    embedding = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
    storage.write_bytes_atomic(tensor_bytes.empty_prompt_url(str(tmp_path)), tensor_bytes.empty_prompt_bytes(embedding))
    assert shards.list_shards(str(tmp_path), "pairs") == []  # beside the shards, never taken for one
    read = tensor_bytes.read_empty_prompt_embedding(str(tmp_path))
    assert read.dtype == torch.bfloat16 and torch.equal(read, embedding)
    with pytest.raises(ShardError, match=r"empty_prompt\.safetensors: missing"):
        tensor_bytes.read_empty_prompt_embedding(str(tmp_path / "other"))
