"""The VBench dimensions: names, groups and normalisation constants (foundation: data only, no logic).

The vocabulary shared by the scores shard schema (`shards.py`), the OmniScore / VBench math (`omniscore.py`) and
the scorers (`scoring/`). Constants are VBench's (scoring.md); OmniScore uses the quality dimensions without
background consistency plus overall consistency (method.md section 3). `toy_*` are the toy world's semantic
dimensions (a classifier's probabilities, already 0..1): never part of VBench's aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Group = Literal["quality", "semantic"]


@dataclass(frozen=True)
class DimensionSpec:
    """VBench's normalisation constants for one dimension."""

    min: float
    max: float
    weight: float
    group: Group
    vbench: bool = True  # False: not a VBench dimension (excluded from VBench Quality / Semantic / Total)


DIMENSIONS: dict[str, DimensionSpec] = {
    # quality
    "subject_consistency": DimensionSpec(0.1462, 1.0, 1.0, "quality"),
    "background_consistency": DimensionSpec(0.2615, 1.0, 1.0, "quality"),
    "temporal_flickering": DimensionSpec(0.6293, 1.0, 1.0, "quality"),
    "motion_smoothness": DimensionSpec(0.706, 0.9975, 1.0, "quality"),
    "dynamic_degree": DimensionSpec(0.0, 1.0, 0.5, "quality"),
    "aesthetic_quality": DimensionSpec(0.0, 1.0, 1.0, "quality"),
    "imaging_quality": DimensionSpec(0.0, 1.0, 1.0, "quality"),  # MUSIQ / 100
    # semantic
    "object_class": DimensionSpec(0.0, 1.0, 1.0, "semantic"),
    "multiple_objects": DimensionSpec(0.0, 1.0, 1.0, "semantic"),
    "human_action": DimensionSpec(0.0, 1.0, 1.0, "semantic"),
    "color": DimensionSpec(0.0, 1.0, 1.0, "semantic"),
    "spatial_relationship": DimensionSpec(0.0, 1.0, 1.0, "semantic"),
    "scene": DimensionSpec(0.0, 0.8222, 1.0, "semantic"),
    "appearance_style": DimensionSpec(0.0009, 0.2855, 1.0, "semantic"),
    "temporal_style": DimensionSpec(0.0, 0.364, 1.0, "semantic"),
    "overall_consistency": DimensionSpec(0.0, 0.364, 1.0, "semantic"),
    # the toy world (never VBench)
    "toy_semantic": DimensionSpec(0.0, 1.0, 1.0, "semantic", vbench=False),  # mean of the two below
    "toy_colour": DimensionSpec(0.0, 1.0, 1.0, "semantic", vbench=False),  # P(the prompt's colour)
    "toy_direction": DimensionSpec(0.0, 1.0, 1.0, "semantic", vbench=False),  # P(the prompt's direction)
}

VBENCH_QUALITY_DIMENSIONS: tuple[str, ...] = tuple(
    n for n, s in DIMENSIONS.items() if s.vbench and s.group == "quality"
)
VBENCH_SEMANTIC_DIMENSIONS: tuple[str, ...] = tuple(
    n for n, s in DIMENSIONS.items() if s.vbench and s.group == "semantic"
)
OMNISCORE_QUALITY_DIMENSIONS: tuple[str, ...] = tuple(
    n for n in VBENCH_QUALITY_DIMENSIONS if n != "background_consistency"
)
OMNISCORE_SEMANTIC_DIMENSIONS: tuple[str, ...] = ("overall_consistency",)
OMNISCORE_DIMENSIONS: tuple[str, ...] = OMNISCORE_QUALITY_DIMENSIONS + OMNISCORE_SEMANTIC_DIMENSIONS
# A dimension whose scorer writes VBench's own value beside the one OmniScore uses: VBench's dynamic degree is 1 or 0
# per video (enough moving frame pairs), OmniScore's the fraction of moving pairs (reference/scoring.md).
VBENCH_OUTPUTS: dict[str, str] = {"dynamic_degree": "dynamic_degree_vbench"}
