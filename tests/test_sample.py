"""`videodpo-ray sample`: prompt formats and families, determinism, tuned exports, resume, failures, recorded settings
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from videodpo_ray.cli import app
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models import ModelConfig, build_model, families
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.video import decode_mp4, encode_mp4

FAST = ["sampling.num_inference_steps=2"]
PROMPTS = ["a red square moving left", "a blue circle moving up"]


def prompt_files(directory: Path) -> dict[str, tuple[Path, list[str]]]:
    """The same two prompts as txt, json list and json dict, with the prompt ids each format gives."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "p.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    (directory / "p-list.json").write_text(json.dumps(PROMPTS))
    (directory / "p-dict.json").write_text(json.dumps({"square.mp4": PROMPTS[0], "circle.mp4": PROMPTS[1]}))
    return {
        "txt": (directory / "p.txt", ["000000", "000001"]),
        "json-list": (directory / "p-list.json", ["000000", "000001"]),
        "json-dict": (directory / "p-dict.json", ["square", "circle"]),
    }


def sample(*arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sample", *arguments])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def read_index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", families())
def test_every_family_samples_from_every_prompt_format(family, tmp_path, single_torch_thread):
    for kind, (path, ids) in prompt_files(tmp_path / "prompts").items():
        out = tmp_path / kind
        code, output = sample("--model", family, "--prompts", str(path), "--out", str(out), "--samples-per-prompt",
                              "2", "--seed", "7", *FAST)
        assert code == 0, output
        assert "2 prompts, 4 video(s) written, 0 already there (local)" in output
        expected = [f"{prompt_id}-seed{seed}.mp4" for prompt_id in ids for seed in (7, 8)]
        index = read_index(out)
        assert [entry["file"] for entry in index] == expected
        assert sorted(p.name for p in out.glob("*.mp4")) == sorted(expected)
        assert [entry["prompt"] for entry in index] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
        assert {entry["batch_size"] for entry in index} == {4} and index[0]["model"] == f"{family}/tiny"
        assert index[0]["sampling"]["num_inference_steps"] == 2
        frames, fps = decode_mp4((out / expected[0]).read_bytes())
        assert frames.dtype == torch.uint8 and frames.ndim == 4 and fps == 8


def test_same_seed_and_batch_size_give_identical_files_with_ray_or_without(ray_cluster, tmp_path):
    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    common = ["--model", "vc2", "--prompts", str(path), "--samples-per-prompt", "3", "--seed", "1", *FAST]
    code, output = sample(*common, "--out", str(tmp_path / "local"), "batch_size=2")
    assert code == 0, output
    code, output = sample(*common, "--out", str(tmp_path / "ray"), "--ray", "batch_size=2", "sampler_pool.max_actors=2")
    assert code == 0 and "(ray)" in output, output
    code, output = sample(*common, "--out", str(tmp_path / "batch3"), "batch_size=3")
    assert code == 0, output
    files = sorted(p.name for p in (tmp_path / "local").glob("*.mp4"))
    assert len(files) == 6 and files == sorted(p.name for p in (tmp_path / "ray").glob("*.mp4"))
    for name in files:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
        # another batch size: the same videos up to float rounding in batched GEMMs and the h264 round trip
        a = decode_mp4((tmp_path / "local" / name).read_bytes())[0].int()
        b = decode_mp4((tmp_path / "batch3" / name).read_bytes())[0].int()
        assert (a - b).abs().max() <= 2, name
    assert {entry["batch_size"] for entry in read_index(tmp_path / "batch3")} == {3}


