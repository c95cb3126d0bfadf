"""The statistics behind every accuracy and every comparison: bootstrap intervals, paired tests, and the
correction for several comparisons. Pure functions on arrays of per-image correctness; no I/O.

Inputs are `correct` matrices of shape (runs, n): row r says, for each of the n test images, whether run r
(one seed, or one (seed, draw) of a few-shot protocol) classified it right. Every run of a row is scored on the
same n test images, so the images are the sampling unit, and the runs are a second source of variation.

Interval on an accuracy (`accuracy_interval`)
    A two-level (hierarchical) percentile bootstrap. Each of `resamples` resamples draws n test images with
    replacement, and R runs with replacement out of the R runs; its statistic is the mean correctness of the
    drawn runs on the drawn images. The 2.5 % and 97.5 % quantiles of the statistic bound the 95 % interval.
    With one run it is Efron's percentile bootstrap of a proportion (Efron & Tibshirani, An Introduction to the
    Bootstrap, 1993, ch. 13). With several, resampling the runs as well adds the seed-to-seed spread to the
    test-sample spread: the interval covers what another set of test images *and* another set of seeds would
    give (the "bootstrap over data and seeds" of Bouthillier et al., Accounting for Variance in Machine
    Learning Benchmarks, MLSys 2021). Its width is never below that of the test sample alone by more than
    resampling noise.

Paired difference (`paired_difference`)
    Two rows scored on the same images and the same runs (seed s of row A against seed s of row B). Each
    resample draws one set of images and one set of run indices, used for both rows, and takes the difference
    of their mean correctness (Efron & Tibshirani 1993, ch. 16; the paired bootstrap of Koehn, Statistical
    Significance Tests for Machine Translation Evaluation, EMNLP 2004). The images that both rows get right, or
    both get wrong, cancel in every resample, so the paired interval is much narrower than the difference of
    two separate intervals when the rows agree on most images.

McNemar's exact test (`mcnemar`)
    On one run of each row: b = images A gets right and B wrong, c = the reverse. Under the null hypothesis
    of equal accuracy, b is Binomial(b + c, 1/2); the two-sided exact p-value is
    min(1, 2 P[X <= min(b, c)]), computed by scipy.stats.binomtest (McNemar, Psychometrika 12, 1947; the exact
    form: Edwards 1948; Fagerland, Lydersen & Laake, BMC Med. Res. Methodol. 13:91, 2013). With several runs the
    test uses the first one (seeds[0], draw 0): the runs share the test images and are not independent samples
    of them, so pooling their discordant pairs would overstate the evidence.

Holm's correction (`holm`)
    For m comparisons with p-values p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)) (Holm, Scandinavian Journal of Statistics 6, 1979). It controls the family-wise
    error rate at level alpha under any dependence between the comparisons. A comparison is significant when its
    adjusted p is below alpha and its paired interval (over every run) excludes zero: both must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000  # bootstrap resamples of every interval
LEVEL = 0.95  # two-sided coverage of every interval
ALPHA = 0.05  # significance level of every test (family-wise, after Holm)
BOOTSTRAP_SEED = 0  # the default seed of the resampling; every result records the one it used
_BLOCK = 1 << 22  # resample x image cells gathered at a time (bounded memory on large test sets)


def _as_correct(correct, what: str = "correct") -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty (runs, images) array, got shape {c.shape}")
    if c.dtype != bool:
        if not np.isin(c, (0, 1)).all():
            raise ValueError(f"{what} must hold booleans (right or wrong per image)")
        c = c.astype(bool)
    return c


def _check(resamples: int, level: float) -> None:
    if isinstance(resamples, bool) or not (isinstance(resamples, (int, np.integer)) and resamples >= 1):
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")


def _bootstrap(diff: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The statistic of each resample: the mean of `diff` (runs, n; float) over R runs and n images, both drawn
    with replacement. One generator draws, in order, the run indices and then the image indices of each block."""
    runs, n = diff.shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    block = max(1, _BLOCK // (n * runs))
    for lo in range(0, resamples, block):
        b = min(block, resamples - lo)
        r = rng.integers(0, runs, size=(b, runs)) if runs > 1 else np.zeros((b, 1), np.int64)
        i = rng.integers(0, n, size=(b, n))
        # per resample: the mean over the drawn runs of each run's mean on the drawn images
        per_run = np.stack([diff[k][i].mean(axis=1) for k in range(runs)], axis=1)  # (b, runs)
        out[lo : lo + b] = np.take_along_axis(per_run, r, axis=1).mean(axis=1)
    return out


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Interval:
    """An accuracy (a fraction) and its bootstrap interval."""

    value: float
    lo: float
    hi: float

    def fields(self, name: str = "test_acc") -> dict:
        """{name_lo, name_hi}: how JSON and CSV rows carry the interval."""
        return {f"{name}_lo": self.lo, f"{name}_hi": self.hi}


def accuracy_interval(correct, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL) -> Interval:
    """The mean accuracy of `correct` (runs, n) over its runs, with a two-level percentile bootstrap interval
    (test images and runs resampled; see the module docstring). A 1-d array is one run."""
    _check(resamples, level)
    c = _as_correct(correct)
    stats = _bootstrap(c.astype(np.float64), resamples, seed)
    return Interval(float(c.mean()), *_bounds(stats, level))


@dataclass(frozen=True)
class Comparison:
    """Row A against row B on the same test images: the difference of their accuracies (A - B, a fraction)
    with its paired-bootstrap interval, and McNemar's exact test on their first runs (b: images only A gets
    right, c: images only B gets right). `p_holm` is filled in by `compare_all`; None for a lone comparison."""

    diff: float
    lo: float
    hi: float
    p: float
    b: int
    c: int
    p_holm: float | None = None

    @property
    def significant(self) -> bool:
        """Holm-adjusted p (the raw p for a lone comparison) below ALPHA, and the paired interval on the same
        side of zero: McNemar's test sees the first run only, the interval every run, so a difference that
        one seed shows and the others do not is not called significant."""
        return (self.p if self.p_holm is None else self.p_holm) < ALPHA and (self.lo > 0 or self.hi < 0)

    def record(self) -> dict:
        return {"diff": self.diff, "diff_lo": self.lo, "diff_hi": self.hi, "p_mcnemar": self.p,
                "p_holm": self.p_holm, "only_a_right": self.b, "only_b_right": self.c,
                "significant": self.significant}


def paired_difference(correct_a, correct_b, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL) -> Interval:
    """acc(A) - acc(B) with a paired percentile bootstrap interval: both rows (runs, n), run r of A paired with
    run r of B, the same image and run draws for both in every resample."""
    _check(resamples, level)
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same runs and images, got shapes {a.shape} and {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    return Interval(float(d.mean()), *_bounds(_bootstrap(d, resamples, seed), level))


def mcnemar(correct_a, correct_b) -> tuple[float, int, int]:
    """(two-sided exact p, b, c) of McNemar's test on one run of each row (1-d, or the first run of each)."""
    from scipy.stats import binomtest

    a, b = _as_correct(correct_a, "correct_a")[0], _as_correct(correct_b, "correct_b")[0]
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same images, got {a.shape[0]} and {b.shape[0]}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0, 0, 0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue), only_a, only_b


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise ValueError(f"p-values must be a 1-d array of numbers in [0, 1], got {pvalues!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def compare(correct_a, correct_b, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
            level: float = LEVEL) -> Comparison:
    """Row A against row B: the paired difference and McNemar's test (uncorrected)."""
    d = paired_difference(correct_a, correct_b, resamples, seed, level)
    p, b, c = mcnemar(correct_a, correct_b)
    return Comparison(d.value, d.lo, d.hi, p, b, c)


def compare_all(rows: dict, baseline, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                level: float = LEVEL) -> dict:
    """Every row of `rows` ({key: correct (runs, n)}) against `rows[baseline]`, Holm-corrected over the
    comparisons made (every key but the baseline's): {key: Comparison}."""
    if baseline not in rows:
        raise KeyError(baseline)
    out = {k: compare(c, rows[baseline], resamples, seed, level) for k, c in rows.items() if k != baseline}
    if out:
        adjusted = holm([c.p for c in out.values()])
        out = {k: Comparison(c.diff, c.lo, c.hi, c.p, c.b, c.c, float(a)) for (k, c), a in zip(out.items(), adjusted)}
    return out


def percent(iv: Interval, digits: int = 1) -> str:
    """`81.0 [78.6, 83.4]`: an accuracy and its interval in percent."""
    return f"{100 * iv.value:.{digits}f} [{100 * iv.lo:.{digits}f}, {100 * iv.hi:.{digits}f}]"


def points(c: Comparison, digits: int = 1) -> str:
    """`+3.5 [+1.8, +5.1]`: a difference and its interval in percentage points."""
    return f"{100 * c.diff:+.{digits}f} [{100 * c.lo:+.{digits}f}, {100 * c.hi:+.{digits}f}]"


def p_text(p: float) -> str:
    """A p-value as a table shows it: 3 decimals (trailing zeros dropped), 3 significant digits below 0.1 (so
    that nothing just under 0.05 reads 0.05), `< 0.0001` below that."""
    return "< 0.0001" if p < 1e-4 else f"{p:.3g}" if p < 0.1 else f"{p:.3f}".rstrip("0").rstrip(".") or "0"
