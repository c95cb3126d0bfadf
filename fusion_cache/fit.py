"""Train heads on a cache view, record per-epoch metrics with provenance, save heads, and run ablations.

What a head can do and what it needs comes from its declaration in heads.HEAD_SPECS: no function here branches on
a head's name. `check_heads` checks every head's preconditions against a cache's labels before any features
are read; `fit_head`, `ablate` and `ablate_caches` call it first. `offered`, where a function takes it, is the
option names of the command that runs it, so that an error's advice names only those.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import log_loss

from .cache import Cache
from .errors import FusionCacheError, quote
from .fewshot import header as fewshot_line
from .fewshot import largest_k, spread
from .headfile import HEAD_FILE, HeadFile
from .headfile import save_head as write_head_file
from .heads import HEAD_SPECS, HEADS, check_can_fit, divergence_advice, drop_advice, flag, linear_form, offers
from . import stats
from .io import atomic_write_text, dumps_json, staged_folder
from .predictions import (PREDICTIONS_FILE, Baseline, bootstrap_record, correct, prediction_arrays, public,
                          run_interval, save_predictions, table_stats)


@dataclass
class HeadParams:
    """The head options a command was given (defaults: the case study's protocol). Each head takes the ones
    its declaration in heads.HEAD_SPECS lists; the estimators validate their own values."""

    epochs: int = 2  # the case study trains 2 epochs
    lr: float = 1e-3  # Adam's default, as in the case study
    batch_size: int = 32
    weight_decay: float = 0.0
    standardize: bool = False  # the case study feeds raw pooled features
    solver: str = "adam"  # adam (mini-batches) | lbfgs (full batch, converged)
    max_iter: int = 200  # L-BFGS iterations (solver="lbfgs")
    C: float = 0.1  # inverse L2 strength of the logreg baseline
    k: int = 20  # neighbours of the knn head
    alpha: float = 0.1  # L2 strength per training row of the ridge head
    device: str = "cpu"

    def check(self) -> None:
        if self.epochs < 1:
            raise FusionCacheError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise FusionCacheError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise FusionCacheError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise FusionCacheError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.C > 0:
            raise FusionCacheError(f"--C must be positive, got {self.C}")
        if self.solver not in ("adam", "lbfgs"):
            raise FusionCacheError(f"unknown --solver '{self.solver}'; use adam or lbfgs")
        if self.k < 1:
            raise FusionCacheError(f"--k must be at least 1, got {self.k}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise FusionCacheError(f"--alpha must be a number >= 0, got {self.alpha}")

    def for_head(self, head: str) -> dict:
        """The options `head` takes, as its declaration lists them."""
        spec = head_spec(head)
        return {o: getattr(self, o) for o in spec.command_options}


@dataclass
class FitResult:
    head: str
    view: str
    features: list[str]  # the taps, in order
    dim: int
    seed: int
    params: dict
    epochs: list[dict]  # {epoch, train_loss, train_acc, test_loss, test_acc}; one row for logreg
    train_loss: float | None  # None for knn (each training row is its own neighbour)
    train_acc: float | None
    test_loss: float
    test_acc: float
    fit_seconds: float
    fingerprint: str
    provenance: dict = field(default_factory=dict)
    estimator: object = field(default=None, repr=False)
    fewshot: dict | None = None  # the draw the head trained on (fewshot.Draw.record); None: all of train
    test_pred: np.ndarray | None = field(default=None, repr=False)  # predicted class indices (int64) on the test
    # split, in the cache's test order: what its interval and every comparison with another run are computed from
    test_acc_lo: float | None = None  # the 95 % bootstrap interval of test_acc (add_interval)
    test_acc_hi: float | None = None
    bootstrap: dict | None = None  # how the interval was drawn (predictions.bootstrap_record)

    def add_interval(self, y_test: np.ndarray, resamples: int = stats.RESAMPLES,
                     seed: int = stats.BOOTSTRAP_SEED) -> stats.Interval | None:
        """test_acc_lo and test_acc_hi from the test predictions: the percentile bootstrap over the test
        images (stats.accuracy_interval of this one run); None without predictions."""
        if self.test_pred is None:
            return None
        iv = stats.accuracy_interval(correct(self.test_pred, y_test), resamples, seed)
        self.test_acc_lo, self.test_acc_hi, self.bootstrap = iv.lo, iv.hi, bootstrap_record(resamples, seed)
        return iv

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("estimator")
        d.pop("test_pred")  # in predictions.npz where a command saves them, never in JSON
        if d["fewshot"] is None:
            d.pop("fewshot")
        if d["bootstrap"] is None:
            for k in ("test_acc_lo", "test_acc_hi", "bootstrap"):
                d.pop(k)
        return d


def head_spec(head: str):
    if head not in HEAD_SPECS:
        raise FusionCacheError(f"unknown head {quote(head)}; use one of {', '.join(HEADS)}")
    return HEAD_SPECS[head]


def make_head(head: str, params: HeadParams, seed: int):
    """An unfitted head, built from its declaration with the options it takes."""
    return head_spec(head).build(seed, **params.for_head(head))


def provenance(cache: Cache) -> dict:
    """What a result records about its features: the cache's path and its whole typed metadata."""
    meta = cache.meta.as_dict()
    for state in ("complete", "schema_version"):
        meta.pop(state)
    return {"cache": str(cache.path), **meta}


@dataclass(frozen=True)
class ViewData:
    """One view of a cache, loaded: its taps and the train and test matrices."""

    view: str
    taps: list[str]
    X_train: np.ndarray  # (n, d) float32
    y_train: np.ndarray  # (n,) int64 class indices
    X_test: np.ndarray
    y_test: np.ndarray
    val_rows: np.ndarray | None = None  # train rows of the dataset's own validation split (None: none given);
    # for a few-shot draw (fewshot.TuningDraw), the rows of the draw's validation that choose the tuned parameter
    refit_rows: np.ndarray | None = None  # the train rows the tuned protocol's final head trains on and takes its
    # standardization statistics from (None: all of them); a few-shot draw beside the dataset's own validation split

    @property
    def dim(self) -> int:
        return int(self.X_train.shape[1])


def check_labels(cache: Cache, y_train: np.ndarray, y_test: np.ndarray) -> None:
    """Refuses an empty split and a class with no training rows (which no head can learn)."""
    if len(y_train) == 0 or len(y_test) == 0:
        raise FusionCacheError(f"{cache.path} has an empty split (train {len(y_train)}, test {len(y_test)}); "
                               "re-extract it")
    counts = np.bincount(y_train, minlength=len(cache.classes))
    if (counts == 0).any():
        missing = [cache.classes[i] for i in np.flatnonzero(counts == 0)]
        skipped = sum(len(v) for v in cache.meta.skipped.values())
        why = f" ({skipped} unreadable images were skipped)" if skipped else ""
        raise FusionCacheError(
            f"class {quote(missing[0])} has no training rows in {cache.path}{why}; every class needs training images: "
            "fix or add its images and re-extract"
        )


def check_heads(cache: Cache, heads: list[str], params: HeadParams, offered=None, where: str | None = None) -> None:
    """Every precondition of every head on the cache's labels (cheap to read; features are not): both splits
    hold rows, every class has training rows, and each head can be fit on the training rows with the options
    `params` gives it (heads.check_can_fit)."""
    y_train = cache.labels("train")
    check_labels(cache, y_train, cache.labels("test"))
    check_can_fit(heads, y_train, {h: params.for_head(h) for h in heads if h in HEAD_SPECS},
                  where=where or str(cache.path), offered=offered)


def load_view(cache: Cache, view: str) -> ViewData:
    """A view's train and test data; refuses empty splits, NaN or inf features, and classes with no
    training rows (which no head can learn)."""
    taps = cache.view_taps(view)
    Xtr, ytr = cache.view(view, "train")
    Xte, yte = cache.view(view, "test")
    check_labels(cache, ytr, yte)
    for split, X in (("train", Xtr), ("test", Xte)):
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        if bad:
            raise FusionCacheError(f"{cache.path}: {bad} {split} rows of view '{view}' hold NaN or inf features; "
                                   "re-extract with --precision fp32 and --force")
    return ViewData(view, taps, Xtr, ytr, Xte, yte, cache.validation_rows())


def fit_head(cache: Cache, view: str = "fused", head: str = "linear", params: HeadParams | None = None,
             seed: int = 0, data: ViewData | None = None, offered=None) -> FitResult:
    """Fit one head on one view of the cache and measure it on the test split. Without `data`, the head's
    preconditions are checked on the labels before the view's features are read; with it, on its labels."""
    params = params or HeadParams()
    params.check()
    spec = head_spec(head)
    if data is None:
        check_heads(cache, [head], params, offered, where=f"'{view}'")
        if spec.streams:  # read in chunks straight from the cache: a view larger than memory fits
            return _fit_streamed(cache, view, head, params, seed)
        data = load_view(cache, view)
    else:
        check_can_fit([head], data.y_train, {head: params.for_head(head)}, where=f"'{view}'", offered=offered)
        if spec.streams:
            return _fit_streamed(cache, view, head, params, seed, data)
    taps, Xtr, ytr, Xte, yte = data.taps, data.X_train, data.y_train, data.X_test, data.y_test
    est = make_head(head, params, seed)
    start = time.perf_counter()
    if spec.records_epochs:
        est.fit(Xtr, ytr, eval_set=(Xte, yte))
        seconds = time.perf_counter() - start
        epochs = est.history_
        last = epochs[-1]
        train_loss, train_acc, test_loss, test_acc = (last["train_loss"], last["train_acc"], last["test_loss"],
                                                       last["test_acc"])
        test_pred = est.predict(Xte)
    else:
        est.fit(Xtr, ytr)
        seconds = time.perf_counter() - start
        labels = est.classes_
        if not spec.has_train_score:  # knn: every training row is its own nearest neighbour, so a training
            train_loss = train_acc = None  # score says nothing (and would cost an n_train x n_train matrix)
        else:
            train_loss = float(log_loss(ytr, est.predict_proba(Xtr), labels=labels))
            train_acc = float(est.score(Xtr, ytr))
        test_loss = float(log_loss(yte, est.predict_proba(Xte), labels=labels))
        test_pred = est.predict(Xte)  # once: knn's predictions cost a top-k search
        test_acc = float(np.mean(test_pred == yte))  # est.score(Xte, yte), from the same predictions
        epochs = [{"epoch": 1, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                   "test_acc": test_acc}]
    used = params.for_head(head)
    for option, (other, value) in spec.applies_when.items():
        if used.get(other) != value:
            used.pop(option, None)
    _check_converged(head, epochs, est, params, offered)
    return FitResult(head, view, taps, int(Xtr.shape[1]), seed, used, epochs, train_loss, train_acc, test_loss,
                     test_acc, seconds, cache.fingerprint, provenance(cache), est,
                     test_pred=np.asarray(test_pred, dtype=np.int64))


def _fit_streamed(cache: Cache, view: str, head: str, params: HeadParams, seed: int,
                  data: ViewData | None = None) -> FitResult:
    """`fit_head` for a head that streams (HeadSpec.streams): from the cache chunk by chunk, or from `data`
    (a loaded view or a few-shot draw) in the same chunks. It has no loss (scores, not probabilities) and no
    epochs: one closed-form solve."""
    from . import probe

    rows = probe.CacheRows(cache, view) if data is None else probe.MemoryRows(data)
    fitted = probe.fit(rows, params.alpha, len(cache.classes))
    ytr, yte = rows.labels("train"), rows.labels("test")
    train_acc = float(np.mean(fitted.train_pred == ytr))
    test_acc = float(np.mean(fitted.test_pred == yte))
    epochs = [{"epoch": 1, "train_loss": None, "train_acc": train_acc, "test_loss": None, "test_acc": test_acc}]
    est = fitted.estimator
    if not all(np.isfinite(a).all() for a in linear_form(est).values()):
        raise FusionCacheError(f"the {head} head's solution is not finite on '{view}'; "
                               "re-extract with --precision fp32 and --force")
    result = FitResult(head, view, rows.taps, rows.dim, seed, params.for_head(head), epochs, None, train_acc, None,
                       test_acc, fitted.fit_seconds, cache.fingerprint, provenance(cache), est)
    result.test_pred = fitted.test_pred
    return result


def check_fewshot(cache: Cache, heads: list[str], params: HeadParams | None, fewshot, seeds: list[int],
                  offered=None) -> dict:
    """The few-shot protocol's preconditions from the cache's labels alone (no features): K and N are valid, every
    class holds K train images outside the dataset's own validation split, and every head can be fit on a draw
    (K rows a class) with the options `params` gives it. Returns {(seed, draw): fewshot.Draw}."""
    draws = fewshot.draws_of(cache, seeds)
    values = None if params is None else {h: params.for_head(h) for h in heads if h in HEAD_SPECS}
    k, n_classes = fewshot.train_per_class, len(cache.classes)
    check_draw_rows(heads, values, k * n_classes, k, lambda value: -(-value // n_classes), offered,
                    k_max=largest_k(cache))
    check_can_fit(heads, fewshot.labels(n_classes), values, offered=offered,
                  where=f"a draw of {k} images a class (--train-per-class)")
    return draws


def check_draw_rows(heads: list[str], values: dict | None, n_rows: int, k: int, k_for, offered=None,
                    rows: str = "training", k_max: int | None = None) -> None:
    """An option bounded by the rows a head fits on (knn's k; `values` None: the smallest of its tuned grid)
    against the `n_rows` rows of a few-shot draw of K images a class; the fix names the K that fits
    (`k_for(value)`) when a class has that many images (`k_max`: the most a draw can take), and the option
    itself where the command has it."""
    for h in heads:
        spec = HEAD_SPECS.get(h)
        option = spec.rows_option if spec else None
        if option is None:
            continue
        value = min(spec.grid) if values is None else values.get(h, {}).get(option)
        if value is None or value <= n_rows:
            continue
        own = values is not None and offers(offered, option)
        what = (f"{flag(option)} {value}" if own else f"the {h} head's {option} = {value:g}" if values is not None
                else f"the smallest {option} of the {h} grid ({value:g})")
        enough = k_for(value)
        fixes = ([f"pass {flag(option)} {n_rows} or less"] if own else []) + \
            ([f"pass --train-per-class {enough} or more"] if k_max is None or enough <= k_max else [])
        drop = drop_advice(h, [x for x in HEADS if x != h], offered)
        raise FusionCacheError(f"{what} is larger than the {n_rows} {rows} rows of a draw of {k} images a class; "
                               + ", or ".join(fixes + ([drop] if drop else [])))


def fit_draws(cache: Cache, view: str, head: str, params: HeadParams | None, seed: int, fewshot,
              offered=None) -> list[FitResult]:
    """`fit_head` on each draw 0 .. N-1 of `seed` (fewshot.FewShot): K train images a class each; every result
    records its draw (FitResult.fewshot). The head's standardization statistics, where it takes them, are
    those of the drawn rows, the only rows it sees."""
    params = params or HeadParams()
    params.check()
    head_spec(head)
    check_heads(cache, [head], params, offered, where=f"'{view}'")
    draws = check_fewshot(cache, [head], params, fewshot, [seed], offered)
    full = load_view(cache, view)
    results = []
    for d in range(fewshot.draws):
        r = fit_head(cache, view, head, params, seed, data=draws[seed, d].data(full), offered=offered)
        r.fewshot = draws[seed, d].record()
        results.append(r)
    return results


def _check_converged(head: str, epochs: list[dict], est, params: HeadParams, offered=None) -> None:
    """A diverged fit is an error, never a number: NaN or inf in the loss or the weights, or a final training
    loss far above that of predicting uniformly at random (10 x ln k for k classes)."""
    if not HEAD_SPECS[head].has_linear_form:  # knn: no training, nothing to diverge
        return
    values = [v for e in epochs for v in e.values()]
    weights_ok = all(np.isfinite(a).all() for a in linear_form(est).values())
    chance = math.log(max(2, len(est.classes_)))
    if (weights_ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            and epochs[-1]["train_loss"] <= 10 * chance):
        return
    fix = divergence_advice(head, params.for_head(head), offered)
    raise FusionCacheError(f"the {head} head diverged (final train loss {epochs[-1]['train_loss']:.3g}, chance level "
                           f"{chance:.3g}); {fix}")


HEAD_FILES = (HEAD_FILE, "metrics.json")


def check_saveable(head: str) -> None:
    """predict and export need a linear form (a kNN head keeps its training set instead)."""
    if not head_spec(head).has_linear_form:
        saveable = [h for h, spec in HEAD_SPECS.items() if spec.has_linear_form]
        raise FusionCacheError(f"a {head} head cannot be saved for predict and export (it has no linear form); "
                               f"drop --out, or use --head {' or '.join(saveable)}")


def save_head(result: FitResult, out_dir: str | Path, force: bool = False) -> Path:
    """`out_dir/head.pt` (see headfile.py) and `metrics.json`, written into a fresh folder that replaces
    `out_dir` only when both are complete; an existing head is replaced only with `force`."""
    check_saveable(result.head)
    form = linear_form(result.estimator)
    head = HeadFile(
        head=result.head, taps=tuple(result.features),
        classes=tuple(result.provenance["classes"][int(c)] for c in result.estimator.classes_),
        coef=form["coef"], intercept=form["intercept"], mean=form["mean"], scale=form["scale"],
        fingerprint=result.fingerprint, provenance=result.provenance,
    )
    head.check("the fitted head")
    with staged_folder(out_dir, force, lambda name: name in HEAD_FILES) as tmp:
        write_head_file(head, tmp)
        atomic_write_text(tmp / "metrics.json", dumps_json(result.to_json(), indent=2))
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- ablation


def ablate(cache: Cache, views: list[str], heads: list[str], seeds: list[int], params: HeadParams | None = None,
           progress=None, offered=None, fewshot=None) -> list[dict]:
    """Every view x head x seed from the one cache. Returns one row per run; a head whose fit does not depend
    on the seed (HeadSpec.seeded False) is fitted once a view and its row repeated for each seed.

    With `fewshot` (fewshot.FewShot: K images a class, N draws), every seed runs draws 0 .. N-1 of its own,
    each head on the drawn rows only (a seed-independent head too: each draw is other rows): one row per
    view x head x seed x draw, carrying `draw`, `train_per_class`, `draw_seed` and `draw_rows_sha256`.

    Every row carries its run's 95 % interval (`test_acc_lo`, `test_acc_hi`: the bootstrap over the test images,
    stats.accuracy_interval with its defaults) and its test predictions, `test_pred` (FitResult.test_pred), for
    the table's intervals and comparisons (summarize) and predictions.npz; JSON holds the rows without them
    (predictions.public)."""
    params = params or HeadParams()
    params.check()
    if not views or not heads or not seeds:
        raise FusionCacheError("ablate needs at least one view, one head and one seed")
    for h in heads:
        if h not in HEADS:
            raise FusionCacheError(f"unknown head {quote(h)}; use one of {', '.join(HEADS)}")
    for v in views:  # every view resolves, and every head can run, before any features are read
        cache.view_taps(v)
    check_heads(cache, heads, params, offered)
    draws = None if fewshot is None else check_fewshot(cache, heads, params, fewshot, seeds, offered)
    if draws is None and all(HEAD_SPECS[h].streams for h in heads):  # every head reads the view in chunks from
        data = dict.fromkeys(views)  # the cache (its NaN check as it reads): no view is loaded into memory
    else:
        data = {v: load_view(cache, v) for v in views}  # validates every view's features before any training
    if draws is not None:
        return _ablate_draws(cache, views, heads, seeds, params, data, draws, fewshot.draws, progress, offered)
    y_test = cache.labels("test")
    rows = []
    for view in views:
        for head in heads:
            r = None
            for seed in seeds:
                if r is None or HEAD_SPECS[head].seeded:  # a seed-independent head is fitted once a view
                    r = fit_head(cache, view, head, params, seed, data=data[view], offered=offered)
                    interval = run_interval(r.test_pred, y_test)
                rows.append({"view": view, "head": head, "seed": seed, "taps": ",".join(r.features), "dim": r.dim,
                             "train_acc": r.train_acc, "test_acc": r.test_acc, **interval, "train_loss": r.train_loss,
                             "test_loss": r.test_loss, "fit_seconds": r.fit_seconds, "epochs": r.epochs,
                             "test_pred": r.test_pred})
                if progress:
                    progress(rows[-1])
    return rows


def _ablate_draws(cache, views, heads, seeds, params, data, draws, n_draws, progress, offered) -> list[dict]:
    """`ablate`'s few-shot runs: view x head x seed x draw, each fit on its draw's rows."""
    rows = []
    for view in views:
        drawn = {key: d.data(data[view]) for key, d in draws.items()}  # each draw's rows of the view, once
        for head in heads:
            for seed in seeds:
                for i in range(n_draws):
                    r = fit_head(cache, view, head, params, seed, data=drawn[seed, i], offered=offered)
                    rows.append({"view": view, "head": head, "seed": seed, **draws[seed, i].record(),
                                 "taps": ",".join(r.features), "dim": r.dim, "train_acc": r.train_acc,
                                 "test_acc": r.test_acc, **run_interval(r.test_pred, data[view].y_test),
                                 "train_loss": r.train_loss, "test_loss": r.test_loss,
                                 "fit_seconds": r.fit_seconds, "epochs": r.epochs, "test_pred": r.test_pred})
                    if progress:
                        progress(rows[-1])
        del drawn
    return rows


def check_same_data(caches: list[Cache]) -> None:
    """Caches compared in one table must hold the same images, labels and subsets (one per backbone)."""
    first = caches[0].meta
    for c in caches[1:]:
        m = c.meta
        for name in ("dataset", "classes", "data_identity", "subset"):
            if getattr(m, name) != getattr(first, name):
                raise FusionCacheError(f"{c.path} and {caches[0].path} hold different data ({name} differs); "
                                       "compare caches of the same images: re-extract with the same --seed and sizes")
    seen: dict[str, Cache] = {}
    for c in caches:  # every pair, not only against the first
        if c.fingerprint in seen:
            raise FusionCacheError(f"{c.path} and {seen[c.fingerprint].path} are the same cache; pass each one once")
        seen[c.fingerprint] = c


def table_labels(caches: list[Cache]) -> np.ndarray:
    """The test labels that the rows of one table are scored against: those of every cache, in the same order
    (caches of one table hold the same images: check_same_data)."""
    y = caches[0].labels("test")
    for c in caches[1:]:
        if not np.array_equal(c.labels("test"), y):
            raise FusionCacheError(f"{c.path} and {caches[0].path} hold their test images in another order; "
                                   "compare caches of the same images: re-extract with the same --seed and sizes")
    return y


def ablate_caches(caches: list[Cache], views: list[str], heads: list[str], seeds: list[int],
                  params: HeadParams | None = None, progress=None, offered=None, fewshot=None) -> list[dict]:
    """`ablate` on each cache (one backbone each, the same images), rows tagged with backbone and cache. With
    `fewshot`, the caches' labels being the same, draw d of seed s is the same images in every cache."""
    check_same_data(caches)
    for c in caches:  # every view of every cache, and every head's preconditions, before any training
        for v in views:
            c.view_taps(v)
        check_heads(c, heads, params or HeadParams(), offered)
        if fewshot is not None:
            check_fewshot(c, heads, params or HeadParams(), fewshot, seeds, offered)
    from .io import cache_labels

    rows = []
    for c, label in zip(caches, cache_labels([c.path for c in caches], [c.backbone for c in caches])):
        tag = {"backbone": c.backbone, "cache": str(c.path), "label": label}  # label: the table's unique row name
        rows += [{**tag, **r} for r in ablate(c, views, heads, seeds, params,
                                             progress=(lambda r, tag=tag: progress({**tag, **r})) if progress else None,
                                             offered=offered, fewshot=fewshot)]
    return rows


def summarize(rows: list[dict], y_test: np.ndarray | None = None, baseline: Baseline | None = None,
              resamples: int = stats.RESAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> list[dict]:
    """Mean and std (over seeds) per view x head (x cache, for rows of several), in the order the rows came.
    Few-shot rows (with a `draw`) are (seed, draw) runs: the mean and sample std are over all of them, and the
    summary counts the seeds, draws and runs.

    With `y_test` (the cache's test labels) and rows that carry their test predictions (`test_pred`, as
    `ablate` gives them), each summary row also gets its 95 % interval over its runs and test images
    (test_acc_lo, test_acc_hi, n_test); with `baseline` too, its paired comparison with its baseline row
    (baseline, is_baseline, vs_baseline, mcnemar_run), Holm-corrected over the table (predictions.table_stats)."""
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        grouped.setdefault((r.get("cache", ""), r["view"], r["head"]), []).append(r)
    extra = {} if y_test is None else table_stats(rows, y_test, baseline, resamples, seed)
    out = []
    for (cache, view, head), rs in grouped.items():
        test = np.array([r["test_acc"] for r in rs])
        train = None if any(r["train_acc"] is None for r in rs) else np.array([r["train_acc"] for r in rs])
        tag = {"backbone": rs[0]["backbone"], "cache": cache, "label": rs[0].get("label", rs[0]["backbone"])} \
            if cache else {}
        counts = {"n_seeds": len(rs)} if "draw" not in rs[0] else {  # few-shot: runs are (seed, draw) pairs
            "n_seeds": len({r["seed"] for r in rs}), "n_draws": len({r["draw"] for r in rs}), "n_runs": len(rs),
            "train_per_class": rs[0]["train_per_class"]}
        out.append({**tag, "view": view, "head": head, "dim": rs[0]["dim"], **counts,
                    "test_acc_mean": float(test.mean()), "test_acc_std": float(test.std(ddof=1) if len(rs) > 1 else 0.0),
                    "train_acc_mean": None if train is None else float(train.mean()),
                    "train_acc_std": None if train is None else float(train.std(ddof=1) if len(rs) > 1 else 0.0),
                    **(extra[cache, view, head].fields() if extra else {})})
    return out


def summarize_table(rows: list[dict], y_test: np.ndarray | None, baseline: Baseline | None = None,
                    resamples: int = stats.RESAMPLES,
                    seed: int = stats.BOOTSTRAP_SEED) -> tuple[list[dict], dict | None]:
    """(summary, the table's `baseline` record): `summarize` with the comparisons the table can make. The
    default baseline (`late`) is left out where the table has no late row, and the record says why; a given
    baseline that is not a row of the table is an error (predictions.Baseline.check). baseline None: no
    comparisons and no record; y_test None: no intervals either."""
    if baseline is None or y_test is None:
        return summarize(rows, y_test, None, resamples, seed), None
    views = list(dict.fromkeys(r["view"] for r in rows))
    heads = list(dict.fromkeys(r["head"] for r in rows))
    active = baseline.check(views, heads)
    return summarize(rows, y_test, baseline if active else None, resamples, seed), baseline.record(active)


def interval_cell(s: dict, digits: int = 1) -> str:
    """A summary row's test accuracy as a table shows it: `81.0 [78.6, 83.4]` (stats.percent) where it has an
    interval, else mean ± std."""
    if s.get("test_acc_lo") is None:
        return f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}"
    return stats.percent(stats.Interval(s["test_acc_mean"], s["test_acc_lo"], s["test_acc_hi"]), digits)


def _comparison(record: dict) -> stats.Comparison:
    return stats.Comparison(record["diff"], record["diff_lo"], record["diff_hi"], record["p_mcnemar"],
                            record["only_a_right"], record["only_b_right"], record["p_holm"])


def comparisons_made(summary: list[dict]) -> int:
    """The comparisons of a table (the M of its Holm correction)."""
    return sum(1 for s in summary if s.get("vs_baseline"))


def comparison_header(baseline: dict | None, summary: list[dict]) -> list[str]:
    """The comparison columns' headers: `vs late (points)`, `p (Holm)`; none where the table has no comparisons."""
    if not baseline or not baseline["compared"]:
        return []
    name = baseline["view"] + (f":{baseline['head']}" if baseline["head"] else "")
    return [f"vs {name} (points)", "p (Holm)" if comparisons_made(summary) > 1 else "p"]


def comparison_cells(s: dict, baseline: dict | None) -> list[str]:
    """A summary row's comparison cells: `+3.5 [+1.8, +5.1]` (stats.points) and its p-value (stats.p_text,
    `*` where significant); `baseline` on the baseline's own row."""
    if not baseline or not baseline["compared"]:
        return []
    if s.get("is_baseline"):
        return ["baseline", "—"]
    if not s.get("vs_baseline"):
        return ["—", "—"]
    c = _comparison(s["vs_baseline"])
    return [stats.points(c), stats.p_text(c.p if c.p_holm is None else c.p_holm) + (" *" if c.significant else "")]


def comparison_note(baseline: dict | None, summary: list[dict]) -> str | None:
    """The line under a table: what its intervals and comparisons are, or why it has no comparisons."""
    if not summary or summary[0].get("test_acc_lo") is None and not baseline:
        return None
    s0 = summary[0]
    fewshot = "n_draws" in s0
    runs = max(s.get("n_runs", s["n_seeds"]) for s in summary)
    what = ("(seed, draw) runs" if fewshot else "seeds") if runs > 1 else None
    lines = []
    if s0.get("test_acc_lo") is not None:
        lines.append(f"Test accuracy: the mean over the runs with its 95 % interval, a bootstrap over the "
                     f"{s0['n_test']:,} test images" + (f" and the {what}" if what else "") + ".")
    if baseline and not baseline["compared"]:
        lines.append(baseline["note"][0].upper() + baseline["note"][1:] + ".")
    elif baseline:
        m = comparisons_made(summary)
        first = next((s["mcnemar_run"] for s in summary if s.get("mcnemar_run")), None)
        on = ("" if first is None or runs == 1 else " on the first run's predictions (" +
              ", ".join(f"{k} {v}" for k, v in first.items()) + ")")
        whom = (f"{baseline['view']} with each row's own head" if baseline["head"] is None
                else f"{baseline['view']} with {baseline['head']}")
        several = any("backbone" in s for s in summary)
        lines.append(f"Differences against {whom}{' of the same cache' if several else ''} on the same "
                     f"{s0['n_test']:,} test images, in points: paired bootstrap 95 % interval ("
                     + (f"images and {what} resampled together" if what else "images resampled") + "); "
                     f"p: exact McNemar test{on}, "
                     + (f"Holm-corrected over the {m} comparisons of this table" if m > 1 else
                        "one comparison, uncorrected")
                     + f"; * significant: p below {stats.ALPHA:g} and the interval clear of zero.")
    return " ".join(lines) or None


def markdown_table(summary: list[dict], baseline: dict | None = None) -> str:
    """One table; a backbone column first when the rows come from several caches. Test accuracies carry their
    interval where the summary has one; with `baseline` (summarize_table's record) the comparison columns
    follow, and a line under the table says what the intervals and the comparisons are."""
    several = any("backbone" in s for s in summary)
    fewshot = any("n_draws" in s for s in summary)  # few-shot: mean ± std over seeds x draws runs
    extra = comparison_header(baseline, summary)
    intervals = any(s.get("test_acc_lo") is not None for s in summary)
    lines = [("| backbone " if several else "") + "| view | head | dim | "
             + ("test acc (%), 95 % interval" if intervals else "test acc (%)") + " | train acc, final epoch (%) | "
             + ("seeds x draws |" if fewshot else "seeds |") + "".join(f" {h} |" for h in extra),
             ("|---" if several else "") + "|---|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for s in summary:
        train = (f"{100 * s['train_acc_mean']:.2f} ± {100 * s['train_acc_std']:.2f}"
                 if HEAD_SPECS[s["head"]].records_epochs else "—")  # a train column only for per-epoch heads
        lines.append((f"| {s.get('label', s['backbone'])} " if several else "") + f"| {s['view']} | {s['head']} | {s['dim']} | "
                     f"{interval_cell(s)} | {train} | "
                     + (f"{s['n_seeds']} x {s['n_draws']} |" if fewshot else f"{s['n_seeds']} |")
                     + "".join(f" {c} |" for c in comparison_cells(s, baseline)))
    note = comparison_note(baseline, summary)
    return "\n".join(lines) + ("\n\n" + note if note else "")


ABLATION_FILES = ("results.json", "results.csv", "results.md", PREDICTIONS_FILE)


def write_ablation(rows: list[dict], out_dir: str | Path, meta: dict, force: bool = False,
                   y_test: np.ndarray | None = None, baseline: Baseline | None = None,
                   table: tuple[list[dict], dict | None] | None = None) -> Path:
    """results.json (meta + one row per run), results.csv and results.md, written into a fresh folder that
    replaces `out_dir` only when all are complete. With `y_test` (the cache's test labels; the rows carry
    their predictions, as `ablate` gives them), the summary carries intervals and, with `baseline`,
    comparisons (summarize_table; `table`: its result, already computed), and predictions.npz holds every
    row's predictions (predictions.py)."""
    summary, record = table if table is not None else summarize_table(rows, y_test, baseline)
    meta = {**meta, **({"bootstrap": bootstrap_record()} if y_test is not None else {}),
            **({"baseline": record} if record is not None else {})}
    buf = io.StringIO()
    drawn = ["draw", "train_per_class", "draw_seed", "draw_rows_sha256"] if rows and "draw" in rows[0] else []
    cols = (["backbone", "cache"] if rows and "backbone" in rows[0] else []) + ["view", "head", "seed"] + drawn + \
        ["taps", "dim", "train_acc", "test_acc", "test_acc_lo", "test_acc_hi", "train_loss", "test_loss", "fit_seconds"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    caches = meta.get("caches") or [{"cache": meta["cache"], "fingerprint": meta["fingerprint"]}]
    md = ("# Ablation\n\n" + ", ".join(f"Cache `{c['cache']}` (fingerprint `{c['fingerprint'][:16]}`)" for c in caches) + ", "
          f"command `{meta['command']}`.\nAccuracies in percent, {spread(meta['seeds'], meta.get('fewshot'))}.\n\n"
          + (fewshot_line(meta["fewshot"]) + "\n\n" if meta.get("fewshot") else "")
          + markdown_table(summary, record) + "\n")
    with staged_folder(out_dir, force, lambda name: name in ABLATION_FILES) as tmp:
        atomic_write_text(tmp / "results.json", dumps_json({**meta, "rows": public(rows), "summary": summary},
                                                           indent=2))
        atomic_write_text(tmp / "results.csv", buf.getvalue())
        atomic_write_text(tmp / "results.md", md)
        if y_test is not None:
            save_predictions(tmp / PREDICTIONS_FILE, y_test, *prediction_arrays(rows))
    return Path(out_dir)
