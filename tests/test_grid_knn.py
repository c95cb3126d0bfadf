"""The stacked L2 grid (grid.py), the kNN head and the head registry (heads.py), on tiny synthetic data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from sklearn.utils.estimator_checks import parametrize_with_checks

from fusion_cache.errors import FusionCacheError
from fusion_cache.grid import Eigenbasis, FitDivergedError, feature_covariance, fit_l2_grid, grid_accuracy, refit_l2
from fusion_cache.heads import HEAD_SPECS, HEADS, KNNHead, LinearHead, linear_form

GRID = HEAD_SPECS["linear"].grid  # 1e-1 ... 1e-4, strongest first


def blobs(n=300, d=5, k=3, noise=2.0, seed=1):
    """Overlapping Gaussian classes, standardized: every weight decay of the grid has a well-defined optimum."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, d))[y] + noise * rng.normal(size=(n, d))
    X = (X - X.mean(0)) / X.std(0)
    return X.astype(np.float32), y


def linear_head_alone(X, y, wd):
    """LinearHead fitted alone, from the grid's start (zeros). Its default random start would leave a component
    along 'add one vector to every class row', where the loss curves only by wd: not converged at wd = 1e-4."""
    k = len(np.unique(y))
    h = LinearHead(solver="lbfgs", standardize=False, weight_decay=wd, max_iter=10_000, warm_start=True)
    h.coef_, h.intercept_ = np.zeros((k, X.shape[1]), np.float32), np.zeros(k, np.float32)
    return h.fit(X, y)


def reference_objective(X, y, W, b, wd, w=None):
    """The grid's objective in float64 from its definition: (loss, gradient of W (k, d), of b (k,), softmax
    (n, k)); w: the rows' weights, summing to 1 (None: the mean over all rows)."""
    X = X.astype(np.float64)
    n = len(X)
    w = np.full(n, 1.0 / n) if w is None else np.asarray(w, np.float64)
    Z = X @ W.T + b
    lse = logsumexp(Z, axis=1)
    P = np.exp(Z - lse[:, None])
    R = P.copy()
    R[np.arange(n), y] -= 1
    R *= w[:, None]
    loss = (w * (lse - Z[np.arange(n), y])).sum() + 0.5 * wd * (W**2).sum()
    return loss, R.T @ X + wd * W, R.sum(0), P


def reference_fit(X, y, k, wd):
    """The objective minimized in float64 by scipy, to 1e-12 on the gradient."""
    X = X.astype(np.float64)
    d = X.shape[1]

    def fun(theta):
        loss, gW, gb, _ = reference_objective(X, y, theta[: k * d].reshape(k, d), theta[k * d :], wd)
        return loss, np.concatenate([gW.ravel(), gb])

    r = minimize(fun, np.zeros(k * d + k), jac=True, method="L-BFGS-B",
                 options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 20_000, "maxcor": 30})
    return r.x[: k * d].reshape(k, d), r.x[k * d :]


# ---------------------------------------------------------------------------------------------- the grid


def test_each_stacked_head_equals_linearhead_alone():
    # LinearHead's float32 torch L-BFGS stops where its loss stops changing in float32: on many draws that is
    # 1e-4 to 7e-4 from the optimum (the grid is checked against a float64 optimum below); on this draw
    # it lands within 4e-5 of it, so the comparison at 1e-4 tests the grid, not LinearHead's stopping rule.
    X, y = blobs(600, 4, 4, 4.0, seed=1)
    Xfit, yfit, Xval, yval = X[:480], y[:480], X[480:], y[480:]
    fit = fit_l2_grid(Xfit, yfit, 4, GRID, tol=1e-6)
    assert fit.converged.all()
    assert fit.coef.shape == (len(GRID), 4, 4) and fit.intercept.shape == (len(GRID), 4)
    assert fit.coef.dtype == np.float32
    val_lh = []
    for g, wd in enumerate(GRID):
        h = linear_head_alone(Xfit, yfit, wd)
        np.testing.assert_allclose(fit.coef[g], h.coef_, atol=1e-4, rtol=0, err_msg=f"weight decay {wd}")
        np.testing.assert_allclose(fit.intercept[g], h.intercept_, atol=1e-4, rtol=0, err_msg=f"weight decay {wd}")
        val_lh.append(h.score(Xval, yval))
    val_grid = grid_accuracy(fit, Xval, yval)
    np.testing.assert_allclose(val_grid, val_lh)
    assert int(np.argmax(val_grid)) == int(np.argmax(val_lh))


