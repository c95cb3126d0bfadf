"""The per-run test predictions behind every interval and every comparison of a table: grouped per row, turned
into intervals and paired comparisons (through stats.py, the one place the statistics live), and saved as
`predictions.npz` so that any pair of rows can be compared later without refitting.

A table's rows (view x head, x cache in a table of several caches) are groups of runs: one run a seed, or one
a (seed, draw) in the few-shot protocol. Every run predicts the same test images, in the cache's test order,
so a row is a (runs, n_test) matrix of predicted classes, and `pred == y_test` its per-image correctness.

Pairing. Two rows of one table share their seeds (and draws): run (seed s, draw d) of a row is paired with run
(s, d) of its baseline. A seed-independent head (HeadSpec.seeded False) repeats one fit for every seed; its
identical runs pair all the same.

Baselines (`Baseline`, `--baseline VIEW[:HEAD]`). Every row of a table is compared with its baseline row on
the same test images: by default `late` with the row's own head (the network's own last layer); `VIEW` alone
keeps the row's head, `VIEW:HEAD` is one fixed row for all. The Holm correction runs over the comparisons of
one table. The default `late` is left out, with a note, where a table has no `late` row; any other baseline
that is not a row of the table is an error before anything is fitted.

predictions.npz (numpy's npz: `load_predictions`, or np.load(path, allow_pickle=False)):
    y_test   (n,) the test labels (class indices) in the cache's test order
    KEY      one (runs, n) array per row, the predicted class of each run on each test image, int16 (int32
             above 32767 classes); KEY is `[PREFIX/][LABEL/]VIEW/HEAD`: PREFIX `paper` or `tuned` in a
             report, LABEL the cache's label in a table of several caches
    runs     a JSON string {KEY: [{"seed": s} or {"seed": s, "draw": d}, ...]}: the run of each array row
Any two rows A and B compare with stats.compare(A == y_test, B == y_test) once their runs are paired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import stats
from .errors import FusionCacheError, quote
from .io import atomic_write

PREDICTIONS_FILE = "predictions.npz"


def bootstrap_record(resamples: int = stats.RESAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> dict:
    """What a result records about its intervals: `bootstrap` in every JSON that has them."""
    return {"resamples": int(resamples), "seed": int(seed), "level": stats.LEVEL}


def run_of(row: dict) -> dict:
    """Which run a row of a table is: its seed, and its draw in the few-shot protocol."""
    return {"seed": int(row["seed"])} if "draw" not in row else {"seed": int(row["seed"]), "draw": int(row["draw"])}


def _run_key(row: dict) -> tuple[int, int]:
    return int(row["seed"]), int(row.get("draw", 0))


def group_key(row: dict) -> tuple[str, str, str]:
    """The table row a run belongs to: (cache, view, head); cache "" in a table of one cache."""
    return row.get("cache", ""), row["view"], row["head"]


def groups(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """The runs of each table row, in the order they came."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        out.setdefault(group_key(r), []).append(r)
    return out


def public(rows: list[dict]) -> list[dict]:
    """The rows as JSON holds them: without their predictions (those go to predictions.npz)."""
    return [{k: v for k, v in r.items() if k != "test_pred"} for r in rows]


def correct(pred, y_test: np.ndarray) -> np.ndarray:
    """Per-image correctness of predictions (runs, n) or (n,) against the test labels."""
    pred = np.asarray(pred)
    if pred.shape[-1] != len(y_test):
        raise ValueError(f"predictions of {pred.shape[-1]} test images against {len(y_test)} labels")
    return pred == y_test


def run_interval(pred, y_test: np.ndarray, resamples: int = stats.RESAMPLES,
                 seed: int = stats.BOOTSTRAP_SEED) -> dict:
    """{test_acc_lo, test_acc_hi} of one run (both None without predictions): a row of results.csv."""
    if pred is None:
        return {"test_acc_lo": None, "test_acc_hi": None}
    return stats.accuracy_interval(correct(pred, y_test), resamples, seed).fields()


