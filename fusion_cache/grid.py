"""A grid of L2-regularized softmax-regression heads trained together, one wide matrix product per pass.

For every weight decay ``wd_g`` of the grid, head ``g`` minimizes exactly the objective of
``LinearHead(solver="lbfgs", weight_decay=wd_g)`` in heads.py:

    f_g(W_g, b_g) = mean_i cross_entropy(x_i @ W_g.T + b_g, y_i) + 0.5 * wd_g * ||W_g||^2     (b not penalized)

All G weight matrices sit side by side, so one pass over ``X`` is one product ``X @ W_all.T`` with ``W_all``
of shape (G*k, d), and the gradient is one product ``R.T @ X``. On CPU an evaluation walks X in blocks of
rows (about 64 MB each): the logits, the softmax and the gradient's product of a block are done while the
block is still in cache, so X streams from memory once per evaluation, not twice, and the softmax runs on
cache-sized pieces. Narrow products are memory-bound and wide ones compute-bound, so six heads cost about
three times one per pass, not six.

Why a vectorized per-head L-BFGS and not one L-BFGS on the summed loss
----------------------------------------------------------------------
The summed loss is separable, but a joint L-BFGS couples the heads anyway: one step length for all (a head
near its optimum is dragged along by the line search of a far one), curvature pairs that mix heads (the
inverse-Hessian estimate of one head depends on the others' steps), and one stopping test (a converged head
keeps being evaluated). Here every head runs its own L-BFGS; the heads only share the matrix products:

- each head has its own history (s, y, rho), its own scaling gamma = s'y / y'Py, its own step length and line
  search, its own iteration count and convergence test (max |gradient| <= tol, torch.optim.LBFGS's
  tolerance_grad test);
- a head that converges or stops leaves the active set (its rows are dropped from the state, so the product
  narrows), and a head whose line search has accepted its step is not evaluated again in that iteration.

Preconditioning. Standardized CNN features are strongly correlated, so plain L-BFGS needs hundreds of
iterations at weak penalties. With a preconditioner the fit runs in the eigenbasis of the features'
second-moment matrix Sigma = X'X / m = V diag(lam) V' (m <= 16,384 evenly spaced rows; `Eigenbasis`): the
columns of X V are uncorrelated, so P_g = (c_g Sigma + wd_g I)^-1 is diagonal there, 1 / (c_g lam_j + wd_g)
on every class row of W_g and 1 / c_g on the intercepts, with c_g the mean softmax curvature
p(1 - p) k / (k - 1) at the start (1/k from zeros). At W = 0 this is the exact inverse Hessian up to the
rank-one centering of the classes; it is the L-BFGS initial matrix gamma_g P_g, one elementwise product per
use. With `refresh=r` it is replaced every r iterations by the inverse of the Hessian's diagonal at the
current heads (averaged over the classes), one product of the rows' softmax curvature (kept from the
evaluation that accepted the heads) with X * X, which tracks the curvature as the softmax
saturates. The rotation is orthogonal, so the penalty and the optimum (rotated back) are unchanged; a
caller that fits many grids on one view rotates it once (`rotated=True`). It changes the path, never the
optimum. `precondition=False` gives plain L-BFGS.

Convergence of every head to its own optimum: for wd_g > 0, f_g is strongly convex (modulus wd_g on W; the
data term is convex) and has a Lipschitz gradient; the only flat direction, shifting all intercepts by one
constant, changes neither the loss nor the gradient, and the intercepts' gradient always sums to zero, so
that shift never moves. Preconditioned L-BFGS with a fixed SPD P is L-BFGS in the variables P^-1/2 theta, where
all of this still holds (a refreshed diagonal is again SPD and bounded, which is all the argument uses). Hence
every pair has s'y > 0 (s'y >= wd_g ||s_W||^2), the L-BFGS matrices stay uniformly positive definite with
bounded condition number (Liu & Nocedal 1989, Thm 7.1), every direction is a descent direction with cos(angle to
-gradient) bounded away from 0, and every accepted step decreases f_g by a fixed fraction of what the exact line
minimum would, so f_g converges to its minimum and W_g to the unique minimizer (R-linearly). A pair with s'y <=
1e-10 y'y (only through rounding, or with wd = 0) is not stored.

The line search uses convexity: phi(t) = f_g(theta + t d) is convex with phi'(0) < 0, so a step is accepted
when it satisfies Armijo (phi(t) <= phi(0) + 1e-4 t phi'(0)) or when phi'(t) <= 0 (the step stops short of the
line minimum, so by convexity it decreases f_g; this test uses the gradient, which float32 resolves far better
than a difference of losses near the optimum). Otherwise t shrinks to the secant root of phi' between 0 and
t, safeguarded into [0.1 t, 0.9 t] (exact for a quadratic). The first trial is t = 1 (unpreconditioned and
without history: min(1, 1 / ||g||_1), as torch.optim.LBFGS). A head whose line search fails drops its history
and retries from (preconditioned) steepest descent; failing again it stops with converged=False. A non-finite
loss raises FitDivergedError: never a silent result.

Losses are summed in float64; everything else is float32. On CPU the bookkeeping runs on one thread and only
the passes over X (and the solves) on all of torch's threads: on a busy machine every parallel region of a
small operation otherwise waits for a descheduled thread.

API
---
``fit_l2_grid(X, y, n_classes, weight_decays, ...) -> GridFit`` fits the grid; ``refit_l2(X, y, n_classes,
weight_decay, init=...)`` fits one head warm-started from a chosen one (the refit on all of train);
``grid_accuracy(fit, X, y)`` scores every head with one product; ``Eigenbasis.of`` builds the
preconditioner's basis once for reuse. The tuned protocol itself (choice on validation, refit on all of train)
lives in selection.py.
``X`` is float32, already standardized; torch tensors or numpy arrays; any torch device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .errors import FusionCacheError

_C1 = 1e-4  # Armijo constant
_MAX_LS = 30  # trial steps per line search


class FitDivergedError(FusionCacheError, FloatingPointError):
    """The loss of a head became NaN or inf."""


@dataclass(frozen=True)
class GridFit:
    """The result of fit_l2_grid: one row per weight decay, in the order given."""

    weight_decays: tuple[float, ...]
    coef: np.ndarray  # (G, k, d) float32
    intercept: np.ndarray  # (G, k) float32
    n_iter: np.ndarray  # (G,) int64, L-BFGS iterations
    converged: np.ndarray  # (G,) bool: max |gradient| <= tol
    loss: np.ndarray  # (G,) float64, final objective (mean cross-entropy + penalty)
    grad_max: np.ndarray  # (G,) float64, final max |gradient|
    n_evals: np.ndarray  # (G,) int64, loss+gradient evaluations of each head

    def head(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(coef (k, d), intercept (k,)) of head g."""
        return self.coef[g], self.intercept[g]


