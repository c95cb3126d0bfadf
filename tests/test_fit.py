"""fit and ablate: views select the right columns, seeds reproduce, JSON schema, estimator contract, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from fusion_cache.cache import open_cache
from fusion_cache.cli import main
from fusion_cache.fit import HeadParams, fit_head
from fusion_cache.heads import LinearHead, OneThreadLogisticRegression, make_logreg

from .conftest import write_synthetic_cache
from .features import train_stats


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_views_select_the_right_columns(encoded_cache, head):
    cache = open_cache(encoded_cache)
    params = HeadParams(epochs=20, lr=1e-2, standardize=True)
    acc = {v: fit_head(cache, v, head, params, seed=0).test_acc for v in ("early", "fused", "late")}
    assert acc["early"] > 0.9 and acc["fused"] > 0.9, acc
    assert acc["late"] < 0.45, acc  # chance is 0.25: the late tap carries no label information


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_cache):
    a = _run("fit", tiny_cache, "--features", "fused", "--seed", 3, "--json")
    b = _run("fit", tiny_cache, "--features", "fused", "--seed", 3, "--json")
    c = _run("fit", tiny_cache, "--features", "fused", "--seed", 4, "--json")
    ja, jb, jc = (json.loads(r.output) for r in (a, b, c))
    assert ja["epochs"] == jb["epochs"] and ja["test_acc"] == jb["test_acc"]
    assert ja["epochs"] != jc["epochs"]


def test_fit_json_schema(tiny_cache):
    r = _run("fit", tiny_cache, "--head", "linear", "--features", "late", "--epochs", 3, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"head", "features", "dim", "epochs", "test_acc", "fit_seconds", "fingerprint"} <= set(d)
    assert d["head"] == "linear" and d["features"] == ["features.18"] and d["dim"] == 1280
    assert [e["epoch"] for e in d["epochs"]] == [1, 2, 3]
    for e in d["epochs"]:
        assert set(e) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc"}
        assert 0.0 <= e["train_acc"] <= 1.0 and 0.0 <= e["test_acc"] <= 1.0
    assert d["test_acc"] == d["epochs"][-1]["test_acc"]
    assert d["fingerprint"] == open_cache(tiny_cache).fingerprint
    assert d["provenance"]["weights_sha256"] == open_cache(tiny_cache).meta.weights_sha256
    r = _run("fit", tiny_cache, "--head", "logreg", "--features", "all", "--json")
    d = json.loads(r.output)
    assert d["head"] == "logreg" and d["dim"] == 2816 and len(d["features"]) == 19


def test_fit_table_output_is_in_percent(tiny_cache):
    r = _run("fit", tiny_cache, "--features", "early")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[1].split() == ["epoch", "train", "loss", "train", "acc", "%", "test", "loss", "test", "acc", "%"]
    last = json.loads(_run("fit", tiny_cache, "--features", "early", "--json").output)["test_acc"]
    assert lines[-1].startswith(f"test accuracy {100 * last:.2f} %")


def test_saved_head_reproduces_predictions(tiny_cache, tmp_path):
    r = _run("fit", tiny_cache, "--features", "fused", "--standardize", "--out", tmp_path / "head")
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "head" / "head.pt", weights_only=True)
    metrics = json.loads((tmp_path / "head" / "metrics.json").read_text())
    cache = open_cache(tiny_cache)
    assert state["taps"] == ["features.13", "features.18"] and state["fingerprint"] == cache.fingerprint
    assert state["classes"] == cache.classes
    # the saved statistics are the train split's, computed here (never the test split the fit was scored on)
    mean, scale = train_stats(cache.view("fused", "train")[0])
    assert_close_per_column(state["mean"].numpy(), mean, mean, scale)
    assert_close_per_column(state["scale"].numpy(), scale, mean, scale)
    X, y = cache.view("fused", "test")
    logits = ((X - mean) / scale) @ state["coef"].numpy().T.astype(np.float64) + state["intercept"].numpy()
    acc = (logits.argmax(1) == y).mean()
    assert acc == pytest.approx(metrics["test_acc"])


def assert_close_per_column(got, want, mean, scale, rtol=1e-5):
    """|got - want| within rtol of each column's own magnitude, |mean| + scale (float32 statistics against
    float64 ones)."""
    unit = np.abs(mean) + scale
    err = np.abs(np.asarray(got, np.float64) - want) / unit
    assert np.isfinite(got).all() and (err <= rtol).all(), f"largest error {err.max():.2g} x (|mean| + scale)"


def test_linear_head_standardizes_with_its_training_rows_only():
    """mean_ and scale_ are X_train.mean(0) and X_train.std(0) (numpy, float64, here), whatever the eval set;
    the eval set changes nothing about the fit."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(90, 6)) * [1e-3, 0.1, 1, 10, 1e3, 1] + [0.05, -2, 0, 100, -1e4, 7]).astype(np.float32)
    X[:, 5] = 7.0  # a constant column keeps scale 1
    y = rng.integers(0, 3, 90)
    mean, scale = train_stats(X)
    assert scale[5] == 1.0
    heads = []
    for eval_set in (None, (X[:10], y[:10]), ((X[:30] * 50 - 1e3).astype(np.float32), y[:30])):
        for solver in ("adam", "lbfgs"):
            head = LinearHead(solver=solver, standardize=True, epochs=2, random_state=0).fit(X, y, eval_set=eval_set)
            assert_close_per_column(head.mean_, mean, mean, scale)
            assert_close_per_column(head.scale_, scale, mean, scale)
            heads.append(head)
    for head in heads[2:]:
        same = heads[0] if head.solver == "adam" else heads[1]
        assert np.array_equal(head.mean_, same.mean_) and np.array_equal(head.scale_, same.scale_)
        assert np.array_equal(head.coef_, same.coef_) and np.array_equal(head.intercept_, same.intercept_)


