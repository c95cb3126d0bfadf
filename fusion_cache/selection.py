"""Model selection for the tuned protocol: a validation split of train, each head's grid chosen on it, the
tap + late pair search, and the refit on all of train. The test split is read only for the final number.

- linear: the whole weight-decay grid of every seed trains as one stacked model (grid.py: one wide matrix
  product per pass, each head on its own seed's fit rows and converging to its own optimum), on features
  standardized once per view with train-split statistics and rotated once into their eigenbasis (where
  the preconditioner is diagonal); each chosen strength is refit once on all of train (seeds that chose the
  same one share it: the optimum is unique), warm-started from its grid fit.
- logreg: LogisticRegression's C grid is the same problem (weight decay 1 / (rows x C)), so it trains in the
  same stacked model; the paper protocol's logreg (C = 0.1) stays scikit-learn's own fit.
- knn: one top-k search at the largest k scores every k of the grid on validation.
Which parameter a head tunes, over which grid, and with which solver family (`family`: "l2" or "neighbours"),
comes from its declaration in heads.HEAD_SPECS. `check_tuned` and `pair_taps` check, from the cache's labels and
taps alone, that every seed's split, every head and the pair search can run, before any features are read.

Few-shot (fewshot.py): a draw's ViewData (fewshot.TuningDraw.data) holds only the draw's rows (and the dataset's
own validation rows, where it has them) and names the rows that choose (`val_rows`) and the rows the final head
trains on (`refit_rows`); standardization statistics and the refit then use those rows only, and the test
split still gives only the final number.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from .cache import Cache
from .errors import FusionCacheError, quote
from .fit import ViewData, load_view
from .grid import Eigenbasis, fit_l2_grid, grid_accuracy, grid_logits
from .heads import HEAD_SPECS, KNNHead, LinearHead, check_can_fit

PAIR_WEIGHT_DECAY = 1e-2  # the pair search ranks candidate taps with one mid-grid strength
PAIR_MAX_ITER = 50  # L-BFGS iterations per pair candidate: enough to rank, not to converge
# In a view's eigenbasis the gradient concentrates on the leading directions, so the max |gradient| test is
# stricter there: 3e-5 leaves every grid head of the paper subset's `all` view within 1e-5 of its optimal
# loss (1e-4 of it for weight decay 1e-4; measured against tol 1e-6), and chooses the same strength.
ROTATED_TOL = 3e-5
JACOBI_REFRESH = 10  # iterations between refreshes of the diagonal preconditioner (the Hessian's diagonal)
BRACKET = 3  # grid points of an L2 head tried in the first round (strongest first); see _tune_linear


def validation_split(y: np.ndarray, fraction: float, seed: int,
                     given: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the train split: disjoint, stratified, seeded; every class keeps
    training rows. With `given` (the dataset's own validation rows, `Cache.validation_rows`), those are the
    validation rows and the others the fit rows, whatever the fraction and seed."""
    rows = np.arange(len(y))
    if given is not None:
        given = np.asarray(given, dtype=np.int64)
        fit_rows = np.setdiff1d(rows, given)
        lost = np.setdiff1d(np.unique(y), y[fit_rows])
        if len(lost) or len(given) == 0:
            why = (f"class index {int(lost[0])} has no train images outside the validation split" if len(lost)
                   else "the validation split is empty")
            raise FusionCacheError(f"{why}; give every class images in train/ as well as in val/")
        return fit_rows, np.sort(given)
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and round(fraction * len(y)) >= len(counts[counts > 0]) else None
    fit_rows, val_rows = train_test_split(rows, test_size=fraction, stratify=stratify, random_state=seed)
    lost = np.setdiff1d(np.unique(y), y[fit_rows])
    if len(lost):
        n = int((y == lost[0]).sum())
        if n < 2:  # no fraction leaves it rows on both sides
            raise FusionCacheError(f"class index {int(lost[0])} has {n} train image: tuning needs 2 or more a class "
                                   "(to fit on and to validate on); re-extract with a larger --train-size")
        raise FusionCacheError(f"--val-fraction {fraction:g} leaves class index {int(lost[0])} without training "
                               f"rows (it has {n} train images); pass a smaller --val-fraction")
    return np.sort(fit_rows), np.sort(val_rows)


