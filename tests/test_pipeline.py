"""The demo pipeline: its config resolves, and generate -> pair -> train -> report runs end to end on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_pipeline import TINY_CONFIG, TINY_OVERRIDES

from videodpo_ray import shards
from videodpo_ray.errors import ConfigError


def test_tiny_config_is_valid_and_on_policy():
    from videodpo_ray.stages.pipeline import load_pipeline_config, train_config

    config = load_pipeline_config(TINY_CONFIG, ["out=/tmp/elsewhere"])
    assert len(config.prompts) == 6 and config.generate.samples_per_prompt == 4
    trained = train_config(config)
    assert trained.data.pairs_url == "/tmp/elsewhere"
    assert trained.run.storage_path == "/tmp/elsewhere/train" and trained.run.name == "dpo"
    assert (trained.model.family, trained.model.variant) == ("vc2", "tiny")

    off_policy = load_pipeline_config(TINY_CONFIG, ["train.overrides=[model.variant=full]"])
    with pytest.raises(ConfigError, match=r"train model differs from the pipeline model \(variant: 'full' vs 'tiny'\)"):
        train_config(off_policy)
    with pytest.raises(ConfigError, match="generate.samples_per_prompt"):
        load_pipeline_config(TINY_CONFIG, ["generate.samples_per_prompt=1"])
    # refused when the config loads, before anything is generated
    with pytest.raises(ConfigError, match=r"generate.scorer.dimensions do not score subject_consistency, "
                                          r"motion_smoothness, .* which OmniScore blends"):
        load_pipeline_config(TINY_CONFIG, ["generate.scorer.dimensions=[temporal_flickering]"])
    with pytest.raises(ConfigError, match=r"pairing.rank_pairs \[\(0, 4\)\] need more than 4 samples per prompt"):
        load_pipeline_config(TINY_CONFIG, ["pair.pairing={strategy: rank_pairs, rank_pairs: [[0, 1], [0, 4]]}"])


@pytest.mark.parametrize("name", ["pipeline_vc2.yaml", "pipeline_wan.yaml"])
def test_cluster_pipeline_configs_resolve_on_policy(name: str):
    """The shipped rounds: each config and the training recipe it names validate, and training is on-policy (the
    weights that sampled the pairs are the ones trained)."""
    from videodpo_ray.stages.pipeline import load_pipeline_config, train_config

    config = load_pipeline_config(TINY_CONFIG.parent / name)
    trained = train_config(config)
    weights = ("family", "variant", "path")
    assert [getattr(trained.model, key) for key in weights] == [getattr(config.model, key) for key in weights]
    assert trained.data.pairs_url == config.out


def test_pipeline_end_to_end_writes_a_sane_report(ray_cluster, tmp_path: Path):
    from jobs.pipeline import run_pipeline
    from videodpo_ray.stages.pipeline import load_pipeline_config

    config = load_pipeline_config(TINY_CONFIG, [f"out={tmp_path / 'run'}", *TINY_OVERRIDES])
    report = run_pipeline(config)

    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    generated, pairs, train = report["generate"], report["pairs"], report["train"]
    assert (generated["prompts"], generated["chunks"], generated["chunks_sampled"]) == (2, 2, 2)
    assert pairs["scored_samples"] + pairs["unscored_samples"] == 4
    assert pairs["pairs"] + pairs["prompts_without_pair"] == 2 and pairs["pairs"] >= 1
    committed = shards.list_shards(str(tmp_path / "run"), "pairs")
    assert pairs["shards"]["num_rows"] == pairs["pairs"] == sum(shards.read_shard(info).num_rows for info in committed)
    assert 0.0 < pairs["score_gap"]["min"] <= pairs["score_gap"]["mean"] <= pairs["score_gap"]["max"]  # no ties
    assert pairs["weight"]["mean"] == pytest.approx(1.0)  # histogram weights normalised to mean 1
    assert 0.0 < pairs["omniscore"]["min"] <= pairs["omniscore"]["max"] < 1.5

    assert train["status"] == "done" and train["steps"] == 2
    assert [point["step"] for point in train["curve"]] == [0, 1]
    first = train["curve"][0]
    # at step 0 the policy equals the reference: margin 0 and loss = ln 2 x mean pair weight (up to the last float
    # bit of the two copies' GEMMs, which beta_dpo = 5000 magnifies)
    assert abs(first["reward_margin"]) <= 1e-3
    assert first["loss"] == pytest.approx(math.log(2.0) * first["mean_weight"], rel=1e-3)
    assert all(0.0 <= point["implicit_accuracy"] <= 1.0 and math.isfinite(point["loss"]) for point in train["curve"])
    assert (tmp_path / "run" / "train" / "dpo" / "export").is_dir()

    markdown = (tmp_path / "run" / "report.md").read_text()
    assert f"{pairs['pairs']} pairs in {pairs['shards']['num_shards']} shard(s)" in markdown
    assert "| step | loss | implicit accuracy | reward margin | mean pair weight |" in markdown
    assert f"| 1 | {train['curve'][1]['loss']:.5f} |" in markdown

    evaluated = report["evaluate"]  # the demo's held-out prompts: base vs the trained run, same seeds
    assert evaluated["num_prompts"] == 2 and 0.0 <= evaluated["win_rate"] <= 1.0
    assert evaluated["report"] == str(tmp_path / "run" / "evaluate" / "dpo" / "index.html")
    page = (tmp_path / "run" / "evaluate" / "dpo" / "index.html").read_text()
    assert "curves.png" in page and "analysis.png" in page  # the run's curves and its training data's panels
    assert (tmp_path / "run" / "evaluate" / "dpo" / "analysis.png").stat().st_size > 1000
    assert f"Win rate {evaluated['win_rate']:.3f}" in markdown
