"""The Generate + Score stage without Ray: its config, sampler request rows, plan, run manifest and report.

Determinism (what makes reruns skip finished work and never duplicate it):

- chunk c holds prompts [c * K, (c + 1) * K) (K = `prompts_per_chunk`) and is committed as
  `{out}/samples/shard-{c:05d}` and then `{out}/scores/shard-{c:05d}`; a chunk is done when its scores shard is;
- sample k of a prompt has id `{prompt_id}-{k}` and seed `seeds.sample_seed(base_seed, prompt_id, k)`, which
  depends on nothing else (not the chunk, the batch, the actor or the cluster size);
- `{out}/generation.json` records what fixes the shards' content (prompt list hash, K, N, seed, model, sampling);
  a rerun with a different value there is refused instead of mixing two layouts in one output.

Poison prompts: a sampler batch that keeps failing is split to find the prompts that fail on their own
(`sample_isolating_failures`); a video the scorer cannot use is a failed row. A chunk still commits:
`split_failures` drops every prompt with a failed sample from its samples and scores shards and records each failed
sample in `{out}/failures/shard-{c:05d}` (prompt id, stage, error, attempts). A rerun keeps them unless
`retry_failed` (`retry_failed_chunks` then un-commits those chunks, which are redone).

A committed samples shard is never sampled again, only scored again, even when it is empty (every prompt of the
chunk failed sampling): a rerun finishes a chunk with the samples, and failures, its first run committed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import pyarrow as pa
from pydantic import Field

from videodpo_ray import shards, storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import is_infrastructure_error
from videodpo_ray.models import ModelConfig
from videodpo_ray.scoring import ScorerConfig
from videodpo_ray.seeds import sample_seed
from videodpo_ray.stages.common import ActorPoolConfig, SamplingConfig, incomplete_lines, record_manifest
from videodpo_ray.stages.prompts import MAX_PROMPT_CHARS, PromptRow, prompts_jsonl
from videodpo_ray.training import checkpoint as ckpt
from videodpo_ray.video_format import MP4_ENCODING

DATA_GENERATION_SEED = 5557  # VideoDPO's data-generation seed (method.md section 5)
GENERATION_MANIFEST = "generation.json"
DEVICE_MANIFEST = "generation-device.json"  # sampler's and scorers' device types, known once the cluster is


class GenerationSettings(StrictConfig):
    """The Generate + Score settings shared by the generate job and the pipeline (which sets prompts, out, model)."""

    samples_per_prompt: int = Field(4, ge=1)  # N (method.md section 4; pairs need N >= 2)
    prompts_per_chunk: int = Field(64, ge=1)  # K: prompts per committed shard
    base_seed: int = Field(DATA_GENERATION_SEED, ge=0)
    sampling: SamplingConfig = SamplingConfig()
    scorer: ScorerConfig  # required: where every scorer's weights are (or tiny: true for tests and demos)
    sampler_pool: ActorPoolConfig = ActorPoolConfig()
    # CPU by default: with one GPU per sampler actor a GPU scorer could wait forever; to share GPUs set e.g.
    # sampler_pool.num_gpus=0.5 and scorer_pool.num_gpus=0.5
    scorer_pool: ActorPoolConfig = ActorPoolConfig(num_gpus=0.0)
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1)  # a longer prompt is refused (exit 2) with its file and row
    max_attempts: int = Field(2, ge=1)  # sampler calls a failing batch (then each of its prompts alone) gets
    retry_failed: bool = False  # redo the chunks whose failures an earlier run recorded


class GenerateConfig(GenerationSettings):
    """The generate job (jobs/generate.py): prompts -> `{out}/samples` and `{out}/scores` shards."""

    prompts: str  # .txt (one prompt a line), .jsonl or .parquet (fields prompt, optional prompt_id); path or URL
    out: str  # output root URL
    model: ModelConfig = ModelConfig()
    model_init_seed: int = 0  # torch seed while building the model: random-init weights = training's (run.seed)
    tuned: str | None = None  # a training export: sample `model` with the export's trained weights


@dataclass(frozen=True)
class PromptChunk:
    """Chunk `index` of the prompt list: its shards are `shard-{index:05d}` of samples and scores."""

    index: int
    prompts: tuple[PromptRow, ...]


REQUEST_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.int64()),
        pa.field("position", pa.int64()),
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("sample_id", pa.string()),
        pa.field("seed", pa.int64()),
    ]
)
SAMPLER_OUTPUT_COLUMNS = [*REQUEST_SCHEMA.names, "video", "fps", "model", "failed_reason", "attempts"]
"""What the sampler returns: the request columns, the mp4 (null when sampling failed), its fps and model label, why
sampling failed (null on success) and, for a failed row, how many sampler calls it took part in (1 otherwise)."""
T = TypeVar("T")


@dataclass(frozen=True)
class SampleFailure:
    """A request the sampler gave up on: the last error and the sampler calls that included it."""

    error: str
    attempts: int


def sample_isolating_failures(
    sample: Callable[[list[int]], list[T]],
    rows: Sequence[int],
    max_attempts: int,
) -> tuple[dict[int, T], dict[int, SampleFailure]]:
    """Sample `rows` together, isolating the ones that fail: ({row: output}, {row: failure}).

    A batch is tried up to `max_attempts` times (transient errors pass). If it still fails, each row is tried alone
    (up to `max_attempts` times) to find the poison ones, which are recorded; the others are then sampled together
    again, so every output comes from one batched call, as in a run without failures. Deterministic: the same
    failures give the same calls. An infrastructure fault (`errors.is_infrastructure_error`: out of memory, CUDA,
    cuBLAS, cuDNN, NCCL) is raised at once, never retried or recorded.
    """
    failures: dict[int, SampleFailure] = {}
    pending = list(rows)
    attempts = dict.fromkeys(pending, 0)

    def attempt(batch: list[int]) -> tuple[list[T] | None, str]:
        error = ""
        for _ in range(max_attempts):
            for row in batch:
                attempts[row] += 1
            try:
                return sample(batch), ""
            except Exception as caught:  # a prompt the model cannot sample: isolated and recorded below
                if is_infrastructure_error(caught):
                    raise
                error = f"{type(caught).__name__}: {caught}"
        return None, error

    while pending:
        outputs, error = attempt(pending)
        if outputs is not None:
            return dict(zip(pending, outputs)), failures
        if len(pending) == 1:
            failures[pending[0]] = SampleFailure(error, attempts[pending[0]])
            break
        alone = {row: attempt([row])[1] for row in pending}
        poison = {row: error for row, error in alone.items() if error}
        if not poison:  # every row works alone, never together: give up on the batch
            poison = dict.fromkeys(pending, f"{error} (fails only together with this batch)")
        failures.update({row: SampleFailure(message, attempts[row]) for row, message in poison.items()})
        pending = [row for row in pending if row not in poison]
    return {}, failures


def split_failures(rows: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
    """A scored chunk -> (the rows to commit, failure rows for the `failures` shard).

    A sample the sampler gave up on (null `video`) removes its whole prompt from the chunk, so a committed prompt
    always has all N samples; a video the scorer could not use stays as a failed scores row (null scores, pairing
    skips it). Both are recorded as failures.
    """
    videos, reasons = rows.column("video").to_pylist(), rows.column("failed_reason").to_pylist()
    attempts, prompt_ids = rows.column("attempts").to_pylist(), rows.column("prompt_id").to_pylist()
    sample_ids, prompts = rows.column("sample_id").to_pylist(), rows.column("prompt").to_pylist()
    failures = [
        {
            "sample_id": sample_ids[i],
            "prompt_id": prompt_ids[i],
            "prompt": prompts[i],
            "stage": "sample" if videos[i] is None else "score",
            "error": reasons[i],
            "attempts": attempts[i] if videos[i] is None else 1,
        }
        for i in range(rows.num_rows)
        if reasons[i] is not None
    ]
    dropped = {failure["prompt_id"] for failure in failures if failure["stage"] == "sample"}
    keep = [prompt_id not in dropped for prompt_id in prompt_ids]
    return rows.filter(pa.array(keep, pa.bool_())), failures


def chunk_prompts(prompts: Sequence[PromptRow], prompts_per_chunk: int) -> list[PromptChunk]:
    """Consecutive chunks of `prompts_per_chunk` prompts in file order; chunk c is shard index c."""
    return [
        PromptChunk(index, tuple(prompts[begin : begin + prompts_per_chunk]))
        for index, begin in enumerate(chunk_starts(len(prompts), prompts_per_chunk))
    ]


def chunk_starts(num_prompts: int, prompts_per_chunk: int) -> range:
    """The first prompt of every chunk: chunk c starts at prompt c x prompts_per_chunk."""
    if prompts_per_chunk < 1:
        raise ValueError(f"prompts_per_chunk must be >= 1, got {prompts_per_chunk}")
    return range(0, num_prompts, prompts_per_chunk)


def planned_chunks(out: str) -> range:
    """The chunk indices `{out}/generation.json` plans; none where no generate run wrote `out` (hand-made scores)."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(out, GENERATION_MANIFEST)))
    except FileNotFoundError:
        return range(0)
    return range(len(chunk_starts(manifest["num_prompts"], manifest["prompts_per_chunk"])))


