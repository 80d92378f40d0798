"""Pair shards -> training micro-batches, in the order `training/plan.py` fixes.

Rows are read with `shards.read_shard` (checksummed, any fsspec URL); a background thread reads and decodes ahead.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import torch

from videodpo_ray import shards, tensor_bytes
from videodpo_ray.errors import ShardError
from videodpo_ray.shards import ShardInfo
from videodpo_ray.training.plan import PairPlan, RowRef
from videodpo_ray.video import decode_mp4

VIDEO_COLUMNS = ("win_video", "lose_video")


@dataclass
class PairRecord:
    """One pair, decoded: latents when the shard stores them, else the videos' uint8 frames (T, H, W, 3)."""

    pair_id: str
    prompt: str
    weight: float
    win_latents: torch.Tensor | None
    lose_latents: torch.Tensor | None
    win_frames: torch.Tensor | None
    lose_frames: torch.Tensor | None
    source: str  # "shard-url row N" for error messages
    text_embedding: torch.Tensor | None = None  # the prompt's stored text embedding (L, D), when the shard has one


@dataclass
class MicroBatch:
    step: int
    micro: int
    pairs: list[PairRecord]

    @property
    def pair_ids(self) -> list[str]:
        return [pair.pair_id for pair in self.pairs]


def swapped(pair: PairRecord) -> PairRecord:
    """The pair with winner and loser exchanged (the negative control `data.swap_winner_loser`)."""
    return replace(
        pair,
        win_latents=pair.lose_latents,
        lose_latents=pair.win_latents,
        win_frames=pair.lose_frames,
        lose_frames=pair.win_frames,
    )


def decode_row(table: pa.Table, row: int, source: str, latent_space: str, use_stored_latents: bool) -> PairRecord:
    """Decode one pair row. Stored latents are used when present (and made in `latent_space`, the training model's
    `VideoDiffusionModel.latent_space`), else the mp4s."""
    values = {name: table.column(name)[row].as_py() for name in table.column_names}
    has_latents = values["win_latents"] is not None and values["lose_latents"] is not None
    win_latents = lose_latents = win_frames = lose_frames = None
    if has_latents and use_stored_latents:
        if values["latent_model"] != latent_space:
            raise ShardError(
                f"{source}: latents were made by the VAE {values['latent_model']!r} but this run's model encodes "
                f"with {latent_space!r} (another family, or a VAE with another scale or layout); "
                "re-encode the pairs with this model (or drop the latent columns to encode from the mp4s)"
            )
        shape, dtype = values["latent_shape"], values["latent_dtype"]
        if shape is None or dtype is None:
            raise ShardError(f"{source}: latents present but latent_shape/latent_dtype is null")
        try:
            win_latents = tensor_bytes.latents_from_bytes(values["win_latents"], shape, dtype)
            lose_latents = tensor_bytes.latents_from_bytes(values["lose_latents"], shape, dtype)
        except ValueError as error:
            raise ShardError(f"{source}: {error}") from error
    else:
        if values["win_video"] is None or values["lose_video"] is None:
            raise ShardError(f"{source}: pair {values['pair_id']!r} has neither latents nor both videos")
        win_frames, _ = decode_mp4(values["win_video"], f"{source} win_video")
        lose_frames, _ = decode_mp4(values["lose_video"], f"{source} lose_video")
    text_embedding = None
    if values["text_embedding"] is not None:
        try:
            text_embedding = tensor_bytes.latents_from_bytes(
                values["text_embedding"], values["text_embedding_shape"] or [], values["text_embedding_dtype"] or ""
            )
        except ValueError as error:
            raise ShardError(f"{source}: text_embedding: {error}") from error
    return PairRecord(
        pair_id=values["pair_id"],
        prompt=values["prompt"],
        weight=float(values["weight"]),
        win_latents=win_latents,
        lose_latents=lose_latents,
        win_frames=win_frames,
        lose_frames=lose_frames,
        source=source,
        text_embedding=text_embedding,
    )


class ShardCache:
    """Keeps the last few shard tables of one worker (it walks contiguous runs of shards)."""

    def __init__(self, plan: PairPlan, capacity: int = 2) -> None:
        self.plan = plan
        self.capacity = capacity
        self.tables: OrderedDict[int, pa.Table] = OrderedDict()

    def table(self, shard: int) -> pa.Table:
        if shard not in self.tables:
            info = self.plan.shards[shard]
            table = shards.read_shard(info)
            if table.num_rows != info.num_rows:
                raise ShardError(f"{info.url}: has {table.num_rows} rows, its manifest says {info.num_rows}")
            self.tables[shard] = table
            while len(self.tables) > self.capacity:
                self.tables.popitem(last=False)
        self.tables.move_to_end(shard)
        return self.tables[shard]


