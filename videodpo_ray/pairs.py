"""Winner/loser pairs from the N scored samples of each prompt (method.md sections 2 and 4).

`build_pairs` runs three stages over the whole data set, in this order:

1. strategy, per prompt, on its N scored samples sorted by score descending (ties broken by sample id), ranks
   0..N-1: "best_worst" = rank pair (0, N-1); "rank_pairs" = the union of the configured rank pairs such as (0, 2);
   "all_pairs" = every (i, j) with i < j. Two samples with equal scores never become a pair, and a pair is always
   (higher score, lower score). Ranks count the prompt's scored samples only: a prompt with failed samples has a
   smaller N, and a configured rank pair beyond its N gives it no pair (`PairingConfig.unfit_rank_pairs`); that a
   rank pair fits the generated samples per prompt is checked up front (`PairingConfig.check_samples_per_prompt`).
2. filters: `min_gap` (keep S_w - S_l >= min_gap), then `mean_filter` (keep S_w > mean > S_l, where mean is the
   mean OmniScore of ALL scored samples of the data set, every prompt's N samples counted once), then
   `drop_smallest_gap_fraction` (drop the floor(fraction x count) pairs with the smallest gaps among those left).
3. weighting over the kept pairs: "none" (1), "histogram" (paper Eq. 3), "product" (released code), each
   optionally normalised to mean 1 over the kept pairs.

The output is ordered by prompt id, then by rank pair; pair ids are "{prompt_id}/{win_sample_id}/{lose_sample_id}".
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Literal, Mapping, Sequence

from pydantic import Field, field_validator, model_validator

from videodpo_ray.config import StrictConfig
from videodpo_ray.errors import ConfigError

PairStrategy = Literal["best_worst", "rank_pairs", "all_pairs"]
WeightScheme = Literal["none", "histogram", "product"]

PRODUCT_BETA_W = 0.72  # the released code's beta_w for the product formula


class PairFilterConfig(StrictConfig):
    """Data-set-level pair filters (they hurt in the paper; all off by default)."""

    min_gap: float = Field(0.0, ge=0.0)
    mean_filter: bool = False
    drop_smallest_gap_fraction: float = Field(0.0, ge=0.0, lt=1.0)


class PairWeightingConfig(StrictConfig):
    """How pair weights are computed; alpha = 0 is plain DPO for every scheme."""

    scheme: WeightScheme = "none"
    alpha: float = Field(1.0, ge=0.0)
    # None -> the scheme's default: histogram = probability of the most frequent bin, product = 0.72.
    beta_w: float | None = Field(None, gt=0.0)
    normalise: bool = False  # divide by the mean weight of the kept pairs so alpha does not change the LR
    bin_width: float = Field(0.01, gt=0.0)  # histogram scheme only


class PairingConfig(StrictConfig):
    """Pair construction: strategy, filters and re-weighting."""

    strategy: PairStrategy = "best_worst"
    rank_pairs: list[tuple[int, int]] = []  # strategy "rank_pairs" only; a union, deduplicated and sorted
    filters: PairFilterConfig = PairFilterConfig()
    weighting: PairWeightingConfig = PairWeightingConfig()

    @field_validator("rank_pairs")
    @classmethod
    def _check_rank_pairs(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for better, worse in value:
            if not 0 <= better < worse:
                raise ValueError(f"rank pair ({better}, {worse}) must be (i, j) with 0 <= i < j (rank 0 = best)")
        return sorted(set(value))

    @model_validator(mode="after")
    def _check_strategy(self) -> "PairingConfig":
        if self.strategy == "rank_pairs" and not self.rank_pairs:
            raise ValueError("strategy 'rank_pairs' needs at least one rank pair, e.g. rank_pairs: [[0, 2]]")
        if self.strategy != "rank_pairs" and self.rank_pairs:
            raise ValueError(f"rank_pairs is only used by strategy 'rank_pairs', not {self.strategy!r}")
        return self

    def check_samples_per_prompt(self, samples_per_prompt: int) -> None:
        """ConfigError if a rank pair needs more samples than a prompt is generated with; call it before any work."""
        too_far = self.unfit_rank_pairs(samples_per_prompt)
        if too_far:
            raise ConfigError(
                f"pairing.rank_pairs {too_far} need more than {samples_per_prompt} samples per prompt "
                f"(ranks are 0..{samples_per_prompt - 1})"
            )

    def unfit_rank_pairs(self, num_samples: int) -> list[tuple[int, int]]:
        """The configured rank pairs that a prompt with `num_samples` scored samples is too small for."""
        return [pair for pair in self.rank_pairs if pair[1] >= num_samples]

    def rank_pairs_for(self, num_samples: int) -> list[tuple[int, int]]:
        """The (better rank, worse rank) pairs of a prompt with `num_samples` scored samples (ranks 0..num_samples-1);
        a configured rank pair beyond them is left out."""
        if self.strategy == "best_worst":
            return [(0, num_samples - 1)] if num_samples >= 2 else []
        if self.strategy == "all_pairs":
            return list(combinations(range(num_samples), 2))
        unfit = self.unfit_rank_pairs(num_samples)
        return [pair for pair in self.rank_pairs if pair not in unfit]


@dataclass(frozen=True)
class ScoredSample:
    """One sampled video of a prompt and its OmniScore."""

    sample_id: str
    score: float


@dataclass(frozen=True)
class Pair:
    """A preference pair: the winner has the strictly higher score."""

    prompt_id: str
    win_sample_id: str
    lose_sample_id: str
    win_score: float
    lose_score: float
    weight: float = 1.0

    @property
    def pair_id(self) -> str:
        return f"{self.prompt_id}/{self.win_sample_id}/{self.lose_sample_id}"

    @property
    def score_gap(self) -> float:
        return self.win_score - self.lose_score


def _floor(value: float) -> int:
    """floor() that ignores float noise below 1e-9 (0.29 / 0.01 = 28.999999999999996 -> 29)."""
    return math.floor(round(value, 9))


def score_bin(score: float, bin_width: float = 0.01) -> int:
    """Index of the histogram bin [k * bin_width, (k + 1) * bin_width) holding `score`."""
    return _floor(score / bin_width)


def score_histogram(scores: Sequence[float], bin_width: float = 0.01) -> dict[int, float]:
    """Bin index -> frequency (fraction of `scores` in that bin)."""
    if not scores:
        raise ValueError("score histogram of an empty score list")
    counts = Counter(score_bin(score, bin_width) for score in scores)
    return {index: count / len(scores) for index, count in counts.items()}


def histogram_weight(win_probability: float, lose_probability: float, *, alpha: float, beta_w: float) -> float:
    """Paper Eq. 3: (beta_w / sqrt(p(s_w) p(s_l)))^alpha, p = frequency of the score's histogram bin."""
    return (beta_w / math.sqrt(win_probability * lose_probability)) ** alpha


