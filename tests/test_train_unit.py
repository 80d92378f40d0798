"""Training job pieces without Ray: data plan, CFG dropout, LR schedule, DeepSpeed config, configs, input checks."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import re
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import commit_checkpoint
from typer.testing import CliRunner

from jobs.train import main as train_main
from videodpo_ray import shards
from videodpo_ray.cli import app
from videodpo_ray.config import dump_config, load_config
from videodpo_ray.errors import CheckpointError, ConfigError, ShardError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.seeds import derive_seed, drops_prompt, pair_noise_seeds
from videodpo_ray.shards import ShardInfo
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.training.config import TrainConfig, deepspeed_config, lr_multiplier
from videodpo_ray.training.data import PairLoader, _prefetched
from videodpo_ray.training.inputs import (
    completed_checkpoint,
    schedule_change,
    settle_memory_layout,
    validate_inputs,
)
from videodpo_ray.training.plan import DataPosition, PairPlan, RowRef
from videodpo_ray.training.synthetic import synthetic_pair_rows, write_synthetic_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fake_shards(*rows: int) -> list[ShardInfo]:
    return [ShardInfo("pairs", i, f"mem://pairs/shard-{i:05d}.parquet", "", n, 1, "x") for i, n in enumerate(rows)]


def plan(rows=(3, 5, 4, 1), workers=2, per_worker=1, accum=2, seed=7) -> PairPlan:
    return PairPlan(fake_shards(*rows), seed=seed, num_workers=workers, pairs_per_worker=per_worker, grad_accum=accum)


# --- data plan ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers,per_worker,accum", [(2, 1, 2), (3, 2, 1), (1, 1, 1), (4, 1, 3)])
def test_each_epoch_sees_each_pair_at_most_once_and_drops_less_than_a_step(workers, per_worker, accum):
    p = plan(workers=workers, per_worker=per_worker, accum=accum)
    for epoch in range(3):
        seen = [ref for rank in range(workers) for _, _, refs in p.micro_batches(epoch, rank) for ref in refs]
        assert len(seen) == len(set(seen)) == p.steps_per_epoch * p.pairs_per_step
        assert p.num_pairs - len(seen) < p.pairs_per_step
        assert set(seen) <= {RowRef(s, r) for s, n in enumerate((3, 5, 4, 1)) for r in range(n)}


def test_the_micro_batch_layout_changes_neither_a_step_s_pairs_nor_their_noise_seeds():
    """`data.pairs_per_worker: auto` packs a worker's grad_accum pairs into fewer micro-batches: each pair must stay
    in the same step on the same rank, with the same noise seed (what it trains on), in every layout."""

    def seeds_by_pair(per_worker: int, accum: int) -> dict[tuple[int, int, RowRef], int]:
        layout = plan(rows=(6, 6, 6), workers=2, per_worker=per_worker, accum=accum)
        return {
            (step, rank, ref): seed
            for rank in range(2)
            for step, micro, refs in layout.micro_batches(0, rank)
            for ref, seed in zip(refs, pair_noise_seeds(5, step, rank, micro, per_worker), strict=True)
        }

    one_by_one = seeds_by_pair(1, 4)
    assert len(one_by_one) == 16 and len(set(one_by_one.values())) == 16
    assert seeds_by_pair(2, 2) == one_by_one
    assert seeds_by_pair(4, 1) == one_by_one
    assert pair_noise_seeds(5, 0, 1, 2, 1) == [derive_seed(5, "noise", 0, 1, 2)]  # unchanged for 1 pair per micro


def test_plan_is_deterministic_and_reshuffles_every_epoch():
    assert plan().epoch_order(0) == plan().epoch_order(0)
    assert plan().epoch_order(0) != plan().epoch_order(1)
    assert plan().epoch_order(0) != plan(seed=8).epoch_order(0)
    # a shard-sized shuffle window: each shard's rows stay contiguous in the epoch order
    order = plan().epoch_order(0)
    runs = [ref.shard for i, ref in enumerate(order) if i == 0 or order[i - 1].shard != ref.shard]
    assert sorted(runs) == [0, 1, 2, 3]


def test_starting_at_a_step_continues_exactly_the_uninterrupted_sequence():
    p = plan(rows=(6, 6, 6), workers=2, per_worker=1, accum=2)
    for rank in range(2):
        full = list(p.micro_batches(1, rank))
        for start in range(p.steps_per_epoch + 1):
            assert list(p.micro_batches(1, rank, start_step=start)) == full[start * 2 :]


def test_consumed_position_counts_rows_per_shard():
    p = plan(rows=(4, 4), workers=2, per_worker=1, accum=1)
    consumed = p.consumed(DataPosition(epoch=0, step_in_epoch=3))
    assert consumed["pairs_consumed"] == 6
    assert sum(consumed["rows_consumed_per_shard"].values()) == 6
    assert p.consumed(DataPosition(0, 0))["rows_consumed_per_shard"] == {}


def test_too_few_pairs_for_one_step_is_an_error():
    with pytest.raises(ShardError, match="fewer than one optimizer step needs"):
        plan(rows=(3,), workers=2, per_worker=1, accum=2)


def test_cfg_dropout_is_deterministic_per_seed_pair_epoch_and_has_the_rate():
    ids = [f"p{i}/a/b" for i in range(20000)]
    dropped = [drops_prompt(0, pair_id, 0, 0.2) for pair_id in ids]
    assert dropped == [drops_prompt(0, pair_id, 0, 0.2) for pair_id in ids]
    assert abs(sum(dropped) / len(ids) - 0.2) < 0.01
    other_epoch = [drops_prompt(0, pair_id, 1, 0.2) for pair_id in ids]
    assert 0.25 < sum(a != b for a, b in zip(dropped, other_epoch)) / len(ids) < 0.39  # 2 * 0.2 * 0.8 = 0.32
    assert not any(drops_prompt(0, pair_id, 0, 0.0) for pair_id in ids[:100])
    assert all(drops_prompt(0, pair_id, 0, 1.0) for pair_id in ids[:100])


def test_derive_seed_is_stable():
    assert derive_seed(0, "noise", 3, 1, 0) == derive_seed(0, "noise", 3, 1, 0)
    assert derive_seed(0, "noise", 3, 1, 0) != derive_seed(0, "noise", 3, 0, 1)
    digest = hashlib.blake2b(b"1/x", digest_size=8).digest()
    assert derive_seed(1, "x") == int.from_bytes(digest, "little") >> 1


# --- optimizer, DeepSpeed and configs -------------------------------------------------------------------------------


def test_lr_multiplier_hand_values():
    kw = dict(warmup_steps=2, total_steps=10)
    assert [lr_multiplier(s, schedule="constant", **kw) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier(6, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(10, schedule="linear", **kw) == 0.0
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(4, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_reference_recipe_config():
    config = load_config(TrainConfig, CONFIGS / "train_vc2_full.yaml")
    assert (config.model.family, config.model.finetune, config.model.fps) == ("vc2", "full", 16)
    assert config.model.gradient_checkpointing == "auto"  # off if the micro-batch fits without it
    assert config.pairs_per_step == 8 and config.dpo.beta_dpo == 5000 and config.data.cfg_dropout == 0.2
    assert config.data.pairs_per_worker == "auto"  # 2 pairs per worker per step, in one micro-batch if they fit
    ds = deepspeed_config(config.with_micro_batch(2, 1).with_gradient_checkpointing(False))
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 6e-6, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": 0.01, "torch_adam": True}}
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False}
    assert config.optim.schedule == "constant" and config.optim.warmup_steps == 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train_*.yaml")), ids=lambda p: p.name)
def test_every_train_config_loads(path):
    config = load_config(TrainConfig, path)
    settled = config.with_micro_batch(config.micro_batch, config.optim.grad_accum).with_gradient_checkpointing(
        config.model.gradient_checkpointing is True)  # auto settled as on the CPU
    assert deepspeed_config(settled)["train_batch_size"] == config.pairs_per_step


def test_config_errors_are_clear():
    base = ["data.pairs_url=/x", "run.name=r", "run.storage_path=/y"]
    with pytest.raises(ConfigError, match="bf16=true needs scaling.use_gpu"):
        load_config(TrainConfig, None, [*base, "deepspeed.bf16=on"])  # "on": text, which a bool field reads as true
    with pytest.raises(ConfigError, match="optim.lr_typo"):
        load_config(TrainConfig, None, [*base, "optim.lr_typo=1"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load_config(TrainConfig, None, [*base, "deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="run.name"):
        load_config(TrainConfig, None, ["data.pairs_url=/x", "run.storage_path=/y"])
    for seed in ("run.seed=-1", "data.shuffle_seed=-1"):  # numpy's generators refuse them: here, not in the workers
        with pytest.raises(ConfigError, match=rf"{seed.split('=')[0]}: Input should be greater than or equal to 0"):
            load_config(TrainConfig, None, [*base, seed])


def test_the_prefetch_thread_ends_when_training_stops_early():
    """`data.max_steps` reached with micro-batches still buffered: the producer thread ends instead of blocking."""
    batches = _prefetched(iter(range(5)), 2)
    assert next(batches) == 0
    batches.close()
    deadline = time.monotonic() + 5.0
    while any(t.name == "pair-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "pair-prefetch" for t in threading.enumerate())


# --- input validation (before any worker starts) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cogvideox():
    torch.manual_seed(0)
    return build_model(ModelConfig(family="cogvideox", variant="tiny", finetune="lora", lora={"rank": 2}))


@pytest.fixture(scope="module")
def pair_rows(tiny_cogvideox):
    return synthetic_pair_rows(tiny_cogvideox, num_pairs=4, num_frames=9, height=16, width=16)


def train_config(tmp_path: Path, pairs: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"data.pairs_url={pairs}", "run.name=unit", f"run.storage_path={tmp_path / 'runs'}",
        "model.family=cogvideox", "scaling.num_workers=2", *overrides,
    ])


def commit_raw_parquet(root: Path, table: pa.Table, index: int = 0) -> None:
    """Write a parquet + manifest exactly as write_shard would, but without its schema checks (bad shards)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    directory = root / "pairs"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"shard-{index:05d}.parquet").write_bytes(data)
    manifest = {"kind": "pairs", "index": index, "num_rows": table.num_rows, "num_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "schema_version": shards.SCHEMA_VERSION,
                "file": f"shard-{index:05d}.parquet"}
    (directory / f"shard-{index:05d}.json").write_text(json.dumps(manifest))