@pytest.mark.parametrize("precondition, refresh", [(True, 0), (False, 0), (True, 3)])
@pytest.mark.parametrize("n, d, k, noise, wds", [
    (300, 5, 3, 2.0, GRID),
    (200, 4, 2, 1.5, (1e-2, 0.0)),  # binary, and no penalty (the data overlap, so the optimum exists)
    (400, 8, 4, 3.0, (3e-3, 1.0, 1e-3)),  # any order
])
def test_each_stacked_head_reaches_its_own_optimum(n, d, k, noise, wds, precondition, refresh):
    X, y = blobs(n, d, k, noise, seed=2)
    X[:, 1] = 0.6 * X[:, 0] + 0.8 * X[:, 1]  # correlated features (r = 0.6), as pooled CNN features are
    fit = fit_l2_grid(X, y, k, wds, tol=1e-6, precondition=precondition, refresh=refresh)
    assert fit.converged.all()
    assert fit.weight_decays == tuple(wds)
    for g, wd in enumerate(wds):
        W, b = reference_fit(X, y, k, wd)
        np.testing.assert_allclose(fit.coef[g], W, atol=3e-5, rtol=0, err_msg=f"weight decay {wd}")
        np.testing.assert_allclose(fit.intercept[g], b, atol=3e-5, rtol=0, err_msg=f"weight decay {wd}")


def test_heads_do_not_influence_each_other():
    X, y = blobs(seed=3)
    together = fit_l2_grid(X, y, 3, GRID, tol=1e-6)
    for g, wd in enumerate(GRID):
        alone = fit_l2_grid(X, y, 3, [wd], tol=1e-6)
        np.testing.assert_allclose(together.coef[g], alone.coef[0], atol=2e-5, rtol=0)
        assert abs(int(together.n_iter[g]) - int(alone.n_iter[0])) <= 2  # own history, own stopping test
    assert len(set(together.n_iter.tolist())) > 1  # heads stop on their own, not all together


def test_warm_refit_equals_cold_fit():
    X, y = blobs(n=400, seed=4)
    fit = fit_l2_grid(X[:300], y[:300], 3, GRID, tol=1e-6)
    g = 3
    warm = refit_l2(X, y, 3, GRID[g], init=fit.head(g), tol=1e-6)
    cold = refit_l2(X, y, 3, GRID[g], tol=1e-6)
    assert warm.converged[0] and cold.converged[0]
    np.testing.assert_allclose(warm.coef, cold.coef, atol=2e-5, rtol=0)
    np.testing.assert_allclose(warm.intercept, cold.intercept, atol=2e-5, rtol=0)
    assert warm.n_iter[0] <= cold.n_iter[0]
    # the start is used: one iteration from the grid's head lands nearer the optimum than one from zeros
    one_warm = refit_l2(X, y, 3, GRID[g], init=fit.head(g), max_iter=1)
    one_cold = refit_l2(X, y, 3, GRID[g], max_iter=1)
    assert np.abs(one_warm.coef - cold.coef).max() < 0.2 * np.abs(one_cold.coef - cold.coef).max()
    # started at its own optimum, a head has nothing left to do
    again = refit_l2(X, y, 3, GRID[g], init=cold.head(0), tol=1e-4)
    assert again.n_iter[0] <= 1


