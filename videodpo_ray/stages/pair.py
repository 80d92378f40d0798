"""The Pair stage without Ray: config, pair request rows, the plan over all scores, manifest and report.

scores shards -> `pairs.build_pairs` (strategy, filters and weights over the whole data set: scores are small) ->
per generation chunk, the pairs of its prompts; chunk c becomes `{out}/pairs/shard-{c:05d}` once its pairs are
VAE-encoded and its prompts text-encoded (the runtime does that on latent-encoder actors). The empty-prompt
embedding (CFG dropout) is stored once per output, at `tensor_bytes.empty_prompt_url(out)`, before the first shard
commits.

Only a finished generate output is paired: a chunk with a samples shard (or one the caller says generate planned)
but no scores shard is a ShardError before any work, as is a sample id twice in a chunk's scores.

Samples whose scoring failed (null/NaN OmniScore) are left out of pairing and counted in the report; ranks count a
prompt's scored samples, so a rank pair beyond them gives that prompt no pair (counted in the report too), while a
rank pair beyond the generated samples per prompt is a ConfigError before any work.
`{out}/pairing.json` records the scores shards and settings the pairs were built from: weights depend on the
whole data set, so a rerun over other scores or settings is refused rather than mixing weightings.
`{out}/pairing-device.json` records the latent encoder's device type once the cluster is known (`record_device`).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import pyarrow as pa

from videodpo_ray import shards, storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import ConfigError, ShardError
from videodpo_ray.models import ModelConfig
from videodpo_ray.pairs import Pair, PairingConfig, ScoredSample, build_pairs
from videodpo_ray.stages.common import ActorPoolConfig, incomplete_lines, record_manifest

PAIRING_MANIFEST = "pairing.json"
DEVICE_MANIFEST = "pairing-device.json"  # the latent (and text) encoder's device type, known once the cluster is
SHOWN_CHUNKS = 5  # unscored chunk ids an error lists before counting the rest
LatentDType = Literal["float32", "float16", "bfloat16"]
PAIR_REQUEST_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.int64()),
        pa.field("position", pa.int64()),
        pa.field("pair_id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("win_sample_id", pa.string()),
        pa.field("lose_sample_id", pa.string()),
        pa.field("win_score", pa.float64()),
        pa.field("lose_score", pa.float64()),
        pa.field("weight", pa.float32()),
    ]
)


class PairSettings(StrictConfig):
    """The Pair settings shared by the pair job and the pipeline (which sets data, out and model)."""

    pairing: PairingConfig = PairingConfig()
    encoder_pool: ActorPoolConfig = ActorPoolConfig(batch_size=2)  # batch_size = pairs per VAE call
    latent_dtype: LatentDType = "float32"
    text_embedding_dtype: LatentDType | None = None  # stored prompt text embeddings; None -> latent_dtype
    keep_videos: bool = True  # also store the winner/loser mp4s in the pair shards


class PairConfig(PairSettings):
    """The pair job (jobs/pair.py): `{data}/scores` + `{data}/samples` -> `{out}/pairs` shards with latents."""

    data: str  # root of the generate job's output
    out: str | None = None  # root of the pair shards; None -> `data`
    model: ModelConfig = ModelConfig()  # the VAE that encodes the latents: the model that will be trained
    model_init_seed: int = 0  # torch seed while building the model: random-init weights = training's (run.seed)

    @property
    def pairs_root(self) -> str:
        return self.out or self.data

    @property
    def embedding_dtype(self) -> LatentDType:
        """The dtype the text embeddings are stored in."""
        return self.text_embedding_dtype or self.latent_dtype


@dataclass
class PairReport:
    """What one pair run did: pair statistics over the whole data set and the shards written or skipped."""

    out: str
    num_prompts: int = 0
    num_samples: int = 0
    unscored: list[str] = field(default_factory=list)  # sample ids whose scoring failed
    num_pairs: int = 0
    prompts_without_pair: int = 0  # every sample tied (or filtered out)
    prompts_short: int = 0  # prompts with too few scored samples (some failed) for some rank pair
    rank_pairs_short: int = 0  # the (prompt, rank pair)s left out for it
    omniscore: dict[str, float] = field(default_factory=dict)  # mean / min / max over the scored samples
    score_gap: dict[str, float] = field(default_factory=dict)  # mean / min / max of S_w - S_l
    weight: dict[str, float] = field(default_factory=dict)  # mean / min / max pair weight
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    incomplete: dict[int, tuple[int, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        gap = self.score_gap
        lines = [
            f"pair -> {self.out}: {self.num_pairs} pairs from {self.num_prompts} prompts ({self.num_samples} scored "
            f"samples, {len(self.unscored)} unscored left out, {self.prompts_without_pair} prompts without a pair"
            + (f", {self.rank_pairs_short} rank pairs of {self.prompts_short} prompts short of scored samples"
               if self.rank_pairs_short else "") + "); "
            f"{len(self.written)} shard(s) written, {len(self.skipped)} already committed; {self.seconds:.1f} s",
        ]
        if gap:
            lines.append(
                f"  score gap mean {gap['mean']:.4f} (min {gap['min']:.4f}, max {gap['max']:.4f}); weight mean "
                f"{self.weight['mean']:.4f} (min {self.weight['min']:.4f}, max {self.weight['max']:.4f})"
            )
        return "\n".join(lines + incomplete_lines(self.incomplete, "pair shard", "pairs"))


@dataclass
class CommittedScores:
    """The committed scores shards, grouped by prompt for pairing."""

    by_prompt: dict[str, list[ScoredSample]]  # prompt id -> its scored samples
    chunk_of: dict[str, int]  # prompt id -> chunk, for every prompt (one whose samples all failed scoring too)
    unscored: list[str]  # sample ids whose scoring failed
    samples_per_prompt: int  # N: the most scores rows (scored or failed) of a prompt; generate commits all N


def check_scored(data: str, scored: Iterable[int], planned: Iterable[int] = ()) -> None:
    """ShardError naming `data` and its unscored chunks unless every chunk with a committed samples shard, and every
    chunk in `planned`, is in `scored`: generate commits a chunk's samples before its scores, so a killed or failed
    generate leaves chunks that pairing would otherwise silently leave out of its filters and weights."""
    expected = {info.index for info in shards.list_shards(data, "samples")} | set(planned)
    unscored = sorted(expected - set(scored))
    if unscored:
        shown = ", ".join(map(str, unscored[:SHOWN_CHUNKS]))
        more = f" and {len(unscored) - SHOWN_CHUNKS} more" if len(unscored) > SHOWN_CHUNKS else ""
        raise ShardError(
            f"{data}: unfinished generation: chunk(s) {shown}{more} ({len(unscored)} of {len(expected)} chunks) "
            f"have no committed scores shard; rerun generate (or score) on {data} to finish it, then pair"
        )


def committed_scores(data: str, planned: Iterable[int] = ()) -> CommittedScores:
    """Read `{data}/scores`; ShardError if a chunk is unscored (`check_scored`), a sample id is in a shard twice or
    a prompt's samples are in two shards, ConfigError if a sample was scored without an OmniScore (a scorer without
    every dimension OmniScore blends)."""
    scores = CommittedScores({}, {}, [], 0)
    rows_of: Counter[str] = Counter()
    infos = shards.list_shards(data, "scores")
    check_scored(data, (info.index for info in infos), planned)
    for info in infos:
        table = shards.read_shard(info).select(["sample_id", "prompt_id", "omniscore", "failed_reason"])
        seen: dict[str, tuple[int, str]] = {}  # sample id -> (row, prompt id): the chunk's videos are found by id
        for number, row in enumerate(table.to_pylist()):
            sample_id, prompt_id = row["sample_id"], row["prompt_id"]
            if sample_id in seen:
                first, other = seen[sample_id]
                raise ShardError(
                    f"{info.url}: row {number}: sample_id {sample_id!r} (prompt {prompt_id!r}) repeats row {first} "
                    f"(prompt {other!r}); a sample id must be unique within a chunk"
                )
            seen[sample_id] = (number, prompt_id)
            chunk = scores.chunk_of.setdefault(prompt_id, info.index)
            if chunk != info.index:
                raise ShardError(f"{info.url}: prompt {prompt_id!r} also has samples in shard {chunk}")
            rows_of[prompt_id] += 1
            score = row["omniscore"]
            if score is None or not math.isfinite(score):
                if row["failed_reason"] is None:  # scored, but not every dimension OmniScore blends was
                    raise ConfigError(
                        f"{info.url}: sample {sample_id!r} has scores but no OmniScore: the scorer did not "
                        "score every dimension of scorer.omniscore, and pairs are ranked by OmniScore. Score the "
                        "samples with those dimensions (generate with them, or `videodpo-ray score`)."
                    )
                scores.unscored.append(sample_id)
                continue
            scores.by_prompt.setdefault(prompt_id, []).append(ScoredSample(sample_id, score))
    scores.samples_per_prompt = max(rows_of.values(), default=0)
    return scores


def pair_requests(pairs: Sequence[Pair], chunk_of: dict[str, int]) -> dict[int, pa.Table]:
    """Chunk -> its pairs as rows of PAIR_REQUEST_SCHEMA (in build_pairs order, which is by prompt id)."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for pair in pairs:
        chunk = chunk_of[pair.prompt_id]
        items = rows.setdefault(chunk, [])
        items.append(
            {
                "chunk": chunk,
                "position": len(items),
                "pair_id": pair.pair_id,
                "prompt_id": pair.prompt_id,
                "win_sample_id": pair.win_sample_id,
                "lose_sample_id": pair.lose_sample_id,
                "win_score": pair.win_score,
                "lose_score": pair.lose_score,
                "weight": pair.weight,
            }
        )
    return {chunk: pa.Table.from_pylist(items, schema=PAIR_REQUEST_SCHEMA) for chunk, items in sorted(rows.items())}


