"""Import the released VideoDPO pair dataset (method.md §4) into pair shards.

Source layout: `winvideos/*.mp4`, `losevideos/*.mp4`, `metadata.json` (entry 2k = winner, 2k+1 = loser of pair k;
`basic.clip_path`, `basic.globalidx`, `misc.frame_caption[0]` = prompt) and `pair.json` (entry k = {video1: 2k,
video2: 2k+1, label: 0, frame_caption, optional score}); video1 always wins. Each video's file is the one its
metadata names (`clip_path`, as the reference loader resolves it; else `{globalidx:06d}.mp4`).

Pair k goes to shard k // rows_per_shard, so shard keys are stable across reruns; committed shards are skipped.
`{out}/import.json` records what fixes the shards' keys and content (rows_per_shard, the source's URL and the
sha256 of its pair.json and metadata.json, source_name, the weighting); a rerun with a different value there is
refused (ConfigError) instead of mixing two layouts in one output.
Every bad pair is reported by index with its reason (or raises with `strict`), never silently dropped. A shard is
one unit of work (`plan_import` -> `import_shard` -> `add_shard_import`): `import_videodpo` runs them in turn,
`jobs.import_videodpo` as parallel Ray Data tasks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from videodpo_ray import shards, storage
from videodpo_ray.errors import ConfigError, DatasetImportError, RejectedPairError, VideoDecodeError
from videodpo_ray.pairs import Pair
from videodpo_ray.stages.common import record_manifest

IMPORT_MANIFEST = "import.json"
WeightFn = Callable[[Optional[float], Optional[float]], float]


class _Rejected(Exception):
    """One pair that cannot be imported; the message is the reason."""


@dataclass(frozen=True)
class RejectedPair:
    index: int
    reason: str


@dataclass
class ImportReport:
    """What one import run did: pairs seen, imported and rejected (with reasons), shards written or skipped."""

    source: str
    output: str
    num_pairs: int
    imported: int = 0
    rejected: list[RejectedPair] = field(default_factory=list)
    written: list[shards.ShardInfo] = field(default_factory=list)
    skipped_shards: list[int] = field(default_factory=list)
    incomplete: list[int] = field(default_factory=list)  # shards whose task failed (not a bad pair): not written

    def summary(self) -> str:
        lines = [
            f"{self.source} -> {self.output}: {self.num_pairs} pairs, {self.imported} imported, "
            f"{len(self.rejected)} rejected; {len(self.written)} shard(s) written, "
            f"{len(self.skipped_shards)} already committed and skipped"
        ]
        lines += [f"  rejected pair {item.index}: {item.reason}" for item in self.rejected]
        if self.incomplete:
            lines.append(f"  shard(s) {', '.join(map(str, self.incomplete))} failed and were not written (see the "
                         "task errors above); a rerun imports only them")
        return "\n".join(lines)


@dataclass(frozen=True)
class ShardSource:
    """What one pair shard is made of: pair.json entries k (with their index) and the metadata entries they name."""

    index: int
    pairs: tuple[tuple[int, Any], ...]
    metadata: dict[int, Any]  # entries 2k and 2k + 1 of metadata.json, where they exist
    num_metadata: int  # entries in metadata.json (for the error naming a missing one)


@dataclass
class ImportPlan:
    """An import run: the shards still to write and the report so far (shards already committed are skipped)."""

    report: ImportReport
    pending: list[ShardSource]


@dataclass(frozen=True)
class ShardImport:
    """What importing shard `index` did: its ShardInfo when written, the rows imported and the pairs rejected."""

    index: int
    info: shards.ShardInfo | None
    imported: int
    rejected: tuple[RejectedPair, ...]


def plan_import(
    src: str,
    out: str,
    rows_per_shard: int = 64,
    overwrite: bool = False,
    weight_fn: WeightFn | None = None,
    source_name: str = "videodpo",
) -> ImportPlan:
    """Read metadata.json and pair.json, record (or check) `{out}/import.json` before any shard is written, and list
    the shards to write: pair k goes to shard k // rows_per_shard; committed shards are skipped unless `overwrite`.

    `weight_fn` and `source_name` are the ones `import_shard` will get (they change the rows, so they are recorded).
    `overwrite` re-imports every shard with the recorded settings and is refused, like any rerun, when one differs:
    an interrupted overwrite would otherwise leave shards of two layouts under one manifest.
    """
    if rows_per_shard <= 0:
        raise ConfigError(f"rows_per_shard must be positive, got {rows_per_shard}")
    metadata, metadata_sha256 = _read_json_list(src, "metadata.json")
    pairs, pairs_sha256 = _read_json_list(src, "pair.json")
    manifest = {
        "rows_per_shard": rows_per_shard,
        "src": storage.absolute_url(src).rstrip("/"),
        "pair_json_sha256": pairs_sha256,
        "metadata_json_sha256": metadata_sha256,
        "source_name": source_name,
        "weight_fn": _weight_label(weight_fn),
    }
    record_manifest(storage.join(out, IMPORT_MANIFEST), manifest)
    plan = ImportPlan(ImportReport(source=src, output=out, num_pairs=len(pairs)), [])
    for index in range(math.ceil(len(pairs) / rows_per_shard)):
        if not overwrite and shards.shard_exists(out, "pairs", index):
            plan.report.skipped_shards.append(index)
            continue
        ks = range(index * rows_per_shard, min((index + 1) * rows_per_shard, len(pairs)))
        entries = {i: metadata[i] for k in ks for i in (2 * k, 2 * k + 1) if i < len(metadata)}
        plan.pending.append(ShardSource(index, tuple((k, pairs[k]) for k in ks), entries, len(metadata)))
    return plan


def import_shard(
    src: str,
    out: str,
    source: ShardSource,
    strict: bool = False,
    weight_fn: WeightFn | None = None,
    source_name: str = "videodpo",
    overwrite: bool = False,
) -> ShardImport:
    """Validate and decode one shard's pairs and write the shard (nothing is written when it has no valid pair, or,
    with `strict`, when one is rejected)."""
    rows, rejected = [], []
    for k, pair in source.pairs:
        try:
            rows.append(_pair_row(src, k, pair, source, source_name, weight_fn))
        except _Rejected as rejection:
            rejected.append(RejectedPair(k, str(rejection)))
    if not rows or (strict and rejected):
        return ShardImport(source.index, None, 0, tuple(rejected))
    info = shards.write_shard(shards.make_table("pairs", rows), out, "pairs", source.index, overwrite=overwrite)
    return ShardImport(source.index, info, len(rows), tuple(rejected))


def add_shard_import(report: ImportReport, result: ShardImport, strict: bool) -> None:
    """Count one shard's import in the report; with `strict`, raise RejectedPairError for its first bad pair."""
    if strict and result.rejected:
        first = result.rejected[0]
        raise RejectedPairError(f"{report.source}: pair {first.index}: {first.reason}")
    report.rejected.extend(result.rejected)
    report.imported += result.imported
    if result.info is not None:
        report.written.append(result.info)


