"""Intervals and paired comparisons: what `fit`, `ablate` and `report` write agrees with stats.py recomputed from
the saved predictions.npz; the --baseline forms and their errors; the report's first sentence; few-shot rows
pair (seed, draw) runs. Tiny synthetic caches only (no images: `report` runs through the library)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from fusion_cache import stats
from fusion_cache.cache import open_cache
from fusion_cache.compare import layer_curve
from fusion_cache.fit import HeadParams, ablate, fit_head, summarize_table
from fusion_cache.predictions import (PREDICTIONS_FILE, Baseline, load_predictions, prediction_arrays,
                                      save_predictions)
from fusion_cache.report import REPORT_FILES, ReportConfig, answer_question, markdown, run_report, write_report

from .conftest import write_synthetic_cache
from .hostile import run

N_TEST = 60


def _cache(path, seed=0):
    """3 classes; features.13 (the early view) encodes the label, features.3 weakly, features.18 (late) is noise
    in 8 of its columns (the others constant): fused beats late by far, on 60 test images."""
    rng = np.random.default_rng(seed)
    feats, labels = {}, {}
    for split, n in (("train", 90), ("test", N_TEST)):
        y = np.arange(n) % 3
        code = np.zeros((n, 96), np.float32)
        code[np.arange(n), y] = 3.0
        feats[split] = {"features.3": (rng.normal(size=(n, 24)) + 0.3 * code[:, :24]).astype(np.float32),
                        "features.13": (code + rng.normal(size=(n, 96))).astype(np.float32),
                        "features.18": np.pad(rng.normal(size=(n, 8)), ((0, 0), (0, 1272))).astype(np.float32)}
        labels[split] = y.astype(np.int64)
    return write_synthetic_cache(path, feats, labels, ["a", "b", "c"])


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return _cache(tmp_path_factory.mktemp("iv") / "c.h5")


@pytest.fixture(scope="module")
def ablation(cache_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("abl") / "a"
    r = run("ablate", cache_path, "--views", "early,late,fused", "--heads", "linear,logreg", "--seeds", "0,1",
            "--out", out)
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="module")
def report(cache_path, tmp_path_factory):
    # knn only: its tuned protocol is one top-k search (the L2 heads' tuned runs: test_tuned_l2_runs_...)
    cfg = ReportConfig(views=["early", "late", "fused"], heads=["knn"], seeds=[0, 1], val_fraction=0.2,
                       pair_search=False)
    result = run_report(open_cache(cache_path), cfg)
    out = tmp_path_factory.mktemp("rep")
    write_report(result, out, "fusion-cache report c.h5", "test machine")
    return result, out


def _pairs(runs_a, runs_b):
    """Row indices of B in the order of A's runs: the pairing by (seed, draw)."""
    where = {(r["seed"], r.get("draw", 0)): i for i, r in enumerate(runs_b)}
    return [where[r["seed"], r.get("draw", 0)] for r in runs_a]


def _recompute(y, arrays, runs, keys, baseline_of):
    """{key: Interval}, {key: Comparison (Holm over the table)} from predictions.npz alone."""
    intervals = {k: stats.accuracy_interval(arrays[k] == y) for k in keys}
    raw = {}
    for k in keys:
        b = baseline_of(k)
        if b != k:
            raw[k] = stats.compare(arrays[k] == y, arrays[b][_pairs(runs[k], runs[b])] == y)
    holm = stats.holm([c.p for c in raw.values()])
    return intervals, {k: dataclasses.replace(c, p_holm=float(p)) for (k, c), p in zip(raw.items(), holm)}


# ---------------------------------------------------------------------------------------------- ablate


