"""`logreg`: the scikit-learn baseline, StandardScaler + multinomial L2 LogisticRegression (lbfgs)."""

from __future__ import annotations

import math

import numpy as np

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits


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


def pipeline_linear_form(estimator: Pipeline) -> dict:
    """The fitted pipeline as (coef, intercept, mean, scale), one row per class."""
    scaler, lr = estimator[0], estimator[-1]
    coef, intercept = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; softmax over [0, z] gives the same probabilities
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept]).astype(np.float32)
    return {"coef": coef, "intercept": intercept, "mean": scaler.mean_.astype(np.float32),
            "scale": scaler.scale_.astype(np.float32)}