def check_tuned(y: np.ndarray, heads: list[str], seeds: list[int], val_fraction: float, where: str,
                offered=None, given: np.ndarray | None = None) -> None:
    """The tuned protocol's preconditions from the train labels `y`: each seed's validation split keeps every
    class in its fit rows, and every head can be fit there on its grid (heads.check_can_fit)."""
    for seed in seeds:
        fit_rows, _ = validation_split(y, val_fraction, seed, given)
        check_can_fit(heads, y[fit_rows], None, where=f"seed {seed}'s validation split of {where}", rows="fit",
                      offered=offered)


def standardize(data: ViewData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, mean, scale): both splits standardized with train statistics, once per view (the
    statistics LinearHead(standardize=True) would compute on the same rows): those of the rows the final head
    trains on (`refit_rows`, a few-shot draw; all train rows without)."""
    full = data
    if data.refit_rows is not None:
        data = dataclasses.replace(data, X_train=data.X_train[data.refit_rows])
    mean, scale = train_statistics(data.X_train)
    return (full.X_train - mean) / scale, (full.X_test - mean) / scale, mean, scale


def train_statistics(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per column; a constant column gets scale 1, as in LinearHead(standardize=True)."""
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return X.mean(axis=0), scale


@dataclass
class TunedRun:
    """One view x head x seed of the tuned protocol."""

    view: str
    head: str
    seed: int
    taps: str
    dim: int
    param: str  # the tuned parameter (weight_decay, C, k)
    value: float  # its chosen value
    grid: dict[str, float]  # validation accuracy at each grid value
    val_acc: float
    train_acc: float | None  # None for knn (each training row is its own neighbour)
    test_acc: float
    fit_seconds: float
    val_rows: int
    fit_rows: int
    estimator: object = field(default=None, repr=False)  # the refit head, for the figures
    fewshot: dict | None = None  # the draw it ran on (fewshot.Draw.record); None: all of train
    test_pred: np.ndarray | None = field(default=None, repr=False)  # the refit head's predicted class indices
    # (int64) on the test split, in the cache's test order: its interval and comparisons (not in row())

    def row(self) -> dict:
        return {"view": self.view, "head": self.head, "seed": self.seed, **(self.fewshot or {}), "taps": self.taps,
                "dim": self.dim,
                self.param: self.value, "grid": self.grid, "val_acc": self.val_acc, "train_acc": self.train_acc,
                "test_acc": self.test_acc, "fit_seconds": self.fit_seconds, "val_rows": self.val_rows,
                "fit_rows": self.fit_rows}


class ViewStore:
    """Views of one cache, each loaded (and, for the linear head, standardized) once and reused across heads
    and seeds."""

    def __init__(self, cache: Cache, device: str = "cpu"):
        self.cache, self.device = cache, device
        self._data: dict[str, ViewData] = {}
        self._std: dict[str, tuple] = {}
        self._rot: dict[str, tuple] = {}

    def data(self, view: str) -> ViewData:
        if view not in self._data:
            self._data[view] = load_view(self.cache, view)
        return self._data[view]

    def standardized(self, view: str) -> tuple:
        if view not in self._std:
            Xtr, Xte, mean, scale = standardize(self.data(view))
            self._std[view] = (torch.from_numpy(np.ascontiguousarray(Xtr, np.float32)).to(self.device),
                               torch.from_numpy(np.ascontiguousarray(Xte, np.float32)).to(self.device), mean, scale)
        return self._std[view]

    def rotated(self, view: str) -> tuple[torch.Tensor, Eigenbasis]:
        """(X_train V, basis): the standardized train split in the eigenbasis of its covariance, where the
        L-BFGS preconditioner is diagonal. Built once per view and shared by every seed, head and refit; the
        covariance is of the train split's features (no labels, never test; a few-shot draw's refit rows), and
        it changes only the optimizer's path, never an optimum."""
        if view not in self._rot:
            Xtr = self.standardized(view)[0]
            refit = self.data(view).refit_rows
            basis = Eigenbasis.of(Xtr if refit is None else Xtr[torch.from_numpy(refit)], device=self.device)
            self._rot[view] = (basis.rotate(Xtr), basis)
        return self._rot[view]

    def rows(self, view: str):
        """The view's rows for a head that streams (probe.Rows): from memory when the view is loaded here (or
        put: a few-shot draw), else read in chunks straight from the cache."""
        from . import probe

        return probe.MemoryRows(self._data[view]) if view in self._data else probe.CacheRows(self.cache, view)

    def validation_rows(self, view: str) -> np.ndarray | None:
        """The rows that choose (the dataset's own validation split; a few-shot draw's), without loading."""
        return self._data[view].val_rows if view in self._data else self.cache.validation_rows()

    def refit_rows(self, view: str) -> np.ndarray | None:
        return self._data[view].refit_rows if view in self._data else None

    def put(self, view: str, data: ViewData) -> None:
        """Use `data` for `view` (tests scramble a split this way)."""
        self._data[view] = data
        self._std.pop(view, None)
        self._rot.pop(view, None)

    def drop(self, view: str) -> None:
        self._data.pop(view, None)
        self._std.pop(view, None)
        self._rot.pop(view, None)


