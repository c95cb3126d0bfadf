"""Heads that stream (HeadSpec.streams): fit, tune and score them over a view's rows in chunks, read from memory
(a loaded fit.ViewData) or straight from the HDF5 cache, so that a view larger than memory fits.

Today that is the `ridge` head (heads/ridge.py). Every function here takes a `Rows`: `CacheRows` reads a view
chunk by chunk from the cache (memory: one chunk plus the d x d sums), `MemoryRows` walks a loaded ViewData (a
few-shot draw, or a view another head already loaded). Both give the same chunks, so the same code computes the
same numbers either way.

The tuned protocol (`tune`) fits the whole grid of every seed from one pass over train and one eigendecomposition
per seed: pass 1 accumulates the sums over the rows the final head trains on (R) and, for each seed, over the
rows of R it leaves out of its fit rows (so fit = R minus those); each seed's fit Gram is eigendecomposed once
and pass 2 scores its validation rows at every alpha (heads/ridge.GridScorer); the chosen alpha is refit on R
by one Cholesky solve, and the test split is read once, for the final number.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .cache import Cache
from .errors import FusionCacheError
from .heads.ridge import CHUNK_ROWS, Gram, Path, RidgeHead


class Rows:
    """A view's rows, in chunks: `chunks(split, rows)` yields (positions, X float32, y class indices)."""

    view: str
    taps: list[str]
    dim: int

    def chunks(self, split: str, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def labels(self, split: str) -> np.ndarray:
        raise NotImplementedError


class CacheRows(Rows):
    """A view streamed from the cache; NaN or inf features are refused as load_view refuses them."""

    def __init__(self, cache: Cache, view: str):
        self.cache, self.view = cache, view
        self.taps = cache.view_taps(view)
        self.dim = sum(cache.meta.width(t) for t in self.taps)
        self._labels: dict[str, np.ndarray] = {}

    def labels(self, split: str) -> np.ndarray:
        if split not in self._labels:
            self._labels[split] = self.cache.labels(split)
        return self._labels[split]

    def chunks(self, split, rows=None):
        for pos, X, y in self.cache.iter_view(self.view, split, rows):
            bad = int((~np.isfinite(X)).any(axis=1).sum())
            if bad:
                raise FusionCacheError(f"{self.cache.path}: {bad} {split} rows of view '{self.view}' hold NaN or inf "
                                       "features; re-extract with --precision fp32 and --force")
            yield pos, X, y


class MemoryRows(Rows):
    """A loaded fit.ViewData (train rows as it holds them: a few-shot draw holds only its own)."""

    def __init__(self, data, chunk_rows: int = CHUNK_ROWS):
        self.data, self.view, self.taps, self.dim = data, data.view, data.taps, data.dim
        self.chunk_rows = chunk_rows

    def labels(self, split: str) -> np.ndarray:
        return self.data.y_train if split == "train" else self.data.y_test

    def chunks(self, split, rows=None):
        X = self.data.X_train if split == "train" else self.data.X_test
        pos_all = np.arange(len(X)) if rows is None else np.asarray(rows, np.int64)
        y = self.labels(split)
        for lo in range(0, len(pos_all), self.chunk_rows):
            pos = pos_all[lo : lo + self.chunk_rows]
            yield pos, X[pos], y[pos]


def gram(rows: Rows, n_classes: int, subsets: dict, ref=None) -> dict:
    """{name: Gram over the train rows `subsets[name]`} (sorted positions; None: every row), from one pass
    over the union of them."""
    wanted = [s for s in subsets.values() if s is not None]
    union = None if len(wanted) < len(subsets) else np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, int)
    out = {name: Gram(rows.dim, n_classes, ref) for name in subsets}
    for pos, X, y in rows.chunks("train", union):
        if ref is None:  # one reference for every Gram, so that they can be added and subtracted
            ref = X.mean(axis=0, dtype=np.float64).astype(np.float32)
            for g in out.values():
                g.ref = ref
        for name, subset in subsets.items():
            if subset is None:
                out[name].add(X, y)
            else:
                keep = np.isin(pos, subset, assume_unique=True)
                if keep.any():
                    out[name].add(X[keep], y[keep])
    return out