def test_ablate_json_csv_markdown_agree_with_the_saved_predictions(ablation):
    out, printed = ablation
    res = json.loads((out / "results.json").read_text())
    y, arrays, runs = load_predictions(out / PREDICTIONS_FILE)
    assert len(y) == N_TEST and y.dtype == np.int16 and "test_pred" not in json.dumps(res)
    assert res["bootstrap"] == {"resamples": stats.RESAMPLES, "seed": stats.BOOTSTRAP_SEED, "level": stats.LEVEL}
    assert res["baseline"] == {"view": "late", "head": None, "given": False, "compared": True, "note": None}
    keys = [f"{s['view']}/{s['head']}" for s in res["summary"]]
    assert sorted(arrays) == sorted(keys) and all(arrays[k].shape == (2, N_TEST) for k in keys)
    assert all(runs[k] == [{"seed": 0}, {"seed": 1}] for k in keys)
    intervals, comparisons = _recompute(y, arrays, runs, keys, lambda k: "late/" + k.split("/")[1])
    md = (out / "results.md").read_text()
    assert "| vs late (points) | p (Holm) |" in md and "Holm-corrected over the 4 comparisons" in md
    for s, k in zip(res["summary"], keys):
        iv = intervals[k]
        assert (s["test_acc_lo"], s["test_acc_hi"], s["n_test"]) == (iv.lo, iv.hi, N_TEST)
        assert s["test_acc_mean"] == pytest.approx(iv.value, abs=1 / N_TEST)  # the predictions give test_acc
        assert s["baseline"] == {"view": "late", "head": s["head"]}
        shown = stats.percent(stats.Interval(s["test_acc_mean"], iv.lo, iv.hi))
        if s["view"] == "late":
            assert s["is_baseline"] and s["vs_baseline"] is None
            assert f"| {shown} | " in md and "| baseline | — |" in md
            continue
        assert s["vs_baseline"] == comparisons[k].record() and not s["is_baseline"]
        c = comparisons[k]
        cell = f"| {stats.points(c)} | {stats.p_text(c.p_holm)}{' *' if c.significant else ''} |"
        assert f"| {s['view']} | {s['head']} |" in md and cell in md and cell in printed
    # the early (and fused) rows beat late (noise) on every run: significant, and said so
    early = res["summary"][1]["vs_baseline"]  # early logreg
    assert early["significant"] and early["diff"] > 0.3
    with open(out / "results.csv") as f:
        got = list(csv.DictReader(f))
    for row, json_row in zip(got, res["rows"]):
        k = f"{row['view']}/{row['head']}"
        one = stats.accuracy_interval(arrays[k][[0, 1].index(int(row["seed"]))] == y)
        assert (float(row["test_acc_lo"]), float(row["test_acc_hi"])) == (one.lo, one.hi)
        assert (json_row["test_acc_lo"], json_row["test_acc_hi"]) == (one.lo, one.hi)


def test_force_replaces_the_predictions(ablation, cache_path, tmp_path):
    import shutil

    out = tmp_path / "a"
    shutil.copytree(ablation[0], out)
    r = run("ablate", cache_path, "--views", "early,late", "--heads", "logreg", "--seeds", "0", "--out", out)
    assert r.exit_code != 0 and "already holds results" in r.output
    r = run("ablate", cache_path, "--views", "early,late", "--heads", "logreg", "--seeds", "0", "--out", out,
            "--force")
    assert r.exit_code == 0, r.output
    assert sorted(load_predictions(out / PREDICTIONS_FILE)[1]) == ["early/logreg", "late/logreg"]
    assert PREDICTIONS_FILE in REPORT_FILES


@pytest.fixture(scope="module")
def rows(cache_path):
    c = open_cache(cache_path)
    return ablate(c, ["early", "late", "fused"], ["logreg", "knn"], [0, 1], HeadParams(k=5)), c.labels("test")


@pytest.mark.parametrize("text,expected", [
    ("fused", lambda view, head: ("fused", head)),
    ("late:logreg", lambda view, head: ("late", "logreg")),
    ("early+features.18:knn", None),  # a view not in the table: an error (below)
])
def test_the_baseline_forms(rows, text, expected):
    table, y = rows
    base = Baseline.parse(text)
    if expected is None:
        assert base.view == "early,features.18" and base.head == "knn"
        with pytest.raises(Exception, match="which is not among --views"):
            summarize_table(table, y, base)
        return
    summary, record = summarize_table(table, y, base)
    assert record["compared"] and record["given"] and (record["view"], record["head"]) == (base.view, base.head)
    for s in summary:
        want = expected(s["view"], s["head"])
        assert (s["baseline"]["view"], s["baseline"]["head"]) == want
        assert s["is_baseline"] == ((s["view"], s["head"]) == want) == (s["vs_baseline"] is None)
    made = sum(s["vs_baseline"] is not None for s in summary)
    assert made == len(summary) - (2 if text == "fused" else 1)
    assert all(s["vs_baseline"]["p_holm"] >= s["vs_baseline"]["p_mcnemar"] for s in summary if s["vs_baseline"])