def sample_id(prompt_id: str, sample_index: int) -> str:
    """`{prompt_id}-{sample_index}`."""
    return f"{prompt_id}-{sample_index}"


def sample_requests(chunk: PromptChunk, samples_per_prompt: int, base_seed: int) -> pa.Table:
    """The sampler's input rows for one chunk: chunk, position, prompt_id, prompt, sample_id, seed (prompt-major)."""
    rows = [
        {
            "chunk": chunk.index,
            "position": position * samples_per_prompt + k,
            "prompt_id": row.prompt_id,
            "prompt": row.prompt,
            "sample_id": sample_id(row.prompt_id, k),
            "seed": sample_seed(base_seed, row.prompt_id, k),
        }
        for position, row in enumerate(chunk.prompts)
        for k in range(samples_per_prompt)
    ]
    return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


def request_blocks(config: GenerateConfig, chunks: Sequence[PromptChunk]) -> list[pa.Table]:
    """Sampler input blocks for `chunks`: one block (one Ray Data task) per chunk, which the sampler actor cuts into
    batches of `sampler_pool.batch_size` (`stages.common.batch_slices`)."""
    return [sample_requests(chunk, config.samples_per_prompt, config.base_seed) for chunk in chunks]


def committed_samples(config: GenerateConfig, chunks: Sequence[PromptChunk]) -> list[pa.Table]:
    """Committed samples shards of `chunks` (to be scored again), with the columns the sampler would have made."""
    committed = {info.index: info for info in shards.list_shards(config.out, "samples")}
    tables = []
    for chunk in chunks:
        table = shards.read_shard(committed[chunk.index])
        table = table.append_column("chunk", pa.array([chunk.index] * table.num_rows, pa.int64()))
        table = table.append_column("position", pa.array(range(table.num_rows), pa.int64()))
        table = table.append_column("failed_reason", pa.nulls(table.num_rows, pa.string()))
        table = table.append_column("attempts", pa.array([0] * table.num_rows, pa.int32()))
        tables.append(table.select(SAMPLER_OUTPUT_COLUMNS))
    return tables


