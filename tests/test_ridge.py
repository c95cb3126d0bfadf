"""The ridge head (heads/ridge.py) and its streamed fit and tuning (probe.py): scikit-learn's RidgeClassifier at
the same strength, the same solution whatever the chunks, the whole grid from one decomposition equal to direct
fits, the estimator contract, a view larger than a memory limit, and the commands that run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from fusion_cache import probe
from fusion_cache.cache import CacheMeta, CacheWriter, open_cache
from fusion_cache.cli import main
from fusion_cache.fit import HeadParams, ViewData, fit_head, load_view
from fusion_cache.heads import HEAD_SPECS, linear_form
from fusion_cache.heads.ridge import Gram, Path as RidgePath, RidgeHead, accumulate, in_chunks
from fusion_cache.selection import ViewStore, tune_heads, validation_split

from .conftest import write_synthetic_cache
from .features import FLOAT32, assert_features_close

GRID = HEAD_SPECS["ridge"].grid  # 1e3 ... 1e-5, a quarter decade apart, strongest first


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def problem(n=240, k=4, seed=0, constant=True, labels=None):
    """Overlapping classes in 7 columns of very different scales and offsets: column 5 has a mean of 1e3 and a
    spread of 0.1 (what the Gram's reference shift exists for), column 6 is constant (unless `constant` is
    False). Every class is present; `labels` renames the class indices 0..k-1."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    X = rng.normal(size=(k, 7))[y] + 1.5 * rng.normal(size=(n, 7))
    X = X * [1, 10, 0.1, 1e-3, 3, 0.1, 1] + [0, 100, -5, 0.01, 2, 1e3, 0]
    if constant:
        X[:, 6] = 3.0
    return X.astype(np.float32), (y if labels is None else np.asarray(labels)[y])


def sklearn_ridge(X, y, alpha):
    """The reference: RidgeClassifier at n_rows * alpha on the float64 standardized features."""
    X64 = X.astype(np.float64)
    scaler = StandardScaler().fit(X64)
    return scaler, RidgeClassifier(alpha=len(X) * alpha).fit(scaler.transform(X64), y)


def intercept_at(head: RidgeHead, scaler: StandardScaler) -> np.ndarray:
    """The head's intercept with the features centred at the float64 means. The head keeps its means in float32
    and its intercept absorbs their rounding (column 5's mean of 1e3 rounds by up to 3e-5, 3e-4 of its spread):
    ((x - mean_) / scale_) @ coef_.T + intercept_ = ((x - m) / scale_) @ coef_.T + this."""
    shift = (scaler.mean_ - head.mean_.astype(np.float64)) / head.scale_
    return head.intercept_ + shift @ head.coef_.T.astype(np.float64)


def assert_same_solution(a: RidgeHead, b: RidgeHead, tol=1e-6):
    """The same classes, statistics (each column to tol of its own |mean| + scale) and coefficients (to tol
    relative, or of the largest coefficient)."""
    np.testing.assert_array_equal(a.classes_, b.classes_)
    unit = np.abs(b.mean_.astype(np.float64)) + b.scale_
    for name in ("mean_", "scale_"):
        err = np.abs(getattr(a, name).astype(np.float64) - getattr(b, name)) / unit
        assert err.max() <= tol, f"{name}: largest error {err.max():.2g} x (|mean| + scale)"
    for name in ("coef_", "intercept_"):
        want = getattr(b, name).astype(np.float64)
        np.testing.assert_allclose(getattr(a, name), want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=name)


# ---------------------------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("labels", [None, [3, 7, 42, 100], ["owl", "cat", "dog", "ant"]],
                         ids=["0..k-1", "non-contiguous ints", "strings"])