def import_videodpo(
    src: str,
    out: str,
    rows_per_shard: int = 64,
    strict: bool = False,
    weight_fn: WeightFn | None = None,
    source_name: str = "videodpo",
    overwrite: bool = False,
) -> ImportReport:
    """Import the dataset at `src` (path or URL) into `{out}/pairs/shard-*.parquet`, one shard after the other (the
    `import-videodpo` command runs the same shards as parallel Ray Data tasks: `jobs.import_videodpo`).

    mp4 bytes are kept as they are (win_video / lose_video; every file is decoded once to validate it and read its
    fps). Ids: prompt `{source_name}-{k:06d}`, samples `{source_name}-{metadata index:06d}`, pair id
    `pairs.Pair.pair_id`. Weight: `weight_fn(win_score, lose_score)` if given (scores from pair.json `score` =
    [win, lose], else None; e.g. `functools.partial(pairs.product_weight, alpha=1)`), otherwise 1.0. `strict` raises
    RejectedPairError at the first bad pair, before its shard is written. Committed shards are skipped unless
    `overwrite`; a rerun with other settings than `{out}/import.json` records raises ConfigError (`plan_import`).
    """
    plan = plan_import(src, out, rows_per_shard, overwrite, weight_fn, source_name)
    for source in plan.pending:
        result = import_shard(src, out, source, strict, weight_fn, source_name, overwrite)
        add_shard_import(plan.report, result, strict)
    return plan.report


def _weight_label(weight_fn: WeightFn | None) -> str | None:
    """The weighting as the manifest records it: None (every weight 1.0), or the function's module.qualname with a
    partial's arguments (a lambda or closure is known by its name only)."""
    if weight_fn is None:
        return None
    if isinstance(weight_fn, functools.partial):
        arguments = [repr(value) for value in weight_fn.args]
        arguments += [f"{key}={value!r}" for key, value in sorted(weight_fn.keywords.items())]
        return f"{_weight_label(weight_fn.func)}({', '.join(arguments)})"
    name = getattr(weight_fn, "__qualname__", type(weight_fn).__qualname__)
    return f"{getattr(weight_fn, '__module__', type(weight_fn).__module__)}.{name}"


def _read_json_list(src: str, name: str) -> tuple[list[Any], str]:
    """The JSON list in `{src}/{name}` and the sha256 of the file's bytes."""
    url = storage.join(src, name)
    try:
        data = storage.read_bytes(url)
        content = json.loads(data)
    except FileNotFoundError:
        raise DatasetImportError(f"{url}: missing (not a VideoDPO dataset directory?)") from None
    except ValueError as error:
        raise DatasetImportError(f"{url}: not valid JSON ({error})") from None
    if not isinstance(content, list):
        raise DatasetImportError(f"{url}: expected a JSON list, got {type(content).__name__}")
    return content, hashlib.sha256(data).hexdigest()


