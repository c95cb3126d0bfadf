"""`ridge`: a least-squares linear probe on one-hot targets, solved in closed form from a Gram matrix that is
accumulated chunk by chunk, so a view larger than memory fits in memory O(d^2).

The head. Features are standardized with the training rows' statistics, z = (x - mean) / scale (a constant
column gets scale 1, as LinearHead(standardize=True)), and each class c gets the target +1 on its rows and -1
elsewhere (scikit-learn's RidgeClassifier encoding). For the n training rows the head minimizes

    (1/n) sum_i ||t_i - W z_i - b||^2 + alpha ||W||^2          (b is not penalized)

which is RidgeClassifier(alpha = n * alpha) on the standardized features: `alpha` is a strength per training
row, so one grid serves every dataset size. With the rows centered (zc = z - zbar, tc = t - tbar), the solution
is W = (Zc'Zc + n alpha I)^-1 Zc'Tc and b = tbar - W zbar. It predicts the class of the largest score W z + b.

Streaming. Zc'Zc and Zc'Tc follow from sums over the rows: n, sum x, sum x x', sum x t' (`Gram`). Each chunk of
rows is shifted by a fixed reference (the first chunk's column means) before its products, so the float32
products do not lose the small spread of a feature to its large mean; products and sums are float64. The
standardization is a diagonal change of variables applied to the sums afterwards, so one pass over the rows
gives the statistics, the Gram matrix and the cross products: memory is O(d^2 + d k), flat in the rows.

The whole grid from one decomposition (`Path`). Zc'Zc = V diag(lam) V'. For every alpha,
W(alpha) = V diag(1 / (lam + n alpha)) V' Zc'Tc: after the eigendecomposition each grid point costs a rescale,
and scoring a validation row for every alpha at once is one product of its rotated features (z - zbar) V with
the (d, G k) matrix of every alpha's rescaled V' Zc'Tc. (Hastie, Tibshirani & Friedman, The Elements of
Statistical Learning, 2nd ed., sec. 3.4.1; scikit-learn's RidgeCV uses the same decomposition.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

CHUNK_ROWS = 4096  # rows per product when a matrix is accumulated from memory


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha)
                                       and alpha >= 0):
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    return float(alpha)


class Gram:
    """Running sums over rows of raw features x (d) and class indices y (k classes): n, sum (x - ref),
    sum (x - ref)(x - ref)', sum (x - ref) onehot', class counts. `add` one chunk at a time; `+` merges."""

    def __init__(self, d: int, k: int, ref: np.ndarray | None = None):
        self.d, self.k = d, k
        self.ref = None if ref is None else np.asarray(ref, np.float32)
        self.n = 0
        self.sx = np.zeros(d)
        self.sxx = np.zeros((d, d))
        self.sxy = np.zeros((d, k))
        self.counts = np.zeros(k)

    def add(self, X: np.ndarray, y: np.ndarray) -> "Gram":
        X = np.asarray(X, np.float32)
        if len(X) == 0:
            return self
        if self.ref is None:
            self.ref = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        Xs = torch.from_numpy(np.subtract(X, self.ref, dtype=np.float64))  # float64 products: the sums are exact
        onehot = torch.zeros(len(X), self.k, dtype=torch.float64)  # to 1e-6 whatever the rows per chunk
        onehot[torch.arange(len(X)), torch.from_numpy(np.asarray(y, np.int64))] = 1.0
        self.n += len(X)
        self.sx += Xs.sum(0).numpy()
        self.sxx += (Xs.T @ Xs).numpy()
        self.sxy += (Xs.T @ onehot).numpy()
        self.counts += onehot.sum(0).numpy()
        return self

    def __add__(self, other: "Gram") -> "Gram":
        """The sums over the rows of both (the same reference; a Gram with no rows adopts the other's)."""
        if self.n == 0:
            return other.copy()
        if other.n == 0:
            return self.copy()
        if not np.array_equal(self.ref, other.ref):
            raise ValueError("Grams accumulated with different references cannot be added; pass ref=")
        out = self.copy()
        out.n += other.n
        out.sx += other.sx
        out.sxx += other.sxx
        out.sxy += other.sxy
        out.counts += other.counts
        return out

    def __sub__(self, other: "Gram") -> "Gram":
        """The sums over the rows of self that are not other's (other's rows a subset of self's)."""
        if other.n == 0:
            return self.copy()
        if not np.array_equal(self.ref, other.ref):
            raise ValueError("Grams accumulated with different references cannot be subtracted; pass ref=")
        out = self.copy()
        out.n -= other.n
        out.sx -= other.sx
        out.sxx -= other.sxx
        out.sxy -= other.sxy
        out.counts -= other.counts
        return out

    def copy(self) -> "Gram":
        out = Gram.__new__(Gram)
        out.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})
        return out

    @property
    def mean(self) -> np.ndarray:
        return self.ref + self.sx / self.n

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) of the rows, float32: the standardization of LinearHead(standardize=True). A column whose
        variance is within rounding of zero (relative to its mean) is constant: scale 1."""
        m = self.sx / self.n
        var = np.maximum(np.diag(self.sxx) / self.n - m * m, 0.0)
        mean = self.ref.astype(np.float64) + m
        constant = var <= 1e-12 * np.maximum(mean * mean, 1e-12)
        scale = np.sqrt(var)
        scale[constant] = 1.0
        return mean.astype(np.float32), scale.astype(np.float32)

    def centered(self, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(Zc'Zc, Zc'Tc, zbar, tbar) of these rows in the standardized space z = (x - mean) / scale, centered at
        their own means, targets t = 2 onehot - 1."""
        m = self.sx / self.n  # mean of (x - ref)
        cxx = self.sxx - self.n * np.outer(m, m)
        ybar = self.counts / self.n
        cxy = self.sxy - self.n * np.outer(m, ybar)  # sum (x - xbar)(onehot - ybar)'
        s = scale.astype(np.float64)
        zz = cxx / np.outer(s, s)
        zt = 2.0 * cxy / s[:, None]  # t - tbar = 2 (onehot - ybar)
        zbar = (self.ref.astype(np.float64) + m - mean) / s
        return zz, zt, zbar, 2.0 * ybar - 1.0


