"""Fault injection on real Ray Train + DeepSpeed ZeRO-3 runs (2 CPU workers, tiny CogVideoX, full finetune).

One uninterrupted run is the baseline; a run whose worker is SIGKILLed (max_failures=1) and a run whose driver is
SIGKILLed and resubmitted must end with bit-identical weights and the same pairs per step. NaN loss must stop a run
without touching its last good checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from jobs.train import run_training
from videodpo_ray import shards, tensor_bytes
from videodpo_ray.config import dump_config, load_config
from videodpo_ray.errors import NonFiniteTrainingError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig
from videodpo_ray.training.inputs import validate_inputs
from videodpo_ray.training.plan import PairPlan
from videodpo_ray.training.synthetic import TINY_VIDEO_SIZES, write_synthetic_pairs

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(family="cogvideox", variant="tiny", finetune="full")
NUM_PAIRS = 12  # 2 workers x 1 pair x accumulation 2 = 4 pairs per step: 3 steps per epoch, 2 epochs = 6 steps


pytestmark = pytest.mark.slow  # ~5 min of killed and restarted Ray Train runs: `make test-all` and CI run them


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-pairs")
    model = build_model(MODEL, seed=0)
    write_synthetic_pairs(model, str(root), num_pairs=NUM_PAIRS, pairs_per_shard=5, num_frames=9, height=16, width=16,
                          with_videos=False)
    return root


def fault_config(pairs: Path, storage: Path, name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"model={MODEL.model_dump_json()}",
        f"data.pairs_url={pairs}", "data.epochs=2", "data.pairs_per_worker=1",
        "optim.grad_accum=2", "optim.lr=1e-3", "optim.grad_clip=1.0",
        "scaling.num_workers=2", "deepspeed.zero_stage=3",
        # partition every parameter (the tiny model's tensors are all below the default persistence threshold)
        "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
        f"run.name={name}", f"run.storage_path={storage}", "run.checkpoint_every=2", "run.num_to_keep=2",
        *overrides,
    ])


def exported_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    return ckpt.load_export(f"{ckpt.run_dir(config)}/{ckpt.EXPORT_DIR}")[1]


def final_pair_log(result) -> list[dict]:
    with result.checkpoint.as_directory() as directory:
        return ckpt.read_pair_log(Path(directory, ckpt.PAIR_LOG).read_text())


def first_step_per_event_file(config: TrainConfig) -> list[int]:
    """The first step each TensorBoard event file (one per rank-0 incarnation) logged, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    directory = Path(ckpt.run_dir(config), "tensorboard")
    firsts = []
    for path in sorted(directory.iterdir()):
        steps = [event.step for event in EventFileLoader(str(path)).Load() if event.HasField("summary")]
        firsts.append(min(steps))
    return firsts


@pytest.fixture(scope="module")
def baseline(pairs_root, tmp_path_factory, ray_cluster):
    config = fault_config(pairs_root, tmp_path_factory.mktemp("baseline-runs"), "baseline")
    result = run_training(config)
    assert result.error is None
    log = final_pair_log(result)
    assert [entry["step"] for entry in log] == list(range(6))
    for epoch in (0, 1):  # every pair exactly once per epoch (12 pairs, 3 steps of 4)
        ids = [pair_id for entry in log if entry["epoch"] == epoch for pair_id in entry["pair_ids"]]
        assert len(ids) == len(set(ids)) == NUM_PAIRS
    return exported_weights(config), log


def assert_same_weights(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(weights[name], expected[name])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def killing_train_fn(marker: Path, rank: int, step: int):
    """The real train function, but worker `rank` SIGKILLs itself before step `step`, once (marker file)."""

    def train_fn(config: dict) -> None:
        from actors import train_worker as loop

        original = loop.DPOWorker._train_step

        def train_step(self, batches):
            if self.rank == rank and self.global_step == step and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, batches)

        loop.DPOWorker._train_step = train_step
        loop.train_loop_per_worker(config)

    return train_fn


