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

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FusionCacheError, quote

# Each head's module is imported when it is first used (torch and scikit-learn load only then), so the command
# line reads the registry without them.
_LAZY = {"KNNHead": "knn", "LinearHead": "linear", "OneThreadLogisticRegression": "logreg", "make_logreg": "logreg",
         "RidgeHead": "ridge"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def linear_form(estimator) -> dict[str, np.ndarray]:
    """Reduce a fitted head to logits = ((x - mean) / scale) @ coef.T + intercept, one row per class: the
    estimator's own `linear_form()` (linear, ridge), or the logreg pipeline's scaler and coefficients."""
    own = getattr(estimator, "linear_form", None)
    if callable(own):
        return own()
    from sklearn.pipeline import Pipeline

    if not isinstance(estimator, Pipeline):
        what = "a kNN head" if type(estimator).__name__ == "KNNHead" else f"a {type(estimator).__name__}"
        raise TypeError(f"{what} has no linear form (a kNN head keeps its training set); only the "
                        f"{', '.join(h for h, spec in HEAD_SPECS.items() if spec.has_linear_form)} heads can be "
                        "reduced to coef and intercept")
    from .logreg import pipeline_linear_form

    return pipeline_linear_form(estimator)


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
    family: str = "l2"  # the tuned protocol's solver: "l2" (one stacked L2 grid), "neighbours" (one top-k search)
    # or "closed_form" (every grid point from one eigendecomposition, probe.tune)
    min_classes: int = 2  # classes the rows it is fit on must hold
    tuned_min_classes: int = 2  # the same in the tuned protocol (its stacked L2 grid needs two)
    rows_option: str | None = None  # an option that cannot exceed the rows it is fit on (knn's k)
    records_epochs: bool = False  # fit(X, y, eval_set=...) records train and test metrics per epoch in history_
    has_train_score: bool = True  # False: a training score says nothing (knn: each row is its own neighbour)
    has_linear_form: bool = True  # linear_form() reduces it to coef and intercept: it can be saved, and can diverge
    has_loss: bool = True  # predict_proba gives probabilities, so a log loss is defined (ridge gives scores)
    streams: bool = False  # fits from chunks of rows read straight from the cache (probe.py): memory O(d^2)
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
    from .linear import LinearHead

    return LinearHead(random_state=seed, **options)


def _logreg(seed, **options):
    from .logreg import make_logreg

    return make_logreg(random_state=seed, **options)


def _knn(seed, **options):  # deterministic: no seed
    from .knn import KNNHead

    return KNNHead(**options)


def _ridge(seed, **options):  # closed form: no seed
    from .ridge import RidgeHead

    return RidgeHead(**options)


# ridge's alpha: 10^3 down to 10^-5, a quarter decade apart (33 points cost one eigendecomposition)
RIDGE_GRID = tuple(float(f"{10 ** (3 - 0.25 * i):.6g}") for i in range(33))

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
        HeadSpec("ridge", _ridge, "alpha", RIDGE_GRID, ("alpha", "standardize", "chunk_rows"), ("alpha",), False,
                 description="least squares on one-hot targets, standardized, closed form; streams from the cache",
                 family="closed_form", min_classes=2, has_loss=False, streams=True),
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