def accumulate(chunks: Iterable[tuple[np.ndarray, np.ndarray]], d: int, k: int, ref=None) -> Gram:
    """A Gram over every (X, y) chunk."""
    g = Gram(d, k, ref)
    for X, y in chunks:
        g.add(X, y)
    return g


def in_chunks(X: np.ndarray, y: np.ndarray, rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(X), rows):
        yield X[lo : lo + rows], y[lo : lo + rows]


@dataclass
class Path:
    """The rows' centered Gram matrix, eigendecomposed once: the solution at any alpha is a rescale."""

    lam: np.ndarray  # (d,) eigenvalues of Zc'Zc, float64
    V: np.ndarray  # (d, d) eigenvectors
    Q: np.ndarray  # (d, k) V' Zc'Tc
    zbar: np.ndarray  # (d,)
    tbar: np.ndarray  # (k,)
    n: int

    @classmethod
    def of(cls, gram: Gram, mean: np.ndarray, scale: np.ndarray) -> "Path":
        zz, zt, zbar, tbar = gram.centered(mean, scale)
        lam, V = torch.linalg.eigh(torch.from_numpy(zz))
        lam, V = lam.numpy().clip(min=0.0), V.numpy()
        return cls(lam, V, V.T @ zt, zbar, tbar, gram.n)

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(coef (k, d), intercept (k,)) in the standardized space at one alpha."""
        W = self.V @ (self.Q / (self.lam + self.n * alpha)[:, None])  # (d, k)
        return W.T, self.tbar - self.zbar @ W

    def scorer(self, alphas) -> "GridScorer":
        return GridScorer(self, tuple(float(a) for a in alphas))


class GridScorer:
    """Scores standardized rows for every alpha of a grid at once: counts right answers chunk by chunk."""

    def __init__(self, path: Path, alphas: tuple[float, ...]):
        self.alphas = alphas  # (the path itself is not kept: its float64 V would double the memory)
        k = path.Q.shape[1]
        inv = 1.0 / (path.lam[:, None] + path.n * np.asarray(alphas)[None, :])  # (d, G)
        self.M = torch.from_numpy((path.Q[:, None, :] * inv[:, :, None]).reshape(len(path.lam), len(alphas) * k)
                                  .astype(np.float32))  # (d, G k)
        self.Vt = torch.from_numpy(path.V.astype(np.float32))
        self.shift = torch.from_numpy(path.zbar.astype(np.float32))
        self.tbar = torch.from_numpy(path.tbar.astype(np.float32))
        self.k = k
        self.correct = np.zeros(len(alphas), np.int64)
        self.n = 0

    def add(self, Z: np.ndarray, y: np.ndarray) -> None:
        """Standardized rows Z (n, d) with class indices y."""
        P = (torch.from_numpy(np.ascontiguousarray(Z, np.float32)) - self.shift) @ self.Vt
        scores = (P @ self.M).view(len(Z), len(self.alphas), self.k)
        pred = (scores + self.tbar).argmax(2).numpy()
        self.correct += (pred == np.asarray(y)[:, None]).sum(0)
        self.n += len(Z)

    @property
    def accuracy(self) -> np.ndarray:
        return self.correct / max(self.n, 1)


class RidgeHead(ClassifierMixin, BaseEstimator):
    """Ridge regression on +-1 one-hot targets over standardized features; the class of the largest score.

    Parameters
    ----------
    alpha : L2 strength per training row: the fit minimizes mean ||t - W z - b||^2 + alpha ||W||^2, which is
        scikit-learn's RidgeClassifier(alpha = n_rows * alpha) on the standardized features.
    standardize : standardize with the training rows' statistics (stored in `mean_`, `scale_`).
    chunk_rows : rows per product while the Gram matrix accumulates (memory, not the result).

    Fitted attributes: `classes_`, `n_features_in_`, `coef_` (k, d) and `intercept_` (k,) in the standardized
    space, `mean_`, `scale_`. `fit_gram` fits from a streamed `Gram` instead of arrays.
    """

    def __init__(self, alpha=0.1, standardize=True, chunk_rows=CHUNK_ROWS):
        self.alpha = alpha
        self.standardize = standardize
        self.chunk_rows = chunk_rows

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("ridge needs at least 2 classes in its training rows; got "
                             f"{len(classes)} class{'es' if len(classes) != 1 else ''}")
        gram = accumulate(in_chunks(X, y_idx, self.chunk_rows), X.shape[1], len(classes))
        return self.fit_gram(gram, classes)

    def fit_gram(self, gram: Gram, classes) -> "RidgeHead":
        """Fit from the sums over the training rows (their y as indices into `classes`)."""
        alpha = _check_alpha(self.alpha)
        if gram.n == 0:
            raise ValueError("ridge needs training rows, got none")
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = gram.d
        if self.standardize:
            self.mean_, self.scale_ = gram.statistics()
        else:
            self.mean_, self.scale_ = np.zeros(gram.d, np.float32), np.ones(gram.d, np.float32)
        zz, zt, zbar, tbar = gram.centered(self.mean_, self.scale_)
        A = torch.from_numpy(zz + gram.n * alpha * np.eye(gram.d))
        W = _solve(A, torch.from_numpy(zt)).numpy()  # (d, k)
        self.coef_ = np.ascontiguousarray(W.T, np.float32)
        self.intercept_ = (tbar - zbar @ W).astype(np.float32)
        return self

    def linear_form(self) -> dict[str, np.ndarray]:
        check_is_fitted(self, "coef_")
        return {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_}

    def decision_function(self, X):
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        z = ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return z[:, 1] if z.shape[1] == 2 else z  # binary: RidgeClassifier's one column (class 1's score)

    def _scores(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict(self, X):
        scores = self._scores(X)  # first, so an unfitted head raises NotFittedError
        return self.classes_[np.argmax(scores, axis=1)]


def _solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A^-1 B for a symmetric positive (semi)definite A: Cholesky, else (alpha 0 and a singular Gram) the
    least-squares solution of smallest norm."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(A, B, driver="gelsd").solution
