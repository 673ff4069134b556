"""Paired bootstrap, Pareto fronts and hypervolume against hand-computed values."""

import numpy as np
import pytest

from search.results.statistics import PairedDiff, hypervolume, paired_bootstrap, pareto_front


def test_identical_scores_give_a_zero_width_interval_at_zero():
    scores = np.random.default_rng(1).integers(0, 2, size=300).astype(float)
    assert paired_bootstrap(scores, scores.copy()) == PairedDiff(0.0, 0.0, 0.0, 300, 0.95)


def test_a_clear_shift_is_found_with_a_normal_width_interval():
    rng = np.random.default_rng(2)
    b = rng.integers(0, 2, size=400).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:80]] = 1.0  # a fixes 80 of b's errors: +0.2 on every resample's expectation
    result = paired_bootstrap(a, b, resamples=4000)
    assert result.mean_diff == pytest.approx(0.2)
    assert result.excludes_zero and result.low > 0.1
    # Diffs are 0/1 with p = 0.2: the normal-theory 95% half-width is 1.96 * sqrt(p(1-p)/n).
    half_width = 1.96 * np.sqrt(0.2 * 0.8 / 400)
    assert (result.high - result.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert result.low < 0.2 < result.high


def test_pairing_cancels_the_item_variance_both_models_share():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1, size=200)  # per-item spread far larger than the effect
    b = difficulty
    a = difficulty + 0.05 + rng.normal(0, 0.01, size=200)
    result = paired_bootstrap(a, b)
    unpaired_half_width = 1.96 * np.sqrt(a.var() / 200 + b.var() / 200)
    assert unpaired_half_width > 0.05  # treating the models as independent samples could not tell them apart
    assert result.excludes_zero and result.high - result.low < 0.01


def test_the_interval_is_determined_by_the_seed():
    rng = np.random.default_rng(4)
    a, b = rng.random(150), rng.random(150)
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5) != paired_bootstrap(a, b, seed=6)


def test_a_wider_confidence_gives_a_wider_interval():
    rng = np.random.default_rng(7)
    a, b = rng.random(150), rng.random(150)
    narrow, wide = paired_bootstrap(a, b, confidence=0.5), paired_bootstrap(a, b, confidence=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([1.0, 0.0], [1.0], r"equal length"),
        ([], [], r"equal length >= 1"),
        ([1.0, float("nan")], [1.0, 0.0], r"finite"),
    ],
)
def test_unpaired_or_bad_scores_are_refused(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b)


POINTS = [[1, 2], [2, 1], [1.5, 1.5], [0.5, 0.5], [2, 1]]


def test_pareto_front_keeps_non_dominated_rows_and_duplicates():
    assert pareto_front(POINTS, ["maximize", "maximize"]).tolist() == [0, 1, 2, 4]
    assert pareto_front(POINTS, ["minimize", "minimize"]).tolist() == [3]


def test_pareto_front_with_mixed_directions():
    # Maximize x, minimize y: (2, 1) beats (1, 1) and (2, 2); (0, 0) trades x for a better y.
    points = [[1, 1], [2, 2], [2, 1], [0, 0]]
    assert pareto_front(points, ["maximize", "minimize"]).tolist() == [2, 3]


def test_pareto_front_of_nothing_and_bad_directions():
    assert pareto_front(np.empty((0, 2)), ["maximize", "minimize"]).tolist() == []
    with pytest.raises(ValueError, match="'maximise'"):
        pareto_front(POINTS, ["maximize", "maximise"])
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        pareto_front(POINTS, ["maximize"] * 3)


def test_hypervolume_one_objective():
    assert hypervolume([[0.3], [0.7]], ["maximize"], [0.0]) == pytest.approx(0.7)
    assert hypervolume([[2.0], [5.0]], ["minimize"], [10.0]) == pytest.approx(8.0)


def test_hypervolume_two_objectives_is_the_union_of_rectangles():
    staircase = [[1, 3], [2, 2], [3, 1]]
    # Maximize from (0, 0): columns of width 1 and heights 3, 2, 1.
    assert hypervolume(staircase, ["maximize", "maximize"], [0, 0]) == pytest.approx(6.0)
    # Minimize towards (4, 4): columns [1,2), [2,3), [3,4) of heights 1, 2, 3.
    assert hypervolume(staircase, ["minimize", "minimize"], [4, 4]) == pytest.approx(6.0)
    # Maximize x, minimize y towards (0, 4): (3, 1) covers [0, 3] x [1, 4], which holds the other two boxes.
    assert hypervolume(staircase, ["maximize", "minimize"], [0, 4]) == pytest.approx(9.0)


def test_hypervolume_ignores_dominated_points_and_points_beyond_the_reference():
    base = hypervolume([[1, 3], [3, 1]], ["maximize", "maximize"], [0, 0])
    assert base == pytest.approx(5.0)  # 3 + 3 - 1
    noisy = [[1, 3], [3, 1], [0.5, 0.5], [-1, 10], [5, 0]]  # dominated; x not above 0; y not above 0
    assert hypervolume(noisy, ["maximize", "maximize"], [0, 0]) == pytest.approx(base)
    assert hypervolume([], ["maximize", "maximize"], [0, 0]) == 0.0


def test_hypervolume_three_and_four_objectives_by_inclusion_exclusion():
    unit = [[2, 1, 1], [1, 2, 1], [1, 1, 2]]  # three 2x1x1 boxes sharing the unit cube
    assert hypervolume(unit[:1], ["maximize"] * 3, [0, 0, 0]) == pytest.approx(2.0)
    assert hypervolume(unit[:2], ["maximize"] * 3, [0, 0, 0]) == pytest.approx(3.0)
    assert hypervolume(unit, ["maximize"] * 3, [0, 0, 0]) == pytest.approx(4.0)
    # Minimized towards (3, 3, 3) each box is 1x2x2 = 4, each pair shares 1x1x2 = 2, all three share 1.
    assert hypervolume(unit, ["minimize"] * 3, [3, 3, 3]) == pytest.approx(3 * 4 - 3 * 2 + 1)
    four = [[2, 1, 1, 1], [1, 2, 1, 1]]
    assert hypervolume(four, ["maximize"] * 4, [0, 0, 0, 0]) == pytest.approx(3.0)
