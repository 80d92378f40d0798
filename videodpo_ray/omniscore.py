"""VBench normalisation, OmniScore (VideoDPO's per-video score) and VBench Quality/Semantic/Total.

One table holds every dimension's constants; every score here is a weighted mean of normalised dimensions:

    normalised(d) = (raw(d) - min(d)) / (max(d) - min(d))
    weighted_mean(D) = sum_{d in D} weight(d) * normalised(d) / sum_{d in D} weight(d)

- OmniScore (method.md section 3): Q = weighted_mean(6 quality dims, no background consistency) (= sum / 5.5),
  S = normalised overall_consistency (= raw / 0.364), OmniScore = (4 Q + S) / 5.
- VBench (scoring.md): Quality = weighted_mean(7 quality dims) (= sum / 6.5), Semantic = mean of the 9 semantic
  dims, Total = (4 Quality + Semantic) / 5, over VBench's own values (`vbench_values`: dynamic degree 1/0 per video).

Raw values are the per-video scorer outputs on VBench's 0..1 scale (imaging quality is MUSIQ / 100, as the scorer
returns it). Results are fractions (VBench papers print them x100). Values outside [min, max] are not clipped,
like VBench.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from videodpo_ray.dimensions import (
    DIMENSIONS,
    OMNISCORE_QUALITY_DIMENSIONS,
    OMNISCORE_SEMANTIC_DIMENSIONS,
    VBENCH_OUTPUTS,
    VBENCH_QUALITY_DIMENSIONS,
    VBENCH_SEMANTIC_DIMENSIONS,
)


@dataclass(frozen=True)
class VBenchScores:
    """VBench aggregate scores as fractions (x100 for the numbers papers print)."""

    quality: float
    semantic: float
    total: float


def normalise(dimension: str, raw: float) -> float:
    """(raw - min) / (max - min) with VBench's constants for `dimension` (the weight is applied by the means)."""
    try:
        spec = DIMENSIONS[dimension]
    except KeyError:
        raise ValueError(f"unknown VBench dimension {dimension!r}; known: {', '.join(DIMENSIONS)}") from None
    return (raw - spec.min) / (spec.max - spec.min)


def weighted_mean(raw: Mapping[str, float], dimensions: Sequence[str], video_id: str = "?") -> float:
    """The weighted mean of the normalised `dimensions` of `raw` (ValueError naming a missing or non-finite one)."""
    missing = [d for d in dimensions if raw.get(d) is None]
    if missing:
        raise ValueError(f"video {video_id!r}: missing dimension(s) {', '.join(missing)}")
    not_finite = [d for d in dimensions if not math.isfinite(float(raw[d]))]
    if not_finite:
        raise ValueError(
            f"video {video_id!r}: non-finite value for "
            + ", ".join(f"{d}={float(raw[d])}" for d in not_finite)
        )
    total_weight = sum(DIMENSIONS[d].weight for d in dimensions)
    return sum(DIMENSIONS[d].weight * normalise(d, float(raw[d])) for d in dimensions) / total_weight


def blend(quality: float, semantic: float) -> float:
    """VBench's and OmniScore's 4:1 blend of quality and semantic: (4 Q + S) / 5."""
    return (4.0 * quality + semantic) / 5.0


def omniscore(
    raw: Mapping[str, float],
    video_id: str = "?",
    quality_dimensions: Sequence[str] = OMNISCORE_QUALITY_DIMENSIONS,
    semantic_dimensions: Sequence[str] = OMNISCORE_SEMANTIC_DIMENSIONS,
) -> float:
    """VideoDPO's OmniScore of one video from its raw dimension scores (extra dimensions are ignored):
    blend(weighted_mean(quality dimensions), weighted_mean(semantic dimensions)). The dimension sets default to the
    paper's; the toy world passes its own (the same formula over the dimensions it has)."""
    quality = weighted_mean(raw, quality_dimensions, video_id)
    semantic = weighted_mean(raw, semantic_dimensions, video_id)
    return blend(quality, semantic)


def vbench_values(raw: Mapping[str, float]) -> dict[str, float]:
    """`raw` with VBench's own value for each dimension of `VBENCH_OUTPUTS` (dynamic degree: `dynamic_degree_vbench`,
    not OmniScore's fraction); such a dimension without it is left out, so it counts as missing, never as another
    scale."""
    values = {name: value for name, value in raw.items() if name not in VBENCH_OUTPUTS}
    values.update({name: raw[output] for name, output in VBENCH_OUTPUTS.items() if output in raw})
    return values


def vbench_scores(raw: Mapping[str, float], video_id: str = "?") -> VBenchScores:
    """VBench Quality / Semantic / Total from the raw scorer outputs of the 16 dimensions (per video or already
    averaged), on VBench's own values (`vbench_values`)."""
    values = vbench_values(raw)
    quality = weighted_mean(values, VBENCH_QUALITY_DIMENSIONS, video_id)
    semantic = weighted_mean(values, VBENCH_SEMANTIC_DIMENSIONS, video_id)
    return VBenchScores(quality=quality, semantic=semantic, total=blend(quality, semantic))
