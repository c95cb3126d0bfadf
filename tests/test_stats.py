"""fusion_cache.stats: the bootstrap intervals cover the truth at their nominal rate (one run, and several runs
with a seed-to-seed random effect), McNemar's exact p-value, the paired interval's narrowness on rows that
agree, Holm's correction, compare_all, reproducibility, input validation and the formatting helpers.

The simulations use fewer resamples than the default (400) and fixed generators, so every test is
deterministic and fast; the coverage bounds leave room for the Monte Carlo error of the number of test sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion_cache.stats import (
    ALPHA,
    Comparison,
    Interval,
    accuracy_interval,
    compare,
    compare_all,
    holm,
    mcnemar,
    p_text,
    paired_difference,
    percent,
    points,
)

FAST = 400  # resamples in the simulations


def _width(iv) -> float:
    return iv.hi - iv.lo


def _table(b: int, c: int, both_right: int = 5, both_wrong: int = 3, seed: int = 0):
    """Two 1-d rows with b images only A gets right, c only B gets right, and some concordant images, shuffled."""
    a = np.array([True] * b + [False] * c + [True] * both_right + [False] * both_wrong)
    bb = np.array([False] * b + [True] * c + [True] * both_right + [False] * both_wrong)
    perm = np.random.default_rng(seed).permutation(len(a))
    return a[perm], bb[perm]


def _exact_mcnemar(b: int, c: int) -> float:
    """min(1, 2 P[X <= min(b, c)]) for X ~ Binomial(b + c, 1/2), by hand."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


# 1. coverage -------------------------------------------------------------------------------------------------


def test_one_run_interval_covers_the_true_accuracy_at_the_nominal_rate():
    """1,000 test sets of 400 images at a true accuracy of 0.8, each with its own 95 % interval: the share of
    intervals that contain 0.8 is 95 % up to Monte Carlo error (SE about 0.7 points). A 90 % interval, a
    standard error off by a factor, or a statistic that is not the mean would land outside [93 %, 97 %]."""
    p, n, sets = 0.8, 400, 1000
    rng = np.random.default_rng(20240601)
    correct = rng.random((sets, n)) < p
    covered = 0
    for s in range(sets):
        iv = accuracy_interval(correct[s], resamples=FAST, seed=s)
        covered += iv.lo <= p <= iv.hi
    assert 0.93 <= covered / sets <= 0.97


def test_two_level_interval_covers_a_run_level_random_effect():
    """Three runs per test set, whose accuracies vary around p = 0.8 (a run-level random effect, sd 0.03), each
    image's correctness drawn given its run's accuracy. The quantity of interest is p, what another set of test
    images *and* another set of seeds would give on average.

    Demonstrates: (a) the two-level interval of the mean over the runs covers p at roughly the nominal rate,
    because it resamples the runs as well as the images; (b) it is wider on average than the interval of a single
    run, which only knows the test-sample spread; (c) that one-run interval misses p far more often than 5 %
    (the seed-to-seed spread it ignores is real). An interval that resampled only the images, or only the runs,
    would fail (a)."""
    p, tau, runs, n, sets = 0.8, 0.03, 3, 400, 600
    rng = np.random.default_rng(7)
    covered = covered_one = 0
    widths, widths_one = [], []
    for s in range(sets):
        acc = p + tau * rng.standard_normal(runs)
        correct = rng.random((runs, n)) < acc[:, None]
        iv = accuracy_interval(correct, resamples=FAST, seed=s)
        one = accuracy_interval(correct[0], resamples=FAST, seed=s)
        covered += iv.lo <= p <= iv.hi
        covered_one += one.lo <= p <= one.hi
        widths.append(_width(iv))
        widths_one.append(_width(one))
    assert 0.91 <= covered / sets <= 0.98
    assert np.mean(widths) > 1.05 * np.mean(widths_one)
    assert covered_one / sets < 0.85


def test_identical_runs_give_the_one_run_width():
    """Runs that agree image for image add no seed-to-seed spread: the two-level interval is as wide as the
    one-run interval (up to resampling noise), not narrower as it would be if the R x n cells were treated as
    R * n independent images (a factor sqrt(R) = 2 here)."""
    row = np.random.default_rng(3).random(500) < 0.7
    one = accuracy_interval(row, resamples=2000, seed=1)
    four = accuracy_interval(np.tile(row, (4, 1)), resamples=2000, seed=1)
    assert four.value == one.value
    assert _width(four) == pytest.approx(_width(one), rel=0.1)


