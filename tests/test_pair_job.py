"""Pair job: hand-made scores -> exact pairs and weights -> pair shards (on S3) with videos, VAE latents and text
embeddings."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from videodpo_ray import shards, storage, tensor_bytes
from videodpo_ray.dimensions import OMNISCORE_DIMENSIONS
from videodpo_ray.errors import ConfigError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.stages.common import ChunkCollector
from videodpo_ray.stages.pair import PAIRING_MANIFEST, PairConfig, plan_pair_shards, plan_pairs
from videodpo_ray.video import decode_mp4, encode_mp4

TINY_VC2 = ModelConfig(family="vc2", variant="tiny")
# chunk -> prompt id -> OmniScores of its samples (None: scoring failed)
SCORES = {
    0: {"000000": [0.5, 0.8, 0.3, 0.6], "000001": [0.4, 0.4, 0.4, 0.4]},  # 000001: all tied, no pair
    1: {"000002": [0.7, None, 0.5, 0.6]},
}


def _video(seed: int) -> bytes:
    frames = np.random.default_rng(seed).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    return encode_mp4(frames, fps=8)


def _write_generation(root: str) -> dict[str, bytes]:
    """Samples + scores shards as the generate job writes them; returns sample id -> mp4 bytes."""
    videos = {}
    for chunk, prompts in SCORES.items():
        samples, scores = [], []
        for prompt_id, values in prompts.items():
            for k, value in enumerate(values):
                sample_id = f"{prompt_id}-{k}"
                videos[sample_id] = _video(len(videos))
                samples.append({"sample_id": sample_id, "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}",
                                "seed": k, "video": videos[sample_id], "fps": 8, "model": "vc2/tiny"})
                raw = {name: (None if value is None else 0.5) for name in OMNISCORE_DIMENSIONS}
                scores.append({"sample_id": sample_id, "prompt_id": prompt_id, **raw,
                               "omniscore": math.nan if value is None else value,
                               "failed_reason": "decode: injected" if value is None else None})
        shards.write_shard(shards.make_table("samples", samples), root, "samples", chunk)
        shards.write_shard(shards.make_table("scores", scores), root, "scores", chunk)
    return videos


def test_plan_pairs_weights_follow_the_config(tmp_path: Path):
    root = str(tmp_path)
    _write_generation(root)
    # all 11 scored samples: bins 0.40 x4, 0.50 x2, 0.60 x2, 0.30, 0.70, 0.80 x1; beta_w = 4/11 (most frequent bin)
    pairing = {"weighting": {"scheme": "histogram", "alpha": 1.0}}
    report, pairs, chunk_of = plan_pairs(PairConfig(data=root, pairing=pairing))
    assert [(p.pair_id, p.win_score, p.lose_score) for p in pairs] == [
        ("000000/000000-1/000000-2", 0.8, 0.3),
        ("000002/000002-0/000002-2", 0.7, 0.5),
    ]
    # (4/11) / sqrt(p_w p_l): (4/11) / (1/11) = 4 and (4/11) / sqrt(1/11 * 2/11) = 2 sqrt(2)
    assert [p.weight for p in pairs] == pytest.approx([4.0, 2.0 * math.sqrt(2.0)], rel=1e-12)
    pairing["weighting"]["normalise"] = True
    _, pairs, _ = plan_pairs(PairConfig(data=root, pairing=pairing))
    assert [p.weight for p in pairs] == pytest.approx([4.0 / (2 + math.sqrt(2)), 2 * math.sqrt(2) / (2 + math.sqrt(2))])
    assert chunk_of == {"000000": 0, "000001": 0, "000002": 1}
    assert (report.num_prompts, report.num_samples, report.prompts_without_pair) == (3, 11, 1)
    assert report.unscored == ["000002-1"]
    assert report.score_gap == pytest.approx({"mean": 0.35, "min": 0.2, "max": 0.5})


def test_a_prompt_with_a_failed_sample_loses_only_the_rank_pairs_it_is_short_of(tmp_path: Path):
    root = str(tmp_path)
    _write_generation(root)  # 4 samples per prompt; 000002 has 3 scored (ranks 0..2): 0.7 (-0), 0.6 (-3), 0.5 (-2)
    pairing = {"strategy": "rank_pairs", "rank_pairs": [[0, 1], [0, 3]]}
    report, pairs, _ = plan_pairs(PairConfig(data=root, pairing=pairing))
    assert [pair.pair_id for pair in pairs] == [
        "000000/000000-1/000000-3", "000000/000000-1/000000-2", "000002/000002-0/000002-3",
    ]  # fmt: skip
    assert (report.num_pairs, report.prompts_without_pair) == (3, 1)
    assert (report.prompts_short, report.rank_pairs_short) == (1, 1)
    assert "1 prompts without a pair, 1 rank pairs of 1 prompts short of scored samples)" in report.summary()
    report, pairs, _ = plan_pairs(PairConfig(data=root, pairing={"strategy": "rank_pairs", "rank_pairs": [[0, 3]]}))
    assert [pair.pair_id for pair in pairs] == ["000000/000000-1/000000-2"]
    assert (report.prompts_without_pair, report.prompts_short, report.rank_pairs_short) == (2, 1, 1)
    report, pairs, _ = plan_pairs(PairConfig(data=root))  # best_worst: (0, N-1) of each prompt's scored samples
    assert [pair.pair_id for pair in pairs] == ["000000/000000-1/000000-2", "000002/000002-0/000002-2"]
    assert (report.prompts_short, report.rank_pairs_short) == (0, 0)


def test_a_rank_pair_beyond_the_generated_samples_fails_before_any_write(tmp_path: Path):
    root = str(tmp_path)
    _write_generation(root)
    config = PairConfig(data=root, pairing={"strategy": "rank_pairs", "rank_pairs": [[0, 1], [0, 4]]})
    message = f"pairing.rank_pairs [(0, 4)] need more than 4 samples per prompt (ranks are 0..3); {root}/scores has 4"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)} per prompt$"):
        plan_pair_shards(config)
    assert not (tmp_path / PAIRING_MANIFEST).exists()


def test_a_rerun_with_another_encoder_batch_size_is_refused(tmp_path: Path):
    """The encoder cuts each chunk into VAE batches of `encoder_pool.batch_size` pairs: a latent's rounding depends
    on its batch, so the batch size is part of what the shards were made with."""
    root = str(tmp_path)
    _write_generation(root)
    plan_pair_shards(PairConfig(data=root, encoder_pool={"batch_size": 2}))
    with pytest.raises(ConfigError, match=r"encoder_batch_size: recorded 2, now 4"):
        plan_pair_shards(PairConfig(data=root, encoder_pool={"batch_size": 4}))


def test_scores_without_an_omniscore_are_refused_before_any_write(tmp_path: Path):
    """A scorer run without every OmniScore dimension leaves `omniscore` empty on rows that did not fail: pairing
    them would find no pair at all, so the stage names the shard and the sample instead."""
    root = str(tmp_path)
    _write_generation(root)
    info = shards.list_shards(root, "scores")[0]
    rows = shards.read_shard(info).to_pylist()
    rows[0]["omniscore"] = math.nan
    shards.write_shard(shards.make_table("scores", rows), root, "scores", info.index, overwrite=True)
    with pytest.raises(ConfigError, match=rf"{re.escape(info.url)}: sample '{rows[0]['sample_id']}' has scores but "
                                          r"no OmniScore"):
        plan_pair_shards(PairConfig(data=root))
    assert not (tmp_path / PAIRING_MANIFEST).exists()


def test_every_chunk_carries_the_empty_prompt_embedding_however_batches_cut_it(single_torch_thread):
    from actors.latent_encoder import EMPTY_PROMPT_COLUMN, LatentEncoderActor, empty_prompt_of, first_row_of_each_chunk

    assert first_row_of_each_chunk(pa.table({"chunk": [5, 5, 2, 5, 2]})) == [True, False, True, False, False]
    assert first_row_of_each_chunk(pa.table({"pair_id": ["a", "b", "c"]})) == [True, False, False]
    # chunk 5 (3 pairs) then chunk 2 (1 pair) cut into batches of 2, as Ray Data batches across blocks: chunk 2 is
    # never a batch's first row, and it completes (and commits) first
    requests = [{"chunk": chunk, "position": position, "pair_id": f"{chunk}/{position}", "prompt": f"prompt {chunk}",
                 "win_video": _video(2 * position), "lose_video": _video(2 * position + 1)}
                for chunk, position in ((5, 0), (5, 1), (5, 2), (2, 0))]
    actor = LatentEncoderActor(TINY_VC2, "float32", init_seed=0)
    collector = ChunkCollector({5: 3, 2: 1})
    assert collector.add(actor(pa.Table.from_pylist(requests[:2]))) == []
    done = collector.add(actor(pa.Table.from_pylist(requests[2:])))
    assert [(chunk, rows.column("position").to_pylist()) for chunk, rows in done] == [(2, [0]), (5, [0, 1, 2])]
    assert [rows.column(EMPTY_PROMPT_COLUMN).null_count for _, rows in done] == [0, 1]
    expected = tensor_bytes.empty_prompt_bytes(actor.model.encode_prompts([""])[0])  # test_text_embeddings: = trainer's
    assert [empty_prompt_of(chunk, rows) for chunk, rows in done] == [expected, expected]
    without = done[0][1].set_column(done[0][1].schema.get_field_index(EMPTY_PROMPT_COLUMN), EMPTY_PROMPT_COLUMN,
                                    pa.nulls(1, pa.binary()))
    with pytest.raises(RuntimeError, match=r"^chunk 2: none of its 1 encoded pair rows carries 'empty_text_embedding' "
                       r"\(the latent encoder sets it on the first row of each chunk of a call\)$"):
        empty_prompt_of(2, without)


def test_pair_job_on_s3_writes_shards_with_latents_and_rerun_skips(ray_cluster, single_torch_thread, s3_bucket: str):
    from jobs.pair import make_pairs

    data, out = f"{s3_bucket}/gen", f"{s3_bucket}/pairs"  # moto S3 server: Ray workers read the samples from it
    videos = _write_generation(data)
    config = PairConfig(data=data, out=out, model=TINY_VC2, text_embedding_dtype="bfloat16",
                        pairing={"weighting": {"scheme": "product", "alpha": 1.0}}, encoder_pool={"batch_size": 2})
    report = make_pairs(config)
    assert (report.num_pairs, report.written, report.skipped, report.incomplete) == (2, [0, 1], [], {})

    rows = [row for info in shards.list_shards(out, "pairs") for row in shards.read_shard(info).to_pylist()]
    assert [(r["pair_id"], r["prompt"], r["win_sample_id"], r["lose_sample_id"]) for r in rows] == [
        ("000000/000000-1/000000-2", "prompt 000000", "000000-1", "000000-2"),
        ("000002/000002-0/000002-2", "prompt 000002", "000002-0", "000002-2"),
    ]
    # released-code weights (0.72 / (S_w S_l))^1, stored as float32
    assert [r["weight"] for r in rows] == [np.float32(0.72 / (0.8 * 0.3)), np.float32(0.72 / (0.7 * 0.5))]
    assert [(r["win_score"], r["lose_score"], r["fps"]) for r in rows] == [(0.8, 0.3, 8), (0.7, 0.5, 8)]
    model = build_model(TINY_VC2, seed=0).eval()
    for row in rows:
        assert row["win_video"] == videos[row["win_sample_id"]] and row["lose_video"] == videos[row["lose_sample_id"]]
        assert (row["latent_model"], row["latent_dtype"]) == (model.latent_space, "float32")
        assert row["latent_model"].startswith("vc2:")
        for side in ("win", "lose"):
            frames, _ = decode_mp4(row[f"{side}_video"])
            with torch.no_grad():
                expected = model.encode_videos(frames[None])[0]
            stored = tensor_bytes.latents_from_bytes(row[f"{side}_latents"], row["latent_shape"], row["latent_dtype"])
            assert list(stored.shape) == list(expected.shape) == row["latent_shape"]
            torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    from_bytes = tensor_bytes.latents_from_bytes
    assert not torch.equal(*[from_bytes(rows[0][f"{s}_latents"], rows[0]["latent_shape"], "float32")
                             for s in ("win", "lose")])
    for row in rows:  # the prompt's text embedding (L, D) of the model, in the configured dtype
        with torch.no_grad():
            expected = model.encode_prompts([row["prompt"]])[0]
        assert (row["text_embedding_shape"], row["text_embedding_dtype"]) == (list(expected.shape), "bfloat16")
        stored = tensor_bytes.latents_from_bytes(row["text_embedding"], row["text_embedding_shape"], "bfloat16")
        torch.testing.assert_close(stored, expected.to(torch.bfloat16), rtol=0, atol=0)
    empty = tensor_bytes.read_empty_prompt_embedding(out)  # stored once per run, beside the shards
    torch.testing.assert_close(empty, model.encode_prompts([""])[0].to(torch.bfloat16), rtol=0, atol=0)

    files = {name: hashlib.sha256(storage.read_bytes(storage.join(out, "pairs", name))).hexdigest()
             for name in storage.list_files(storage.join(out, "pairs"))}
    report = make_pairs(config)  # rerun: everything committed, no Ray work, same bytes
    assert (report.written, report.skipped, report.num_pairs) == ([], [0, 1], 2)
    assert {name: hashlib.sha256(storage.read_bytes(storage.join(out, "pairs", name))).hexdigest()
            for name in storage.list_files(storage.join(out, "pairs"))} == files

    with pytest.raises(ConfigError, match="pairing"):  # other weights over the same output: refused, nothing mixed
        make_pairs(config.model_copy(update={"pairing": config.pairing.model_copy(update={"strategy": "all_pairs"})}))
