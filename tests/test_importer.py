"""Importing a synthetic copy of the released VideoDPO layout (real mp4 files) into pair shards."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from videodpo_ray import shards
from videodpo_ray.cli import app
from videodpo_ray.errors import ConfigError, DatasetImportError
from videodpo_ray.pairs import product_weight
from videodpo_ray.stages.importer import IMPORT_MANIFEST, import_videodpo
from videodpo_ray.video import decode_mp4, encode_mp4

WIN_VALUE, LOSE_VALUE = 200, 40


def build_release(root: Path, num_pairs: int = 5, scores: list | None = None) -> Path:
    """The released layout as the reference script writes it: file names follow the prompt list's 1-based global
    index (pair k -> {k + 1:06d}.mp4), metadata entries 2k / 2k+1, clip paths relative to the dataset root."""
    (root / "winvideos").mkdir(parents=True)
    (root / "losevideos").mkdir()
    metadata, pairs = [], []
    for k in range(num_pairs):
        globalidx, prompt = k + 1, f"a corgi surfing, take {k}"
        for folder, value in (("winvideos", WIN_VALUE + k), ("losevideos", LOSE_VALUE + k)):
            clip = np.full((4, 32, 48, 3), value, np.uint8)
            (root / folder / f"{globalidx:06d}.mp4").write_bytes(encode_mp4(clip, fps=8))
            metadata.append(
                {
                    "basic": {
                        "clip_duration": 1.6,
                        "clip_path": f"{folder}/{globalidx:06d}.mp4",
                        "globalidx": globalidx,
                    },
                    "misc": {"frame_caption": [prompt]},
                }
            )
        pair = {"video1": 2 * k, "video2": 2 * k + 1, "label": 0, "frame_caption": prompt}
        if scores is not None:
            pair["score"] = scores[k]
        pairs.append(pair)
    (root / "metadata.json").write_text(json.dumps(metadata))
    (root / "pair.json").write_text(json.dumps(pairs))
    return root


def read_pairs(out: str) -> list[dict]:
    return [row for info in shards.list_shards(out, "pairs") for row in shards.read_shard(info).to_pylist()]


def test_import_gives_exact_rows(tmp_path: Path) -> None:
    src, out = build_release(tmp_path / "release"), str(tmp_path / "out")
    report = import_videodpo(str(src), out, rows_per_shard=2)

    assert (report.num_pairs, report.imported, report.rejected, report.skipped_shards) == (5, 5, [], [])
    assert [(info.index, info.num_rows) for info in shards.list_shards(out, "pairs")] == [(0, 2), (1, 2), (2, 1)]
    rows = read_pairs(out)
    assert [row["pair_id"] for row in rows] == [
        f"videodpo-{k:06d}/videodpo-{2 * k:06d}/videodpo-{2 * k + 1:06d}" for k in range(5)
    ]
    for k, row in enumerate(rows):
        assert row["prompt_id"] == f"videodpo-{k:06d}" and row["prompt"] == f"a corgi surfing, take {k}"
        assert (row["win_sample_id"], row["lose_sample_id"]) == (f"videodpo-{2 * k:06d}", f"videodpo-{2 * k + 1:06d}")
        assert (row["weight"], row["win_score"], row["lose_score"], row["fps"]) == (1.0, None, None, 8)
        assert row["win_video"] == (src / "winvideos" / f"{k + 1:06d}.mp4").read_bytes()  # bytes kept as they are
        assert row["lose_video"] == (src / "losevideos" / f"{k + 1:06d}.mp4").read_bytes()
        win_frames, _ = decode_mp4(row["win_video"])
        lose_frames, _ = decode_mp4(row["lose_video"])
        assert (
            abs(int(win_frames[0, 0, 0, 0]) - (WIN_VALUE + k)) <= 2
            and abs(int(lose_frames[0, 0, 0, 0]) - (LOSE_VALUE + k)) <= 2
        )
        assert row["win_latents"] is None and row["latent_shape"] is None

    rerun = import_videodpo(str(src), out, rows_per_shard=2)  # resumable: committed shards are skipped
    assert (rerun.imported, rerun.written, rerun.skipped_shards) == (0, [], [0, 1, 2])
    assert read_pairs(out) == rows


def test_bad_rows_are_reported_by_index(tmp_path: Path) -> None:
    src, out = build_release(tmp_path / "release", num_pairs=6), str(tmp_path / "out")
    (src / "losevideos" / "000002.mp4").unlink()  # pair 1: loser file missing
    (src / "winvideos" / "000003.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(200))  # pair 2: corrupt mp4
    metadata = json.loads((src / "metadata.json").read_text())
    del metadata[6]["misc"]  # pair 3: winner caption missing
    (src / "metadata.json").write_text(json.dumps(metadata))
    pairs = json.loads((src / "pair.json").read_text())
    pairs[4]["video2"] = 10  # pair 4: loser index is not 2k + 1
    (src / "pair.json").write_text(json.dumps(pairs))

    report = import_videodpo(str(src), out, rows_per_shard=4)

    assert (report.num_pairs, report.imported) == (6, 2)
    assert [item.index for item in report.rejected] == [1, 2, 3, 4]
    reasons = {item.index: item.reason for item in report.rejected}
    assert reasons[1] == "video file losevideos/000002.mp4 (metadata entry 3) is missing"
    assert reasons[2].startswith("winvideos/000003.mp4: cannot decode mp4")
    assert reasons[3] == "metadata entry 6: misc.frame_caption[0] is missing or empty"
    assert reasons[4] == "video1/video2 are (8, 10), expected (8, 9)"
    assert "2 imported, 4 rejected" in report.summary() and "rejected pair 3: metadata entry 6" in report.summary()
    assert [row["prompt_id"] for row in read_pairs(out)] == ["videodpo-000000", "videodpo-000005"]

    with pytest.raises(DatasetImportError, match="pair 1: video file losevideos/000002.mp4 .* is missing"):
        import_videodpo(str(src), str(tmp_path / "strict"), rows_per_shard=4, strict=True)
    assert shards.list_shards(str(tmp_path / "strict"), "pairs") == []  # its shard was never written


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda meta, pairs: pairs[0].update(label=1), "label is 1; the released layout always has 0 (video1 wins)"),
        (
            lambda meta, pairs: meta[1]["misc"].update(frame_caption=["another prompt"]),
            "caption of metadata entry 1 ('another prompt') differs",
        ),
        (  # a caption given as one string is that caption, not its first letter
            lambda meta, pairs: meta[1]["misc"].update(frame_caption="another prompt"),
            "caption of metadata entry 1 ('another prompt') differs",
        ),
        (
            lambda meta, pairs: meta[0]["basic"].update(clip_path="losevideos/000001.mp4"),
            "metadata entry 0: clip_path 'losevideos/000001.mp4' is not in winvideos/",
        ),
        (lambda meta, pairs: pairs[0].update(score=0.7), "score 0.7: expected [win_score, lose_score]"),
        (lambda meta, pairs: pairs.__setitem__(0, "video1"), "pair.json entry is a str, expected an object"),
    ],
)
def test_bad_metadata_is_reported(tmp_path: Path, edit, reason: str) -> None:
    src = build_release(tmp_path / "release", num_pairs=2)
    metadata, pairs = json.loads((src / "metadata.json").read_text()), json.loads((src / "pair.json").read_text())
    edit(metadata, pairs)
    (src / "metadata.json").write_text(json.dumps(metadata))
    (src / "pair.json").write_text(json.dumps(pairs))
    report = import_videodpo(str(src), str(tmp_path / "out"))
    assert report.imported == 1 and len(report.rejected) == 1
    assert report.rejected[0].index == 0 and report.rejected[0].reason.startswith(reason)


def test_clip_path_prefix_and_globalidx_fallback(tmp_path: Path) -> None:
    src = build_release(tmp_path / "release", num_pairs=2)
    metadata = json.loads((src / "metadata.json").read_text())
    metadata[0]["basic"]["clip_path"] = "/data/vidpro-dpo-dataset/winvideos/000001.mp4"  # absolute, other machine
    del metadata[3]["basic"]["clip_path"]  # falls back to globalidx 2 -> losevideos/000002.mp4
    (src / "metadata.json").write_text(json.dumps(metadata))
    report = import_videodpo(str(src), str(tmp_path / "out"))
    assert (report.imported, report.rejected) == (2, [])


def test_scores_and_weight_function(tmp_path: Path) -> None:
    src = build_release(tmp_path / "release", num_pairs=2, scores=[[0.8, 0.6], [0.9, 0.4]])
    weight = partial(product_weight, alpha=1.0)
    import_videodpo(str(src), str(tmp_path / "out"), weight_fn=weight)
    rows = read_pairs(str(tmp_path / "out"))
    assert [(row["win_score"], row["lose_score"]) for row in rows] == [(0.8, 0.6), (0.9, 0.4)]
    # released-code weight (0.72 / (S_w S_l))^1 = 1.5 and 2.0, stored as float32
    assert [row["weight"] for row in rows] == [1.5, 2.0]


def test_missing_index_file_is_a_clear_error(tmp_path: Path) -> None:
    src = build_release(tmp_path / "release", num_pairs=1)
    (src / "pair.json").unlink()
    with pytest.raises(DatasetImportError, match="pair.json: missing"):
        import_videodpo(str(src), str(tmp_path / "out"))
    (src / "pair.json").write_text("{not json")
    with pytest.raises(DatasetImportError, match="pair.json: not valid JSON"):
        import_videodpo(str(src), str(tmp_path / "out"))


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_rerun_with_the_recorded_settings_resumes(tmp_path: Path) -> None:
    src, out = build_release(tmp_path / "release"), str(tmp_path / "out")
    import_videodpo(str(src), out, rows_per_shard=2)
    manifest = json.loads((tmp_path / "out" / IMPORT_MANIFEST).read_text())
    assert (manifest["rows_per_shard"], manifest["src"], manifest["weight_fn"]) == (2, str(src), None)
    rows = read_pairs(out)
    shards.uncommit_shard(out, "pairs", 1)  # as if the first run had stopped before committing shard 1

    rerun = import_videodpo(str(src), out, rows_per_shard=2)
    assert ([info.index for info in rerun.written], rerun.skipped_shards, rerun.imported) == ([1], [0, 2], 2)
    assert read_pairs(out) == rows


@pytest.mark.parametrize("overwrite", [False, True])
def test_rerun_with_other_rows_per_shard_is_refused(tmp_path: Path, overwrite: bool) -> None:
    src, out = build_release(tmp_path / "release", num_pairs=3), str(tmp_path / "out")
    import_videodpo(str(src), out, rows_per_shard=2)  # shard 0 = pairs 0, 1; shard 1 = pair 2
    before = files_under(tmp_path / "out")
    with pytest.raises(ConfigError, match="rows_per_shard: recorded 2, now 1.*new output location"):
        import_videodpo(str(src), out, rows_per_shard=1, overwrite=overwrite)  # would write pair 1 again as shard 1
    assert files_under(tmp_path / "out") == before


def test_rerun_with_another_source_or_weighting_is_refused(tmp_path: Path) -> None:
    src = build_release(tmp_path / "release", num_pairs=2, scores=[[0.8, 0.6], [0.9, 0.4]])
    out = str(tmp_path / "out")
    weight = partial(product_weight, alpha=1.0)
    import_videodpo(str(src), out, rows_per_shard=1, weight_fn=weight)
    before = files_under(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"weight_fn: recorded 'videodpo_ray.pairs.product_weight\(alpha=1.0\)', now"):
        import_videodpo(str(src), out, rows_per_shard=1, weight_fn=partial(product_weight, alpha=2.0))
    with pytest.raises(ConfigError, match="source_name: recorded 'videodpo', now 'mine'"):
        import_videodpo(str(src), out, rows_per_shard=1, weight_fn=weight, source_name="mine")
    other = build_release(tmp_path / "other", num_pairs=2, scores=[[0.8, 0.6], [0.9, 0.5]])
    with pytest.raises(ConfigError, match="pair_json_sha256: recorded .*; src: recorded"):
        import_videodpo(str(other), out, rows_per_shard=1, weight_fn=weight)
    assert files_under(tmp_path / "out") == before


def test_bad_rows_per_shard_and_cli_refusal_exit_2(tmp_path: Path) -> None:
    src, out = build_release(tmp_path / "release", num_pairs=2), str(tmp_path / "out")
    with pytest.raises(ConfigError, match="rows_per_shard must be positive, got 0"):
        import_videodpo(str(src), out, rows_per_shard=0)
    import_videodpo(str(src), out, rows_per_shard=2)  # the settings the command records (no weighting)
    before = files_under(tmp_path / "out")
    result = CliRunner().invoke(app, ["import-videodpo", "--src", str(src), "--out", out, "--rows-per-shard", "1"])
    assert result.exit_code == 2  # refused in the driver, before Ray starts
    assert "rows_per_shard: recorded 2, now 1" in result.output
    assert files_under(tmp_path / "out") == before
    (src / "pair.json").unlink()  # not a VideoDPO dataset: bad input, exit 2 as well
    result = CliRunner().invoke(app, ["import-videodpo", "--src", str(src), "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "pair.json: missing (not a VideoDPO dataset directory?)" in result.output


def test_the_ray_data_import_writes_what_the_serial_one_does(tmp_path: Path, ray_cluster) -> None:
    from jobs.import_videodpo import import_dataset

    src = build_release(tmp_path / "release", num_pairs=7)
    (src / "losevideos" / "000004.mp4").unlink()  # pair 3 (shard 1 of 3): loser file missing
    serial = import_videodpo(str(src), str(tmp_path / "serial"), rows_per_shard=3)
    parallel = import_dataset(str(src), str(tmp_path / "ray"), rows_per_shard=3)  # 3 shards: 3 Ray Data tasks
    assert parallel.summary() == serial.summary().replace("/serial", "/ray")
    assert (parallel.imported, [item.index for item in parallel.rejected]) == (6, [3])
    for info in shards.list_shards(str(tmp_path / "serial"), "pairs"):
        twin = Path(str(info.url).replace("/serial/", "/ray/"))
        assert Path(info.url).read_bytes() == twin.read_bytes(), info.url
    rerun = import_dataset(str(src), str(tmp_path / "ray"), rows_per_shard=3)
    assert (rerun.imported, rerun.skipped_shards) == (0, [0, 1, 2])


def test_a_failing_shard_task_leaves_only_its_shard_unwritten_and_exits_1(tmp_path: Path, ray_cluster) -> None:
    """An infrastructure fault in one task (here a video path that is a directory: not a bad pair) fails only its
    shard: the others are written, the job exits 1 naming it, and a rerun imports only it once the fault is gone."""
    src, out = build_release(tmp_path / "release", num_pairs=6), str(tmp_path / "out")
    video = src / "winvideos" / "000004.mp4"  # pair 3: shard 1 of 3
    saved = video.read_bytes()
    video.unlink()
    video.mkdir()
    result = CliRunner().invoke(app, ["import-videodpo", "--src", str(src), "--out", out, "--rows-per-shard", "2"])
    assert result.exit_code == 1, result.output
    assert "shard(s) 1 failed and were not written" in result.output
    assert [info.index for info in shards.list_shards(out, "pairs")] == [0, 2]
    video.rmdir()
    video.write_bytes(saved)
    rerun = CliRunner().invoke(app, ["import-videodpo", "--src", str(src), "--out", out, "--rows-per-shard", "2"])
    assert rerun.exit_code == 0, rerun.output
    assert "6 pairs, 2 imported, 0 rejected; 1 shard(s) written, 2 already committed and skipped" in rerun.output


def test_cli_import_to_s3(tmp_path: Path, s3_bucket: str, ray_cluster) -> None:
    src = build_release(tmp_path / "release", num_pairs=3)
    runner = CliRunner()
    result = runner.invoke(
        app, ["import-videodpo", "--src", str(src), "--out", s3_bucket + "/imported", "--rows-per-shard", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "3 pairs, 3 imported, 0 rejected; 2 shard(s) written" in result.output
    assert shards.dataset_manifest(s3_bucket + "/imported", "pairs")["num_rows"] == 3

    (src / "winvideos" / "000002.mp4").unlink()
    result = runner.invoke(app, ["import-videodpo", "--src", str(src), "--out", str(tmp_path / "strict"), "--strict"])
    assert result.exit_code == 1
    assert "pair 1: video file winvideos/000002.mp4 (metadata entry 2) is missing" in result.output