def _check_weight_decays(weight_decays) -> tuple[float, ...]:
    try:
        wds = tuple(float(w) for w in weight_decays)
    except (TypeError, ValueError):
        raise ValueError(f"weight_decays must be a sequence of numbers, got {weight_decays!r}") from None
    if not wds:
        raise ValueError("the weight-decay grid is empty; give at least one weight decay (e.g. 1e-2)")
    bad = [w for w in wds if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"weight decays must be finite and >= 0, got {bad[0]!r} in {list(wds)}")
    return wds


def _as_tensors(X, y, n_classes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    dev = torch.device(device) if device is not None else (X.device if isinstance(X, torch.Tensor) else
                                                           torch.device("cpu"))
    X = torch.as_tensor(X)
    if X.dtype != torch.float32:
        raise ValueError(f"X must be float32 (standardized features), got {X.dtype}")
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-d array (n, d), got shape {tuple(X.shape)}")
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be 1-d with one label per row of X ({X.shape[0]}), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class indices, got {y.dtype}")
    if not (isinstance(n_classes, (int, np.integer)) and n_classes >= 2):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"class indices must lie in [0, {n_classes}), got [{int(y.min())}, {int(y.max())}]")
    X = X.to(dev)
    if not bool(torch.isfinite(X.sum())) and not bool(torch.isfinite(X).all()):  # one pass, no n x d mask
        raise ValueError("X holds NaN or inf values")
    return X, y.to(device=dev, dtype=torch.int64)


