"""Prompt files: read, checked row by row, with stable prompt ids.

Prompts are read in file order; a missing `prompt_id` is the 0-based row number `{row:06d}`. Every problem raises
PromptFileError naming the file, the row and the field, before any cluster work starts. A prompt repeated exactly
(same text, another id) is dropped with a warning giving the count: sampling it twice would double its weight in
training.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from videodpo_ray import storage
from videodpo_ray.errors import PromptFileError

logger = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 4096  # default limit: a longer "prompt" is almost surely a broken file (CLIP reads 77 tokens)
ID_COLUMNS = ("prompt_id", "uuid")  # csv: VidProM's `uuid` column becomes the prompt id


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    prompt: str


def read_prompts(url: str, max_chars: int = MAX_PROMPT_CHARS) -> list[PromptRow]:
    """Prompts from a .txt (one per non-blank line), .json, .jsonl, .csv or .parquet file.

    Records have `prompt` (or VBench's `prompt_en`) and an optional `prompt_id` (csv: `prompt_id` or VidProM's
    `uuid`). A .json file is a list (of strings or records: VBench's `VBench_full_info.json` too) or a
    `{name: prompt}` object, as the original VideoCrafter prompt files (`{"clip.mp4": "a prompt"}`): the name without
    its .mp4 is the prompt id. Ids default to the 0-based row number `{row:06d}` (txt: the number of the prompt among
    non-blank lines). Raises PromptFileError naming the file and row for an empty prompt, one over `max_chars`, a
    missing or non-string field, a duplicate id, a missing file, a directory, bytes that are not UTF-8 or not valid
    JSON, and an unknown extension.
    """
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise PromptFileError(f"{url}: prompts file not found") from None
    except IsADirectoryError:
        raise PromptFileError(f"{url}: is a directory, not a prompts file") from None
    extension = posixpath.splitext(url.rstrip("/"))[1].lower()
    if extension == ".txt":
        records = [(f"line {number}", {"prompt": line}) for number, line in _lines(url, data) if line.strip()]
    elif extension == ".jsonl":
        records = [
            (f"line {number}", _json_object(url, number, line)) for number, line in _lines(url, data) if line.strip()
        ]
    elif extension == ".json":
        records = _json_records(url, data)
    elif extension == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except pa.ArrowException as error:
            raise PromptFileError(f"{url}: not a readable parquet file ({error})") from error
        records = [(f"row {row}", record) for row, record in enumerate(table.to_pylist())]
    elif extension == ".csv":
        records = _csv_records(url, data)
    else:
        raise PromptFileError(
            f"{url}: unknown prompts file type {extension!r}; use .txt, .json, .jsonl, .csv or .parquet"
        )
    prompts = [_prompt_row(url, where, index, record, max_chars) for index, (where, record) in enumerate(records)]
    if not prompts:
        raise PromptFileError(f"{url}: no prompts")
    _check_unique_ids(url, prompts, [where for where, _ in records])
    return drop_duplicate_prompts(url, prompts)


def prompt_rows(
    prompts: Sequence[str], source: str = "<prompts>", max_chars: int = MAX_PROMPT_CHARS
) -> list[PromptRow]:
    """Prompts given inline (e.g. in a pipeline YAML): ids are the positions `{index:06d}`."""
    rows = [
        _prompt_row(source, f"item {index}", index, {"prompt": prompt}, max_chars)
        for index, prompt in enumerate(prompts)
    ]
    if not rows:
        raise PromptFileError(f"{source}: no prompts")
    return drop_duplicate_prompts(source, rows)


def drop_duplicate_prompts(source: str, prompts: Sequence[PromptRow]) -> list[PromptRow]:
    """The prompts without exact repeats of an earlier prompt's text (a warning gives the count)."""
    seen: set[str] = set()
    kept = []
    for row in prompts:
        if row.prompt not in seen:
            seen.add(row.prompt)
            kept.append(row)
    if len(kept) < len(prompts):
        dropped = len(prompts) - len(kept)
        logger.warning("%s: dropped %d exact duplicate prompt(s); %d remain", source, dropped, len(kept))
    return kept


def prompts_jsonl(prompts: Sequence[PromptRow]) -> bytes:
    """The prompts as a .jsonl file that `read_prompts` reads back to the same rows."""
    return "".join(json.dumps({"prompt_id": row.prompt_id, "prompt": row.prompt}) + "\n" for row in prompts).encode()


def _lines(url: str, data: bytes) -> Iterator[tuple[int, str]]:
    """The numbered lines of a text file, split at line feeds only (`str.splitlines` also splits at U+2028, U+0085
    and other characters a prompt or a JSON string may hold), without a byte-order mark."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{url}: not UTF-8 text ({error})") from None
    return enumerate((line.removesuffix("\r") for line in text.split("\n")), start=1)


def _json_object(url: str, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{url} line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{url} line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _json_records(url: str, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    try:
        content = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PromptFileError(f"{url}: not valid JSON ({error})") from None
    if isinstance(content, dict):
        return [
            (f"key {name!r}", {"prompt_id": name.removesuffix(".mp4"), "prompt": prompt})
            for name, prompt in content.items()
        ]
    if not isinstance(content, list):
        raise PromptFileError(f"{url}: expected a JSON list or a {{name: prompt}} object, got {type(content).__name__}")
    records = []
    for index, item in enumerate(content):
        if isinstance(item, dict) and "prompt" not in item and "prompt_en" in item:  # VBench_full_info.json
            item = {**item, "prompt": item["prompt_en"]}
        records.append((f"item {index}", item if isinstance(item, dict) else {"prompt": item}))
    return records


def _csv_records(url: str, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a CSV with a header naming a `prompt` column (and optionally `prompt_id` or `uuid`)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{url}: not UTF-8 text ({error})") from None
    try:
        reader = csv.DictReader(io.StringIO(text))
        columns = reader.fieldnames or []
        if "prompt" not in columns:
            raise PromptFileError(
                f"{url}: no 'prompt' column in the CSV header (columns: {', '.join(columns) or 'none'})"
            )
        id_column = next((name for name in ID_COLUMNS if name in columns), None)
        records = []
        for row in reader:
            if None in row or None in row.values():  # DictReader's keys for cells beyond the header, and missing ones
                more = "more" if None in row else "fewer"
                raise PromptFileError(f"{url} line {reader.line_num}: {more} cells than the header's {len(columns)} "
                                      "columns")
            record = {"prompt": row["prompt"]}
            if id_column is not None:
                record["prompt_id"] = row[id_column]
            records.append((f"line {reader.line_num}", record))
        return records
    except csv.Error as error:
        raise PromptFileError(f"{url}: not a readable CSV file ({error})") from None


def _prompt_row(url: str, where: str, index: int, record: dict[str, Any], max_chars: int) -> PromptRow:
    if "prompt" not in record:
        raise PromptFileError(f"{url} {where}: missing field 'prompt'")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise PromptFileError(f"{url} {where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptFileError(f"{url} {where}: empty prompt")
    if len(prompt) > max_chars:
        raise PromptFileError(f"{url} {where}: prompt of {len(prompt)} characters, over the limit of {max_chars}")
    return PromptRow(prompt_id=checked_prompt_id(url, where, record, f"{index:06d}"), prompt=prompt.strip())


def checked_prompt_id(url: str, where: str, record: dict[str, Any], default: str) -> str:
    """The record's `prompt_id` as a string (an integer is written out), `default` when it has none; PromptFileError
    naming the file and row for anything else (a blank string, a bool, a list, ...)."""
    prompt_id = record.get("prompt_id")
    if prompt_id is None:
        return default
    if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        return str(prompt_id)
    if not isinstance(prompt_id, str) or not prompt_id.strip():
        raise PromptFileError(
            f"{url} {where}: field 'prompt_id' must be a non-empty string or an integer, got {prompt_id!r}"
        )
    return prompt_id


def _check_unique_ids(url: str, prompts: Sequence[PromptRow], wheres: Sequence[str]) -> None:
    first: dict[str, str] = {}
    for row, where in zip(prompts, wheres):
        if row.prompt_id in first:
            raise PromptFileError(
                f"{url} {where}: duplicate prompt_id {row.prompt_id!r} (first at {first[row.prompt_id]})"
            )
        first[row.prompt_id] = where