def model_label(model: ModelConfig) -> str:
    """The `model` column of sample shards: `family/variant` plus `@path` for loaded weights."""
    label = f"{model.family}/{model.variant}"
    return f"{label}@{model.path}" if model.path else label


def generation_manifest(config: GenerateConfig, prompts: Sequence[PromptRow]) -> dict[str, Any]:
    """Every setting that changes the content or keys of the samples/scores shards. Batch sizes are among them (a
    video depends on its sampler batch through float rounding in batched kernels; scorers batch frames); actor
    counts and resources are not."""
    prompt_hash = hashlib.sha256(prompts_jsonl(prompts)).hexdigest()
    return {
        "num_prompts": len(prompts),
        "prompts_sha256": prompt_hash,
        "prompts_per_chunk": config.prompts_per_chunk,
        "samples_per_prompt": config.samples_per_prompt,
        "base_seed": config.base_seed,
        "model": config.model.model_dump(mode="json"),
        "model_init_seed": config.model_init_seed,
        "tuned": config.tuned,
        "tuned_export": ckpt.read_export_info(config.tuned) if config.tuned else None,  # the same URL, new weights?
        "sampling": config.sampling.model_dump(mode="json"),
        "sampler_batch_size": config.sampler_pool.batch_size,
        "video_encoding": MP4_ENCODING,  # the scorers decode the mp4
        "scorer": config.scorer.model_dump(mode="json", exclude={"device"}),
        "scorer_batch_size": config.scorer_pool.batch_size,
    }