def tune(store: ViewStore, view: str, head: str, seed: int, val_fraction: float, max_iter: int = 200,
         grid: tuple | None = None, full_grid: bool = True) -> TunedRun:
    """Choose the head's tuned parameter on a validation split of train, refit on all of train, test once."""
    return tune_heads(store, view, [head], [seed], val_fraction, max_iter, None if grid is None else {head: grid},
                      full_grid)[0]


def tune_heads(store: ViewStore, view: str, heads: list[str], seeds: list[int], val_fraction: float,
               max_iter: int = 200, grids: dict[str, tuple] | None = None, full_grid: bool = True) -> list[TunedRun]:
    """`tune` for several heads and seeds on one view (each seed draws its own validation split). The L2
    heads (linear, logreg) are one problem family, so the grid points of every L2 head and seed train as one
    stacked model, each on its own seed's fit rows, and their refits as another; each run's fit_seconds is
    its share of the stacked fits. `full_grid` False (`report --walk-grid`) walks the L2 grids strongest first
    until each validation curve falls below its best (`_tune_linear`) instead of fitting every point. A
    closed-form head (ridge) solves its whole grid from one eigendecomposition per seed. Results come back head
    by head, seeds in the order given."""
    for head in heads:
        if head not in HEAD_SPECS:
            raise FusionCacheError(f"unknown head {quote(head)}; use one of {', '.join(HEAD_SPECS)}")
    grids = {h: tuple(HEAD_SPECS[h].grid if grids is None or h not in grids else grids[h]) for h in heads}
    for head, grid in grids.items():
        if not grid:
            raise FusionCacheError(f"the {HEAD_SPECS[head].tuned} grid of the {head} head is empty; give at least "
                                   "one value")
    runs: dict[tuple[str, int], TunedRun] = {}
    streamed = [h for h in heads if HEAD_SPECS[h].family == "closed_form"]
    if streamed:  # first, and without loading the view when no other head needs it in memory
        runs.update(_tune_closed_form(store, view, streamed, seeds, val_fraction, grids))
        if len(streamed) == len(heads):
            return [runs[h, seed] for h in heads for seed in seeds]
    data = store.data(view)
    splits = {seed: validation_split(data.y_train, val_fraction, seed, data.val_rows) for seed in seeds}
    l2 = [h for h in heads if HEAD_SPECS[h].family == "l2"]
    if l2:
        start = time.perf_counter()
        try:
            fitted = _tune_linear(store, view, data, splits, {h: grids[h] for h in l2}, max_iter, full_grid)
        except ValueError as e:
            raise FusionCacheError(f"tuning the {'/'.join(l2)} head on '{view}' failed: {e}") from None
        share = (time.perf_counter() - start) / len(fitted)
        Xtr, Xte, _, _ = store.standardized(view)
        ytr = data.y_train
        if data.refit_rows is not None:  # a few-shot draw: the training score is on the rows the head trained on
            Xtr, ytr = Xtr[torch.from_numpy(data.refit_rows)], ytr[data.refit_rows]
        for (head, seed), (est, scores) in fitted.items():
            test_pred = est.predict_standardized(Xte)  # once: test_acc and the table's statistics
            runs[head, seed] = _run(view, head, seed, data, grids[head], est, scores, share, *splits[seed],
                                    float(est.score_standardized(Xtr, ytr)),
                                    float(np.mean(test_pred == data.y_test)), test_pred)
    for head in (h for h in heads if HEAD_SPECS[h].family == "neighbours"):
        for seed in seeds:
            fit_rows, val_rows = splits[seed]
            grid = tuple(k for k in grids[head] if k <= len(fit_rows))  # on tiny data the grid shrinks
            if not grid:
                raise FusionCacheError(f"every {HEAD_SPECS[head].tuned} of the {head} grid is larger than the "
                                       f"{len(fit_rows)} fit rows of '{view}'")
            start = time.perf_counter()
            try:
                est, scores = _tune_knn(data, fit_rows, val_rows, grid)
            except ValueError as e:
                raise FusionCacheError(f"tuning the {head} head on '{view}' failed: {e}") from None
            seconds = time.perf_counter() - start
            test_pred = est.predict(data.X_test)  # one top-k search: test_acc and the table's statistics
            runs[head, seed] = _run(view, head, seed, data, grid, est, scores, seconds, fit_rows, val_rows,
                                    None, float(np.mean(test_pred == data.y_test)), test_pred)  # no training score
    return [runs[h, seed] for h in heads for seed in seeds]


