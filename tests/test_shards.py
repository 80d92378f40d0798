"""Shard round trips (local and S3 on the moto server), commit-after-write under injected crashes, checksums,
schema checks and the latent byte format."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from videodpo_ray import shards, storage, tensor_bytes
from videodpo_ray.errors import CheckpointError, ShardError, ShardExistsError
from videodpo_ray.video import encode_mp4


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh dataset root: a local directory or a bucket on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "data")
    return request.getfixturevalue("s3_bucket") + "/run"


def clip_bytes(value: int) -> bytes:
    return encode_mp4(np.full((2, 16, 16, 3), value, np.uint8), fps=8)


def pair_rows(count: int, start: int = 0, weight: float = 1.0) -> list[dict]:
    rows = []
    for i in range(start, start + count):
        win, lose = torch.full((4, 2, 5, 8), float(i)), torch.full((4, 2, 5, 8), -float(i))
        win_bytes, shape, dtype = tensor_bytes.latents_to_bytes(win.to(torch.bfloat16))
        lose_bytes, _, _ = tensor_bytes.latents_to_bytes(lose.to(torch.bfloat16))
        text = torch.full((3, 6), float(i), dtype=torch.float16)
        text_bytes, text_shape, text_dtype = tensor_bytes.latents_to_bytes(text)
        rows.append(
            {
                "pair_id": f"p{i}/p{i}-s0/p{i}-s1",
                "prompt_id": f"p{i}",
                "prompt": f"prompt number {i}",
                "win_sample_id": f"p{i}-s0",
                "lose_sample_id": f"p{i}-s1",
                "win_score": 0.5 + i / 100,
                "lose_score": None if i % 2 else 0.25,
                "weight": weight,
                "win_video": clip_bytes(200 - i),
                "lose_video": None,
                "win_latents": win_bytes,
                "lose_latents": lose_bytes,
                "latent_shape": shape,
                "latent_dtype": dtype,
                "latent_model": "vc2",
                "fps": 8,
                "text_embedding": text_bytes,
                "text_embedding_shape": text_shape,
                "text_embedding_dtype": text_dtype,
            }
        )
    return rows


def test_pairs_round_trip(root: str) -> None:
    written = {index: pair_rows(3, start=10 * index) for index in (10, 0, 2)}
    infos = {
        index: shards.write_shard(shards.make_table("pairs", rows), root, "pairs", index)
        for index, rows in written.items()
    }

    listed = shards.list_shards(root, "pairs")
    assert [info.index for info in listed] == [0, 2, 10]
    assert listed == [infos[0], infos[2], infos[10]]
    assert listed[0].url == storage.join(root, "pairs", "shard-00000.parquet")
    for info in listed:
        table = shards.read_shard(info)
        assert table.schema.equals(shards.PAIRS_SCHEMA)
        assert table.to_pylist() == written[info.index]
    first = shards.read_shard(listed[1]).to_pylist()[0]  # pair 20
    latents = tensor_bytes.latents_from_bytes(first["win_latents"], first["latent_shape"], first["latent_dtype"])
    assert latents.dtype == torch.bfloat16 and latents.shape == (4, 2, 5, 8) and bool((latents == 20).all())

    assert shards.shard_exists(root, "pairs", 2) and not shards.shard_exists(root, "pairs", 1)
    summary = shards.dataset_manifest(root, "pairs")
    assert summary["num_shards"] == 3 and summary["num_rows"] == 9 and summary["shard_indices"] == [0, 2, 10]
    assert summary["num_bytes"] == sum(info.num_bytes for info in listed)
    assert shards.list_shards(root, "scores") == []


def test_a_root_with_glob_characters_in_its_name_lists_its_own_shards(root: str) -> None:
    """`[1]`, `*` and `?` in a path are names, not patterns: the shards of `run[1]` are listed, not those of `run1`."""
    written = shards.write_shard(shards.make_table("pairs", pair_rows(2)), root + "[1]*?", "pairs", 0)
    shards.write_shard(shards.make_table("pairs", pair_rows(1)), root + "1", "pairs", 0)
    assert shards.list_shards(root + "[1]*?", "pairs") == [written]
    assert storage.read_many([written.url]) == [storage.read_bytes(written.url)]
    stale = storage.join(root + "[1]*?", "pairs", "_tmp-shard-00001.parquet-crashed")
    storage.write_bytes_atomic(stale, b"a crashed write")
    time.sleep(1.1)  # object stores keep modification times in whole seconds
    later = shards.write_shard(shards.make_table("pairs", pair_rows(1)), root + "[1]*?", "pairs", 1)
    assert not storage.exists(stale) and shards.list_shards(root + "[1]*?", "pairs") == [written, later]
    storage.remove_tree(root + "[1]*?")  # removes that folder only, not `root1`, which the pattern would match
    assert shards.list_shards(root + "[1]*?", "pairs") == [] and len(shards.list_shards(root + "1", "pairs")) == 1


def test_every_kind_round_trips(tmp_path) -> None:
    rows = {
        "prompts": [{"prompt_id": "p0", "prompt": "a red fox"}],
        "samples": [
            {
                "sample_id": "p0-s0",
                "prompt_id": "p0",
                "prompt": "a red fox",
                "seed": 5557,
                "video": clip_bytes(9),
                "fps": 8,
                "model": "vc2",
            }
        ],
        "scores": [
            {"sample_id": "p0-s0", "prompt_id": "p0", "subject_consistency": 0.9, "omniscore": 0.7},
            {"sample_id": "p0-s1", "prompt_id": "p0", "failed_reason": "decode error"},
        ],
    }
    for kind, kind_rows in rows.items():
        info = shards.write_shard(shards.make_table(kind, kind_rows), str(tmp_path), kind, 0)
        read = shards.read_shard(info).to_pylist()
        assert [{key: row[key] for key in source} for row, source in zip(read, kind_rows)] == kind_rows
    assert shards.read_shard(shards.list_shards(str(tmp_path), "scores")[0]).column("dynamic_degree").null_count == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_latents_bytes_round_trip(dtype: torch.dtype) -> None:
    latents = torch.randn(4, 16, 5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    data, shape, name = tensor_bytes.latents_to_bytes(latents.transpose(2, 3))  # non-contiguous input
    assert shape == [4, 16, 8, 5] and name == str(dtype).removeprefix("torch.")
    assert len(data) == latents.numel() * dtype.itemsize
    restored = tensor_bytes.latents_from_bytes(data, shape, name)
    assert restored.dtype == dtype and torch.equal(restored, latents.transpose(2, 3))


def test_latents_byte_layout_is_little_endian_row_major() -> None:
    data, _, _ = tensor_bytes.latents_to_bytes(torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16))
    assert data == bytes([0x80, 0x3F, 0x00, 0xC0])  # bfloat16 1.0 = 0x3F80, -2.0 = 0xC000


def test_latents_bad_input() -> None:
    with pytest.raises(ValueError, match="float64 not supported"):
        tensor_bytes.latents_to_bytes(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="16 bytes do not hold a float32 tensor of shape \\[2, 3\\]"):
        tensor_bytes.latents_from_bytes(bytes(16), [2, 3], "float32")
    with pytest.raises(ValueError, match="unknown latent dtype 'int8'"):
        tensor_bytes.latents_from_bytes(bytes(6), [6], "int8")
    with pytest.raises(ValueError, match=r"negative size in shape \[-1, -1\]"):  # a damaged row: its product fits
        tensor_bytes.latents_from_bytes(bytes(4), [-1, -1], "float32")


def test_rewrite_is_idempotent_and_different_content_needs_overwrite(root: str) -> None:
    table = shards.make_table("pairs", pair_rows(2))
    first = shards.write_shard(table, root, "pairs", 4)
    assert shards.write_shard(table, root, "pairs", 4) == first  # a retried task: no-op
    other = shards.make_table("pairs", pair_rows(2, weight=2.0))
    with pytest.raises(ShardExistsError, match="shard-00004.parquet: a different shard is already committed"):
        shards.write_shard(other, root, "pairs", 4)
    assert shards.read_shard(shards.list_shards(root, "pairs")[0]).equals(table)
    replaced = shards.write_shard(other, root, "pairs", 4, overwrite=True)
    assert shards.list_shards(root, "pairs") == [replaced]
    assert shards.read_shard(replaced).column("weight").to_pylist() == [2.0, 2.0]


def _crash_on_call(monkeypatch: pytest.MonkeyPatch, function: str, call: int) -> None:
    """Make the `call`-th call of storage.<function> raise, as if the process died there."""
    original = getattr(storage, function)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise RuntimeError(f"injected crash in {function}")
        return original(*args, **kwargs)

    monkeypatch.setattr(storage, function, crashing)


@pytest.mark.parametrize("call", [1, 2], ids=["parquet commit", "manifest commit"])
def test_interrupted_write_leaves_no_visible_shard(root: str, monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    table = shards.make_table("pairs", pair_rows(2))
    _crash_on_call(monkeypatch, "commit", call)
    with pytest.raises(RuntimeError, match="injected crash"):
        shards.write_shard(table, root, "pairs", 0)
    monkeypatch.undo()
    assert shards.list_shards(root, "pairs", verify=True) == []
    assert not shards.shard_exists(root, "pairs", 0)
    names = storage.list_files(storage.join(root, "pairs"))
    assert not [name for name in names if name.endswith(".json")]  # no manifest: nothing committed
    assert (call == 2) == ("shard-00000.parquet" in names)  # the data file may exist, but is invisible
    info = shards.write_shard(table, root, "pairs", 0)  # the rerun commits normally
    assert shards.list_shards(root, "pairs") == [info] and shards.read_shard(info).equals(table)


def test_a_crashed_writes_temporary_object_is_ignored_then_removed_by_the_next_commit(root: str) -> None:
    """A writer killed between upload and commit leaves `_tmp-*` behind: readers never see it, and the rerun's commit
    of that shard (an uncommitted shard is always written again) deletes it; other shards' temporaries stay."""
    table = shards.make_table("pairs", pair_rows(2))
    leftover = storage.stage(shards.shard_url(root, "pairs", 1), b"half of a parquet file")
    other = storage.stage(shards.shard_url(root, "pairs", 2), b"another writer's upload")
    assert shards.list_shards(root, "pairs") == []
    time.sleep(1.1)  # object stores keep modification times in whole seconds
    info = shards.write_shard(table, root, "pairs", 1)
    assert not storage.exists(leftover) and storage.exists(other)
    assert shards.list_shards(root, "pairs") == [info]
    in_flight = storage.stage(shards.shard_url(root, "pairs", 1), b"being written")
    assert shards.write_shard(table, root, "pairs", 1) == info  # a no-op rewrite commits nothing, removes nothing
    assert storage.exists(in_flight)