def test_a_shared_covariance_gives_the_same_heads():
    X, y = blobs(seed=6)
    own = fit_l2_grid(X, y, 3, GRID, tol=1e-6)
    shared = fit_l2_grid(X, y, 3, GRID, tol=1e-6, precondition=feature_covariance(X))
    np.testing.assert_array_equal(own.coef, shared.coef)
    plain = fit_l2_grid(X, y, 3, GRID, tol=1e-6, precondition=False)
    np.testing.assert_allclose(plain.coef, own.coef, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\(5, 5\) covariance"):
        fit_l2_grid(X, y, 3, GRID, precondition=np.eye(4, dtype=np.float32))


def test_a_fit_in_the_eigenbasis_is_the_same_fit():
    # selection.py rotates a view once and fits every grid in the rotated basis: the heads it gets, rotated
    # back, are those of the fit that rotates internally, and both are the optimum
    X, y = blobs(n=400, d=6, seed=7)
    X[:, 2] = 0.7 * X[:, 0] + 0.3 * X[:, 2]
    basis = Eigenbasis.of(X)
    inside = fit_l2_grid(X, y, 3, GRID, tol=1e-6, precondition=basis)
    Xr = basis.rotate(torch.from_numpy(X))
    outside = fit_l2_grid(Xr, y, 3, GRID, tol=1e-6, precondition=basis, rotated=True)
    back = basis.unrotate(torch.from_numpy(outside.coef)).numpy()
    np.testing.assert_allclose(back, inside.coef, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outside.intercept, inside.intercept, atol=1e-5, rtol=0)
    for g, wd in enumerate(GRID):
        W, b = reference_fit(X, y, 3, wd)
        np.testing.assert_allclose(back[g], W, atol=3e-5, rtol=0, err_msg=f"weight decay {wd}")
    # a warm start is given in the basis too: from the optimum, nothing is left to do
    again = refit_l2(Xr, y, 3, GRID[2], init=outside.head(2), tol=1e-4, precondition=basis, rotated=True)
    assert again.n_iter[0] <= 1
    with pytest.raises(ValueError, match="rotated=True needs"):
        fit_l2_grid(Xr, y, 3, GRID, rotated=True)
    with pytest.raises(ValueError, match="for 6 features, X has 5"):
        fit_l2_grid(X[:, :5], y, 3, GRID, precondition=basis)


def test_the_jacobi_refresh_reaches_the_same_heads():
    # weak penalties on strongly separable, correlated data are where the fixed start-curvature preconditioner
    # is worst; refreshing it from the Hessian's diagonal must not cost iterations there
    X, y = blobs(n=600, d=8, k=4, noise=1.5, seed=8)
    X[:, 1] = 0.8 * X[:, 0] + 0.2 * X[:, 1]
    fixed = fit_l2_grid(X, y, 4, [3e-3, 3e-4], tol=1e-6)
    fresh = fit_l2_grid(X, y, 4, [3e-3, 3e-4], tol=1e-6, refresh=5)
    assert fixed.converged.all() and fresh.converged.all()
    np.testing.assert_allclose(fresh.coef, fixed.coef, atol=1e-4, rtol=0)
    assert fresh.n_iter.sum() <= fixed.n_iter.sum()


def test_max_iter_is_reported_as_not_converged():
    X, y = blobs()
    fit = fit_l2_grid(X, y, 3, [1e-3], max_iter=2, tol=1e-8)
    assert fit.n_iter[0] == 2 and not fit.converged[0] and fit.grad_max[0] > 1e-8


def test_grid_accepts_torch_tensors_and_numpy_alike():
    X, y = blobs()
    a = fit_l2_grid(X, y, 3, [1e-2], tol=1e-6)
    b = fit_l2_grid(torch.from_numpy(X), torch.from_numpy(y), 3, [1e-2], tol=1e-6)
    np.testing.assert_array_equal(a.coef, b.coef)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_grid_on_cuda_matches_cpu():
    X, y = blobs()
    cpu = fit_l2_grid(X, y, 3, GRID, tol=1e-6)
    gpu = fit_l2_grid(X, y, 3, GRID, tol=1e-6, device="cuda")
    np.testing.assert_allclose(gpu.coef, cpu.coef, atol=5e-5, rtol=0)


@pytest.mark.parametrize("wds, match", [
    ([], "grid is empty"),
    ((), "grid is empty"),
    ([1e-2, -1e-3], "finite and >= 0"),
    ([float("nan")], "finite and >= 0"),
    ([float("inf"), 1e-2], "finite and >= 0"),
])
def test_bad_grid_is_refused(wds, match):
    X, y = blobs()
    with pytest.raises(ValueError, match=match):
        fit_l2_grid(X, y, 3, wds)


def test_bad_inputs_are_refused():
    X, y = blobs()
    with pytest.raises(ValueError, match="float32"):
        fit_l2_grid(X.astype(np.float64), y, 3, [1e-2])
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):
        fit_l2_grid(X, y, 2, [1e-2])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_l2_grid(bad, y, 3, [1e-2])
    with pytest.raises(ValueError, match="init coef must have shape"):
        fit_l2_grid(X, y, 3, [1e-2, 1e-3], init=(np.zeros((3, 3, 5)), np.zeros((3, 3))))