def test_worker_killed_mid_run_recovers_bit_identical(baseline, pairs_root, tmp_path, ray_cluster):
    config = fault_config(pairs_root, tmp_path / "runs", "worker-kill", "run.max_failures=1")
    marker = tmp_path / "killed"
    # Before step 4 (0-based): each worker has reported step 3, so the controller consumed every worker's step-1
    # report (a worker's report queue holds one): the step-2 checkpoint is committed, the step-4 one may be.
    result = run_training(config, train_fn=killing_train_fn(marker, rank=1, step=4))
    assert marker.exists(), "the worker was never killed"
    assert result.error is None
    assert_same_weights(exported_weights(config), baseline[0])
    assert final_pair_log(result) == baseline[1]
    # the restarted group resumed from a committed checkpoint, not from scratch
    assert first_step_per_event_file(config) in ([0, 2], [0, 4])


def test_wan_worker_killed_mid_run_on_s3_recovers_bit_identical(s3_bucket, tmp_path, ray_cluster):
    """The Flow-DPO family like the others: tiny Wan LoRA, 5 steps, 2 workers under ZeRO-2, pairs and runs in a moto
    `s3://` bucket; a worker SIGKILLed before step 3 ends with the uninterrupted run's weights and pairs per step."""
    model_config = ModelConfig(family="wan", variant="tiny", finetune="lora", lora={"rank": 4})
    frames, height, width = TINY_VIDEO_SIZES["wan"]
    data_url = f"{s3_bucket}/pairs"
    write_synthetic_pairs(build_model(model_config, seed=0), data_url, num_pairs=10, pairs_per_shard=4,
                          num_frames=frames, height=height, width=width, with_videos=False)

    def wan_config(name: str, *overrides: str) -> TrainConfig:
        return load_config(TrainConfig, None, [
            f"model={model_config.model_dump_json()}", f"data.pairs_url={data_url}", "data.max_steps=5",
            "optim.lr=1e-3", "scaling.num_workers=2", "deepspeed.zero_stage=2",
            f"run.name={name}", f"run.storage_path={s3_bucket}/runs", "run.checkpoint_every=2", *overrides,
        ])

    baseline = wan_config("wan-baseline")
    expected = run_training(baseline)
    assert expected.error is None and [entry["step"] for entry in final_pair_log(expected)] == list(range(5))
    killed, marker = wan_config("wan-worker-kill", "run.max_failures=1"), tmp_path / "killed"
    result = run_training(killed, train_fn=killing_train_fn(marker, rank=1, step=3))
    assert marker.exists(), "the worker was never killed"
    assert result.error is None
    assert_same_weights(exported_weights(killed), exported_weights(baseline))
    assert final_pair_log(result) == final_pair_log(expected)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def latest_committed(config: TrainConfig) -> str | None:
    snapshot = Path(ckpt.run_dir(config), "checkpoint_manager_snapshot.json")
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def live_train_actors(other_than_job: str) -> list[str]:
    """Ray Train controller/worker actors still alive that belong to another job (the killed driver's)."""
    from ray._private import state

    return [f"{actor['ActorClassName']} (job {actor['JobID']})" for actor in state.actors().values()
            if actor["State"] == "ALIVE" and actor["JobID"] != other_than_job
            and actor["ActorClassName"] in ("RayTrainWorker", "TrainController")]


