"""Generate + Score: seeds, prompt files, chunking, run manifests, and the Ray job's commit / skip / resume logic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from videodpo_ray import shards, storage
from videodpo_ray.errors import ConfigError, IncompleteStageError, PromptFileError
from videodpo_ray.models import ModelConfig
from videodpo_ray.seeds import sample_seed
from videodpo_ray.stages.common import (
    ChunkCollector,
    ChunkProgress,
    SamplingConfig,
    check_manifest,
    format_duration,
    record_manifest,
)
from videodpo_ray.stages.generate import (
    GenerateConfig,
    SampleFailure,
    chunk_prompts,
    record_devices,
    sample_isolating_failures,
    sample_requests,
    split_failures,
)
from videodpo_ray.stages.prompts import PromptRow, prompt_rows, read_prompts
from videodpo_ray.video import decode_mp4


# --- seeds ------------------------------------------------------------------------------------------------------
def test_sample_seed_is_the_documented_hash():
    digest = hashlib.blake2b(b"5557/sample/000042/3", digest_size=8).digest()
    assert sample_seed(5557, "000042", 3) == int.from_bytes(digest, "little") >> 1
    # pinned: a change of the formula would silently change every generated data set
    assert sample_seed(5557, "000000", 0) == 8606243373435493292
    assert 0 <= sample_seed(0, "x", 0) < 2**63


def test_seeds_and_ids_do_not_depend_on_chunking():
    prompts = [PromptRow(f"p{i}", f"prompt {i}") for i in range(7)]
    by_three = [sample_requests(chunk, 4, 5557) for chunk in chunk_prompts(prompts, 3)]
    by_one = [sample_requests(chunk, 4, 5557) for chunk in chunk_prompts(prompts, 1)]
    seeds_three = {row["sample_id"]: row["seed"] for table in by_three for row in table.to_pylist()}
    seeds_one = {row["sample_id"]: row["seed"] for table in by_one for row in table.to_pylist()}
    assert seeds_three == seeds_one
    assert len(seeds_three) == 28 and len(set(seeds_three.values())) == 28
    assert seeds_three["p5-2"] == sample_seed(5557, "p5", 2)
    first = by_three[1].to_pylist()
    assert [(r["chunk"], r["position"], r["sample_id"]) for r in first[:5]] == [
        (1, 0, "p3-0"), (1, 1, "p3-1"), (1, 2, "p3-2"), (1, 3, "p3-3"), (1, 4, "p4-0"),
    ]


def test_chunking_is_consecutive_and_deterministic():
    prompts = [PromptRow(f"{i:06d}", f"prompt {i}") for i in range(7)]
    chunks = chunk_prompts(prompts, 3)
    assert [chunk.index for chunk in chunks] == [0, 1, 2]
    assert [[row.prompt_id for row in chunk.prompts] for chunk in chunks] == [
        ["000000", "000001", "000002"], ["000003", "000004", "000005"], ["000006"],
    ]
    assert chunk_prompts(prompts, 3) == chunks


# --- prompt files ------------------------------------------------------------------------------------------------
def test_prompt_files_in_every_format_read_the_same(tmp_path: Path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "extra": 1}\n')
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    expected = [PromptRow("000000", "a cat"), PromptRow("000001", "a dog")]
    for name in ("p.txt", "p.jsonl", "p.parquet"):
        assert read_prompts(str(tmp_path / name)) == expected
    (tmp_path / "ids.jsonl").write_text('{"prompt_id": "vidprom-7", "prompt": "x"}\n{"prompt_id": 9, "prompt": "y"}\n')
    assert read_prompts(str(tmp_path / "ids.jsonl")) == [PromptRow("vidprom-7", "x"), PromptRow("9", "y")]
    assert prompt_rows(["x", "y"]) == [PromptRow("000000", "x"), PromptRow("000001", "y")]


def test_lines_end_at_line_feeds_only_and_a_byte_order_mark_is_no_prompt(tmp_path: Path):
    """U+2028 and U+0085 are characters of a prompt (and of a JSON string), not line ends: splitting at them would
    make two prompts of one and shift every later prompt's id, and so its seed."""
    (tmp_path / "p.txt").write_bytes("\ufeffa cat\u2028on a mat\r\ncafé \x85 scene\n".encode())
    assert read_prompts(str(tmp_path / "p.txt")) == [PromptRow("000000", "a cat\u2028on a mat"),
                                                     PromptRow("000001", "café \x85 scene")]
    (tmp_path / "p.jsonl").write_bytes('\ufeff{"prompt": "a cat\u2028on a mat"}\n'.encode())
    assert read_prompts(str(tmp_path / "p.jsonl")) == [PromptRow("000000", "a cat\u2028on a mat")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "   "}\n', "p.jsonl line 2: empty prompt"),
        ("p.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', "p.jsonl line 2: missing field 'prompt'"),
        ("p.jsonl", '{"prompt": "ok"}\nnot json\n', "p.jsonl line 2: not valid JSON"),
        ("p.jsonl", '{"prompt": 3}\n', "p.jsonl line 1: field 'prompt' must be a string"),
        ("p.jsonl", '{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "a", "prompt": "y"}\n',
         "p.jsonl line 2: duplicate prompt_id 'a' (first at line 1)"),
        ("p.parquet", None, "p.parquet row 1: empty prompt"),
        ("p.yaml", "- x\n", "unknown prompts file type '.yaml'"),
        ("p.txt", "\n\n", "p.txt: no prompts"),
        ("p.txt", "", "p.txt: no prompts"),
        ("p.csv", "uuid,caption\n1,x\n", "p.csv: no 'prompt' column in the CSV header (columns: uuid, caption)"),
        ("p.csv", "uuid,prompt\n1,x\n2,\n", "p.csv line 3: empty prompt"),
        ("p.json", '[{"prompt": "x"}', "p.json: not valid JSON"),
        ("p.txt", "ok\n" + "y" * 5000 + "\n", "p.txt line 2: prompt of 5000 characters, over the limit of 4096"),
        ("p.csv", "prompt,uuid\na fox,u-1\na cat\n", "p.csv line 3: fewer cells than the header's 2 columns"),
        ("p.csv", "prompt,uuid\na fox,u-1,x\n", "p.csv line 2: more cells than the header's 2 columns"),
    ],
)
def test_bad_prompt_rows_are_named(tmp_path: Path, name: str, content: str | None, message: str):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"prompt": ["fine", ""]}), path)
    else:
        path.write_text(content)
    with pytest.raises(PromptFileError) as error:
        read_prompts(str(path))
    assert message in str(error.value)


