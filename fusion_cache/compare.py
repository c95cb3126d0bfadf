"""Across backbones: one table and one figure. `fusion-cache report A.h5 B.h5 ... --out DIR` (or one cache with
--layer-curve) runs the case study's protocol on every cache (the same images, one backbone each) and draws
the layer curve: the test accuracy of a head on each single tap against the tap's relative depth, one line
per backbone. It answers "which layer of which model" at a glance.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import stats
from .cache import Cache
from .fewshot import header as fewshot_header
from .fewshot import spread
from .fit import (HeadParams, ablate_caches, check_fewshot, check_heads, fit_head, interval_cell, load_view,
                  markdown_table, summarize, table_labels)
from .io import atomic_write_text, cache_labels, dumps_json
from .predictions import bootstrap_record, correct, public

# The head of the layer curve: linear, standardized (taps differ in scale by orders of magnitude), Adam 1e-3,
# batch 32, 10 epochs: enough to converge on a single tap of a few thousand images.
CURVE_HEAD = "linear"
CURVE_PARAMS = HeadParams(epochs=10, standardize=True)
COMPARE_FILES = ("report.md", "report.json", "layer_curve.png")


def layer_curve(cache: Cache, seeds: list[int], params: HeadParams = CURVE_PARAMS, progress=None,
                fewshot=None) -> list[dict]:
    """One row per tap of the cache: its relative depth and the test accuracy (mean, std over seeds) of a
    linear head trained on that tap alone, with its 95 % interval over the test images and the runs
    (test_acc_lo, test_acc_hi: stats.accuracy_interval with its defaults). With `fewshot` (fewshot.FewShot),
    each seed's draws: the mean, std and interval are over all (seed, draw) runs."""
    rows = []
    table = cache.table
    draws = None if fewshot is None else check_fewshot(cache, [CURVE_HEAD], params, fewshot, seeds)
    for tap in cache.taps:
        data = load_view(cache, tap)
        if draws is None:
            fits = [fit_head(cache, tap, CURVE_HEAD, params, s, data=data) for s in seeds]
        else:
            fits = [fit_head(cache, tap, CURVE_HEAD, params, s, data=draws[s, i].data(data))
                    for s in seeds for i in range(fewshot.draws)]
        accs = [r.test_acc for r in fits]
        iv = stats.accuracy_interval(correct(np.stack([r.test_pred for r in fits]), data.y_test))
        t = table.tap(tap)
        rows.append({"backbone": cache.backbone, "cache": str(cache.path), "tap": tap, "kind": t.kind,
                     "depth": t.depth, "dim": data.dim, "test_acc_mean": float(np.mean(accs)),
                     "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, **iv.fields()})
        if draws is not None:
            rows[-1].update(train_per_class=fewshot.train_per_class, n_draws=fewshot.draws, n_runs=len(accs))
        if progress:
            progress(rows[-1])
    return rows


def draw_layer_curve(rows: list[dict], path: Path, title: str = "") -> None:
    """Test accuracy against relative depth, one line per cache (labelled with its backbone)."""
    from .figures import _save, plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab10")
    for k, cache in enumerate(dict.fromkeys(r["cache"] for r in rows)):
        rs = [r for r in rows if r["cache"] == cache]
        x = [r["depth"] for r in rs]
        y = [100 * r["test_acc_mean"] for r in rs]
        e = [100 * r["test_acc_std"] for r in rs]
        best = int(np.argmax(y))
        ax.errorbar(x, y, yerr=e, marker="o", markersize=4, capsize=2, color=colors(k % 10),
                    label=f"{rs[0].get('label', rs[0]['backbone'])} (best {rs[best]['tap']}, {y[best]:.1f} %)")
    ax.set_xlabel("relative depth of the tap (position / number of taps)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Layer curve: a linear head on each single tap", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def run_comparison(caches: list[Cache], views: list[str], heads: list[str], seeds: list[int],
                   progress=None, offered=None, fewshot=None) -> dict:
    """The case study's protocol on every cache (one table) and every cache's layer curve: report.json.
    `offered`: the options of the command that runs it, so that advice names only those. With `fewshot`, both
    run on each seed's draws of K train images a class (the same images in every cache)."""
    say = progress or (lambda msg: None)
    for c in caches:  # the layer curve's head can run on every cache, before any training
        check_heads(c, [CURVE_HEAD], CURVE_PARAMS, offered)
        if fewshot is not None:
            check_fewshot(c, [CURVE_HEAD], CURVE_PARAMS, fewshot, seeds, offered)
    rows = ablate_caches(  # checks the caches hold the same data, every view resolves and every head can run,
        caches, views, heads, seeds, HeadParams(),  # before any training
        progress=lambda r: say(f"  paper {r['backbone']} {r['view']} {r['head']} seed {r['seed']}"
                               + (f" draw {r['draw']}" if "draw" in r else "") + ": "
                               f"test {100 * r['test_acc']:.2f} %"), offered=offered, fewshot=fewshot)
    curve = []
    for c, label in zip(caches, cache_labels([c.path for c in caches], [c.backbone for c in caches])):
        say(f"layer curve {c.backbone}: {len(c.taps)} taps x {len(seeds)} seeds")
        curve += [{**r, "label": label} for r in layer_curve(
            c, seeds, progress=lambda r: say(f"  {r['backbone']} {r['tap']} (depth {r['depth']:.2f}): "
                                             f"test {100 * r['test_acc_mean']:.2f} %"), fewshot=fewshot)]
    m = caches[0].meta
    return {"caches": [{"cache": str(c.path), "fingerprint": c.fingerprint, "backbone": c.backbone,
                        "weights": c.meta.weights, "weights_sha256": c.meta.weights_sha256,
                        "image_size": c.meta.image_size, "pool": c.meta.pool} for c in caches],
            "data": {"dataset": m.dataset, "train_size": m.train_size, "test_size": m.test_size, "seed": m.seed},
            "seeds": seeds, "views": views, "heads": heads,
            "paper": {"params": asdict(HeadParams()), "rows": public(rows),
                      "summary": summarize(rows, table_labels(caches))},
            "layer_curve": {"params": asdict(CURVE_PARAMS), "rows": curve}, "bootstrap": bootstrap_record(),
            **({"fewshot": fewshot.record()} if fewshot is not None else {})}


def comparison_markdown(result: dict, command: str, machine: str) -> str:
    d = result["data"]
    lines = ["# fusion-cache report: backbones compared", "", f"Command: `{command}`", "",
             f"{d['dataset']}, train {d['train_size']} / test {d['test_size']} images (subset seed {d['seed']}). "
             f"Machine: {machine}. Accuracies in percent, {spread(result['seeds'], result.get('fewshot'))}.", "",
             *([fewshot_header(result["fewshot"]), ""] if result.get("fewshot") else []),
             "| backbone | cache | weights | image size | pool |", "|---|---|---|---:|---|"]
    for c in result["caches"]:
        lines.append(f"| {c['backbone']} | `{c['cache']}` | `{c['weights']}` (sha256 `{c['weights_sha256'][:12]}…`) | "
                     f"{c['image_size']} | {c['pool']} |")
    lines += ["", "## The case study's protocol", "",
              "2 epochs, Adam lr 1e-3, batch 32, raw features (`linear`); standardized logistic regression, C = 0.1 "
              "(`logreg`).", "", markdown_table(result["paper"]["summary"]), "",
              "## Layer curve", "",
              "A linear head (standardized features, Adam lr 1e-3, batch 32, 10 epochs) on each single tap; x is the "
              "tap's relative depth (its position among the backbone's taps, the last one at 1).", "",
              "![layer curve](layer_curve.png)", "", "| backbone | tap | depth | dim | test acc (%), 95 % interval |",
              "|---|---|---:|---:|---:|"]
    for r in result["layer_curve"]["rows"]:
        lines.append(f"| {r.get('label', r['backbone'])} | {r['tap']} | {r['depth']:.2f} | {r['dim']} | "
                     f"{interval_cell(r)} |")
    b = result.get("bootstrap")
    if b and result["layer_curve"]["rows"]:
        runs = "(seed, draw) runs" if result.get("fewshot") else "seeds"
        lines += ["", f"Test accuracy: the mean over the {runs} with its {100 * b['level']:g} % interval, a bootstrap "
                  f"over the {result['paper']['summary'][0]['n_test']:,} test images and the {runs} ({b['resamples']} resamples, "
                  f"seed {b['seed']})."]
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, out_dir: Path, command: str, machine: str) -> None:
    """report.md, report.json and layer_curve.png into `out_dir` (a staged folder)."""
    draw_layer_curve(result["layer_curve"]["rows"], out_dir / "layer_curve.png")
    atomic_write_text(out_dir / "report.json", dumps_json({**result, "command": command, "machine": machine},
                                                          indent=2))
    atomic_write_text(out_dir / "report.md", comparison_markdown(result, command, machine))
