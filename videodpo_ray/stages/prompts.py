"""Prompt files: read, checked row by row, with stable prompt ids.

Prompts are read in file order; a missing `prompt_id` is the 0-based row number `{row:06d}`. Every problem raises
PromptFileError naming the file, the row and the field, before any cluster work starts.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from videodpo_ray import storage
from videodpo_ray.errors import PromptFileError


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    prompt: str


def read_prompts(url: str) -> list[PromptRow]:
    """Prompts from a .txt (one per non-blank line), .json, .jsonl or .parquet file.

    Records have `prompt` (or VBench's `prompt_en`) and an optional `prompt_id`. A .json file is a list (of strings
    or records: VBench's `VBench_full_info.json` too) or a `{name: prompt}` object, as the original VideoCrafter
    prompt files (`{"clip.mp4": "a prompt"}`): the name without its .mp4 is the prompt id.
    Ids default to the 0-based row number `{row:06d}` (txt: the number of the prompt among non-blank lines).
    Raises PromptFileError naming the file and row for an empty prompt, a missing or non-string field, a duplicate
    id, an unreadable file or an unknown extension.
    """
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise PromptFileError(f"{url}: prompts file not found") from None
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
    else:
        raise PromptFileError(f"{url}: unknown prompts file type {extension!r}; use .txt, .json, .jsonl or .parquet")
    prompts = [_prompt_row(url, where, index, record) for index, (where, record) in enumerate(records)]
    if not prompts:
        raise PromptFileError(f"{url}: no prompts")
    _check_unique_ids(url, prompts, [where for where, _ in records])
    return prompts


def prompt_rows(prompts: Sequence[str], source: str = "<prompts>") -> list[PromptRow]:
    """Prompts given inline (e.g. in a pipeline YAML): ids are the positions `{index:06d}`."""
    rows = [_prompt_row(source, f"item {index}", index, {"prompt": prompt}) for index, prompt in enumerate(prompts)]
    if not rows:
        raise PromptFileError(f"{source}: no prompts")
    return rows


def prompts_jsonl(prompts: Sequence[PromptRow]) -> bytes:
    """The prompts as a .jsonl file that `read_prompts` reads back to the same rows."""
    return "".join(json.dumps({"prompt_id": row.prompt_id, "prompt": row.prompt}) + "\n" for row in prompts).encode()


def _lines(url: str, data: bytes) -> Iterator[tuple[int, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{url}: not UTF-8 text ({error})") from None
    return enumerate(text.splitlines(), start=1)


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


def _prompt_row(url: str, where: str, index: int, record: dict[str, Any]) -> PromptRow:
    if "prompt" not in record:
        raise PromptFileError(f"{url} {where}: missing field 'prompt'")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise PromptFileError(f"{url} {where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptFileError(f"{url} {where}: empty prompt")
    prompt_id = record.get("prompt_id")
    if prompt_id is None:
        prompt_id = f"{index:06d}"
    elif isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        prompt_id = str(prompt_id)
    elif not isinstance(prompt_id, str) or not prompt_id.strip():
        raise PromptFileError(
            f"{url} {where}: field 'prompt_id' must be a non-empty string or an integer, got {prompt_id!r}"
        )
    return PromptRow(prompt_id=prompt_id, prompt=prompt.strip())


def _check_unique_ids(url: str, prompts: Sequence[PromptRow], wheres: Sequence[str]) -> None:
    first: dict[str, str] = {}
    for row, where in zip(prompts, wheres):
        if row.prompt_id in first:
            raise PromptFileError(
                f"{url} {where}: duplicate prompt_id {row.prompt_id!r} (first at {first[row.prompt_id]})"
            )
        first[row.prompt_id] = where
