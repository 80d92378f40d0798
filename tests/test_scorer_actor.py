"""The OmniScorer actor under Ray Data and the `videodpo-ray score` command, end to end on CPU with tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from actors.scorer import OmniScorer
from videodpo_ray import shards
from videodpo_ray.cli import app
from videodpo_ray.dimensions import OMNISCORE_DIMENSIONS
from videodpo_ray.errors import (
    ConfigError,
    NonFiniteScoreError,
    PromptFileError,
    VideoInputError,
    VideoTooShortError,
)
from videodpo_ray.omniscore import omniscore
from videodpo_ray.scoring import ScorerConfig, temporal_flickering
from videodpo_ray.stages.score import (
    ScoreFilesConfig,
    plan_score,
    prompt_id_for,
    read_prompt_map,
    record_scorer_device,
    video_inputs,
)
from videodpo_ray.video import decode_mp4, encode_mp4


def moving_video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random texture panning right by 3 pixels a frame."""
    texture = np.random.default_rng(seed).integers(0, 256, (height, width + 3 * frames, 3), dtype=np.uint8)
    return np.stack([texture[:, 3 * t : 3 * t + width] for t in range(frames)])


@pytest.fixture(scope="module")
def actor_rows(ray_cluster):
    ray = ray_cluster
    good = encode_mp4(moving_video(16, 320, 512), fps=24)
    items = [
        {"sample_id": "good", "prompt_id": "p0", "prompt": "a panning texture", "video": good},
        {"sample_id": "corrupt", "prompt_id": "p0", "prompt": "a panning texture", "video": good[: len(good) // 3]},
        {
            "sample_id": "two-frames",
            "prompt_id": "p1",
            "prompt": "too short",
            "video": encode_mp4(moving_video(2, 64, 64), fps=8),
        },
    ]
    dataset = ray.data.from_items(items).map_batches(
        OmniScorer,
        fn_constructor_kwargs={"config": ScorerConfig(tiny=True)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=3,
    )
    rows = {row["sample_id"]: row for row in dataset.take_all()}
    return rows, good


def test_actor_scores_a_320x512_video_on_every_omniscore_dimension(actor_rows):
    rows, good = actor_rows
    row = rows["good"]
    assert row["prompt_id"] == "p0" and row["failed_reason"] is None
    raw = {name: row[name] for name in OMNISCORE_DIMENSIONS}
    assert all(math.isfinite(value) for value in raw.values()), raw
    assert row["dynamic_degree_vbench"] in (0.0, 1.0)
    assert 0 <= row["dynamic_degree"] <= 1
    assert row["omniscore"] == omniscore(raw, "good")
    frames, fps = decode_mp4(good)
    assert fps == 24
    assert row["temporal_flickering"] == temporal_flickering.score(frames.numpy())


def test_failing_videos_are_marked_and_the_rest_continue(actor_rows):
    rows, _ = actor_rows
    assert set(rows) == {"good", "corrupt", "two-frames"}
    assert rows["corrupt"]["failed_reason"].startswith("decode: VideoDecodeError: corrupt")
    # two frames pass flickering and subject consistency but not motion smoothness (needs 3)
    assert rows["two-frames"]["failed_reason"].startswith(
        "motion_smoothness: VideoTooShortError: need at least 3 frames"
    )
    for name in ("corrupt", "two-frames"):
        assert all(math.isnan(rows[name][d]) for d in (*OMNISCORE_DIMENSIONS, "omniscore")), rows[name]


def test_score_command_writes_score_shards_and_skips_them_on_rerun(ray_cluster, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(3):
        (videos / f"clip{index}.mp4").write_bytes(encode_mp4(moving_video(9, 64, 96, seed=index), fps=8))
    (videos / "broken.mp4").write_bytes(b"not an mp4")
    (videos / "notes.txt").write_text("not a video")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"clip0.mp4": "a fox", "clip1": "a fox", "clip2.mp4": "a cat", "broken.mp4": "x"}))
    out = tmp_path / "out"
    arguments = [
        "score",
        "--videos",
        str(videos),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--tiny",
        "videos_per_shard=2",
        "scorer_pool.batch_size=2",
    ]

    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "4 videos; 2 shard(s) written, 0 already committed; 1 video(s) failed" in result.output
    tables = [shards.read_shard(info) for info in shards.list_shards(str(out), "scores")]
    rows = [row for table in tables for row in table.to_pylist()]
    assert [row["sample_id"] for row in rows] == ["broken", "clip0", "clip1", "clip2"]
    assert rows[1]["prompt_id"] == rows[2]["prompt_id"] == prompt_id_for("a fox") != rows[3]["prompt_id"]
    assert rows[0]["failed_reason"].startswith("decode: VideoDecodeError: broken")
    assert all(row["failed_reason"] is None and math.isfinite(row["omniscore"]) for row in rows[1:])
    assert rows[1]["omniscore"] == omniscore(rows[1], "clip0")

    rerun = CliRunner().invoke(app, arguments)
    assert rerun.exit_code == 0, rerun.output
    assert "0 shard(s) written, 2 already committed" in rerun.output


def test_score_command_reports_bad_inputs_clearly(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"x")
    (videos / "b.mp4").write_bytes(b"x")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("video,prompt\na.mp4,a fox\n")
    result = CliRunner().invoke(
        app, ["score", "--videos", str(videos), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "no weights for subject_consistency" in result.output  # real weights are required unless --tiny
    result = CliRunner().invoke(
        app, ["score", "--videos", str(videos), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--tiny"]
    )
    assert result.exit_code == 2
    assert f"{prompts}: no prompt for 1 video(s): b.mp4" in result.output


def test_prompt_files_map_videos_to_prompts(tmp_path):
    (tmp_path / "p.csv").write_text("video,prompt,prompt_id\na.mp4,a fox,fox\nb,a cat,\n")
    assert read_prompt_map(str(tmp_path / "p.csv")) == {
        "a.mp4": ("fox", "a fox"),
        "b": (prompt_id_for("a cat"), "a cat"),
    }
    (tmp_path / "p.json").write_text(
        json.dumps([{"video": "a.mp4", "prompt": "a fox"}, {"video": "a.mp4", "prompt": "b"}])
    )
    with pytest.raises(VideoInputError, match=r"p.json item 1: video 'a.mp4' is listed twice"):
        read_prompt_map(str(tmp_path / "p.json"))
    (tmp_path / "q.json").write_text(json.dumps({"a.mp4": ""}))
    with pytest.raises(VideoInputError, match=r"q.json key 'a.mp4': field 'prompt' must be a non-empty string"):
        read_prompt_map(str(tmp_path / "q.json"))
    with pytest.raises(VideoInputError, match="unknown prompts file type '.txt'"):
        read_prompt_map(str(tmp_path / "p.txt"))
    (tmp_path / "videos").mkdir()
    with pytest.raises(VideoInputError, match="no .mp4 files"):
        video_inputs(str(tmp_path / "videos"), str(tmp_path / "p.csv"))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"video": "a.mp4", "prompt": "a fox", "prompt_id": ["x"]}],
         r"p.json item 0: field 'prompt_id' must be a non-empty string or an integer, got \['x'\]"),
        ([{"video": "a.mp4", "prompt": "a fox", "prompt_id": "  "}], r"p.json item 0: field 'prompt_id' must be"),
        ([{"video": "a.mp4", "prompt": "a fox", "prompt_id": True}], r"p.json item 0: field 'prompt_id' must be"),
        ([{"video": "a.mp4", "prompt": "a fox", "prompt_id": 1}, {"video": "b.mp4", "prompt": "a cat", "prompt_id": 1}],
         r"p.json item 1: prompt_id '1' is 'a cat' here but 'a fox' at item 0"),
    ],
)
def test_prompt_files_refuse_bad_prompt_ids_naming_the_item(tmp_path, records, message):
    (tmp_path / "p.json").write_text(json.dumps(records))
    with pytest.raises((VideoInputError, PromptFileError), match=message):
        read_prompt_map(str(tmp_path / "p.json"))