def test_the_default_baseline_without_a_late_row_leaves_the_comparisons_out(rows, cache_path):
    table, y = rows
    summary, record = summarize_table([r for r in table if r["view"] != "late"], y, Baseline())
    assert not record["compared"] and "not among the views" in record["note"]
    assert all("vs_baseline" not in s and s["test_acc_lo"] is not None for s in summary)
    r = run("ablate", cache_path, "--views", "early,fused", "--heads", "logreg", "--seeds", "0")
    assert r.exit_code == 0, r.output
    assert "vs late" not in r.output
    assert "No comparisons: the default baseline, late, is not among the views" in r.output
    r = run("ablate", cache_path, "--views", "early,late", "--heads", "logreg", "--seeds", "0", "--json",
            "--baseline", "early")
    d = json.loads(r.output)
    assert d["baseline"]["view"] == "early" and d["baseline"]["given"]
    assert d["bootstrap"]["resamples"] == stats.RESAMPLES
    late = next(s for s in d["summary"] if s["view"] == "late")
    assert late["baseline"] == {"view": "early", "head": "logreg"} and late["vs_baseline"]["diff"] < 0


@pytest.mark.parametrize("command", ["ablate", "report"])
@pytest.mark.parametrize("value,message", [
    ("fused", "--baseline 'fused' names the view 'fused', which is not among --views (early, late); add it to --views"),
    ("late:svm", "--baseline 'late:svm' names an unknown head 'svm'"),
    ("late:knn", "names the knn head, which is not among --heads (logreg); add it to --heads"),
    ("late:", "is not VIEW or VIEW:HEAD; pass e.g. late or late:logreg"),
])
def test_a_bad_baseline_is_one_line_before_anything_runs(command, value, message, tmp_path):
    args = ["--out", tmp_path / "r"] if command == "report" else []
    # the cache does not exist: the baseline is refused first, before any cache is read or head fitted
    r = run(command, tmp_path / "missing.h5", *args, "--views", "early,late", "--heads", "logreg",
            "--baseline", value)
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output
    assert not (tmp_path / "r").exists()


