"""The report: the case study's protocol and a validation-tuned protocol on one cache, as Markdown, JSON and figures.

- paper: the case study's head (2 epochs, Adam 1e-3, batch 32, raw features) and the logreg baseline (C=0.1),
  exactly as `ablate` runs them, over seeds.
- tuned: a stratified, seeded validation split carved from train; the L2 strength (weight decay for `linear`,
  solved full-batch with L-BFGS on standardized features; C for `logreg`) chosen on it from a log grid; a refit
  on the whole train split; test accuracy reported. The test split is read only for that final number.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from .cache import Cache
from .errors import FusionCacheError
from .fit import HeadParams, ViewData, ablate, fit_head, load_view, make_head, provenance, summarize
from .io import atomic_write_text, dumps_json
from .heads import HEADS
from .taps import LATE_TAP

# The case study's reported numbers (fused head, training accuracy only).
CASE_STUDY = {"epochs": [{"epoch": 1, "train_acc": 0.6278, "train_loss": 1.1648},
                         {"epoch": 2, "train_acc": 0.7758, "train_loss": 0.6978}], "test_acc": None}
# The L2 grids, strongest regularization first: tuning walks this path with warm starts, and ties go to the
# strongest.
WEIGHT_DECAY_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)  # linear: L2 on the weights of the mean cross-entropy
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # logreg: inverse L2 strength
PAIR_WEIGHT_DECAY = 1e-2  # the pair search ranks taps with one mid-grid strength (50 L-BFGS steps each)


@dataclass
class ReportConfig:
    views: list[str] = field(default_factory=lambda: ["early", "late", "fused", "all"])
    heads: list[str] = field(default_factory=lambda: ["linear", "logreg"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    val_fraction: float = 0.1  # of the train split, stratified, drawn with each seed
    pair_search: bool = True  # also tune the best features.i + features.18 pair, chosen on validation
    max_iter: int = 100  # L-BFGS iterations of the tuned linear head

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise FusionCacheError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.views or not self.heads or not self.seeds:
            raise FusionCacheError("report needs at least one view, one head and one seed")


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the train split: disjoint, stratified, seeded."""
    rows = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and round(fraction * len(y)) >= len(counts[counts > 0]) else None
    fit_rows, val_rows = train_test_split(rows, test_size=fraction, stratify=stratify, random_state=seed)
    lost = np.setdiff1d(np.unique(y), y[fit_rows])
    if len(lost):
        raise FusionCacheError(f"--val-fraction {fraction:g} leaves class {int(lost[0])} without training rows "
                               f"(it has {int((y == lost[0]).sum())} train images); pass a smaller --val-fraction")
    return np.sort(fit_rows), np.sort(val_rows)


def _grid(head: str) -> tuple[str, tuple[float, ...]]:
    if head not in HEADS:
        raise FusionCacheError(f"unknown head '{head}'; use one of {', '.join(HEADS)}")
    return ("weight_decay", WEIGHT_DECAY_GRID) if head == "linear" else ("C", C_GRID)


def _tuned_params(head: str, value: float, base: HeadParams, max_iter: int) -> HeadParams:
    if head == "linear":
        return replace(base, solver="lbfgs", standardize=True, weight_decay=value, max_iter=max_iter)
    return replace(base, C=value)


