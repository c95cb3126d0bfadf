"""The tuned protocol against references computed here: every head's choice is the first best validation
accuracy, recomputed from the validation rows with solvers of its own (float64 Newton for linear, scikit-learn's
LogisticRegression for logreg, a numpy kNN vote); validation, never the fit rows, decides; standardization
uses the train split's statistics only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression

from fusion_cache.cache import open_cache
from fusion_cache.heads import HEAD_SPECS
from fusion_cache.selection import BRACKET, ViewStore, tune_heads, validation_split

from .conftest import write_synthetic_cache
from .features import train_stats

TAP = "features.3"  # 24 columns wide: the views of these tests are this one tap
VAL = 0.3
TEMPERATURE = 0.07  # the kNN vote's exp(sim / T), as KNNHead's default


# ---------------------------------------------------------------------------------------------- references


def newton_softmax(X: np.ndarray, y: np.ndarray, k: int, wd: float) -> np.ndarray:
    """(k, d + 1) [W | b] minimizing mean cross-entropy + wd / 2 ||W||^2 (the bias unpenalized), by damped
    Newton steps in float64 to a gradient of 1e-12."""
    n, d = X.shape
    A = np.hstack([np.asarray(X, np.float64), np.ones((n, 1))])
    Y = np.eye(k)[y]
    reg = np.append(np.full(d, wd), 0.0)

    def loss(P):
        Z = A @ P.T
        return (logsumexp(Z, axis=1) - (Z * Y).sum(1)).mean() + 0.5 * wd * (P[:, :d] ** 2).sum()

    P = np.zeros((k, d + 1))
    for _ in range(100):
        Z = A @ P.T
        prob = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
        G = (prob - Y).T @ A / n + P * reg
        if np.abs(G).max() < 1e-12:
            break
        D = np.einsum("ia,ab->iab", prob, np.eye(k)) - np.einsum("ia,ib->iab", prob, prob)
        H = np.einsum("iab,ij,il->ajbl", D, A, A).reshape(k * (d + 1), k * (d + 1)) / n + np.diag(np.tile(reg, k))
        step = np.linalg.lstsq(H, G.ravel(), rcond=None)[0].reshape(k, d + 1)  # H is singular along b + c
        t, f0 = 1.0, loss(P)
        while loss(P - t * step) > f0 - 1e-4 * t * (G * step).sum() and t > 1e-12:
            t /= 2
        P = P - t * step
    return P


def linear_logits(Xs, y, fit, k, wd) -> np.ndarray:
    P = newton_softmax(Xs[fit], y[fit], k, wd)
    return Xs @ P[:, :-1].T + P[:, -1]


def logreg_logits(Xs, y, fit, C) -> np.ndarray:
    z = LogisticRegression(C=C, tol=1e-8, max_iter=10000).fit(Xs[fit], y[fit]).decision_function(Xs)
    return np.stack([-z, z], 1) if z.ndim == 1 else z


def knn_votes(X_fit, y_fit, X_query, ks, k_classes) -> dict[int, np.ndarray]:
    """Weighted kNN by hand: standardize with the fit rows' statistics, L2-normalize, cosine similarity,
    the k most similar fit rows vote exp(sim / T) for their class."""
    mean, scale = train_stats(X_fit)

    def unit(A):
        A = (np.asarray(A, np.float64) - mean) / scale
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    sims = unit(X_query) @ unit(X_fit).T
    order = np.argsort(-sims, axis=1, kind="stable")
    out = {}
    for k in ks:
        idx = order[:, :k]
        votes = np.zeros((len(X_query), k_classes))
        np.add.at(votes, (np.repeat(np.arange(len(X_query)), k), y_fit[idx].ravel()),
                  np.exp(np.take_along_axis(sims, idx, 1) / TEMPERATURE).ravel())
        out[k] = votes
    return out


# How far a tuned head's logits may lie from the exact optimum's. The stacked grid stops at a gradient
# tolerance (selection.ROTATED_TOL), so along weakly curved directions its coefficients are off by about
# tol / weight decay: measured on these data sets, every logit within 1.2e-4 / wd of the float64 optimum (0.31
# at wd 1e-4). A margin (a difference of two logits) within 1e-3 / wd of zero, 4 times the worst case, may fall
# either way; farther from zero its sign is the reference's. kNN votes: float32 against float64 similarities.
LOGIT_SLACK = 1e-3
VOTE_SLACK = 1e-4  # relative to the top vote


def weight_decay(head: str, value: float, n_fit: int) -> float:
    """logreg's C as the weight decay on the mean loss: C sum(CE) + ||W||^2 / 2 = n C (mean CE + ||W||^2 / (2 n C))."""
    return value if head == "linear" else 1.0 / (n_fit * value)


