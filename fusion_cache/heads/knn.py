"""`knn`: weighted k-nearest neighbours on cosine similarity (the DINOv2 / VISSL protocol)."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class KNNHead(ClassifierMixin, BaseEstimator):
    """Weighted k-nearest neighbours on cosine similarity, as DINOv2 and VISSL evaluate frozen features.

    Features are standardized with training-set statistics (`standardize=True`), then L2-normalized; each query's
    k most similar training rows (one batched matrix product and `torch.topk` per `batch_size` queries) vote
    for their class with weight exp(similarity / temperature). `predict_proba` is the normalized vote.

    Parameters
    ----------
    k : neighbours that vote (at most the number of training rows).
    temperature : T of the vote weights exp(sim / T); 0.07 as in DINO.
    standardize : standardize features with training-set statistics before the L2 normalization.
    batch_size : queries per matrix product; memory is about batch_size x n_train x 4 bytes.
    device : torch device for the products.

    Fitted attributes: `classes_`, `n_features_in_`, `mean_`, `scale_`, `features_` (n_train, d) float32, the
    standardized and L2-normalized training rows, `labels_` (n_train,) class indices into `classes_`.
    `predict_ks` / `score_ks` score several k with one top-k search at the largest (for choosing k).
    """

    def __init__(self, k=20, temperature=0.07, standardize=True, batch_size=1024, device="cpu"):
        self.k = k
        self.temperature = temperature
        self.standardize = standardize
        self.batch_size = batch_size
        self.device = device

    def _check_params(self):
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def fit(self, X, y):
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        _check_k(self.k, len(X))
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if self.standardize:
            std, mean = torch.std_mean(torch.from_numpy(X if X.flags.writeable else X.copy()), dim=0, correction=0)
            self.mean_, self.scale_ = mean.numpy(), std.numpy()
            self.scale_[self.scale_ < 1e-12] = 1.0
        else:
            self.mean_ = np.zeros(X.shape[1], np.float32)
            self.scale_ = np.ones(X.shape[1], np.float32)
        self.features_ = self._normalize(X).numpy()
        self.labels_ = y_idx.astype(np.int64)
        return self

    def _normalize(self, X: np.ndarray) -> torch.Tensor:
        F = torch.from_numpy(X if X.flags.writeable else X.copy())
        F = F.sub(torch.from_numpy(self.mean_)).div_(torch.from_numpy(self.scale_))
        return F.div_(F.norm(dim=1, keepdim=True).clamp_(min=1e-12))

    def _votes(self, X, ks) -> dict[int, np.ndarray]:
        """Votes (n, n_classes) for each k in ks, from one top-k search at max(ks)."""
        check_is_fitted(self, "features_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        ks = sorted({int(k) for k in ks})
        for k in ks:
            if k < 1:
                raise ValueError(f"k must be a positive integer, got {k}")
            _check_k(k, len(self.features_))
        device = torch.device(self.device)
        train = torch.from_numpy(self.features_).to(device)
        labels = torch.from_numpy(self.labels_).to(device)
        n_classes, kmax = len(self.classes_), ks[-1]
        out = {k: np.empty((len(X), n_classes), np.float32) for k in ks}
        buf = torch.empty(min(self.batch_size, len(X)), len(train), device=device)  # reused: bounded memory
        for lo in range(0, len(X), self.batch_size):
            q = self._normalize(X[lo : lo + self.batch_size]).to(device)
            sim = torch.mm(q, train.T, out=buf[: len(q)])
            sims, idx = torch.topk(sim, kmax, dim=1)  # sorted, most similar first
            weights = torch.exp(sims / self.temperature)
            votes_of = labels[idx]
            for k in ks:
                v = torch.zeros(len(q), n_classes, device=device)
                v.scatter_add_(1, votes_of[:, :k], weights[:, :k])
                out[k][lo : lo + len(q)] = v.cpu().numpy()
        return out

    def predict_proba(self, X):
        v = self._votes(X, [self.k])[self.k]
        return v / v.sum(axis=1, keepdims=True)

    def predict(self, X):
        votes = self._votes(X, [self.k])[self.k]  # first, so an unfitted head raises NotFittedError
        return self.classes_[np.argmax(votes, axis=1)]

    def predict_ks(self, X, ks) -> dict[int, np.ndarray]:
        """Predictions for each k in ks (each at most n_train) from one top-k search; equal to
        KNNHead(k=k).fit(...).predict(X) for each k."""
        votes = self._votes(X, ks)
        return {k: self.classes_[np.argmax(v, axis=1)] for k, v in votes.items()}

    def score_ks(self, X, y, ks) -> dict[int, float]:
        """Accuracy on (X, y) for each k in ks, from one top-k search (for choosing k on validation)."""
        y = np.asarray(y)
        return {k: float(np.mean(p == y)) for k, p in self.predict_ks(X, ks).items()}


def _check_k(k: int, n_train: int) -> None:
    if k > n_train:
        raise ValueError(f"k={k} is larger than the training set ({n_train} samples); use k <= {n_train}")