def tune(cache: Cache, view: str, head: str, seed: int, cfg: ReportConfig, data=None) -> dict:
    """Choose the L2 strength on a validation split of train, refit on all of train, test once.

    The grid is walked from the strongest regularization to the weakest, each fit warm-started from the one
    before (scikit-learn's `warm_start`), so the path costs little more than one cold fit."""
    data = data if data is not None else load_view(cache, view)
    taps, Xtr, ytr = data.taps, data.X_train, data.y_train
    fit_rows, val_rows = validation_split(ytr, cfg.val_fraction, seed)
    name, grid = _grid(head)
    est = make_head(head, _tuned_params(head, grid[0], HeadParams(), cfg.max_iter), seed)
    step = "" if head == "linear" else "logisticregression__"  # the estimator inside make_logreg's pipeline
    est.set_params(**{f"{step}warm_start": True})
    Xfit, yfit, Xval, yval = Xtr[fit_rows], ytr[fit_rows], Xtr[val_rows], ytr[val_rows]
    val_scores = []
    for value in grid:
        est.set_params(**{f"{step}{name}": value})
        est.fit(Xfit, yfit)
        val_scores.append(float(est.score(Xval, yval)))
    best = grid[int(np.argmax(val_scores))]  # first of the best: the strongest regularization wins ties
    final = fit_head(cache, view, head, _tuned_params(head, best, HeadParams(), cfg.max_iter), seed, data=data)
    return {"view": view, "head": head, "seed": seed, "taps": ",".join(taps), "dim": final.dim, name: best,
            "grid": {f"{v:g}": s for v, s in zip(grid, val_scores)}, "val_acc": max(val_scores),
            "train_acc": final.train_acc, "test_acc": final.test_acc, "fit_seconds": final.fit_seconds,
            "val_rows": int(len(val_rows)), "fit_rows": int(len(fit_rows)), "_estimator": final.estimator}


def best_pair(cache: Cache, seed: int, cfg: ReportConfig) -> tuple[str, dict[str, float]]:
    """The early tap that best complements features.18, judged on validation accuracy only."""
    if LATE_TAP not in cache.taps:
        raise FusionCacheError(f"the pair search needs {LATE_TAP}; extract it, or pass --no-pair-search")
    ytr = cache.labels("train")
    fit_rows, val_rows = validation_split(ytr, cfg.val_fraction, seed)
    late = cache.features(LATE_TAP, "train").astype(np.float32)
    params = _tuned_params("linear", PAIR_WEIGHT_DECAY, HeadParams(), min(cfg.max_iter, 50))
    scores = {}
    for tap in [t for t in cache.taps if t != LATE_TAP]:
        X = np.concatenate([cache.features(tap, "train").astype(np.float32), late], axis=1)
        view = f"{tap},{LATE_TAP}"
        r = fit_head(cache, view, "linear", params, seed,
                     data=ViewData(view, [tap, LATE_TAP], X[fit_rows], ytr[fit_rows], X[val_rows], ytr[val_rows]))
        scores[tap] = r.test_acc
    tap = max(scores, key=scores.get)
    return f"{tap},{LATE_TAP}", scores


def run_report(cache: Cache, cfg: ReportConfig, progress=None) -> dict:
    """Both protocols; returns the report as a dict (estimators of the tuned runs under '_estimators')."""
    cfg.check()
    for view in cfg.views:
        cache.view_taps(view)  # an unknown view fails now, not after minutes of fitting
    for head in cfg.heads:
        _grid(head)
    say = progress or (lambda msg: None)
    say("paper protocol")
    paper_rows = ablate(cache, cfg.views, cfg.heads, cfg.seeds, HeadParams(),
                        progress=lambda r: say(f"  paper {r['view']} {r['head']} seed {r['seed']}: "
                                               f"test {100 * r['test_acc']:.2f} %"))
    tuned_views = list(cfg.views)
    pair_scores = None
    if cfg.pair_search:
        pair, pair_scores = best_pair(cache, cfg.seeds[0], cfg)
        say(f"best early+late pair on validation: {pair}")
        if pair not in tuned_views:
            tuned_views.append(pair)
    tuned_rows = []
    for view in tuned_views:
        data = load_view(cache, view)
        for head in cfg.heads:
            for seed in cfg.seeds:
                row = tune(cache, view, head, seed, cfg, data=data)
                tuned_rows.append(row)
                say(f"  tuned {view} {head} seed {seed}: val {100 * row['val_acc']:.2f} %, "
                    f"test {100 * row['test_acc']:.2f} %")
    tuned_summary = summarize(tuned_rows)
    best = max(tuned_summary, key=lambda s: s["test_acc_mean"])
    estimators = {(r["view"], r["head"], r["seed"]): r.pop("_estimator") for r in tuned_rows}
    return {
        "cache": str(cache.path), "fingerprint": cache.fingerprint, "provenance": {**provenance(cache), "taps": cache.taps},
        "case_study": CASE_STUDY,
        "paper": {"params": asdict(HeadParams()), "rows": paper_rows, "summary": summarize(paper_rows)},
        "tuned": {"val_fraction": cfg.val_fraction, "weight_decay_grid": list(WEIGHT_DECAY_GRID),
                  "C_grid": list(C_GRID), "rows": tuned_rows, "summary": tuned_summary,
                  "pair_search": pair_scores},
        "seeds": cfg.seeds, "views": cfg.views, "heads": cfg.heads,
        "best_view": best["view"], "best_head": best["head"], "best_test_acc": best["test_acc_mean"],
        "best_test_acc_std": best["test_acc_std"],
        "_estimators": estimators,
    }