def test_prompt_files_keep_integer_ids_and_read_a_csv_with_a_byte_order_mark(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"video": "a.mp4", "prompt": "a fox", "prompt_id": 0}]))
    assert read_prompt_map(str(tmp_path / "p.json")) == {"a.mp4": ("0", "a fox")}  # 0 is an id, not a missing one
    (tmp_path / "p.csv").write_bytes("\ufeffvideo,prompt,prompt_id\na.mp4,a fox,\nb.mp4,a cat,7\n".encode())
    assert read_prompt_map(str(tmp_path / "p.csv")) == {"a.mp4": (prompt_id_for("a fox"), "a fox"),
                                                        "b.mp4": ("7", "a cat")}


def test_two_videos_that_would_be_one_sample_are_refused(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "a.MP4", "b.mp4"):
        (videos / name).write_bytes(b"x")
    (tmp_path / "p.json").write_text(json.dumps({"a": "a fox", "b": "a cat"}))
    with pytest.raises(VideoInputError, match=r"videos: a.MP4 and a.mp4 would both be sample 'a'; rename one"):
        video_inputs(str(videos), str(tmp_path / "p.json"))


def test_a_rescore_with_another_batch_size_or_device_is_refused(tmp_path):
    """Batch composition and the device change a score's rounding: both are recorded, and a rerun that changes one
    is refused before any cluster work, naming it."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"x")
    (tmp_path / "p.json").write_text(json.dumps({"a": "a fox"}))
    options = {"videos": str(videos), "prompts": str(tmp_path / "p.json"), "out": str(tmp_path / "out"),
               "scorer": {"tiny": True}}
    config = ScoreFilesConfig(**options, scorer_pool={"batch_size": 2})
    plan_score(config)
    assert json.loads((tmp_path / "out" / "scoring.json").read_text())["scorer_batch_size"] == 2
    with pytest.raises(ConfigError, match=r"scoring.json: .*scorer_batch_size: recorded 2, now 4"):
        plan_score(ScoreFilesConfig(**options, scorer_pool={"batch_size": 4}))
    record_scorer_device(config, cluster_gpus=0.0)
    record_scorer_device(config, cluster_gpus=0.0)  # the same device: a rerun goes on
    with pytest.raises(ConfigError, match=r"scoring-device.json: .*scorer_device: recorded 'cpu', now 'cuda'"):
        record_scorer_device(config, cluster_gpus=1.0)


# --- failure semantics: data errors fail a row, infrastructure errors fail the batch ------------------------------
def scorer_batch(videos: dict[str, bytes]) -> dict[str, np.ndarray]:
    ids = list(videos)
    return {
        "sample_id": np.array(ids, dtype=object),
        "prompt_id": np.array(["p"] * len(ids), dtype=object),
        "prompt": np.array(["a panning texture"] * len(ids), dtype=object),
        "video": np.array([videos[i] for i in ids], dtype=object),
    }


@pytest.fixture(scope="module")
def local_scorer():
    """An in-process OmniScorer on two cheap dimensions (tiny random models)."""
    return OmniScorer(ScorerConfig(tiny=True, dimensions=["temporal_flickering", "subject_consistency"]))


def test_an_undecodable_video_fails_its_row_and_the_rest_is_scored(local_scorer):
    good = encode_mp4(moving_video(4, 32, 32), fps=8)
    out = local_scorer(scorer_batch({"good": good, "corrupt": good[: len(good) // 3], "empty": b""}))
    reasons = dict(zip(out["sample_id"], out["failed_reason"]))
    assert reasons["good"] is None
    assert reasons["corrupt"].startswith("decode: VideoDecodeError: corrupt")
    assert reasons["empty"] == "decode: VideoDecodeError: empty: empty video data (0 bytes)"
    flicker = dict(zip(out["sample_id"], out["temporal_flickering"]))
    assert flicker["good"] == temporal_flickering.score(decode_mp4(good)[0].numpy())
    assert math.isnan(flicker["corrupt"]) and math.isnan(flicker["empty"])
    assert list(out["video"]) == [good, good[: len(good) // 3], b""]  # input columns pass through


def test_a_too_short_video_fails_only_its_row(local_scorer):
    batch = scorer_batch(
        {"long": encode_mp4(moving_video(4, 32, 32), fps=8), "one": encode_mp4(moving_video(1, 32, 32), fps=8)}
    )
    out = local_scorer(batch)
    reasons = dict(zip(out["sample_id"], out["failed_reason"]))
    assert reasons["long"] is None
    assert reasons["one"].startswith("temporal_flickering: VideoTooShortError: need at least 2 frames, got 1")


def test_frames_too_small_for_the_flow_model_fail_only_their_row():
    """RAFT (here the tiny one: 2 pyramid levels, sides >= 32 px once padded to multiples of 8) refuses small frames:
    that video's row fails, the batch's other videos are scored."""
    scorer = OmniScorer(ScorerConfig(tiny=True, dimensions=["dynamic_degree"]))
    out = scorer(scorer_batch({"large": encode_mp4(moving_video(4, 32, 32), fps=8),
                               "small": encode_mp4(moving_video(4, 16, 24), fps=8)}))
    reasons = dict(zip(out["sample_id"], out["failed_reason"]))
    assert reasons["large"] is None and math.isfinite(dict(zip(out["sample_id"], out["dynamic_degree"]))["large"])
    assert reasons["small"] == ("dynamic_degree: VideoTooShortError: frames of 16x24 pixels: RAFT takes sides of at "
                                "least 32 px (padded to multiples of 8)")


def caused_by(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        FileNotFoundError("weights/dino_vitb16.pth"),
        # a data error that a GPU fault caused is the GPU's: the sampler's rule (errors.is_infrastructure_error)
        caused_by(VideoTooShortError("need 2 frames"), RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")),
    ],
    ids=["oom", "cuda", "missing-file", "data-error-caused-by-cudnn"],
)
def test_an_infrastructure_error_fails_the_batch_instead_of_giving_nan(local_scorer, monkeypatch, error):
    import actors.scorer

    real = actors.scorer.score_outputs

    def failing(name, *args, **kwargs):
        if name == "subject_consistency":
            raise error
        return real(name, *args, **kwargs)

    monkeypatch.setattr(actors.scorer, "score_outputs", failing)
    batch = scorer_batch(
        {"a": encode_mp4(moving_video(4, 32, 32), fps=8), "b": encode_mp4(moving_video(4, 32, 32, seed=1), fps=8)}
    )
    with pytest.raises(type(error), match=str(error).split(".")[0]):
        local_scorer(batch)


@pytest.fixture(scope="module")
def omniscore_scorer():
    """An in-process OmniScorer on every OmniScore dimension (tiny random models): it computes `omniscore`."""
    return OmniScorer(ScorerConfig(tiny=True))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("configured", ["local_scorer", "omniscore_scorer"], ids=["no-omniscore", "omniscore"])
def test_a_non_finite_score_of_a_decoded_video_fails_the_batch_naming_dimension_and_sample(
    configured, value, request, monkeypatch
):
    """A model that gives NaN or inf for a video it decoded (overflow, bad weights) is at fault, not the video: no
    row, with or without an omniscore column, may carry that value or a failed_reason for it."""
    import actors.scorer

    scorer = request.getfixturevalue(configured)
    real = actors.scorer.score_outputs

    def overflowing(name, videos, *args, **kwargs):  # subject_consistency overflows on the second video
        results = real(name, videos, *args, **kwargs)
        if name == "subject_consistency" and len(videos) == 2:
            results[1] = {key: value for key in results[1]}
        return results

    monkeypatch.setattr(actors.scorer, "score_outputs", overflowing)
    good = encode_mp4(moving_video(16, 64, 64), fps=8)
    batch = scorer_batch({"a": good, "b": encode_mp4(moving_video(16, 64, 64, seed=1), fps=8), "cut": good[:100]})
    with pytest.raises(NonFiniteScoreError) as raised:
        scorer(batch)
    assert str(raised.value) == (
        "scorer 'subject_consistency' gave non-finite values for 1 of 2 decoded video(s): "
        f"b (subject_consistency={value})"
    )


def test_score_job_commits_the_other_batches_and_exits_1_naming_the_failed_one(ray_cluster, tmp_path, monkeypatch):
    import jobs.score

    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(6):
        (videos / f"clip{index}.mp4").write_bytes(encode_mp4(moving_video(4, 32, 32, seed=index), fps=8))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"clip{index}.mp4": f"prompt {index // 2}" for index in range(6)}))
    out = tmp_path / "out"
    arguments = [
        "score",
        "--videos",
        str(videos),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--tiny",
        "videos_per_shard=2",
        "scorer_pool.batch_size=2",
        "scorer.dimensions=[temporal_flickering]",
    ]
    real_plan = jobs.score.plan_score
    moved = tmp_path / "clip3.mp4.away"

    def plan_then_lose_a_file(config):  # storage fault after planning: the worker's read of clip3 fails
        plan = real_plan(config)
        (videos / "clip3.mp4").rename(moved)
        return plan

    monkeypatch.setattr(jobs.score, "plan_score", plan_then_lose_a_file)
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1, result.output
    assert "2 shard(s) written, 0 already committed" in result.output
    assert "shard 1 NOT committed: 0 of 2 videos came back" in result.output
    assert [info.index for info in shards.list_shards(str(out), "scores")] == [0, 2]

    monkeypatch.setattr(jobs.score, "plan_score", real_plan)
    moved.rename(videos / "clip3.mp4")
    rerun = CliRunner().invoke(app, arguments)
    assert rerun.exit_code == 0, rerun.output
    assert "1 shard(s) written, 2 already committed" in rerun.output
    rows = [row for info in shards.list_shards(str(out), "scores") for row in shards.read_shard(info).to_pylist()]
    assert [row["sample_id"] for row in rows] == [f"clip{index}" for index in range(6)]
    assert all(row["failed_reason"] is None and math.isfinite(row["temporal_flickering"]) for row in rows)