def test_prompt_file_bytes_and_paths_that_are_not_prompt_files(tmp_path: Path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin1.txt: not UTF-8 text"):
        read_prompts(str(tmp_path / "latin1.txt"))
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(PromptFileError, match=r"folder.txt: is a directory, not a prompts file"):
        read_prompts(str(tmp_path / "folder.txt"))
    with pytest.raises(PromptFileError, match=r"missing.txt: prompts file not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "long.txt").write_text("z" * 10_000_000 + "\n")
    with pytest.raises(PromptFileError, match=r"prompt of 10000000 characters"):
        read_prompts(str(tmp_path / "long.txt"))
    assert read_prompts(str(tmp_path / "long.txt"), max_chars=10_000_000)[0].prompt == "z" * 10_000_000


def test_vidprom_csv_uuid_is_the_prompt_id_and_exact_duplicates_are_dropped(tmp_path: Path, caplog):
    (tmp_path / "vidprom.csv").write_text(
        'uuid,prompt,nsfw\n9a1,"a cat, sleeping",0.1\n7f2,a dog,0.0\n0c3,"a cat, sleeping",0.2\n'
    )
    with caplog.at_level("WARNING"):
        rows = read_prompts(str(tmp_path / "vidprom.csv"))
    assert rows == [PromptRow("9a1", "a cat, sleeping"), PromptRow("7f2", "a dog")]
    assert "dropped 1 exact duplicate prompt(s); 2 remain" in caplog.text
    (tmp_path / "plain.csv").write_text("prompt\nx\ny\nx\n")
    assert read_prompts(str(tmp_path / "plain.csv")) == [PromptRow("000000", "x"), PromptRow("000001", "y")]
    assert prompt_rows(["a", "b", "a"]) == [PromptRow("000000", "a"), PromptRow("000001", "b")]


def test_missing_prompt_column_in_parquet(tmp_path: Path):
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(PromptFileError, match=r"p.parquet row 0: missing field 'prompt'"):
        read_prompts(str(tmp_path / "p.parquet"))


# --- collecting and manifests -------------------------------------------------------------------------------------
def _rows(chunk: int, positions: list[int]) -> pa.Table:
    return pa.table({"chunk": [chunk] * len(positions), "position": positions, "value": [p * 10 for p in positions]})


def test_chunk_collector_hands_out_complete_chunks_in_position_order():
    collector = ChunkCollector({0: 3, 1: 2, 2: 2})
    assert collector.add(pa.concat_tables([_rows(0, [2]), _rows(1, [1])])) == []
    done = collector.add(pa.concat_tables([_rows(1, [0]), _rows(0, [0])]))
    assert [(chunk, table.column("value").to_pylist()) for chunk, table in done] == [(1, [0, 10])]
    done = collector.add(_rows(0, [1]))
    assert [(chunk, table.column("position").to_pylist()) for chunk, table in done] == [(0, [0, 1, 2])]
    assert collector.incomplete() == {2: (0, 2)}
    with pytest.raises(ValueError, match="chunk 7"):
        collector.add(_rows(7, [0]))


def test_chunk_progress_lines_count_prompts_rate_and_eta():
    """A rerun with 2 of 10 prompts committed: 8 prompts x N=4 left in 3 chunks (3 + 3 + 2 prompts)."""
    now = [100.0]
    progress = ChunkProgress("generate", "videos", {1: 12, 2: 12, 4: 8}, (2, 10), 4, clock=lambda: now[0])
    now[0] = 106.0
    assert progress.committed(2, 12) == (
        "generate: chunk 2 committed (3 prompts, 12 videos; prompts 5/10) | 1/3 chunks this run | 2.00 videos/s"
        " | ETA 10s"
    )
    now[0] = 112.0
    assert progress.committed(1, 12).endswith("prompts 8/10) | 2/3 chunks this run | 2.00 videos/s | ETA 4s")
    now[0] = 114.0
    assert progress.committed(4, 8).endswith("prompts 10/10) | 3/3 chunks this run | 2.29 videos/s | ETA 0s")
    pairs = ChunkProgress("pair", "pairs", {0: 5}, clock=lambda: now[0])
    assert pairs.committed(0, 5).startswith("pair: chunk 0 committed (5 pairs) | 1/1 chunks this run | ")
    assert [format_duration(s) for s in (44.6, 185, 7620, float("inf"))] == ["45s", "3m05s", "2h07m", "unknown"]


# --- poison prompts ---------------------------------------------------------------------------------------------
class FakeSampler:
    """Samples "video" = 10 * row + batch size (so an output shows which batch made it); rows in `poison` always fail,
    `flaky` calls fail once each."""

    def __init__(self, poison: set[int] = frozenset(), flaky: int = 0, error: type[Exception] = ValueError) -> None:
        self.poison, self.flaky, self.error, self.calls = poison, flaky, error, []

    def __call__(self, rows: list[int]) -> list[int]:
        self.calls.append(list(rows))
        if self.flaky or self.poison & set(rows):
            self.flaky = max(self.flaky - 1, 0)
            raise self.error(f"cannot sample rows {rows}")
        return [10 * row + len(rows) for row in rows]


def test_a_poison_row_is_isolated_and_the_others_come_from_one_batched_call():
    sampler = FakeSampler(poison={2})
    outputs, failures = sample_isolating_failures(sampler, [0, 1, 2, 3], max_attempts=2)
    assert outputs == {0: 3, 1: 13, 3: 33}  # batch of 3: sampled together again, not the single-row probes
    assert failures == {2: SampleFailure("ValueError: cannot sample rows [2]", attempts=4)}  # 2 batched + 2 alone
    assert sampler.calls == [[0, 1, 2, 3], [0, 1, 2, 3], [0], [1], [2], [2], [3], [0, 1, 3]]


def test_transient_failures_are_retried_and_infrastructure_errors_raised():
    outputs, failures = sample_isolating_failures(FakeSampler(flaky=1), [0, 1], max_attempts=2)
    assert outputs == {0: 2, 1: 12} and failures == {}
    outputs, failures = sample_isolating_failures(FakeSampler(poison={0}), [0], max_attempts=3)
    assert outputs == {} and failures == {0: SampleFailure("ValueError: cannot sample rows [0]", attempts=3)}
    with pytest.raises(MemoryError):
        sample_isolating_failures(FakeSampler(flaky=1, error=MemoryError), [0], 2)


@pytest.mark.parametrize("fault", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    torch.OutOfMemoryError("CUDA out of memory"),
    # GPU library failures torch raises as a plain RuntimeError
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(handle, opa, opb, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"),
], ids=["accelerator", "oom", "cublas", "cudnn", "nccl"])
def test_a_gpu_fault_in_the_sampler_actor_fails_its_chunk_instead_of_blaming_the_prompts(fault, monkeypatch):
    from actors.sampler import SamplerActor

    actor = SamplerActor(ModelConfig(family="vc2", variant="tiny"), SamplingConfig(num_inference_steps=1), 0)
    calls = []

    def broken(prompts, seeds):
        calls.append(prompts)
        raise fault

    monkeypatch.setattr(actor, "sample", broken)
    with pytest.raises(type(fault)) as raised:
        actor(pa.table({"prompt": ["a fox", "a cat"], "seed": [1, 2]}))
    assert raised.value is fault
    assert calls == [["a fox", "a cat"]]  # raised at once: not retried, not split into "poison" prompts


def test_rows_that_fail_only_together_are_all_recorded():
    class FailsWhenPaired(FakeSampler):
        def __call__(self, rows):
            if len(rows) > 1:
                raise RuntimeError("batch too large")
            return [row for row in rows]

    outputs, failures = sample_isolating_failures(FailsWhenPaired(), [0, 1], max_attempts=1)
    assert outputs == {} and set(failures) == {0, 1}
    assert failures[0] == SampleFailure("RuntimeError: batch too large (fails only together with this batch)", 2)


def test_split_failures_drops_prompts_with_a_failed_sample_and_records_every_failure():
    rows = pa.table({
        "sample_id": ["a-0", "a-1", "b-0", "b-1"],
        "prompt_id": ["a", "a", "b", "b"],
        "prompt": ["prompt a", "prompt a", "prompt b", "prompt b"],
        "video": [b"mp4", None, b"mp4", b"mp4"],
        "failed_reason": [None, "ValueError: nan latents", None, "decode: too short"],
        "attempts": [1, 4, 1, 1],
    })
    kept, failures = split_failures(rows)
    assert kept.column("sample_id").to_pylist() == ["b-0", "b-1"]  # b keeps its unusable video as a failed row
    assert failures == [
        {"sample_id": "a-1", "prompt_id": "a", "prompt": "prompt a", "stage": "sample",
         "error": "ValueError: nan latents", "attempts": 4},
        {"sample_id": "b-1", "prompt_id": "b", "prompt": "prompt b", "stage": "score",
         "error": "decode: too short", "attempts": 1},
    ]


def test_rerun_with_other_layout_settings_is_refused(tmp_path: Path):
    url = str(tmp_path / "generation.json")
    record_manifest(url, {"prompts_per_chunk": 64, "base_seed": 5557})
    record_manifest(url, {"prompts_per_chunk": 64, "base_seed": 5557})  # same settings: resume
    with pytest.raises(ConfigError, match=r"prompts_per_chunk: recorded 64, now 32"):
        record_manifest(url, {"prompts_per_chunk": 32, "base_seed": 5557})
    assert json.loads(Path(url).read_text()) == {"base_seed": 5557, "prompts_per_chunk": 64}
    with pytest.raises(ConfigError, match="new output location"):
        check_manifest(url, {"a": 1}, {"a": 1, "b": 2})


# --- the Ray job ----------------------------------------------------------------------------------------------------
def _config(out: str, **overrides) -> GenerateConfig:
    settings = {
        "prompts": "unused.txt",
        "out": out,
        "model": ModelConfig(family="vc2", variant="tiny"),
        "samples_per_prompt": 2,
        "prompts_per_chunk": 1,
        "sampling": {"num_frames": 4, "height": 32, "width": 32, "num_inference_steps": 2},
        "scorer": {"tiny": True},
        "sampler_pool": {"batch_size": 2},
        "scorer_pool": {"batch_size": 2, "num_gpus": 0},
    }
    return GenerateConfig(**{**settings, **overrides})


def _committed_files(root: str) -> dict[str, str]:
    """sha256 of every committed shard file (parquet + manifest) under root."""
    hashes = {}
    for kind in ("samples", "scores"):
        for name in storage.list_files(storage.join(root, kind)):
            hashes[f"{kind}/{name}"] = hashlib.sha256(storage.read_bytes(storage.join(root, kind, name))).hexdigest()
    return hashes


PROMPTS = prompt_rows(["a corgi on the beach", "a red car at night", "a balloon over mountains"])


def test_generate_commits_chunks_survives_a_failing_chunk_and_resumes(ray_cluster, tmp_path: Path):
    from actors.sampler import SamplerActor
    from jobs.generate import generate

    class SamplerFailingOnChunk1(SamplerActor):  # defined here: pickled by value into the actors
        def __call__(self, batch):
            if 1 in batch.column("chunk").to_pylist():
                raise RuntimeError("injected sampler failure in chunk 1")
            return super().__call__(batch)

    out = str(tmp_path / "gen")
    config = _config(out)
    with pytest.raises(IncompleteStageError) as error:
        generate(config, prompts=PROMPTS, sampler_class=SamplerFailingOnChunk1)
    report = error.value.report
    assert report.sampled == [0, 2] and report.incomplete == {1: (0, 2)}
    assert "chunk 1 NOT committed: 0 of 2 samples" in str(error.value)
    assert [info.index for info in shards.list_shards(out, "samples")] == [0, 2]
    assert [info.index for info in shards.list_shards(out, "scores")] == [0, 2]
    before = _committed_files(out)
    # and chunk 0's scores are lost after its samples were committed (a crash between the two writes)
    storage.remove(shards.manifest_url(out, "scores", 0))

    report = generate(config, prompts=PROMPTS)  # the rerun samples only chunk 1 and re-scores only chunk 0
    assert (report.skipped, report.sampled, report.rescored, report.incomplete) == ([2], [1], [0], {})
    after = _committed_files(out)
    assert {name: after[name] for name in before} == before  # same bytes (the tiny scorers are seeded)

    samples = pa.concat_tables(shards.read_shard(info) for info in shards.list_shards(out, "samples"))
    scores = pa.concat_tables(shards.read_shard(info) for info in shards.list_shards(out, "scores"))
    expected_ids = [f"{p.prompt_id}-{k}" for p in PROMPTS for k in range(2)]
    assert samples.column("sample_id").to_pylist() == expected_ids  # no duplicates, none missing, in order
    assert scores.column("sample_id").to_pylist() == expected_ids
    assert samples.column("seed").to_pylist() == [sample_seed(5557, p.prompt_id, k) for p in PROMPTS for k in range(2)]
    assert samples.column("prompt").to_pylist() == [p.prompt for p in PROMPTS for _ in range(2)]
    assert samples.column("model").to_pylist() == ["vc2/tiny"] * 6
    assert scores.column("failed_reason").to_pylist() == [None] * 6
    assert all(0.0 < value < 1.5 for value in scores.column("omniscore").to_pylist())
    frames, fps = decode_mp4(samples.column("video")[0].as_py())
    assert tuple(frames.shape) == (4, 32, 32, 3) and fps == 8

    report = generate(config, prompts=PROMPTS)  # nothing left: no Ray work, same bytes
    assert (report.skipped, report.sampled, report.rescored) == ([0, 1, 2], [], [])
    assert _committed_files(out) == after

    with pytest.raises(ConfigError, match="samples_per_prompt: recorded 2, now 3"):
        generate(_config(out, samples_per_prompt=3), prompts=PROMPTS)


def test_generate_job_rejects_bad_prompt_rows_before_any_work(ray_cluster, tmp_path: Path, capsys):
    from jobs.generate import main

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"prompt_id": "x"}\n')
    config = tmp_path / "generate.yaml"
    config.write_text(f"prompts: {tmp_path / 'prompts.jsonl'}\nout: {tmp_path / 'gen'}\nscorer: {{tiny: true}}\n")
    assert main([str(config)]) == 2
    assert "prompts.jsonl line 2: missing field 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()  # nothing written


def test_json_prompt_files_list_dict_and_vbench_info(tmp_path: Path):
    (tmp_path / "list.json").write_text(json.dumps(["a fox", {"prompt": "a cat", "prompt_id": "cat"}]))
    assert read_prompts(str(tmp_path / "list.json")) == [PromptRow("000000", "a fox"), PromptRow("cat", "a cat")]
    (tmp_path / "dict.json").write_text(json.dumps({"0001.mp4": "a fox", "b": "a cat"}))
    assert read_prompts(str(tmp_path / "dict.json")) == [PromptRow("0001", "a fox"), PromptRow("b", "a cat")]
    vbench = [{"prompt_en": "a person swimming", "dimension": ["human_action"]}, {"prompt_en": "a red bicycle"}]
    (tmp_path / "VBench_full_info.json").write_text(json.dumps(vbench))
    rows = read_prompts(str(tmp_path / "VBench_full_info.json"))
    assert [row.prompt for row in rows] == ["a person swimming", "a red bicycle"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptFileError, match=r"bad.json: not valid JSON"):
        read_prompts(str(tmp_path / "bad.json"))
    (tmp_path / "num.json").write_text("3")
    with pytest.raises(PromptFileError, match=r"num.json: expected a JSON list or a \{name: prompt\} object, got int"):
        read_prompts(str(tmp_path / "num.json"))
    (tmp_path / "empty.json").write_text(json.dumps({"x.mp4": " "}))
    with pytest.raises(PromptFileError, match=r"empty.json key 'x.mp4': empty prompt"):
        read_prompts(str(tmp_path / "empty.json"))


def test_a_resume_on_another_device_type_is_refused_naming_it(tmp_path: Path):
    out = str(tmp_path / "gen")
    config = _config(out, scorer_pool={"batch_size": 2})  # pools' num_gpus "auto": a GPU per actor where there is one
    record_devices(config, cluster_gpus=8)
    record_devices(config, cluster_gpus=4)  # another GPU cluster: the same device types
    with pytest.raises(ConfigError, match=r"sampler_device: recorded 'cuda', now 'cpu'; scorer_device: recorded "
                                          r"'cuda', now 'cpu'"):
        record_devices(config, cluster_gpus=0)
    # the scorers on the CPUs of a GPU cluster: float32 where the recorded GPU scores were partly float16
    with pytest.raises(ConfigError, match=r"generation-device.json: .*\(scorer_device: recorded 'cuda', now 'cpu'\)"):
        record_devices(_config(out, scorer_pool={"batch_size": 2, "num_gpus": 0}), cluster_gpus=8)
    record_devices(_config(out, scorer_pool={"batch_size": 2, "num_gpus": 0}, scorer={"tiny": True, "device": "cuda"}),
                   cluster_gpus=8)  # scorer.device says cuda


def test_a_resume_with_another_sampler_batch_size_is_refused_naming_it(tmp_path: Path):
    from videodpo_ray.stages.generate import plan_generate

    config = _config(str(tmp_path / "out"))
    plan_generate(config, PROMPTS)  # records generation.json
    plan_generate(config, PROMPTS)  # the same settings resume
    other = config.model_copy(update={"sampler_pool": config.sampler_pool.model_copy(update={"batch_size": 4})})
    with pytest.raises(ConfigError, match=r"sampler_batch_size: recorded 2, now 4"):
        plan_generate(other, PROMPTS)
    more_actors = config.model_copy(update={"sampler_pool": config.sampler_pool.model_copy(update={"max_actors": 3})})
    plan_generate(more_actors, PROMPTS)  # actor counts do not change the numbers


def test_an_output_encoded_with_other_mp4_settings_is_refused(tmp_path: Path):
    """The scorers decode the mp4: an output written with x264's macroblock tree on (before 2026-12-01, when the
    manifest had no `video_encoding`) must not be completed with videos encoded otherwise."""
    from videodpo_ray.stages.generate import GENERATION_MANIFEST, plan_generate

    config = _config(str(tmp_path / "out"))
    plan_generate(config, PROMPTS)
    manifest = tmp_path / "out" / GENERATION_MANIFEST
    recorded = json.loads(manifest.read_text())
    assert recorded["video_encoding"] == {"codec": "libx264", "pix_fmt": "yuv420p", "crf": 17, "preset": "medium",
                                          "macroblock_tree": False}
    del recorded["video_encoding"]
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"video_encoding: recorded None, now \{.*'macroblock_tree': False\}"):
        plan_generate(config, PROMPTS)