def test_fewshot_rows_pair_seed_and_draw(cache_path, tmp_path):
    out = tmp_path / "a"
    r = run("ablate", cache_path, "--views", "late,fused", "--heads", "logreg", "--seeds", "0,1",
            "--train-per-class", 4, "--draws", 2, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    y, arrays, runs = load_predictions(out / PREDICTIONS_FILE)
    want = [{"seed": s, "draw": d} for s in (0, 1) for d in (0, 1)]
    assert runs == {"late/logreg": want, "fused/logreg": want} and arrays["fused/logreg"].shape == (4, N_TEST)
    # each run's predictions are those of its (seed, draw): the rows of results.json in the same order
    accs = [row["test_acc"] for row in res["rows"] if row["view"] == "fused"]
    assert np.allclose((arrays["fused/logreg"] == y).mean(1), accs)
    intervals, comparisons = _recompute(y, arrays, runs, ["late/logreg", "fused/logreg"], lambda k: "late/logreg")
    fused = next(s for s in res["summary"] if s["view"] == "fused")
    assert fused["vs_baseline"] == comparisons["fused/logreg"].record()
    assert (fused["test_acc_lo"], fused["test_acc_hi"]) == (intervals["fused/logreg"].lo, intervals["fused/logreg"].hi)
    assert fused["mcnemar_run"] == {"seed": 0, "draw": 0}
    md = (out / "results.md").read_text()
    assert "images and (seed, draw) runs resampled together" in md and "(seed 0, draw 0)" in md
    # the pairing is by (seed, draw), not by position: reversing the baseline's runs changes nothing
    rev = stats.compare(arrays["fused/logreg"] == y, arrays["late/logreg"][::-1][_pairs(want, want[::-1])] == y)
    assert dataclasses.replace(rev, p_holm=rev.p).record() == comparisons["fused/logreg"].record()


# ---------------------------------------------------------------------------------------------- report


def test_report_files_agree_with_the_saved_predictions(report):
    result, out = report
    rep = json.loads((out / "report.json").read_text())
    y, arrays, runs = load_predictions(out / PREDICTIONS_FILE)
    assert np.array_equal(y, result.y_test) and "test_pred" not in json.dumps(rep)
    assert rep["bootstrap"]["seed"] == stats.BOOTSTRAP_SEED
    md = (out / "report.md").read_text()
    for table in ("paper", "tuned"):
        keys = [f"{table}/{s['view']}/{s['head']}" for s in rep[table]["summary"]]
        assert all(k in arrays for k in keys) and rep[table]["baseline"]["compared"]
        intervals, comparisons = _recompute(y, arrays, runs, keys,
                                            lambda k: "/".join([k.split("/")[0], "late", k.split("/")[2]]))
        for s, k in zip(rep[table]["summary"], keys):
            assert (s["test_acc_lo"], s["test_acc_hi"]) == (intervals[k].lo, intervals[k].hi)
            assert s["vs_baseline"] == (None if s["view"] == "late" else comparisons[k].record())
            assert stats.percent(stats.Interval(s["test_acc_mean"], s["test_acc_lo"], s["test_acc_hi"])) in md
    for run_ in result.tuned_runs:  # the tuned runs' test_acc comes from their predictions
        assert run_.test_acc == float(np.mean(run_.test_pred == y))
    assert md.count("Holm-corrected over the 2 comparisons of this table") == 2


def test_the_report_answers_the_question_first(report):
    result, out = report
    rep = json.loads((out / "report.json").read_text())
    text = rep["answer"]
    assert text.startswith("Fusing early and late layers changes test accuracy by +") and "not significant" not in text
    assert "McNemar, Holm-corrected over 2 comparisons" in text
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == text and md[4].startswith("Command:")  # the first paragraph, before the command and provenance
    a = rep["answer_comparison"]
    fused = next(s for s in rep["tuned"]["summary"] if (s["view"], s["head"]) == ("fused", a["head"]))
    assert {k: a[k] for k in fused["vs_baseline"]} == fused["vs_baseline"] and a["significant"]
    value, interval = stats.points(stats.Comparison(a["diff"], a["diff_lo"], a["diff_hi"], 0, 0, 0)).split(" ", 1)
    assert f"by {value} points {interval} against the last layer alone (tuned {a['head']}, p" in text


def test_identical_predictions_are_not_significant(report):
    result, _ = report
    fused = {(r.head, r.seed): r.test_pred for r in result.tuned_runs if r.view == "fused"}
    runs = [dataclasses.replace(r, test_pred=fused[r.head, r.seed]) if r.view == "late" else r
            for r in result.tuned_runs]
    same = dataclasses.replace(result, tuned_runs=runs)
    found = same.answer
    assert found["diff"] == found["diff_lo"] == found["diff_hi"] == 0 and found["p_mcnemar"] == 1.0
    assert found["text"].endswith(f"against the last layer alone (tuned {found['head']}): not significant at this "
                                  f"test size ({N_TEST} images; p = 1, McNemar, Holm-corrected over 2 comparisons).")
    assert "by +0.0 points [+0.0, +0.0]" in found["text"]
    md = markdown(same.to_json(), "cmd", "m")
    assert found["text"] in md.splitlines()[2]


def test_no_fused_or_no_late_row_no_answer(report):
    result, _ = report
    for view in ("late", "fused"):
        less = dataclasses.replace(result, tuned_runs=[r for r in result.tuned_runs if r.view != view],
                                   paper_rows=[r for r in result.paper_rows if r["view"] != view])
        d = less.to_json()
        assert d["answer"] is None and d["answer_comparison"] is None
        assert "Fusing early and late" not in markdown(d, "cmd", "m")
    assert answer_question([], [], result.y_test, ["logreg"]) is None


def test_another_baseline_answers_with_a_lone_comparison(report):
    result, _ = report
    other = dataclasses.replace(result, cfg=dataclasses.replace(result.cfg, baseline=Baseline("early", None, True)))
    d = other.to_json()
    assert d["tuned"]["baseline"]["view"] == "early"
    assert d["answer_comparison"]["comparisons"] == 1 and "Holm" not in d["answer"]
    assert d["answer_comparison"]["diff"] == result.answer["diff"]  # the same fused-late difference


def test_tuned_l2_runs_predict_once_and_score_from_their_predictions(cache_path):
    from fusion_cache.selection import ViewStore, tune_heads

    cache = open_cache(cache_path)
    y = cache.labels("test")
    grids = {"linear": (1e-1,), "logreg": (0.1,)}  # one grid point each: the refit's predictions are the point
    for run_ in tune_heads(ViewStore(cache), "early", ["linear", "logreg"], [0], 0.2, max_iter=20, grids=grids):
        assert run_.test_pred.dtype == np.int64 and run_.test_pred.shape == y.shape
        assert run_.test_acc == float(np.mean(run_.test_pred == y))
        assert np.array_equal(run_.test_pred, run_.estimator.predict(cache.view("early", "test")[0]))
        assert "test_pred" not in run_.row()


# ---------------------------------------------------------------------------------------------- fit, curve, npz


def test_fit_prints_and_saves_its_interval(cache_path, tmp_path):
    r = run("fit", cache_path, "--head", "logreg", "--features", "fused", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    got = fit_head(open_cache(cache_path), "fused", "logreg")
    iv = stats.accuracy_interval(got.test_pred == open_cache(cache_path).labels("test"))
    assert (d["test_acc_lo"], d["test_acc_hi"], d["test_acc"]) == (iv.lo, iv.hi, iv.value)
    assert d["bootstrap"]["resamples"] == stats.RESAMPLES and "test_pred" not in d
    r = run("fit", cache_path, "--head", "linear", "--features", "fused", "--out", tmp_path / "h")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert m["test_acc_lo"] <= m["test_acc"] <= m["test_acc_hi"] and "test_pred" not in m
    assert f"[{100 * m['test_acc_lo']:.2f}, {100 * m['test_acc_hi']:.2f}] (95 % interval over the {N_TEST} test " \
           "images)" in r.output.splitlines()[-1]


def test_knn_predictions_cost_no_extra_search(cache_path, monkeypatch):
    from fusion_cache.heads import KNNHead

    calls = []
    real = KNNHead._votes
    monkeypatch.setattr(KNNHead, "_votes", lambda self, X, ks: calls.append(len(X)) or real(self, X, ks))
    r = fit_head(open_cache(cache_path), "early", "knn", HeadParams(k=5))
    assert calls == [N_TEST, N_TEST]  # predict_proba (the loss) and predict (accuracy and test_pred)
    assert r.test_acc == float(np.mean(r.test_pred == open_cache(cache_path).labels("test")))


def test_the_layer_curve_carries_intervals(cache_path):
    rows = layer_curve(open_cache(cache_path), [0], HeadParams(epochs=1))
    assert [r["tap"] for r in rows] == ["features.3", "features.13", "features.18"]
    assert all(r["test_acc_lo"] <= r["test_acc_mean"] <= r["test_acc_hi"] for r in rows)


def test_predictions_npz_round_trip(tmp_path):
    y = np.array([0, 1, 2, 40000])
    arrays = {"a/v/h": np.array([[0, 1, 2, 40000], [0, 0, 2, 1]])}
    runs = {"a/v/h": [{"seed": 0}, {"seed": 3, "draw": 1}]}
    save_predictions(tmp_path / "p.npz", y, arrays, runs)
    y2, a2, r2 = load_predictions(tmp_path / "p.npz")
    assert y2.dtype == a2["a/v/h"].dtype == np.int32 and np.array_equal(a2["a/v/h"], arrays["a/v/h"])
    assert r2 == runs and np.array_equal(y2, y)
    save_predictions(tmp_path / "q.npz", y[:3], {"v/h": arrays["a/v/h"][:, :3]}, {"v/h": runs["a/v/h"]})
    assert load_predictions(tmp_path / "q.npz")[1]["v/h"].dtype == np.int16
    with pytest.raises(ValueError, match="reserved"):
        save_predictions(tmp_path / "r.npz", y, {"y_test": y[None]}, {})
    # several caches: the label of the cache leads the key
    rows = [{"cache": "x.h5", "label": "resnet18", "view": "late", "head": "knn", "seed": 0, "test_pred": y}]
    assert list(prediction_arrays(rows, "paper")[0]) == ["paper/resnet18/late/knn"]
