"""Where the tuned protocol's time goes: the stacked weight-decay grid of the `linear` head on one view of a
cache, against each grid head fitted alone and against the variants the README's issue-13 section reports.

    python scripts/grid_probe.py data/cifar10-full-avg.h5 [--view all] [--parts stacked,alone,path,quarter,history,tol]

Every fit is the report's own (grid.fit_l2_grid in the view's eigenbasis, Jacobi refresh, the report's
tolerance unless a part says otherwise) on the fit rows of seed 0's validation split. Prints seconds,
L-BFGS iterations per head and validation accuracies; nothing is written. Parts:
- stacked: the six heads as one stacked model (what `report` runs);
- alone: each head fitted on its own;
- path: each head warm-started from the optimum of the next stronger one;
- quarter: the grid on every fourth fit row first, then warm-started on all of them;
- history: the weakest and the chosen head with 30 L-BFGS pairs instead of 10;
- tol: the stacked grid, the warm refit and one cold fit at a looser tolerance (max |gradient| 1e-4).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fusion_cache.cache import open_cache
from fusion_cache.errors import FusionCacheError
from fusion_cache.grid import fit_l2_grid, grid_accuracy
from fusion_cache.heads import HEAD_SPECS
from fusion_cache.selection import JACOBI_REFRESH, ROTATED_TOL, ViewStore, validation_split

PARTS = ("stacked", "alone", "path", "quarter", "history", "tol")


def thread_count(text: str) -> int:
    n, cpus = int(text), os.cpu_count() or 1
    if not 1 <= n <= cpus:
        raise argparse.ArgumentTypeError(f"must be between 1 and this machine's {cpus} CPUs, got {text}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--view", default="all")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: every CPU)")
    a = ap.parse_args()
    parts = [p for p in a.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part {unknown[0]!r}; use some of {', '.join(PARTS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        probe(a.cache, a.view, parts)
    except FusionCacheError as e:
        ap.exit(1, f"Error: {e}\n")


def probe(path: str, view: str, parts: list[str]) -> None:
    store = ViewStore(open_cache(path))
    data = store.data(view)
    y = torch.from_numpy(data.y_train)
    Xr, basis = store.rotated(view)
    fit_rows, val_rows = (torch.from_numpy(r) for r in validation_split(data.y_train, 0.1, 0))
    X, yf, Xv, yv = Xr[fit_rows], y[fit_rows], Xr[val_rows], y[val_rows]
    k = int(data.y_train.max()) + 1
    grid = HEAD_SPECS["linear"].grid
    opts = dict(precondition=basis, rotated=True, tol=ROTATED_TOL, refresh=JACOBI_REFRESH, max_iter=1000)
    print(f"view {view}: {len(X)} fit rows x {X.shape[1]}, grid {grid}, {torch.get_num_threads()} threads")

    def timed(label, *args, **kw):
        t = time.perf_counter()
        fit = fit_l2_grid(*args, **{**opts, **kw})
        s = time.perf_counter() - t
        print(f"{label}: {s:.1f} s, iterations {fit.n_iter.tolist()}, evaluations {fit.n_evals.tolist()}", flush=True)
        return fit

    if "stacked" in parts:
        fit = timed("stacked grid", X, yf, k, grid)
        print("  validation accuracy", [round(float(v), 4) for v in grid_accuracy(fit, Xv, yv)])
    if "alone" in parts:
        for wd in grid:
            timed(f"alone {wd:g}", X, yf, k, [wd])
    if "path" in parts:
        prev = None
        for wd in grid:
            one = timed(f"path {wd:g} (from the stronger one's optimum)", X, yf, k, [wd], init=prev)
            prev = (one.coef[0], one.intercept[0])
    if "quarter" in parts:
        sub = torch.arange(0, len(X), 4)
        first = timed("quarter: every fourth row", X[sub], yf[sub], k, grid)
        timed("quarter: then all fit rows", X, yf, k, grid, init=(first.coef, first.intercept))
    if "history" in parts:
        for wd in (grid[-1], 0.01):
            timed(f"history 30, {wd:g}", X, yf, k, [wd], history=30)
    if "tol" in parts:
        loose = timed("stacked grid at tol 1e-4", X, yf, k, grid, tol=1e-4)
        print("  validation accuracy", [round(float(v), 4) for v in grid_accuracy(loose, Xv, yv)])
        best = grid.index(0.01)
        timed("warm refit of 0.01 at tol 1e-4", Xr, y, k, [0.01], tol=1e-4,
              init=(loose.coef[best : best + 1], loose.intercept[best : best + 1]))
        timed("cold fit of 0.01 at tol 1e-4", Xr, y, k, [0.01], tol=1e-4)


if __name__ == "__main__":
    main()