def _tune_closed_form(store: ViewStore, view: str, heads: list[str], seeds: list[int], val_fraction: float,
                      grids: dict[str, tuple]) -> dict:
    """The closed-form heads (ridge): every seed's whole grid from one pass over train and one eigendecomposition
    of its fit rows' Gram matrix (probe.tune), the chosen strength refit on all of train (a few-shot draw's refit
    rows), the test split read once. The rows stream from the cache unless the view is already in memory."""
    from . import probe

    rows = store.rows(view)
    given = store.validation_rows(view)
    y = rows.labels("train")
    splits = {seed: validation_split(y, val_fraction, seed, given) for seed in seeds}
    refit = store.refit_rows(view)
    n_classes = len(store.cache.classes)
    runs = {}
    for head in heads:
        start = time.perf_counter()
        try:
            tuned = probe.tune(rows, n_classes, splits, grids[head], refit)
        except ValueError as e:
            raise FusionCacheError(f"tuning the {head} head on '{view}' failed: {e}") from None
        # each distinct refit head predicts train (its own rows) and test once
        preds = {}
        for t in tuned.values():
            if not (np.isfinite(t.estimator.coef_).all() and np.isfinite(t.estimator.intercept_).all()):
                raise FusionCacheError(f"the {head} head's solution on '{view}' is not finite; re-extract with "
                                       "--precision fp32 and --force")
            if id(t.estimator) not in preds:
                preds[id(t.estimator)] = (probe.predict(t.estimator, rows, "train", refit),
                                          probe.predict(t.estimator, rows, "test"))
        share = (time.perf_counter() - start) / len(seeds)
        y_refit = y if refit is None else y[refit]
        y_test = rows.labels("test")
        for seed, t in tuned.items():
            train_pred, test_pred = preds[id(t.estimator)]
            run = TunedRun(view, head, seed, ",".join(rows.taps), rows.dim, HEAD_SPECS[head].tuned,
                           grids[head][t.best], {f"{v:g}": float(a) for v, a in zip(grids[head], t.scores)},
                           float(t.scores[t.best]), float(np.mean(train_pred == y_refit)),
                           float(np.mean(test_pred == y_test)), share, int(len(splits[seed][1])),
                           int(len(splits[seed][0])), t.estimator)
            run.test_pred = test_pred
            runs[head, seed] = run
    return runs


def _run(view, head, seed, data, grid, est, scores, seconds, fit_rows, val_rows, train_acc, test_acc,
         test_pred=None) -> TunedRun:
    best = int(np.nanargmax(scores))  # first of the best: grids are strongest regularization first
    tried = {f"{v:g}": float(s) for v, s in zip(grid, scores) if not np.isnan(s)}  # NaN: a point not fitted
    return TunedRun(view, head, seed, ",".join(data.taps), data.dim, HEAD_SPECS[head].tuned, grid[best],
                    tried, float(scores[best]), train_acc, test_acc,
                    seconds, int(len(val_rows)), int(len(fit_rows)), est,
                    test_pred=None if test_pred is None else np.asarray(test_pred, dtype=np.int64))