def test_driver_killed_then_resubmitted_resumes_bit_identical(baseline, pairs_root, tmp_path, ray_cluster):
    config = fault_config(pairs_root, tmp_path / "runs", "driver-kill")
    config_file = tmp_path / "train.yaml"
    config_file.write_text(dump_config(config))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-m", "jobs.train", str(config_file)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: latest_committed(config) is not None or driver.poll() is not None, 240, "a checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        output = driver.communicate()[0].decode(errors="replace")
    assert latest_committed(config) is not None, output[-3000:]
    this_job = ray_cluster.get_runtime_context().get_job_id()
    wait_for(lambda: not live_train_actors(this_job), 60, "the killed job's workers to exit")
    assert not Path(ckpt.run_dir(config), ckpt.EXPORT_DIR).exists(), "the run finished before the driver was killed"
    committed = latest_committed(config)

    result = run_training(config)  # the resubmission: same config, same run name and storage path
    assert result.error is None
    assert_same_weights(exported_weights(config), baseline[0])
    assert final_pair_log(result) == baseline[1]
    firsts = first_step_per_event_file(config)
    assert firsts[0] == 0 and firsts[-1] == int(committed.removeprefix(ckpt.CHECKPOINT_PREFIX)) > 0

    # the ZeRO-3 checkpoint of 2 workers cannot be resumed by another world size: refused before workers start
    message = "scaling.num_workers is 1 but the checkpoint was saved with 2"
    with pytest.raises(ckpt.CheckpointMismatchError, match=message):
        validate_inputs(config.model_copy(update={"scaling": config.scaling.model_copy(update={"num_workers": 1})}))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, ray_cluster):
    pairs = tmp_path / "pairs"
    model = build_model(MODEL, seed=0)
    # 13 pairs: each epoch leaves one pair out; poison the one epoch 0 leaves out, so epoch 0 trains cleanly
    write_synthetic_pairs(
        model, str(pairs), num_pairs=13, pairs_per_shard=7, num_frames=9, height=16, width=16, with_videos=False
    )
    config = fault_config(pairs, tmp_path / "runs", "nan", "deepspeed.zero_stage=2", "deepspeed.overrides={}",
                          "run.max_failures=2")  # Ray Train would retry a worker's error twice
    plan = PairPlan(
        shards.list_shards(str(pairs), "pairs"),
        seed=config.shuffle_seed,
        num_workers=2,
        pairs_per_worker=1,
        grad_accum=2,
    )
    streams = {epoch: [plan.worker_stream(epoch, rank) for rank in range(2)] for epoch in (0, 1)}
    seen_in_epoch0 = {ref for stream in streams[0] for ref in stream}
    (target,) = {ref for ref in plan.epoch_order(0)} - seen_in_epoch0
    rank, position = next((r, s.index(target)) for r, s in enumerate(streams[1]) if target in s)
    nan_step = plan.steps_per_epoch + position // 2  # 2 = pairs_per_worker x grad_accum
    last_good = nan_step - nan_step % 2  # checkpoint_every 2
    info = plan.shards[target.shard]
    rows = shards.read_shard(info).to_pylist()
    row = rows[target.row]
    latents = tensor_bytes.latents_from_bytes(row["win_latents"], row["latent_shape"], "float32")
    rows[target.row]["win_latents"] = tensor_bytes.latents_to_bytes(torch.full_like(latents, float("nan")))[0]
    shards.write_shard(shards.make_table("pairs", rows), str(pairs), "pairs", info.index, overwrite=True)

    # raised by the driver, not a worker failure (TrainingFailedError): Ray Train does not replay the same steps
    with pytest.raises(NonFiniteTrainingError) as failure:
        run_training(config)
    message = str(failure.value)
    assert f"non-finite DPO loss at step {nan_step} (0-based; epoch 1, micro-batch {position % 2})" in message
    assert f"rank {rank}: DPO loss nan on pairs ['{rows[target.row]['pair_id']}']" in message
    assert f"the last good checkpoint ({ckpt.checkpoint_dir_name(last_good)}) is kept" in message

    run_dir = Path(ckpt.run_dir(config))
    checkpoints = sorted(p.name for p in run_dir.glob(f"{ckpt.CHECKPOINT_PREFIX}*"))
    assert checkpoints[-1] == ckpt.checkpoint_dir_name(last_good) == latest_committed(config)
    state_file = run_dir / checkpoints[-1] / ckpt.TRAIN_STATE
    state = ckpt.TrainState.from_json(state_file.read_text(), str(state_file))
    assert state.global_step == last_good
    assert not (run_dir / ckpt.EXPORT_DIR).exists()
    assert yaml.safe_load((run_dir / checkpoints[-1] / "config.yaml").read_text())["run"]["name"] == "nan"