def attach_videos(batch: pa.Table, samples: dict[int, shards.ShardInfo]) -> pa.Table:
    """Add prompt, fps, win_video and lose_video to pair requests from their chunks' samples shards."""
    lookup: dict[tuple[int, str], dict[str, Any]] = {}  # (chunk, sample id) -> its samples row
    for chunk in sorted(set(batch.column("chunk").to_pylist())):
        info = samples[chunk]
        rows = shards.read_shard(info).select(["sample_id", "prompt", "video", "fps"]).to_pylist()
        for number, row in enumerate(rows):
            if lookup.setdefault((chunk, row["sample_id"]), row) is not row:
                raise ShardError(f"{info.url}: row {number}: sample_id {row['sample_id']!r} is in the shard twice")
    requests = batch.to_pylist()
    missing = [s for r in requests for s in (r["win_sample_id"], r["lose_sample_id"]) if (r["chunk"], s) not in lookup]
    if missing:
        raise ShardError(f"samples {missing} are scored but missing from their samples shards")
    win = [lookup[(r["chunk"], r["win_sample_id"])] for r in requests]
    lose = [lookup[(r["chunk"], r["lose_sample_id"])] for r in requests]
    columns = {
        "prompt": pa.array([row["prompt"] for row in win], pa.string()),
        "fps": pa.array([row["fps"] for row in win], pa.int32()),
        "win_video": pa.array([row["video"] for row in win], pa.binary()),
        "lose_video": pa.array([row["video"] for row in lose], pa.binary()),
    }
    for name, column in columns.items():
        batch = batch.append_column(name, column)
    return batch


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def plan_pairs(config: PairConfig, planned: Iterable[int] = ()) -> tuple[PairReport, list[Pair], dict[str, int]]:
    """The pairs of the committed scores (no Ray, no writes): (report without shard counts, pairs, prompt -> chunk).
    ShardError first if a chunk with samples, or in `planned` (the chunks generate planned), is unscored; ConfigError
    if a rank pair needs more samples than were generated per prompt."""
    committed, scores_url = committed_scores(config.data, planned), storage.join(config.data, "scores")
    by_prompt, chunk_of = committed.by_prompt, committed.chunk_of
    if not chunk_of:
        raise ShardError(f"{scores_url}: no committed scores shards to pair")
    try:
        config.pairing.check_samples_per_prompt(committed.samples_per_prompt)
    except ConfigError as error:
        raise ConfigError(f"{error}; {scores_url} has {committed.samples_per_prompt} per prompt") from error
    pairs = build_pairs(by_prompt, config.pairing)
    short = [config.pairing.unfit_rank_pairs(len(by_prompt.get(prompt_id, []))) for prompt_id in chunk_of]
    report = PairReport(
        out=config.pairs_root,
        num_prompts=len(chunk_of),
        num_samples=sum(len(samples) for samples in by_prompt.values()),
        unscored=committed.unscored,
        num_pairs=len(pairs),
        prompts_without_pair=len(chunk_of) - len({pair.prompt_id for pair in pairs}),
        prompts_short=sum(1 for unfit in short if unfit),
        rank_pairs_short=sum(len(unfit) for unfit in short),
    )
    scores = [sample.score for samples in by_prompt.values() for sample in samples]
    if scores:
        report.omniscore = _stats(scores)
    if pairs:
        report.score_gap = _stats([pair.score_gap for pair in pairs])
        report.weight = _stats([pair.weight for pair in pairs])
    return report, pairs, chunk_of