def test_validate_accepts_good_shards(tmp_path, pair_rows):
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    p = validate_inputs(train_config(tmp_path, tmp_path))
    assert (p.num_pairs, p.steps_per_epoch) == (4, 2)


def test_validate_no_shards(tmp_path):
    with pytest.raises(ShardError, match="no committed pair shards under"):
        validate_inputs(train_config(tmp_path, tmp_path))


def test_validate_empty_shard(tmp_path, pair_rows):
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    commit_raw_parquet(tmp_path, shards.make_table("pairs", pair_rows).slice(0, 0), index=1)
    with pytest.raises(ShardError, match=r"shard-00001\.parquet: empty shard"):
        validate_inputs(train_config(tmp_path, tmp_path))


def test_validate_schema_mismatch_names_shard_and_field(tmp_path, pair_rows):
    table = shards.make_table("pairs", pair_rows)
    commit_raw_parquet(tmp_path, table.set_column(table.schema.get_field_index("weight"), "weight",
                                                  table.column("weight").cast(pa.float64())))
    with pytest.raises(ShardError, match=r"shard-00000\.parquet: schema mismatch in field 'weight'"):
        validate_inputs(train_config(tmp_path, tmp_path))
    commit_raw_parquet(tmp_path, table.drop_columns(["prompt"]))
    with pytest.raises(ShardError, match="missing field 'prompt'"):
        validate_inputs(train_config(tmp_path, tmp_path))