def test_a_tuned_export_samples_the_tuned_weights(tmp_path, single_torch_thread):
    config = ModelConfig(family="vc2", variant="tiny", finetune="lora", lora={"rank": 4})
    model = build_model(config, seed=3)
    tuned = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in model.trainable_state_dict().items()}
    run = tmp_path / "run"
    ckpt.write_export(tuned, config, str(run / "export"), step=1, dtype="float32", init_seed=3)
    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    common = ["--model", "vc2", "--prompts", str(path), *FAST]
    assert (
        sample(*common, "--out", str(tmp_path / "base"), "init_seed=3", "model.finetune=lora", "model.lora.rank=4")[0]
        == 0
    )
    code, output = sample(*common, "--out", str(tmp_path / "tuned"), "--tuned", str(run), "gif=true")
    assert code == 0, output
    name = "000000-seed123.mp4"
    gif = (tmp_path / "tuned" / "000000-seed123.gif").read_bytes()
    assert gif.startswith(b"GIF89a") and read_index(tmp_path / "tuned")[0]["gif"] == "000000-seed123.gif"
    assert (tmp_path / "tuned" / name).read_bytes() != (tmp_path / "base" / name).read_bytes()
    model.load_trainable_state_dict(tuned)
    with torch.no_grad():
        expected = model.eval().sample(PROMPTS, [123, 123], num_inference_steps=2)[0]  # the sampled batch
    assert (tmp_path / "tuned" / name).read_bytes() == encode_mp4(expected, fps=8)  # the encoder is deterministic
    assert read_index(tmp_path / "tuned")[0]["tuned"] == str(run / "export")


def test_an_interrupted_ray_run_resumes_with_only_the_missing_files(ray_cluster, tmp_path, monkeypatch):
    import jobs.sample

    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    arguments = ["--model", "vc2", "--prompts", str(path), "--samples-per-prompt", "3", *FAST, "batch_size=2"]
    assert sample(*arguments, "--out", str(tmp_path / "whole"))[0] == 0
    real_write = jobs.sample.storage.write_bytes_atomic
    written: list[str] = []

    def crash_after_three(url: str, data: bytes) -> None:
        if url.endswith(".mp4"):
            if len(written) == 3:
                raise KeyboardInterrupt  # the run is killed
            written.append(url)
        real_write(url, data)

    monkeypatch.setattr(jobs.sample.storage, "write_bytes_atomic", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        jobs.sample.run_sample(
            jobs.sample.SampleConfig(
                model=ModelConfig(family="vc2"),
                prompts=str(path),
                out=str(tmp_path / "out"),
                samples_per_prompt=3,
                batch_size=2,
                sampling={"num_inference_steps": 2},
            )
        )
    monkeypatch.setattr(jobs.sample.storage, "write_bytes_atomic", real_write)
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 3
    code, output = sample(*arguments, "--out", str(tmp_path / "out"), "--ray")
    assert code == 0, output
    assert "3 video(s) written, 3 already there (ray)" in output
    for name in sorted(p.name for p in (tmp_path / "whole").glob("*.mp4")):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_failing_prompt_is_reported_not_written_and_a_rerun_retries_it(tmp_path, monkeypatch, single_torch_thread):
    from actors.sampler import SamplerActor

    real_sample = SamplerActor.sample

    def sample_or_fail(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if any("poison" in prompt for prompt in prompts):
            raise ValueError("cannot sample a poison prompt")
        return real_sample(self, prompts, seeds)

    monkeypatch.setattr(SamplerActor, "sample", sample_or_fail)
    (tmp_path / "p.txt").write_text("a red square moving left\na poison prompt\n")
    out = tmp_path / "out"
    arguments = ["--model", "vc2", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--samples-per-prompt",
                 "2", *FAST]
    code, output = sample(*arguments)
    assert code == 1, output
    assert "2 video(s) written, 0 already there" in output and "2 sample(s) failed and were not written" in output
    # one batch of 4 tried twice, then each row alone (the poison twice): 4 sampler calls
    assert "000001 'a poison prompt' sample 1 (seed 124) [4 attempts]: ValueError: cannot sample a poison" in output
    good = ["000000-seed123.mp4", "000000-seed124.mp4"]
    assert [entry["file"] for entry in read_index(out)] == good and sorted(p.name for p in out.glob("*.mp4")) == good
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["file"], f["sample_index"], f["attempts"]) for f in failures] == [
        ("000001-seed123.mp4", 0, 4), ("000001-seed124.mp4", 1, 4)
    ]
    assert failures[0]["error"] == "ValueError: cannot sample a poison prompt"

    monkeypatch.setattr(SamplerActor, "sample", real_sample)  # the poison is gone: a rerun makes the failed ones
    code, output = sample(*arguments)
    assert code == 0 and "2 video(s) written, 2 already there" in output, output
    assert len(read_index(out)) == 4 and len(list(out.glob("*.mp4"))) == 4
    assert (out / "failures.jsonl").read_text() == ""