def test_interrupted_overwrite_never_mixes_old_and_new(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old = shards.make_table("pairs", pair_rows(2))
    old_info = shards.write_shard(old, root, "pairs", 0)
    new = shards.make_table("pairs", pair_rows(3, weight=0.5))

    _crash_on_call(monkeypatch, "stage", 1)  # dies while uploading the new data: the old shard stays committed
    with pytest.raises(RuntimeError, match="injected crash"):
        shards.write_shard(new, root, "pairs", 0, overwrite=True)
    monkeypatch.undo()
    assert shards.list_shards(root, "pairs", verify=True) == [old_info]
    assert shards.read_shard(old_info).equals(old)

    _crash_on_call(monkeypatch, "commit", 1)  # dies after un-committing the old shard: the index is absent
    with pytest.raises(RuntimeError, match="injected crash"):
        shards.write_shard(new, root, "pairs", 0, overwrite=True)
    monkeypatch.undo()
    assert shards.list_shards(root, "pairs", verify=True) == []
    assert shards.read_shard(shards.write_shard(new, root, "pairs", 0)).equals(new)


def _replace_object(url: str, data: bytes) -> None:
    fs, path = storage.filesystem_for(url)
    fs.pipe_file(path, data)


def test_checksum_mismatch_is_detected(root: str) -> None:
    info = shards.write_shard(shards.make_table("pairs", pair_rows(2)), root, "pairs", 7)
    data = bytearray(storage.read_bytes(info.url))
    data[len(data) // 2] ^= 0xFF  # same size, different content
    _replace_object(info.url, bytes(data))
    assert shards.list_shards(root, "pairs") == [info]  # the cheap listing checks sizes only
    with pytest.raises(ShardError, match="shard-00007.parquet: checksum mismatch"):
        shards.read_shard(info)
    with pytest.raises(ShardError, match="shard-00007.parquet: checksum mismatch"):
        shards.list_shards(root, "pairs", verify=True)
    _replace_object(info.url, bytes(data[:-10]))  # another size: the listing itself refuses
    with pytest.raises(ShardError, match="shard-00007.parquet: checksum mismatch, size is"):
        shards.list_shards(root, "pairs")
    storage.remove(info.url)
    with pytest.raises(ShardError, match="shard-00007.parquet: committed .* parquet file is missing"):
        shards.list_shards(root, "pairs")


def test_schema_mismatch_names_file_and_field(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pair_rows(2)
    foreign = shards.make_table("pairs", rows).set_column(
        7, pa.field("weight", pa.float64(), nullable=False), pa.array([1.0, 1.0])
    )
    monkeypatch.setattr(shards, "conform_table", lambda table, kind, source: table)  # a writer without the check
    info = shards.write_shard(foreign, str(tmp_path), "pairs", 3)
    monkeypatch.undo()
    with pytest.raises(
        ShardError,
        match=r"shard-00003.parquet: schema mismatch in field 'weight': double not null, expected float not null",
    ):
        shards.read_shard(info)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda row: row.pop("prompt"), r"row 0: missing required field\(s\) \['prompt'\]"),
        (lambda row: row.update(weight=None), "field 'weight' has 1 null value"),
        (lambda row: row.update(colour="red"), r"row 0: unknown field\(s\) \['colour'\]"),
        (lambda row: row.update(fps="fast"), r"field 'fps' \(int32\): Could not convert 'fast'"),
    ],
)
def test_bad_rows_are_refused_on_write(tmp_path, change, message: str) -> None:
    row = pair_rows(1)[0]
    change(row)
    with pytest.raises(ShardError, match=message):
        shards.write_shard(shards.make_table("pairs", [row]), str(tmp_path), "pairs", 0)
    assert shards.list_shards(str(tmp_path), "pairs") == []


