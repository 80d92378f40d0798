"""Generate + Score without a Ray cluster: which errors are infrastructure faults, how a chunk is committed, and how a
rerun resumes one (the job driven in-process with Ray's connection stubbed: no sampler or scorer actor is started)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from videodpo_ray import shards, storage
from videodpo_ray.errors import ConfigError, VideoDecodeError, is_infrastructure_error
from videodpo_ray.models import ModelConfig
from videodpo_ray.stages.generate import (
    GenerateConfig,
    chunk_prompts,
    commit_chunk,
    plan_generate,
    record_devices,
    recorded_failures,
    retry_failed_chunks,
    sample_isolating_failures,
    sample_requests,
)
from videodpo_ray.stages.prompts import prompt_rows

PROMPTS = prompt_rows(["a corgi on the beach", "a red car at night"])


def _config(out: Path, **overrides) -> GenerateConfig:
    settings = {
        "prompts": "unused.txt",
        "out": str(out),
        "model": ModelConfig(family="vc2", variant="tiny"),
        "samples_per_prompt": 2,
        "prompts_per_chunk": 1,
        "scorer": {"tiny": True, "dimensions": ["temporal_flickering"]},
        "sampler_pool": {"batch_size": 2},
        "scorer_pool": {"batch_size": 2, "num_gpus": 0},
    }
    return GenerateConfig(**{**settings, **overrides})


def _scored_rows(chunk: int, failed: str | None = None) -> pa.Table:
    """Chunk `chunk` of PROMPTS as it comes back from the scorer: every sample scored, or each failing sampling with
    `failed` (a null video)."""
    requests = sample_requests(chunk_prompts(PROMPTS, 1)[chunk], 2, 5557)
    count = requests.num_rows
    return (
        requests.append_column("video", pa.array([None if failed else b"mp4"] * count, pa.binary()))
        .append_column("fps", pa.array([8] * count, pa.int32()))
        .append_column("model", pa.array(["vc2/tiny"] * count))
        .append_column("failed_reason", pa.array([failed] * count, pa.string()))
        .append_column("attempts", pa.array([4 if failed else 1] * count, pa.int32()))
        .append_column("temporal_flickering", pa.array([None if failed else 0.9] * count, pa.float64()))
        .append_column("omniscore", pa.array([None if failed else 0.5] * count, pa.float64()))
    )


def _files(out: Path) -> dict[str, str]:
    """sha256 of every committed shard file (parquet and manifest) of the output."""
    return {
        f"{kind}/{name}": hashlib.sha256(storage.read_bytes(storage.join(str(out), kind, name))).hexdigest()
        for kind in ("samples", "scores", "failures")
        for name in storage.list_files(storage.join(str(out), kind))
    }


@pytest.fixture
def stub_cluster(monkeypatch):
    """The generate job driven in-process: `connect_ray` does nothing and the cluster has `gpus[0]` GPUs."""
    import ray

    import jobs.generate

    gpus = [0.0]
    monkeypatch.setattr(jobs.generate, "connect_ray", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": gpus[0]})
    return gpus


class NoActors:
    """A sampler or scorer class the job must not start."""

    def __init__(self, **kwargs) -> None:
        raise AssertionError("no chunk should be sampled or scored")


# --- infrastructure faults: one rule for the sampler and the scorer ---------------------------------------------
def _caused(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("error, infrastructure", [
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5"), True),
    (RuntimeError("CUDA driver error: an illegal memory access was encountered"), True),
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (_caused(ValueError("the model produced NaN latents"), RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")),
     True),
    (ValueError("the model produced NaN latents"), False),
    (RuntimeError("the prompt's tokens exceed the text encoder's 77"), False),
    (ValueError("CUDA error: a message of a data error is no GPU fault"), False),
    (VideoDecodeError("corrupt: no video stream"), False),
], ids=["cublas", "cublas-init", "cudnn", "nccl", "driver", "accelerator", "oom", "host-oom", "caused-by-cudnn",
        "poison-prompt", "other-runtime-error", "value-error", "decode"])
def test_gpu_faults_raised_as_runtime_errors_are_infrastructure_errors(error, infrastructure):
    assert is_infrastructure_error(error) is infrastructure


def test_a_cublas_failure_in_the_sampler_is_raised_at_once_not_recorded_as_poison_prompts():
    calls = []

    def broken(rows):
        calls.append(list(rows))
        raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`")

    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        sample_isolating_failures(broken, [0, 1, 2, 3], max_attempts=2)
    assert calls == [[0, 1, 2, 3]]  # not retried, not split into "poison" prompts


# --- committing a chunk and resuming it ---------------------------------------------------------------------------
def test_a_chunk_whose_every_prompt_failed_is_finished_not_sampled_again_after_a_crash(tmp_path, stub_cluster):
    """Every prompt of chunk 0 failed sampling and the run crashed after its (empty) samples shard, before its scores
    shard: the rerun commits the empty scores shard, keeps the failures and samples nothing (sampling again would
    write a different samples shard over the committed one)."""
    from jobs.generate import generate

    config = _config(tmp_path)
    plan_generate(config, PROMPTS)
    commit_chunk(config.out, 0, _scored_rows(0, failed="ValueError: NaN latents"), rescored=False)
    commit_chunk(config.out, 1, _scored_rows(1), rescored=False)
    assert [info.num_rows for info in shards.list_shards(config.out, "samples")] == [0, 2]
    storage.remove(shards.manifest_url(config.out, "scores", 0))  # the crash
    before = _files(tmp_path)

    plan = plan_generate(config, PROMPTS)
    assert ([c.index for c in plan.to_close], plan.to_sample, plan.to_score, plan.report.skipped) == ([0], [], [], [1])
    report = generate(config, prompts=PROMPTS, sampler_class=NoActors, scorer_class=NoActors)
    assert (report.rescored, report.sampled, report.skipped, report.incomplete) == ([0], [], [1], {})
    assert [(f["sample_id"], f["stage"]) for f in report.failures] == [("000000-0", "sample"), ("000000-1", "sample")]
    assert [info.num_rows for info in shards.list_shards(config.out, "scores")] == [0, 2]
    after = _files(tmp_path)
    assert {name: after[name] for name in before} == before and "scores/shard-00000.json" in after
    report = generate(config, prompts=PROMPTS, sampler_class=NoActors, scorer_class=NoActors)  # done: no work
    assert (report.skipped, report.rescored) == ([0, 1], [])
    assert _files(tmp_path) == after


def test_a_chunk_committed_without_failures_removes_the_failures_an_earlier_attempt_left(tmp_path, monkeypatch):
    """Run 1 recorded a failure of chunk 0 and crashed before its samples; run 2 samples all of it: the stale record
    goes, before the samples and scores are committed (a crash in between leaves the chunk to sample again)."""
    out = str(tmp_path)
    commit_chunk(out, 0, _scored_rows(0, failed="RuntimeError: transient"), rescored=False)
    shards.uncommit_shard(out, "scores", 0)
    shards.uncommit_shard(out, "samples", 0)  # the crash: only the failures shard is left
    assert len(recorded_failures(out)) == 2

    steps = []

    def recording(real):
        def call(*args, **kwargs):  # write_shard(table, root, kind, index), uncommit_shard(root, kind, index)
            steps.append((real.__name__, args[-2]))
            return real(*args, **kwargs)
        return call

    for name in ("write_shard", "uncommit_shard"):
        monkeypatch.setattr(shards, name, recording(getattr(shards, name)))
    commit_chunk(out, 0, _scored_rows(0), rescored=False)
    assert steps == [("uncommit_shard", "failures"), ("write_shard", "samples"), ("write_shard", "scores")]
    assert recorded_failures(out) == [] and shards.list_shards(out, "failures") == []
    assert shards.read_shard(shards.list_shards(out, "samples")[0]).column("sample_id").to_pylist() == [
        "000000-0", "000000-1"
    ]


def test_a_rescored_chunk_keeps_its_sampling_failures(tmp_path):
    out = str(tmp_path)
    rows = pa.concat_tables([_scored_rows(0), _scored_rows(1, failed="ValueError: NaN latents")])
    commit_chunk(out, 0, rows, rescored=False)
    shards.uncommit_shard(out, "scores", 0)  # a crash before the scores: the chunk is scored again
    commit_chunk(out, 0, _scored_rows(0), rescored=True)
    assert [(f["sample_id"], f["stage"]) for f in recorded_failures(out)] == [
        ("000001-0", "sample"), ("000001-1", "sample")
    ]


def test_a_retry_refused_by_the_device_check_deletes_nothing(tmp_path, stub_cluster):
    """retry_failed un-commits the chunks with failures only after the device check: a run refused there leaves the
    output as it was."""
    from jobs.generate import generate

    config = _config(tmp_path)
    plan_generate(config, PROMPTS)
    record_devices(config, cluster_gpus=0)  # the first run: on CPUs
    commit_chunk(config.out, 0, _scored_rows(0), rescored=False)
    commit_chunk(config.out, 1, _scored_rows(1, failed="ValueError: NaN latents"), rescored=False)
    before = _files(tmp_path)
    retry = config.model_copy(update={"retry_failed": True})

    stub_cluster[0] = 8.0  # the rerun lands on a GPU cluster
    with pytest.raises(ConfigError, match=r"sampler_device: recorded 'cpu', now 'cuda'"):
        generate(retry, prompts=PROMPTS, sampler_class=NoActors, scorer_class=NoActors)
    assert _files(tmp_path) == before

    plan = retry_failed_chunks(retry, PROMPTS)  # what the job does once the device check passed
    assert (plan.report.retried, [c.index for c in plan.to_sample], plan.report.skipped) == ([1], [1], [0])
    assert shards.list_shards(config.out, "failures") == []
    assert [info.index for info in shards.list_shards(config.out, "samples")] == [0]