def test_validate_missing_checkpoint_path(tmp_path, pair_rows):
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    with pytest.raises(ConfigError, match=r"model.path: checkpoint path .*nowhere does not exist"):
        validate_inputs(train_config(tmp_path, tmp_path, f"model.path={tmp_path / 'nowhere'}"))


def test_validate_zero3_needs_stored_latents(tmp_path, tiny_cogvideox):
    rows = synthetic_pair_rows(tiny_cogvideox, num_pairs=2, num_frames=9, height=16, width=16, with_latents=False)
    shards.write_shard(shards.make_table("pairs", rows), str(tmp_path), "pairs", 0)
    config = train_config(tmp_path, tmp_path, "deepspeed.zero_stage=3")
    with pytest.raises(ShardError, match="2 row.* without win_latents; ZeRO-3 training needs stored latents"):
        validate_inputs(config)
    validate_inputs(train_config(tmp_path, tmp_path, "deepspeed.zero_stage=2"))


def test_resume_with_another_world_size_is_refused_before_start(tmp_path, pair_rows):
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    config = train_config(tmp_path, tmp_path)
    frozen = [dataclasses.asdict(info) for info in shards.list_shards(str(tmp_path), "pairs")]
    saved = ckpt.TrainState(global_step=2, epoch=0, step_in_epoch=2, total_steps=4, world_size=2, zero_stage=2,
                            pairs_per_worker=1, grad_accum=1, seed=0, shards=frozen)
    commit_checkpoint(tmp_path / "runs" / "unit", saved.to_json(), 2)
    validate_inputs(config)
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match="scaling.num_workers is 1 but the checkpoint was saved with 2.*not resharded"):
        validate_inputs(train_config(tmp_path, tmp_path, "scaling.num_workers=1", "data.pairs_per_worker=2"))


