"""The Score stage without Ray: score existing mp4 files. Its config, inputs, plan, run manifest and report.

The videos under a directory or URL are matched with prompts from a JSON or CSV file:
- JSON: an object {"clip.mp4": "a prompt", ...} or a list of {"video": "clip.mp4", "prompt": ..., "prompt_id": ...};
- CSV: a header with `video` and `prompt` columns (optional `prompt_id`).
A video is matched by its file name or its name without ".mp4". A missing prompt_id is derived from the prompt text
(the first 16 hex digits of its sha256), so videos of the same prompt share an id and can be paired.

The sorted videos are cut into chunks of `videos_per_shard`; chunk c becomes `{out}/scores/shard-{c:05d}`. A rerun
skips committed shards; `{out}/scoring.json` records the video list, the chunking and the scorer's settings (and
`scoring-device.json` its device type) so a rerun cannot mix two layouts or two scorers. An actor scores one shard's
videos per call, in batches of `scorer_pool.batch_size`, so every run batches them alike.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from videodpo_ray import shards, storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import VideoInputError
from videodpo_ray.scoring import ScorerConfig
from videodpo_ray.stages.common import ActorPoolConfig, incomplete_lines, record_manifest
from videodpo_ray.stages.prompts import checked_prompt_id

SCORING_MANIFEST = "scoring.json"
DEVICE_MANIFEST = "scoring-device.json"  # the scorers' device type, known once the cluster is


@dataclass(frozen=True)
class VideoInput:
    sample_id: str  # the file name without .mp4
    prompt_id: str
    prompt: str
    url: str


def prompt_id_for(prompt: str) -> str:
    """Id of a prompt given without one: the first 16 hex digits of sha256(prompt)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def list_videos(url: str) -> list[str]:
    """Names of the .mp4 files directly under `url`, sorted."""
    names = sorted(name for name in storage.list_files(url) if name.lower().endswith(".mp4"))
    if not names:
        raise VideoInputError(f"{url}: no .mp4 files")
    return names