def test_a_diverged_fit_is_an_error():
    X, y = blobs()
    huge = np.full((3, 5), 1e37, np.float32), np.zeros(3, np.float32)  # logits overflow to inf
    with pytest.raises(FitDivergedError, match="diverged") as e:
        refit_l2(X, y, 3, 1e-2, init=huge)
    assert isinstance(e.value, FusionCacheError) and isinstance(e.value, FloatingPointError)


# ---------------------------------------------------------------------------------------------- kNN


def test_knn_separates_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10]], np.float32)
    y = np.repeat(np.array(["cat", "dog", "eel"]), 30)
    X = centers[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 3)).astype(np.float32)
    Xq = centers + 0.5 * rng.normal(size=(3, 3)).astype(np.float32)
    for standardize in (True, False):
        head = KNNHead(k=10, standardize=standardize).fit(X, y)
        np.testing.assert_array_equal(head.predict(Xq), ["cat", "dog", "eel"])
        assert head.score(X, y) == 1.0
        np.testing.assert_allclose(head.predict_proba(Xq).sum(1), 1.0, rtol=1e-6)


def _ray(deg, r=1.0):
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


def test_knn_weighted_vote_by_hand():
    # Query along 0 degrees. Class 1 has the single nearest point (5 degrees); class 0 has two at +-30 degrees.
    # With k=3 the majority is class 0, but the weights exp(cos / 0.07) make class 1 win. Norms do not matter.
    X = np.array([_ray(5, 3.0), _ray(30, 0.5), _ray(-30, 7.0), _ray(150), _ray(180, 2.0)], np.float32)
    y = np.array([1, 0, 0, 0, 1])
    q = np.array([_ray(0, 4.0)], np.float32)
    w = lambda deg: math.exp(math.cos(math.radians(deg)) / 0.07)  # noqa: E731
    head = KNNHead(k=3, standardize=False).fit(X, y)
    p1 = w(5) / (w(5) + 2 * w(30))
    np.testing.assert_allclose(head.predict_proba(q), [[1 - p1, p1]], rtol=1e-5)
    assert head.predict(q)[0] == 1
    five = KNNHead(k=5, standardize=False).fit(X, y)
    v0, v1 = 2 * w(30) + w(150), w(5) + w(180)
    np.testing.assert_allclose(five.predict_proba(q), [[v0 / (v0 + v1), v1 / (v0 + v1)]], rtol=1e-5)
    flat = KNNHead(k=3, standardize=False, temperature=1e6).fit(X, y)  # near-equal weights: plain majority
    assert flat.predict(q)[0] == 0
    one = KNNHead(k=1, standardize=False).fit(X, y)
    np.testing.assert_array_equal(one.predict_proba(q), [[0.0, 1.0]])


def test_knn_scores_several_k_at_once():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int) + (X[:, 1] > 0.5)
    Xq = rng.normal(size=(57, 6)).astype(np.float32)
    yq = (Xq[:, 0] > 0).astype(int) + (Xq[:, 1] > 0.5)
    ks = (1, 3, 10, 50, 200)
    head = KNNHead(k=200, batch_size=16).fit(X, y)
    together = head.predict_ks(Xq, ks)
    scores = head.score_ks(Xq, yq, ks)
    differ = 0
    for k in ks:
        alone = KNNHead(k=k).fit(X, y).predict(Xq)
        np.testing.assert_array_equal(together[k], alone, err_msg=f"k={k}")
        assert scores[k] == np.mean(alone == yq)
        differ += not np.array_equal(together[k], together[1])
    assert differ  # the k really change the answer on this data


def test_knn_batches_do_not_change_the_answer():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(120, 4)).astype(np.float32), rng.integers(0, 3, 120)
    Xq = rng.normal(size=(33, 4)).astype(np.float32)
    big = KNNHead(k=7, batch_size=1024).fit(X, y).predict_proba(Xq)
    small = KNNHead(k=7, batch_size=5).fit(X, y).predict_proba(Xq)
    np.testing.assert_allclose(small, big, rtol=1e-5)