def product_weight(
    win_score: float | None, lose_score: float | None, *, alpha: float, beta_w: float = PRODUCT_BETA_W
) -> float:
    """Released code: (beta_w / (S_w S_l))^alpha; a missing (None) score counts as 1."""
    product = (1.0 if win_score is None else win_score) * (1.0 if lose_score is None else lose_score)
    if product <= 0:
        raise ValueError(f"product weighting needs positive scores, got S_w={win_score}, S_l={lose_score}")
    return (beta_w / product) ** alpha


def _validated_samples(prompt_id: str, samples: Sequence[ScoredSample]) -> list[ScoredSample]:
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise ValueError(f"prompt {prompt_id!r}: duplicate sample id {sample.sample_id!r}")
        seen.add(sample.sample_id)
        if not isinstance(sample.score, numbers.Real) or not math.isfinite(sample.score):
            raise ValueError(f"prompt {prompt_id!r}, sample {sample.sample_id!r}: score {sample.score!r} is not finite")
    return sorted(samples, key=lambda sample: (-sample.score, sample.sample_id))


def candidate_pairs(prompt_id: str, samples: Sequence[ScoredSample], config: PairingConfig) -> list[Pair]:
    """The strategy's pairs for one prompt's scored samples (weight 1, no filters); tied samples never pair."""
    ranked = _validated_samples(prompt_id, samples)
    pairs = []
    for better, worse in config.rank_pairs_for(len(ranked)):
        win, lose = ranked[better], ranked[worse]
        if win.score > lose.score:
            pairs.append(Pair(prompt_id, win.sample_id, lose.sample_id, float(win.score), float(lose.score)))
    return pairs