@pytest.mark.parametrize("text", ["{not json", '{"global_step": 1}'])
def test_a_train_state_this_version_cannot_read_is_named(text, tmp_path, pair_rows):
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    checkpoint = commit_checkpoint(tmp_path / "runs" / "unit", text, 1)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(checkpoint / ckpt.TRAIN_STATE))}: not a train state"):
        validate_inputs(train_config(tmp_path, tmp_path))


@pytest.mark.parametrize("change", ["rewritten", "gone", "added"])
def test_a_resume_checks_the_frozen_shards_before_any_worker(change, tmp_path, pair_rows):
    for index in (0, 1):
        rows = pair_rows[2 * index:2 * index + 2]
        shards.write_shard(shards.make_table("pairs", rows), str(tmp_path), "pairs", index)
    config = train_config(tmp_path, tmp_path, "data.pairs_per_worker=1", "optim.grad_accum=1", "data.max_steps=null")
    listed = shards.list_shards(str(tmp_path), "pairs")
    frozen = PairPlan(listed, seed=0, num_workers=2, pairs_per_worker=1, grad_accum=1).to_json()
    state = ckpt.TrainState(global_step=1, epoch=0, step_in_epoch=1, total_steps=2, world_size=2, zero_stage=2,
                            pairs_per_worker=1, grad_accum=1, seed=0, shards=frozen)
    checkpoint = commit_checkpoint(tmp_path / "runs" / "unit", state.to_json(), 1)
    if change == "rewritten":  # other pairs under the same index
        shards.write_shard(shards.make_table("pairs", pair_rows[:1]), str(tmp_path), "pairs", 1, overwrite=True)
    elif change == "gone":
        shards.uncommit_shard(str(tmp_path), "pairs", 1)
    else:  # a shard committed after the run started: not in its plan, which stays the frozen one
        shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 2)
        plan = validate_inputs(config)
        assert [info.url for info in plan.shards] == [info.url for info in listed] and plan.num_pairs == 4
        return
    what = r"was rewritten \(2 rows, sha256 .* then; 1 rows" if change == "rewritten" else "is gone"
    with pytest.raises(ShardError, match=rf"cannot resume from {re.escape(str(checkpoint))}: .*"
                                         rf"shard-00001\.parquet {what}"):
        validate_inputs(config)