class PairLoader:
    """Micro-batches of one worker for one epoch from a start step, read and decoded ahead in a thread."""

    def __init__(
        self,
        plan: PairPlan,
        *,
        epoch: int,
        rank: int,
        start_step: int,
        latent_space: str,
        use_stored_latents: bool = True,
        prefetch: int = 2,
        swap_winner_loser: bool = False,
    ) -> None:
        self.plan = plan
        self.swap_winner_loser = swap_winner_loser
        self.epoch = epoch
        self.rank = rank
        self.start_step = start_step
        self.latent_space = latent_space
        self.use_stored_latents = use_stored_latents
        self.cache = ShardCache(plan)
        self.prefetch = prefetch

    def _load(self, step: int, micro: int, refs: list[RowRef]) -> MicroBatch:
        pairs = []
        for ref in refs:
            table = self.cache.table(ref.shard)
            source = f"{self.plan.shards[ref.shard].url} row {ref.row}"
            pair = decode_row(table, ref.row, source, self.latent_space, self.use_stored_latents)
            pairs.append(swapped(pair) if self.swap_winner_loser else pair)
        return MicroBatch(step, micro, pairs)

    def __iter__(self) -> Iterator[MicroBatch]:
        batches = self.plan.micro_batches(self.epoch, self.rank, self.start_step)
        if self.prefetch == 0:
            for step, micro, refs in batches:
                yield self._load(step, micro, refs)
            return
        yield from _prefetched((self._load(*item) for item in batches), self.prefetch)


_DONE = object()


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `items` in a daemon thread, `depth` items ahead; exceptions are re-raised in the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry: tuple[Any, BaseException | None]) -> bool:
        """Put `entry` in the buffer unless the consumer has stopped (then False: the thread ends, never blocks)."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((_DONE, None))
        except BaseException as error:  # handed to the consumer, which raises it with its traceback
            hand_over((None, error))

    thread = threading.Thread(target=produce, name="pair-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()


def pair_latents(model: torch.nn.Module, batch: MicroBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner, loser) latents (B, ...) in float32 on `device`: the stored latents, else the VAE encoding (posterior
    mean) of the decoded mp4 frames, encoded with `model.encode_videos` in one batch."""
    stored = [pair.win_latents for pair in batch.pairs] + [pair.lose_latents for pair in batch.pairs]
    frames = [pair.win_frames for pair in batch.pairs] + [pair.lose_frames for pair in batch.pairs]
    missing = [index for index, latents in enumerate(stored) if latents is None]
    if missing:
        with torch.no_grad():
            encoded = model.encode_videos(torch.stack([frames[index] for index in missing]).to(device))
        for index, latents in zip(missing, encoded):
            stored[index] = latents
    latents = torch.stack([latents.to(device, torch.float32) for latents in stored])
    return latents[: len(batch.pairs)], latents[len(batch.pairs) :]


def stores_text_embeddings(shard_list: Sequence[ShardInfo]) -> bool:
    """Whether every row of every shard stores its prompt's text embedding (from the parquet footers alone)."""
    return all(shards.null_count(info, "text_embedding") == 0 for info in shard_list)


def prompts_to_encode(pairs: Sequence[PairRecord], dropped: Sequence[bool]) -> list[str]:
    """The prompts of the pairs that keep their prompt (not CFG-dropped) and have no stored text embedding."""
    return [pair.prompt for pair, drop in zip(pairs, dropped) if not drop and pair.text_embedding is None]


def batch_text_embeddings(
    pairs: Sequence[PairRecord], dropped: Sequence[bool], empty: torch.Tensor, encoded: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """(B, L, D) float32 on the CPU: the empty-prompt embedding for a dropped pair, else the pair's stored embedding,
    else `encoded[prompt]`."""
    rows = [
        empty if drop else pair.text_embedding if pair.text_embedding is not None else encoded[pair.prompt]
        for pair, drop in zip(pairs, dropped)
    ]
    return torch.stack([row.to("cpu", torch.float32) for row in rows])


class PromptEmbeddingCache:
    """Text embeddings of prompts whose shards store none: encoded on demand, kept on the CPU in an LRU cache of at
    most `max_entries` prompts.

    `lookup(everyone, wanted)` encodes the prompts of `everyone` not cached yet, sorted, one per call: ranks calling
    it with the same `everyone` (all ranks' prompts) run the text encoder identically (needed when its weights are
    ZeRO-3 partitioned: every rank must join) and keep identical caches. One prompt per call: an embedding never
    depends on which other prompts were missing at the time (batched GEMMs may round differently), so a resumed run
    gets bit-identical embeddings.
    """

    def __init__(self, model: torch.nn.Module, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"PromptEmbeddingCache: max_entries must be >= 1, got {max_entries}")
        self.model = model
        self.max_entries = max_entries
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, prompt: str) -> torch.Tensor:
        """The prompt's text embedding (L, D) on the CPU."""
        with torch.no_grad():
            return self.model.encode_prompts([prompt])[0].detach().to("cpu")

    def lookup(self, everyone: Sequence[str], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompt -> embedding for the `wanted` prompts (a subset of `everyone`)."""
        fresh = {prompt: self.encode(prompt) for prompt in sorted(set(everyone) - set(self.entries))}
        found = {prompt: fresh[prompt] if prompt in fresh else self.entries[prompt] for prompt in wanted}
        for prompt in sorted(set(everyone)):
            if prompt in fresh:
                self.entries[prompt] = fresh[prompt]
            self.entries.move_to_end(prompt)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return found
