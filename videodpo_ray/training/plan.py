"""The training data plan: which pair every worker trains on at every step, in an exact, restorable order.

Why not Ray Data's `streaming_split`: it hands blocks to whichever worker asks first (the split is decided at run
time), and its iterator cannot be positioned at "step k of epoch e" after a restart, so a resumed run would skip or
repeat pairs. Instead every worker derives the same plan from (the committed shard list, seed, epoch):

- epoch order: the shards in a seeded random order, the rows of each shard in a seeded random order
  (a shard-sized shuffle window: each worker reads a contiguous run of shards, not every shard);
- that order is cut into `num_workers` contiguous streams of `steps_per_epoch * pairs_per_worker * grad_accum`
  pairs (the remainder, fewer than one global step of pairs, is left out of this epoch only);
- optimizer step s of worker r consumes items [s * P * A, (s + 1) * P * A) of stream r, micro-batch m the m-th slice
  of P of them.

So the data position is just (epoch, steps done in the epoch): the shards and rows consumed follow from it, a
resumed run continues with exactly the pairs an uninterrupted run would see, and no pair is seen twice in an epoch.
The shard list is frozen when a run starts (stored in its checkpoints), so shards committed later cannot shift it.

Torch-free: the train job checks its inputs against the plan before it imports torch. `training/data.py` loads
the rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from videodpo_ray.errors import ShardError
from videodpo_ray.shards import ShardInfo

LATENT_COLUMNS = ("win_latents", "lose_latents")


@dataclass(frozen=True)
class DataPosition:
    """Where training stands in the data: epoch and optimizer steps completed in it."""

    epoch: int = 0
    step_in_epoch: int = 0


@dataclass(frozen=True)
class RowRef:
    """One pair: row `row` of shard number `shard` in the plan's shard list."""

    shard: int
    row: int


class PairPlan:
    """The deterministic assignment of pairs to (epoch, step, worker, micro-batch)."""

    def __init__(
        self,
        shard_list: Sequence[ShardInfo],
        *,
        seed: int,
        num_workers: int,
        pairs_per_worker: int,
        grad_accum: int,
    ) -> None:
        if not shard_list:
            raise ShardError("no committed pair shards to train on")
        self.shards = list(shard_list)
        self.seed = seed
        self.num_workers = num_workers
        self.pairs_per_worker = pairs_per_worker
        self.grad_accum = grad_accum
        self.num_pairs = sum(info.num_rows for info in self.shards)
        self.pairs_per_step = num_workers * pairs_per_worker * grad_accum
        self.steps_per_epoch = self.num_pairs // self.pairs_per_step
        if self.steps_per_epoch == 0:
            raise ShardError(
                f"{self.num_pairs} pairs in {len(self.shards)} shard(s) are fewer than one optimizer step needs "
                f"({num_workers} workers x {pairs_per_worker} pairs x {grad_accum} accumulation = "
                f"{self.pairs_per_step})"
            )

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        """Optimizer steps of a run over `epochs` epochs of this plan, capped at `max_steps`."""
        total = self.steps_per_epoch * epochs
        return total if max_steps is None else min(total, max_steps)

    def epoch_order(self, epoch: int) -> list[RowRef]:
        """All pairs of the data set in this epoch's order (shards shuffled, rows shuffled within each shard)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = []
        for shard in rng.permutation(len(self.shards)):
            rows = rng.permutation(self.shards[shard].num_rows)
            order.extend(RowRef(int(shard), int(row)) for row in rows)
        return order

    def worker_stream(self, epoch: int, rank: int) -> list[RowRef]:
        """The pairs worker `rank` trains on in this epoch, in order."""
        length = self.steps_per_epoch * self.pairs_per_worker * self.grad_accum
        return self.epoch_order(epoch)[rank * length : (rank + 1) * length]

    def micro_batches(self, epoch: int, rank: int, start_step: int = 0) -> Iterator[tuple[int, int, list[RowRef]]]:
        """(step, micro, rows) for worker `rank` from `start_step` to the end of the epoch."""
        stream = self.worker_stream(epoch, rank)
        per_step = self.pairs_per_worker * self.grad_accum
        for step in range(start_step, self.steps_per_epoch):
            for micro in range(self.grad_accum):
                begin = step * per_step + micro * self.pairs_per_worker
                yield step, micro, stream[begin : begin + self.pairs_per_worker]

    def consumed(self, position: DataPosition) -> dict[str, Any]:
        """The restorable position with what it means: rows consumed per shard (all workers) in its epoch."""
        per_step = self.pairs_per_worker * self.grad_accum
        done = position.step_in_epoch * per_step
        counts: dict[int, int] = {}
        for rank in range(self.num_workers):
            for ref in self.worker_stream(position.epoch, rank)[:done]:
                counts[ref.shard] = counts.get(ref.shard, 0) + 1
        return {
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "pairs_consumed": done * self.num_workers,
            "rows_consumed_per_shard": {self.shards[shard].url: count for shard, count in sorted(counts.items())},
        }

    def to_json(self) -> list[dict[str, Any]]:
        """The frozen shard list, stored in checkpoints."""
        return [asdict(info) for info in self.shards]

    @staticmethod
    def shards_from_json(items: Sequence[dict[str, Any]]) -> list[ShardInfo]:
        return [ShardInfo(**item) for item in items]