def test_a_finished_run_is_recognised_from_storage_before_any_worker(tmp_path, pair_rows):
    """Finished = the last checkpoint is at the step count the config asks for over the run's frozen shards."""
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    layout = ["data.pairs_per_worker=1", "optim.grad_accum=1", "data.max_steps=null"]  # 2 steps per epoch of 4 pairs
    config = train_config(tmp_path, tmp_path, *layout, "data.epochs=1")
    assert completed_checkpoint(config) is None  # no checkpoint yet
    frozen = PairPlan(shards.list_shards(str(tmp_path), "pairs"), seed=0, num_workers=2, pairs_per_worker=1,
                      grad_accum=1).to_json()
    run = tmp_path / "runs" / "unit"
    for step in (1, 2):
        state = ckpt.TrainState(global_step=step, epoch=step // 2, step_in_epoch=step % 2, total_steps=2,
                                world_size=2, zero_stage=2, pairs_per_worker=1, grad_accum=1, seed=0, shards=frozen)
        if step == 2:  # uploaded, but not committed yet: Ray Train would resume from step 1
            uploaded = run / ckpt.checkpoint_dir_name(2)
            uploaded.mkdir()
            (uploaded / ckpt.TRAIN_STATE).write_text(state.to_json())
            assert completed_checkpoint(config) is None
        directory = commit_checkpoint(run, state.to_json(), step)
        final = completed_checkpoint(config)
        assert final == (str(directory) if step == 2 else None)
    assert completed_checkpoint(train_config(tmp_path, tmp_path, *layout, "data.epochs=2")) is None  # continues
    assert completed_checkpoint(train_config(tmp_path, tmp_path, *layout[:2], "data.epochs=2", "data.max_steps=2"))
    # continuing with more steps recomputes a decaying schedule: said before the run starts
    assert schedule_change(train_config(tmp_path, tmp_path, *layout, "data.epochs=2")) is None  # constant LR
    cosine = train_config(tmp_path, tmp_path, *layout, "data.epochs=2", "optim.schedule=cosine", "optim.lr=1e-4")
    assert schedule_change(cosine) == ("the run now has 4 steps, its checkpoint was trained towards 2: the cosine LR "
                                       "schedule is recomputed over 4 steps, so at step 2 the LR goes from 0 to 5e-05")
    assert schedule_change(train_config(tmp_path, tmp_path, *layout, "data.epochs=1", "optim.schedule=cosine")) is None


def commit_run_checkpoint(tmp_path: Path, pairs: Path, step: int, *overrides: str) -> Path:
    """A committed checkpoint of run "unit" at `step` (2 steps per epoch of 4 pairs on 2 workers) holding the
    settled config of `overrides`, as the train worker writes it."""
    config = train_config(tmp_path, pairs, "data.pairs_per_worker=1", "optim.grad_accum=1", *overrides)
    frozen = PairPlan(shards.list_shards(str(pairs), "pairs"), seed=0, num_workers=2, pairs_per_worker=1,
                      grad_accum=1).to_json()
    state = ckpt.TrainState(global_step=step, epoch=step // 2, step_in_epoch=step % 2, total_steps=2, world_size=2,
                            zero_stage=2, pairs_per_worker=1, grad_accum=1, seed=0, shards=frozen)
    directory = commit_checkpoint(tmp_path / "runs" / "unit", state.to_json(), step)
    (directory / ckpt.CONFIG_FILE).write_text(dump_config(config))
    return directory


@pytest.mark.parametrize("change, message", [
    ("optim.lr=1e-3", "optim.lr is 0.001 but the checkpoint was saved with 6e-06"),
    ("dpo.beta_dpo=100", "dpo.beta_dpo is 100.0 but the checkpoint was saved with 5000.0"),
    ("run.seed=99", "run.seed is 99 but the checkpoint was saved with 0"),
    ("model.finetune=lora", "model.finetune is lora but the checkpoint was saved with full"),
    ("data.swap_winner_loser=true", "data.swap_winner_loser is True but the checkpoint was saved with False"),
    ("data.pairs_url={other}", "data.pairs_url is {other} but the checkpoint was saved with {pairs}"),
])
def test_a_resume_with_a_setting_that_changes_the_numbers_is_refused_naming_it(tmp_path, pair_rows, change, message):
    pairs, other = tmp_path / "pairs", tmp_path / "other"
    for root in (pairs, other):
        shards.write_shard(shards.make_table("pairs", pair_rows), str(root), "pairs", 0)
    commit_run_checkpoint(tmp_path, pairs, 1)
    validate_inputs(train_config(tmp_path, pairs))
    config = train_config(tmp_path, pairs, change.format(other=other))
    with pytest.raises(ckpt.CheckpointMismatchError) as refused:
        validate_inputs(config)
    assert message.format(other=other, pairs=pairs) in str(refused.value)
    assert str(refused.value).endswith("Resume with the checkpoint's settings, or start a new run (another run.name).")


