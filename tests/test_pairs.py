"""Pair strategies, filters and re-weighting against hand-computed values, plus property tests."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from videodpo_ray.config import build_config, load_config
from videodpo_ray.errors import ConfigError
from videodpo_ray.pairs import (
    Pair,
    PairingConfig,
    ScoredSample,
    build_pairs,
    histogram_weight,
    product_weight,
    score_bin,
    score_histogram,
)


def _data(spec: dict[str, dict[str, float]]) -> dict[str, list[ScoredSample]]:
    return {prompt: [ScoredSample(sid, score) for sid, score in samples.items()] for prompt, samples in spec.items()}


def _ids(pairs: list[Pair]) -> list[str]:
    return [pair.pair_id for pair in pairs]


def _weights(pairs: list[Pair]) -> list[float]:
    return [pair.weight for pair in pairs]


def _config(**kwargs) -> PairingConfig:
    return PairingConfig.model_validate(kwargs)


# ranks: p0 = w .45, x .40, y .40 (tie with x; x ranks first by id), z .30; p1 = a .8, c .7, b .6, d .5; p2 all tied
STRATEGY_DATA = _data(
    {
        "p1": {"a": 0.80, "b": 0.60, "c": 0.70, "d": 0.50},
        "p0": {"x": 0.40, "y": 0.40, "z": 0.30, "w": 0.45},
        "p2": {"q": 0.9, "r": 0.9, "s": 0.9, "t": 0.9},
    }
)
ALL_PAIRS = [
    "p0/w/x", "p0/w/y", "p0/w/z", "p0/x/z", "p0/y/z",  # (1, 2) = x/y is a tie
    "p1/a/c", "p1/a/b", "p1/a/d", "p1/c/b", "p1/c/d", "p1/b/d",
]  # fmt: skip


# --- strategies ---------------------------------------------------------------------------------------------------
def test_best_worst():
    pairs = build_pairs(STRATEGY_DATA, _config())
    assert _ids(pairs) == ["p0/w/z", "p1/a/d"]
    assert pairs[0] == Pair("p0", "w", "z", 0.45, 0.30, 1.0)
    assert _ids(build_pairs(STRATEGY_DATA, _config(strategy="rank_pairs", rank_pairs=[(0, 3)]))) == _ids(pairs)


def test_single_rank_pair():
    pairs = build_pairs(STRATEGY_DATA, _config(strategy="rank_pairs", rank_pairs=[(0, 2)]))
    assert _ids(pairs) == ["p0/w/y", "p1/a/b"]


def test_union_of_rank_pairs_is_deduplicated_and_skips_ties():
    config = _config(strategy="rank_pairs", rank_pairs=[(1, 2), (0, 2), (0, 2)])
    assert config.rank_pairs == [(0, 2), (1, 2)]
    assert _ids(build_pairs(STRATEGY_DATA, config)) == ["p0/w/y", "p1/a/b", "p1/c/b"]


def test_all_pairs():
    pairs = build_pairs(STRATEGY_DATA, _config(strategy="all_pairs"))
    assert _ids(pairs) == ALL_PAIRS
    assert all(pair.weight == 1.0 for pair in pairs)


def test_single_sample_prompt_gives_no_pair():
    assert build_pairs(_data({"p": {"a": 0.5}}), _config()) == []
    assert build_pairs({}, _config()) == []


# --- filters ------------------------------------------------------------------------------------------------------
def test_min_gap_filter():
    pairs = build_pairs(STRATEGY_DATA, _config(strategy="all_pairs", filters={"min_gap": 0.12}))
    assert _ids(pairs) == ["p0/w/z", "p1/a/b", "p1/a/d", "p1/c/d"]


def test_mean_filter_uses_the_mean_of_all_scored_samples():
    # mean over all 12 samples, tied p2 included: (1.55 + 2.6 + 3.6) / 12 = 0.6458; without p2 it would be 0.51875
    pairs = build_pairs(STRATEGY_DATA, _config(strategy="all_pairs", filters={"mean_filter": True}))
    assert _ids(pairs) == ["p1/a/b", "p1/a/d", "p1/c/b", "p1/c/d"]


GAP_DATA = _data(
    {
        "g1": {"hi": 0.9, "lo": 0.4},  # gap 0.5
        "g2": {"hi": 0.6, "lo": 0.5},  # gap 0.1
        "g3": {"hi": 0.7, "lo": 0.4},  # gap 0.3
        "g4": {"hi": 0.55, "lo": 0.35},  # gap 0.2
        "g5": {"hi": 0.8, "lo": 0.4},  # gap 0.4
    }
)


@pytest.mark.parametrize(
    "fraction, expected",
    [
        (0.1, ["g1", "g2", "g3", "g4", "g5"]),  # floor(0.5) = 0 dropped
        (0.2, ["g1", "g3", "g4", "g5"]),  # 1 dropped: gap 0.1
        (0.4, ["g1", "g3", "g5"]),  # 2 dropped: gaps 0.1, 0.2
        (0.5, ["g1", "g3", "g5"]),  # floor(2.5) = 2
        (0.8, ["g1"]),
    ],
)
def test_drop_smallest_gap_fraction(fraction, expected):
    pairs = build_pairs(GAP_DATA, _config(filters={"drop_smallest_gap_fraction": fraction}))
    assert [pair.prompt_id for pair in pairs] == expected


def test_gap_fraction_applies_after_min_gap():
    # min_gap leaves g1 .5, g3 .3, g4 .2, g5 .4; then floor(0.5 * 4) = 2 smallest (g4, g3) go
    pairs = build_pairs(GAP_DATA, _config(filters={"min_gap": 0.15, "drop_smallest_gap_fraction": 0.5}))
    assert [pair.prompt_id for pair in pairs] == ["g1", "g5"]


def test_equal_gaps_are_dropped_in_pair_id_order():
    data = _data({"t1": {"a": 0.6, "b": 0.4}, "t0": {"a": 0.6, "b": 0.4}, "t2": {"a": 0.9, "b": 0.1}})
    pairs = build_pairs(data, _config(filters={"drop_smallest_gap_fraction": 0.34}))
    assert _ids(pairs) == ["t1/a/b", "t2/a/b"]


# --- weights ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "score, bin_width, expected",
    [(0.29, 0.01, 29), (0.2999, 0.01, 29), (0.3, 0.01, 30), (0.57, 0.01, 57), (1.0, 0.01, 100), (0.0, 0.01, 0),
     (0.005, 0.01, 0), (0.15, 0.05, 3)],
)  # fmt: skip
def test_score_bin(score, bin_width, expected):
    assert score_bin(score, bin_width) == expected


# bins 80, 80, 50 | 80, 20 | 55, 42: p(bin 80) = 3/7 (the unpaired .803 counts), every other bin 1/7
HISTOGRAM_DATA = _data(
    {"p0": {"a": 0.805, "b": 0.803, "c": 0.501}, "p1": {"d": 0.808, "e": 0.2}, "p2": {"f": 0.55, "g": 0.42}}
)


def test_score_histogram():
    histogram = score_histogram([0.805, 0.803, 0.501, 0.808, 0.2, 0.55, 0.42])
    assert histogram == pytest.approx({80: 3 / 7, 50: 1 / 7, 20: 1 / 7, 55: 1 / 7, 42: 1 / 7})


@pytest.mark.parametrize(
    "weighting, expected",
    [
        # beta_w defaults to the most frequent bin's probability, 3/7:
        # p0, p1: (3/7) / sqrt(3/7 * 1/7) = sqrt(3); p2: (3/7) / sqrt(1/7 * 1/7) = 3
        ({"alpha": 1.0}, [1.7320508075688772, 1.7320508075688772, 3.0]),
        ({"alpha": 2.0}, [3.0, 3.0, 9.0]),
        ({"alpha": 1.0, "beta_w": 0.5}, [3.5 / 1.7320508075688772, 3.5 / 1.7320508075688772, 3.5]),
        ({"alpha": 0.0}, [1.0, 1.0, 1.0]),
        # mean of (sqrt3, sqrt3, 3) = 2.1547005; normalised weights do not depend on beta_w
        ({"alpha": 1.0, "normalise": True}, [0.8038475772933681, 0.8038475772933681, 1.3923048454132638]),
        ({"alpha": 1.0, "normalise": True, "beta_w": 0.1}, [0.8038475772933681] * 2 + [1.3923048454132638]),
    ],
)  # fmt: skip
def test_histogram_weights(weighting, expected):
    pairs = build_pairs(HISTOGRAM_DATA, _config(weighting={"scheme": "histogram", **weighting}))
    assert _ids(pairs) == ["p0/a/c", "p1/d/e", "p2/f/g"]
    assert _weights(pairs) == pytest.approx(expected, rel=1e-12)


def test_histogram_weight_formula():
    assert histogram_weight(0.04, 0.01, alpha=1.0, beta_w=0.1) == pytest.approx(5.0)
    assert histogram_weight(0.04, 0.01, alpha=2.0, beta_w=0.1) == pytest.approx(25.0)


# products .72, .24, .36 -> (0.72 / product) = 1, 3, 2
PRODUCT_DATA = _data(
    {"p0": {"a": 0.9, "b": 0.8}, "p1": {"a": 0.6, "m": 0.5, "b": 0.4}, "p2": {"a": 0.8, "b": 0.45}}
)


@pytest.mark.parametrize(
    "weighting, expected",
    [
        ({"alpha": 1.0}, [1.0, 3.0, 2.0]),
        ({"alpha": 2.0}, [1.0, 9.0, 4.0]),
        ({"alpha": 0.5}, [1.0, math.sqrt(3), math.sqrt(2)]),
        ({"alpha": 1.0, "beta_w": 0.36}, [0.5, 1.5, 1.0]),
        ({"alpha": 1.0, "normalise": True}, [0.5, 1.5, 1.0]),
        ({"alpha": 2.0, "normalise": True}, [3 / 14, 27 / 14, 12 / 14]),
        ({"alpha": 0.0}, [1.0, 1.0, 1.0]),
    ],
)
def test_product_weights(weighting, expected):
    pairs = build_pairs(PRODUCT_DATA, _config(weighting={"scheme": "product", **weighting}))
    assert _ids(pairs) == ["p0/a/b", "p1/a/b", "p2/a/b"]
    assert _weights(pairs) == pytest.approx(expected, rel=1e-12)


def test_product_weight_missing_score_counts_as_one():
    assert product_weight(None, 0.8, alpha=1.0) == pytest.approx(0.9)
    assert product_weight(0.9, None, alpha=2.0) == pytest.approx(0.64)
    assert product_weight(None, None, alpha=1.0) == pytest.approx(0.72)


def test_product_weight_rejects_non_positive_scores():
    data = _data({"p": {"a": 0.5, "b": -0.1}})
    with pytest.raises(ValueError, match="pair p/a/b: product weighting needs positive scores"):
        build_pairs(data, _config(weighting={"scheme": "product"}))


def test_normalisation_is_over_the_kept_pairs():
    # gaps .1, .2, .35: min_gap drops p0; weights 3, 2 -> mean 2.5 -> 1.2, 0.8
    config = _config(filters={"min_gap": 0.15}, weighting={"scheme": "product", "normalise": True})
    assert _weights(build_pairs(PRODUCT_DATA, config)) == pytest.approx([1.2, 0.8])


# --- config and bad input -----------------------------------------------------------------------------------------
def test_config_from_yaml(tmp_path):
    path = tmp_path / "pairing.yaml"
    path.write_text("strategy: rank_pairs\nrank_pairs: [[1, 3], [0, 2], [0, 2]]\nweighting: {scheme: product}\n")
    config = load_config(PairingConfig, path, ["filters.min_gap=0.05"])
    assert config.rank_pairs == [(0, 2), (1, 3)]
    assert config.filters.min_gap == 0.05 and config.weighting.scheme == "product"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"strategy": "rank_pairs", "rank_pairs": [[2, 1]]}, r"rank pair \(2, 1\) must be"),
        ({"strategy": "rank_pairs", "rank_pairs": [[1, 1]]}, r"rank pair \(1, 1\) must be"),
        ({"strategy": "rank_pairs", "rank_pairs": [[-1, 1]]}, r"rank pair \(-1, 1\) must be"),
        ({"strategy": "rank_pairs"}, "needs at least one rank pair"),
        ({"rank_pairs": [[0, 1]]}, "only used by strategy 'rank_pairs'"),
        ({"strategy": "worst"}, "strategy"),
        ({"filters": {"drop_smallest_gap_fraction": 1.0}}, "drop_smallest_gap_fraction"),
        ({"weighting": {"alpha": -1}}, "weighting.alpha"),
        ({"weighting": {"scheme": "softmax"}}, "weighting.scheme"),
        ({"weighting": {"beta": 1}}, "weighting.beta"),
    ],
)
def test_invalid_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        build_config(PairingConfig, data, "pairing.yaml")


def test_a_rank_pair_beyond_the_samples_per_prompt_is_a_config_error():
    config = _config(strategy="rank_pairs", rank_pairs=[(0, 2), (1, 4)])
    with pytest.raises(ConfigError, match=r"^pairing\.rank_pairs \[\(1, 4\)\] need more than 4 samples per prompt "
                       r"\(ranks are 0\.\.3\)$"):
        config.check_samples_per_prompt(4)
    config.check_samples_per_prompt(5)
    for fits_any_number in (_config(), _config(strategy="all_pairs")):
        fits_any_number.check_samples_per_prompt(1)
        assert fits_any_number.unfit_rank_pairs(1) == []


def test_rank_pairs_count_the_scored_samples_of_each_prompt():
    config = _config(strategy="rank_pairs", rank_pairs=[(0, 2), (1, 4)])
    assert [config.rank_pairs_for(n) for n in (5, 4, 2)] == [[(0, 2), (1, 4)], [(0, 2)], []]
    assert [config.unfit_rank_pairs(n) for n in (5, 4, 2)] == [[], [(1, 4)], [(0, 2), (1, 4)]]
    # p1 and p2 lost samples (failed sampling or scoring): the rank pairs they still fit still count
    five, four = {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.2, "e": 0.1}, {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.2}
    data = _data({"p0": five, "p1": four, "p2": {"a": 0.5, "b": 0.4}})
    assert _ids(build_pairs(data, config)) == ["p0/a/c", "p0/b/e", "p1/a/c"]


def test_a_prompt_short_of_samples_gets_no_rank_pair_and_best_worst_ranks_its_scored_samples():
    # 4 samples per prompt, p1's sample "d" failed: rank 3 does not exist for p1, best_worst pairs its best and worst
    data = _data({"p0": {"a": 0.8, "b": 0.6, "c": 0.7, "d": 0.5}, "p1": {"a": 0.4, "b": 0.9, "c": 0.6}})
    assert _ids(build_pairs(data, _config(strategy="rank_pairs", rank_pairs=[(0, 3)]))) == ["p0/a/d"]
    assert [(p.pair_id, p.win_score, p.lose_score) for p in build_pairs(data, _config())] == [
        ("p0/a/d", 0.8, 0.5), ("p1/b/a", 0.9, 0.4),
    ]  # fmt: skip
    assert _ids(build_pairs(data, _config(strategy="all_pairs")))[-3:] == ["p1/b/c", "p1/b/a", "p1/c/a"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_score_names_prompt_and_sample(bad):
    data = _data({"p0": {"a": 0.5, "b": bad}})
    with pytest.raises(ValueError, match="prompt 'p0', sample 'b'"):
        build_pairs(data, _config())


def test_duplicate_sample_id():
    data = {"p0": [ScoredSample("a", 0.5), ScoredSample("a", 0.6)]}
    with pytest.raises(ValueError, match="prompt 'p0': duplicate sample id 'a'"):
        build_pairs(data, _config())


# --- properties ---------------------------------------------------------------------------------------------------
SCORES = st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.7, 0.9, 0.95]), max_size=6)  # few values: many ties
DATASETS = st.dictionaries(st.text(alphabet="pq/", min_size=1, max_size=3), SCORES, max_size=4)
CONFIGS = st.sampled_from(
    [
        _config(),
        _config(strategy="all_pairs"),
        _config(strategy="all_pairs", filters={"mean_filter": True, "drop_smallest_gap_fraction": 0.3}),
        _config(weighting={"scheme": "histogram", "normalise": True}),
        _config(strategy="all_pairs", weighting={"scheme": "product", "alpha": 1.0}),
        _config(strategy="rank_pairs", rank_pairs=[(0, 2), (1, 2)], filters={"min_gap": 0.2}),
    ]
)


def _samples(spec: dict[str, list[float]]) -> dict[str, list[ScoredSample]]:
    return {prompt: [ScoredSample(f"s{i}", score) for i, score in enumerate(scores)] for prompt, scores in spec.items()}


@settings(max_examples=150, deadline=None)
@given(spec=DATASETS, config=CONFIGS)
def test_pairs_are_higher_lower_and_never_ties(spec, config):
    pairs = build_pairs(_samples(spec), config)
    assert len({pair.pair_id for pair in pairs}) == len(pairs)
    for pair in pairs:
        scores = dict(enumerate(spec[pair.prompt_id]))
        assert pair.win_score == scores[int(pair.win_sample_id[1:])]
        assert pair.lose_score == scores[int(pair.lose_sample_id[1:])]
        assert pair.win_score > pair.lose_score
        assert pair.weight > 0
    if config.strategy == "best_worst" and config.filters == PairingConfig().filters:
        expected = {prompt: (max(s), min(s)) for prompt, s in spec.items() if s and max(s) > min(s)}
        assert {pair.prompt_id: (pair.win_score, pair.lose_score) for pair in pairs} == expected
        assert len(pairs) == len(expected)
    if config.strategy == "all_pairs" and config.filters == PairingConfig().filters:
        assert len(pairs) == sum(sum(a != b for a, b in combinations(s, 2)) for s in spec.values())


@settings(max_examples=50, deadline=None)
@given(spec=DATASETS, config=CONFIGS, data=st.data())
def test_output_does_not_depend_on_input_order(spec, config, data):
    samples = _samples(spec)
    shuffled = {
        prompt: data.draw(st.permutations(samples[prompt])) for prompt in data.draw(st.permutations(list(samples)))
    }
    assert build_pairs(shuffled, config) == build_pairs(samples, config)
