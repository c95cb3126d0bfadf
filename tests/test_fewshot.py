"""The few-shot protocol (`--train-per-class K`, `--draws N` on fit, ablate and report): each draw is exactly K
train rows of every class (never test, never the dataset's own validation rows), seeded; heads, their
standardization and the tuned protocol's choices see only the drawn rows; the CLI reports N draws as mean ± std
and refuses impossible settings in one line."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fusion_cache.cache import CacheMeta, CacheWriter, open_cache
from fusion_cache.errors import FusionCacheError
from fusion_cache.fewshot import FewShot, draw, train_pool, tuning_draw
from fusion_cache.fit import HeadParams, fit_draws, fit_head, load_view
from fusion_cache.report import ReportConfig, _tune_draws, run_report
from fusion_cache.selection import ViewStore, best_pair, tune_heads

from .features import train_stats
from .hostile import clean_failure, run

CLASSES = ["ant", "bee", "cow"]
TRAIN = [8, 10, 12]  # uneven on purpose: the smallest class (ant) bounds K
VAL = 3  # rows a class of the dataset's own validation split, where a cache has one
TAPS = {"features.3": 24, "features.13": 96, "features.18": 1280}  # the real widths (the schema checks them)


def _cache(path: Path, given_val: bool = False, scramble_seed: int | None = None,
           keep: np.ndarray | None = None) -> Path:
    """3 classes, linearly separable (class means apart in every tap) under columns of very different offsets and
    scales, so that standardization statistics depend on which rows they come from. With `given_val`, VAL rows
    a class after the train rows are the dataset's own validation split. With `scramble_seed`, every train row
    outside `keep`, and the whole test split, is replaced by noise (labels unchanged)."""
    rng = np.random.default_rng(0)
    y_train = np.repeat(np.arange(3), TRAIN)
    if given_val:
        y_train = np.concatenate([y_train, np.repeat(np.arange(3), VAL)])
    y_test = np.repeat(np.arange(3), 5)
    feats = {"train": {}, "test": {}}
    for tap, width in TAPS.items():
        means = rng.normal(scale=3.0, size=(3, width))
        offset, scale = rng.normal(scale=2, size=width), 10.0 ** rng.uniform(-1, 0.5, size=width)
        for split, y in (("train", y_train), ("test", y_test)):
            X = means[y] + rng.normal(size=(len(y), width)) * (1 + np.arange(len(y))[:, None] % 3)  # unequal spread
            feats[split][tap] = (X * scale + offset).astype(np.float32)
    if scramble_seed is not None:
        noise = np.random.default_rng(scramble_seed)
        outside = np.setdiff1d(np.arange(len(y_train)), keep)
        for tap in TAPS:
            feats["train"][tap][outside] = noise.normal(scale=100, size=(len(outside), TAPS[tap]))
            feats["test"][tap][:] = noise.normal(scale=100, size=feats["test"][tap].shape)
    split = {"method": "given", "train": "train/", "test": "test/"}
    if given_val:
        split |= {"validation": "val/", "validation_from": sum(TRAIN)}
    labels = {"train": y_train.astype(np.int64), "test": y_test.astype(np.int64)}
    sizes = {s: len(labels[s]) for s in labels}
    meta = CacheMeta.create(
        backbone="mobilenet_v2", weights_sha256="0" * 64, image_size=32, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), resize="none", pool="avg", taps=tuple(TAPS), dataset="synthetic",
        data_identity={"synthetic": "fewshot"}, subset={}, dtype="float32", precision="fp32", weights="synthetic",
        data_root="", classes=tuple(CLASSES), train_size=sizes["train"], test_size=sizes["test"],
        train_source_size=sizes["train"], test_source_size=sizes["test"], seed=0, integrity_checked=True,
        versions={}, split=split,
    )
    with CacheWriter(path, meta) as w:
        for s in ("train", "test"):
            w.append(s, sizes[s], labels[s], np.arange(sizes[s]), {t: feats[s][t] for t in TAPS})
        w.finish(skipped={})
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("fs") / "plain.h5")


@pytest.fixture(scope="module")
def with_val(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("fs") / "val.h5", given_val=True)


# ---------------------------------------------------------------------------------------------- the draw


@pytest.mark.parametrize("which", ["plain", "with_val"])
def test_a_draw_is_k_train_rows_of_every_class_never_test_nor_the_given_validation(request, which):
    cache = open_cache(request.getfixturevalue(which))
    y = cache.labels("train")
    given = cache.validation_rows()
    assert (given is None) == (which == "plain")
    if given is not None:
        assert len(given) == 3 * VAL and (y[given] == np.repeat(np.arange(3), VAL)).all()
    full = load_view(cache, "fused")
    draws = FewShot(4, 3).draws_of(cache, [0, 5])
    assert sorted(draws) == [(s, d) for s in (0, 5) for d in range(3)]
    for (seed, i), d in draws.items():
        assert (d.seed, d.index, d.train_per_class) == (seed, i, 4)
        assert len(d.rows) == 12 and len(np.unique(d.rows)) == 12 and np.array_equal(d.rows, np.sort(d.rows))
        assert list(np.bincount(y[d.rows], minlength=3)) == [4, 4, 4]  # exactly K of every class
        assert d.rows.min() >= 0 and d.rows.max() < len(y)  # positions in the train split
        if given is not None:
            assert not set(d.rows) & set(given), "a draw took the dataset's own validation rows"
        data = d.data(full)  # the head's training rows are the drawn train rows; test is all of test, untouched
        assert np.array_equal(data.X_train, full.X_train[d.rows]) and np.array_equal(data.y_train, y[d.rows])
        assert data.X_test is full.X_test and data.val_rows is None
    # the largest K every class allows: the smallest class's pool, all of it
    whole = FewShot(8, 1).draws_of(cache, [0])[0, 0]
    assert np.array_equal(whole.rows[y[whole.rows] == 0], np.flatnonzero(y[:sum(TRAIN)] == 0))


def test_the_same_seed_and_draw_give_the_same_rows_and_others_differ(plain):
    cache = open_cache(plain)
    y, pool = cache.labels("train"), train_pool(cache)
    a = draw(y, 4, seed=0, index=0, pool=pool)
    assert np.array_equal(a.rows, draw(y, 4, seed=0, index=0, pool=pool).rows)
    assert a.digest == draw(y, 4, seed=0, index=0, pool=pool).digest
    others = [draw(y, 4, seed=0, index=i, pool=pool) for i in (1, 2, 3)] + [draw(y, 4, seed=1, index=0, pool=pool)]
    assert all(not np.array_equal(a.rows, o.rows) for o in others)
    assert len({a.digest, *(o.digest for o in others)}) == 5
    # K-independent permutations: draw d of seed s at K=2 is inside the same draw at K=4 (nested draws)
    assert set(draw(y, 2, seed=0, index=0, pool=pool).rows) <= set(a.rows)
    rec = a.record()
    assert rec == {"draw": 0, "train_per_class": 4, "draw_seed": 0, "draw_rows_sha256": a.digest}
    assert len(json.dumps(rec)) < 200  # a hash, not the rows


# ---------------------------------------------------------------------------------------------- only the draw


def test_fit_and_its_standardization_use_only_the_drawn_rows(plain):
    cache = open_cache(plain)
    full = load_view(cache, "fused")
    params = HeadParams(standardize=True, solver="lbfgs", max_iter=50)
    results = fit_draws(cache, "fused", "linear", params, 3, FewShot(3, 2))
    draws = FewShot(3, 2).draws_of(cache, [3])
    assert [r.fewshot for r in results] == [draws[3, i].record() for i in range(2)]
    for i, r in enumerate(results):
        rows = draws[3, i].rows
        mean, scale = train_stats(full.X_train[rows])  # the tests' own statistics of the drawn rows
        assert np.allclose(r.estimator.mean_, mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max())
        assert np.allclose(r.estimator.scale_, scale, rtol=1e-4)
        all_mean, _ = train_stats(full.X_train)
        assert not np.allclose(r.estimator.mean_, all_mean, rtol=1e-3, atol=1e-3)  # all of train would differ
        # the same fit on a ViewData the test cuts itself: the same numbers
        own = fit_head(cache, "fused", "linear", params, 3,
                       data=dataclasses.replace(full, X_train=full.X_train[rows], y_train=full.y_train[rows]))
        assert own.test_acc == r.test_acc and np.array_equal(own.estimator.coef_, r.estimator.coef_)
    whole = fit_head(cache, "fused", "linear", params, 3)
    assert not np.array_equal(whole.estimator.coef_, results[0].estimator.coef_)


@pytest.mark.parametrize("which", ["plain", "with_val"])
def test_the_tuned_protocol_chooses_on_the_draw_and_refits_on_the_draw_alone(request, which):
    cache = open_cache(request.getfixturevalue(which))
    given = cache.validation_rows()
    y = cache.labels("train")
    d = FewShot(5, 1).draws_of(cache, [2])[2, 0]
    t = tuning_draw(d, y, 0.2, given)
    full = load_view(cache, "early")
    store = ViewStore(cache)
    store.put("early", t.data(full))
    runs = {r.head: r for r in tune_heads(store, "early", ["linear", "knn"], [2], 0.2, max_iter=200)}
    if given is None:  # carved from the draw: round(0.2 x 5) = 1 image a class validates, 4 fit
        assert np.array_equal(t.keep, d.rows) and t.refit is None
        assert list(np.bincount(y[t.keep][t.val], minlength=3)) == [1, 1, 1]
        assert (runs["linear"].val_rows, runs["linear"].fit_rows) == (3, 12)
    else:  # the dataset's own validation rows choose; the draw is what the grid fits
        assert np.array_equal(t.keep[t.val], given) and np.array_equal(t.keep[t.refit], d.rows)
        assert (runs["linear"].val_rows, runs["linear"].fit_rows) == (3 * VAL, 15)
    mean, scale = train_stats(full.X_train[d.rows])  # the draw's statistics, not those of draw + validation
    est = runs["linear"].estimator
    assert np.allclose(est.mean_, mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max())
    assert np.allclose(est.scale_, scale, rtol=1e-4)
    assert runs["knn"].estimator.features_.shape[0] == 15, "the kNN refit holds rows outside the draw"
    # the refit is the optimum of the draw's problem (its gradient there vanishes), not of draw + validation's
    def gradient(rows):
        Xs = (full.X_train[rows].astype(np.float64) - est.mean_) / est.scale_
        Z = Xs @ est.coef_.T.astype(np.float64) + est.intercept_
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        P[np.arange(len(rows)), y[rows]] -= 1
        return np.abs(np.concatenate([(P.T @ Xs / len(rows) + est.weight_decay * est.coef_).ravel(),
                                      P.mean(0)])).max()

    assert gradient(d.rows) < 1e-3
    if given is not None:
        assert gradient(t.keep) > 10 * gradient(d.rows), "the refit trained on rows outside the draw"


def test_the_test_split_and_train_rows_outside_the_draw_never_change_a_choice(tmp_path):
    """Two caches that agree on the drawn rows only: the tuned protocol's choices (the pair search included),
    validation scores and training scores are identical; the test numbers are not (test is read, once)."""
    a_path = _cache(tmp_path / "a.h5")
    cfg = ReportConfig(views=["early"], heads=["linear", "logreg"], seeds=[3], val_fraction=0.2,
                       max_iter=10, fewshot=FewShot(5, 2))
    tunings = cfg.check_fewshot(open_cache(a_path))
    keep = np.unique(np.concatenate([t.keep for t in tunings.values()]))
    assert len(keep) < sum(TRAIN)  # something outside the draws to scramble
    b_path = _cache(tmp_path / "b.h5", scramble_seed=1, keep=keep)
    a, b = run_report(open_cache(a_path), cfg), run_report(open_cache(b_path), cfg)
    assert a.pair_scores == b.pair_scores
    assert len(a.tuned_runs) == len(b.tuned_runs) == 2 * 2 * 1 * 2  # views (with the pair) x heads x seeds x draws
    for ra, rb in zip(a.tuned_rows, b.tuned_rows):
        same = {k: v for k, v in ra.items() if k not in ("test_acc", "fit_seconds")}
        assert same == {k: v for k, v in rb.items() if k not in ("test_acc", "fit_seconds")}
        assert ra["fit_rows"] + ra["val_rows"] == 5 * 3  # the validation is carved from the draw
    assert [r["test_acc"] for r in a.tuned_rows] != [r["test_acc"] for r in b.tuned_rows]
    for ra, rb in zip(a.paper_rows, b.paper_rows):
        assert (ra["train_acc"], ra["train_loss"], ra["draw_rows_sha256"]) == \
               (rb["train_acc"], rb["train_loss"], rb["draw_rows_sha256"])
    # and _tune_draws, the report's tuned step, on a store whose test split is noise: the same choices
    cache = open_cache(a_path)
    store = ViewStore(cache)
    full = store.data("early")
    rng = np.random.default_rng(5)
    store.put("early", dataclasses.replace(full, X_test=rng.normal(size=full.X_test.shape).astype(np.float32)))
    scrambled = _tune_draws(store, "early", cfg, tunings)
    ours = [r for r in a.tuned_runs if r.view == "early"]
    assert [(r.head, r.seed, r.fewshot["draw"], r.value, r.grid) for r in scrambled] == \
           [(r.head, r.seed, r.fewshot["draw"], r.value, r.grid) for r in ours]


def test_the_pair_search_reads_only_the_draw(with_val, tmp_path):
    cache = open_cache(with_val)
    t = tuning_draw(FewShot(4, 1).draws_of(cache, [0])[0, 0], cache.labels("train"), 0.1, cache.validation_rows())
    pair, scores = best_pair(cache, 0, 0.1, max_iter=20, tuning=t)
    other = _cache(tmp_path / "b.h5", given_val=True, scramble_seed=3, keep=t.keep)
    assert best_pair(open_cache(other), 0, 0.1, max_iter=20, tuning=t) == (pair, scores)


# ---------------------------------------------------------------------------------------------- the CLI


def test_fit_through_the_cli_reports_each_draw_and_their_mean(plain, tmp_path):
    r = run("fit", plain, "--features", "fused", "--head", "logreg", "--train-per-class", 3, "--draws", 3, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert (d["train_per_class"], d["draws"], len(d["runs"])) == (3, 3, 3)
    assert [x["draw"] for x in d["runs"]] == [0, 1, 2] and len({x["draw_rows_sha256"] for x in d["runs"]}) == 3
    accs = np.array([x["test_acc"] for x in d["runs"]])
    assert d["test_acc"] == pytest.approx(accs.mean()) and d["test_acc_std"] == pytest.approx(accs.std(ddof=1))
    table = run("fit", plain, "--features", "fused", "--head", "logreg", "--train-per-class", 3, "--draws", 3)
    assert table.exit_code == 0, table.output
    assert "K-shot: 3 images per class, 3 draws" in table.output
    assert f"{100 * accs.mean():.2f} ± {100 * accs.std(ddof=1):.2f} % over 3 draws" in table.output
    saved = run("fit", plain, "--head", "linear", "--train-per-class", 3, "--out", tmp_path / "h")
    assert saved.exit_code == 0, saved.output
    metrics = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert metrics["fewshot"]["train_per_class"] == 3 and metrics["fewshot"]["draw"] == 0
    plain_fit = json.loads(run("fit", plain, "--json").output)
    assert "fewshot" not in plain_fit and "train_per_class" not in plain_fit  # unchanged without the option


def test_ablate_through_the_cli_has_n_draws_per_seed_and_mean_std(plain, tmp_path):
    r = run("ablate", plain, "--views", "early,fused", "--heads", "linear,knn", "--seeds", "0,1", "--k", 5,
            "--train-per-class", 4, "--draws", 3, "--out", tmp_path / "abl")
    assert r.exit_code == 0, r.output
    assert "K-shot: 4 images per class, 3 draws" in r.output and "| 2 x 3 |" in r.output
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert res["fewshot"]["train_per_class"] == 4 and res["fewshot"]["draws"] == 3
    assert len(res["rows"]) == 2 * 2 * 2 * 3
    for row in res["rows"]:
        assert row["train_per_class"] == 4 and row["draw"] in (0, 1, 2) and row["draw_seed"] == row["seed"]
    for s in res["summary"]:
        rows = [x for x in res["rows"] if (x["view"], x["head"]) == (s["view"], s["head"])]
        assert (s["n_seeds"], s["n_draws"], s["n_runs"], s["train_per_class"]) == (2, 3, 6, 4)
        accs = np.array([x["test_acc"] for x in rows])
        assert s["test_acc_mean"] == pytest.approx(accs.mean()) and s["test_acc_std"] == pytest.approx(accs.std(ddof=1))
    # the same (seed, draw) is the same rows in every view and head, and fit's draw gives ablate's number
    by = {}
    for row in res["rows"]:
        by.setdefault((row["seed"], row["draw"]), set()).add(row["draw_rows_sha256"])
    assert all(len(v) == 1 for v in by.values()) and len({next(iter(v)) for v in by.values()}) == 6
    one = json.loads(run("fit", plain, "--features", "early", "--head", "linear", "--seed", 1,
                         "--train-per-class", 4, "--draws", 3, "--json").output)
    row = next(x for x in res["rows"] if (x["view"], x["head"], x["seed"], x["draw"]) == ("early", "linear", 1, 2))
    assert row["test_acc"] == one["runs"][2]["test_acc"]
    with open(tmp_path / "abl" / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 24 and {"draw", "train_per_class", "draw_seed", "draw_rows_sha256"} <= set(got[0])
    assert {(r["seed"], r["draw"]): r["draw_rows_sha256"] for r in got} == \
        {(str(r["seed"]), str(r["draw"])): r["draw_rows_sha256"] for r in res["rows"]}  # the CSV alone names a draw
    md = (tmp_path / "abl" / "results.md").read_text()
    assert "K-shot: 4 images per class, 3 draws" in md and "| early | linear |" in md and "±" in md
    assert "x draws 0..2)" in md and "mean ± std over seeds" not in md  # the spread is over (seed, draw) runs


def test_report_through_the_cli_with_draws(tiny_cache, tmp_path):
    """`report --train-per-class K --draws N` end to end on the tiny CIFAR-10 cache (6 train images a class)."""
    out = tmp_path / "r"
    r = run("report", tiny_cache, "--out", out, "--views", "early,late", "--heads", "linear,knn", "--seeds", "0",
            "--val-fraction", "0.2", "--max-iter", 10, "--train-per-class", 5, "--draws", 2)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["fewshot"]["train_per_class"] == 5 and rep["fewshot"]["draws"] == 2
    n_classes = len(open_cache(tiny_cache).classes)
    for part in ("paper", "tuned"):
        assert {row["draw"] for row in rep[part]["rows"]} == {0, 1}
        assert all(row["train_per_class"] == 5 for row in rep[part]["rows"])
        for s in rep[part]["summary"]:
            assert (s["n_draws"], s["n_runs"]) == (2, 2)
    for row in rep["tuned"]["rows"]:  # 1 of each class's 5 validates, 4 fit: all inside the draw
        assert (row["val_rows"], row["fit_rows"]) == (n_classes, 4 * n_classes)
    md = (out / "report.md").read_text()
    assert "K-shot: 5 images per class, 2 draws" in md and "round(0.2 x 5) = 1 of its 5 images a class" in md
    assert "K-shot: 5 images per class, 2 draws" in r.output


@pytest.mark.parametrize("args, fragment", [
    (["fit", "--train-per-class", 9], "--train-per-class 9 is more than the 8 train images of class 'ant'; "
                                      "pass --train-per-class 8 or less"),
    (["ablate", "--train-per-class", 9, "--draws", 2], "the 8 train images of class 'ant'"),
    (["report", "--train-per-class", 9, "--out", "OUT"], "the 8 train images of class 'ant'"),
    (["fit", "--train-per-class", 0], "--train-per-class"),
    (["ablate", "--train-per-class", -1], "--train-per-class"),
    (["fit", "--draws", 2], "--draws repeats a few-shot draw and needs --train-per-class K"),
    (["report", "--draws", 3, "--out", "OUT"], "needs --train-per-class K"),
    (["ablate", "--train-per-class", 2, "--draws", 0], "--draws"),
    (["fit", "--train-per-class", 2, "--draws", 2, "--out", "OUT"], "pass --draws 1 to save the head of draw 0"),
    (["report", "--train-per-class", 2, "--out", "OUT"], "pass --train-per-class 5 or more"),
    (["fit", "--head", "knn", "--k", 20, "--train-per-class", 3], "--k 20 is larger than the 9 training rows"),
    (["report", "--heads", "knn", "--train-per-class", 5, "--out", "OUT"],
     "the knn head's k = 20 is larger than the 15 training rows of a draw of 5 images a class; pass "
     "--train-per-class 7 or more, or leave knn out of --heads"),
    (["report", "--heads", "knn", "--train-per-class", 7, "--val-fraction", 0.5, "--out", "OUT"],
     "the smallest k of the knn grid (10) is larger than the 9 fit rows of a draw of 7 images a class; pass "
     "--train-per-class 8 or more"),
])
def test_impossible_settings_are_one_line_errors(plain, tmp_path, args, fragment):
    args = [tmp_path / "out" if a == "OUT" else a for a in args]
    r = run(args[0], plain, *args[1:])
    assert clean_failure(r, fragment) is None, r.output
    assert not (tmp_path / "out").exists()


def test_no_advice_names_a_k_that_no_class_can_give(plain):
    """knn's k = 30 needs 10 images a class, and ant has 8: the fix is a smaller --k, never --train-per-class 10."""
    r = run("fit", plain, "--head", "knn", "--k", 30, "--train-per-class", 3)
    assert clean_failure(r, "--k 30 is larger than the 9 training rows of a draw of 3 images a class; pass --k 9 "
                            "or less") is None, r.output
    assert "--train-per-class 10" not in r.output


def test_k_above_a_class_outside_the_given_validation_is_named(with_val):
    r = run("fit", with_val, "--train-per-class", 9)  # ant: 8 train images (+ 3 validation, never drawn)
    assert clean_failure(r, "more than the 8 train images outside the validation split of class 'ant'") is None, \
        r.output
    with pytest.raises(FusionCacheError, match="--train-per-class must be at least 1"):
        FewShot(0).check()
