"""`videodpo-ray runs clean`: run folders without a committed checkpoint and orphaned temporary objects go; runs
with a checkpoint, shard data and anything recent stay. Local storage and S3 (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timedelta, timezone

import fsspec
import pytest
from typer.testing import CliRunner

from videodpo_ray import storage
from videodpo_ray.cli import app
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.runs import HEARTBEAT, Heartbeat, apply_clean, plan_clean

STATE = ckpt.TrainState(2, 0, 2, 4, 1, 2, 1, 1, 0, []).to_json().encode()
COMMITTED = b'{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint-00000002", "metrics": {}}}'
TREE = {
    "run-kept/.validate_storage_marker": b"",
    "run-kept/checkpoint-00000002/train_state.json": STATE,
    "run-kept/checkpoint_manager_snapshot.json": COMMITTED,
    "run-kept/checkpoint-00000002/deepspeed/mp_rank_00_model_states.pt": b"weights",
    "run-kept/_tmp-checkpoint_manager_snapshot.json-0a1b": b"partial",
    "run-crashed-early/.validate_storage_marker": b"",
    "run-crashed-early/tensorboard/events.out": b"events",
    "run-upload-interrupted/checkpoint-00000001/deepspeed/latest": b"x",
    "run-never-committed/checkpoint-00000001/train_state.json": STATE,  # uploaded; Ray Train did not commit it
    "run-exported/.validate_storage_marker": b"",  # the final checkpoint's upload failed after the export
    "run-exported/export/export.json": b"{}",
    "run-exported/export/trainable.safetensors": b"weights",
    "pairs/shard-00000.parquet": b"data",
    "pairs/shard-00000.json": b"{}",
    "pairs/_tmp-shard-00001.parquet-5f3e": b"partial",
    "not-a-run/notes.txt": b"keep me",
}
REMOVED_RUNS = ["run-crashed-early", "run-never-committed", "run-upload-interrupted"]
REMOVED_TEMPORARY = ["pairs/_tmp-shard-00001.parquet-5f3e", "run-kept/_tmp-checkpoint_manager_snapshot.json-0a1b"]


def write_tree(root: str) -> None:
    fs, path = storage.filesystem_for(root)
    for name, data in TREE.items():
        if storage.is_local(root):
            fs.makedirs(f"{path}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{name}", data)


def remaining(root: str) -> set[str]:
    fs, path = storage.filesystem_for(root)
    fs.invalidate_cache()
    return {name[len(path.rstrip("/")) + 1 :] for name in fs.find(path)}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs"


def test_plan_lists_exactly_the_runs_without_checkpoint_and_the_orphans(root):
    write_tree(root)
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    plan = plan_clean(root, min_age_s=3600, now=later)
    assert plan.runs == [storage.join(root, name) for name in REMOVED_RUNS]
    assert plan.temporary == [storage.join(root, name) for name in REMOVED_TEMPORARY]
    assert plan.kept == {storage.join(root, "run-kept"): "has a committed checkpoint",
                         storage.join(root, "run-exported"): "has an export"}
    assert remaining(root) == set(TREE)  # planning deletes nothing

    apply_clean(plan)
    expected = {name for name in TREE if name.split("/")[0] not in REMOVED_RUNS and name not in REMOVED_TEMPORARY}
    assert remaining(root) == expected


def test_recent_runs_and_writes_are_left_alone(root):
    write_tree(root)
    plan = plan_clean(root, min_age_s=3600)  # everything was written just now
    assert plan.runs == [] and plan.temporary == []
    assert set(plan.kept) == {storage.join(root, name) for name in ("run-kept", "run-exported", *REMOVED_RUNS)}
    assert "may still be running" in plan.kept[storage.join(root, "run-crashed-early")]


def test_cli_is_a_dry_run_unless_told_yes(tmp_path):
    root = str(tmp_path / "runs")
    write_tree(root)
    runner = CliRunner()
    dry = runner.invoke(app, ["runs", "clean", root, "--min-age", "0"])
    assert dry.exit_code == 0, dry.output
    assert "would remove 3 run folder(s), 2 temporary object(s); kept 2 run(s)" in dry.output
    assert f"would remove: {root}/run-crashed-early/ (no committed checkpoint, no export)" in dry.output
    assert "dry run: nothing was deleted; pass --yes to delete" in dry.output
    assert remaining(root) == set(TREE)

    done = runner.invoke(app, ["runs", "clean", root, "--min-age", "0", "--yes"])
    assert done.exit_code == 0, done.output
    assert "removed 3 run folder(s), 2 temporary object(s); kept 2 run(s)" in done.output
    assert "run-kept/checkpoint-00000002/train_state.json" in remaining(root)
    assert not any(name.startswith(tuple(REMOVED_RUNS)) for name in remaining(root))
    assert fsspec.filesystem("file").exists(f"{root}/not-a-run/notes.txt")


def test_a_live_run_without_a_checkpoint_is_kept_by_its_heartbeat(root):
    """A run that has not committed its first checkpoint and wrote nothing since it started is still running while
    its rank 0's heartbeat beats (here every 0.2 s, against a min age of 2 s; S3 times are whole seconds); once the
    run ends, its folder can go."""
    run = storage.join(root, "run-slow")
    storage.write_bytes_atomic(storage.join(run, ".validate_storage_marker"), b"")  # Ray Train's, once at start
    with Heartbeat(run, interval_s=0.2):
        first = storage.read_bytes(storage.join(run, HEARTBEAT))
        time.sleep(3)
        assert json.loads(first)["host"] == socket.gethostname()
        assert storage.read_bytes(storage.join(run, HEARTBEAT)) != first  # it beat again
        plan = plan_clean(root, min_age_s=2)
        assert plan.runs == [] and "may still be running" in plan.kept[run]
    time.sleep(3)
    assert plan_clean(root, min_age_s=2).runs == [run]  # no beat since the run ended
