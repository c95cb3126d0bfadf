"""`linear`: softmax regression in torch (the case study's head; Adam mini-batches or full-batch L-BFGS)."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn


class LinearHead(ClassifierMixin, BaseEstimator):
    """Softmax regression in torch: `nn.Linear(d, k)` trained with cross-entropy.

    Parameters
    ----------
    epochs : passes over the training set (solver="adam"). The case study trains 2.
    lr : Adam learning rate.
    batch_size : mini-batch size (solver="adam").
    weight_decay : L2 penalty. With adam it is Adam's weight_decay; with lbfgs it is added to the mean loss
        as weight_decay/2 * ||W||^2.
    standardize : standardize features with statistics of the training set (stored in `mean_`, `scale_`).
    solver : "adam" (mini-batches, the case study's protocol) or "lbfgs" (full batch, to convergence).
    max_iter : L-BFGS iterations (solver="lbfgs").
    random_state : seeds the initialisation and the mini-batch order; same seed, same numbers.
    device : torch device for training.
    warm_start : start from the previous fit's coef_ and intercept_ (same features and classes), as in
        scikit-learn; used to walk a regularization path quickly.

    Fitted attributes: `classes_`, `n_features_in_`, `coef_` (k, d), `intercept_` (k,), `mean_`, `scale_`,
    `n_iter_` (epochs, or L-BFGS iterations),
    `history_` (a dict per epoch: train_loss and train_acc over that epoch's mini-batches, and test_loss and
    test_acc when `fit` got an eval_set).
    """

    def __init__(self, epochs=2, lr=1e-3, batch_size=32, weight_decay=0.0, standardize=False, solver="adam",
                 max_iter=200, random_state=0, device="cpu", warm_start=False):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.solver = solver
        self.max_iter = max_iter
        self.random_state = random_state
        self.device = device
        self.warm_start = warm_start

    def _check_params(self):
        if self.solver not in ("adam", "lbfgs"):
            raise ValueError(f"solver must be 'adam' or 'lbfgs', got {self.solver!r}")
        if not isinstance(self.epochs, (int, np.integer)) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")

    def fit(self, X, y, eval_set=None):
        """Train on (X, y). `eval_set=(X_test, y_test)` adds test loss/accuracy to `history_` after each epoch."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if self.standardize:
            self.mean_ = X.mean(axis=0)
            self.scale_ = X.std(axis=0)
            self.scale_[self.scale_ < 1e-12] = 1.0
        else:
            self.mean_ = np.zeros(X.shape[1], np.float32)
            self.scale_ = np.ones(X.shape[1], np.float32)
        device = torch.device(self.device)
        Xt = torch.from_numpy(((X - self.mean_) / self.scale_).astype(np.float32)).to(device)
        yt = torch.from_numpy(y_idx.astype(np.int64)).to(device)
        ev = None
        if eval_set is not None:
            Xe, ye = eval_set
            Xe = validate_data(self, Xe, dtype=np.float32, reset=False)
            known = np.isin(ye, self.classes_)
            ye_idx = np.searchsorted(self.classes_, ye)
            ye_idx[~known] = -100  # classes unseen in training count as errors and are ignored by the loss
            ev = (torch.from_numpy(((Xe - self.mean_) / self.scale_).astype(np.float32)).to(device),
                  torch.from_numpy(ye_idx.astype(np.int64)).to(device))
        n_classes = len(self.classes_)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            layer = nn.Linear(X.shape[1], n_classes).to(device)
        previous = getattr(self, "coef_", None)
        if self.warm_start and previous is not None and previous.shape == (n_classes, X.shape[1]):
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(previous))
                layer.bias.copy_(torch.from_numpy(self.intercept_))
        gen = torch.Generator().manual_seed(self.random_state)
        loss_fn = nn.CrossEntropyLoss()
        self.history_ = []
        if self.solver == "adam":
            opt = torch.optim.Adam(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            n = len(Xt)
            for epoch in range(1, self.epochs + 1):
                order = torch.randperm(n, generator=gen).to(device)
                total_loss, correct = 0.0, 0
                for lo in range(0, n, self.batch_size):
                    b = order[lo : lo + self.batch_size]
                    logits = layer(Xt[b])
                    loss = loss_fn(logits, yt[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total_loss += loss.item() * len(b)
                    correct += (logits.argmax(1) == yt[b]).sum().item()
                self.history_.append(self._epoch_row(epoch, total_loss / n, correct / n, layer, ev, loss_fn))
            self.n_iter_ = self.epochs
        else:
            opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=self.max_iter, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(layer(Xt), yt) + 0.5 * self.weight_decay * layer.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            self.n_iter_ = int(opt.state[opt._params[0]].get("n_iter", self.max_iter))
            with torch.no_grad():
                logits = layer(Xt)
                train_loss = loss_fn(logits, yt).item()
                train_acc = (logits.argmax(1) == yt).float().mean().item()
            self.history_.append(self._epoch_row(1, train_loss, train_acc, layer, ev, loss_fn))
        self.coef_ = layer.weight.detach().cpu().numpy().astype(np.float32)
        self.intercept_ = layer.bias.detach().cpu().numpy().astype(np.float32)
        return self

    @staticmethod
    def _epoch_row(epoch, train_loss, train_acc, layer, ev, loss_fn) -> dict:
        row = {"epoch": epoch, "train_loss": float(train_loss), "train_acc": float(train_acc)}
        if ev is not None:
            with torch.no_grad():
                logits = layer(ev[0])
                seen = ev[1] >= 0
                row["test_loss"] = float(loss_fn(logits[seen], ev[1][seen]).item()) if seen.any() else float("nan")
                row["test_acc"] = float(((logits.argmax(1) == ev[1]) & seen).float().mean().item())
        return row

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def linear_form(self) -> dict[str, np.ndarray]:
        check_is_fitted(self, "coef_")
        return {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_}

    def decision_function(self, X):
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X):
        z = self._logits(X)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X):
        z = self._logits(X)  # first, so an unfitted head raises NotFittedError
        return self.classes_[np.argmax(z, axis=1)]