def test_width_matches_the_normal_approximation_on_a_large_test_set():
    """On 100,000 images (several gathering blocks) the 95 % interval is p +- 1.96 sqrt(p (1 - p) / n)."""
    n = 100_000
    row = np.random.default_rng(5).random(n) < 0.6
    iv = accuracy_interval(row, resamples=300, seed=2)
    p = row.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert iv.lo < p < iv.hi
    assert _width(iv) == pytest.approx(2 * half, rel=0.2)
    assert iv.lo == pytest.approx(p - half, abs=0.3 * half)
    assert iv.hi == pytest.approx(p + half, abs=0.3 * half)


def test_level_sets_the_width():
    """A 50 % interval is about 0.674 / 1.96 of the 95 % one: the level is used, not fixed at 95 %."""
    row = np.random.default_rng(11).random(1000) < 0.75
    wide = accuracy_interval(row, resamples=2000, seed=0)
    narrow = accuracy_interval(row, resamples=2000, seed=0, level=0.5)
    assert _width(narrow) == pytest.approx(_width(wide) * 0.674 / 1.96, rel=0.15)
    assert wide.lo <= narrow.lo <= narrow.hi <= wide.hi


# 2. McNemar --------------------------------------------------------------------------------------------------


def test_mcnemar_equals_the_hand_computed_exact_binomial():
    a, b = _table(7, 1)
    p, only_a, only_b = mcnemar(a, b)
    expected = 2 * sum(math.comb(8, i) for i in range(2)) / 2**8
    assert expected == 0.0703125
    assert (only_a, only_b) == (7, 1)
    assert p == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("b, c", [(10, 2), (2, 10), (30, 12), (0, 6), (13, 0), (25, 24)])
def test_mcnemar_matches_the_exact_formula(b, c):
    p, only_a, only_b = mcnemar(*_table(b, c))
    assert (only_a, only_b) == (b, c)
    assert p == pytest.approx(_exact_mcnemar(b, c), rel=1e-10)


def test_mcnemar_symmetric_and_no_discordant_pairs():
    p, b, c = mcnemar(*_table(5, 5))
    assert (p, b, c) == (1.0, 5, 5)
    row = np.random.default_rng(0).random(50) < 0.5
    assert mcnemar(row, row.copy()) == (1.0, 0, 0)


def test_mcnemar_counts_b_and_c_the_right_way_round():
    """b: images only A gets right; c: only B. Swapping the rows swaps them and keeps p."""
    a = np.array([1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 1, 1, 1, 0], bool)
    assert mcnemar(a, b)[1:] == (2, 1)
    assert mcnemar(b, a)[1:] == (1, 2)
    assert mcnemar(a, b)[0] == mcnemar(b, a)[0]


def test_mcnemar_ignores_concordant_images_and_uses_the_first_run():
    few, many = _table(9, 2, 0, 0), _table(9, 2, 400, 100)
    assert mcnemar(*few) == mcnemar(*many)
    a, b = _table(10, 2)
    other = np.random.default_rng(1).random(a.size) < 0.5
    assert mcnemar(np.stack([a, other]), np.stack([b, ~other])) == mcnemar(a, b)


# 3. paired difference ----------------------------------------------------------------------------------------


def test_paired_interval_is_much_narrower_than_two_separate_intervals():
    """Rows that agree on 970 of 1,000 images (20 only A right, 10 only B right): the paired interval is a
    fraction of the width implied by the two separate intervals, (hi_a - lo_b) - (lo_a - hi_b). Independent
    resamples for the two rows would give about 0.7 of it."""
    rng = np.random.default_rng(42)
    n = 1000
    a = rng.random(n) < 0.8
    b = a.copy()
    right, wrong = np.flatnonzero(a), np.flatnonzero(~a)
    b[rng.choice(right, 20, replace=False)] = False
    b[rng.choice(wrong, 10, replace=False)] = True
    ia, ib = accuracy_interval(a, resamples=2000), accuracy_interval(b, resamples=2000)
    d = paired_difference(a, b, resamples=2000)
    unpaired = (ia.hi - ib.lo) - (ia.lo - ib.hi)
    assert d.value == pytest.approx(0.01)
    assert d.value == pytest.approx(ia.value - ib.value)
    assert d.lo <= d.value <= d.hi
    assert _width(d) < 0.35 * unpaired