def test_a_rerun_with_other_settings_is_refused_naming_the_field(tmp_path, single_torch_thread):
    config = ModelConfig(family="vc2", variant="tiny", finetune="lora", lora={"rank": 4})
    model = build_model(config, seed=3)
    run = tmp_path / "run"
    ckpt.write_export(model.trainable_state_dict(), config, str(run / "export"), step=1, dtype="float32", init_seed=3)
    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    out = tmp_path / "out"
    arguments = ["--model", "vc2", "--prompts", str(path), "--out", str(out), *FAST]
    assert sample(*arguments, "--tuned", str(run))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert json.loads(before["sample.json"])["tuned_export"]["step"] == 1
    assert json.loads(before["sample.json"])["video_encoding"]["macroblock_tree"] is False
    assert json.loads(before["sample.json"])["file_names"] == "{percent-encoded prompt id}-seed{seed}.mp4"
    changes = [
        (["--tuned", str(run), "sampling.num_inference_steps=1"], "sampling"),
        (["--tuned", str(run), "sampling.fps=16"], "sampling"),
        (["--tuned", str(run), "batch_size=2"], "batch_size"),
        (["--tuned", str(run), "--seed", "5"], "seed"),
        (["--tuned", str(run), "--samples-per-prompt", "2"], "samples_per_prompt"),
        ([], "tuned"),  # the base model
    ]
    for extra, key in changes:
        code, output = sample(*arguments, *extra)
        assert code == 2 and "other settings" in output and f"{key}: recorded" in output, (extra, output)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the actor count is not a setting: the same settings resume
    code, output = sample(*arguments, "--tuned", str(run), "sampler_pool.max_actors=2")
    assert code == 0 and "0 video(s) written, 2 already there" in output, output
    # another export at the same URL
    tuned = {name: tensor + 0.05 for name, tensor in model.trainable_state_dict().items()}
    ckpt.write_export(tuned, config, str(run / "export"), step=2, dtype="float32", init_seed=3)
    code, output = sample(*arguments, "--tuned", str(run))
    assert code == 2 and "tuned_export: recorded" in output, output


def test_a_rerun_with_gif_writes_the_missing_gifs(tmp_path, single_torch_thread):
    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    out = tmp_path / "out"
    arguments = ["--model", "vc2", "--prompts", str(path), "--out", str(out), *FAST]
    assert sample(*arguments)[0] == 0
    videos = {p.name: p.read_bytes() for p in out.glob("*.mp4")}
    assert [entry["gif"] for entry in read_index(out)] == [None, None]
    code, output = sample(*arguments, "gif=true")
    assert code == 0 and "2 video(s) written, 0 already there" in output, output
    gifs = ["000000-seed123.gif", "000001-seed123.gif"]
    assert [entry["gif"] for entry in read_index(out)] == gifs
    assert all((out / name).read_bytes().startswith(b"GIF89a") for name in gifs)
    assert {p.name: p.read_bytes() for p in out.glob("*.mp4")} == videos  # the mp4s stay as they were
    gif = (out / gifs[1]).read_bytes()
    (out / gifs[1]).unlink()  # a run killed between the mp4 and the gif
    code, output = sample(*arguments, "gif=true")
    assert code == 0 and "1 video(s) written, 1 already there" in output, output
    assert (out / gifs[1]).read_bytes() == gif and [entry["gif"] for entry in read_index(out)] == gifs


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path):
    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "broken.json").write_text("[not json")
    (tmp_path / "a-file").write_text("x")
    out = str(tmp_path / "out")
    cases = [
        (["--model", "sora", "--prompts", str(path), "--out", out], "model.family"),
        (
            ["--model", "vc2", "--weights", str(tmp_path / "nowhere"), "--prompts", str(path), "--out", out],
            "nowhere does not exist",
        ),
        (["--model", "vc2", "--prompts", str(tmp_path / "empty.txt"), "--out", out], "empty.txt: no prompts"),
        (["--model", "vc2", "--prompts", str(tmp_path / "broken.json"), "--out", out], "broken.json: not valid JSON"),
        (["--model", "vc2", "--prompts", str(path), "--out", str(tmp_path / "a-file")], "is a file, not a directory"),
    ]
    for arguments, message in cases:
        code, output = sample(*arguments)
        assert code == 2 and message in output, (arguments, output)
    assert not (tmp_path / "out").exists()