def test_ablate_writes_every_run(tiny_cache, tmp_path):
    r = _run("ablate", tiny_cache, "--views", "early,late,features.3+features.18", "--heads", "linear,logreg",
             "--seeds", "0,1", "--out", tmp_path / "abl")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert len(d["rows"]) == 3 * 2 * 2 and d["fingerprint"] == open_cache(tiny_cache).fingerprint
    assert {(s["view"], s["head"]) for s in d["summary"]} == {
        (v, h) for v in ("early", "late", "features.3,features.18") for h in ("linear", "logreg")}
    with open(tmp_path / "abl" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    md = (tmp_path / "abl" / "results.md").read_text()
    assert "| early | linear |" in md and "±" in md
    # the ablation's numbers are fit's numbers
    one = json.loads(_run("fit", tiny_cache, "--features", "late", "--head", "linear", "--seed", 1, "--json").output)
    row = next(x for x in d["rows"] if x["view"] == "late" and x["head"] == "linear" and x["seed"] == 1)
    assert row["test_acc"] == one["test_acc"] and row["train_acc"] == one["epochs"][-1]["train_acc"]


def test_lbfgs_solver_converges_on_separable_data(encoded_cache):
    cache = open_cache(encoded_cache)
    r = fit_head(cache, "early", "linear", HeadParams(solver="lbfgs", weight_decay=1e-3, standardize=True))
    assert r.test_acc > 0.9 and len(r.epochs) == 1


def test_linear_head_works_inside_sklearn_tools(encoded_cache):
    X, y = open_cache(encoded_cache).view("early", "train")
    scores = cross_val_score(LinearHead(epochs=10, lr=1e-2), X, y, cv=3)
    assert scores.mean() > 0.85


@parametrize_with_checks([LinearHead(epochs=30, lr=1e-2), LinearHead(solver="lbfgs", weight_decay=1e-3),
                          OneThreadLogisticRegression()])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def test_the_logreg_baseline_fits_with_one_blas_thread_and_the_same_optimum(monkeypatch):
    """The baseline is scikit-learn's LogisticRegression, run with one BLAS thread during its fit (thin products
    that threads slow down): the threads it sees inside fit are 1, and it reaches scikit-learn's own optimum."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_info, threadpool_limits

    seen, fit = [], LogisticRegression.fit

    def spy(self, X, y, sample_weight=None):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return fit(self, X, y, sample_weight=sample_weight)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 40)).astype(np.float32)
    y = (X[:, :3] @ rng.normal(size=(3, 4))).argmax(1)
    with threadpool_limits(limits=2, user_api="blas"):
        ours = make_logreg(C=0.5).fit(X, y)
        assert seen == [{1}]
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000, random_state=0)).fit(X, y)
    np.testing.assert_allclose(ours[-1].coef_, ref[-1].coef_, atol=1e-4, rtol=1e-4)
    assert np.array_equal(ours.predict(X), ref.predict(X))


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_view(tiny_cache):
    r = _run("fit", tiny_cache, "--features", "middle")
    assert r.exit_code == 1
    assert r.output == ("Error: unknown view or tap 'middle'; use one of early, late, fused, all "
                        "or comma-separated taps such as features.13,features.18 (see `fusion-cache taps`)\n")


def _late_only_cache(path, complete=True):
    """10 + 10 rows, two classes, only features.18 (random)."""
    rng = np.random.default_rng(0)
    feats = {s: {"features.18": rng.normal(size=(10, 1280)).astype(np.float32)} for s in ("train", "test")}
    labels = {s: np.arange(10) % 2 for s in ("train", "test")}
    return write_synthetic_cache(path, feats, labels, ["x", "y"], complete=complete)


def test_view_whose_tap_the_cache_lacks_lists_what_it_has(tmp_path):
    path = _late_only_cache(tmp_path / "late-only.h5")
    r = _run("fit", path, "--features", "fused")
    assert r.exit_code == 1
    assert r.output == ("Error: view 'fused' needs features.13, which this cache lacks; it holds features.18. "
                        "Re-run extract with --taps including them\n")


def test_incomplete_cache_is_refused_with_how_to_resume(tmp_path):
    _late_only_cache(tmp_path / "c.h5", complete=False)
    r = _run("fit", tmp_path / "c.h5")
    assert r.exit_code == 1 and "an interrupted extraction left" in r.output and "resume" in r.output
    r = _run("fit", tmp_path / "c.h5.partial")
    assert r.exit_code == 1 and "incomplete cache" in r.output and "resume" in r.output


def test_empty_cache_is_refused(tmp_path):
    feats = {s: {"features.18": np.zeros((0, 1280), np.float32)} for s in ("train", "test")}
    labels = {s: np.zeros(0, np.int64) for s in ("train", "test")}
    path = write_synthetic_cache(tmp_path / "empty.h5", feats, labels, ["x", "y"])
    r = _run("fit", path, "--features", "late")
    assert r.exit_code == 1 and "has an empty split" in r.output and "Traceback" not in r.output


def test_not_a_cache(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("hello")
    r = _run("fit", p)
    assert r.output == f"Error: {p} is not an HDF5 file; pass a cache written by `fusion-cache extract`\n"


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "Error: Invalid value for '--epochs': -1 is not in the range 1<=x<=10000."),
    (["--lr", "0"], "Error: Invalid value for '--lr': 0 is out of range; pass a number > 0"),
    (["--lr", "-0.1"], "Error: Invalid value for '--lr': -0.1 is out of range; pass a number > 0"),
    (["--lr", "nan"], "Error: Invalid value for '--lr': 'nan' is not a finite number"),
    (["--lr", "inf"], "Error: Invalid value for '--lr': 'inf' is not a finite number"),
    (["--batch-size", "0"], "Error: Invalid value for '--batch-size': 0 is not in the range 1<=x<=1048576."),
    (["--head", "logreg", "--C", "0"], "Error: Invalid value for '--C': 0 is out of range; pass a number > 0"),
    (["--head", "logreg", "--C", "-inf"], "Error: Invalid value for '--C': '-inf' is not a finite number"),
    (["--weight-decay", "-1"], "Error: Invalid value for '--weight-decay': -1 is out of range; pass a number >= 0"),
    (["--seed", "-1"], "Error: Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295."),
    (["--features", "fused,"], "Error: Invalid value for --features: 'fused,' has an empty item"),
])
def test_nonsense_hyper_parameters(tiny_cache, args, message):
    r = _run("fit", tiny_cache, *args)
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 2 and len(errors) == 1 and errors[0].startswith(message), r.output


def test_warm_start_continues_from_the_previous_fit(encoded_cache):
    X, y = open_cache(encoded_cache).view("early", "train")
    head = LinearHead(solver="lbfgs", standardize=True, weight_decay=1e-2, max_iter=200)
    cold = head.fit(X, y).n_iter_
    head.set_params(warm_start=True)
    assert head.fit(X, y).n_iter_ < cold / 4  # already at the optimum: a few iterations confirm it
    head.set_params(warm_start=False)
    assert head.fit(X, y).n_iter_ == cold  # and a cold start is a cold start


def test_knn_head_in_fit_and_ablate(encoded_cache, tmp_path):
    r = _run("fit", encoded_cache, "--head", "knn", "--features", "early", "--k", 10, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    # standardized (the DINOv2 protocol), the 92 noise columns weigh as much as the 4 code columns: not 0.9
    assert d["head"] == "knn" and d["params"]["k"] == 10 and d["test_acc"] > 0.7
    assert d["train_acc"] is None and d["epochs"][0]["train_loss"] is None  # its own neighbour: no training score
    text = _run("fit", encoded_cache, "--head", "knn", "--features", "early", "--k", 10)
    assert text.exit_code == 0 and "—" in text.output, text.output
    r = _run("ablate", encoded_cache, "--views", "early,late", "--heads", "knn,logreg", "--seeds", 0, "--json")
    assert r.exit_code == 0, r.output
    rows = {(row["view"], row["head"]): row["test_acc"] for row in json.loads(r.output)["rows"]}
    assert rows[("early", "knn")] > 0.7 and rows[("late", "knn")] < 0.45


@pytest.mark.parametrize("args, message", [
    (["--head", "knn", "--solver", "lbfgs"], "--solver does not apply to the knn head; it is an option of linear"),
    (["--head", "knn", "--C", "1"], "--C does not apply to the knn head; it is an option of logreg"),
    (["--head", "logreg", "--epochs", "3"], "--epochs does not apply to the logreg head"),
    (["--head", "knn", "--k", "5000"], "--k 5000 is larger than the 1000 training rows of 'fused'; pass --k 1000"),
    (["--head", "knn", "--out", "OUT"], "a knn head cannot be saved for predict and export"),
])
def test_knn_bad_input(encoded_cache, tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "h")) for a in args]
    r = _run("fit", encoded_cache, *args)
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code in (1, 2) and len(errors) == 1 and message in errors[0], r.output
    assert not (tmp_path / "h").exists()


def test_head_choice_matches_the_registry():
    from fusion_cache.cli import fit as fit_command
    from fusion_cache.heads import HEADS

    choice = next(p for p in fit_command.params if p.name == "head").type.choices
    assert tuple(choice) == HEADS