@dataclass
class PairShardPlan:
    """What a pair run has left: the pair requests of every chunk whose pair shard is not committed yet."""

    report: PairReport
    pending: dict[int, pa.Table]
    samples: dict[int, shards.ShardInfo]  # the committed samples shards, by chunk


def plan_pair_shards(config: PairConfig, planned: Iterable[int] = ()) -> PairShardPlan:
    """Build the pairs (`plan_pairs`), record (or check) the manifest and list the chunks whose pair shards are
    still to write."""
    report, pairs, chunk_of = plan_pairs(config, planned)
    record_manifest(storage.join(config.pairs_root, PAIRING_MANIFEST), pairing_manifest(config))
    pending = {}
    for chunk, table in pair_requests(pairs, chunk_of).items():
        if shards.shard_exists(config.pairs_root, "pairs", chunk):
            report.skipped.append(chunk)
        else:
            pending[chunk] = table
    samples = {info.index: info for info in shards.list_shards(config.data, "samples")} if pending else {}
    missing = sorted(set(pending) - set(samples))
    if missing:
        raise ShardError(
            f"{storage.join(config.data, 'samples')}: chunk(s) {missing} have scores but no committed samples shard"
        )
    return PairShardPlan(report, pending, samples)


def pair_shard(rows: pa.Table, keep_videos: bool) -> pa.Table:
    """The pairs-schema table of encoded pair rows (videos nulled unless `keep_videos`)."""
    if not keep_videos:
        for name in ("win_video", "lose_video"):
            rows = rows.set_column(rows.schema.get_field_index(name), name, pa.nulls(rows.num_rows, pa.binary()))
    return rows.select(shards.PAIRS_SCHEMA.names)


def pairing_manifest(config: PairConfig) -> dict[str, Any]:
    """What fixes the pair shards: the scores shards (by hash) and every setting that changes a pair row."""
    return {
        "data": config.data,
        "scores_shards": {str(info.index): info.sha256 for info in shards.list_shards(config.data, "scores")},
        "pairing": config.pairing.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "model_init_seed": config.model_init_seed,
        "latent_dtype": config.latent_dtype,
        "text_embedding_dtype": config.embedding_dtype,
        "keep_videos": config.keep_videos,
        "encoder_batch_size": config.encoder_pool.batch_size,  # a latent's rounding depends on its VAE batch
    }


def record_device(config: PairConfig, cluster_gpus: float) -> None:
    """Record (or check) the latent encoder's device type on this cluster ("cuda" where its actors get GPUs, else
    "cpu"): latents and text embeddings round differently on the two, so a resume on the other kind is refused."""
    device = {"encoder_device": config.encoder_pool.device_type(cluster_gpus)}
    record_manifest(storage.join(config.pairs_root, DEVICE_MANIFEST), device)
