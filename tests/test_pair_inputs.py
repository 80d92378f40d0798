"""The pair stage's inputs, checked on the driver before any cluster work (no Ray): an unfinished generate output,
duplicate sample ids, and the encoder's device type recorded for resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from test_pair_job import _write_generation

from jobs.pair import main
from videodpo_ray import shards
from videodpo_ray.errors import ConfigError, ShardError
from videodpo_ray.stages.generate import GenerateConfig, plan_generate, planned_chunks
from videodpo_ray.stages.pair import (
    DEVICE_MANIFEST,
    PAIRING_MANIFEST,
    PairConfig,
    attach_videos,
    plan_pair_shards,
    plan_pairs,
    record_device,
)
from videodpo_ray.stages.prompts import PromptRow


def _record_generation(root: str, num_prompts: int) -> None:
    """`{root}/generation.json` as the generate job records it, for `num_prompts` prompts in chunks of 2 (the
    chunks of `_write_generation`: 000000 and 000001, then 000002)."""
    config = GenerateConfig(prompts="unused.txt", out=root, prompts_per_chunk=2, scorer={"tiny": True})
    plan_generate(config, [PromptRow(f"{i:06d}", f"prompt {i:06d}") for i in range(num_prompts)])


def _rewrite(root: str, kind: str, chunk: int, renames: dict[str, str]) -> None:
    """Re-commit shard `chunk` of `kind` with sample ids renamed (hand-made data)."""
    info = shards.list_shards(root, kind)[chunk]
    rows = shards.read_shard(info).to_pylist()
    for row in rows:
        row["sample_id"] = renames.get(row["sample_id"], row["sample_id"])
    shards.write_shard(shards.make_table(kind, rows), root, kind, chunk, overwrite=True)


def _run_job(tmp_path: Path, root: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`python -m jobs.pair CONFIG` on `root`: (exit code, stderr)."""
    config = tmp_path / "pair.yaml"
    config.write_text(f"data: {root}\n")
    code = main([str(config)])
    return code, capsys.readouterr().err


def test_samples_without_scores_are_refused_before_any_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Generate commits a chunk's samples before its scores: a killed run leaves a chunk pairing must not skip."""
    root = str(tmp_path / "gen")
    _write_generation(root)
    shards.uncommit_shard(root, "scores", 1)
    message = (f"{root}: unfinished generation: chunk(s) 1 (1 of 2 chunks) have no committed scores shard; rerun "
               f"generate (or score) on {root} to finish it, then pair")
    with pytest.raises(ShardError, match=f"^{re.escape(message)}$"):
        plan_pair_shards(PairConfig(data=root))
    assert not (tmp_path / "gen" / PAIRING_MANIFEST).exists()
    assert _run_job(tmp_path, root, capsys) == (2, f"error: {message}\n")  # an input error, before Ray


def test_chunks_generation_json_plans_but_never_committed_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A generate run that failed a chunk commits neither its samples nor its scores: generation.json names it."""
    root = str(tmp_path / "gen")
    _write_generation(root)
    _record_generation(root, num_prompts=5)  # chunks 0, 1 and 2; chunk 2 never committed
    assert planned_chunks(root) == range(3)
    code, error = _run_job(tmp_path, root, capsys)
    assert code == 2 and error.startswith(f"error: {root}: unfinished generation: chunk(s) 2 (1 of 3 chunks) have")
    assert not (tmp_path / "gen" / PAIRING_MANIFEST).exists()
    with pytest.raises(ShardError, match=r"chunk\(s\) 2, 3, 4, 5, 6 and 3 more \(8 of 10 chunks\) have no committed"):
        plan_pairs(PairConfig(data=root), planned=range(10))  # a few chunk ids, then a count


def test_a_finished_generation_still_plans(tmp_path: Path):
    root = str(tmp_path)
    _write_generation(root)
    assert planned_chunks(root) == range(0)  # hand-made scores: no generation.json, the samples shards decide
    assert sorted(plan_pair_shards(PairConfig(data=root), planned_chunks(root)).pending) == [0, 1]
    _record_generation(root, num_prompts=3)
    plan = plan_pair_shards(PairConfig(data=root), planned_chunks(root))
    assert (sorted(plan.pending), plan.report.num_pairs, plan.report.skipped) == ([0, 1], 2, [])


def test_a_sample_id_shared_by_two_prompts_of_a_chunk_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The chunk's videos are found by sample id: a shared id would give one prompt's pair the other's video."""
    root = str(tmp_path / "gen")
    _write_generation(root)
    _rewrite(root, "scores", 0, {"000001-0": "000000-0"})
    url = shards.list_shards(root, "scores")[0].url
    message = (f"{url}: row 4: sample_id '000000-0' (prompt '000001') repeats row 0 (prompt '000000'); a sample id "
               "must be unique within a chunk")
    with pytest.raises(ShardError, match=f"^{re.escape(message)}$"):
        plan_pair_shards(PairConfig(data=root))
    assert not (tmp_path / "gen" / PAIRING_MANIFEST).exists()
    assert _run_job(tmp_path, root, capsys) == (2, f"error: {message}\n")


def test_a_sample_id_twice_in_one_prompt_is_an_input_error_naming_the_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    root = str(tmp_path / "gen")
    _write_generation(root)
    _rewrite(root, "scores", 1, {"000002-3": "000002-0"})
    url = shards.list_shards(root, "scores")[1].url
    message = f"{url}: row 3: sample_id '000002-0' (prompt '000002') repeats row 0 (prompt '000002')"
    with pytest.raises(ShardError, match=f"^{re.escape(message)}"):
        plan_pair_shards(PairConfig(data=root))
    code, error = _run_job(tmp_path, root, capsys)
    assert code == 2 and error.startswith(f"error: {message}")


def test_a_sample_id_in_two_chunks_gets_each_chunk_s_own_video(tmp_path: Path):
    """Ids need only be unique within a chunk: videos are looked up by (chunk, sample id)."""
    root = str(tmp_path)
    videos = _write_generation(root)
    for kind in ("samples", "scores"):
        _rewrite(root, kind, 1, {"000002-0": "000000-1"})  # both chunks' winner is now "000000-1"
    plan = plan_pair_shards(PairConfig(data=root))
    rows = attach_videos(pa.concat_tables(list(plan.pending.values())), plan.samples).to_pylist()
    assert [(r["chunk"], r["win_sample_id"], r["prompt"]) for r in rows] == [
        (0, "000000-1", "prompt 000000"), (1, "000000-1", "prompt 000002"),
    ]  # fmt: skip
    assert [r["win_video"] for r in rows] == [videos["000000-1"], videos["000002-0"]]


def test_the_encoder_device_is_recorded_and_a_resume_on_the_other_kind_is_refused(tmp_path: Path):
    """Latents and text embeddings round differently on a GPU and a CPU: like generate, the pair output records
    the device type its encoder ran on."""
    config = PairConfig(data=str(tmp_path / "gen"), out=str(tmp_path / "pairs"))
    record_device(config, cluster_gpus=8)
    assert json.loads((tmp_path / "pairs" / DEVICE_MANIFEST).read_text()) == {"encoder_device": "cuda"}
    record_device(config, cluster_gpus=2)  # another GPU cluster: the same device type
    with pytest.raises(ConfigError, match=r"encoder_device: recorded 'cuda', now 'cpu'"):
        record_device(config, cluster_gpus=0)
    with pytest.raises(ConfigError, match=r"encoder_device: recorded 'cuda', now 'cpu'"):
        record_device(PairConfig(data=config.data, out=config.out, encoder_pool={"num_gpus": 0}), cluster_gpus=8)