@dataclass
class GenerateReport:
    """What one generate run did, by chunk index."""

    out: str
    num_prompts: int
    num_chunks: int
    skipped: list[int] = field(default_factory=list)  # committed before this run
    sampled: list[int] = field(default_factory=list)  # sampled, scored and committed by this run
    rescored: list[int] = field(default_factory=list)  # samples committed earlier, scored and committed now
    incomplete: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk -> (rows back, rows expected)
    retried: list[int] = field(default_factory=list)  # chunks with recorded failures redone (retry_failed)
    failures: list[dict[str, Any]] = field(default_factory=list)  # every recorded failure of the output, by chunk
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"generate -> {self.out}: {self.num_prompts} prompts in {self.num_chunks} chunk(s); "
            f"{len(self.sampled)} sampled and committed, {len(self.rescored)} re-scored and committed, "
            f"{len(self.skipped)} already committed and skipped; {self.seconds:.1f} s"
        ]
        if self.failures:
            prompts = sorted({failure["prompt_id"] for failure in self.failures if failure["stage"] == "sample"})
            lines.append(
                f"  {len(self.failures)} failed sample(s) recorded in {storage.join(self.out, 'failures')}; "
                f"{len(prompts)} prompt(s) left out (rerun with retry_failed=true to try them again):"
            )
            lines += [
                f"    {f['prompt_id']} [{f['stage']}, {f['attempts']} attempts] {f['sample_id']}: {f['error'][:200]}"
                for f in self.failures
            ]
        return "\n".join(lines + incomplete_lines(self.incomplete, "chunk", "samples"))


@dataclass
class GeneratePlan:
    """What a generate run has left: chunks to sample (and score), chunks to score again, and the report so far."""

    report: GenerateReport
    samples_per_prompt: int
    to_sample: list[PromptChunk] = field(default_factory=list)
    to_score: list[PromptChunk] = field(default_factory=list)
    committed_rows: dict[int, int] = field(default_factory=dict)  # rows of the committed samples of `to_score`
    to_close: list[PromptChunk] = field(default_factory=list)  # committed samples are empty: nothing to score

    def pending_rows(self) -> dict[int, int]:
        """Sample rows expected back per chunk this run works on (a committed samples shard lacks the prompts that
        failed sampling)."""
        rows = {chunk.index: len(chunk.prompts) * self.samples_per_prompt for chunk in self.to_sample}
        return rows | {chunk.index: self.committed_rows[chunk.index] for chunk in self.to_score}


def record_devices(config: GenerateConfig, cluster_gpus: float) -> None:
    """Record (or check) the device types of the sampler and the scorers on this cluster: "cuda" where their actors
    get GPUs (the scorers: or `scorer.device` says so), else "cpu". A GPU sample and a CPU sample differ in their
    float rounding, and on a GPU some scorers run in float16, so a resume on the other kind is refused."""
    devices = {"sampler_device": config.sampler_pool.device_type(cluster_gpus),
               "scorer_device": config.scorer_pool.device_type(cluster_gpus, config.scorer.device)}
    record_manifest(storage.join(config.out, DEVICE_MANIFEST), devices)


