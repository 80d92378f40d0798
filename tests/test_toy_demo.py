"""The toy world end to end on local Ray (slow: pretraining the toy base model alone takes about 4 minutes).

It is the training that helps: the demo pipeline on a smaller configuration (fewer DPO steps, one held-out seed per
prompt) gains on the 64 held-out toy prompts, and the same data trained under two controls does not: learning rate 0
(the tuned model is the base model, exactly) and winner and loser swapped (the gain reverses).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALLER = ["train.overrides=[data.max_steps=30]", "evaluate.samples_per_prompt=1"]


def test_toy_alignment_gain_vanishes_with_lr_zero_and_reverses_with_swapped_pairs(ray_cluster, tmp_path: Path):
    from jobs.pipeline import DEMO_CONFIG, run_pipeline
    from videodpo_ray.stages.pipeline import load_pipeline_config

    out = f"out={tmp_path / 'toy'}"
    trained = run_pipeline(load_pipeline_config(DEMO_CONFIG, [out, *SMALLER]))
    assert trained["toy"]["built"] == ["classifier", "base model"]
    gain = trained["evaluate"]
    assert gain["num_prompts"] == 64 and gain["win_rate"] >= 0.6
    assert gain["omniscore_gain_mean"] > 2 * gain["omniscore_gain_se"]

    controls = {
        "lr-zero": "train.overrides=[data.max_steps=30, optim.lr=0.0]",
        "swapped": "train.overrides=[data.max_steps=30, data.swap_winner_loser=true]",
    }
    results = {}
    for name, overrides in controls.items():
        config = load_pipeline_config(DEMO_CONFIG, [out, *SMALLER, overrides, f"train.run_name={name}"])
        report = run_pipeline(config)  # the toy world, samples and pairs are committed: only train + evaluate run
        assert report["toy"]["built"] == [] and report["generate"]["chunks_skipped"] == report["generate"]["chunks"]
        results[name] = report["evaluate"]
    assert results["lr-zero"]["win_rate"] == 0.5 and results["lr-zero"]["omniscore_gain_mean"] == 0.0
    assert results["swapped"]["omniscore_gain_mean"] < 0.0 < gain["omniscore_gain_mean"]