def _pair_row(
    src: str, k: int, pair: Any, source: ShardSource, source_name: str, weight_fn: WeightFn | None
) -> dict[str, Any]:
    if not isinstance(pair, dict):
        raise _Rejected(f"pair.json entry is a {type(pair).__name__}, expected an object")
    win_index, lose_index = pair.get("video1"), pair.get("video2")
    if (win_index, lose_index) != (2 * k, 2 * k + 1):
        raise _Rejected(f"video1/video2 are ({win_index}, {lose_index}), expected ({2 * k}, {2 * k + 1})")
    if pair.get("label", 0) != 0:
        raise _Rejected(f"label is {pair['label']!r}; the released layout always has 0 (video1 wins)")
    if lose_index >= source.num_metadata:
        raise _Rejected(f"metadata.json has {source.num_metadata} entries, no entry {lose_index}")
    win_meta, lose_meta = source.metadata[win_index], source.metadata[lose_index]
    prompt = _caption(win_meta)
    if prompt is None:
        raise _Rejected(f"metadata entry {win_index}: misc.frame_caption[0] is missing or empty")
    others = ((_caption(lose_meta), f"metadata entry {lose_index}"), (_pair_caption(pair), "pair.json frame_caption"))
    for other, where in others:
        if other is not None and other != prompt:
            raise _Rejected(f"caption of {where} ({other!r}) differs from metadata entry {win_index} ({prompt!r})")

    win_video, win_frames, fps = _load_video(src, win_meta, win_index, "winvideos")
    lose_video, lose_frames, lose_fps = _load_video(src, lose_meta, lose_index, "losevideos")
    if win_frames != lose_frames or fps != lose_fps:
        raise _Rejected(f"winner is {win_frames} (T, H, W, C) at {fps} fps, loser {lose_frames} at {lose_fps} fps")
    win_score, lose_score = _scores(pair.get("score"))
    weight = 1.0 if weight_fn is None else float(weight_fn(win_score, lose_score))
    win_id, lose_id = f"{source_name}-{win_index:06d}", f"{source_name}-{lose_index:06d}"
    pair = Pair(f"{source_name}-{k:06d}", win_id, lose_id, win_score, lose_score, weight)
    return {
        "pair_id": pair.pair_id,
        "prompt_id": pair.prompt_id,
        "prompt": prompt,
        "win_sample_id": pair.win_sample_id,
        "lose_sample_id": pair.lose_sample_id,
        "win_score": win_score,
        "lose_score": lose_score,
        "weight": weight,
        "win_video": win_video,
        "lose_video": lose_video,
        "fps": fps,
    }


def _caption(entry: Any) -> str | None:
    """A metadata entry's caption (`misc.frame_caption`), None when it has none."""
    misc = entry.get("misc") if isinstance(entry, dict) else None
    return _first_caption(misc.get("frame_caption") if isinstance(misc, dict) else None)


def _pair_caption(pair: dict[str, Any]) -> str | None:
    return _first_caption(pair.get("frame_caption"))


def _first_caption(caption: Any) -> str | None:
    """A `frame_caption` field: its first caption when it is a list (the released files), the caption itself when
    it is one string (never its first letter), else None."""
    if isinstance(caption, list):
        caption = caption[0] if caption else None
    return caption if isinstance(caption, str) and caption.strip() else None


def _video_file(entry: Any, index: int, folder: str) -> str:
    """`folder/name.mp4` of a metadata entry: from basic.clip_path (any prefix), else basic.globalidx."""
    basic = entry.get("basic") if isinstance(entry, dict) else None
    if not isinstance(basic, dict):
        raise _Rejected(f"metadata entry {index}: no 'basic' object")
    clip_path = basic.get("clip_path")
    if isinstance(clip_path, str) and clip_path:
        parent, name = posixpath.split(clip_path.replace("\\", "/"))
        if posixpath.basename(parent) != folder:
            raise _Rejected(f"metadata entry {index}: clip_path {clip_path!r} is not in {folder}/")
        return f"{folder}/{name}"
    globalidx = basic.get("globalidx")
    if isinstance(globalidx, int) and not isinstance(globalidx, bool):
        return f"{folder}/{globalidx:06d}.mp4"
    raise _Rejected(f"metadata entry {index}: neither basic.clip_path nor basic.globalidx")


def _load_video(src: str, entry: Any, index: int, folder: str) -> tuple[bytes, tuple[int, ...], int]:
    relative = _video_file(entry, index, folder)
    try:
        data = storage.read_bytes(storage.join(src, relative))
    except FileNotFoundError:
        raise _Rejected(f"video file {relative} (metadata entry {index}) is missing") from None
    from videodpo_ray.video import decode_mp4  # PyAV and torch: in the tasks that decode, not in the driver

    try:
        frames, fps = decode_mp4(data, name=relative)
    except VideoDecodeError as error:
        raise _Rejected(str(error)) from error
    return data, tuple(frames.shape), round(fps)  # the pairs schema's int fps


def _scores(score: Any) -> tuple[float | None, float | None]:
    if score is None:
        return None, None
    if (
        isinstance(score, list)
        and len(score) == 2
        and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in score)
    ):
        return float(score[0]), float(score[1])
    raise _Rejected(f"score {score!r}: expected [win_score, lose_score]")
