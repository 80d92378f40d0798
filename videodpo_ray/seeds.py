"""Every seed the project derives, from one hash (foundation layer).

A seed is `derive_seed(*parts)`: the first 8 bytes of blake2b over the parts joined by "/", little-endian, shifted
to 63 bits. It depends on nothing but its parts: not on chunking, batching, the actor, the cluster size, the process
or the Python version (unlike `hash`).
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts."""
    digest = hashlib.blake2b("/".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of sample `sample_index` of prompt `prompt_id`: `derive_seed(base_seed, "sample", id, index)`."""
    return derive_seed(base_seed, "sample", prompt_id, sample_index)


def pair_noise_seeds(run_seed: int, step: int, rank: int, micro_batch: int, pairs_per_micro_batch: int) -> list[int]:
    """The seeds of the timesteps and noise of each pair of a training micro-batch, one per pair, by the pair's
    position in its worker's share of optimizer step `step` (micro-batch m, row j: m x pairs per micro-batch + j):
    a pair gets the same draw whatever micro-batches the share is cut in (`data.pairs_per_worker`)."""
    first = micro_batch * pairs_per_micro_batch
    return [derive_seed(run_seed, "noise", step, rank, position)
            for position in range(first, first + pairs_per_micro_batch)]


def drops_prompt(seed: int, pair_id: str, epoch: int, probability: float) -> bool:
    """Classifier-free prompt dropout: whether this pair trains with the empty prompt in this epoch."""
    if probability <= 0.0:
        return False
    return derive_seed(seed, "cfg-dropout", pair_id, epoch) / 2.0**63 < probability
