"""Parquet shards of prompts, samples, scores and pairs on any fsspec URL, committed atomically with manifests.

Layout: `{root}/{kind}/shard-{index:05d}.parquet` plus `{root}/{kind}/shard-{index:05d}.json`, the manifest (rows,
schema version, sha256, size). The manifest is written last and is the commit marker: a parquet file without one is
invisible, so readers must find shards with `list_shards` (never by globbing the directory). Ray Data reads
committed shards with `ray.data.read_parquet(*parquet_inputs(root, kind))`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from videodpo_ray import storage
from videodpo_ray.dimensions import OMNISCORE_DIMENSIONS
from videodpo_ray.errors import ShardError, ShardExistsError

SCHEMA_VERSION = 1


def _schema(kind: str, *fields: pa.Field) -> pa.Schema:
    metadata = {"videodpo_ray.kind": kind, "videodpo_ray.schema_version": str(SCHEMA_VERSION)}
    return pa.schema(list(fields), metadata=metadata)


PROMPTS_SCHEMA = _schema(
    "prompts",
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
)
SAMPLES_SCHEMA = _schema(
    "samples",
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("video", pa.binary(), nullable=False),  # mp4 bytes
    pa.field("fps", pa.int32(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
)
# Scorer outputs kept beside the OmniScore dimensions (null unless the scorer config computes them).
EXTRA_SCORE_COLUMNS: tuple[str, ...] = (
    "background_consistency", "dynamic_degree_vbench", "clip_score", "toy_semantic", "toy_colour", "toy_direction"
)
SCORES_SCHEMA = _schema(
    "scores",
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    *(pa.field(name, pa.float64()) for name in OMNISCORE_DIMENSIONS + EXTRA_SCORE_COLUMNS),  # raw, not normalised
    pa.field("omniscore", pa.float64()),
    pa.field("failed_reason", pa.string()),  # why scoring this video failed; null when it succeeded
)
PAIRS_SCHEMA = _schema(
    "pairs",
    pa.field("pair_id", pa.string(), nullable=False),  # pairs.Pair.pair_id: "{prompt_id}/{win}/{lose}"
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("win_sample_id", pa.string(), nullable=False),
    pa.field("lose_sample_id", pa.string(), nullable=False),
    pa.field("win_score", pa.float64()),
    pa.field("lose_score", pa.float64()),
    pa.field("weight", pa.float32(), nullable=False),
    pa.field("win_video", pa.binary()),  # mp4 bytes
    pa.field("lose_video", pa.binary()),
    pa.field("win_latents", pa.binary()),  # raw tensor bytes, see latents_to_bytes
    pa.field("lose_latents", pa.binary()),
    pa.field("latent_shape", pa.list_(pa.int64())),  # per video, no batch dim
    pa.field("latent_dtype", pa.string()),  # "float32" | "float16" | "bfloat16"
    pa.field("latent_model", pa.string()),  # the encoding model's latent_space, e.g. "vc2:3f1c0a9e2b7d"
    pa.field("fps", pa.int32()),
    pa.field("text_embedding", pa.binary()),  # the prompt's encode_prompts output (L, D), see latents_to_bytes
    pa.field("text_embedding_shape", pa.list_(pa.int64())),  # [L, D]
    pa.field("text_embedding_dtype", pa.string()),  # "float32" | "float16" | "bfloat16"
)
FAILURES_SCHEMA = _schema(  # the samples a generate run gave up on, one row each (stages.generate.split_failures)
    "failures",
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # "sample" or "score"
    pa.field("error", pa.string(), nullable=False),
    pa.field("attempts", pa.int32(), nullable=False),
)
SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS_SCHEMA,
    "samples": SAMPLES_SCHEMA,
    "scores": SCORES_SCHEMA,
    "pairs": PAIRS_SCHEMA,
    "failures": FAILURES_SCHEMA,
}

_MANIFEST_NAME = re.compile(r"^shard-(\d+)\.json$")


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard: where its parquet lives and what its manifest promises."""

    kind: str
    index: int
    url: str
    manifest_url: str
    num_rows: int
    num_bytes: int
    sha256: str
    schema_version: int = SCHEMA_VERSION