@pytest.mark.parametrize("alpha", [1e-3, 0.1, 2.0])
def test_equals_sklearn_ridge_classifier_multiclass(labels, alpha):
    X, y = problem(labels=labels)
    head = RidgeHead(alpha=alpha).fit(X, y)
    scaler, ref = sklearn_ridge(X, y, alpha)
    np.testing.assert_array_equal(head.classes_, ref.classes_)  # sorted, as scikit-learn orders them
    assert head.coef_.shape == ref.coef_.shape == (4, 7)
    np.testing.assert_allclose(head.coef_, ref.coef_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(intercept_at(head, scaler), ref.intercept_, rtol=0, atol=1e-6)
    assert np.all(head.coef_[:, 6] == 0) and head.scale_[6] == 1.0  # the constant column: scale 1, no weight
    Xn, _ = problem(n=500, seed=1)
    Zn = scaler.transform(Xn.astype(np.float64))
    np.testing.assert_array_equal(head.predict(X), ref.predict(scaler.transform(X.astype(np.float64))))
    np.testing.assert_array_equal(head.predict(Xn), ref.predict(Zn))
    np.testing.assert_allclose(head.decision_function(Xn), ref.decision_function(Zn), rtol=0, atol=1e-5)


@pytest.mark.parametrize("labels", [[-1, 5], ["no", "yes"]])
@pytest.mark.parametrize("alpha", [1e-2, 1.0])
def test_equals_sklearn_ridge_classifier_binary(labels, alpha):
    """RidgeClassifier keeps one row for two classes (class 1's score; a vector in scikit-learn 1.9); the head
    keeps both, row 0 = -row 1."""
    X, y = problem(k=2, labels=labels, seed=3)
    head = RidgeHead(alpha=alpha).fit(X, y)
    scaler, ref = sklearn_ridge(X, y, alpha)
    np.testing.assert_array_equal(head.classes_, ref.classes_)
    assert ref.coef_.size == 7 and np.size(ref.intercept_) == 1 and head.coef_.shape == (2, 7)
    np.testing.assert_allclose(head.coef_[1], np.ravel(ref.coef_), rtol=0, atol=1e-6)
    np.testing.assert_allclose(intercept_at(head, scaler)[1], np.ravel(ref.intercept_)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(head.coef_[0], -head.coef_[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(head.intercept_[0], -head.intercept_[1], rtol=0, atol=1e-6)
    Xn, _ = problem(n=500, k=2, seed=4)
    Zn = scaler.transform(Xn.astype(np.float64))
    np.testing.assert_array_equal(head.predict(Xn), ref.predict(Zn))
    d = head.decision_function(Xn)
    assert d.shape == (500,)
    np.testing.assert_allclose(d, ref.decision_function(Zn), rtol=0, atol=1e-5)


def test_alpha_zero_on_a_full_rank_problem_is_least_squares():
    X, y = problem(constant=False, seed=5)
    head = RidgeHead(alpha=0.0).fit(X, y)
    # least squares of the +-1 targets on [z, 1], z standardized as the head standardizes (float32 statistics:
    # at alpha 0 the standardization only reparametrizes, so the head's coefficients are these exactly)
    Z = (X.astype(np.float64) - head.mean_) / head.scale_
    T = 2.0 * (y[:, None] == np.arange(4)) - 1.0
    sol = np.linalg.lstsq(np.hstack([Z, np.ones((len(Z), 1))]), T, rcond=None)[0]
    np.testing.assert_allclose(head.coef_, sol[:-1].T, rtol=1e-6, atol=1e-6 * np.abs(sol).max())
    np.testing.assert_allclose(head.intercept_, sol[-1], rtol=1e-6, atol=1e-6)
    # a constant column more makes the Gram matrix singular at alpha 0: the least-squares solution of smallest
    # norm, which gives it no weight and leaves the others as they were
    wider = RidgeHead(alpha=0.0).fit(np.hstack([X, np.full((len(X), 1), 3.0, np.float32)]), y)
    np.testing.assert_allclose(wider.coef_, np.insert(head.coef_, 7, 0.0, axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(wider.intercept_, head.intercept_, rtol=0, atol=1e-6)


def test_alpha_is_a_strength_per_row():
    """The same rows repeated r times: the same standardization, a Gram matrix and a penalty r times larger,
    so the same head (what lets one grid serve every dataset size, and the memory test below check its answer
    on one copy of the rows)."""
    X, y = problem(seed=6)
    once = RidgeHead(alpha=0.05).fit(X, y)
    assert_same_solution(RidgeHead(alpha=0.05).fit(np.tile(X, (5, 1)), np.tile(y, 5)), once)


# ---------------------------------------------------------------------------------------------- streaming


def test_chunks_do_not_change_the_solution():
    X, y = problem(n=300, seed=7)
    for alpha in (0.0, 1e-3, 0.3):
        small = RidgeHead(alpha=alpha, chunk_rows=7).fit(X, y)  # 43 chunks, the reference from the first 7 rows
        whole = RidgeHead(alpha=alpha, chunk_rows=10_000).fit(X, y)
        assert_same_solution(small, whole)
        np.testing.assert_array_equal(small.predict(X), whole.predict(X))


def _gram(X, y, rows, ref, chunk=11):
    return accumulate(in_chunks(X[rows], y[rows], chunk), X.shape[1], 4, ref)


def test_gram_sums_over_subsets_add_and_subtract():
    X, y = problem(n=300, seed=8)
    rng = np.random.default_rng(8)
    A = np.sort(rng.choice(300, 120, replace=False))
    B = np.setdiff1d(np.arange(300), A)[:150]
    ref = X[:20].mean(0)
    gA, gB, gAB = _gram(X, y, A, ref), _gram(X, y, B, ref, 13), _gram(X, y, np.union1d(A, B), ref, 64)

    def same(g, h):
        assert g.n == h.n and np.array_equal(g.counts, h.counts) and np.array_equal(g.ref, h.ref)
        for name in ("sx", "sxx", "sxy"):
            a, b = getattr(g, name), getattr(h, name)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max(), err_msg=name)

    same(gA + gB, gAB)
    same(gAB - gB, gA)
    same(gAB - gA, gB)
    assert gA.n == 120 and np.array_equal(gA.counts, np.bincount(y[A], minlength=4))
    # the fit from the merged sums is the fit on the union's rows
    assert_same_solution(RidgeHead(alpha=0.1).fit_gram(gA + gB, np.arange(4)),
                         RidgeHead(alpha=0.1).fit(X[np.union1d(A, B)], y[np.union1d(A, B)]))
    # an empty Gram adopts the other's reference; different references are refused
    same(Gram(7, 4) + gA, gA)
    same(gA - Gram(7, 4), gA)
    other = _gram(X, y, B, None)
    with pytest.raises(ValueError, match="different references"):
        gA + other
    with pytest.raises(ValueError, match="different references"):
        gAB - other


N_TRAIN, N_TEST = 700, 150  # 700 rows: three blocks of 256 rows when iter_view reads 1-byte chunks


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """3 classes named as strings, 40 columns (features.1: 16, features.3: 24) of different scales and
    offsets, the label linearly but noisily encoded."""
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(3, 40))
    feats, labels = {}, {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = rng.integers(0, 3, n)
        X = (centers[y] + 2.0 * rng.normal(size=(n, 40))) * rng.uniform(0.01, 10, 40) + rng.uniform(-50, 50, 40)
        X = X.astype(np.float32)
        feats[split] = {"features.1": X[:, :16], "features.3": X[:, 16:]}
        labels[split] = y
    return write_synthetic_cache(tmp_path_factory.mktemp("ridge") / "small.h5", feats, labels, ["ant", "bee", "cat"])


def test_iter_view_rows_returns_exactly_those_rows_in_order(small_cache):
    cache = open_cache(small_cache)
    X, y = cache.view("all", "train")
    assert X.shape == (N_TRAIN, 40)
    blocks = lambda pos: set((pos // 256).tolist())  # noqa: E731  (block = max(256, chunk_bytes // row bytes))
    # every row, in three chunks of one block each
    chunks = list(cache.iter_view("all", "train", chunk_bytes=1))
    assert [len(p) for p, _, _ in chunks] == [256, 256, 188]
    assert np.array_equal(np.concatenate([p for p, _, _ in chunks]), np.arange(N_TRAIN))
    assert np.array_equal(np.concatenate([x for _, x, _ in chunks]), X)
    rng = np.random.default_rng(0)
    for rows in (np.array([0, 1, 255, 256, 257, 511, 512, 699]),  # either side of both block boundaries
                 np.sort(rng.choice(N_TRAIN, 300, replace=False)),
                 np.array([300, 301, 400]),  # one block only: the others yield nothing
                 np.array([5])):
        chunks = list(cache.iter_view("all", "train", rows, chunk_bytes=1))
        assert all(len(p) and len(blocks(p)) == 1 for p, _, _ in chunks)
        assert len(chunks) == len(blocks(rows))
        pos = np.concatenate([p for p, _, _ in chunks])
        assert np.array_equal(pos, rows)
        assert np.array_equal(np.concatenate([x for _, x, _ in chunks]), X[rows])
        assert np.array_equal(np.concatenate([t for _, _, t in chunks]), y[rows])
        # the default chunk (64 MiB) reads them in one block: the same rows
        (p, x, t), = cache.iter_view("all", "train", rows)
        assert np.array_equal(p, rows) and np.array_equal(x, X[rows]) and np.array_equal(t, y[rows])
        # and a loaded view walks the same rows (probe.MemoryRows, 7 rows a chunk)
        chunks = list(probe.MemoryRows(load_view(cache, "all"), chunk_rows=7).chunks("train", rows))
        assert all(len(p) <= 7 for p, _, _ in chunks)
        assert np.array_equal(np.concatenate([p for p, _, _ in chunks]), rows)
        assert np.array_equal(np.concatenate([x for _, x, _ in chunks]), X[rows])
        assert np.array_equal(np.concatenate([t for _, _, t in chunks]), y[rows])
    assert list(cache.iter_view("all", "train", np.array([], np.int64), chunk_bytes=1)) == []
    Xte, yte = cache.view("features.3", "test")
    (p, x, t), = cache.iter_view("features.3", "test")
    assert np.array_equal(p, np.arange(N_TEST)) and np.array_equal(x, Xte) and np.array_equal(t, yte)


def test_probe_fit_from_the_cache_equals_from_memory_equals_the_arrays(small_cache):
    cache = open_cache(small_cache)
    data = load_view(cache, "all")
    alpha = 0.02
    streamed = probe.fit(probe.CacheRows(cache, "all"), alpha, 3)
    loaded = probe.fit(probe.MemoryRows(data), alpha, 3)
    assert_same_solution(streamed.estimator, loaded.estimator)
    assert np.array_equal(streamed.train_pred, loaded.train_pred)
    assert np.array_equal(streamed.test_pred, loaded.test_pred)
    direct = RidgeHead(alpha=alpha).fit(data.X_train, data.y_train)
    assert_same_solution(streamed.estimator, direct)
    assert np.array_equal(streamed.test_pred, direct.predict(data.X_test))
    assert np.array_equal(streamed.train_pred, direct.predict(data.X_train))
    # on a subset of the train rows
    rows = np.sort(np.random.default_rng(1).choice(N_TRAIN, 333, replace=False))
    on_rows = RidgeHead(alpha=alpha).fit(data.X_train[rows], data.y_train[rows])
    for source in (probe.CacheRows(cache, "all"), probe.MemoryRows(data)):
        sub = probe.fit(source, alpha, 3, train_rows=rows)
        assert_same_solution(sub.estimator, on_rows)
        assert np.array_equal(sub.train_pred, on_rows.predict(data.X_train[rows]))  # predicted on those rows only
        assert np.array_equal(sub.test_pred, on_rows.predict(data.X_test))
    # and fit_head, which streams from the cache (or walks a loaded view)
    for r in (fit_head(cache, "all", "ridge", HeadParams(alpha=alpha)),
              fit_head(cache, "all", "ridge", HeadParams(alpha=alpha), data=data)):
        assert r.test_acc == float(np.mean(direct.predict(data.X_test) == data.y_test))
        assert r.train_acc == float(np.mean(direct.predict(data.X_train) == data.y_train))
        assert r.train_loss is None and r.test_loss is None and r.params == {"alpha": alpha} and r.dim == 40
        assert np.array_equal(r.test_pred, direct.predict(data.X_test))


@pytest.fixture(scope="module")
def long_cache(tmp_path_factory) -> Path:
    """60,000 rows of 40 columns (9.6 MB): a view that the cache streams in one chunk of 64 MiB."""
    rng = np.random.default_rng(21)
    centers = rng.normal(size=(3, 40))
    scale, offset = rng.uniform(0.01, 10, 40), rng.uniform(-50, 50, 40)
    feats, labels = {}, {}
    for split, n in (("train", 60_000), ("test", 1000)):
        y = rng.integers(0, 3, n)
        X = ((centers[y] + 2.0 * rng.normal(size=(n, 40))) * scale + offset).astype(np.float32)
        feats[split] = {"features.1": X[:, :16], "features.3": X[:, 16:]}
        labels[split] = y
    return write_synthetic_cache(tmp_path_factory.mktemp("ridge") / "long.h5", feats, labels, ["ant", "bee", "cat"])


def test_a_long_chunk_keeps_the_solution_to_1e_6(long_cache):
    """The sums are float64, but each chunk's products X'X are float32 matrix products: summed in float32 over
    a chunk's rows. The cache streams a narrow view in chunks of 64 MiB (here all 60,000 rows in one), so the
    streamed solution must still be the float64 one to 1e-6 (as chunks of 7 rows are; RidgeHead's 4096-row
    chunks reach 1.3e-6 at 50,000 rows, one 50,000-row chunk 1e-5)."""
    cache = open_cache(long_cache)
    alpha = 0.02
    est = probe.fit(probe.CacheRows(cache, "all"), alpha, 3).estimator
    X, y = cache.view("all", "train")
    Z = (X.astype(np.float64) - est.mean_) / est.scale_  # the head's own standardization, in float64
    ref = RidgeClassifier(alpha=len(X) * alpha).fit(Z, y)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=0, atol=1e-6 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(est.intercept_, ref.intercept_, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the grid


def _split(n, seed, frac=0.25):
    rng = np.random.default_rng(seed)
    val = np.sort(rng.choice(n, int(frac * n), replace=False))
    return np.setdiff1d(np.arange(n), val), val


def test_path_solves_every_alpha_as_a_direct_fit():
    X, y = problem(n=300, seed=9)
    g = accumulate(in_chunks(X, y, 64), 7, 4)
    path = RidgePath.of(g, *g.statistics())
    for alpha in GRID[::8]:  # 1e3, 10, 0.1, 1e-3, 1e-5
        coef, intercept = path.solve(alpha)
        direct = RidgeHead(alpha=alpha, chunk_rows=64).fit(X, y)
        np.testing.assert_allclose(coef, direct.coef_, rtol=1e-6, atol=1e-6 * np.abs(direct.coef_).max())
        np.testing.assert_allclose(intercept, direct.intercept_, rtol=1e-6, atol=1e-6)


def test_grid_scorer_accuracy_is_the_direct_fits_accuracy():
    X, y = problem(n=400, seed=10)
    fit_rows, val_rows = _split(400, 10)
    g = accumulate(in_chunks(X[fit_rows], y[fit_rows]), 7, 4)
    mean, scale = g.statistics()
    scorer = RidgePath.of(g, mean, scale).scorer(GRID)
    Z = (X[val_rows] - mean) / scale
    scorer.add(Z[:37], y[val_rows][:37])  # in two chunks
    scorer.add(Z[37:], y[val_rows][37:])
    assert scorer.n == len(val_rows)
    direct = [np.mean(RidgeHead(alpha=a).fit(X[fit_rows], y[fit_rows]).predict(X[val_rows]) == y[val_rows])
              for a in GRID]
    np.testing.assert_array_equal(scorer.accuracy, direct)
    assert len(set(direct)) > 3  # the grid spans strengths that predict differently


def _standardized(X, rows):
    """X standardized with the statistics of `rows`, in float64 (a constant column: scale 1)."""
    X64 = X.astype(np.float64)
    mean, std = X64[rows].mean(0), X64[rows].std(0)
    return (X64 - mean) / np.where(std < 1e-12, 1.0, std)


class ridge64:
    """Ridge on +-1 one-hot targets from its definition, in float64 numpy, on features used as given."""

    def __init__(self, Z, y, alpha, k):
        zbar = Z.mean(0)
        T = 2.0 * (y[:, None] == np.arange(k)) - 1.0
        Zc = Z - zbar
        self.W = np.linalg.solve(Zc.T @ Zc + len(Z) * alpha * np.eye(Z.shape[1]), Zc.T @ (T - T.mean(0)))
        self.b = T.mean(0) - zbar @ self.W

    def predict(self, Z):
        return (Z @ self.W + self.b).argmax(1)


def _view_data(X, y, view="v"):
    return ViewData(view, ["t"], X, y, X[:10], y[:10])


def test_tune_scores_each_seed_on_its_own_rows_chooses_the_first_best_and_refits():
    """Each seed's scores are those of ridge fitted on its own fit rows at every alpha (in the space
    standardized with the refit rows' statistics, as the tuned protocol standardizes) and scored on its own
    validation rows; the first best alpha (the strongest among ties) is refit on the refit rows."""
    X, y = problem(n=360, seed=12)
    R = np.sort(np.random.default_rng(12).choice(360, 300, replace=False))  # a few-shot draw's refit rows
    splits = {}
    for seed in (0, 1, 2):
        fit_, val = _split(len(R), 100 + seed)
        splits[seed] = (R[fit_], R[val])
    splits[3] = (R[_split(len(R), 103)[0]], np.setdiff1d(np.arange(360), R))  # validation outside the refit rows
    tuned = probe.tune(probe.MemoryRows(_view_data(X, y), chunk_rows=50), 4, splits, GRID, R)
    Z = _standardized(X, R)
    ties = 0
    for seed, (fit_, val) in splits.items():
        direct = np.array([np.mean(ridge64(Z[fit_], y[fit_], a, 4).predict(Z[val]) == y[val]) for a in GRID])
        np.testing.assert_array_equal(tuned[seed].scores, direct, err_msg=f"seed {seed}")
        best = int(np.flatnonzero(direct == direct.max())[0])
        ties += int((direct == direct.max()).sum() > 1)
        assert tuned[seed].best == best
        refit = RidgeHead(alpha=GRID[best]).fit(X[R], y[R])
        assert_same_solution(tuned[seed].estimator, refit)
    assert ties >= 2  # the tie rule was exercised: several alphas share the best score
    for s in splits:  # seeds that chose the same alpha share its refit
        for t in splits:
            assert (tuned[s].estimator is tuned[t].estimator) == (tuned[s].best == tuned[t].best)
    # refit_rows None: every train row; seeds' fit rows outside the refit rows are refused
    every = probe.tune(probe.MemoryRows(_view_data(X, y)), 4, {0: splits[0]}, GRID[:3])
    assert_same_solution(every[0].estimator, RidgeHead(alpha=GRID[every[0].best]).fit(X, y))
    with pytest.raises(ValueError, match="not all refit rows"):
        probe.tune(probe.MemoryRows(_view_data(X, y)), 4, {0: (np.arange(360), splits[0][1])}, GRID[:3], R)


def test_ties_go_to_the_first_of_the_grid():
    X, y = problem(n=200, seed=13)
    split = {0: _split(200, 13)}
    rows = probe.MemoryRows(_view_data(X, y))
    # the best value repeated: its first place
    scores = probe.tune(rows, 4, split, GRID)[0].scores
    best = GRID[int(np.argmax(scores))]
    grid = (1e9, best, best, 1e-5)
    t = probe.tune(rows, 4, split, grid)[0]
    assert t.best == 1 and t.scores[1] == t.scores[2] == scores.max()


def test_tuned_ridge_from_the_cache_equals_from_memory(small_cache):
    """selection's closed-form tuning streams the view from the cache unless it is loaded: the same runs."""
    cache = open_cache(small_cache)
    streamed = tune_heads(ViewStore(cache), "all", ["ridge"], [0, 1], 0.2)
    store = ViewStore(cache)
    data = store.data("all")  # loaded: MemoryRows
    loaded = tune_heads(store, "all", ["ridge"], [0, 1], 0.2)
    for a, b in zip(streamed, loaded):
        assert (a.seed, a.param, a.value, a.grid, a.val_acc, a.train_acc, a.test_acc) == \
            (b.seed, b.param, b.value, b.grid, b.val_acc, b.train_acc, b.test_acc)
        assert list(a.grid) == [f"{v:g}" for v in GRID] and a.param == "alpha"
        fit_, val = validation_split(data.y_train, 0.2, a.seed)
        assert (a.fit_rows, a.val_rows) == (len(fit_), len(val))
        assert a.val_acc == max(a.grid.values()) == a.grid[f"{a.value:g}"]
        best = next(v for v in GRID if a.grid[f"{v:g}"] == a.val_acc)  # the first best
        assert a.value == best
        refit = RidgeHead(alpha=a.value).fit(data.X_train, data.y_train)
        assert_same_solution(a.estimator, refit)
        assert a.test_acc == float(np.mean(refit.predict(data.X_test) == data.y_test))
        assert np.array_equal(a.test_pred, refit.predict(data.X_test))


# ---------------------------------------------------------------------------------------------- estimator


@parametrize_with_checks([RidgeHead(), RidgeHead(alpha=0.0, chunk_rows=3)])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


@pytest.mark.parametrize("method", ["predict", "decision_function", "linear_form", "score"])
def test_an_unfitted_head_raises_not_fitted_error(method):
    X, y = problem(seed=14)
    with pytest.raises(NotFittedError):
        getattr(RidgeHead(), method)(*{"linear_form": (), "score": (X, y)}.get(method, (X,)))


def test_estimator_basics():
    X, y = problem(seed=14)
    head = RidgeHead(alpha=0.3, chunk_rows=50)
    assert head.get_params() == {"alpha": 0.3, "standardize": True, "chunk_rows": 50}
    head.fit(X, y)
    twin = clone(head)
    assert twin.get_params() == head.get_params() and not hasattr(twin, "coef_")
    assert_same_solution(twin.fit(X, y), head)
    assert head.n_features_in_ == 7
    with pytest.raises(ValueError, match="features"):
        head.predict(X[:, :5])
    with pytest.raises(ValueError, match="features"):
        head.decision_function(np.hstack([X, X]))
    for bad in (-1.0, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match="alpha must be a number >= 0"):
            RidgeHead(alpha=bad).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        RidgeHead().fit(X, np.zeros(len(X), int))
    raw = RidgeHead(alpha=0.3, standardize=False).fit(X, y)
    assert np.all(raw.mean_ == 0) and np.all(raw.scale_ == 1)


@pytest.mark.parametrize("k", [2, 4])
def test_linear_form_reproduces_decision_and_predict(k):
    X, y = problem(k=k, seed=15, labels=["a", "b", "c", "d"][:k])
    head = RidgeHead(alpha=0.05).fit(X, y)
    form = linear_form(head)
    assert set(form) == {"coef", "intercept", "mean", "scale"} and form["coef"].shape == (k, 7)
    Xn, _ = problem(n=300, k=k, seed=16)
    logits = ((Xn.astype(np.float64) - form["mean"]) / form["scale"]) @ form["coef"].T.astype(np.float64) \
        + form["intercept"]
    d = head.decision_function(Xn)
    np.testing.assert_allclose(d, logits[:, 1] if k == 2 else logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(head.predict(Xn), head.classes_[logits.argmax(1)])


# ---------------------------------------------------------------------------------------------- memory

# A view larger than the memory the fit is allowed. The streamed fit reads the view in chunks of about 64 MiB
# (Cache.iter_view's default) whatever its rows; measured on a 2-core Linux machine with RLIMIT_DATA (this view,
# one thread), it needs 270-300 MiB above the process's baseline: the chunk, the chunk shifted by the reference,
# and a float64 copy of that (128 MiB, made by torch's sum(dtype=float64) in Gram.add). A view smaller than about
# 300 MiB is not worth streaming, so: 512 MiB of train features (1 Mi rows x 128 columns), 384 MiB allowed;
# loading the view needs more than twice the view (the tap read, then the view concatenated).
BIG_ROWS, BIG_BLOCK, BIG_TAPS = 1 << 20, 4096, ("features.7", "features.8")  # 64 + 64 columns
ALLOWANCE = 384 << 20
LIMITED = r"""
import json, resource, sys
import fusion_cache.cli, fusion_cache.fit, fusion_cache.probe, fusion_cache.stats, fusion_cache.heads.ridge
from fusion_cache.cache import open_cache
path, allowance = sys.argv[1], int(sys.argv[2])
def vm_data():  # bytes of private writable memory: what RLIMIT_DATA bounds (Linux 4.7 and later)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
cache = open_cache(path)  # the baseline: interpreter, torch, scikit-learn, h5py, the cache opened
try:
    base = vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (base + allowance, base + allowance))
except (OSError, ValueError, StopIteration, AttributeError) as e:
    print("UNSUPPORTED", repr(e)); sys.exit(0)
print("BASELINE", base, flush=True)
try:
    fusion_cache.cli.main(["fit", path, "--head", "ridge", "--features", "all", "--json"], prog_name="fusion-cache")
except SystemExit as e:
    print("FIT EXIT", e.code, flush=True)
try:
    X, _ = cache.view("all", "train")
    print("LOAD loaded", X.shape)
except MemoryError:
    print("LOAD MemoryError")
"""


def _write_tiled_cache(path: Path, X: np.ndarray, y: np.ndarray, reps: int, Xte: np.ndarray, yte: np.ndarray):
    """A cache whose train split is (X, y) repeated `reps` times, written a block at a time."""
    meta = CacheMeta.create(
        backbone="mobilenet_v2", weights_sha256="0" * 64, image_size=32, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), resize="none", pool="avg", taps=BIG_TAPS, dataset="synthetic",
        data_identity={"synthetic": str(path)}, subset={}, dtype="float32", precision="fp32", weights="synthetic",
        data_root="", classes=("a", "b", "c", "d"), train_size=len(X) * reps, test_size=len(Xte),
        train_source_size=len(X) * reps, test_source_size=len(Xte), seed=0, integrity_checked=True, versions={},
    )
    split = lambda A: {"features.7": A[:, :64], "features.8": A[:, 64:]}  # noqa: E731
    with CacheWriter(path, meta) as w:
        for r in range(reps):
            w.append("train", (r + 1) * len(X), y, np.arange(r * len(X), (r + 1) * len(X)), split(X))
        w.append("test", len(Xte), yte, np.arange(len(Xte)), split(Xte))
        w.finish(skipped={})


def test_a_view_larger_than_the_memory_limit_fits_with_ridge(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA bounds mmap'd memory (numpy's large arrays) on Linux only")
    rng = np.random.default_rng(17)
    y = rng.permutation(np.arange(BIG_BLOCK) % 4)
    centers = rng.normal(size=(4, 128)).astype(np.float32)
    X = centers[y] + 4.0 * rng.standard_normal((BIG_BLOCK, 128), dtype=np.float32)
    # the answer, in memory, from one copy of the rows (test_alpha_is_a_strength_per_row: the same head)
    head = RidgeHead(alpha=0.1).fit(X, y)
    yte = rng.integers(0, 4, 4000)
    Xte = centers[yte] + 4.0 * rng.standard_normal((4000, 128), dtype=np.float32)
    s = np.sort(head.decision_function(Xte), axis=1)
    keep = s[:, -1] - s[:, -2] > 1e-3  # no near-ties, which float32 sums over a million rows could flip
    Xte, yte = Xte[keep], yte[keep]
    want = float(np.mean(head.predict(Xte) == yte))
    path = tmp_path / "long.h5"
    _write_tiled_cache(path, X, y, BIG_ROWS // BIG_BLOCK, Xte, yte)
    view_bytes = BIG_ROWS * 128 * 4
    assert view_bytes >= ALLOWANCE * 4 // 3  # a third more than the whole allowance

    one_thread = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    p = subprocess.run([sys.executable, "-c", LIMITED, str(path), str(ALLOWANCE)], capture_output=True, text=True,
                       timeout=240, env={**os.environ, **one_thread})
    out = p.stdout
    if out.startswith("UNSUPPORTED"):
        pytest.skip(f"RLIMIT_DATA cannot be set on this platform: {out.strip()}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "FIT EXIT 0" in out, out[-2000:] + p.stderr[-4000:]
    # (a) the ridge fit streamed the view within the limit, and its answer is the in-memory head's
    result = json.loads(out[out.index("{"):out.index("FIT EXIT")])
    assert result["head"] == "ridge" and result["dim"] == 128
    assert result["test_acc"] == want
    assert result["train_acc"] == pytest.approx(np.mean(head.predict(X) == y), abs=2 / BIG_BLOCK)
    # (b) the same limit refuses the view loaded in memory: the limit is real, and a fit that loaded it would fail
    assert "LOAD MemoryError" in out, out[-2000:]


# ---------------------------------------------------------------------------------------------- commands


def test_fit_command_with_alpha(small_cache):
    r = _run("fit", small_cache, "--head", "ridge", "--alpha", 0.5, "--features", "all")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("ridge head on 'all' (features.1, features.3; 40 dims)")
    epoch = lines[2].split()
    assert epoch[0] == "1" and epoch[1] == "—" and epoch[3] == "—", r.output  # no loss: scores, not probabilities
    d = json.loads(_run("fit", small_cache, "--head", "ridge", "--alpha", 0.5, "--features", "all", "--json").output)
    data = load_view(open_cache(small_cache), "all")
    head = RidgeHead(alpha=0.5).fit(data.X_train, data.y_train)
    assert d["params"] == {"alpha": 0.5} and d["epochs"][0]["train_loss"] is None and d["epochs"][0]["test_loss"] is None
    assert d["test_acc"] == float(np.mean(head.predict(data.X_test) == data.y_test))
    assert epoch[4] == f"{100 * d['test_acc']:.2f}"


@pytest.mark.parametrize("args, message", [
    (["--head", "ridge", "--alpha", "-1"], "Error: Invalid value for '--alpha': -1 is out of range; pass a number >= 0"),
    (["--head", "ridge", "--alpha", "nan"], "Error: Invalid value for '--alpha': 'nan' is not a finite number"),
    (["--head", "linear", "--alpha", "0.5"], "Error: --alpha does not apply to the linear head; it is an option of ridge"),
    (["--head", "ridge", "--C", "1"], "Error: --C does not apply to the ridge head; it is an option of logreg"),
])
def test_fit_command_refuses_bad_alpha(small_cache, args, message):
    r = _run("fit", small_cache, *args)
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 2 and len(errors) == 1 and errors[0].startswith(message), r.output
    assert "Traceback" not in r.output


def test_ablate_with_ridge(small_cache, tmp_path):
    r = _run("ablate", small_cache, "--views", "all,features.1", "--heads", "ridge", "--seeds", "0,1", "--alpha", 0.2,
             "--out", tmp_path / "abl")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "abl" / "results.json").read_text())["rows"]
    cache = open_cache(small_cache)
    assert sorted((row["view"], row["seed"]) for row in rows) == [("all", 0), ("all", 1), ("features.1", 0),
                                                                  ("features.1", 1)]
    for row in rows:
        Xtr, ytr = cache.view(row["view"], "train")
        Xte, yte = cache.view(row["view"], "test")
        head = RidgeHead(alpha=0.2).fit(Xtr, ytr)
        assert row["head"] == "ridge" and row["dim"] == Xtr.shape[1]
        assert row["test_acc"] == float(np.mean(head.predict(Xte) == yte))  # closed form: the same every seed
        assert row["train_acc"] == float(np.mean(head.predict(Xtr) == ytr))
        assert row["train_loss"] is None and row["test_loss"] is None


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, folder_root, weights_file) -> Path:
    """An image-folder cache at 32 px (features.13, features.18): its images are there for report, predict
    and export."""
    from fusion_cache.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("ridge-images") / "f.h5"
    extract(ExtractConfig(out=out, dataset="imagefolder", data_root=folder_root, train_size=None, test_size=None,
                          weights=str(weights_file), image_size=32, taps=("features.13", "features.18"),
                          batch_size=8, workers=0, progress=False))
    return out


def test_report_with_ridge(folder_cache, tmp_path):
    out = tmp_path / "r"
    r = _run("report", folder_cache, "--out", out, "--views", "early", "--heads", "ridge", "--seeds", "0,1",
             "--val-fraction", "0.2", "--no-pair-search")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    tuned = [row for row in rep["tuned"]["rows"] if row["head"] == "ridge"]
    assert [(row["view"], row["seed"]) for row in tuned] == [("early", 0), ("early", 1)]
    for row in tuned:
        assert row["alpha"] in GRID and list(row["grid"]) == [f"{a:g}" for a in GRID]
        assert all(0.0 <= acc <= 1.0 for acc in row["grid"].values())
        assert row["val_acc"] == row["grid"][f"{row['alpha']:g}"] == max(row["grid"].values())
        assert row["alpha"] == next(a for a in GRID if row["grid"][f"{a:g}"] == row["val_acc"])  # the first best


def test_predict_and_export_a_saved_ridge_head(folder_cache, folder_root, weights_file, tmp_path):
    import torch

    from fusion_cache.decode import read_image
    from fusion_cache.headfile import load_head

    r = _run("fit", folder_cache, "--head", "ridge", "--alpha", 0.3, "--features", "fused", "--out", tmp_path / "h")
    assert r.exit_code == 0, r.output
    head = load_head(tmp_path / "h")
    cache = open_cache(folder_cache)
    assert head.head == "ridge" and head.taps == ("features.13", "features.18") and head.classes == tuple(cache.classes)
    Xtr, ytr = cache.view("fused", "train")
    X, _ = cache.view("fused", "test")
    est = RidgeHead(alpha=0.3).fit(Xtr, ytr)
    assert_features_close(head.logits_from_features(X), est.decision_function(X), 1e-5, name="saved head")
    # predict on the test images: the classes of the saved head's logits on the cached features
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(folder_root / "test")).samples
    paths = [Path(samples[i][0]) for i in cache.indices("test")]
    r = _run("predict", tmp_path / "h", *paths, "--weights", weights_file, "--json")
    assert r.exit_code == 0, r.output
    got = {str(Path(it["path"]).resolve()): it["class"] for it in json.loads(r.stdout)}
    want = [head.classes[i] for i in head.logits_from_features(X).argmax(1)]
    assert [got[str(p.resolve())] for p in paths] == want
    # export: the program's logits on the preprocessed images are the head's on the cached features
    r = _run("export", tmp_path / "h", "--out", tmp_path / "model.pt2", "--weights", weights_file)
    assert r.exit_code == 0, r.output
    pre = head.preprocess
    x = torch.stack([pre.normalize(pre.resize(read_image(p))[None])[0] for p in paths])
    program = torch.export.load(str(tmp_path / "model.pt2"))
    with torch.no_grad():
        logits = program.module()(x).numpy()
    assert_features_close(logits, head.logits_from_features(X), FLOAT32, name="exported logits")
