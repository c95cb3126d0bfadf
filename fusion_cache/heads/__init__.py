"""Classifier heads on cached feature vectors, following scikit-learn's estimator contract.

- `LinearHead`: a torch `nn.Linear` trained with Adam + cross-entropy on mini-batches (the case study's head),
  or full-batch L-BFGS (`solver="lbfgs"`) for a converged L2-regularized fit.
- `make_logreg`: the scikit-learn baseline, `StandardScaler` + `LogisticRegression`.
- `KNNHead`: weighted k-nearest neighbours on cosine similarity (DINOv2 / VISSL protocol).

`linear` and `logreg` are linear maps, so `linear_form` reduces either to (coef, intercept, mean, scale) for
saving, prediction on new images and export; `knn` has no linear form.

`HEAD_SPECS` is the registry: each head declares once its name, how it is built, its tuned parameter and grid,
the options it takes, what it can do (train score, epochs, linear form) and its preconditions (classes, rows).
`HEADS` is the tuple of its names. `check_can_fit` reads those preconditions, from the labels alone, before
any features are read; every command that trains heads calls it, and its advice names only the options of the
command that runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits
from torch import nn

from .errors import FusionCacheError, quote


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


class OneThreadLogisticRegression(LogisticRegression):
    """scikit-learn's `LogisticRegression`, fitted with one BLAS thread. Its lbfgs solver multiplies the
    features by a matrix of one column per class: thin products that OpenBLAS splits across threads at a loss.
    Measured on the paper subset's cache, 2 cores: 0.98 s vs 3.98 s (fused) and 3.0 s vs 7.3 s (all 19 blocks)
    a fit. Same estimator otherwise (same parameters, `get_params`, `clone`)."""

    def fit(self, X, y, sample_weight=None):
        with threadpool_limits(limits=1, user_api="blas"):
            return super().fit(X, y, sample_weight=sample_weight)


def make_logreg(C: float = 0.1, random_state: int = 0, max_iter: int = 1000) -> Pipeline:
    """The baseline: standardized features, multinomial L2 logistic regression (lbfgs)."""
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a positive number, got {C!r}")
    return Pipeline([("standardscaler", StandardScaler()),
                     ("logisticregression", OneThreadLogisticRegression(C=C, max_iter=max_iter,
                                                                        random_state=random_state))])


def linear_form(estimator) -> dict[str, np.ndarray]:
    """Reduce a fitted head to logits = ((x - mean) / scale) @ coef.T + intercept, one row per class."""
    if isinstance(estimator, KNNHead):
        raise TypeError("a kNN head has no linear form (it keeps its training set); only linear and logreg heads "
                        "can be reduced to coef and intercept")
    if isinstance(estimator, LinearHead):
        check_is_fitted(estimator, "coef_")
        return {"coef": estimator.coef_, "intercept": estimator.intercept_, "mean": estimator.mean_,
                "scale": estimator.scale_}
    scaler, lr = estimator[0], estimator[-1]
    coef, intercept = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; softmax over [0, z] gives the same probabilities
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept]).astype(np.float32)
    return {"coef": coef, "intercept": intercept, "mean": scaler.mean_.astype(np.float32),
            "scale": scaler.scale_.astype(np.float32)}


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


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class HeadSpec:
    """One head, declared once.

    name: the head's name on the command line. factory(seed, **options) -> an unfitted estimator.
    tuned: the parameter the tuned protocol chooses on validation; grid: its values in the order they are
    tried, strongest regularization first (ties on validation go to the first). options: the option names
    `build` accepts. command_options: those a command (`fit`, `ablate`, `report`) passes from its options; any
    other command-line option is refused for this head. seeded: whether the fit depends on the seed (lbfgs
    logistic regression and kNN do not, so one fit serves every seed). tuned_options: the options the tuned protocol fixes
    (e.g. linear: lbfgs, standardized). The fields after them say what the head can do and what it needs;
    `check_can_fit` and the commands read them instead of branching on a head's name.
    """

    name: str
    factory: Callable[..., Any]
    tuned: str
    grid: tuple
    options: tuple[str, ...]
    command_options: tuple[str, ...] = ()
    seeded: bool = True  # False: the fit does not depend on the seed (one fit serves every seed)
    tuned_options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    family: str = "l2"  # the tuned protocol's solver: "l2" (one stacked L2 grid) or "neighbours" (one top-k search)
    min_classes: int = 2  # classes the rows it is fit on must hold
    tuned_min_classes: int = 2  # the same in the tuned protocol (its stacked L2 grid needs two)
    rows_option: str | None = None  # an option that cannot exceed the rows it is fit on (knn's k)
    records_epochs: bool = False  # fit(X, y, eval_set=...) records train and test metrics per epoch in history_
    has_train_score: bool = True  # False: a training score says nothing (knn: each row is its own neighbour)
    has_linear_form: bool = True  # linear_form() reduces it to coef and intercept: it can be saved, and can diverge
    applies_when: Mapping[str, tuple[str, Any]] = field(default_factory=dict)  # option -> (other option, value)
    # it is used only with, e.g. max_iter only with solver lbfgs; a result records only the options it used
    divergence_fixes: tuple[tuple[str, str, tuple], ...] = ()  # (option, advice, (option, value) it needs or ())
    # that can bring a diverged fit back, best first; advice names an option only where the command has it

    def build(self, seed: int = 0, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"head '{self.name}' takes no option {', '.join(map(repr, unknown))}; "
                             f"its options are {', '.join(self.options)}")
        return self.factory(seed, **options)

    def build_tuned(self, value, seed: int = 0, **options):
        """The head of the tuned protocol at one grid value."""
        return self.build(seed, **{**options, **self.tuned_options, self.tuned: value})


def _linear(seed, **options):
    return LinearHead(random_state=seed, **options)


def _logreg(seed, **options):
    return make_logreg(random_state=seed, **options)


def _knn(seed, **options):  # deterministic: no seed
    return KNNHead(**options)


HEAD_SPECS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("linear", _linear, "weight_decay", (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4),
                 ("epochs", "lr", "batch_size", "weight_decay", "standardize", "solver", "max_iter", "device",
                  "warm_start"),
                 command_options=("epochs", "lr", "batch_size", "weight_decay", "standardize", "solver", "max_iter",
                                  "device"),
                 tuned_options={"solver": "lbfgs", "standardize": True},
                 description="torch nn.Linear, cross-entropy; Adam (the case study) or full-batch L-BFGS",
                 min_classes=1,  # a softmax over one class is defined (and trivially right); tuned, it needs 2
                 records_epochs=True, applies_when={"max_iter": ("solver", "lbfgs")},
                 divergence_fixes=(("lr", "lower --lr (now {lr:g})", ("solver", "adam")),
                                   ("standardize", "pass --standardize", ()),
                                   ("weight_decay", "pass a larger --weight-decay", ("solver", "lbfgs")))),
        HeadSpec("logreg", _logreg, "C", (0.003, 0.01, 0.03, 0.1, 0.3, 1.0), ("C", "max_iter"), ("C",), False,
                 description="scikit-learn StandardScaler + LogisticRegression, the baseline",
                 min_classes=2,  # scikit-learn's solver needs two classes
                 divergence_fixes=(("C", "pass a smaller --C (now {C:g})", ()),)),
        HeadSpec("knn", _knn, "k", (10, 20, 50, 100, 200), ("k", "temperature", "standardize", "batch_size", "device"),
                 ("k", "device"), False,
                 description="weighted kNN on cosine similarity, votes exp(sim / 0.07) (DINOv2 / VISSL)",
                 family="neighbours", min_classes=2,  # one class leaves no vote to take (and no log loss)
                 rows_option="k", has_train_score=False, has_linear_form=False),
    )
}
HEADS = tuple(HEAD_SPECS)


# ---------------------------------------------------------------------------------------------- preconditions


def flag(option: str) -> str:
    """The command-line spelling of an option: batch_size -> --batch-size."""
    return "--" + option.replace("_", "-")


def offers(offered: Collection[str] | None, option: str) -> bool:
    """Whether advice may name `option`: the running command has it (`offered` None: a library call, any)."""
    return offered is None or option in offered


def drop_advice(head: str, others: Sequence[str], offered: Collection[str] | None) -> str | None:
    """How the running command leaves `head` out: --heads (ablate, report), --head (fit), or no option."""
    if offered is not None and "heads" in offered:
        return f"leave {head} out of --heads"
    if offers(offered, "head") and others:
        return f"pass --head {' or '.join(others)}"
    return None


def divergence_advice(head: str, values: Mapping[str, Any], offered: Collection[str] | None) -> str:
    """The fix of a diverged fit: the head's declared fixes whose option the command has and that apply to
    `values` (the options it was built with); else leaving the head out."""
    fixes = [advice.format(**values) for option, advice, needs in HEAD_SPECS[head].divergence_fixes
             if offers(offered, option) and (not needs or values.get(needs[0]) == needs[1])]
    others = [h for h in HEADS if h != head]
    return " or ".join(fixes) or drop_advice(head, others, offered) or "standardize the features or use another head"


def _problem(spec: HeadSpec, y: np.ndarray, values: Mapping[str, Any] | None, rows: str,
             offered: Collection[str] | None) -> tuple[str, list[str], bool] | None:
    """What stops `spec` from being fit on rows labelled `y`: (problem with a {where} to fill in, fixes, whether
    one of the fixes is an option of this head's); None when it can be fit. values: the options it will be
    built with, or None for the tuned protocol (which tries its grid)."""
    present = len(np.unique(y))
    need = spec.min_classes if values is not None else spec.tuned_min_classes
    if present < need:
        return (f"the {spec.name} head needs at least {need} classes in the {rows} rows of {{where}}, which hold "
                f"{present}", [f"extract images of {need} or more classes"], False)
    option = spec.rows_option
    if option is None:
        return None
    n = len(y)
    if values is None:  # the tuned protocol tries the grid values that fit: the smallest must
        value = min(spec.grid)
        if value <= n:
            return None
        fixes = ["pass a smaller --val-fraction"] if offers(offered, "val_fraction") else []
        return (f"the smallest {option} of the {spec.name} grid ({value:g}) is larger than the {n} {rows} rows of "
                "{where}", fixes + ["re-extract with a larger --train-size"], False)
    value = values.get(option)
    if value is None or value <= n:  # (None: not given, so not judged; the head's own fit checks it)
        return None
    if offers(offered, option):
        return (f"{flag(option)} {value} is larger than the {n} {rows} rows of {{where}}",
                [f"pass {flag(option)} {n} or less"], True)
    return (f"the {spec.name} head's {option} = {value} is larger than the {n} {rows} rows of {{where}}",
            ["re-extract with a larger --train-size"], False)


def check_can_fit(heads: Sequence[str], y: np.ndarray, values: Mapping[str, Mapping[str, Any]] | None = None, *,
                  where: str = "the cache", rows: str = "training", offered: Collection[str] | None = None) -> None:
    """Every precondition of every head in `heads` on rows labelled `y` (class indices), before anything is
    trained: the classes they must hold (`min_classes`, `tuned_min_classes`) and the rows an option may not
    exceed (`rows_option`). The labels alone decide it: no features are read.

    values: {head: the options it will be built with}; None for the tuned protocol, which tries each head's
    grid. where, rows: how the message names the data ("'fused'", "training"). offered: the option names
    (Python spelling: k, heads, val_fraction) of the command that runs, so that its advice names only those;
    None for a library call. The first head that cannot run raises FusionCacheError, the problem then the fix;
    where no option of the head's fixes it, the fix also says how to leave the head out.
    """
    for head in heads:
        if head not in HEAD_SPECS:
            raise FusionCacheError(f"unknown head {quote(head)}; use one of {', '.join(HEADS)}")

    def problem(head, offered=None):
        return _problem(HEAD_SPECS[head], y, None if values is None else values.get(head, {}), rows, offered)

    for head in heads:
        found = problem(head, offered)
        if found is None:
            continue
        what, fixes, own = found
        if not own:
            drop = drop_advice(head, [h for h in HEADS if h != head and problem(h) is None], offered)
            fixes = fixes + ([drop] if drop else [])
        raise FusionCacheError(f"{what.replace('{where}', where)}; {', or '.join(fixes)}")