def test_paired_interval_contains_the_true_difference_in_simulation():
    """300 simulated test sets of 500 images where B's correctness follows A's (a shared image difficulty), true
    accuracies 0.82 and 0.78: the 95 % paired interval contains the true difference 0.04 about 95 % of the time."""
    pa, pb, n, sets = 0.82, 0.78, 500, 300
    rng = np.random.default_rng(99)
    covered = 0
    for s in range(sets):
        u = rng.random(n)  # difficulty of each image, shared by both rows
        noise = rng.random(n) < 0.1  # a tenth of the images get an independent draw for B
        a = u < pa
        b = np.where(noise, rng.random(n) < pb, u < pb)
        d = paired_difference(a, b, resamples=FAST, seed=s)
        covered += d.lo <= pa - pb <= d.hi
    assert 0.91 <= covered / sets <= 0.99


def test_paired_runs_are_drawn_together():
    """Run r of A is paired with run r of B: two identical rows whose runs differ a lot (60 % and 90 %) have a
    difference of exactly 0 in every resample. Drawing the runs separately for the rows would not."""
    rng = np.random.default_rng(8)
    row = np.stack([rng.random(300) < 0.6, rng.random(300) < 0.9])
    d = paired_difference(row, row.copy(), resamples=500, seed=4)
    assert (d.value, d.lo, d.hi) == (0.0, 0.0, 0.0)


# 4. Holm -----------------------------------------------------------------------------------------------------


def test_holm_hand_worked_example():
    # sorted: 0.01 * 4 = 0.04, 0.03 * 3 = 0.09, 0.04 * 2 = 0.08 -> 0.09 (monotone), 0.5 * 1 = 0.5
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5], rtol=1e-12)


def test_holm_caps_at_one_and_keeps_single_and_empty():
    # sorted: 0.01 * 3 = 0.03, 0.6 * 2 = 1.2 -> 1, 0.7 * 1 = 0.7 -> 1 (monotone)
    np.testing.assert_allclose(holm([0.6, 0.01, 0.7]), [1.0, 0.03, 1.0])
    np.testing.assert_allclose(holm([0.2, 0.45, 0.7]), [0.6, 0.9, 0.9])
    np.testing.assert_array_equal(holm([0.5, 0.9]), [1.0, 1.0])
    np.testing.assert_array_equal(holm([0.02]), [0.02])
    assert holm([]).shape == (0,)


def test_holm_properties_against_a_direct_implementation():
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 5, 10):
        p = rng.random(m) ** 3
        adj = holm(p)
        order = np.argsort(p, kind="stable")
        direct = np.empty(m)
        for rank, i in enumerate(order):  # max over j <= i of min(1, (m - j + 1) p_(j)), 1-based
            direct[i] = max(min(1.0, (m - j) * p[order[j]]) for j in range(rank + 1))
        np.testing.assert_allclose(adj, direct, rtol=1e-12)
        assert (adj >= p).all() and (adj <= 1).all()
        # order preserved (monotone in p): a smaller raw p never gets a larger adjusted p
        assert (np.diff(adj[order]) >= 0).all()


def test_holm_keeps_the_input_order_and_handles_ties():
    p = [0.5, 0.01, 0.04, 0.03]
    np.testing.assert_allclose(holm(p), [0.5, 0.04, 0.09, 0.09])
    np.testing.assert_allclose(holm([0.02, 0.02, 0.02]), [0.06, 0.06, 0.06])


@pytest.mark.parametrize("bad", [[0.1, -0.01], [0.2, 1.5], [0.1, float("nan")], [float("inf")],
                                 [[0.1, 0.2]], 0.3])
def test_holm_rejects_invalid_pvalues(bad):
    with pytest.raises(ValueError):
        holm(bad)


# 5. compare_all ----------------------------------------------------------------------------------------------


def _rows():
    """A baseline and three rows whose first runs differ from it by McNemar tables (b, c)."""
    n = 200
    base = np.zeros(n, bool)
    base[:100] = True
    rows = {"base": base}
    for key, (b, c) in {"strong": (20, 0), "borderline": (10, 2), "none": (5, 5)}.items():
        r = base.copy()
        r[100 : 100 + b] = True  # images only this row gets right
        r[:c] = False  # images only the baseline gets right
        rows[key] = r
    return rows