def predict(est: RidgeHead, rows: Rows, split: str, positions: np.ndarray | None = None) -> np.ndarray:
    """Class indices predicted for every row of `split` (or `positions`), chunk by chunk."""
    out = []
    for _, X, _ in rows.chunks(split, positions):
        out.append(est.predict(X))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class Fitted:
    """A streamed fit: the head, its predictions on the train rows it saw and on test, and the seconds."""

    estimator: RidgeHead
    train_pred: np.ndarray
    test_pred: np.ndarray
    fit_seconds: float


def fit(rows: Rows, alpha: float, n_classes: int, train_rows: np.ndarray | None = None) -> Fitted:
    """One ridge head at `alpha` on the train rows (all, or `train_rows`), scored on them and on test."""
    start = time.perf_counter()
    g = gram(rows, n_classes, {"train": train_rows})["train"]
    est = RidgeHead(alpha=alpha).fit_gram(g, np.arange(n_classes))
    seconds = time.perf_counter() - start
    return Fitted(est, predict(est, rows, "train", train_rows), predict(est, rows, "test"), seconds)


def _standardized(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (X - mean) / scale


@dataclass
class Tuned:
    """One seed's tuned ridge head: validation accuracy at every alpha, the chosen index, the refit head."""

    scores: np.ndarray
    best: int
    estimator: RidgeHead


def tune(rows: Rows, n_classes: int, splits: dict, grid: tuple, refit_rows: np.ndarray | None = None) -> dict:
    """{seed: Tuned} for `splits` ({seed: (fit rows, validation rows)}, positions in the train split): every
    alpha of `grid` scored on each seed's validation rows from one eigendecomposition of its fit rows' Gram
    matrix, the first best chosen (grids run strongest first), refit on `refit_rows` (None: every train row) with
    their standardization statistics. Each seed's fit rows must lie within the refit rows."""
    if not grid or any(not (a > 0 and np.isfinite(a)) for a in grid):
        raise ValueError(f"every alpha of a ridge grid must be a number > 0, got {list(grid)}")
    n = len(rows.labels("train"))
    R = np.arange(n) if refit_rows is None else np.sort(np.asarray(refit_rows, np.int64))
    left_out = {seed: np.setdiff1d(R, fit_rows) for seed, (fit_rows, _) in splits.items()}
    subsets = {"refit": None if refit_rows is None else R, **{("out", s): rows_ for s, rows_ in left_out.items()}}
    sums = gram(rows, n_classes, subsets)
    mean, scale = sums["refit"].statistics()
    scorers = {}
    for seed, (fit_rows, _) in splits.items():
        if len(np.setdiff1d(fit_rows, R)):
            raise ValueError(f"seed {seed}'s fit rows are not all refit rows")
        path = Path.of(sums["refit"] - sums["out", seed], mean, scale)
        scorers[seed] = path.scorer(grid)
    val_union = np.unique(np.concatenate([v for _, v in splits.values()]))
    for pos, X, y in rows.chunks("train", val_union):
        Z = _standardized(X, mean, scale)
        for seed, (_, val_rows) in splits.items():
            keep = np.isin(pos, val_rows, assume_unique=True)
            if keep.any():
                scorers[seed].add(Z[keep], y[keep])
    out, refits = {}, {}
    for seed, scorer in scorers.items():
        acc = scorer.accuracy
        best = int(np.argmax(acc))  # first of the best: the strongest regularization among ties
        alpha = grid[best]
        if alpha not in refits:  # seeds that chose the same alpha share the refit (its optimum is unique)
            est = RidgeHead(alpha=alpha)
            est.fit_gram(sums["refit"], np.arange(n_classes))
            refits[alpha] = est
        out[seed] = Tuned(acc, best, refits[alpha])
    return out
