"""The evaluate path's inputs and outputs without Ray: held-out prompts checked before any stage, prompt limits,
training-data overlap, safe gallery and sample file names, JSON without NaN, and `status` of an evaluate output."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tiny_pipeline import TINY_CONFIG
from typer.testing import CliRunner

from videodpo_ray import shards
from videodpo_ray.cli import app
from videodpo_ray.errors import ConfigError, PromptFileError
from videodpo_ray.stages.evaluate import EvaluateConfig, summarize
from videodpo_ray.stages.prompts import PromptRow, read_prompts

HOSTILE_IDS = ["x' onerror='alert(document.cookie)", "../../../outside", "clip#1", "a/b", "a?b"]


class Reached(Exception):
    """A replaced stage was called: the checks before it passed."""


@pytest.fixture()
def stages_run(monkeypatch) -> list[str]:
    """jobs.pipeline with every stage replaced by a recorder that fails the test once called."""
    import jobs.pipeline as pipeline

    calls: list[str] = []

    def stage(name: str):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the inputs were checked")

        return record

    for name in ("prepare_toy_world", "generate", "make_pairs", "run_training", "evaluate"):
        monkeypatch.setattr(pipeline, name, stage(name))
    return calls


def test_held_out_prompts_are_read_and_checked_before_any_stage(tmp_path, stages_run):
    from jobs.pipeline import run_pipeline
    from videodpo_ray.stages.pipeline import load_pipeline_config

    missing = load_pipeline_config(TINY_CONFIG, [f"out={tmp_path / 'a'}", f"evaluate.prompts={tmp_path / 'no.txt'}"])
    with pytest.raises(PromptFileError, match="no.txt: prompts file not found"):
        run_pipeline(missing)
    too_long = load_pipeline_config(TINY_CONFIG, [f"out={tmp_path / 'b'}", "generate.max_prompt_chars=20",
                                                  "prompts=[a cat]", "evaluate.prompts=[a dog running on a beach]"])
    with pytest.raises(PromptFileError, match="item 0: prompt of 24 characters, over the limit of 20"):
        run_pipeline(too_long)
    overlapping = load_pipeline_config(TINY_CONFIG, [
        f"out={tmp_path / 'c'}", "prompts=[a corgi, a red car, a boat, a fox, a kite]",
        "evaluate.prompts=[a fox, a corgi, a lamp, a boat, a kite]",
    ])
    with pytest.raises(ConfigError, match=r"4 of 5 held-out prompt\(s\) are training prompts too \(000000 'a fox', "
                                          r"000001 'a corgi', 000003 'a boat', \.\.\.\)"):
        run_pipeline(overlapping)
    assert stages_run == [] and not (tmp_path / "c").exists()  # nothing written before every check passed


def test_inline_prompts_an_earlier_run_recorded_are_never_overwritten(tmp_path, stages_run):
    from jobs.pipeline import run_pipeline
    from videodpo_ray.stages.pipeline import (
        HELD_OUT_PROMPTS,
        TRAINING_PROMPTS,
        load_pipeline_config,
        read_pipeline_prompts,
    )

    def config(prompts: str):
        return load_pipeline_config(TINY_CONFIG, [f"out={tmp_path}", f"prompts={prompts}", "evaluate.prompts=[a kite]"])

    recorded = tmp_path / TRAINING_PROMPTS
    read_pipeline_prompts(config("[a corgi, a fox]"))  # the first run wrote them
    first = recorded.read_bytes()
    assert read_pipeline_prompts(config("[a corgi, a fox]")).training_url == str(recorded)  # a rerun: the same file
    with pytest.raises(ConfigError, match=rf"{recorded}: an earlier run of this output was given other inline "
                                          "prompts"):
        run_pipeline(config("[a corgi, a red car]"))
    assert recorded.read_bytes() == first and stages_run == []
    recorded.unlink()  # the held-out prompts differ: the training ones are not written either
    held_out = load_pipeline_config(TINY_CONFIG, [f"out={tmp_path}", "prompts=[a corgi, a fox]",
                                                  "evaluate.prompts=[a lamp]"])
    with pytest.raises(ConfigError, match=rf"{tmp_path / HELD_OUT_PROMPTS}: an earlier run"):
        read_pipeline_prompts(held_out)
    assert not recorded.exists()


def test_the_pipeline_gives_evaluate_its_prompt_limit():
    from videodpo_ray.stages.pipeline import load_pipeline_config

    config = load_pipeline_config(TINY_CONFIG, ["generate.max_prompt_chars=8000"])
    evaluated = config.evaluate_config("held-out.jsonl", 0, "run")
    assert evaluated.max_prompt_chars == 8000
    assert evaluated.generate_config("base", None).max_prompt_chars == 8000


def write_generate_output(root: Path, prompts: list[str], video: bytes = b"mp4") -> None:
    """One committed samples shard (and its scores) of `prompts`, sample 0 each."""
    rows = [{"sample_id": f"{index:06d}-0", "prompt_id": f"{index:06d}", "prompt": prompt, "seed": 0,
             "video": video, "fps": 8, "model": "vc2/tiny"} for index, prompt in enumerate(prompts)]
    shards.write_shard(shards.make_table("samples", rows), str(root), "samples", 0)


def standalone_config(tmp_path: Path, prompts: list[str], **settings) -> EvaluateConfig:
    path = tmp_path / "held-out.txt"
    path.write_text("\n".join(prompts) + "\n")
    return EvaluateConfig(out=str(tmp_path / "eval"), prompts=str(path), tuned=str(tmp_path / "run"),
                          scorer={"tiny": True}, **settings)


@pytest.fixture()
def no_generate(monkeypatch) -> list[str]:
    """jobs.evaluate's generate stage replaced by a recorder that stops the job once called."""
    import jobs.evaluate

    calls: list[str] = []

    def record(config, prompts):
        calls.append(config.out)
        raise Reached(config.out)

    monkeypatch.setattr(jobs.evaluate, "generate", record)
    monkeypatch.setattr(jobs.evaluate.ckpt, "export_url_of", lambda url: url + "/export")
    return calls


