"""The evaluate stage: summary arithmetic by hand, and a real run of a tiny VC2 base against a tuned export."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.omniscore import normalise
from videodpo_ray.scoring import ScorerConfig
from videodpo_ray.stages.evaluate import score_columns, student_t_quantile, summarize, wilson_interval
from videodpo_ray.training import checkpoint as ckpt

# prompt -> (base omniscores, tuned omniscores, base flickering, tuned flickering) over two seeds
HAND = {
    "A": ([0.5, 0.6], [0.7, 0.6], [0.90, 0.92], [0.95, 0.97]),  # gain +0.1: a win
    "B": ([0.4, 0.4], [0.3, 0.3], [0.90, 0.90], [0.80, 0.80]),  # gain -0.1: a loss
    "C": ([0.5, 0.5], [0.5, 0.5], [0.90, 0.90], [0.90, 0.90]),  # gain 0: a tie, half a win
}


def hand_results(failed: bool = False) -> pa.Table:
    rows = []
    for prompt, (base, tuned, base_flicker, tuned_flicker) in HAND.items():
        for k in range(2):
            for model, scores, flicker in (("base", base, base_flicker), ("tuned", tuned, tuned_flicker)):
                rows.append({"prompt_id": prompt, "prompt": f"prompt {prompt}", "sample_index": k, "seed": k,
                             "model": model, "temporal_flickering": flicker[k], "omniscore": scores[k],
                             "failed_reason": None})
    if failed:  # a third, failed sample of prompt A on the tuned side: left out of every mean
        rows.append({"prompt_id": "A", "prompt": "prompt A", "sample_index": 2, "seed": 2, "model": "tuned",
                     "temporal_flickering": None, "omniscore": None, "failed_reason": "decode: broken"})
    return pa.Table.from_pylist(rows)


def test_summary_arithmetic_by_hand_on_three_prompts():
    summary = summarize(hand_results(failed=True))
    assert summary["num_prompts"] == 3 and summary["num_prompts_unscored"] == 0
    assert summary["win_rate"] == pytest.approx(1.5 / 3)
    # Wilson, p = 0.5, n = 3, z = 1.96: centre 0.5, half width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 3 + z * z / 36) / (1 + z * z / 3)
    assert summary["win_rate_ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    assert summary["win_rate_ci95"] == pytest.approx([0.125334, 0.874666], abs=1e-6)
    assert summary["omniscore_gain_mean"] == pytest.approx(0.0, abs=1e-12)
    assert summary["omniscore_gain_se"] == pytest.approx(0.1 / math.sqrt(3))  # stdev(0.1, -0.1, 0) = 0.1
    assert summary["omniscore_before"] == pytest.approx((0.55 + 0.4 + 0.5) / 3)
    flicker = summary["dimensions"]["temporal_flickering"]
    assert flicker["before"] == pytest.approx((0.91 + 0.90 + 0.90) / 3)
    assert flicker["after"] == pytest.approx((0.96 + 0.80 + 0.90) / 3)
    differences = [0.05, -0.10, 0.0]
    se = statistics.stdev(differences) / math.sqrt(3)
    t = 4.302652729749464  # Student's t, 0.975 quantile, 2 degrees of freedom (3 prompts)
    assert flicker["difference_ci95"] == pytest.approx([statistics.fmean(differences) - t * se,
                                                       statistics.fmean(differences) + t * se])
    assert flicker["after_normalised"] == pytest.approx(normalise("temporal_flickering", flicker["after"]))
    vbench = summary["vbench"]["tuned"]
    assert vbench["quality"] == pytest.approx(normalise("temporal_flickering", flicker["after"]))
    assert vbench["semantic"] is None and "total" not in vbench and "overall_consistency" in vbench["missing"]


@pytest.mark.parametrize("df, quantile", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389),
                                          (30, 2.0422725), (1000, 1.9623391)])
def test_student_t_quantiles_match_the_tables(df: int, quantile: float):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-7)


def test_vbench_quality_uses_vbench_dynamic_degree_and_the_table_omniscore_s():
    """The per-dimension table shows the fraction of moving pairs OmniScore uses; VBench Quality its 1/0 value."""
    rows = [{"prompt_id": "A", "prompt": "prompt A", "sample_index": 0, "seed": 0, "model": model,
             "dynamic_degree": fraction, "dynamic_degree_vbench": moving, "omniscore": 0.5, "failed_reason": None}
            for model, fraction, moving in (("base", 0.25, 1.0), ("tuned", 0.5, 0.0))]
    summary = summarize(pa.Table.from_pylist(rows))
    columns = score_columns(ScorerConfig(tiny=True, dimensions=["dynamic_degree", "temporal_flickering"]))
    assert columns == ["temporal_flickering", "dynamic_degree", "dynamic_degree_vbench"]  # the results table keeps it
    assert summary["dimensions"]["dynamic_degree"]["before"] == 0.25
    assert summary["dimensions"]["dynamic_degree"]["after"] == 0.5
    assert summary["vbench"]["base"]["quality"] == 1.0 and summary["vbench"]["tuned"]["quality"] == 0.0


def test_a_seed_failed_on_one_side_is_left_out_of_both():
    """Base and tuned are compared on the same seeds: prompt A's base sample 0 failed, so A compares seed 1 alone
    (0.6 vs 0.6: a tie), not the tuned mean of both seeds (0.65, a win) against base seed 1."""
    rows = hand_results().to_pylist()
    failed = next(row for row in rows if (row["prompt_id"], row["sample_index"], row["model"]) == ("A", 0, "base"))
    failed.update(omniscore=None, temporal_flickering=None, failed_reason="sample: CUDA out of memory")
    summary = summarize(pa.Table.from_pylist(rows))
    assert summary["num_prompts"] == 3
    assert summary["win_rate"] == pytest.approx(1.0 / 3)  # A ties, B loses, C ties
    assert summary["omniscore_gain_mean"] == pytest.approx(-0.1 / 3)
    assert summary["omniscore_after"] == pytest.approx((0.6 + 0.3 + 0.5) / 3)
    assert summary["dimensions"]["temporal_flickering"]["after"] == pytest.approx((0.97 + 0.80 + 0.90) / 3)


def test_win_rate_interval_edges():
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))  # no prompts, no interval
    low, high = wilson_interval(64, 64)
    assert high == pytest.approx(1.0) and 0.94 < low < 0.95


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory) -> Path:
    """A tiny VC2 LoRA 'training run': an export whose LoRA factors are perturbed away from the base."""
    run = tmp_path_factory.mktemp("run") / "dpo"
    config = ModelConfig(family="vc2", variant="tiny", finetune="lora", lora={"rank": 4})
    model = build_model(config, seed=0)
    generator = torch.Generator().manual_seed(0)
    tuned = {
        name: t + 0.2 * torch.randn(t.shape, generator=generator) for name, t in model.trainable_state_dict().items()
    }
    ckpt.write_export(tuned, config, str(run / "export"), step=4, dtype="float32", init_seed=0)
    return run


def evaluate_config(out: Path, prompts: Path, run: Path) -> list[str]:
    return [
        f"out={out}",
        f"prompts={prompts}",
        f"tuned={run}",
        "model.family=vc2",
        "model.variant=tiny",
        "model.finetune=lora",
        "model.lora.rank=4",
        "samples_per_prompt=2",
        "prompts_per_chunk=2",
        "sampling.num_frames=8",
        "sampling.height=32",
        "sampling.width=32",
        "sampling.num_inference_steps=2",
        "scorer.tiny=true",
        "gallery_prompts=2",
    ]


PROMPTS = ["a cat playing piano", "a red car on a bridge", "fireworks over a lake"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_vbench_prompt_lists_are_prompt_files(tmp_path):
    from videodpo_ray.stages.prompts import read_prompts

    (tmp_path / "overall_consistency.txt").write_text("\n".join(PROMPTS) + "\n")  # VBench's per-dimension lists
    assert [row.prompt for row in read_prompts(str(tmp_path / "overall_consistency.txt"))] == PROMPTS


@pytest.fixture(scope="module")
def evaluated(ray_cluster, tmp_path_factory, tuned_run) -> Path:
    """One evaluate run on VBench_full_info.json (prompt_en + dimension per entry); returns its output root."""
    from jobs.evaluate import main

    directory = tmp_path_factory.mktemp("evaluate")
    path = directory / "VBench_full_info.json"
    path.write_text(json.dumps([{"prompt_en": p, "dimension": ["overall_consistency"]} for p in PROMPTS]))
    (directory / "evaluate.yaml").write_text("{}\n")
    assert main([str(directory / "evaluate.yaml"), *evaluate_config(directory / "eval", path, tuned_run)]) == 0
    return directory


def test_evaluate_a_tiny_base_against_its_tuned_export(evaluated, tuned_run):
    from jobs.evaluate import main

    out = evaluated / "eval"
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert len(results) == 3 * 2 * 2
    assert {(r["prompt_id"], r["sample_index"]) for r in results if r["model"] == "base"} == {
        (r["prompt_id"], r["sample_index"]) for r in results if r["model"] == "tuned"
    }
    base_seeds = {(r["prompt_id"], r["sample_index"]): r["seed"] for r in results if r["model"] == "base"}
    assert all(base_seeds[(r["prompt_id"], r["sample_index"])] == r["seed"] for r in results)  # same seeds
    summary = json.loads((out / "summary.json").read_text())
    by_hand = {}
    for which in ("base", "tuned"):
        for prompt_id in {r["prompt_id"] for r in results}:
            scores = [r["omniscore"] for r in results if r["model"] == which and r["prompt_id"] == prompt_id]
            by_hand[(which, prompt_id)] = sum(scores) / len(scores)
    gains = [by_hand[("tuned", p)] - by_hand[("base", p)] for p in {r["prompt_id"] for r in results}]
    assert summary["num_prompts"] == 3
    assert summary["win_rate"] == pytest.approx(sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gains) / 3)
    assert summary["omniscore_gain_mean"] == pytest.approx(statistics.fmean(gains))
    assert summary["omniscore_gain_se"] == pytest.approx(statistics.stdev(gains) / math.sqrt(3))
    assert set(summary["dimensions"]) >= {"subject_consistency", "overall_consistency", "imaging_quality"}
    assert summary["vbench"]["base"]["total"] is not None and "object_class" in summary["vbench"]["base"]["missing"]
    page = (out / "index.html").read_text()
    assert "Win rate" in page and page.count("<figure>") == 4 and "gallery/" in page
    assert all((out / name).is_file() for name in ("gallery/000-000000-base.gif", "gallery/000-000000-tuned.gif"))

    # a rerun redoes nothing: every chunk of both sides is already committed
    before = {p: p.stat().st_mtime_ns for p in (out / "base" / "samples").iterdir()}
    arguments = evaluate_config(out, evaluated / "VBench_full_info.json", tuned_run)
    assert main([str(evaluated / "evaluate.yaml"), *arguments]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "base" / "samples").iterdir()} == before
    assert json.loads((out / "summary.json").read_text())["win_rate"] == summary["win_rate"]


def test_the_report_renders_in_chromium_with_every_image(evaluated):
    from browser import render

    rendered = render(evaluated / "eval" / "index.html", ARTIFACTS / "evaluate-index.png")
    assert rendered.tables == 2
    assert len(rendered.images) == 4 and all(image["loaded"] for image in rendered.images), rendered.images
    assert rendered.console_errors == []
    assert (ARTIFACTS / "evaluate-index.png").stat().st_size > 10_000