def test_table_with_wrong_columns_is_refused(tmp_path) -> None:
    table = shards.make_table("prompts", [{"prompt_id": "p0", "prompt": "x"}]).append_column("extra", pa.array([1]))
    with pytest.raises(ShardError, match=r"shard-00000.parquet: unexpected field\(s\) \['extra'\]"):
        shards.write_shard(table, str(tmp_path), "prompts", 0)
    cast = pa.table({"prompt": ["x"], "prompt_id": ["p0"]})  # other column order: conformed
    assert shards.read_shard(shards.write_shard(cast, str(tmp_path), "prompts", 1)).column_names == [
        "prompt_id",
        "prompt",
    ]


def test_empty_shard_and_unknown_kind_are_errors(tmp_path) -> None:
    with pytest.raises(ShardError, match="shard-00000.parquet: refusing to write an empty shard"):
        shards.write_shard(shards.make_table("pairs", []), str(tmp_path), "pairs", 0)
    with pytest.raises(ShardError, match="unknown shard kind 'pair'"):
        shards.list_shards(str(tmp_path), "pair")


def test_ray_data_reads_only_committed_shards(s3_bucket: str, ray_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    root = s3_bucket + "/run #1 a%20b"  # pyarrow's URI parser would cut at # and decode %20: the keys are fsspec's
    for index in range(2):
        shards.write_shard(shards.make_table("pairs", pair_rows(2, start=10 * index)), root, "pairs", index)
    _crash_on_call(monkeypatch, "commit", 2)  # shard 2: parquet in place, no manifest
    with pytest.raises(RuntimeError):
        shards.write_shard(shards.make_table("pairs", pair_rows(2, start=20)), root, "pairs", 2)
    monkeypatch.undo()

    paths, filesystem = shards.parquet_inputs(root, "pairs")
    dataset = ray_cluster.data.read_parquet(paths, filesystem=filesystem)
    assert sorted(dataset.to_pandas()["pair_id"]) == [
        "p0/p0-s0/p0-s1",
        "p1/p1-s0/p1-s1",
        "p10/p10-s0/p10-s1",
        "p11/p11-s0/p11-s1",
    ]


def test_project_table_keeps_extra_scores_fills_absent_ones_and_drops_unknown_columns():
    table = pa.table(
        {
            "sample_id": ["s0"],
            "prompt_id": ["p0"],
            "clip_score": [0.31],
            "omniscore": [0.5],
            "prompt": ["not a scores column"],
        }
    )
    projected = shards.project_table(table, "scores")
    assert projected.schema == shards.SCORES_SCHEMA
    row = projected.to_pylist()[0]
    assert row["clip_score"] == 0.31 and row["omniscore"] == 0.5
    assert row["background_consistency"] is None and row["failed_reason"] is None
    with pytest.raises(ShardError, match="sample_id"):
        shards.project_table(table.drop(["sample_id"]), "scores")


def test_remote_weights_are_downloaded_again_when_rewritten_at_the_same_url(s3_bucket: str, tmp_path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-export or a re-merge writes new weights at the same URL: the download cache must not keep the old ones
    (nor a directory listed while an upload was under way)."""
    monkeypatch.setenv("VIDEODPO_RAY_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/merged"
    storage.write_bytes_atomic(f"{url}/unet/weights.bin", b"first")
    first = storage.local_directory(url)
    assert (first / "unet" / "weights.bin").read_bytes() == b"first"
    assert storage.local_directory(url) == first  # unchanged: the cached copy
    assert storage.local_file(f"{url}/unet/weights.bin").read_bytes() == b"first"
    storage.write_bytes_atomic(f"{url}/unet/weights.bin", b"second")
    second = storage.local_directory(url)
    assert second != first and (second / "unet" / "weights.bin").read_bytes() == b"second"
    assert storage.local_file(f"{url}/unet/weights.bin").read_bytes() == b"second"
    storage.write_bytes_atomic(f"{url}/model_index.json", b"{}")  # a file added (an upload finishing)
    assert (storage.local_directory(url) / "model_index.json").read_bytes() == b"{}"


def test_a_published_directory_replaces_the_old_one_and_an_unfinished_one_is_refused(root: str, tmp_path) -> None:
    local = tmp_path / "model"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "weights.bin").write_bytes(b"new")
    url = storage.join(root, "model")
    storage.write_bytes_atomic(storage.join(url, "old-layout.bin"), b"stale")
    storage.publish_directory(local, url)
    assert storage.read_bytes(storage.join(url, "unet", "weights.bin")) == b"new"
    assert not storage.exists(storage.join(url, "old-layout.bin"))
    assert (storage.local_directory(url) / "unet" / "weights.bin").read_bytes() == b"new"
    storage.write_bytes_atomic(storage.join(url, storage.WRITING_MARKER), b"")  # as an interrupted upload leaves it
    with pytest.raises(CheckpointError, match=r"model: its writing did not finish \(_WRITING is there\)"):
        storage.local_directory(url)