def filter_pairs(pairs: Sequence[Pair], all_scores: Sequence[float], filters: PairFilterConfig) -> list[Pair]:
    """Apply min_gap, then the mean filter (mean of `all_scores`), then the smallest-gap fraction; order kept."""
    kept = [pair for pair in pairs if pair.score_gap >= filters.min_gap]
    if filters.mean_filter and kept:
        mean_score = math.fsum(all_scores) / len(all_scores)
        kept = [pair for pair in kept if pair.win_score > mean_score > pair.lose_score]
    num_dropped = _floor(filters.drop_smallest_gap_fraction * len(kept))
    if num_dropped:
        smallest = sorted(kept, key=lambda pair: (pair.score_gap, pair.pair_id))[:num_dropped]
        dropped = {pair.pair_id for pair in smallest}
        kept = [pair for pair in kept if pair.pair_id not in dropped]
    return kept


def weight_pairs(pairs: Sequence[Pair], all_scores: Sequence[float], weighting: PairWeightingConfig) -> list[Pair]:
    """Set each pair's weight; `all_scores` (every sampled video's OmniScore) defines the histogram."""
    if not pairs:
        return []
    if weighting.scheme == "none":
        weights = [1.0] * len(pairs)
    elif weighting.scheme == "histogram":
        histogram = score_histogram(all_scores, weighting.bin_width)
        beta_w = weighting.beta_w if weighting.beta_w is not None else max(histogram.values())
        weights = []
        for pair in pairs:
            win_bin = score_bin(pair.win_score, weighting.bin_width)
            lose_bin = score_bin(pair.lose_score, weighting.bin_width)
            if win_bin not in histogram or lose_bin not in histogram:
                raise ValueError(f"pair {pair.pair_id}: its scores are not among the histogram's scores")
            weights.append(
                histogram_weight(histogram[win_bin], histogram[lose_bin], alpha=weighting.alpha, beta_w=beta_w)
            )
    else:
        beta_w = weighting.beta_w if weighting.beta_w is not None else PRODUCT_BETA_W
        weights = []
        for pair in pairs:
            try:
                weights.append(product_weight(pair.win_score, pair.lose_score, alpha=weighting.alpha, beta_w=beta_w))
            except ValueError as error:
                raise ValueError(f"pair {pair.pair_id}: {error}") from error
    if weighting.normalise:
        mean_weight = math.fsum(weights) / len(weights)
        weights = [weight / mean_weight for weight in weights]
    return [replace(pair, weight=weight) for pair, weight in zip(pairs, weights)]


def build_pairs(samples_by_prompt: Mapping[str, Sequence[ScoredSample]], config: PairingConfig) -> list[Pair]:
    """All pairs of a data set: strategy per prompt, then data-set-level filters, then weights."""
    pairs: list[Pair] = []
    all_scores: list[float] = []
    for prompt_id in sorted(samples_by_prompt):
        samples = samples_by_prompt[prompt_id]
        pairs.extend(candidate_pairs(prompt_id, samples, config))
        all_scores.extend(float(sample.score) for sample in samples)
    kept = filter_pairs(pairs, all_scores, config.filters)
    return weight_pairs(kept, all_scores, config.weighting)