def test_compare_all_excludes_the_baseline_and_applies_holm():
    rows = _rows()
    out = compare_all(rows, "base", resamples=500)
    assert list(out) == ["strong", "borderline", "none"]
    ps = [out[k].p for k in out]
    np.testing.assert_allclose([out[k].p_holm for k in out], holm(ps), rtol=0, atol=0)
    for k, c in out.items():
        assert c.p_holm >= c.p
        assert c.significant == (c.p_holm < ALPHA and (c.lo > 0 or c.hi < 0))
        assert c.diff == pytest.approx(rows[k].mean() - rows["base"].mean())
    assert (out["strong"].b, out["strong"].c) == (20, 0)
    assert (out["borderline"].b, out["borderline"].c) == (10, 2)
    assert out["borderline"].p == pytest.approx(_exact_mcnemar(10, 2))
    # the borderline row is significant on its own (p = 0.039) but not after Holm over 3 comparisons
    lone = compare(rows["borderline"], rows["base"], resamples=500)
    assert lone.p_holm is None and lone.significant
    assert out["borderline"].p < ALPHA and not out["borderline"].significant
    assert out["strong"].significant and not out["none"].significant
    assert out["none"].p == 1.0 and out["none"].p_holm == 1.0


def test_compare_all_intervals_are_the_paired_ones():
    rows = _rows()
    out = compare_all(rows, "base", resamples=500, seed=3)
    d = paired_difference(rows["strong"], rows["base"], resamples=500, seed=3)
    assert (out["strong"].diff, out["strong"].lo, out["strong"].hi) == (d.value, d.lo, d.hi)
    rec = out["strong"].record()
    assert rec["only_a_right"] == 20 and rec["only_b_right"] == 0 and rec["p_holm"] == out["strong"].p_holm
    assert rec["significant"] is True


def test_compare_all_missing_baseline_and_lone_baseline():
    rows = _rows()
    with pytest.raises(KeyError):
        compare_all(rows, "absent", resamples=10)
    assert compare_all({"base": rows["base"]}, "base", resamples=10) == {}


# 6. reproducibility ------------------------------------------------------------------------------------------


def test_same_seed_same_interval_other_seed_differs():
    row = np.random.default_rng(1).random((3, 400)) < 0.8
    a = accuracy_interval(row, resamples=500, seed=5)
    b = accuracy_interval(row, resamples=500, seed=5)
    c = accuracy_interval(row, resamples=500, seed=6)
    assert a == b  # bit for bit
    assert (a.lo, a.hi) != (c.lo, c.hi)
    assert a.value == c.value
    assert abs(a.lo - c.lo) < 0.02 and abs(a.hi - c.hi) < 0.02
    other = np.random.default_rng(2).random((3, 400)) < 0.8
    assert paired_difference(row, other, 500, 5) == paired_difference(row, other, 500, 5)
    assert paired_difference(row, other, 500, 5) != paired_difference(row, other, 500, 6)
    assert accuracy_interval(row) == accuracy_interval(row, resamples=2000, seed=0)


@pytest.mark.parametrize("p, shape", [(0.5, (200,)), (0.97, (150,)), (0.03, (2, 150)), (0.8, (5, 60))])
def test_interval_within_unit_range_and_contains_the_value(p, shape):
    row = np.random.default_rng(int(100 * p)).random(shape) < p
    iv = accuracy_interval(row, resamples=1000, seed=0)
    assert 0.0 <= iv.lo <= iv.value <= iv.hi <= 1.0
    assert iv.lo < iv.hi
    assert iv.fields("acc") == {"acc_lo": iv.lo, "acc_hi": iv.hi}


def test_value_is_the_mean_over_all_runs_and_runs_are_resampled():
    """One perfect run and one all-wrong run: the value is 0.5, and resampling the 2 runs gives 0, 0.5 or 1
    (probabilities 1/4, 1/2, 1/4), so the 95 % interval is [0, 1]. Without run resampling it would be [0.5, 0.5]."""
    row = np.stack([np.ones(40, bool), np.zeros(40, bool)])
    assert accuracy_interval(row, resamples=500, seed=0) == Interval(0.5, 0.0, 1.0)
    mixed = np.random.default_rng(4).random((3, 100)) < np.array([[0.5], [0.7], [0.9]])
    assert accuracy_interval(mixed, resamples=50).value == pytest.approx(mixed.mean())


def test_degenerate_rows():
    assert accuracy_interval(np.ones(50, bool), resamples=100) == Interval(1.0, 1.0, 1.0)
    assert accuracy_interval(np.zeros((2, 50), bool), resamples=100) == Interval(0.0, 0.0, 0.0)