def read_prompt_map(url: str) -> dict[str, tuple[str, str]]:
    """{video name as written in the file: (prompt_id, prompt)} from a .json or .csv prompt file."""
    extension = posixpath.splitext(url)[1].lower()
    if extension not in (".json", ".csv"):
        raise VideoInputError(f"{url}: unknown prompts file type {extension!r}; use .json or .csv")
    try:
        text = storage.read_bytes(url).decode("utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSV) is dropped
    except FileNotFoundError:
        raise VideoInputError(f"{url}: prompts file not found") from None
    except UnicodeDecodeError as error:
        raise VideoInputError(f"{url}: not UTF-8 text ({error})") from None
    if extension == ".json":
        records = _json_records(url, text)
    else:
        reader = csv.DictReader(io.StringIO(text))
        records = [(f"row {number}", _blank_as_missing(row)) for number, row in enumerate(reader, start=2)]
    mapping: dict[str, tuple[str, str]] = {}
    prompt_of: dict[str, tuple[str, str]] = {}  # prompt_id -> (prompt, where first given)
    for where, record in records:
        video, prompt = _text_field(url, where, record, "video"), _text_field(url, where, record, "prompt")
        if video in mapping:
            raise VideoInputError(f"{url} {where}: video {video!r} is listed twice")
        prompt_id = checked_prompt_id(url, where, record, prompt_id_for(prompt))
        first_prompt, first_where = prompt_of.setdefault(prompt_id, (prompt, where))
        if first_prompt != prompt:
            raise VideoInputError(f"{url} {where}: prompt_id {prompt_id!r} is {prompt!r} here but {first_prompt!r} "
                                  f"at {first_where}: videos of one prompt_id are paired with each other")
        mapping[video] = (prompt_id, prompt)
    if not mapping:
        raise VideoInputError(f"{url}: no prompts")
    return mapping


def _blank_as_missing(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row with its empty cells as missing fields (an empty prompt_id cell: the id derived from the prompt)."""
    return {key: value for key, value in row.items() if value != ""}


def video_inputs(videos_url: str, prompts_url: str) -> list[VideoInput]:
    """Every .mp4 under `videos_url` with its prompt; VideoInputError lists the videos that have none."""
    prompts = read_prompt_map(prompts_url)
    inputs, missing, names = [], [], {}
    for name in list_videos(videos_url):
        stem = name[: -len(".mp4")]
        if stem in names:  # `a.mp4` and `a.MP4`: one sample id, two videos
            raise VideoInputError(f"{videos_url}: {names[stem]} and {name} would both be sample {stem!r}; rename one")
        names[stem] = name
        entry = prompts.get(name) or prompts.get(stem)
        if entry is None:
            missing.append(name)
            continue
        inputs.append(VideoInput(stem, entry[0], entry[1], storage.join(videos_url, name)))
    if missing:
        raise VideoInputError(f"{prompts_url}: no prompt for {len(missing)} video(s): {', '.join(missing[:20])}")
    return inputs


def _json_records(url: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise VideoInputError(f"{url}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if isinstance(data, dict):
        return [(f"key {video!r}", {"video": video, "prompt": prompt}) for video, prompt in data.items()]
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return [(f"item {index}", item) for index, item in enumerate(data)]
    raise VideoInputError(f"{url}: expected an object {{video: prompt}} or a list of objects")


def _text_field(url: str, where: str, record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise VideoInputError(f"{url} {where}: field {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


class ScoreFilesConfig(StrictConfig):
    """Score the mp4 files under `videos` with prompts from `prompts`; score shards go to `out`."""

    videos: str
    prompts: str
    out: str
    videos_per_shard: int = Field(64, ge=1)
    scorer: ScorerConfig
    scorer_pool: ActorPoolConfig = ActorPoolConfig()


@dataclass
class ScoreReport:
    """What one score run did, by shard index."""

    out: str
    num_videos: int
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed_videos: int = 0
    incomplete: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard -> (rows back, rows expected)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"score -> {self.out}: {self.num_videos} videos; {len(self.written)} shard(s) written, "
            f"{len(self.skipped)} already committed; {self.failed_videos} video(s) failed to score "
            f"(see failed_reason); {self.seconds:.1f} s"
        ]
        return "\n".join(lines + incomplete_lines(self.incomplete, "shard", "videos"))


@dataclass
class ScorePlan:
    """What a score run has left: request rows (chunk, position, ids, prompt, url) of every uncommitted shard."""

    report: ScoreReport
    rows: list[dict[str, Any]]
    expected: dict[int, int]  # rows per pending shard


def plan_score(config: ScoreFilesConfig) -> ScorePlan:
    """List and match the inputs, record (or check) the manifest, and list the shards still to score."""
    inputs = video_inputs(config.videos, config.prompts)
    record_manifest(storage.join(config.out, SCORING_MANIFEST), scoring_manifest(config, inputs))
    plan = ScorePlan(ScoreReport(out=config.out, num_videos=len(inputs)), [], {})
    for index, begin in enumerate(range(0, len(inputs), config.videos_per_shard)):
        chunk = inputs[begin : begin + config.videos_per_shard]
        if shards.shard_exists(config.out, "scores", index):
            plan.report.skipped.append(index)
            continue
        plan.expected[index] = len(chunk)
        plan.rows += [
            {"chunk": index, "position": position, "sample_id": item.sample_id, "prompt_id": item.prompt_id,
             "prompt": item.prompt, "url": item.url}
            for position, item in enumerate(chunk)
        ]
    return plan


def scoring_manifest(config: ScoreFilesConfig, inputs: list[VideoInput]) -> dict[str, Any]:
    listing = "\n".join(f"{item.sample_id}\t{item.prompt_id}\t{item.prompt}" for item in inputs).encode()
    return {
        "num_videos": len(inputs),
        "videos_sha256": hashlib.sha256(listing).hexdigest(),
        "videos_per_shard": config.videos_per_shard,
        "scorer": config.scorer.model_dump(mode="json", exclude={"device"}),
        "scorer_batch_size": config.scorer_pool.batch_size,  # batch composition changes a score's rounding
    }


def record_scorer_device(config: ScoreFilesConfig, cluster_gpus: float) -> None:
    """Record (or check) the scorers' device type on this cluster (`scorer.device`, or "cuda" where the actors get
    GPUs, else "cpu"): on a GPU some scorers run in float16, so a rerun on the other kind is refused."""
    device = config.scorer_pool.device_type(cluster_gpus, config.scorer.device)
    record_manifest(storage.join(config.out, DEVICE_MANIFEST), {"scorer_device": device})