def shard_url(root: str, kind: str, index: int) -> str:
    """`{root}/{kind}/shard-{index:05d}.parquet`."""
    return storage.join(root, _check_kind(kind), f"shard-{index:05d}.parquet")


def manifest_url(root: str, kind: str, index: int) -> str:
    """`{root}/{kind}/shard-{index:05d}.json`, the shard's commit marker."""
    return storage.join(root, _check_kind(kind), f"shard-{index:05d}.json")


def make_table(kind: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a table of `kind` from dict rows: missing nullable keys are null; unknown keys, missing required keys
    and values of the wrong type are errors naming the row and field."""
    schema = SCHEMAS[_check_kind(kind)]
    names = set(schema.names)
    required = [field.name for field in schema if not field.nullable]
    for number, row in enumerate(rows):
        unknown = sorted(set(row) - names)
        if unknown:
            raise ShardError(f"{kind} row {number}: unknown field(s) {unknown}; expected {schema.names}")
        missing = [name for name in required if name not in row]
        if missing:
            raise ShardError(f"{kind} row {number}: missing required field(s) {missing}")
    columns = []
    for field in schema:
        try:
            columns.append(pa.array([row.get(field.name) for row in rows], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ShardError(f"{kind} rows: field {field.name!r} ({field.type}): {error}") from error
    return conform_table(pa.Table.from_arrays(columns, schema=schema), kind, f"{kind} rows")


def project_table(table: pa.Table, kind: str) -> pa.Table:
    """The columns of `kind` taken from a wider table (other columns dropped, absent nullable columns null)."""
    schema = SCHEMAS[_check_kind(kind)]
    columns = [
        table.column(field.name) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return conform_table(pa.Table.from_arrays(columns, names=schema.names), kind, f"{kind} rows")


def conform_table(table: pa.Table, kind: str, source: str) -> pa.Table:
    """Return `table` with exactly the schema of `kind` (column order, safe casts such as int64 -> int32).

    Raises ShardError naming `source` and the field for a missing or unknown column, an impossible cast or a null in
    a non-nullable column.
    """
    schema = SCHEMAS[_check_kind(kind)]
    unknown = [name for name in table.column_names if name not in schema.names]
    if unknown:
        raise ShardError(f"{source}: unexpected field(s) {unknown} for a {kind} shard")
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            raise ShardError(f"{source}: missing field {field.name!r} ({field.type}) of a {kind} shard")
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                message = f"field {field.name!r} has type {column.type}, expected {field.type} ({error})"
                raise ShardError(f"{source}: {message}") from error
        if not field.nullable and column.null_count:
            raise ShardError(f"{source}: field {field.name!r} has {column.null_count} null value(s), may not be null")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def write_shard(
    table: pa.Table, root: str, kind: str, index: int, overwrite: bool = False, allow_empty: bool = False
) -> ShardInfo:
    """Write one shard of `kind` at its deterministic key under `root` and commit it with its manifest.

    The parquet is uploaded to a temporary key, moved into place, then the manifest is written last (also
    atomically). Re-writing identical content is a no-op (safe for retried tasks); different content at a committed
    index raises ShardExistsError unless `overwrite`, which un-commits the old shard (deletes its manifest) only
    after the new data is uploaded: an interrupted overwrite leaves the index absent, never a mix of old and new.
    """
    if index < 0:
        raise ShardError(f"{kind} shard index must be >= 0, got {index}")
    url, marker = shard_url(root, kind, index), manifest_url(root, kind, index)
    table = conform_table(table, kind, url)
    if table.num_rows == 0 and not allow_empty:  # allow_empty: a chunk whose every prompt failed is still done
        raise ShardError(f"{url}: refusing to write an empty shard")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    info = ShardInfo(kind, index, url, marker, table.num_rows, len(data), hashlib.sha256(data).hexdigest())

    committed = storage.exists(marker)
    if committed:
        current = _read_manifest(marker, kind, index, url)
        if current.sha256 == info.sha256 and storage.size(url) == info.num_bytes:
            return current
        if current.sha256 != info.sha256 and not overwrite:
            raise ShardExistsError(f"{url}: a different shard is already committed here (overwrite=True replaces it)")
    staged = storage.stage(url, data)
    if committed:
        storage.remove(marker)
    storage.commit(staged, url)
    storage.write_bytes_atomic(marker, _manifest_json(info))
    storage.remove_crashed_writes(marker, f"shard-{index:05d}.")  # the parquet's and the manifest's temporaries
    return info


def uncommit_shard(root: str, kind: str, index: int) -> None:
    """Make shard `index` of `kind` not committed (manifest first, then its parquet); a no-op when it is absent."""
    storage.remove(manifest_url(root, kind, index))
    storage.remove(shard_url(root, kind, index))


def shard_exists(root: str, kind: str, index: int) -> bool:
    """Whether shard `index` of `kind` is committed (its manifest exists): finished work a rerun can skip."""
    return storage.exists(manifest_url(root, kind, index))


def list_shards(root: str, kind: str, verify: bool = False) -> list[ShardInfo]:
    """Committed shards of `kind` under `root`, sorted by index.

    Parquet files without a manifest (uncommitted or interrupted writes) are ignored. A manifest whose parquet is
    missing or has another size raises ShardError naming the shard; `verify` also re-hashes every shard (reads all
    data) to catch same-size corruption. `read_shard` always verifies the hash.
    """
    directory = storage.join(root, _check_kind(kind))
    files = storage.list_files(directory)
    markers = {int(match.group(1)): name for name in files if (match := _MANIFEST_NAME.match(name))}
    contents = storage.read_many([storage.join(directory, name) for name in markers.values()])
    shards = []
    for (index, name), content in zip(markers.items(), contents):
        url = shard_url(root, kind, index)
        info = _parse_manifest(content, storage.join(directory, name), kind, index, url)
        if _name(url) not in files:
            raise ShardError(f"{url}: committed (manifest {name} exists) but the parquet file is missing")
        if files[_name(url)] != info.num_bytes:
            size = files[_name(url)]
            raise ShardError(f"{url}: checksum mismatch, size is {size} bytes, manifest says {info.num_bytes}")
        if verify:
            _verified_bytes(info)
        shards.append(info)
    return sorted(shards, key=lambda info: info.index)


def read_shard(info: ShardInfo) -> pa.Table:
    """Read a committed shard, checking its sha256 against the manifest and its schema against the kind's."""
    data = _verified_bytes(info)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as error:
        raise ShardError(f"{info.url}: not a readable parquet file ({error})") from error
    check_schema(table.schema, info.kind, info.url)
    return table


def check_schema(schema: pa.Schema, kind: str, source: str) -> None:
    """Raise ShardError naming `source` and the first field whose name, type or nullability differs from `kind`'s."""
    expected = SCHEMAS[_check_kind(kind)]
    for field in expected:
        if field.name not in schema.names:
            raise ShardError(f"{source}: schema mismatch, missing field {field.name!r} ({field.type})")
        actual = schema.field(field.name)
        if actual.type != field.type or actual.nullable != field.nullable:
            raise ShardError(
                f"{source}: schema mismatch in field {field.name!r}: {_describe(actual)}, expected {_describe(field)}"
            )
    unknown = [name for name in schema.names if name not in expected.names]
    if unknown:
        raise ShardError(f"{source}: schema mismatch, unexpected field(s) {unknown}")


def check_footer(info: ShardInfo, non_null: Sequence[str] = (), why: str = "") -> None:
    """Check a committed shard from its parquet footer alone (no data read): readable, not empty, the kind's schema,
    and no nulls in the `non_null` columns (from the footer's column statistics; `why` is appended to that error).
    Raises ShardError naming the file."""
    fs, path = storage.filesystem_for(info.url)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            metadata, schema = parquet.metadata, parquet.schema_arrow
    except FileNotFoundError:
        raise ShardError(f"{info.url}: committed but the parquet file is missing") from None
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise ShardError(f"{info.url}: not a readable parquet file ({error})") from error
    if metadata.num_rows == 0:
        raise ShardError(f"{info.url}: empty shard (0 rows)")
    check_schema(schema, info.kind, info.url)
    for column in non_null:
        nulls = _null_count(metadata, schema.get_field_index(column))
        if nulls:
            raise ShardError(f"{info.url}: {nulls} row(s) without {column}{why}")


def null_count(info: ShardInfo, column: str) -> int:
    """Nulls in `column` of a committed shard, from its parquet footer alone (every row when it has no such
    column)."""
    fs, path = storage.filesystem_for(info.url)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        index = parquet.schema_arrow.get_field_index(column)
        return parquet.metadata.num_rows if index < 0 else _null_count(parquet.metadata, index)


def _null_count(metadata: pq.FileMetaData, column: int) -> int:
    """Nulls in a column according to the footer statistics (all rows when a row group has none)."""
    total = 0
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(column).statistics
        if statistics is None or not statistics.has_null_count:
            return metadata.num_rows
        total += statistics.null_count
    return total


def dataset_manifest(root: str, kind: str) -> dict[str, Any]:
    """Summary of the committed shards of `kind`: shard indices, counts of shards, rows and bytes."""
    shards = list_shards(root, kind)
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "num_shards": len(shards),
        "num_rows": sum(info.num_rows for info in shards),
        "num_bytes": sum(info.num_bytes for info in shards),
        "shard_indices": [info.index for info in shards],
    }