# 7. input validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4), bool), np.zeros(0, bool), np.zeros((0, 5), bool),
                                 np.zeros((2, 0), bool), np.bool_(True)])
def test_wrong_shapes_raise(bad):
    with pytest.raises(ValueError):
        accuracy_interval(bad, resamples=10)
    with pytest.raises(ValueError):
        paired_difference(bad, bad, resamples=10)
    with pytest.raises(ValueError):
        mcnemar(bad, bad)


@pytest.mark.parametrize("bad", [[0, 1, 2], [0.5, 1.0], [1.0, float("nan")], [-1, 0], ["a", "b"]])
def test_non_boolean_values_raise(bad):
    with pytest.raises(ValueError):
        accuracy_interval(bad, resamples=10)
    with pytest.raises(ValueError):
        paired_difference(bad, [True] * len(bad), resamples=10)


def test_zero_one_numbers_are_accepted_as_booleans():
    ints = [1, 0, 1, 1, 0, 1]
    assert accuracy_interval(ints, resamples=50) == accuracy_interval(np.array(ints, bool), resamples=50)
    assert accuracy_interval(np.array(ints, float), resamples=50).value == pytest.approx(4 / 6)


def test_mismatched_paired_shapes_raise():
    a = np.ones((2, 10), bool)
    with pytest.raises(ValueError):
        paired_difference(a, np.ones((1, 10), bool), resamples=10)
    with pytest.raises(ValueError):
        paired_difference(a, np.ones((2, 11), bool), resamples=10)
    with pytest.raises(ValueError):
        mcnemar(np.ones(10, bool), np.ones(11, bool))
    with pytest.raises(ValueError):
        compare_all({"a": a, "b": np.ones((2, 9), bool)}, "a", resamples=10)


@pytest.mark.parametrize("resamples", [0, -5, 2.0, 10.5, "100"])
def test_bad_resamples_raise(resamples):
    row = np.ones(10, bool)
    with pytest.raises(ValueError):
        accuracy_interval(row, resamples=resamples)
    with pytest.raises(ValueError):
        paired_difference(row, row, resamples=resamples)


@pytest.mark.parametrize("level", [0, 1, 0.0, 1.0, -0.5, 1.5, 95, float("nan")])
def test_level_outside_the_unit_interval_raises(level):
    row = np.ones(10, bool)
    with pytest.raises(ValueError):
        accuracy_interval(row, resamples=10, level=level)
    with pytest.raises(ValueError):
        paired_difference(row, row, resamples=10, level=level)


# 8. formatting -----------------------------------------------------------------------------------------------


def test_percent():
    assert percent(Interval(0.81, 0.786, 0.834)) == "81.0 [78.6, 83.4]"
    assert percent(Interval(0.5, 0.25, 0.75), digits=2) == "50.00 [25.00, 75.00]"
    assert percent(Interval(1.0, 1.0, 1.0), digits=0) == "100 [100, 100]"


def test_points():
    assert points(Comparison(0.035, 0.018, 0.051, 0.01, 3, 1)) == "+3.5 [+1.8, +5.1]"
    assert points(Comparison(-0.02, -0.031, -0.009, 0.2, 1, 3)) == "-2.0 [-3.1, -0.9]"
    assert points(Comparison(0.004, -0.0125, 0.02, 0.8, 2, 2), digits=2) == "+0.40 [-1.25, +2.00]"


@pytest.mark.parametrize("p, text", [(5e-5, "< 0.0001"), (0.0, "< 0.0001"), (1e-4, "0.0001"), (0.0012, "0.0012"),
                                     (0.123, "0.123"), (0.5, "0.5"), (0.05, "0.05"), (1.0, "1")])
def test_p_text(p, text):
    assert p_text(p) == text


def test_a_difference_only_the_first_run_shows_is_not_significant():
    """McNemar sees run 0 only; the paired interval sees every run. Run 0 of A beats B on 30 images, the other
    two runs lose to it on 30: p is tiny, the interval spans zero, and the comparison is not significant."""
    n = 400
    b = np.zeros((3, n), bool)
    b[:, :200] = True
    a = b.copy()
    a[0, 200:230] = True  # run 0: A right where B is wrong
    a[1:, :30] = False  # runs 1 and 2: A wrong where B is right
    c = compare(a, b, resamples=500)
    assert c.p < 1e-6 and c.lo < 0 < c.hi
    assert not c.significant and not c.record()["significant"]
    assert compare(a[:1], b[:1], resamples=500).significant  # the first run alone: both agree