# ---------------------------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class Baseline:
    """The row every row of a table is compared with: `view` with `head` (None: each row's own head).
    `given`: named by the user (an error where the table has no such row) or the default (left out, with a
    note, where the table has no `late` row)."""

    view: str = "late"
    head: str | None = None
    given: bool = False

    @classmethod
    def parse(cls, text: str) -> "Baseline":
        """`VIEW` or `VIEW:HEAD` (a tap list inside VIEW joined with '+', as in --views)."""
        from .heads import HEADS

        view, sep, head = str(text).strip().partition(":")
        view = view.strip().replace("+", ",")
        head = head.strip()
        if not view or (sep and not head) or ":" in head or any(not t.strip() for t in view.split(",")):
            raise FusionCacheError(f"--baseline {quote(text)} is not VIEW or VIEW:HEAD; pass e.g. late or "
                                   "late:logreg")
        if head and head not in HEADS:
            raise FusionCacheError(f"--baseline {quote(text)} names an unknown head {quote(head)}; use one of "
                                   f"{', '.join(HEADS)} after the colon")
        return cls(view, head or None, True)

    @property
    def text(self) -> str:
        """As the table names it: `late`, `late:logreg`."""
        return self.view + (f":{self.head}" if self.head else "")

    def check(self, views: list[str], heads: list[str]) -> bool:
        """Whether a table of `views` x `heads` has comparisons: the default's `late` row may be missing (no
        comparisons), a given baseline's row may not (a one-line error naming the fix)."""
        if self.view not in views:
            if not self.given:
                return False
            raise FusionCacheError(f"--baseline {quote(self.text)} names the view {quote(self.view)}, which is not "
                                   f"among --views ({', '.join(views)}); add it to --views, or pass --baseline with "
                                   "one of them")
        if self.head is not None and self.head not in heads:
            raise FusionCacheError(f"--baseline {quote(self.text)} names the {self.head} head, which is not among "
                                   f"--heads ({', '.join(heads)}); add it to --heads, or pass --baseline {self.view} "
                                   "to compare each row with its own head")
        return True

    def of(self, view: str, head: str) -> tuple[str, str]:
        """The (view, head) row that the row (view, head) is compared with."""
        return self.view, self.head or head

    def record(self, active: bool) -> dict:
        """The table's `baseline` in JSON: what every row was compared with, or why nothing was."""
        return {"view": self.view, "head": self.head, "given": self.given, "compared": active,
                "note": None if active else (f"no comparisons: the default baseline, {self.view}, is not among the "
                                             "views; pass --baseline VIEW[:HEAD] to compare against one of them")}


DEFAULT_BASELINE = Baseline()


# ---------------------------------------------------------------------------------------------- a table


@dataclass(frozen=True)
class RowStats:
    """One table row's statistics: its accuracy interval over its runs and, in a table with a baseline, its
    baseline row and the paired comparison with it (None for the baseline's own row)."""

    interval: stats.Interval | None
    n_test: int
    baseline: tuple[str, str] | None = None  # (view, head) of its baseline row; None: no comparisons
    is_baseline: bool = False
    comparison: stats.Comparison | None = None
    first_run: dict | None = None  # the run McNemar's test is on (the first of the row's runs)

    def fields(self) -> dict:
        """The summary row's fields: test_acc_lo, test_acc_hi, n_test, and with a baseline, `baseline`
        ({view, head}), `is_baseline`, `vs_baseline` (stats.Comparison.record(); None: no comparison) and
        `mcnemar_run` (the run McNemar's test is on)."""
        iv = {"test_acc_lo": None, "test_acc_hi": None} if self.interval is None else self.interval.fields()
        out = {**iv, "n_test": self.n_test}
        if self.baseline is not None:
            out.update(baseline={"view": self.baseline[0], "head": self.baseline[1]}, is_baseline=self.is_baseline,
                       vs_baseline=None if self.comparison is None else self.comparison.record(),
                       mcnemar_run=self.first_run)
        return out


def _matrix(runs: list[dict], y_test: np.ndarray):
    """(run keys, correctness (runs, n)) of one table row; None where a run has no predictions."""
    if any(r.get("test_pred") is None for r in runs):
        return None
    return [_run_key(r) for r in runs], correct(np.stack([np.asarray(r["test_pred"]) for r in runs]), y_test)