def plan_generate(config: GenerateConfig, prompts: Sequence[PromptRow]) -> GeneratePlan:
    """Record (or check) the run manifest and split the chunks into committed, to score, to close (committed samples
    shard empty) and to sample. Writes nothing else: with `retry_failed`, `report.retried` lists the chunks with
    recorded failures, which `retry_failed_chunks` un-commits once the run is known to go on."""
    record_manifest(storage.join(config.out, GENERATION_MANIFEST), generation_manifest(config, prompts))
    chunks = chunk_prompts(prompts, config.prompts_per_chunk)
    report = GenerateReport(out=config.out, num_prompts=len(prompts), num_chunks=len(chunks))
    plan = GeneratePlan(report, config.samples_per_prompt)
    if config.retry_failed:
        report.retried = [info.index for info in shards.list_shards(config.out, "failures")]
    done = {info.index for info in shards.list_shards(config.out, "scores")}
    sampled = {info.index: info.num_rows for info in shards.list_shards(config.out, "samples")}
    for chunk in chunks:
        if chunk.index in done:
            plan.report.skipped.append(chunk.index)
        elif chunk.index not in sampled:
            plan.to_sample.append(chunk)
        elif sampled[chunk.index]:
            plan.to_score.append(chunk)
            plan.committed_rows[chunk.index] = sampled[chunk.index]
        else:
            plan.to_close.append(chunk)
    return plan


def retry_failed_chunks(config: GenerateConfig, prompts: Sequence[PromptRow]) -> GeneratePlan:
    """Un-commit every chunk with recorded failures and plan again, so that this run redoes them: its scores first
    (the chunk is then not done), its samples too when a sample failed (the chunk is sampled again, else only scored
    again), its failures last. Called after the run's checks (`record_devices`): a refused run deletes nothing."""
    retried = []
    for info in shards.list_shards(config.out, "failures"):
        shards.uncommit_shard(config.out, "scores", info.index)
        if "sample" in {row["stage"] for row in shards.read_shard(info).to_pylist()}:
            shards.uncommit_shard(config.out, "samples", info.index)
        shards.uncommit_shard(config.out, "failures", info.index)
        retried.append(info.index)
    plan = plan_generate(config, prompts)
    plan.report.retried = retried
    return plan


def commit_chunk(out: str, index: int, rows: pa.Table, rescored: bool) -> None:
    """Commit chunk `index` from its scored rows: its failures shard first (with, when `rescored`, the sampling
    failures recorded with its samples, whose prompts are not in them any more; without failures: remove a failures
    shard an earlier attempt left), then its samples (unless `rescored`: committed already), then its scores (the
    chunk is done). A crash after any step leaves the chunk undone, and a rerun redoes it from there."""
    rows, failures = split_failures(rows)
    if rescored:
        recorded = [info for info in shards.list_shards(out, "failures") if info.index == index]
        kept = [row for info in recorded for row in shards.read_shard(info).to_pylist() if row["stage"] == "sample"]
        failures = kept + failures
    if failures:
        shards.write_shard(shards.make_table("failures", failures), out, "failures", index, overwrite=True)
    else:
        shards.uncommit_shard(out, "failures", index)
    if not rescored:
        shards.write_shard(shards.project_table(rows, "samples"), out, "samples", index, allow_empty=True)
    shards.write_shard(shards.project_table(rows, "scores"), out, "scores", index, allow_empty=True)


def recorded_failures(out: str) -> list[dict[str, Any]]:
    """Every failure the committed failures shards of `out` record, by chunk."""
    return [row for info in shards.list_shards(out, "failures") for row in shards.read_shard(info).to_pylist()]