def test_a_merged_export_replaces_only_an_earlier_one_and_an_unfinished_one_is_refused(tmp_path):
    config = ModelConfig(family="vc2", variant="tiny", finetune="lora", lora={"rank": 4})
    run = tmp_path / "run"
    ckpt.write_export(build_model(config, seed=5).trainable_state_dict(), config, str(run / "export"), step=3,
                      dtype="float32", init_seed=5)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")  # not a merged export: never replaced
    refused = CliRunner().invoke(app, ["export", str(run), "--merged", "--out", str(merged)])
    assert refused.exit_code == 2 and "not empty and not a merged export" in refused.output
    assert (merged / "notes.txt").read_text() == "mine"

    (merged / "notes.txt").unlink()
    first = CliRunner().invoke(app, ["export", str(run), "--merged", "--out", str(merged)])
    assert first.exit_code == 0, first.output
    (merged / "stale.bin").write_bytes(b"left by an earlier layout")
    again = CliRunner().invoke(app, ["export", str(run), "--merged", "--out", str(merged)])  # replaced as a whole
    assert again.exit_code == 0, again.output
    assert json.loads((merged / ckpt.MERGED_INFO).read_text())["step"] == 3 and not (merged / "stale.bin").exists()
    (merged / "_WRITING").write_bytes(b"")  # as an interrupted upload leaves it
    with pytest.raises(CheckpointError, match=r"merged: its writing did not finish \(_WRITING is there\)"):
        build_model(ModelConfig(family="vc2", variant="tiny", path=str(merged)))


@pytest.mark.parametrize("family", families())
def test_merged_and_unmerged_exports_give_the_same_videos(family, tmp_path, single_torch_thread):
    config = ModelConfig(family=family, variant="tiny", finetune="lora", lora={"rank": 4})
    model = build_model(config, seed=5)
    tuned = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in model.trainable_state_dict().items()}
    run = tmp_path / "run"
    ckpt.write_export(tuned, config, str(run / "export"), step=3, dtype="float32", init_seed=5)

    result = CliRunner().invoke(app, ["export", str(run), "--merged", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = build_model(ModelConfig(family=family, variant="tiny", path=str(tmp_path / "merged")))
    assert not any("lora" in name for name in merged.state_dict())
    unmerged = ckpt.load_exported_model(str(run / "export"))
    size = unmerged.video_size
    with torch.no_grad():
        a = unmerged.eval().sample(PROMPTS, [1, 2], num_inference_steps=2)
        b = merged.eval().sample(PROMPTS, [1, 2], num_inference_steps=2, num_frames=size[0], height=size[1],
                                 width=size[2])
    assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 1  # fp32: W + BA vs the adapter's two matmuls

    path, _ = prompt_files(tmp_path / "prompts")["txt"]
    sizes = [f"sampling.num_frames={size[0]}", f"sampling.height={size[1]}", f"sampling.width={size[2]}"]
    code, output = sample("--model", family, "--weights", str(tmp_path / "merged"), "--prompts", str(path),
                          "--out", str(tmp_path / "videos"), *FAST, *sizes)
    assert code == 0, output
    assert read_index(tmp_path / "videos")[0]["model"] == f"{family}/tiny@{tmp_path / 'merged'}"

    trainable = CliRunner().invoke(app, ["export", str(run), "--trainable", "--out", str(tmp_path / "copy")])
    assert trainable.exit_code == 0, trainable.output
    assert ckpt.load_export(str(tmp_path / "copy"))[1].keys() == tuned.keys()
    missing = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "neither a training run with an export/ nor an export" in missing.output