def table_stats(rows: list[dict], y_test: np.ndarray, baseline: Baseline | None = None,
                resamples: int = stats.RESAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> dict:
    """{group_key: RowStats} for a table's runs (rows carrying `test_pred`): each row's interval over its runs
    (stats.accuracy_interval), and with `baseline` each row's paired comparison with its baseline row of the
    same cache (stats.compare: run (seed, draw) against the same (seed, draw)), Holm-corrected over all the
    comparisons of the table (stats.holm)."""
    y_test = np.asarray(y_test)
    grouped = groups(rows)
    mats = {g: _matrix(rs, y_test) for g, rs in grouped.items()}
    out = {g: RowStats(None if m is None else stats.accuracy_interval(m[1], resamples, seed), len(y_test))
           for g, m in mats.items()}
    if baseline is None:
        return out
    compared = {}
    for g, m in mats.items():
        cache, view, head = g
        b = (cache, *baseline.of(view, head))
        if b == g or b not in mats:  # the baseline's own row; or no such row (a view the table added)
            out[g] = replace(out[g], baseline=b[1:], is_baseline=b == g)
            continue
        out[g] = replace(out[g], baseline=b[1:])
        if m is None or mats[b] is None:
            continue
        keys, a = m
        bkeys, bm = mats[b]
        where = {k: i for i, k in enumerate(bkeys)}
        if set(keys) != set(bkeys) or len(keys) != len(bkeys):
            raise ValueError(f"rows {g} and {b} have different runs; paired rows need the same seeds and draws")
        compared[g] = stats.compare(a, bm[[where[k] for k in keys]], resamples, seed)
    if compared:
        adjusted = stats.holm([c.p for c in compared.values()])
        for (g, c), p in zip(compared.items(), adjusted):
            out[g] = replace(out[g], comparison=replace(c, p_holm=float(p)),
                             first_run=run_of(grouped[g][0]))
    return out


# ---------------------------------------------------------------------------------------------- predictions.npz


def array_key(row: dict, prefix: str = "") -> str:
    """`[PREFIX/][LABEL/]VIEW/HEAD`: the array of a row's runs in predictions.npz."""
    label = row.get("label", row.get("backbone", "")) if row.get("cache") else ""
    return "/".join(p for p in (prefix, label, row["view"], row["head"]) if p)


def prediction_arrays(rows: list[dict], prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, list[dict]]]:
    """({key: (runs, n) predictions}, {key: [run, ...]}) of a table's rows; rows without predictions are left out."""
    arrays, runs = {}, {}
    for rs in groups(rows).values():
        if any(r.get("test_pred") is None for r in rs):
            continue
        key = array_key(rs[0], prefix)
        arrays[key] = np.stack([np.asarray(r["test_pred"]) for r in rs])
        runs[key] = [run_of(r) for r in rs]
    return arrays, runs


def save_predictions(path: str | Path, y_test: np.ndarray, arrays: dict[str, np.ndarray],
                     runs: dict[str, list[dict]]) -> Path:
    """predictions.npz (see the module docstring), written atomically."""
    y_test = np.asarray(y_test)
    top = max([int(y_test.max(initial=0))] + [int(a.max(initial=0)) for a in arrays.values()])
    dtype = np.int16 if top <= np.iinfo(np.int16).max else np.int32
    for key in arrays:
        if key in ("y_test", "runs") or arrays[key].shape[-1] != len(y_test):
            raise ValueError(f"predictions {key!r}: a reserved name, or not one column per test image")
    data = {"y_test": y_test.astype(dtype), "runs": np.array(json.dumps(runs)),
            **{k: np.asarray(a).astype(dtype) for k, a in arrays.items()}}
    return atomic_write(path, lambda f: np.savez_compressed(f, **data))


def load_predictions(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[dict]]]:
    """(y_test, {key: (runs, n) predictions}, {key: [run, ...]}) from a predictions.npz."""
    with np.load(path, allow_pickle=False) as f:
        y_test = f["y_test"]
        runs = json.loads(str(f["runs"]))
        arrays = {k: f[k] for k in f.files if k not in ("y_test", "runs")}
    return y_test, arrays, runs
