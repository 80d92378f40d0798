"""The toy world (the embedded default; never VBench): data, the toy semantic scorer, the configurable OmniScore and
the pipeline's toy section. Fast: no pretraining, no Ray (the demo and tests/test_demo_toy.py run those)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actors.scorer import OmniScorer
from videodpo_ray import toy_world as world
from videodpo_ray.dimensions import VBENCH_QUALITY_DIMENSIONS, VBENCH_SEMANTIC_DIMENSIONS
from videodpo_ray.errors import ConfigError
from videodpo_ray.omniscore import omniscore
from videodpo_ray.scoring import (
    ModelSpec,
    OmniScoreConfig,
    ScorerConfig,
    load_scorer_model,
    score_outputs,
    toy_semantic,
)
from videodpo_ray.stages.toy import ToyWorldConfig, toy_prompts
from videodpo_ray.video import encode_mp4


def test_toy_prompts_split_into_disjoint_training_and_held_out_sets():
    train, held_out = toy_prompts(ToyWorldConfig())
    assert (len(train), len(held_out)) == (56, 64)  # 6 colours x 5 shapes x 4 directions = 120
    assert not set(train) & set(held_out)
    assert toy_prompts(ToyWorldConfig()) == (train, held_out)  # fixed by the seed
    assert toy_prompts(ToyWorldConfig(seed=1)) != (train, held_out)
    assert world.parse_prompt("a red square moving left") == world.Caption("red", "square", "left")
    with pytest.raises(ValueError, match="not a toy prompt"):
        world.parse_prompt("a corgi running on the beach")


def test_a_toy_video_shows_its_colour_moving_its_direction():
    video = world.render_prompt("a blue square moving right", seed=3)
    assert video.shape == (world.NUM_FRAMES, world.HEIGHT, world.WIDTH, 3) and video.dtype == np.uint8
    assert np.array_equal(video, world.render_prompt("a blue square moving right", seed=3))  # deterministic
    blue = np.all(video == np.array(world.COLOURS["blue"], dtype=np.uint8), axis=-1)  # (T, H, W)
    columns = [np.nonzero(frame.any(axis=0))[0].mean() for frame in blue]
    assert np.allclose(np.diff(columns), world.SPEED)  # the shape's centre moves SPEED px right per frame


def test_toy_semantic_outputs_are_the_classifier_probabilities_of_the_prompt(monkeypatch):
    probabilities = {
        "colour": torch.tensor([[0.7, 0.1, 0.05, 0.05, 0.05, 0.05]] * 2),  # red, green, blue, yellow, magenta, cyan
        "shape": torch.full((2, 5), 0.2),
        "direction": torch.tensor([[0.1, 0.6, 0.2, 0.1]] * 2),  # left, right, up, down
    }
    rows = toy_semantic.outputs_for(probabilities, ["a red circle moving right", "a cyan circle moving down"])
    assert rows[0] == pytest.approx({"toy_semantic": (0.7 + 0.6) / 2, "toy_colour": 0.7, "toy_direction": 0.6})
    assert rows[1] == pytest.approx({"toy_semantic": (0.05 + 0.1) / 2, "toy_colour": 0.05, "toy_direction": 0.1})

    model = toy_semantic.tiny_model()
    videos = [world.render_prompt("a red circle moving right", seed) for seed in range(3)]
    results = score_outputs("toy_semantic", videos, model, prompts=["a red circle moving right"] * 3)
    assert [set(row) for row in results] == [set(toy_semantic.OUTPUTS)] * 3
    assert all(row["toy_semantic"] == pytest.approx((row["toy_colour"] + row["toy_direction"]) / 2) for row in results)
    with pytest.raises(ValueError, match="needs the prompt"):
        score_outputs("toy_semantic", videos, model, prompts=None)
    with pytest.raises(ValueError, match="not a toy prompt"):
        score_outputs("toy_semantic", videos[:1], model, prompts=["a corgi on the beach"])


def test_saved_classifier_loads_through_the_scorer_registry(tmp_path: Path):
    model = toy_semantic.tiny_model()
    toy_semantic.save_classifier(model, tmp_path / "classifier")
    loaded = load_scorer_model("toy_semantic", ModelSpec(weights=str(tmp_path / "classifier")))
    video = world.render_prompt("a green cross moving up", seed=0)
    expected = score_outputs("toy_semantic", [video], model, prompts=["a green cross moving up"])
    assert score_outputs("toy_semantic", [video], loaded, prompts=["a green cross moving up"]) == expected
    with pytest.raises(ValueError, match="no weights for toy_semantic"):
        ScorerConfig(dimensions=["toy_semantic"])


def test_omniscore_over_configured_dimensions_is_the_same_formula():
    raw = {"temporal_flickering": 0.9, "toy_semantic": 0.5, "subject_consistency": 0.2}
    quality = (0.9 - 0.6293) / (1.0 - 0.6293)  # VBench min/max of temporal flickering
    expected = (4 * quality + 0.5) / 5
    assert omniscore(raw, "v", ["temporal_flickering"], ["toy_semantic"]) == pytest.approx(expected, rel=1e-12)
    assert "toy_semantic" not in VBENCH_QUALITY_DIMENSIONS + VBENCH_SEMANTIC_DIMENSIONS  # never VBench
    with pytest.raises(ValueError, match="unknown dimension"):
        OmniScoreConfig(quality=["temporal_flickering"], semantic=["toy_nonsense"])


def test_scorer_actor_computes_the_toy_omniscore():
    config = ToyWorldConfig().scorer_config("/unused").model_copy(update={"models": {}, "tiny": True})
    scorer = OmniScorer(config)
    prompt = "a yellow diamond moving left"
    video = encode_mp4(world.render_prompt(prompt, seed=5), fps=8)
    row = scorer({"sample_id": np.array(["s0"]), "prompt_id": np.array(["p0"]), "prompt": np.array([prompt]),
                  "video": np.array([video], dtype=object)})
    raw = {key: float(row[key][0]) for key in ("temporal_flickering", "toy_semantic")}
    assert row["failed_reason"][0] is None
    assert float(row["omniscore"][0]) == omniscore(raw, "s0", ["temporal_flickering"], ["toy_semantic"])


def test_pipeline_toy_section_supplies_prompts_model_scorer_and_held_out_prompts():
    from jobs.pipeline import DEMO_CONFIG
    from videodpo_ray.stages.pipeline import load_pipeline_config, train_config

    config = load_pipeline_config(DEMO_CONFIG, ["out=/tmp/toy-elsewhere"])
    toy = ToyWorldConfig()
    train, held_out = toy_prompts(toy)
    assert config.prompts == train and config.evaluate is not None and config.evaluate.prompts == held_out
    assert config.model.path == toy.base_model_url("/tmp/toy-elsewhere")
    assert config.model.path.startswith("/tmp/toy-elsewhere/toy/base-")
    assert config.generate.scorer.models["toy_semantic"].weights == toy.classifier_url("/tmp/toy-elsewhere")
    omniscore_dimensions = OmniScoreConfig(quality=["temporal_flickering"], semantic=["toy_semantic"])
    assert config.generate.scorer.omniscore == omniscore_dimensions
    trained = train_config(config)  # the train model is the pipeline's: the toy base the pipeline pretrains
    assert trained.model.path == config.model.path and trained.data.pairs_url == "/tmp/toy-elsewhere"
    for given in ("prompts=[a red square moving left]", "model.path=/elsewhere", "evaluate.prompts=[x]"):
        with pytest.raises(ConfigError, match="the toy world supplies"):
            load_pipeline_config(DEMO_CONFIG, ["out=/tmp/toy-elsewhere", given])