class _TunedLinear(LinearHead):
    """The refit linear head of the tuned protocol, built from the stacked grid's solution. A LinearHead in
    every respect (predict, predict_proba, linear_form); scores already-standardized tensors directly."""

    def predict_standardized(self, Xs: torch.Tensor) -> np.ndarray:
        """The predicted classes of already-standardized rows."""
        W = torch.from_numpy(self.coef_).to(Xs.device)
        b = torch.from_numpy(self.intercept_).to(Xs.device)
        return self.classes_[torch.addmm(b, Xs, W.T).argmax(1).cpu().numpy()]

    def score_standardized(self, Xs: torch.Tensor, y: np.ndarray) -> float:
        return float(np.mean(self.predict_standardized(Xs) == y))


def _tune_linear(store, view, data, splits: dict[int, tuple], grids: dict[str, tuple], max_iter,
                 full_grid: bool = True) -> dict:
    """The stacked weight-decay grids of the L2 heads over the seeds' validation splits:
    {(head, seed): (refit estimator, validation scores)}.

    logreg's grid holds C values; LogisticRegression minimizes C * sum(cross-entropy) + ||W||^2 / 2, which is
    n C times the linear head's mean cross-entropy + wd / 2 ||W||^2 with wd = 1 / (n C): the same optimum. So
    the C grid trains in the same stacked model as the linear head's weight decays, with wd = 1 / (n_fit C) on
    the fit rows and wd = 1 / (n_train C) for the refit on all of train (twice that on two classes, where
    scikit-learn fits one binary row). Every grid head fits only its seed's fit rows (grid.fit_l2_grid's
    `rows`), so all seeds share each pass over the view."""
    Xtr, _, mean, scale = store.standardized(view)
    n = len(data.y_train)
    y = torch.from_numpy(data.y_train)
    k = int(data.y_train.max()) + 1
    # The preconditioner pays off when rows outnumber features; on tiny data it only costs. With it, every fit
    # runs in the view's eigenbasis (rotated once per view), and the final heads are rotated back.
    basis = None
    opts = dict(max_iter=max_iter, device=store.device, precondition=False)
    if min(len(f) for f, _ in splits.values()) >= data.dim:
        Xtr, basis = store.rotated(view)
        opts.update(precondition=basis, rotated=True, tol=ROTATED_TOL, refresh=JACOBI_REFRESH)

    # On 2 classes scikit-learn fits one row w, the softmax here two, W = (-w/2, w/2) at the optimum, whose
    # penalty wd/2 ||W||^2 is wd/4 ||w||^2: the same problem needs twice the weight decay.
    binary = 2.0 if k == 2 else 1.0

    def weight_decay(head, value, rows):  # logreg's C on `rows` rows as the linear head's weight decay
        return binary / (rows * value) if HEAD_SPECS[head].tuned == "C" else float(value)

    # With full_grid (the default) every point is fitted in one round. Without (`report --walk-grid`):
    # the grid is walked strongest first, in rounds: the first BRACKET points of every (head, seed), then one
    # more point for each (head, seed) whose weakest point tried is among its best so far, warm-started from that
    # point's solution, until every validation curve has fallen below its best (or its grid ends). On a
    # validation curve that rises (flat steps allowed) to its peak and never rises above it again, this chooses
    # exactly what the whole grid would (the first of the best), and it never fits
    # the weakest strengths past the peak: those need the most L-BFGS iterations (on full CIFAR-10 it chose
    # the whole grid's strengths, and saved no measurable time: its rounds lose the stacking of one fit).
    tried: dict[tuple[str, int], dict[int, float]] = {(h, seed): {} for seed in splits for h in grids}
    solutions: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}
    todo = [(h, seed, i) for seed in splits for h in grids
            for i in range(len(grids[h]) if full_grid else min(BRACKET, len(grids[h])))]
    while todo:
        wds = [weight_decay(h, grids[h][i], len(splits[seed][0])) for h, seed, i in todo]
        init = None
        if all((h, seed, i - 1) in solutions for h, seed, i in todo):  # a later round: warm starts
            init = (np.stack([solutions[h, seed, i - 1][0] for h, seed, i in todo]),
                    np.stack([solutions[h, seed, i - 1][1] for h, seed, i in todo]))
        if len(splits) == 1:  # one seed: its fit rows are simply the rows the grid is given
            f = torch.from_numpy(next(iter(splits.values()))[0])
            fit = fit_l2_grid(Xtr[f], y[f], k, wds, init=init, **opts)
        else:
            rows = torch.zeros(len(todo), n, dtype=torch.bool)
            for g, (h, seed, i) in enumerate(todo):
                rows[g, torch.from_numpy(splits[seed][0])] = True
            fit = fit_l2_grid(Xtr, y, k, wds, rows=rows, init=init, **opts)
        logits = grid_logits(fit, Xtr, device=store.device)  # (n, G, k): every head on every row, one product
        correct = (logits.argmax(2) == y.to(logits.device).view(-1, 1)).cpu().numpy()
        for g, (h, seed, i) in enumerate(todo):
            tried[h, seed][i] = float(correct[splits[seed][1], g].mean())
            solutions[h, seed, i] = (fit.coef[g], fit.intercept[g])
        todo = []
        for (h, seed), acc in tried.items():
            last = max(acc)
            if acc[last] >= max(acc.values()) and last + 1 < len(grids[h]) and last + 1 not in acc:
                todo.append((h, seed, last + 1))  # the weakest point tried is (one of) the best: go on
    chosen, scores = [], {}
    for h in grids:
        for seed in splits:
            acc = tried[h, seed]
            scores[h, seed] = np.array([acc.get(i, np.nan) for i in range(len(grids[h]))])
            chosen.append((h, seed, max(acc, key=lambda i: (acc[i], -i))))
    Xr, yr, n_refit = Xtr, y, n  # the refit: on all of train, or on a few-shot draw's refit rows
    if data.refit_rows is not None:
        r = torch.from_numpy(data.refit_rows)
        Xr, yr, n_refit = Xtr[r.to(Xtr.device)], y[r], len(data.refit_rows)
    final_wds = [weight_decay(h, grids[h][i], n_refit) for h, seed, i in chosen]
    # The refit on all of train has one optimum per weight decay (the loss is strictly convex), whichever seed
    # chose it: each distinct strength is refit once, warm-started from the first grid head that chose it.
    distinct = list(dict.fromkeys(final_wds))
    first = [next(m for m, wd in zip(chosen, final_wds) if wd == w) for w in distinct]
    final = fit_l2_grid(Xr, yr, k, distinct, init=(np.stack([solutions[m][0] for m in first]),
                                                  np.stack([solutions[m][1] for m in first])), **opts)
    out = {}
    for (head, seed, g), wd in zip(chosen, final_wds):
        j = distinct.index(wd)
        coef = final.coef[j] if basis is None else basis.unrotate(torch.from_numpy(final.coef[j])).numpy()
        est = _TunedLinear(solver="lbfgs", standardize=True, weight_decay=wd, max_iter=max_iter,
                           random_state=seed)
        est.classes_ = np.arange(k)
        est.n_features_in_ = data.dim
        est.mean_, est.scale_ = mean.astype(np.float32), scale.astype(np.float32)
        est.coef_, est.intercept_ = np.ascontiguousarray(coef, np.float32), final.intercept[j]
        est.n_iter_ = int(final.n_iter[j])
        est.history_ = []
        out[head, seed] = (est, np.asarray(scores[head, seed]))
    return out