def markdown(report: dict, command: str, machine: str) -> str:
    p = report["provenance"]
    paper = {(s["view"], s["head"]): s for s in report["paper"]["summary"]}
    lines = [
        "# fusion-cache report", "",
        f"Command: `{command}`", "",
        f"Cache `{report['cache']}` (fingerprint `{report['fingerprint'][:16]}`): {p['dataset']}, "
        f"train {p['train_size']} / test {p['test_size']} images (subset seed {p['seed']}), {p['image_size']} px, "
        f"{p['pool']} pooling, weights `{p['weights']}` (sha256 `{p['weights_sha256'][:16]}…`), "
        f"{len(p['taps'])} taps. Machine: {machine}.", "",
        f"Accuracies in percent, mean ± std over seeds {report['seeds']}.", "",
        "## The case study's protocol", "",
        "2 epochs, Adam lr 1e-3, batch 32, raw features (`linear`); standardized logistic regression, C = 0.1 "
        "(`logreg`). Training accuracy is measured over each epoch's mini-batches, as the case study does.", "",
        "| view | head | epoch 1 train | epoch 2 (final) train | test |", "|---|---|---:|---:|---:|",
        "| *case study: fused* | *linear* | *62.78* | *77.58* | *not reported* |",
    ]
    for (view, head), s in paper.items():
        rows = [r for r in report["paper"]["rows"] if r["view"] == view and r["head"] == head]
        if head == "linear":
            ep = [[r["epochs"][i]["train_acc"] for r in rows] for i in range(len(rows[0]["epochs"]))]
            e1 = _pm(ep[0])
            e2 = _pm(ep[1]) if len(ep) > 1 else "—"
        else:
            e1, e2 = "—", _pm([r["train_acc"] for r in rows])
        lines.append(f"| {view} | {head} | {e1} | {e2} | {_pm([r['test_acc'] for r in rows])} |")
    lines += ["", "For `logreg` the train column is the converged fit's training accuracy; it has no epochs."]
    lines += ["", "## Tuned on a validation split", "",
              f"{100 * report['tuned']['val_fraction']:.0f} % of train held out (stratified, per seed) to choose the "
              f"L2 strength: weight decay in {report['tuned']['weight_decay_grid']} for `linear` (standardized, "
              f"full-batch L-BFGS), C in {report['tuned']['C_grid']} for `logreg`; then refit on all of train. "
              "The test split is used only for the final number.", "",
              "| view | head | dim | chosen | val acc | test acc |", "|---|---|---:|---|---:|---:|"]
    for s in report["tuned"]["summary"]:
        rows = [r for r in report["tuned"]["rows"] if r["view"] == s["view"] and r["head"] == s["head"]]
        key = "weight_decay" if s["head"] == "linear" else "C"
        chosen = ", ".join(f"{r[key]:g}" for r in rows)
        lines.append(f"| {s['view']} | {s['head']} | {s['dim']} | {key} {chosen} | "
                     f"{_pm([r['val_acc'] for r in rows])} | {_pm([r['test_acc'] for r in rows])} |")
    lines += ["", f"**Best (tuned): `{report['best_view']}` with `{report['best_head']}`, "
                  f"{100 * report['best_test_acc']:.2f} ± {100 * report['best_test_acc_std']:.2f} % test accuracy.**", ""]
    if report["tuned"]["pair_search"]:
        ps = report["tuned"]["pair_search"]
        top = sorted(ps.items(), key=lambda kv: -kv[1])[:5]
        lines += ["Early tap paired with features.18, validation accuracy (seed "
                  f"{report['seeds'][0]}): " + ", ".join(f"{t} {100 * v:.2f}" for t, v in top) + ".", ""]
    lines += ["## Figures", "", "![samples](samples.png)", "", "![curves](curves.png)", "",
              "![predictions](predictions.png)", "", "![confusion](confusion.png)", "", "![per class](per_class.png)", ""]
    return "\n".join(lines)


