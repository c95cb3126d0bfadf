"""The few-shot protocol: `--train-per-class K` (and `--draws N`) on `fit`, `ablate` and `report`.

Each run's head trains on K images of each class drawn from the cache's train split. The cache holds all of
train, so a draw costs no extraction: it is a set of row positions in the cache's train split.

- The pool: the cache's train rows, less the dataset's own validation split where it has one
  (`Cache.validation_rows`); those rows stay available to choose hyper-parameters on, never to train on.
- Draw d of seed s (`draw_rows`): for every class in class order, a permutation of the class's pool rows from
  `numpy.random.default_rng([FEWSHOT_SALT, s, d])`, of which the first K are taken. Same (s, d): the same rows;
  another d or s: other rows. The permutation does not depend on K, so the draws are nested: draw d of
  seed s at K images a class holds those it holds at any smaller K.
- Runs: every seed s of a command runs draws 0 .. N-1 of its own, so the rows of a table are (seed, draw)
  pairs, each on its own draw; its mean ± std (sample std) is over all of them. The head's seed (its
  initialisation and batch order) is s.
- The tuned protocol (`report`): the validation split that chooses each head's parameter comes from the draw,
  never from test and never from train rows outside the draw. With the dataset's own validation split, that
  split chooses, and the refit trains on the draw's K images a class only. Without one, `--val-fraction` of
  each class's K images (round(fraction x K), the same number in every class) is carved from the draw,
  seeded by (s, d), to choose on; the chosen parameter is then refit on the whole draw. A carve that leaves a
  class no validation image or no fit image is an error that names the fix. Standardization statistics are
  always those of the rows the final head trains on (the draw).
- Seed-independent heads (logreg, knn) are fitted once per draw (each seed's draws are its own rows).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import FusionCacheError, quote

FEWSHOT_SALT = 0x6B73686F  # "ksho": keeps the draws' random streams apart from every other seeded draw
CARVE_SALT = 1  # the validation carve of a draw: its own stream, seeded by the same (seed, draw)
COMBINE = ("mean ± std over all (seed, draw) runs: each seed runs draws 0..N-1 of its own, each draw its own "
           "K images a class")


@dataclass(frozen=True)
class FewShot:
    """The few-shot settings of a command: K train images a class, N draws (per seed)."""

    train_per_class: int
    draws: int = 1

    def check(self) -> None:
        if not isinstance(self.train_per_class, (int, np.integer)) or self.train_per_class < 1:
            raise FusionCacheError(f"--train-per-class must be at least 1, got {self.train_per_class}")
        if not isinstance(self.draws, (int, np.integer)) or self.draws < 1:
            raise FusionCacheError(f"--draws must be at least 1, got {self.draws}")

    def record(self) -> dict:
        """What a result's metadata records about the protocol."""
        return {"train_per_class": int(self.train_per_class), "draws": int(self.draws), "combine": COMBINE,
                "sampler": f"numpy default_rng([{FEWSHOT_SALT}, seed, draw]); per class a permutation of the "
                           "train rows outside the validation split, its first K"}

    def labels(self, n_classes: int) -> np.ndarray:
        """The labels of every draw (K of each class, in class order), for the heads' preconditions."""
        return np.repeat(np.arange(n_classes, dtype=np.int64), self.train_per_class)

    def draws_of(self, cache, seeds) -> dict[tuple[int, int], "Draw"]:
        """{(seed, draw): Draw} for every seed and draw 0 .. N-1, from the cache's labels alone."""
        self.check()
        y, pool = cache.labels("train"), train_pool(cache)
        check_pool(y, pool, self.train_per_class, cache.classes, given=cache.validation_rows() is not None)
        return {(s, d): draw(y, self.train_per_class, s, d, pool, len(cache.classes))
                for s in seeds for d in range(self.draws)}


def spread(seeds, record: dict | None) -> str:
    """What a table's mean ± std is over: the seeds, or with a few-shot record every (seed, draw) run."""
    if not record:
        return f"mean ± std over seeds {list(seeds)}"
    n = record["draws"]
    return f"mean ± std over {len(seeds) * n} runs (seeds {list(seeds)} x draws 0..{n - 1})"


def largest_k(cache) -> int:
    """The most images a class a draw can take: the smallest class's train rows outside the validation split."""
    y = cache.labels("train")
    return int(np.bincount(y[train_pool(cache)], minlength=len(cache.classes)).min())


def header(record: dict) -> str:
    """The header line of a few-shot table or report, from FewShot.record()."""
    n = record["draws"]
    return (f"K-shot: {record['train_per_class']} images per class, {n} draw{'s' if n != 1 else ''} per seed; "
            f"{record['combine']}.")


@dataclass(frozen=True)
class Draw:
    """One draw: K rows of each class, as sorted positions in the cache's train split."""

    train_per_class: int
    index: int  # the draw, 0 .. N-1
    seed: int  # the seed it was drawn with (the run's seed)
    rows: np.ndarray  # sorted positions in the cache's train split, K of each class

    @property
    def digest(self) -> str:
        """sha256 of the row positions (little-endian int64): the draw in a result, without its rows."""
        return hashlib.sha256(np.ascontiguousarray(self.rows, dtype="<i8").tobytes()).hexdigest()

    def record(self) -> dict:
        """The fields a result row carries."""
        return {"draw": int(self.index), "train_per_class": int(self.train_per_class), "draw_seed": int(self.seed),
                "draw_rows_sha256": self.digest}

    def data(self, full):
        """`full` (a fit.ViewData of the whole train split) with its train rows cut to the draw; no validation
        rows (the paper protocol and `fit` train on the draw, as they train on all of train without one)."""
        return replace(full, X_train=full.X_train[self.rows], y_train=full.y_train[self.rows], val_rows=None,
                       refit_rows=None)