def _tune_knn(data, fit_rows, val_rows, grid):
    ks = [int(k) for k in grid]
    probe = KNNHead(k=min(ks)).fit(data.X_train[fit_rows], data.y_train[fit_rows])
    by_k = probe.score_ks(data.X_train[val_rows], data.y_train[val_rows], ks)
    scores = np.array([by_k[k] for k in ks])
    refit = slice(None) if data.refit_rows is None else data.refit_rows  # a few-shot draw: its own rows only
    est = KNNHead(k=ks[int(np.argmax(scores))]).fit(data.X_train[refit], data.y_train[refit])
    return est, scores


def pair_taps(cache: Cache) -> tuple[list[str], list[str]]:
    """(the late view's taps, the candidates to pair with them) from the cache's taps alone; an error when the
    pair search cannot run: no late view, or no other tap."""
    try:
        late = cache.view_taps("late")
    except FusionCacheError as e:
        raise FusionCacheError(f"the pair search needs the late view: {e}; or pass --no-pair-search") from None
    candidates = [t for t in cache.taps if t not in late]
    if not candidates:
        raise FusionCacheError(f"the pair search needs a tap besides {', '.join(late)}, and {cache.path} holds no "
                               "other; re-extract with more --taps, or pass --no-pair-search")
    return late, candidates


