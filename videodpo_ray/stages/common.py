"""What the stages share: actor-pool and sampling settings, collecting streamed rows into chunks, run manifests.

A stage cuts its work into chunks; chunk c is committed as `shard-{c:05d}` as soon as all its rows are back, and a
run manifest (`{out}/<stage>.json`) records every setting that changes the shards' content, so a rerun skips
committed chunks and refuses to mix two layouts in one output.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from videodpo_ray import storage
from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import ConfigError


class ActorPoolConfig(StrictConfig):
    """One Ray Data actor pool: how many actors, their resources and their batch size."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)  # rows per call of the actor
    num_cpus: float = Field(1.0, gt=0.0)
    num_gpus: float | Literal["auto"] = "auto"  # auto: 1 per actor when the cluster has GPUs, else 0 (CPU)

    @model_validator(mode="after")
    def _check_sizes(self) -> "ActorPoolConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors {self.min_actors} > max_actors {self.max_actors}")
        return self

    def gpus(self, cluster_gpus: float) -> float:
        """GPUs per actor on a cluster with `cluster_gpus` GPUs in total."""
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus > 0 else 0.0
        return float(self.num_gpus)

    def device_type(self, cluster_gpus: float, device: str = "auto") -> str:
        """The device type the actors compute on: that of `device` ("cuda:1" -> "cuda") unless it is "auto", else
        "cuda" when the actors get GPUs on such a cluster and "cpu" otherwise (the two round floats differently)."""
        if device != "auto":
            return device.split(":")[0]
        return "cuda" if self.gpus(cluster_gpus) > 0 else "cpu"