def parquet_inputs(root: str, kind: str) -> tuple[list[str], pafs.FileSystem]:
    """(paths of the committed shards, pyarrow filesystem): `ray.data.read_parquet(paths, filesystem=fs)`."""
    filesystem, _ = storage.pyarrow_filesystem(root)
    return [storage.filesystem_for(info.url)[1] for info in list_shards(root, kind)], filesystem


def _check_kind(kind: str) -> str:
    if kind not in SCHEMAS:
        raise ShardError(f"unknown shard kind {kind!r}, expected one of {sorted(SCHEMAS)}")
    return kind


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _describe(field: pa.Field) -> str:
    return f"{field.type}{'' if field.nullable else ' not null'}"


def _manifest_json(info: ShardInfo) -> bytes:
    """The manifest holds no absolute URLs, so a dataset stays valid when copied to another bucket or directory."""
    content = {key: value for key, value in asdict(info).items() if key not in ("url", "manifest_url")}
    return json.dumps({**content, "file": _name(info.url)}, indent=2, sort_keys=True).encode()


def _read_manifest(marker: str, kind: str, index: int, url: str) -> ShardInfo:
    return _parse_manifest(storage.read_bytes(marker), marker, kind, index, url)


def _parse_manifest(data: bytes, marker: str, kind: str, index: int, url: str) -> ShardInfo:
    try:
        content = json.loads(data)
        if content.pop("file") != _name(url):
            raise ValueError(f"it names another data file, expected {_name(url)}")
        info = ShardInfo(**content, url=url, manifest_url=marker)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ShardError(f"{url}: unreadable manifest {marker} ({error!r})") from error
    if (info.kind, info.index) != (kind, index):
        raise ShardError(f"{url}: manifest {marker} describes {info.kind} shard {info.index}")
    if info.schema_version != SCHEMA_VERSION:
        raise ShardError(f"{url}: written with schema version {info.schema_version}, this code reads {SCHEMA_VERSION}")
    return info


def _verified_bytes(info: ShardInfo) -> bytes:
    try:
        data = storage.read_bytes(info.url)
    except FileNotFoundError:
        raise ShardError(f"{info.url}: committed but the parquet file is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != info.num_bytes or digest != info.sha256:
        raise ShardError(
            f"{info.url}: checksum mismatch, {len(data)} bytes with sha256 {digest[:12]}..., "
            f"manifest says {info.num_bytes} bytes with sha256 {info.sha256[:12]}..."
        )
    return data