def best_pair(cache: Cache, seed: int, val_fraction: float, device: str = "cpu",
              max_iter: int = PAIR_MAX_ITER, tuning=None) -> tuple[str, dict[str, float]]:
    """The tap that best complements the backbone's `late` view (features.18 for MobileNetV2), judged on
    validation accuracy only. Each candidate is a linear head at one mid-grid strength on its standardized
    [tap, late] columns. Every tap is read, standardized and rotated into its own eigenbasis once; all
    candidates train together as one stacked model over all taps, each masked to its own columns (one wide
    product per pass). The basis of a pair is block-diagonal: the preconditioner ignores the
    cross-covariance, which changes only the path. Returns ("tap,late...", {tap: validation accuracy}).

    With `tuning` (a few-shot draw, fewshot.TuningDraw), only the draw's rows are read: the candidates fit on
    its fit rows, are judged on its validation rows, and take their statistics from the draw's refit rows."""
    late, candidates = pair_taps(cache)
    y = cache.labels("train")
    keep = stats = None
    if tuning is None:
        fit_rows, val_rows = validation_split(y, val_fraction, seed, cache.validation_rows())
    else:
        keep, stats, y = tuning.keep, tuning.refit, y[tuning.keep]
        fit_rows, val_rows = validation_split(y, val_fraction, seed, tuning.val)
    f, v = torch.from_numpy(fit_rows), torch.from_numpy(val_rows)
    taps = list(cache.taps)
    # A few-shot draw has fewer fit rows than a pair has columns: no preconditioner, so no eigenbasis to compute
    rotate = tuning is None or len(fit_rows) >= max(
        cache.meta.width(t) + sum(cache.meta.width(x) for x in late) for t in candidates)
    blocks, lams, cols = [], [], {}
    for tap in taps:
        X = cache.features(tap, "train").astype(np.float32)
        if keep is not None:
            X = X[keep]
        mean, scale = train_statistics(X if stats is None else X[stats])
        X = torch.from_numpy((X - mean) / scale).to(device)
        start = sum(b.shape[1] for b in blocks)
        cols[tap] = slice(start, start + X.shape[1])
        if not rotate:
            blocks.append(X)
            continue
        basis = Eigenbasis.of(X if stats is None else X[torch.from_numpy(stats)], device=device)
        blocks.append(basis.rotate(X))
        lams.append(basis.lam)
    X = torch.cat(blocks, dim=1)
    del blocks
    masks = torch.zeros(len(candidates), X.shape[1], dtype=torch.bool)
    for g, tap in enumerate(candidates):
        masks[g, cols[tap]] = True
        for t in late:
            masks[g, cols[t]] = True
    yt = torch.from_numpy(y).to(device)
    k = int(y.max()) + 1
    opts = dict(precondition=False)
    if rotate and len(fit_rows) >= int(masks.sum(1).max()):
        opts = dict(precondition=Eigenbasis(None, torch.cat(lams)), rotated=True,  # only the scores are needed,
                    tol=ROTATED_TOL, refresh=JACOBI_REFRESH)  # never the heads rotated back: no d x d basis
    fit = fit_l2_grid(X[f], yt[f], k, [PAIR_WEIGHT_DECAY] * len(candidates), max_iter=min(max_iter, PAIR_MAX_ITER),
                      device=device, masks=masks, **opts)
    acc = grid_accuracy(fit, X[v], yt[v])
    scores = {tap: float(a) for tap, a in zip(candidates, acc)}
    tap = max(scores, key=scores.get)
    return ",".join([tap, *late]), scores