def test_knn_k_larger_than_train_set():
    X, y = blobs(n=30)
    with pytest.raises(ValueError, match=r"k=50 is larger than the training set \(30 samples\)"):
        KNNHead(k=50).fit(X, y)
    head = KNNHead(k=5).fit(X, y)
    with pytest.raises(ValueError, match=r"k=31 is larger than the training set \(30 samples\)"):
        head.predict_ks(X, [5, 31])


@parametrize_with_checks([KNNHead(k=5), KNNHead(k=3, standardize=False, batch_size=7)])
def test_knn_sklearn_estimator_contract(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------------------------------- registry


def test_registry_declares_each_head_once():
    assert HEADS == tuple(HEAD_SPECS) and set(HEADS) == {"linear", "logreg", "knn", "ridge"}
    assert HEAD_SPECS["ridge"].tuned == "alpha" and HEAD_SPECS["ridge"].streams and len(HEAD_SPECS["ridge"].grid) == 33
    assert HEAD_SPECS["linear"].tuned == "weight_decay" and GRID == (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)
    assert HEAD_SPECS["logreg"].tuned == "C" and HEAD_SPECS["logreg"].grid == (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    assert HEAD_SPECS["knn"].tuned == "k" and HEAD_SPECS["knn"].grid == (10, 20, 50, 100, 200)
    for spec in HEAD_SPECS.values():
        assert spec.tuned in spec.options
        est = spec.build_tuned(spec.grid[0], seed=3)
        assert est.get_params()[spec.tuned if spec.name != "logreg" else f"logisticregression__{spec.tuned}"] == \
            spec.grid[0]
    lin = HEAD_SPECS["linear"].build_tuned(1e-2, seed=3)
    assert isinstance(lin, LinearHead) and lin.solver == "lbfgs" and lin.standardize and lin.random_state == 3
    assert isinstance(HEAD_SPECS["knn"].build(k=7), KNNHead)
    with pytest.raises(ValueError, match="takes no option 'C'"):
        HEAD_SPECS["knn"].build(C=1.0)


def test_linear_form_of_knn_is_refused_and_linear_heads_keep_theirs():
    X, y = blobs(n=60)
    with pytest.raises(TypeError, match="kNN head has no linear form"):
        linear_form(KNNHead(k=5).fit(X, y))
    h = LinearHead(solver="lbfgs", weight_decay=1e-2).fit(X, y)
    form = linear_form(h)
    np.testing.assert_array_equal(form["coef"], h.coef_)
    logreg = HEAD_SPECS["logreg"].build(C=0.1).fit(X, y)
    assert linear_form(logreg)["coef"].shape == (3, 5)


@pytest.mark.parametrize("precondition", [True, False])
def test_masked_heads_equal_heads_on_their_own_columns(precondition):
    # the pair search's stacked candidates: head g sees columns shared + own[g]; each must equal the head fitted
    # alone on exactly those columns, with zeros elsewhere
    X, y = blobs(n=400, d=7, seed=9)
    shared, own = [5, 6], [[0], [1, 2], [3, 4], []]
    masks = np.zeros((len(own), 7), dtype=bool)
    for g, cols in enumerate(own):
        masks[g, cols + shared] = True
    if precondition:  # as best_pair: each block rotated into its own eigenbasis, the fit in that basis
        parts = [Eigenbasis.of(np.ascontiguousarray(X[:, b])) for b in ([0], [1, 2], [3, 4], [5, 6])]
        basis = Eigenbasis(torch.block_diag(*[p.V for p in parts]), torch.cat([p.lam for p in parts]))
        fit = fit_l2_grid(basis.rotate(torch.from_numpy(X)), y, 3, [1e-2] * len(own), tol=1e-6, masks=masks,
                          precondition=basis, rotated=True)
        fit = dataclasses.replace(fit, coef=basis.unrotate(torch.from_numpy(fit.coef)).numpy())
        with pytest.raises(ValueError, match="masks need"):
            fit_l2_grid(X, y, 3, [1e-2] * len(own), masks=masks, precondition=basis)
    else:
        fit = fit_l2_grid(X, y, 3, [1e-2] * len(own), tol=1e-6, masks=masks, precondition=False)
    assert fit.converged.all()
    for g, cols in enumerate(own):
        use = sorted(cols + shared)
        alone = fit_l2_grid(np.ascontiguousarray(X[:, use]), y, 3, [1e-2], tol=1e-6, precondition=False)
        np.testing.assert_allclose(fit.coef[g][:, use], alone.coef[0], atol=3e-5, rtol=0, err_msg=f"head {g}")
        np.testing.assert_allclose(fit.intercept[g], alone.intercept[0], atol=3e-5, rtol=0)
        assert np.abs(fit.coef[g][:, ~masks[g]]).max(initial=0) < 1e-6
    with pytest.raises(ValueError, match=r"masks must be \(4, 7\) bools"):
        fit_l2_grid(X, y, 3, [1e-2] * 4, masks=masks[:, :6], precondition=False)


@pytest.mark.parametrize("precondition", [True, False])
def test_heads_on_row_subsets_equal_heads_fitted_on_those_rows(precondition):
    # selection.py's seeds: each grid head fits only its own seed's fit rows, all heads sharing each pass
    X, y = blobs(n=400, seed=10)
    rng = np.random.default_rng(0)
    subsets = [rng.permutation(400)[:320] for _ in range(3)]
    rows = np.zeros((3, 400), dtype=bool)
    for g, r in enumerate(subsets):
        rows[g, r] = True
    wds = [1e-2, 1e-3, 1e-2]
    fit = fit_l2_grid(X, y, 3, wds, tol=1e-6, rows=rows, precondition=precondition)
    assert fit.converged.all()
    for g, r in enumerate(subsets):
        alone = fit_l2_grid(X[np.sort(r)], y[np.sort(r)], 3, [wds[g]], tol=1e-6, precondition=precondition)
        np.testing.assert_allclose(fit.coef[g], alone.coef[0], atol=3e-5, rtol=0, err_msg=f"head {g}")
        np.testing.assert_allclose(fit.intercept[g], alone.intercept[0], atol=3e-5, rtol=0)
        np.testing.assert_allclose(fit.loss[g], alone.loss[0], rtol=1e-6)
    assert np.abs(fit.coef[0] - fit.coef[2]).max() > 1e-3  # same weight decay, other rows: another head
    with pytest.raises(ValueError, match=r"rows must be \(3, 400\) bools"):
        fit_l2_grid(X, y, 3, wds, rows=rows[:, :10])
    rows[1] = False
    with pytest.raises(ValueError, match="head 1 has no rows"):
        fit_l2_grid(X, y, 3, wds, rows=rows)


# ---------------------------------------------------------------------------------------------- one pass, in blocks


def _reference_pass(X, y, k, theta, wd, weights=None):
    """Loss, gradient and row curvature of every head in float64 numpy, from the definitions."""
    d = X.shape[1]
    out = []
    for h in range(theta.shape[0]):
        th = theta[h].reshape(k, d + 1).astype(np.float64)
        loss, gW, gb, P = reference_objective(X, y, th[:, :d], th[:, d], wd[h],
                                              None if weights is None else weights[:, h])
        out.append((loss, np.concatenate([gW, gb[:, None]], axis=1).ravel(), (P * (1 - P)).sum(1) / k))
    return out


@pytest.mark.parametrize("design", ["dense", "masked"])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_pass_in_row_blocks_equals_the_definition(design, weighted):
    from fusion_cache.grid import _Dense, _Masked, _objective

    X, y = blobs(n=203, d=6, k=3, seed=12)
    rng = np.random.default_rng(3)
    B, k, d = 3, 3, 6
    theta = rng.normal(size=(B, k * (d + 1))).astype(np.float32)
    wd = np.array([1e-2, 1e-3, 0.0])
    masks = np.ones((B, d), dtype=bool)
    if design == "masked":
        masks[0, :2] = masks[1, 2:4] = False
        theta.reshape(B, k, d + 1)[:, :, :d] *= masks[:, None, :]
    weights = None
    if weighted:
        rows = rng.random((B, len(y))) < 0.7
        weights = (rows / rows.sum(1, keepdims=True)).T.astype(np.float32)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y).long()
    onehot = torch.nn.functional.one_hot(yt, k).float()
    des = _Dense(Xt) if design == "dense" else _Masked(Xt, torch.from_numpy(masks))
    ref = _reference_pass(X, y, k, theta, wd, weights)
    for block in (None, 37, 1):
        loss, grad, curv = _objective(des, yt, onehot, torch.from_numpy(theta), torch.tensor(wd, dtype=torch.float32),
                                      torch.arange(B), None if weights is None else torch.from_numpy(weights), block,
                                      curvature=True)
        for h, (l_ref, g_ref, c_ref) in enumerate(ref):
            np.testing.assert_allclose(float(loss[h]), l_ref, rtol=1e-6, err_msg=f"block {block} head {h}")
            got = grad[h].numpy().reshape(k, d + 1)
            want = g_ref.reshape(k, d + 1)
            cols = np.append(masks[h], True)  # a masked head's gradient outside its columns is not used
            np.testing.assert_allclose(got[:, cols], want[:, cols], atol=1e-6, rtol=1e-5)
            np.testing.assert_allclose(curv[:, h].numpy(), c_ref, atol=1e-6, rtol=1e-5)
    loss, grad, curv = _objective(des, yt, onehot, torch.from_numpy(theta), torch.tensor(wd, dtype=torch.float32),
                                  torch.arange(B), None, 37)
    assert curv is None


def test_a_fit_in_row_blocks_equals_the_fit_in_one_pass(monkeypatch):
    # on CPU each evaluation runs over X in blocks that stay in cache; tiny data fit in one block, so force
    # blocks that do not divide the rows, with the Jacobi refresh (which reuses the blocks' curvature)
    from fusion_cache import grid

    X, y = blobs(n=500, d=6, k=4, noise=1.5, seed=13)
    one = fit_l2_grid(X, y, 4, GRID, tol=1e-6, refresh=5)
    monkeypatch.setattr(grid, "_row_block", lambda X: 61)
    blocked = fit_l2_grid(X, y, 4, GRID, tol=1e-6, refresh=5)
    assert one.converged.all() and blocked.converged.all()
    np.testing.assert_allclose(blocked.coef, one.coef, atol=1e-4, rtol=0)
    np.testing.assert_allclose(blocked.intercept, one.intercept, atol=1e-4, rtol=0)
    np.testing.assert_allclose(blocked.loss, one.loss, rtol=1e-6)


def test_the_refresh_from_an_evaluations_curvature_equals_a_fresh_pass():
    from fusion_cache.grid import _Dense, _DiagonalPreconditioner, _objective

    X, y = blobs(n=150, d=5, k=3, seed=14)
    rng = np.random.default_rng(4)
    theta = torch.from_numpy(rng.normal(size=(2, 3 * 6)).astype(np.float32))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y).long()
    wd = torch.tensor([1e-2, 1e-3])
    basis = Eigenbasis.of(Xt)
    pre = _DiagonalPreconditioner(basis.lam, torch.tensor([0.2, 0.2]), wd, 3)
    des, ids = _Dense(Xt), torch.arange(2)
    _, _, curv = _objective(des, yt, torch.nn.functional.one_hot(yt, 3).float(), theta, wd, ids, None, 40,
                            curvature=True)
    np.testing.assert_allclose(pre.jacobi(des, Xt, theta, ids, curv=curv).numpy(),
                               pre.jacobi(des, Xt, theta, ids).numpy(), rtol=1e-5)


def test_the_fit_refreshes_with_the_curvature_of_its_current_heads(monkeypatch):
    # the loop hands the refresh the curvature its line search kept: it must be that of the heads it refreshes at
    from fusion_cache.grid import _DiagonalPreconditioner

    real = _DiagonalPreconditioner.jacobi
    reused = []

    def spy(self, design, X, theta, idx, weights=None, curv=None):
        if curv is not None:
            np.testing.assert_allclose(real(self, design, X, theta, idx, weights, curv).numpy(),
                                       real(self, design, X, theta, idx, weights).numpy(), rtol=1e-4)
            reused.append(len(idx))
        return real(self, design, X, theta, idx, weights, curv)

    monkeypatch.setattr(_DiagonalPreconditioner, "jacobi", spy)
    X, y = blobs(n=500, d=6, k=4, noise=1.5, seed=13)
    fit = fit_l2_grid(X, y, 4, GRID, tol=1e-6, refresh=3)
    assert fit.converged.all() and reused  # refreshes happened, from kept curvature