class _Dense:
    """Every head on every column of X: one product X @ W_all.T per pass, one R.T @ X for the gradient."""

    def __init__(self, X: torch.Tensor):
        self.X = X

    def rows(self, lo: int, hi: int) -> "_Dense":
        """The same design on rows lo:hi (a view, no copy)."""
        return _Dense(self.X[lo:hi])

    def logits(self, W: torch.Tensor, b: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        B, k, d = W.shape
        return torch.addmm(b.reshape(B * k), self.X, W.reshape(B * k, d).T).view(len(self.X), B, k)

    def add_grad_W(self, out: torch.Tensor, R: torch.Tensor, heads: torch.Tensor) -> None:
        """out (B, k, d) += R.T @ X, R (n, B, k)."""
        n, B, k = R.shape
        out.view(B * k, -1).addmm_(R.view(n, B * k).T, self.X)


class _Masked:
    """Head g on the columns where masks[g] holds: the columns every head uses are one wide product, each
    head's own columns a narrow product of their own (the pair search: features.18 for all, one tap each).
    Copies X's columns once, into the shared and the per-head blocks."""

    def __init__(self, X: torch.Tensor, masks: torch.Tensor):
        shared = masks.all(0)
        self.d = X.shape[1]
        self.shared = shared.nonzero().squeeze(1)
        self.Xs = X[:, self.shared].contiguous()
        self.own = [(m & ~shared).nonzero().squeeze(1) for m in masks]
        self.Xo = [X[:, idx].contiguous() for idx in self.own]

    def rows(self, lo: int, hi: int) -> "_Masked":
        """The same design on rows lo:hi (views, no copy)."""
        part = copy.copy(self)
        part.Xs, part.Xo = self.Xs[lo:hi], [x[lo:hi] for x in self.Xo]
        return part

    def logits(self, W: torch.Tensor, b: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        B, k, _ = W.shape
        n = len(self.Xs)
        Z = torch.addmm(b.reshape(B * k), self.Xs, W[:, :, self.shared].reshape(B * k, -1).T).view(n, B, k)
        for j, g in enumerate(heads.tolist()):
            if len(self.own[g]):
                Z[:, j] += self.Xo[g] @ W[j][:, self.own[g]].T
        return Z

    def add_grad_W(self, out: torch.Tensor, R: torch.Tensor, heads: torch.Tensor) -> None:
        n, B, k = R.shape
        out[:, :, self.shared] += (R.reshape(n, B * k).T @ self.Xs).view(B, k, -1)
        for j, g in enumerate(heads.tolist()):
            if len(self.own[g]):
                out[j][:, self.own[g]] += R[:, j].T @ self.Xo[g]


def _row_curvature(P: torch.Tensor) -> torch.Tensor:
    """sum_c p_c (1 - p_c) / k of softmax probabilities P (n, B, k): each row's softmax curvature averaged
    over the classes, (n, B)."""
    return (P - P * P).sum(2).div_(P.shape[2])


def _row_block(X: torch.Tensor) -> int:
    """Rows per block of one evaluation: on CPU a block of X (about 64 MB) is still in cache when the
    gradient product reads it again, so each evaluation streams X from memory once, not twice; on a GPU,
    every row at once."""
    if X.device.type != "cpu":
        return max(1, len(X))
    return max(1024, (64 << 20) // max(1, 4 * X.shape[1]))


def _objective(design, y: torch.Tensor, onehot: torch.Tensor, theta: torch.Tensor, wd: torch.Tensor,
               heads: torch.Tensor, weights: torch.Tensor | None = None, block: int | None = None,
               curvature: bool = False):
    """Loss (B,) float64, gradient (B, p) and curvature of B heads; theta (B, p) = (B, k, d+1), last column the
    intercept. One pass over X in blocks of `block` rows (None: all at once): for each block the logits
    Z = X_b @ W_all.T + b (n_b, B*k), then R = softmax(Z) - onehot(y) and the gradient's R.T @ X_b while X_b
    is still in cache. weights: None (every head's data term is the mean over all rows) or (n, B), each
    column summing to 1 (head b's data term is the weighted mean; a row of weight 0 is not part of its
    problem). curvature: also return the softmax curvature of every row, sum_c p_c (1 - p_c) / k (n, B), which
    the Jacobi preconditioner needs; else None. Returns (loss, None, None) when a loss is not finite."""
    n, k = onehot.shape
    B = theta.shape[0]
    th = theta.view(B, k, -1)
    d = th.shape[2] - 1
    W, b = th[:, :, :d], th[:, :, d]
    grad = torch.zeros_like(th)
    gW = grad[:, :, :d]
    gb = grad[:, :, d]
    data = torch.zeros(B, dtype=torch.float64, device=theta.device)
    curv = torch.empty(n, B, device=theta.device) if curvature else None
    block = block or n
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        part = design if (lo, hi) == (0, n) else design.rows(lo, hi)
        Z = part.logits(W, b, heads)  # (n_b, B, k); softmax by hand: torch's log_softmax over 10 classes is 4x slower
        Z.sub_(Z.amax(2, keepdim=True))
        zy = Z.gather(2, y[lo:hi].view(-1, 1, 1).expand(hi - lo, B, 1)).squeeze(2)
        E = Z.exp_()
        total = E.sum(2, keepdim=True)
        nll = total.squeeze(2).log().sub_(zy)  # -log softmax(Z)_y, (n_b, B)
        R = E.div_(total)  # softmax, in place
        if curvature:
            curv[lo:hi] = _row_curvature(R)
        R.sub_(onehot[lo:hi].unsqueeze(1))  # softmax - onehot
        if weights is None:
            data += nll.sum(0, dtype=torch.float64)
            R.div_(n)
        else:
            w = weights[lo:hi]
            data += (nll * w).sum(0, dtype=torch.float64)
            R.mul_(w.unsqueeze(2))
        del nll, zy, total
        part.add_grad_W(gW, R, heads)
        gb += R.sum(0)
    if weights is None:
        data /= n
    loss = data + 0.5 * wd.double() * W.pow(2).sum((1, 2), dtype=torch.float64)
    if not bool(torch.isfinite(loss).all()):
        return loss, None, None
    gW.add_(wd.view(B, 1, 1) * W)
    return loss, grad.view(B, -1), curv


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1, dtype=torch.float64)


def _direction(g, D, S, Y, rho, gamma, order):
    """-H g by the two-loop recursion, for every active head at once. History slots in `order` (newest
    first); an empty slot has rho = 0 and is a no-op. The initial matrix is gamma * diag(D) (D None: the
    identity)."""
    alphas = []
    q = g.clone()
    for i in order:
        a = rho[:, i] * _dot(S[:, i], q)
        q -= a.to(q.dtype).unsqueeze(1) * Y[:, i]
        alphas.append(a)
    r = gamma.to(q.dtype).unsqueeze(1) * (q if D is None else q * D)
    for i, a in zip(reversed(order), reversed(alphas)):
        b = rho[:, i] * _dot(Y[:, i], r)
        r += (a - b).to(r.dtype).unsqueeze(1) * S[:, i]
    return r.neg_()


def feature_covariance(X, max_rows: int | None = 16384, device=None) -> torch.Tensor:
    """X.T @ X / m over m <= max_rows evenly spaced rows of X (all rows when max_rows is None): the d x d
    second-moment matrix the preconditioner of fit_l2_grid is built from. Compute it once and pass it as
    `precondition=` to fit several grids (and the refit) on the same standardized features."""
    X = torch.as_tensor(X, device=device)
    n = X.shape[0]
    if max_rows is not None and n > max_rows:
        X = X[torch.linspace(0, n - 1, max_rows, device=X.device).long()]
    return (X.T @ X).div_(len(X))


@dataclass(frozen=True)
class Eigenbasis:
    """Sigma = V diag(lam) V' of standardized features (Sigma from feature_covariance). In the basis V the
    columns of X V are uncorrelated with second moments lam, so the preconditioner (c Sigma + wd I)^-1 of every
    head is diagonal there: one rotation of X per view replaces a Cholesky factor per head and two
    triangular solves per head and iteration. Rotation is orthogonal: ||W||^2 and the optimum (rotated back)
    are unchanged."""

    V: torch.Tensor | None  # (d, d) float32, orthonormal eigenvectors in columns; None: only for features
    # already rotated (rotated=True), where the fit needs nothing but lam
    lam: torch.Tensor  # (d,) float32, eigenvalues >= 0

    @classmethod
    def of(cls, X, max_rows: int | None = 16384, device=None) -> "Eigenbasis":
        """The eigenbasis of feature_covariance(X, max_rows)."""
        return cls.from_covariance(feature_covariance(X, max_rows, device))

    @classmethod
    def from_covariance(cls, cov) -> "Eigenbasis":
        cov = torch.as_tensor(cov, dtype=torch.float32)
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not bool(torch.isfinite(cov).all()):
            raise ValueError(f"the covariance must be a finite square matrix, got shape {tuple(cov.shape)}")
        lam, V = torch.linalg.eigh(cov)
        return cls(V.contiguous(), lam.clamp(min=0))

    @property
    def dim(self) -> int:
        return int(self.lam.shape[0])

    def rotate(self, X) -> torch.Tensor:
        """X V: features (or coefficients, rows = classes) into the basis."""
        X = torch.as_tensor(X)
        return X @ self.V.to(X.device)

    def unrotate(self, Xb) -> torch.Tensor:
        """Xb V': back from the basis."""
        Xb = torch.as_tensor(Xb)
        return Xb @ self.V.to(Xb.device).T


class _DiagonalPreconditioner:
    """P_g = (c_g lam + wd_g)^-1 on each column of every class row of W_g and 1 / c_g on the intercepts, in the
    eigenbasis of the features (lam their variances there), with c_g the mean softmax curvature
    p(1 - p) k / (k - 1) at the start (1/k at zero): the exact inverse Hessian of head g at W = 0 up to the
    rank-one centering of the classes. `jacobi` replaces it by the inverse of the Hessian's exact diagonal
    at the current heads: one product with X * X, from the rows' curvature that the evaluation of those
    heads kept (or one more pass over X to compute it)."""

    def __init__(self, lam: torch.Tensor, c: torch.Tensor, wd: torch.Tensor, k: int):
        d = lam.shape[0]
        self.k, self.d, self.wd = k, d, wd
        self.floor = 1e-6 * lam.mean().clamp(min=1e-12)
        c = c.to(torch.float32).view(-1, 1)
        D = torch.empty(len(c), d + 1, device=lam.device)
        D[:, :d] = 1.0 / (c * lam.view(1, d) + wd.view(-1, 1) + c * self.floor)
        D[:, d] = 1.0 / c.view(-1)
        self.D = D
        self._X2 = None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """(a, k (d + 1)): the diagonal of heads idx, per parameter."""
        return self.D[idx].unsqueeze(1).expand(len(idx), self.k, self.d + 1).reshape(len(idx), -1).contiguous()

    def jacobi(self, design, X: torch.Tensor, theta: torch.Tensor, idx: torch.Tensor, weights=None,
               curv: torch.Tensor | None = None) -> torch.Tensor:
        """(a, k (d + 1)): 1 / the Hessian's diagonal of heads idx at theta, averaged over the classes:
        mean_ic p_ic (1 - p_ic) x_ij^2 + wd for column j (the mean over each head's rows: weights (n, a) as in
        _objective). One value for every class keeps the steps off the loss's flat direction (the same
        shift of every class's intercepts). curv: the rows' curvature at theta from the evaluation that
        accepted it (n, a), as _objective returns it; None: one more pass over X computes it."""
        if self._X2 is None:
            self._X2 = X * X
        n, d, k, a = X.shape[0], self.d, self.k, len(idx)
        if curv is None:
            th = theta.view(a, k, d + 1)
            curv = _row_curvature(torch.softmax(design.logits(th[:, :, :d], th[:, :, d], idx), dim=2))
        curv = curv / n if weights is None else curv * weights
        H = torch.empty(a, d + 1, device=X.device)
        H[:, :d] = curv.T @ self._X2
        H[:, d] = curv.sum(0)
        H[:, :d] += self.wd[idx].view(a, 1) + self.floor
        D = H.clamp_(min=1e-12).reciprocal_()
        return D.unsqueeze(1).expand(a, k, d + 1).reshape(a, -1).contiguous()


@contextmanager
def _threads(n: int | None):
    """Run the enclosed torch CPU work on n threads (None: as it is). The L-BFGS bookkeeping (many small
    vector operations) runs on one thread and only the passes over X on all: on a busy machine every parallel
    region waits for a descheduled thread, which makes a 100 kB dot product take milliseconds."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit_l2_grid(X, y, n_classes: int, weight_decays: Sequence[float], *, max_iter: int = 1000, tol: float = 1e-5,
                history: int = 10, init=None, device=None, precondition=True,
                precondition_rows: int | None = 16384, rotated: bool = False, refresh: int = 0,
                masks=None, rows=None) -> GridFit:
    """Fit one L2-regularized softmax-regression head per weight decay, all together.

    X: (n, d) float32, already standardized (torch tensor or numpy array). y: (n,) class indices in
    [0, n_classes). weight_decays: the grid (any order; results come back in that order). max_iter: L-BFGS
    iterations per head. tol: a head has converged when max |gradient| <= tol (torch.optim.LBFGS's
    tolerance_grad test). history: L-BFGS pairs kept per head (10, scipy's default; 20 saved no iterations
    on CIFAR-10 features). init: None (zeros) or (coef, intercept) with coef (G, k, d) or (k, d) (the same
    start for every head) and intercept (G, k) or (k,). device: torch device; default X's device. precondition: True (the Eigenbasis of feature_covariance of precondition_rows
    rows of X), an Eigenbasis or a (d, d) covariance from feature_covariance (reuse), or False (plain L-BFGS
    with the scaled identity). It changes the path, never the optimum. With a basis, X (and init) are
    rotated into it, the fit runs there with a diagonal preconditioner, and the coefficients come back
    rotated out; rotated=True says X and init are already in the given Eigenbasis (one rotation per view,
    shared by many fits), and the coefficients stay in it. The convergence test applies in the basis the
    fit runs in. refresh: every so many iterations the diagonal preconditioner becomes the inverse of the
    Hessian's diagonal at the current heads (0: never). masks: None, or (G, d) bools: head g uses only the
    columns where masks[g] is True, its other weights stay 0 (one wide product serves heads on different
    column subsets, e.g. the pair search's [tap, features.18] candidates over all taps). rows: None (every
    head fits every row of X), or (G, n) bools: head g fits only the rows where rows[g] holds (its data term
    is the mean over them), so heads on different row subsets, e.g. the fit rows of several validation
    splits, share each pass over X.
    """
    wds = _check_weight_decays(weight_decays)
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not (isinstance(history, (int, np.integer)) and history >= 1):
        raise ValueError(f"history must be a positive integer, got {history!r}")
    X, y = _as_tensors(X, y, n_classes, device)
    dev = X.device
    n, d = X.shape
    basis = _basis(precondition, X, precondition_rows)
    if rotated and not isinstance(precondition, Eigenbasis):
        raise ValueError("rotated=True needs precondition= the Eigenbasis the features were rotated into")
    if basis is not None and not rotated:
        if basis.V is None:
            raise ValueError("an Eigenbasis without V serves only features already rotated (rotated=True)")
        X = basis.rotate(X)
    G, k, p = len(wds), int(n_classes), int(n_classes) * (d + 1)
    theta = torch.zeros(G, k, d + 1, device=dev)
    if init is not None:
        coef, intercept = (torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a,
                                           dtype=torch.float32) for a in init)
        if coef.shape[-2:] != (k, d) or coef.ndim not in (2, 3) or (coef.ndim == 3 and coef.shape[0] != G):
            raise ValueError(f"init coef must have shape ({G}, {k}, {d}) or ({k}, {d}), got {tuple(coef.shape)}")
        if intercept.shape[-1:] != (k,) or intercept.ndim != coef.ndim - 1 or (intercept.ndim == 2 and
                                                                                intercept.shape[0] != G):
            raise ValueError(f"init intercept must have shape ({G}, {k}) or ({k},), got {tuple(intercept.shape)}")
        if not (torch.isfinite(coef).all() and torch.isfinite(intercept).all()):
            raise ValueError("init holds NaN or inf values")
        coef = coef.to(dev)
        theta[:, :, :d] = basis.rotate(coef) if basis is not None and not rotated else coef
        theta[:, :, d] = intercept.to(dev)
    if masks is not None:
        if basis is not None and not rotated:
            raise ValueError("masks need the columns the fit runs on: pass X rotated (rotated=True, each masked "
                             "block rotated on its own) or precondition=False")
        masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
        if masks.shape != (G, d) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be ({G}, {d}) bools, got {tuple(masks.shape)} {masks.dtype}")
        masks = masks.to(dev)
        theta[:, :, :d] *= masks.unsqueeze(1)
    design = _Dense(X) if masks is None else _Masked(X, masks)
    row_weights = None
    if rows is not None:
        rows = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows)
        if rows.shape != (G, n) or rows.dtype != torch.bool:
            raise ValueError(f"rows must be ({G}, {n}) bools, got {tuple(rows.shape)} {rows.dtype}")
        counts = rows.sum(1)
        if bool((counts == 0).any()):
            raise ValueError(f"head {int(torch.nonzero(counts == 0)[0])} has no rows to fit")
        row_weights = (rows.float() / counts.unsqueeze(1).float()).T.contiguous().to(dev)  # (n, G)
    wd_all = torch.tensor(wds, dtype=torch.float32, device=dev)
    onehot = torch.zeros(n, k, device=dev)
    onehot[torch.arange(n, device=dev), y] = 1.0

    full, small = (torch.get_num_threads(), 1) if dev.type == "cpu" else (None, None)
    block = _row_block(X)

    def evaluate(heads: torch.Tensor, th: torch.Tensor, curvature: bool = False):
        with _threads(full):
            loss, grad, curv = _objective(design, y, onehot, th, wd_all[heads], heads,
                                          None if row_weights is None else row_weights[:, heads], block, curvature)
        if grad is None:
            bad = int(heads[~torch.isfinite(loss)][0])
            raise FitDivergedError(f"the L-BFGS fit with weight decay {wds[bad]:g} diverged (its loss became NaN "
                                   "or inf); check the features are standardized, or use a larger weight decay")
        return loss, grad, curv

    # the state of the active heads, compacted: row j is head ids[j]; rows leave when their head stops
    ids = torch.arange(G, device=dev)
    theta = theta.view(G, p)
    f, g, _ = evaluate(ids, theta)
    precond = None
    if basis is not None:
        sub = X if precondition_rows is None or n <= precondition_rows else \
            X[torch.linspace(0, n - 1, precondition_rows, device=dev).long()]
        th = theta.view(G, k, d + 1)
        prob = torch.softmax(torch.addmm(th[:, :, d].reshape(G * k), sub, th[:, :, :d].reshape(G * k, d).T)
                             .view(len(sub), G, k), dim=2)
        c = (prob * (1 - prob)).mean((0, 2)).double() * k / (k - 1)
        del sub, prob
        precond = _DiagonalPreconditioner(basis.lam.to(dev), c.clamp(min=1e-4), wd_all, k)

    D = None if precond is None else precond(ids)
    S = torch.zeros(G, history, p, device=dev)
    Yh = torch.zeros(G, history, p, device=dev)
    rho = torch.zeros(G, history, dtype=torch.float64, device=dev)
    gamma = torch.ones(G, dtype=torch.float64, device=dev)
    ptr = 0  # the slot the next pair goes to, shared by all heads (a head that skips a round leaves it empty)
    has_history = (rho != 0).any(1)

    out_theta = torch.empty(G, p, device=dev)
    out_f = torch.empty(G, dtype=torch.float64, device=dev)
    out_gmax = torch.empty(G, dtype=torch.float64, device=dev)
    converged = np.zeros(G, dtype=bool)
    n_iter = np.zeros(G, dtype=np.int64)
    n_evals = np.ones(G, dtype=np.int64)
    gmax = g.abs().amax(1).double()
    done = gmax <= tol

    def refresh_due(i: int) -> bool:  # the Jacobi preconditioner is refreshed at the start of iteration i + 1
        return bool(refresh) and precond is not None and i > 0 and i % refresh == 0

    it = 0
    curv = None  # (n, active heads): the rows' softmax curvature at the current heads, when a refresh is next
    with _threads(small):
        while True:
            if bool(done.any()):  # write out the heads that stopped, keep the others
                gone = ids[done]
                out_theta[gone], out_f[gone], out_gmax[gone] = theta[done], f[done], gmax[done]
                converged[gone.cpu().numpy()] = (gmax[done] <= tol).cpu().numpy()
                keep = ~done
                ids, theta, f, g, gmax = ids[keep], theta[keep], f[keep], g[keep], gmax[keep]
                S, Yh, rho, gamma, has_history = S[keep], Yh[keep], rho[keep], gamma[keep], has_history[keep]
                if D is not None:
                    D = D[keep]
                if curv is not None:
                    curv = curv[:, keep]
            if len(ids) == 0:
                break
            a = len(ids)
            order = [(ptr - 1 - i) % history for i in range(history)]
            if refresh_due(it):
                with _threads(full):
                    D = precond.jacobi(design, X, theta, ids,
                                       None if row_weights is None else row_weights[:, ids], curv)
                gamma[:] = 1
            it += 1
            # the next refresh needs the rows' curvature at the points this line search accepts: keep it
            want = refresh_due(it)
            curv = torch.empty(n, a, device=dev) if want else None
            dA = _direction(g, D, S, Yh, rho, gamma, order)
            dphi0 = _dot(g, dA)
            bad = ~(dphi0 < 0)  # not a descent direction (rounding): restart from (preconditioned) steepest descent
            if bool(bad.any()):
                rho[bad], gamma[bad], has_history[bad] = 0, 1, False
                dA[bad] = -(g[bad] if D is None else g[bad] * D[bad])
                dphi0 = _dot(g, dA)
            t = torch.ones(a, dtype=torch.float64, device=dev)
            if precond is None:  # steepest descent: the first step of torch.optim.LBFGS
                fresh = ~has_history
                t[fresh] = torch.clamp(1.0 / g[fresh].abs().sum(1, dtype=torch.float64), max=1.0)
            new_theta, new_f, new_g = torch.empty_like(theta), f.clone(), torch.empty_like(g)
            accepted = torch.zeros(a, dtype=torch.bool, device=dev)
            pending = torch.arange(a, device=dev)
            for _ in range(_MAX_LS):
                th = theta[pending] + t[pending].to(torch.float32).unsqueeze(1) * dA[pending]
                fT, gT, cT = evaluate(ids[pending], th, want)
                n_evals[ids[pending].cpu().numpy()] += 1
                dphiT = _dot(gT, dA[pending])
                ok = (fT <= f[pending] + _C1 * t[pending] * dphi0[pending]) | (dphiT <= 0)
                acc = pending[ok]
                accepted[acc] = True
                new_f[acc], new_g[acc], new_theta[acc] = fT[ok], gT[ok], th[ok]
                if want:
                    curv[:, acc] = cT[:, ok]
                if bool(ok.all()):
                    break
                rest = ~ok
                pr = pending[rest]
                tr = t[pr]
                secant = tr * dphi0[pr] / (dphi0[pr] - dphiT[rest])
                t[pr] = torch.minimum(torch.maximum(secant, 0.1 * tr), 0.9 * tr)
                pending = pr
            # a failed line search: drop the head's history and retry from steepest descent; without history, stop
            failed = ~accepted
            stop = failed & ~has_history
            retry = failed & has_history
            rho[retry], gamma[retry], has_history[retry] = 0, 1, False
            if not bool(accepted.all()):
                curv = None  # a head kept its old point: the refresh computes every head's curvature itself
            # the new pair goes to slot ptr for every head that has one; the others leave it empty
            rho[:, ptr] = 0
            if bool(accepted.any()):
                s = new_theta[accepted] - theta[accepted]
                yv = new_g[accepted] - g[accepted]
                sy, yy = _dot(s, yv), _dot(yv, yv)
                upd = torch.zeros(a, dtype=torch.bool, device=dev)
                upd[accepted] = sy > 1e-10 * yy
                keep = upd[accepted]
                if bool(keep.any()):
                    S[upd, ptr], Yh[upd, ptr], rho[upd, ptr] = s[keep], yv[keep], 1.0 / sy[keep]
                    gamma[upd] = sy[keep] / (yy[keep] if D is None else _dot(yv[keep], yv[keep] * D[upd]))
                    has_history[upd] = True
                theta[accepted], f[accepted], g[accepted] = new_theta[accepted], new_f[accepted], new_g[accepted]
                gmax[accepted] = new_g[accepted].abs().amax(1).double()
                n_iter[ids[accepted].cpu().numpy()] += 1
            ptr = (ptr + 1) % history
            at_max = torch.from_numpy(n_iter[ids.cpu().numpy()] >= max_iter).to(dev)
            done = (gmax <= tol) | at_max | stop

    out = out_theta.view(G, k, d + 1)
    coef = out[:, :, :d]
    if basis is not None and not rotated:
        coef = basis.unrotate(coef)
    return GridFit(
        weight_decays=wds,
        coef=coef.cpu().numpy().astype(np.float32),
        intercept=out[:, :, d].cpu().numpy().astype(np.float32),
        n_iter=n_iter, converged=converged, loss=out_f.cpu().numpy(), grad_max=out_gmax.cpu().numpy(),
        n_evals=n_evals,
    )


def _basis(precondition, X: torch.Tensor, rows: int | None) -> Eigenbasis | None:
    d = X.shape[1]
    if precondition is False:
        return None
    if precondition is True:
        return Eigenbasis.of(X, rows)
    if isinstance(precondition, Eigenbasis):
        basis = precondition
    else:
        cov = torch.as_tensor(precondition, dtype=torch.float32)
        if cov.shape != (d, d):
            raise ValueError(f"precondition must be True, False, an Eigenbasis or a ({d}, {d}) covariance, got "
                             f"shape {tuple(cov.shape)}")
        basis = Eigenbasis.from_covariance(cov)
    if basis.dim != d:
        raise ValueError(f"the Eigenbasis is for {basis.dim} features, X has {d}")
    return Eigenbasis(None if basis.V is None else basis.V.to(X.device), basis.lam.to(X.device))


def refit_l2(X, y, n_classes: int, weight_decay: float, init=None, **kwargs) -> GridFit:
    """One head at one weight decay, warm-started from init=(coef (k, d), intercept (k,)) when given:
    the refit on all of train from the head chosen on validation. Same keywords as fit_l2_grid."""
    if init is not None:
        coef, intercept = init
        init = (np.asarray(coef, np.float32).reshape(1, *np.shape(coef)[-2:]),
                np.asarray(intercept, np.float32).reshape(1, -1))
    return fit_l2_grid(X, y, n_classes, [weight_decay], init=init, **kwargs)


def grid_logits(fit: GridFit, X, device=None) -> torch.Tensor:
    """Logits of every head, (n, G, k), with one matrix product."""
    X = torch.as_tensor(X, device=device)
    G, k, d = fit.coef.shape
    W = torch.from_numpy(fit.coef).to(X.device).reshape(G * k, d)
    b = torch.from_numpy(fit.intercept).to(X.device).reshape(G * k)
    return torch.addmm(b, X, W.T).view(len(X), G, k)


def grid_accuracy(fit: GridFit, X, y, device=None) -> np.ndarray:
    """Accuracy of every head on (X, y), (G,) float64."""
    z = grid_logits(fit, X, device)
    y = torch.as_tensor(y, device=z.device).view(-1, 1)
    return (z.argmax(2) == y).double().mean(0).cpu().numpy()