def test_a_resume_may_change_the_step_count_checkpointing_export_and_memory_settings(tmp_path, pair_rows):
    pairs = tmp_path / "pairs"
    shards.write_shard(shards.make_table("pairs", pair_rows), str(pairs), "pairs", 0)
    commit_run_checkpoint(tmp_path, pairs, 1)
    allowed = ["data.max_steps=5", "data.epochs=3", "run.checkpoint_every=7", "run.num_to_keep=null",
               "export.dtype=bfloat16", "data.prefetch_batches=0", "scaling.cpus_per_worker=3",
               "data.pairs_per_worker=auto", "deepspeed.bf16=false"]  # auto and bf16 auto settled as recorded (CPU)
    for change in allowed:
        config = settle_memory_layout(train_config(tmp_path, pairs, change))
        validate_inputs(config)
        assert completed_checkpoint(config) is None, change


def test_every_changed_setting_is_listed_in_one_message(tmp_path, pair_rows):
    pairs = tmp_path / "pairs"
    shards.write_shard(shards.make_table("pairs", pair_rows), str(pairs), "pairs", 0)
    directory = commit_run_checkpoint(tmp_path, pairs, 1)
    config = train_config(tmp_path, pairs, "optim.lr=1e-3", "dpo.beta_dpo=100", "compile=true", "scaling.num_workers=1",
                          "data.pairs_per_worker=2")
    with pytest.raises(ckpt.CheckpointMismatchError) as refused:
        validate_inputs(config)
    assert str(refused.value) == (
        f"cannot resume run 'unit' from {directory}: scaling.num_workers is 1 but the checkpoint was saved with 2; "
        "data.pairs_per_worker is 2 but the checkpoint was saved with 1; dpo.beta_dpo is 100.0 but the checkpoint "
        "was saved with 5000.0; optim.lr is 0.001 but the checkpoint was saved with 6e-06; compile is True but the "
        f"checkpoint was saved with False. {ckpt.LAYOUT_WHY} {ckpt.SETTINGS_WHY} Resume with the checkpoint's "
        "settings, or start a new run (another run.name).")


def test_a_checkpoint_past_the_new_step_count_is_refused_and_one_at_it_is_complete(tmp_path, pair_rows):
    pairs = tmp_path / "pairs"
    shards.write_shard(shards.make_table("pairs", pair_rows), str(pairs), "pairs", 0)
    directory = commit_run_checkpoint(tmp_path, pairs, 2)  # the run's final step of 2
    assert completed_checkpoint(train_config(tmp_path, pairs, "data.max_steps=2")) == str(directory)
    assert completed_checkpoint(train_config(tmp_path, pairs, "data.epochs=2")) is None  # continues
    lowered = train_config(tmp_path, pairs, "data.max_steps=1")
    validate_inputs(lowered)  # the step count may change ...
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"data.max_steps 1 and data.epochs 1 make 1 steps, but the checkpoint is at step 2 "
                             r"\(trained towards 2\). Raise data.max_steps or data.epochs to at least 2 steps"):
        completed_checkpoint(lowered)  # ... but not to below the checkpoint's step


def test_a_broken_checkpoint_record_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.RAY_CHECKPOINT_SNAPSHOT).write_text('{"latest_checkpoint_result": {"checkpoint_dir')
    with pytest.raises(CheckpointError, match=r"checkpoint_manager_snapshot.json: Ray Train's checkpoint record"):
        ckpt.latest_checkpoint_state(str(run))
    (run / ckpt.RAY_CHECKPOINT_SNAPSHOT).write_text('{"latest_checkpoint_result": null}')  # nothing committed yet
    assert ckpt.latest_checkpoint_state(str(run)) is None
    commit_checkpoint(run, "{}", 3)
    (run / ckpt.checkpoint_dir_name(3) / ckpt.TRAIN_STATE).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-00000003: committed by Ray Train but without train_state"):
        ckpt.latest_checkpoint_state(str(run))