def test_a_resume_sampling_another_export_at_the_same_url_is_refused(tmp_path: Path):
    """Retraining a run rewrites `{run}/export`: an evaluation resumed into the same output must not mix the old
    export's videos with the new one's."""
    from videodpo_ray.stages.generate import plan_generate
    from videodpo_ray.training import checkpoint as ckpt

    export = str(tmp_path / "run" / "export")
    tiny = ModelConfig(family="vc2", variant="tiny")
    ckpt.write_export({"w": torch.zeros(3)}, tiny, export, step=4, dtype="float32", init_seed=0)
    config = _config(str(tmp_path / "out"), tuned=export)
    plan_generate(config, PROMPTS)
    plan_generate(config, PROMPTS)  # the same export resumes
    ckpt.write_export({"w": torch.ones(3)}, tiny, export, step=4, dtype="float32", init_seed=0)  # retrained
    with pytest.raises(ConfigError, match=r"tuned_export: recorded \{.*'weights_sha256': '[0-9a-f]{64}'\}, now"):
        plan_generate(config, PROMPTS)


def test_a_poison_prompt_is_recorded_its_chunk_commits_and_retry_failed_redoes_it(ray_cluster, tmp_path: Path):
    from actors.sampler import SamplerActor
    from jobs.generate import generate

    class PoisonSampler(SamplerActor):  # defined here: pickled by value into the actors
        def sample(self, prompts, seeds):
            if any("poison" in prompt for prompt in prompts):
                raise ValueError("the model produced NaN latents")
            return super().sample(prompts, seeds)

    prompts = prompt_rows(["a corgi on the beach", "a poison prompt", "a red car at night", "a balloon over hills"])
    poison_id = prompts[1].prompt_id
    out = str(tmp_path / "gen")
    config = _config(out, prompts_per_chunk=2, sampler_pool={"batch_size": 4})  # one batch: corgi and poison
    report = generate(config, prompts=prompts, sampler_class=PoisonSampler)
    assert (report.sampled, report.incomplete) == ([0, 1], {})
    assert [(f["sample_id"], f["stage"], f["attempts"]) for f in report.failures] == [
        (f"{poison_id}-0", "sample", 4), (f"{poison_id}-1", "sample", 4)  # 2 batched calls + 2 alone
    ]
    assert report.failures[0]["error"] == "ValueError: the model produced NaN latents"
    assert "2 failed sample(s)" in report.summary() and "1 prompt(s) left out" in report.summary()
    for kind in ("samples", "scores"):
        chunk0 = shards.read_shard(shards.list_shards(out, kind)[0])
        assert chunk0.column("prompt_id").to_pylist() == [prompts[0].prompt_id] * 2  # committed without the poison
    assert [info.index for info in shards.list_shards(out, "failures")] == [0]
    after = _committed_files(out)

    report = generate(config, prompts=prompts)  # a rerun keeps the recorded failures
    assert (report.skipped, report.sampled, len(report.failures)) == ([0, 1], [], 2)
    assert _committed_files(out) == after

    storage.remove(shards.manifest_url(out, "scores", 0))  # a crash between chunk 0's samples and its scores
    report = generate(config, prompts=prompts)  # scores the 2 committed samples again, keeps the sample failures
    assert (report.rescored, report.incomplete, len(report.failures)) == ([0], {}, 2)
    assert _committed_files(out) == after
    assert [info.num_rows for info in shards.list_shards(out, "failures")] == [2]

    report = generate(config.model_copy(update={"retry_failed": True}), prompts=prompts)  # the model is fixed now
    assert (report.retried, report.sampled, report.skipped, report.failures) == ([0], [0], [1], [])
    samples = shards.read_shard(shards.list_shards(out, "samples")[0])
    assert samples.column("prompt_id").to_pylist() == [prompts[0].prompt_id] * 2 + [poison_id] * 2
    assert shards.list_shards(out, "failures") == []
    assert {k: v for k, v in _committed_files(out).items() if "00001" in k} == {
        k: v for k, v in after.items() if "00001" in k
    }  # chunk 1 untouched