def margins(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's score for its own class minus the best other class's: positive when right."""
    own = Z[np.arange(len(y)), y]
    other = np.where(np.eye(Z.shape[1], dtype=bool)[y], -np.inf, Z).max(1)
    return own - other


@dataclass
class Scores:
    """Accuracy per grid value, exact (the reference's), and its bounds when rows within `slack` of a
    decision boundary may fall either way."""

    exact: list[float]
    lo: list[float]
    hi: list[float]

    @classmethod
    def of(cls, margin_rows: list[np.ndarray], slacks: list[float]) -> Scores:
        return cls([float(np.mean(m > 0)) for m in margin_rows],
                   [float(np.mean(m > s)) for m, s in zip(margin_rows, slacks)],
                   [float(np.mean(m > -s)) for m, s in zip(margin_rows, slacks)])

    def choices(self) -> set[int]:
        """The grid positions the first best can take with each accuracy anywhere in its bounds: position c
        beats every earlier value strictly and ties or beats every later one."""
        G = len(self.lo)
        return {c for c in range(G) if all(self.hi[c] > self.lo[g] for g in range(c))
                and all(self.hi[c] >= self.lo[g] for g in range(c + 1, G))}


def reference_scores(X, y, head, grid, fit, val, k_classes) -> tuple[Scores, Scores]:
    """(validation, fit rows) accuracy of each grid value, computed here: linear and logreg on features
    standardized with the whole train split's statistics (as the protocol does), fitted on the fit rows;
    knn voting among the fit rows."""
    if head == "knn":
        rows = {}
        for name, query in (("val", val), ("fit", fit)):
            votes = knn_votes(X[fit], y[fit], X[query], grid, k_classes)
            rows[name] = [margins(votes[k], y[query]) / votes[k].max(1) for k in grid]
        return Scores.of(rows["val"], [VOTE_SLACK] * len(grid)), Scores.of(rows["fit"], [VOTE_SLACK] * len(grid))
    mean, scale = train_stats(X)
    Xs = (np.asarray(X, np.float64) - mean) / scale
    on_val, on_fit, slacks = [], [], []
    for value in grid:
        Z = linear_logits(Xs, y, fit, k_classes, value) if head == "linear" else logreg_logits(Xs, y, fit, value)
        on_val.append(margins(Z[val], y[val]))
        on_fit.append(margins(Z[fit], y[fit]))
        slacks.append(LOGIT_SLACK / weight_decay(head, value, len(fit)))
    return Scores.of(on_val, slacks), Scores.of(on_fit, slacks)


def first_best(scores) -> int:
    """The protocol's rule: the first of the best (grids run strongest regularization first)."""
    return int(np.flatnonzero(np.asarray(scores) == max(scores))[0])


# ---------------------------------------------------------------------------------------------- data


def blobs(seed, n, d, k, sep, label_noise=0.0):
    """k Gaussian classes in d columns, each column then given its own scale (0.1 to 10) and offset (+-50), so
    that standardization matters."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, d))[y] * sep + rng.normal(size=(n, d))
    y = np.where(rng.random(n) < label_noise, rng.integers(0, k, n), y)
    X = X * rng.uniform(0.1, 10, d) + rng.uniform(-50, 50, d)
    return X.astype(np.float32), y.astype(np.int64)


def one_tap_cache(path, X_train, y_train, X_test, y_test, k):
    return write_synthetic_cache(path, {"train": {TAP: X_train}, "test": {TAP: X_test}},
                                 {"train": y_train, "test": y_test}, [f"c{i}" for i in range(k)])


# Each head's data: 3 overlapping classes whose grid values differ in validation accuracy, and where some seed's
# choice on the fit rows cannot be its choice on validation.
ORACLE_DATA = {"linear": dict(seed=1, n=60, sep=0.5), "logreg": dict(seed=2, n=60, sep=0.8),
               "knn": dict(seed=2, n=120, sep=0.35)}


def check_run(run, head, grid, val_scores: Scores, n_train: int) -> None:
    """The run's validation accuracies are the reference's (within the bounds of rows on a boundary), its
    choice is the first best of them and one the reference allows, and the refit head is at that value."""
    if head == "knn":
        assert run.estimator.k == run.value
    else:  # refit on all train rows: logreg's C as a weight decay over n_train rows
        assert run.estimator.weight_decay == pytest.approx(weight_decay(head, run.value, n_train), rel=1e-12)
    tried = len(run.grid)  # the L2 heads walk their grid strongest first until validation turns down
    got = [run.grid[f"{v:g}"] for v in grid[:tried]]
    assert list(run.grid) == [f"{v:g}" for v in grid[:tried]]
    for v, g, lo, hi, exact in zip(grid, got, val_scores.lo, val_scores.hi, val_scores.exact):
        assert lo - 1e-12 <= g <= hi + 1e-12, f"{head} at {v:g}: validation accuracy {g}, reference {exact} [{lo}, {hi}]"
    assert run.value == grid[first_best(got)] and run.val_acc == max(got)
    if tried == len(grid):  # the whole grid: the choice is one the reference allows
        assert first_best(got) in val_scores.choices()
    else:  # a bracket: it stopped at its first round or where the curve turned down past the best
        assert tried >= min(BRACKET, len(grid)) and first_best(got) < tried - 1


@pytest.mark.parametrize("head, full_grid", [("linear", False), ("linear", True), ("logreg", False),
                                             ("logreg", True), ("knn", False)])
def test_each_choice_is_the_first_best_validation_accuracy_recomputed_here(tmp_path, head, full_grid):
    spec = ORACLE_DATA[head]
    n = spec["n"]
    X, y = blobs(spec["seed"], n + 50, 24, 3, spec["sep"])
    cache = open_cache(one_tap_cache(tmp_path / "c.h5", X[:n], y[:n], X[n:], y[n:], 3))
    X, y = cache.features(TAP, "train"), cache.labels("train")
    seeds = [0, 1]
    runs = tune_heads(ViewStore(cache), TAP, [head], seeds, VAL, full_grid=full_grid)
    if full_grid:
        assert all(len(run.grid) == len(HEAD_SPECS[head].grid) for run in runs)
    discriminates = []
    for run, seed in zip(runs, seeds):
        fit, val = validation_split(y, VAL, seed)
        assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(y)
        assert (run.seed, run.val_rows, run.fit_rows) == (seed, len(val), len(fit))
        grid = [v for v in HEAD_SPECS[head].grid if head != "knn" or v <= len(fit)]
        on_val, on_fit = reference_scores(X, y, head, grid, fit, val, 3)
        check_run(run, head, grid, on_val, len(y))
        discriminates.append(not on_val.choices() & on_fit.choices())
    assert any(discriminates)  # the data tells validation from the fit rows: choosing on the fit rows fails


# Constructed so that the fit rows and validation disagree. linear / logreg: 3 noisy classes (a fifth of the
# labels redrawn) in 24 columns, 42 fit rows: weak regularization fits the fit rows (up to all of them) and
# does worse on validation. knn: every fit row is its own nearest neighbour (similarity 1, the top vote), so on
# the fit rows every k scores 1.0 and the first k would win; on validation a larger k is better.
DISAGREE = {"linear": dict(seed=9, n=60, k=3, sep=0.5, noise=0.2),
            "logreg": dict(seed=9, n=60, k=3, sep=0.5, noise=0.2),
            "knn": dict(seed=3, n=200, k=2, sep=0.3, noise=0.0)}


@pytest.mark.parametrize("head", ["linear", "logreg", "knn"])
def test_validation_decides_where_the_fit_rows_would_choose_otherwise(tmp_path, head):
    spec = DISAGREE[head]
    n, k = spec["n"], spec["k"]
    X, y = blobs(spec["seed"], n + 50, 24, k, spec["sep"], label_noise=spec["noise"])
    cache = open_cache(one_tap_cache(tmp_path / "c.h5", X[:n], y[:n], X[n:], y[n:], k))
    X, y = cache.features(TAP, "train"), cache.labels("train")
    fit, val = validation_split(y, VAL, 0)
    grid = [v for v in HEAD_SPECS[head].grid if head != "knn" or v <= len(fit)]
    on_val, on_fit = reference_scores(X, y, head, grid, fit, val, k)
    assert not on_val.choices() & on_fit.choices()  # no choice on the fit rows can be the one on validation
    run = tune_heads(ViewStore(cache), TAP, [head], [0], VAL, full_grid=True)[0]
    check_run(run, head, grid, on_val, len(y))


def test_the_tuned_heads_standardize_with_train_statistics_only(tmp_path):
    """Every tuned head's mean and scale are the train split's (computed here, float64), and a test split
    changed beyond recognition moves neither them nor any choice, validation score or coefficient."""
    X, y = blobs(5, 110, 24, 3, 0.5)
    Xtr, ytr, Xte, yte = X[:60], y[:60], X[60:], y[60:]
    far = (Xte * 100 + 1e3).astype(np.float32)  # the test split: 100 times the spread, shifted by 1000
    heads, runs = ["linear", "logreg", "knn"], {}
    for name, test in (("same", Xte), ("far", far)):
        cache = open_cache(one_tap_cache(tmp_path / f"{name}.h5", Xtr, ytr, test, yte, 3))
        runs[name] = tune_heads(ViewStore(cache), TAP, heads, [0], VAL)
    mean, scale = train_stats(Xtr)
    for same, moved in zip(runs["same"], runs["far"]):
        for run in (same, moved):
            est = run.estimator
            np.testing.assert_allclose(est.mean_, mean, rtol=1e-6, atol=1e-6 * scale.max())
            np.testing.assert_allclose(est.scale_, scale, rtol=1e-5)
        assert (moved.head, moved.value, moved.grid, moved.val_acc, moved.train_acc) == \
            (same.head, same.value, same.grid, same.val_acc, same.train_acc)
        if same.head == "knn":
            assert np.array_equal(moved.estimator.features_, same.estimator.features_)
        else:
            assert np.array_equal(moved.estimator.coef_, same.estimator.coef_)
            assert np.array_equal(moved.estimator.intercept_, same.estimator.intercept_)


def test_the_tuned_logreg_on_two_classes_is_scikit_learns_at_the_same_C(tmp_path):
    X, y = blobs(0, 110, 24, 2, 0.4, label_noise=0.2)
    cache = open_cache(one_tap_cache(tmp_path / "c.h5", X[:60], y[:60], X[60:], y[60:], 2))
    run = tune_heads(ViewStore(cache), TAP, ["logreg"], [0], VAL, grids={"logreg": (0.1,)})[0]
    mean, scale = train_stats(X[:60])
    lr = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit((X[:60] - mean) / scale, y[:60])
    coef = run.estimator.coef_
    # two softmax rows against scikit-learn's one binary row: the same logit difference
    np.testing.assert_allclose(coef[1] - coef[0], lr.coef_[0], atol=1e-3)


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_the_bracket_chooses_what_the_whole_grid_chooses_on_a_one_peak_curve(tmp_path, head):
    """The walk strongest first (warm-started, stopped where validation turns down) scores each point it
    tries as the whole grid does, and chooses the same strength wherever the whole grid's validation curve
    rises (flat steps allowed) to its peak and never rises above it again; it fits fewer points when the
    peak is before the grid's end."""
    X, y = blobs(4, 400, 24, 3, 0.5, label_noise=0.1)
    cache = open_cache(one_tap_cache(tmp_path / "c.h5", X[:300], y[:300], X[300:], y[300:], 3))
    seeds = [0, 1, 2]
    walked = tune_heads(ViewStore(cache), TAP, [head], seeds, VAL, full_grid=False)
    whole = tune_heads(ViewStore(cache), TAP, [head], seeds, VAL, full_grid=True)
    peaked = 0
    for w, f in zip(walked, whole):
        curve = list(f.grid.values())
        for v, acc in w.grid.items():
            assert acc == pytest.approx(f.grid[v], abs=2 / f.val_rows)  # rows on a boundary may flip
        top = curve.index(max(curve))
        if all(a <= b for a, b in zip(curve[:top], curve[1:top + 1])) and \
                all(a >= b for a, b in zip(curve[top:], curve[top + 1:])):
            peaked += 1
            assert w.value == f.value
            last_best = max(i for i, a in enumerate(curve) if a == curve[top])  # the walk goes past ties
            assert len(w.grid) == min(len(curve), max(BRACKET, last_best + 2))
    assert peaked