def test_train_cli_reports_bad_input_and_exits_2(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {{pairs_url: {tmp_path}}}\nrun: {{name: r, storage_path: {tmp_path}/runs}}\n")
    assert train_main([str(config)]) == 2
    assert "no committed pair shards" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read config" in result.output


# --- reading pairs --------------------------------------------------------------------------------------------------


def test_stored_latents_equal_vae_encoding_of_the_mp4s(tmp_path, tiny_cogvideox, pair_rows):
    shards.write_shard(shards.make_table("pairs", pair_rows), str(tmp_path), "pairs", 0)
    p = PairPlan(shards.list_shards(str(tmp_path), "pairs"), seed=0, num_workers=1, pairs_per_worker=2, grad_accum=1)
    space = tiny_cogvideox.latent_space
    stored = list(PairLoader(p, epoch=0, rank=0, start_step=0, latent_space=space))
    decoded = list(PairLoader(p, epoch=0, rank=0, start_step=0, latent_space=space, use_stored_latents=False,
                              prefetch=0))
    assert [b.pair_ids for b in stored] == [b.pair_ids for b in decoded] and len(stored) == 2
    for with_latents, with_frames in zip(stored, decoded):
        for a, b in zip(with_latents.pairs, with_frames.pairs):
            assert a.win_frames is None and b.win_latents is None
            encoded = tiny_cogvideox.encode_videos(torch.stack([b.win_frames, b.lose_frames]))
            torch.testing.assert_close(encoded, torch.stack([a.win_latents, a.lose_latents]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("made_by", ["another family", "another VAE scale"])
def test_latents_of_another_family_or_vae_are_refused(made_by, tmp_path, pair_rows, tiny_cogvideox):
    if made_by == "another family":
        other = build_model(ModelConfig(family="vc2", variant="tiny"))
    else:
        other = copy.deepcopy(tiny_cogvideox)  # CogVideoX 5B's VAE scale (0.7) against 2B's (1.15258426)
        other.vae.register_to_config(scaling_factor=0.7)
    assert other.latent_space != tiny_cogvideox.latent_space
    rows = [dict(row, latent_model=other.latent_space) for row in pair_rows]
    shards.write_shard(shards.make_table("pairs", rows), str(tmp_path), "pairs", 0)
    p = PairPlan(shards.list_shards(str(tmp_path), "pairs"), seed=0, num_workers=1, pairs_per_worker=1, grad_accum=1)
    made = re.escape(repr(other.latent_space))
    with pytest.raises(ShardError, match=rf"shard-00000\.parquet row \d: latents were made by the VAE {made}"):
        next(iter(PairLoader(p, epoch=0, rank=0, start_step=0, latent_space=tiny_cogvideox.latent_space)))


def test_pair_without_latents_or_videos_is_refused(tmp_path, pair_rows, tiny_cogvideox):
    rows = [dict(row, win_latents=None, win_video=None) for row in pair_rows]
    shards.write_shard(shards.make_table("pairs", rows), str(tmp_path), "pairs", 0)
    p = PairPlan(shards.list_shards(str(tmp_path), "pairs"), seed=0, num_workers=1, pairs_per_worker=1, grad_accum=1)
    with pytest.raises(ShardError, match="row .*has neither latents nor both videos"):
        next(iter(PairLoader(p, epoch=0, rank=0, start_step=0, latent_space=tiny_cogvideox.latent_space)))


def test_synthetic_shards_and_export_round_trip(tmp_path, tiny_cogvideox):
    infos = write_synthetic_pairs(tiny_cogvideox, str(tmp_path), num_pairs=3, pairs_per_shard=2, num_frames=9,
                                  height=16, width=16, with_videos=False)
    assert [info.num_rows for info in infos] == [2, 1]
    weights = tiny_cogvideox.trainable_state_dict()
    url = ckpt.write_export(weights, tiny_cogvideox.config, str(tmp_path / "export"), step=3, dtype="float32",
                            init_seed=0)
    assert url.endswith("trainable.safetensors")
    loaded = ckpt.load_exported_model(str(tmp_path / "export"))
    for name, tensor in loaded.trainable_state_dict().items():
        assert torch.equal(tensor, weights[name])
    # the base (random init under the run seed) is rebuilt identically
    base = dict(loaded.named_parameters())
    for name, tensor in tiny_cogvideox.named_parameters():
        assert torch.equal(base[name], tensor), name
    # a rewrite interrupted after the weights: export.json still names the old ones
    info = json.loads((tmp_path / "export" / ckpt.EXPORT_INFO).read_text())
    (tmp_path / "export" / ckpt.EXPORT_WEIGHTS).write_bytes(b"x" + Path(url).read_bytes()[1:])
    with pytest.raises(CheckpointError, match=rf"trainable.safetensors: not the weights export.json records "
                                              rf"\(sha256 {info['weights_sha256']}\)"):
        ckpt.load_exported_model(str(tmp_path / "export"))
