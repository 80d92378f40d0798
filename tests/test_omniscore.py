"""OmniScore and VBench aggregation against hand-computed values."""

from __future__ import annotations

import math

import pytest

from videodpo_ray.dimensions import (
    DIMENSIONS,
    OMNISCORE_DIMENSIONS,
    VBENCH_QUALITY_DIMENSIONS,
    VBENCH_SEMANTIC_DIMENSIONS,
)
from videodpo_ray.omniscore import normalise, omniscore, vbench_scores

# Raw values chosen so that each normalised value is round: raw = min + fraction * (max - min).
RAW = {
    "subject_consistency": 0.1462 + 0.8538 * 0.5,  # -> 0.5
    "background_consistency": 0.2615 + 0.7385 * 0.9,  # -> 0.9
    "temporal_flickering": 0.6293 + 0.3707 * 0.8,  # -> 0.8
    "motion_smoothness": 0.706 + 0.2915 * 0.6,  # -> 0.6
    "dynamic_degree": 0.4,  # -> 0.4, weight 0.5
    "aesthetic_quality": 0.6,
    "imaging_quality": 0.7,  # MUSIQ 70 / 100
    "overall_consistency": 0.273,  # / 0.364 -> 0.75
    "object_class": 0.9,
    "multiple_objects": 0.5,
    "human_action": 0.8,
    "color": 0.7,
    "spatial_relationship": 0.4,
    "scene": 0.8222 * 0.5,  # -> 0.5
    "appearance_style": 0.0009 + 0.2846 * 0.5,  # -> 0.5
    "temporal_style": 0.364 * 0.5,  # -> 0.5
}


def test_constants_table():
    assert len([d for d, spec in DIMENSIONS.items() if spec.vbench]) == 16  # plus the toy world's, never VBench
    assert len(VBENCH_QUALITY_DIMENSIONS) == 7 and len(VBENCH_SEMANTIC_DIMENSIONS) == 9
    assert sum(DIMENSIONS[d].weight for d in VBENCH_QUALITY_DIMENSIONS) == 6.5
    assert set(OMNISCORE_DIMENSIONS) == set(VBENCH_QUALITY_DIMENSIONS) - {"background_consistency"} | {
        "overall_consistency"
    }
    assert sum(DIMENSIONS[d].weight for d in OMNISCORE_DIMENSIONS if d != "overall_consistency") == 5.5


@pytest.mark.parametrize(
    "dimension, raw, expected",
    [
        ("subject_consistency", 0.1462, 0.0),
        ("subject_consistency", 1.0, 1.0),
        ("motion_smoothness", 0.9975, 1.0),
        ("motion_smoothness", 0.706 + 0.2915 / 4, 0.25),
        ("overall_consistency", 0.182, 0.5),
        ("appearance_style", 0.0009, 0.0),
        ("imaging_quality", 0.55, 0.55),
    ],
)
def test_normalise(dimension, raw, expected):
    assert normalise(dimension, raw) == pytest.approx(expected, abs=1e-12)


def test_omniscore_hand_computed():
    # Q = (0.5 + 0.8 + 0.6 + 0.5 * 0.4 + 0.6 + 0.7) / 5.5 = 3.4 / 5.5; S = 0.273 / 0.364 = 0.75
    # Omni = (4 * 3.4 / 5.5 + 0.75) / 5 = 0.644545...
    assert omniscore(RAW, "v0") == pytest.approx(0.6445454545454545, rel=1e-12)
    minimal = {d: RAW[d] for d in OMNISCORE_DIMENSIONS}  # background and other semantic dims are not needed
    assert omniscore(minimal, "v0") == pytest.approx(0.6445454545454545, rel=1e-12)
    assert omniscore({**RAW, "background_consistency": 0.3}, "v0") == omniscore(RAW, "v0")


def test_vbench_scores_hand_computed():
    """VBench's dynamic degree is the scorer's 1/0 `dynamic_degree_vbench` (here averaged: 0.4), not OmniScore's
    fraction of moving pairs (`dynamic_degree`, 0.9 here), which VBench never sees."""
    scores = vbench_scores({**RAW, "dynamic_degree": 0.9, "dynamic_degree_vbench": 0.4}, "model-a")
    # Quality = (3.4 + 0.9 background) / 6.5; Semantic = (0.9+0.5+0.8+0.7+0.4+0.5+0.5+0.5+0.75) / 9 = 5.55 / 9
    assert scores.quality == pytest.approx(0.6615384615384615, rel=1e-12)
    assert scores.semantic == pytest.approx(0.6166666666666667, rel=1e-12)
    assert scores.total == pytest.approx((4 * 0.6615384615384615 + 0.6166666666666667) / 5, rel=1e-12)
    assert scores.total == pytest.approx(0.6525641025641026, rel=1e-12)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_missing_or_nan_dimension_names_the_video(bad):
    broken = {**RAW, "aesthetic_quality": bad}
    with pytest.raises(ValueError, match=r"video 'clip-0042'.*aesthetic_quality"):
        omniscore(broken, "clip-0042")
    with pytest.raises(ValueError, match=r"video 'clip-0042'.*aesthetic_quality"):
        vbench_scores({**broken, "dynamic_degree_vbench": 1.0}, "clip-0042")


def test_absent_dimension_names_the_video():
    partial = {d: v for d, v in RAW.items() if d not in ("overall_consistency", "dynamic_degree")}
    with pytest.raises(ValueError, match=r"video 'x/7': missing dimension\(s\) dynamic_degree"):
        omniscore(partial, "x/7")
    with pytest.raises(ValueError, match="video 'x/7': missing dimension.*color"):
        vbench_scores({d: v for d, v in RAW.items() if d != "color"} | {"dynamic_degree_vbench": 1.0}, "x/7")
    with pytest.raises(ValueError, match=r"video 'x/7': missing dimension\(s\) dynamic_degree"):
        vbench_scores(RAW, "x/7")  # OmniScore's fraction alone is not VBench's dynamic degree


def test_unknown_dimension():
    with pytest.raises(ValueError, match="unknown VBench dimension 'sharpness'"):
        normalise("sharpness", 0.5)


def test_values_outside_range_are_not_clipped():
    assert normalise("temporal_flickering", 0.6293 - 0.3707) == pytest.approx(-1.0)
    assert not math.isnan(omniscore({**RAW, "overall_consistency": 0.4}))