def test_standalone_evaluate_reads_prompts_with_its_limit(tmp_path, no_generate):
    from jobs.evaluate import evaluate

    long_prompt = "a cat " * 900
    with pytest.raises(PromptFileError, match="over the limit of 4096"):
        evaluate(standalone_config(tmp_path, [long_prompt]))
    with pytest.raises(Reached):
        evaluate(standalone_config(tmp_path, [long_prompt], max_prompt_chars=8000))
    assert len(no_generate) == 1


def test_standalone_evaluate_checks_its_training_data_first(tmp_path, no_generate):
    from jobs.evaluate import evaluate

    typo = tmp_path / "typo"
    with pytest.raises(ConfigError, match=f"training_data {typo}: does not exist"):
        evaluate(standalone_config(tmp_path, ["a fox"], training_data=str(typo)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no committed samples or pairs shards; not a generate/pair output"):
        evaluate(standalone_config(tmp_path, ["a fox"], training_data=str(tmp_path / "empty")))
    write_generate_output(tmp_path / "data", ["a corgi", "a fox"])
    with pytest.raises(ConfigError, match=r"1 of 2 held-out prompt\(s\) are training prompts too \(000001 'a fox'\)"):
        evaluate(standalone_config(tmp_path, ["a lamp", "a fox"], training_data=str(tmp_path / "data")))
    assert no_generate == []
    with pytest.raises(Reached):
        evaluate(standalone_config(tmp_path, ["a lamp", "a kite"], training_data=str(tmp_path / "data")))


class Attributes(HTMLParser):
    """Every <img> tag's attributes, as a browser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def test_gallery_names_are_flat_unique_and_every_attribute_is_escaped(tmp_path):
    from videodpo_ray.stages.evaluate_report import write_report
    from videodpo_ray.video import encode_mp4

    video = encode_mp4(np.zeros((4, 16, 16, 3), dtype=np.uint8), 8)
    prompts = [PromptRow(prompt_id, f"prompt {index} <script>'\"") for index, prompt_id in enumerate(HOSTILE_IDS)]
    out = tmp_path / "eval" / "run"
    results = []
    for which in ("base", "tuned"):
        rows = [{"sample_id": f"{p.prompt_id}-0", "prompt_id": p.prompt_id, "prompt": p.prompt, "seed": 7,
                 "video": video, "fps": 8, "model": which} for p in prompts]
        shards.write_shard(shards.make_table("samples", rows), str(out / which), "samples", 0)
        results += [{"model": which, "prompt_id": p.prompt_id, "sample_index": 0, "seed": 7, "omniscore": 0.5}
                    for p in prompts]
    summary = summarize(pa.Table.from_pylist(
        [{**row, "prompt": "p", "failed_reason": None} for row in results]
    ))
    page_url = write_report(str(out), summary, results, prompts, run_url=None, training_data=None, gallery_prompts=9)

    page = Path(page_url).read_text()
    parser = Attributes()
    parser.feed(page)
    gifs = [image["src"] for image in parser.images if image["src"].endswith(".gif")]
    assert len(gifs) == 2 * len(HOSTILE_IDS) == len(set(gifs))  # a/b and a?b: one sanitised id, two files
    assert gifs[:2] == ["gallery/000-x__onerror__alert_document_cookie_-base.gif",
                        "gallery/000-x__onerror__alert_document_cookie_-tuned.gif"]
    assert all(set(src) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-/.") and src.count("/") == 1 for src in gifs)
    assert all((out / src).is_file() for src in gifs)
    assert {path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*")} == {"eval"}
    assert {path.parent for path in out.rglob("*.gif")} == {out / "gallery"}
    assert [image["alt"] for image in parser.images[:1]] == [f"base: {prompts[0].prompt}"]  # the whole value
    assert "onerror=" not in page.replace("onerror__", "") and "<script>" not in page


def test_sample_file_names_are_flat_for_any_prompt_id(tmp_path):
    from videodpo_ray.models import ModelConfig
    from videodpo_ray.stages.sample import SampleConfig, index_lines, plan_sample

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"dir/clip.mp4": "a cat", "../up.mp4": "a dog", "..": "a bird", "a%2Fb": "a fox"}))
    prompts = read_prompts(str(path))
    config = SampleConfig(prompts=str(path), out=str(tmp_path / "out"), batch_size=1)
    plan = plan_sample(config, prompts)
    files = [item.file for batch in plan.batches for item in batch]
    assert files == ["dir%2Fclip-seed123.mp4", "..%2Fup-seed123.mp4", "..-seed123.mp4", "a%252Fb-seed123.mp4"]
    (tmp_path / "out").mkdir()
    for name in files:  # as jobs/sample.py writes them: storage.join(out, file)
        (tmp_path / "out" / name).write_bytes(b"mp4")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files)
    again = plan_sample(config, prompts)
    assert again.pending == [] and again.num_done() == 4
    index = [json.loads(line) for line in index_lines(config, again, ModelConfig(), None).decode().splitlines()]
    assert [(entry["prompt_id"], entry["file"]) for entry in index] == [
        (prompt.prompt_id, name) for prompt, name in zip(prompts, files)
    ]


def one_prompt_summary() -> dict:
    rows = [{"prompt_id": prompt_id, "prompt": "p", "sample_index": 0, "seed": 0, "model": model,
             "omniscore": score, "failed_reason": None if score is not None else "sample: broken"}
            for prompt_id, model, score in (("A", "base", 0.5), ("A", "tuned", 0.6), ("B", "base", 0.4),
                                            ("B", "tuned", None))]
    return summarize(pa.Table.from_pylist(rows))


def test_a_summary_is_strict_json_and_its_gaps_read_n_a():
    from jobs.evaluate import summary_line
    from videodpo_ray.stages.evaluate_report import render_html

    summary = one_prompt_summary()
    assert summary["num_prompts"] == 1 and summary["num_prompts_unscored"] == 1
    assert summary["omniscore_gain_se"] is None and summary["omniscore_gain_ci95"] == [None, None]
    assert summary["omniscore_gain_mean"] == pytest.approx(0.1)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    page = render_html(summary, {}, [], [])
    assert "1 held-out prompts x 1 seeds (1 more prompt(s) left out: no seed scored by both models)" in page
    assert "+/- n/a (standard error)" in page and "nan" not in page.lower()
    line = summary_line({**summary, "report": "index.html"})
    assert "over 1 prompts (1 more prompt(s) left out: no seed scored by both models)" in line and "+/- n/a;" in line


def test_the_pipeline_report_shows_dropped_prompts_and_missing_values():
    from videodpo_ray.stages.pipeline import render_markdown

    summary = one_prompt_summary()
    report = {
        "out": "/run", "model": {"family": "vc2", "variant": "tiny", "path": None}, "seconds": {"total": 1.0},
        "generate": {"prompts": 2, "samples_per_prompt": 2, "chunks": 1, "chunks_sampled": 1, "chunks_rescored": 0,
                     "chunks_skipped": 0, "failures": []},
        "pairs": {"pairs": 1, "scored_samples": 4, "unscored_samples": 0, "prompts_without_pair": 1,
                  "omniscore": None, "score_gap": None, "weight": None, "shards": {"num_shards": 1}},
        "train": {"status": "done"},
        "evaluate": {**summary, "report": "/run/evaluate/dpo/index.html"},
    }
    markdown = render_markdown(report)
    assert "over 1 prompts (1 more prompt(s) left out: no seed scored by both models)" in markdown
    assert "(gain +0.1000 +/- n/a)" in markdown and "95% CI [0.207, 1.000]" in markdown


def test_status_reports_a_standalone_evaluation_and_a_missing_path(tmp_path):
    from videodpo_ray.stages.status import render_status, run_status

    root = tmp_path / "ev"
    write_generate_output(root / "base", ["a fox"])
    shards.write_shard(shards.make_table("scores", [{"sample_id": "000000-0", "prompt_id": "000000",
                                                      "omniscore": 0.5}]), str(root / "base"), "scores", 0)
    assert render_status(run_status(str(root))) == (
        f"{root}:\n  evaluate {root}: not summarised yet (base 1 scored sample(s), tuned 0 scored sample(s) committed)"
    )
    (root / "summary.json").write_text(json.dumps(
        {"num_prompts": 4, "num_prompts_unscored": 1, "win_rate": 0.75, "omniscore_gain_mean": None}
    ))
    assert render_status(run_status(str(root))).splitlines()[1] == (
        f"  evaluate {root}: win rate 0.750 over 4 prompts (1 more prompt(s) left out: no seed scored by both "
        "models), OmniScore gain n/a"
    )
    assert render_status(run_status(str(tmp_path / "typo"))) == (
        f"{tmp_path / 'typo'}:\n  nothing committed: no such file or directory (check the path)"
    )
    typo = CliRunner().invoke(app, ["status", str(tmp_path / "typo")])
    assert typo.exit_code == 2 and "no such file or directory" in typo.output
    assert CliRunner().invoke(app, ["status", str(root)]).exit_code == 0
