"""The report: orchestrates the case study's protocol and the validation-tuned one on one cache, and renders
them as Markdown, JSON and figures.

- paper: the case study's head (2 epochs, Adam 1e-3, batch 32, raw features) and the logreg baseline (C=0.1),
  exactly as `ablate` runs them, over seeds.
- tuned: model selection (selection.py) chooses each head's parameter on a validation split of train, refits
  on all of train, and reads the test split once for the final number.

With `ReportConfig.fewshot` (`--train-per-class K --draws N`), both protocols run on each seed's N draws of K
train images a class (fewshot.py): the paper protocol trains on the draw; the tuned one chooses on a validation
split carved from the draw (or on the dataset's own validation split) and refits on the draw alone. Tables are
mean ± std over all (seed, draw) runs.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import stats
from .cache import Cache
from .errors import FusionCacheError, quote
from .fewshot import FewShot, check_carve, tuning_draw, validation_count
from .fewshot import header as fewshot_header
from .fewshot import largest_k, spread
from .fit import (HeadParams, ablate, check_draw_rows, check_fewshot, check_heads, comparison_cells, comparison_header,
                  comparison_note, comparisons_made, interval_cell, provenance, summarize_table)
from .heads import HEAD_SPECS, check_can_fit
from .io import atomic_write_text, dumps_json
from .predictions import DEFAULT_BASELINE, PREDICTIONS_FILE, Baseline, bootstrap_record, prediction_arrays
from .predictions import public as public_rows
from .predictions import save_predictions, table_stats
from .selection import TunedRun, ViewStore, best_pair, check_tuned, pair_taps, tune_heads

# The case study's reported numbers (fused head, training accuracy only).
CASE_STUDY = {"epochs": [{"epoch": 1, "train_acc": 0.6278, "train_loss": 1.1648},
                         {"epoch": 2, "train_acc": 0.7758, "train_loss": 0.6978}], "test_acc": None}


@dataclass
class ReportConfig:
    views: list[str] = field(default_factory=lambda: ["early", "late", "fused", "all"])
    heads: list[str] = field(default_factory=lambda: ["linear", "logreg"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    val_fraction: float = 0.1  # of the train split, stratified, drawn with each seed
    pair_search: bool = True  # also tune the best tap + late pair (features.i + features.18), chosen on validation
    max_iter: int = 200  # L-BFGS iterations of the tuned linear head (it stops earlier once converged)
    device: str = "cpu"
    fewshot: FewShot | None = None  # K train images a class, N draws a seed (None: all of train)
    full_grid: bool = True  # fit every point of the L2 grids (False, --walk-grid: walk each until validation falls)
    baseline: Baseline = DEFAULT_BASELINE  # what every row of both tables is compared with (--baseline)

    def check(self, cache: Cache | None = None, offered=None) -> None:
        """The settings; with a cache, also everything both protocols need of it, from its labels and taps
        alone (no features): every view, every head's preconditions in the paper protocol (on train) and in
        the tuned one (on each seed's fit rows), and the pair search's taps. `offered`: the options of the
        command that runs the report, so that advice names only those."""
        if not 0 < self.val_fraction < 1:
            raise FusionCacheError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.views or not self.heads or not self.seeds:
            raise FusionCacheError("report needs at least one view, one head and one seed")
        for head in self.heads:
            if head not in HEAD_SPECS:
                raise FusionCacheError(f"unknown head {quote(head)}; use one of {', '.join(HEAD_SPECS)}")
        if self.fewshot is not None:
            self.fewshot.check()
        self.baseline.check(self.views, self.heads)  # a given baseline is a row of the tables, before any fitting
        if cache is None:
            return
        for view in self.views:
            cache.view_taps(view)
        check_heads(cache, self.heads, HeadParams(), offered)
        if self.fewshot is not None:
            self.check_fewshot(cache, offered)
            if self.pair_search:
                pair_taps(cache)
            return
        check_tuned(cache.labels("train"), self.heads, self.seeds, self.val_fraction, str(cache.path), offered,
                    cache.validation_rows())
        if self.pair_search:
            pair_taps(cache)

    def check_fewshot(self, cache: Cache, offered=None) -> dict:
        """The few-shot preconditions of both protocols, from the labels: every class holds K train images (outside
        the dataset's own validation split), every head can be fit on a draw (paper) and on a draw's fit rows
        (tuned), and, without the dataset's own validation split, --val-fraction of K leaves every class a
        validation image and a fit image. Returns {(seed, draw): fewshot.TuningDraw}."""
        k = self.fewshot.train_per_class
        draws = check_fewshot(cache, self.heads, HeadParams(), self.fewshot, self.seeds, offered)
        given = cache.validation_rows()
        if given is None:
            check_carve(k, self.val_fraction)
            fit_k = k - validation_count(k, self.val_fraction)
        else:
            fit_k = k
        n = len(cache.classes)

        def k_for(value):  # the smallest K whose fit rows hold `value`
            k2 = k
            while (k2 - (0 if given is not None else validation_count(k2, self.val_fraction))) * n < value:
                k2 += 1
            return k2

        check_draw_rows(self.heads, None, fit_k * n, k, k_for, offered, rows="fit", k_max=largest_k(cache))
        check_can_fit(self.heads, np.repeat(np.arange(len(cache.classes)), fit_k), None, rows="fit",
                      where=f"the tuned protocol's fit rows of a draw of {k} images a class", offered=offered)
        y = cache.labels("train")
        return {key: tuning_draw(d, y, self.val_fraction, given) for key, d in draws.items()}


@dataclass
class ReportResult:
    """Both protocols on one cache. `to_json()` is report.json; `tuned_runs` keep the refit heads for the
    figures. The paper rows and the tuned runs carry their test predictions, and `y_test` holds the labels they
    are scored against: every table row's interval and its comparison with the baseline row come from them
    (computed once), and `predictions()` is what predictions.npz holds."""

    cache: str
    fingerprint: str
    provenance: dict
    paper_rows: list[dict]
    tuned_runs: list[TunedRun]
    pair_scores: dict[str, float] | None
    cfg: ReportConfig
    seconds: dict[str, float]
    y_test: np.ndarray | None = field(default=None, repr=False)  # the test labels (None: no intervals)

    @cached_property
    def _paper(self) -> tuple[list[dict], dict]:
        return summarize_table(self.paper_rows, self.y_test, self.cfg.baseline)

    @cached_property
    def _tuned(self) -> tuple[list[dict], dict]:
        return summarize_table(self._tuned_with_predictions, self.y_test, self.cfg.baseline)

    @property
    def _tuned_with_predictions(self) -> list[dict]:
        return [{**r.row(), "test_pred": r.test_pred} for r in self.tuned_runs]

    @property
    def paper_summary(self) -> list[dict]:
        return self._paper[0]

    @property
    def tuned_rows(self) -> list[dict]:
        return [r.row() for r in self.tuned_runs]

    @property
    def tuned_summary(self) -> list[dict]:
        return self._tuned[0]

    @property
    def best(self) -> dict:
        """The tuned view x head with the best mean validation accuracy (the first on a tie): a choice, so made
        on validation, never on test; its test accuracy is then read, not maximized."""
        def val(s: dict) -> float:
            vals = [r["val_acc"] for r in self.tuned_rows if (r["view"], r["head"]) == (s["view"], s["head"])]
            return sum(vals) / len(vals)
        return max(self.tuned_summary, key=val)

    @cached_property
    def answer(self) -> dict | None:
        """The case study's question, answered from the tuned table (answer_question)."""
        if self.y_test is None:
            return None
        return answer_question(self.tuned_summary, self._tuned_with_predictions, self.y_test, self.cfg.heads)

    def predictions(self) -> tuple[dict, dict]:
        """({key: (runs, n) predictions}, {key: runs}) of both tables: `paper/VIEW/HEAD`, `tuned/VIEW/HEAD`."""
        paper, paper_runs = prediction_arrays(self.paper_rows, "paper")
        tuned, tuned_runs = prediction_arrays(self._tuned_with_predictions, "tuned")
        return {**paper, **tuned}, {**paper_runs, **tuned_runs}

    def estimator(self, view: str, head: str, seed: int):
        for r in self.tuned_runs:
            if (r.view, r.head, r.seed) == (view, head, seed):
                return r.estimator
        return None

    def to_json(self) -> dict:
        best = self.best
        found = self.answer
        return {
            "cache": self.cache, "fingerprint": self.fingerprint, "provenance": self.provenance,
            "case_study": CASE_STUDY,
            "answer": None if found is None else found["text"],
            "answer_comparison": None if found is None else {k: v for k, v in found.items() if k != "text"},
            "paper": {"params": asdict(HeadParams()), "rows": public_rows(self.paper_rows),
                      "summary": self.paper_summary, "baseline": self._paper[1]},
            "tuned": {"val_fraction": self.cfg.val_fraction,
                      "validation": self.provenance.get("split", {}).get("validation"),
                      "grids": {h: {"param": HEAD_SPECS[h].tuned, "values": list(HEAD_SPECS[h].grid)}
                                for h in self.cfg.heads},
                      "full_grid": self.cfg.full_grid, "rows": self.tuned_rows, "summary": self.tuned_summary, "baseline": self._tuned[1],
                      "pair_search": self.pair_scores,
                      "pair_late": ",".join(self.provenance.get("late", [])) or None},
            "seeds": self.cfg.seeds, "views": self.cfg.views, "heads": self.cfg.heads,
            "best_view": best["view"], "best_head": best["head"], "best_test_acc": best["test_acc_mean"],
            "best_test_acc_std": best["test_acc_std"],
            "best_test_acc_lo": best.get("test_acc_lo"), "best_test_acc_hi": best.get("test_acc_hi"),
            **({"bootstrap": bootstrap_record()} if self.y_test is not None else {}),
            "seconds": self.seconds,
            **({"fewshot": self.cfg.fewshot.record()} if self.cfg.fewshot is not None else {}),
        }


QUESTION = ("Fusing early and late layers changes test accuracy by {value} points {interval} against the last layer "
            "alone")


def answer_question(summary: list[dict], rows: list[dict], y_test: np.ndarray, heads: list[str]) -> dict | None:
    """The case study's question in one sentence, from a tuned table: the `fused` row against the `late` row,
    with one head (the first on a tie), the difference in points with its
    paired-bootstrap interval and McNemar's p (the head: the best mean validation accuracy over its fused and
    late rows, never test). Where the table compared fused with that late row, its
    Holm-corrected p (over the table's comparisons); else the lone comparison's own. None where the table has
    no fused or no late row (or no predictions). Returns the comparison's fields and `text`, the sentence."""
    by = {(s["view"], s["head"]): s for s in summary}
    both = [h for h in heads if ("fused", h) in by and ("late", h) in by]
    if not both:
        return None
    def chosen_on(h):  # the head is chosen on validation (the tuned rows' val_acc), never on test
        vals = [r["val_acc"] for r in rows if r["head"] == h and r["view"] in ("fused", "late") and "val_acc" in r]
        return float(np.mean(vals)) if vals else max(by["fused", h]["test_acc_mean"], by["late", h]["test_acc_mean"])

    head = max(both, key=chosen_on)
    fused = by["fused", head]
    if fused.get("vs_baseline") and fused.get("baseline") == {"view": "late", "head": head}:
        record, m = fused["vs_baseline"], comparisons_made(summary)
    else:  # the table compared against another baseline: this one comparison on its own
        pair = [r for r in rows if r["head"] == head and r["view"] in ("fused", "late")]
        found = table_stats(pair, y_test, Baseline("late", head, True)).get(("", "fused", head))
        if found is None or found.comparison is None:
            return None
        record, m = found.comparison.record(), 1
    c = stats.Comparison(record["diff"], record["diff_lo"], record["diff_hi"], record["p_mcnemar"],
                         record["only_a_right"], record["only_b_right"], record["p_holm"])
    value, interval = stats.points(c).split(" ", 1)
    p = stats.p_text(c.p if c.p_holm is None else c.p_holm)
    p = f"p {p}" if p.startswith("<") else f"p = {p}"
    how = f"McNemar, Holm-corrected over {m} comparisons" if m > 1 else "McNemar"
    said = QUESTION.format(value=value, interval=interval)
    text = (f"{said} (tuned {head}, {p}, {how})." if c.significant else
            f"{said} (tuned {head}): not significant at this test size ({len(y_test):,} images; {p}, {how}).")
    return {"text": text, "view": "fused", "baseline": {"view": "late", "head": head}, "head": head, **record,
            "n_test": int(len(y_test)), "comparisons": m}


def run_report(cache: Cache, cfg: ReportConfig, progress=None, offered=None) -> ReportResult:
    """Both protocols: the case study's (exactly `ablate`) and the tuned one (selection.py)."""
    import time

    cfg.check(cache, offered)  # every view, head and the pair search, now, not after minutes of fitting
    say = progress or (lambda msg: None)
    tunings = None if cfg.fewshot is None else cfg.check_fewshot(cache, offered)
    t0 = time.perf_counter()
    say("paper protocol" + ("" if tunings is None else f" ({fewshot_header(cfg.fewshot.record())})"))
    paper_rows = ablate(cache, cfg.views, cfg.heads, cfg.seeds, HeadParams(),
                        progress=lambda r: say(f"  paper {r['view']} {r['head']} seed {r['seed']}"
                                               + (f" draw {r['draw']}" if "draw" in r else "") + ": "
                                               f"test {100 * r['test_acc']:.2f} %"), offered=offered,
                        fewshot=cfg.fewshot)
    t1 = time.perf_counter()
    tuned_views = list(cfg.views)
    pair_scores = None
    if cfg.pair_search:
        pair, pair_scores = best_pair(cache, cfg.seeds[0], cfg.val_fraction, cfg.device, cfg.max_iter,
                                      tuning=None if tunings is None else tunings[cfg.seeds[0], 0])
        say(f"best early+late pair on validation: {pair}")
        if pair not in tuned_views:
            tuned_views.append(pair)
    t2 = time.perf_counter()
    store = ViewStore(cache, cfg.device)
    runs = []
    for view in tuned_views:
        # every head and seed of one view in one call: the L2 heads of all seeds share the stacked fits
        view_runs = (tune_heads(store, view, cfg.heads, cfg.seeds, cfg.val_fraction, cfg.max_iter,
                                full_grid=cfg.full_grid) if tunings is None
                     else _tune_draws(store, view, cfg, tunings))
        for run in view_runs:
            runs.append(run)
            say(f"  tuned {view} {run.head} seed {run.seed}" + (f" draw {run.fewshot['draw']}" if run.fewshot else "")
                + f": {run.param} {run.value:g}, val {100 * run.val_acc:.2f} %, "
                f"test {100 * run.test_acc:.2f} % ({run.fit_seconds:.1f} s)")
        store.drop(view)  # one view's matrices in memory at a time
    t3 = time.perf_counter()
    try:
        late = cache.view_taps("late")
    except FusionCacheError:  # a cache without the late view's taps: no pair search either
        late = []
    return ReportResult(str(cache.path), cache.fingerprint, {**provenance(cache), "taps": cache.taps, "late": late},
                        paper_rows,
                        runs, pair_scores, cfg, {"paper": t1 - t0, "pair_search": t2 - t1, "tuned": t3 - t2},
                        cache.labels("test"))


def _tune_draws(store: ViewStore, view: str, cfg: ReportConfig, tunings: dict) -> list[TunedRun]:
    """The tuned protocol on each (seed, draw) of a few-shot report: each draw's rows in a store of their own
    (standardized with the draw's statistics), chosen on the draw's validation rows, refit on the draw. Runs
    come back head by head, seeds in order, draws in order."""
    full = store.data(view)
    runs = []
    for (seed, i), tuning in tunings.items():
        drawn = ViewStore(store.cache, store.device)
        drawn.put(view, tuning.data(full))
        for run in tune_heads(drawn, view, cfg.heads, [seed], cfg.val_fraction, cfg.max_iter,
                              full_grid=cfg.full_grid):
            run.fewshot = tuning.draw.record()
            runs.append(run)
    order = {h: n for n, h in enumerate(cfg.heads)}
    return sorted(runs, key=lambda r: (order[r.head], cfg.seeds.index(r.seed), r.fewshot["draw"]))


def markdown(report: dict, command: str, machine: str) -> str:
    """report.md from the report's JSON."""
    from .leaks import summary as leak_line
    from .split import describe as split_line

    p = report["provenance"]
    paper = {(s["view"], s["head"]): s for s in report["paper"]["summary"]}
    paper_base, tuned_base = report["paper"].get("baseline"), report["tuned"].get("baseline")
    paper_extra = comparison_header(paper_base, report["paper"]["summary"])
    tuned_extra = comparison_header(tuned_base, report["tuned"]["summary"])
    lines = [
        "# fusion-cache report", "",
        (report.get("answer") or "No answer to the case study's question (does fusing early and late layers help?): "
         "it needs both `fused` and `late` in --views."), "",
        f"Command: `{command}`", "",
        f"Cache `{report['cache']}` (fingerprint `{report['fingerprint'][:16]}`): {p['dataset']}, "
        f"train {p['train_size']} / test {p['test_size']} images (subset seed {p['seed']}), {p['image_size']} px, "
        f"{p['pool']} pooling, weights `{p['weights']}` (sha256 `{p['weights_sha256'][:16]}…`), "
        f"{len(p['taps'])} taps. Machine: {machine}.", "",
        f"Split: {split_line(p.get('split', {}))}. Leaks: {leak_line(p.get('leaks', {}))}.", "",
        f"Accuracies in percent, {spread(report['seeds'], report.get('fewshot'))}.", "",
        *([fewshot_header(report["fewshot"]), ""] if report.get("fewshot") else []),
        "## The case study's protocol", "",
        "2 epochs, Adam lr 1e-3, batch 32, raw features (`linear`); standardized logistic regression, C = 0.1 "
        "(`logreg`). Training accuracy is measured over each epoch's mini-batches, as the case study does.", "",
        "| view | head | epoch 1 train | epoch 2 (final) train | test |" + "".join(f" {h} |" for h in paper_extra),
        "|---|---|---:|---:|---:|" + "---:|" * len(paper_extra),
    ]
    if p.get("backbone", "mobilenet_v2") == "mobilenet_v2":  # the case study's numbers are MobileNetV2's
        lines.append("| *case study: fused* | *linear* | *62.78* | *77.58* | *not reported* |" + " |" * len(paper_extra))
    for (view, head), s in paper.items():
        rows = [r for r in report["paper"]["rows"] if r["view"] == view and r["head"] == head]
        if HEAD_SPECS[head].records_epochs:
            ep = [[r["epochs"][i]["train_acc"] for r in rows] for i in range(len(rows[0]["epochs"]))]
            e1 = _pm(ep[0])
            e2 = _pm(ep[1]) if len(ep) > 1 else "—"
        elif any(r["train_acc"] is None for r in rows):  # knn has no training score
            e1 = e2 = "—"
        else:
            e1, e2 = "—", _pm([r["train_acc"] for r in rows])
        lines.append(f"| {view} | {head} | {e1} | {e2} | {interval_cell(s)} |"
                     + "".join(f" {c} |" for c in comparison_cells(s, paper_base)))
    note = comparison_note(paper_base, report["paper"]["summary"])
    lines += ["", *([note, ""] if note else []),
              "For `logreg` the train column is the converged fit's training accuracy; it has no epochs."]
    grids = "; ".join(f"`{h}`: {g['param']} in {g['values']}" if len(g["values"]) <= 8 else
                      f"`{h}`: {g['param']} in {len(g['values'])} values from {g['values'][0]:g} to {g['values'][-1]:g}"
                      for h, g in report["tuned"]["grids"].items())
    fs = report.get("fewshot")
    if fs:  # few-shot: chosen on the draw's validation, refit on the draw
        k = fs["train_per_class"]
        n_val = validation_count(k, report["tuned"]["val_fraction"])
        how = ((f"The dataset's own validation split ({report['tuned']['validation']}, cached with train; never "
                "drawn from) chooses ") if report["tuned"].get("validation") else
               (f"{100 * report['tuned']['val_fraction']:g} % of each draw (round({report['tuned']['val_fraction']:g}"
                f" x {k}) = {n_val} of its {k} images a class, seeded per seed and draw) is held out to choose "))
        tuned_text = (how + f"each head's parameter: {grids}. `linear` is trained on features standardized with the "
                      f"draw's statistics; the chosen one is refit on the draw's {k} images a class and nothing "
                      "else. The test split is used only for the final number.")
    else:
        given = report["tuned"].get("validation")
        tuned_text = ((f"The dataset's own validation split ({given}, cached with train) chooses " if given else
                       f"{100 * report['tuned']['val_fraction']:.0f} % of train held out (stratified, per seed) "
                       "to choose ")
                      + "each head's parameter: " + grids
                      + ". `linear` and `logreg` are trained on features standardized with train statistics, their "
                      "grid points as one stacked model (L-BFGS per head, one matrix product per pass), "
                      + ("every point of the grid" if report["tuned"].get("full_grid") else
                         "walked strongest first until validation accuracy falls below its best (`--walk-grid`; "
                         "`grid` in report.json's rows lists the points fitted)")
                      + "; `ridge` solves its whole grid from one eigendecomposition. The chosen one is refit on all "
                      "of train. The test split is used only for the final number.")
    lines += ["", "## Tuned on a validation split", "", tuned_text, "",
              "| view | head | dim | chosen | val acc | test acc |" + "".join(f" {h} |" for h in tuned_extra),
              "|---|---|---:|---|---:|---:|" + "---:|" * len(tuned_extra)]
    for s in report["tuned"]["summary"]:
        rows = [r for r in report["tuned"]["rows"] if r["view"] == s["view"] and r["head"] == s["head"]]
        key = report["tuned"]["grids"][s["head"]]["param"]
        chosen = ", ".join(f"{r[key]:g}" for r in rows)
        if fs:  # seeds x draws choices: each value once, in grid order, with how often it was chosen
            picked = [r[key] for r in rows]
            values = [v for v in report["tuned"]["grids"][s["head"]]["values"] if v in picked]
            chosen = ", ".join(f"{v:g} ×{picked.count(v)}" for v in dict.fromkeys(values + picked))
        lines.append(f"| {s['view']} | {s['head']} | {s['dim']} | {key} {chosen} | "
                     f"{_pm([r['val_acc'] for r in rows])} | {interval_cell(s)} |"
                     + "".join(f" {c} |" for c in comparison_cells(s, tuned_base)))
    note = comparison_note(tuned_base, report["tuned"]["summary"])
    best = {"test_acc_mean": report["best_test_acc"], "test_acc_std": report["best_test_acc_std"],
            "test_acc_lo": report.get("best_test_acc_lo"), "test_acc_hi": report.get("best_test_acc_hi")}
    lines += ["", *([note, ""] if note else []),
              f"**Best (tuned, chosen on validation): `{report['best_view']}` with `{report['best_head']}`, "
              f"{interval_cell(best)} % test accuracy.**", ""]
    if report["tuned"]["pair_search"]:
        ps = report["tuned"]["pair_search"]
        top = sorted(ps.items(), key=lambda kv: -kv[1])[:5]
        late = report["tuned"].get("pair_late", "features.18")
        lines += [f"Taps paired with the late view ({late}), validation accuracy (seed "
                  f"{report['seeds'][0]}{', draw 0' if fs else ''}): "
                  + ", ".join(f"{t} {100 * v:.2f}" for t, v in top) + ".", ""]
    lines += ["## Figures", "", "![samples](samples.png)", "", "![curves](curves.png)", "",
              "![predictions](predictions.png)", "", "![confusion](confusion.png)", "", "![per class](per_class.png)", ""]
    return "\n".join(lines)


def figure_sources(cache: Cache, data_root: str | Path | None = None) -> dict:
    """The images the cache came from, for the figures: checked against the cache's recorded data identity.
    Called before any fitting, so a missing dataset fails in a second, not after the report's runs."""
    from . import sources as sources_mod
    from .sources.base import IntegrityWarning
    from .split import as_recorded

    meta = cache.meta
    root = Path(data_root) if data_root else Path(meta.data_root)
    try:
        with warnings.catch_warnings():  # the identity check below is stricter than the release checksums
            warnings.simplefilter("ignore", IntegrityWarning)
            listing = sources_mod.load(meta.dataset, root, sources_mod.LoadOptions(False, True, **meta.source_options))
            made = as_recorded(listing, meta.split)
    except FusionCacheError as e:
        raise FusionCacheError(f"the figures need the images the cache came from ({e}); pass --data-root") from None
    sources = {}
    for split, src in (("train", made.train), ("test", made.test)):
        recorded = meta.data_identity.get(split)
        if recorded and src.identity != recorded:
            raise FusionCacheError(
                f"the {split} images under {root} are not the ones {cache.path} was extracted from; "
                "pass --data-root with the original dataset"
            )
        sources[split] = src
    return sources


def render_figures(report: ReportResult, cache: Cache, out_dir: Path, sources: dict) -> None:
    """The five PNGs; `sources` from figure_sources()."""
    from . import figures
    from .backbone import Preprocess

    pre = Preprocess(cache.meta.image_size, cache.meta.mean, cache.meta.std, cache.meta.interpolation)
    classes = cache.classes

    def images(split: str, positions) -> np.ndarray:
        idx = cache.indices(split)
        return np.stack([pre.resize(sources[split].image(int(idx[p]))).numpy() for p in positions])

    ytr = cache.labels("train")
    per_class_take = max(1, min(3, 32 // max(1, len(classes))))
    pos = [p for c in range(len(classes)) for p in np.flatnonzero(ytr == c)[:per_class_take]]
    figures.samples(images("train", pos), ytr[pos], classes, out_dir / "samples.png")
    figures.curves(report.paper_rows, out_dir / "curves.png",
                   CASE_STUDY["epochs"] if cache.backbone == "mobilenet_v2" else None)

    best_view, best_head, seed = report.best["view"], report.best["head"], report.cfg.seeds[0]
    est = report.estimator(best_view, best_head, seed)
    Xte, yte = cache.view(best_view, "test")
    proba = _probabilities(est, Xte)
    pred = est.classes_[proba.argmax(1)]
    right, wrong = np.flatnonzero(pred == yte), np.flatnonzero(pred != yte)
    n_wrong = min(6, len(wrong), 18)
    show = np.concatenate([right[: 18 - n_wrong], wrong[:n_wrong]])
    figures.predictions(images("test", show), yte[show], pred[show], proba[show].max(1), classes,
                        out_dir / "predictions.png",
                        f"Test predictions, {best_view} view, tuned {best_head}, seed {seed}: the first "
                        f"{len(show) - n_wrong} right and the first {n_wrong} wrong of the test split")
    figures.confusion(yte, pred, classes, out_dir / "confusion.png",
                      f"Confusion on test: {best_view}, tuned {best_head} ({100 * (pred == yte).mean():.1f} %)")
    acc = {}
    shown = [v for v in ("early", "late", "fused") if report.estimator(v, best_head, seed) is not None] or [best_view]
    for view in shown:
        X, _ = cache.view(view, "test")
        p = report.estimator(view, best_head, seed).predict(X)
        acc[view] = np.array([(p[yte == c] == c).mean() if (yte == c).any() else 0.0 for c in range(len(classes))])
    figures.per_class(acc, classes, out_dir / "per_class.png", f"Per-class test accuracy, tuned {best_head}, seed {seed}")


def _probabilities(est, X: np.ndarray) -> np.ndarray:
    """The head's probabilities; for a head that gives scores only (ridge), the softmax of its linear form's
    scores, as `predict` shows them (a confidence for the figure, not a calibrated probability)."""
    if hasattr(est, "predict_proba"):
        return est.predict_proba(X)
    from .heads import linear_form

    f = linear_form(est)
    z = ((X - f["mean"]) / f["scale"]) @ f["coef"].T + f["intercept"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _pm(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


REPORT_FILES = ("report.md", "report.json", "samples.png", "curves.png", "predictions.png", "confusion.png",
                "per_class.png", PREDICTIONS_FILE)


def write_report(report: ReportResult, out_dir: Path, command: str, machine: str) -> None:
    out = Path(out_dir)
    public = report.to_json()
    public["command"] = command
    public["machine"] = machine
    atomic_write_text(out / "report.json", dumps_json(public, indent=2))
    atomic_write_text(out / "report.md", markdown(public, command, machine))
    if report.y_test is not None:  # every row's predictions: any pair compares later without refitting
        save_predictions(out / PREDICTIONS_FILE, report.y_test, *report.predictions())