class SamplingConfig(StrictConfig):
    """Sampler settings passed to `VideoDiffusionModel.sample`; None -> the model family's default."""

    num_frames: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=2)
    width: int | None = Field(None, ge=2)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0)
    fps: int = Field(8, ge=1)  # mp4 container frame rate (VideoCrafter saves at 8; the scorers read it)
    channels_last: bool = False  # convolution weights in channels-last layout (VC2 / T2V-Turbo UNet, VAEs)
    compile: bool = False  # torch.compile the denoiser (and a 2D VAE decoder) once per sampler; eager on failure

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `VideoDiffusionModel.sample` (the rest sets up the sampler or the mp4 files)."""
        return self.model_dump(exclude={"fps", "channels_last", "compile"})


def config_fields(config: StrictConfig) -> dict[str, Any]:
    """The top-level fields of a config as objects (not dumped), for building a derived config."""
    return {name: getattr(config, name) for name in type(config).model_fields}


class ChunkCollector:
    """Gathers rows streamed back in any order and hands out a chunk once all of its rows have arrived.

    Each row carries `chunk` and `position` (0..expected-1 within the chunk); a complete chunk comes back as one
    table sorted by position, so its shard does not depend on which actor finished first.
    """

    def __init__(self, expected_rows: dict[int, int]) -> None:
        self.expected = dict(expected_rows)
        self.parts: dict[int, list[pa.Table]] = {chunk: [] for chunk in expected_rows}
        self.received: dict[int, int] = {chunk: 0 for chunk in expected_rows}

    def add(self, table: pa.Table) -> list[tuple[int, pa.Table]]:
        """Add streamed rows; return the (chunk, table) pairs this completed."""
        complete = []
        chunks = table.column("chunk").to_pylist()
        for chunk in sorted(set(chunks)):
            if chunk not in self.expected:
                raise ValueError(f"row of chunk {chunk}, which is not being processed")
            part = table.filter(pc.equal(table.column("chunk"), chunk))
            self.parts[chunk].append(part)
            self.received[chunk] += part.num_rows
            if self.received[chunk] > self.expected[chunk]:
                raise ValueError(f"chunk {chunk}: {self.received[chunk]} rows, expected {self.expected[chunk]}")
            if self.received[chunk] == self.expected[chunk]:
                rows = pa.concat_tables(self.parts.pop(chunk), promote_options="permissive")
                positions = rows.column("position").to_pylist()
                if sorted(positions) != list(range(self.expected[chunk])):
                    last = self.expected[chunk] - 1
                    raise ValueError(f"chunk {chunk}: positions {sorted(positions)} are not 0..{last}")
                complete.append((chunk, rows.sort_by("position")))
        return complete

    def incomplete(self) -> dict[int, tuple[int, int]]:
        """Chunks not handed out: {chunk: (rows received, rows expected)}."""
        return {chunk: (self.received[chunk], self.expected[chunk]) for chunk in self.parts}


def batch_slices(num_rows: int, batch_size: int | None) -> list[tuple[int, int]]:
    """(offset, length) of the consecutive batches of `batch_size` rows (None: one batch) an actor cuts a chunk into.

    A generate task is one chunk and its actor batches it this way, so batch composition (which changes a sample's
    floating-point rounding, and a score's) is the same in every run, whatever Ray Data's scheduling."""
    size = max(num_rows if batch_size is None else batch_size, 1)
    return [(offset, min(size, num_rows - offset)) for offset in range(0, max(num_rows, 1), size)]


class ChunkProgress:
    """The progress line a stage prints as it commits each chunk: the chunk, how far the stage is, its rate and ETA.

    A killed run's log thus shows which chunks are safe. Rates and ETA count this run's rows only (committed chunks
    of an earlier run are skipped, not redone); `prompts` = (prompts committed before this run, prompts in all).
    """

    def __init__(
        self,
        stage: str,
        unit: str,
        pending_rows: dict[int, int],
        prompts: tuple[int, int] | None = None,
        rows_per_prompt: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage, self.unit, self.clock = stage, unit, clock
        self.total_rows, self.total_chunks = sum(pending_rows.values()), len(pending_rows)
        self.prompts, self.rows_per_prompt = prompts, rows_per_prompt
        self.done_rows = self.done_chunks = 0
        self.started = clock()

    def committed(self, chunk: int, rows: int) -> str:
        """Count chunk `chunk` (`rows` rows) as committed; its progress line."""
        self.done_rows += rows
        self.done_chunks += 1
        rate = self.done_rows / max(self.clock() - self.started, 1e-6)
        eta = (self.total_rows - self.done_rows) / rate if rate > 0 else float("inf")
        what = f"{rows} {self.unit}"
        if self.prompts is not None:
            done_before, total = self.prompts
            prompts_done = done_before + self.done_rows // self.rows_per_prompt
            what = f"{rows // self.rows_per_prompt} prompts, {what}; prompts {prompts_done}/{total}"
        return (
            f"{self.stage}: chunk {chunk} committed ({what}) | {self.done_chunks}/{self.total_chunks} chunks this run"
            f" | {rate:.2f} {self.unit}/s | ETA {format_duration(eta)}"
        )


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 3m05s, 2h07m (rounded to the unit shown)."""
    if seconds == float("inf"):
        return "unknown"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def incomplete_lines(incomplete: dict[int, tuple[int, int]], shard: str, rows: str) -> list[str]:
    """Report lines for the chunks a stage left uncommitted (`ChunkCollector.incomplete()`)."""
    return [
        f"  {shard} {chunk} NOT committed: {received} of {expected} {rows} came back (a batch failed: its traceback "
        "is in the Ray Data log above); rerun to complete it"
        for chunk, (received, expected) in sorted(incomplete.items())
    ]


def record_manifest(url: str, current: dict[str, Any]) -> None:
    """Write the run manifest at `url` on the first run; on a rerun check that it is unchanged (ConfigError)."""
    try:
        recorded = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        storage.write_bytes_atomic(url, json.dumps(current, indent=2, sort_keys=True).encode())
        return
    check_manifest(url, recorded, current)


def check_manifest(url: str, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ConfigError naming every field where a rerun's manifest differs from the one recorded at `url`."""
    changed = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
    if changed:
        details = "; ".join(f"{key}: recorded {recorded.get(key)!r}, now {current.get(key)!r}" for key in changed)
        raise ConfigError(
            f"{url}: this output was generated with other settings ({details}). "
            "Use a new output location, or the recorded settings to resume."
        )