def train_pool(cache) -> np.ndarray:
    """The train rows a draw takes from: all of them, less the dataset's own validation split."""
    n = len(cache.labels("train"))
    given = cache.validation_rows()
    rows = np.arange(n, dtype=np.int64)
    return rows if given is None else np.setdiff1d(rows, np.asarray(given, dtype=np.int64))


def check_pool(y: np.ndarray, pool: np.ndarray, k: int, classes, given: bool = False) -> None:
    """Every class holds at least K rows in the pool; else one line naming the smallest class and the fix."""
    counts = np.bincount(y[pool], minlength=len(classes))
    if (counts >= k).all():
        return
    smallest = int(np.argmin(counts))  # the first of the smallest classes
    n, outside = int(counts[smallest]), " outside the validation split" if given else ""
    if n == 0:
        raise FusionCacheError(f"class {quote(classes[smallest])} has no train images{outside}, and "
                               f"--train-per-class {k} needs {k}; give every class train images and re-extract")
    raise FusionCacheError(f"--train-per-class {k} is more than the {n} train image{'s' if n != 1 else ''}{outside} "
                           f"of class {quote(classes[smallest])}; pass --train-per-class {n} or less")


def draw(y: np.ndarray, k: int, seed: int, index: int, pool: np.ndarray | None = None,
         n_classes: int | None = None) -> Draw:
    """Draw `index` of `seed`: K rows of every class from `pool` (default: every row), seeded and stratified."""
    pool = np.arange(len(y), dtype=np.int64) if pool is None else np.asarray(pool, dtype=np.int64)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    rng = np.random.default_rng([FEWSHOT_SALT, int(seed), int(index)])
    chosen = []
    for c in range(n_classes):
        members = pool[y[pool] == c]
        if len(members) < k:
            raise FusionCacheError(f"--train-per-class {k} is more than the {len(members)} train images of class "
                                   f"index {c}; pass --train-per-class {len(members)} or less")
        chosen.append(members[rng.permutation(len(members))[:k]])
    return Draw(int(k), int(index), int(seed), np.sort(np.concatenate(chosen)).astype(np.int64))


def validation_count(k: int, fraction: float) -> int:
    """Validation images a class, carved from a draw of K a class: round(fraction x K), halves up."""
    return int(math.floor(fraction * k + 0.5))


def smallest_k(fraction: float) -> int:
    """The smallest K whose carve leaves every class a validation image and a fit image."""
    if not 0 < fraction < 1:
        raise FusionCacheError(f"--val-fraction must be between 0 and 1, got {fraction:g}")
    k = 2
    while not 1 <= validation_count(k, fraction) < k:
        k += 1
    return k


def check_carve(k: int, fraction: float) -> None:
    """The carve of `fraction` from K images a class leaves each class a validation image and a fit image."""
    n_val = validation_count(k, fraction)
    if 1 <= n_val < k:
        return
    what, other = ("no validation image", "a larger") if n_val < 1 else ("no image to fit on", "a smaller")
    raise FusionCacheError(
        f"--val-fraction {fraction:g} of --train-per-class {k} leaves each class {what} (round({fraction:g} x {k}) "
        f"= {n_val} of {k} to validate on); pass --train-per-class {smallest_k(fraction)} or more or {other} "
        "--val-fraction, or extract the dataset with its own validation split (val/ beside test/)")


@dataclass(frozen=True)
class TuningDraw:
    """A draw as the tuned protocol sees it: the train rows it reads (`keep`, positions in the cache's train
    split), those of them that choose the parameter (`val`, positions in `keep`), and those the final head
    trains on (`refit`, positions in `keep`; None: all of `keep`)."""

    draw: Draw
    keep: np.ndarray
    val: np.ndarray
    refit: np.ndarray | None

    def data(self, full):
        """`full` (a fit.ViewData of the whole train split) cut to `keep`, its validation rows `val` and its
        refit rows `refit`."""
        return replace(full, X_train=full.X_train[self.keep], y_train=full.y_train[self.keep], val_rows=self.val,
                       refit_rows=self.refit)


def tuning_draw(d: Draw, y: np.ndarray, fraction: float, given: np.ndarray | None = None) -> TuningDraw:
    """The rows the tuned protocol reads for draw `d` (see the module's docstring): with the dataset's own
    validation rows `given`, the draw plus those rows, chosen on them, refit on the draw; without, the draw,
    round(fraction x K) rows of each class carved from it (seeded by the draw's seed and index) to choose on,
    refit on the whole draw."""
    if given is not None:
        given = np.asarray(given, dtype=np.int64)
        keep = np.union1d(d.rows, given)
        return TuningDraw(d, keep, np.searchsorted(keep, given), np.searchsorted(keep, d.rows))
    check_carve(d.train_per_class, fraction)
    n_val = validation_count(d.train_per_class, fraction)
    rng = np.random.default_rng([FEWSHOT_SALT, d.seed, d.index, CARVE_SALT])
    labels = y[d.rows]
    val = [np.flatnonzero(labels == c)[rng.permutation(d.train_per_class)[:n_val]] for c in np.unique(labels)]
    return TuningDraw(d, d.rows, np.sort(np.concatenate(val)).astype(np.int64), None)