def figure_sources(cache: Cache, data_root: str | Path | None = None) -> dict:
    """The images the cache came from, for the figures: checked against the cache's recorded data identity.
    Called before any fitting, so a missing dataset fails in a second, not after the report's runs."""
    from .data import IntegrityWarning, load_source

    meta = cache.meta
    root = Path(data_root) if data_root else Path(meta.data_root)
    sources = {}
    for split in ("train", "test"):
        try:
            with warnings.catch_warnings():  # the identity check below is stricter than the release checksums
                warnings.simplefilter("ignore", IntegrityWarning)
                src = load_source(meta.dataset, root, split, download=False, skip_integrity_check=True)
        except FusionCacheError as e:
            raise FusionCacheError(f"the figures need the images the cache came from ({e}); pass --data-root") from None
        recorded = meta.data_identity.get(split)
        if recorded and src.identity != recorded:
            raise FusionCacheError(
                f"the {split} images under {root} are not the ones {cache.path} was extracted from; "
                "pass --data-root with the original dataset"
            )
        sources[split] = src
    return sources


def render_figures(report: dict, cache: Cache, out_dir: Path, sources: dict) -> None:
    """The five PNGs; `sources` from figure_sources()."""
    from . import figures
    from .backbone import Preprocess

    pre = Preprocess(cache.meta.image_size, cache.meta.mean, cache.meta.std)
    classes = cache.classes

    def images(split: str, positions) -> np.ndarray:
        idx = cache.indices(split)
        return np.stack([pre.resize(sources[split].image(int(idx[p]))).numpy() for p in positions])

    ytr = cache.labels("train")
    per_class_take = max(1, min(3, 32 // max(1, len(classes))))
    pos = [p for c in range(len(classes)) for p in np.flatnonzero(ytr == c)[:per_class_take]]
    figures.samples(images("train", pos), ytr[pos], classes, out_dir / "samples.png")
    figures.curves(report["paper"]["rows"], out_dir / "curves.png", CASE_STUDY["epochs"])

    best_view, best_head, seed = report["best_view"], report["best_head"], report["seeds"][0]
    est = report["_estimators"][(best_view, best_head, seed)]
    Xte, yte = cache.view(best_view, "test")
    proba = est.predict_proba(Xte)
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
    shown = [v for v in ("early", "late", "fused") if (v, best_head, seed) in report["_estimators"]] or [best_view]
    for view in shown:
        X, _ = cache.view(view, "test")
        p = report["_estimators"][(view, best_head, seed)].predict(X)
        acc[view] = np.array([(p[yte == c] == c).mean() if (yte == c).any() else 0.0 for c in range(len(classes))])
    figures.per_class(acc, classes, out_dir / "per_class.png", f"Per-class test accuracy, tuned {best_head}, seed {seed}")


def _pm(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


REPORT_FILES = ("report.md", "report.json", "samples.png", "curves.png", "predictions.png", "confusion.png",
                "per_class.png")


def write_report(report: dict, out_dir: Path, command: str, machine: str) -> None:
    out = Path(out_dir)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["command"] = command
    public["machine"] = machine
    atomic_write_text(out / "report.json", dumps_json(public, indent=2))
    atomic_write_text(out / "report.md", markdown(report, command, machine))
