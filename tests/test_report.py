"""report: every file written, figures readable, numbers agree with ablate, the test split never used for selection."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fusion_cache.cache import open_cache
from fusion_cache.cli import main
from fusion_cache.fit import load_view
from fusion_cache.selection import ViewStore, tune, tune_heads, validation_split
from fusion_cache.synthetic import write_cifar

from .features import train_stats

FIGURES = ("samples.png", "curves.png", "predictions.png", "confusion.png", "per_class.png")
ARGS = ["--views", "early,late,fused", "--heads", "linear,logreg", "--seeds", "0,1", "--val-fraction", "0.2",
        "--max-iter", "30"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def report_dir(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    r = _run("report", tiny_cache, "--out", out, *ARGS)
    assert r.exit_code == 0, r.output
    assert "best view (tuned, chosen on validation):" in r.output
    return out


def test_report_writes_every_file(report_dir):
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(["report.md", "report.json", "predictions.npz",
                                                                   *FIGURES])
    md = (report_dir / "report.md").read_text()
    assert "*62.78*" in md and "*77.58*" in md  # the case study's numbers, beside ours
    assert "fusion-cache report" in md and "sha256" in md
    for fig in FIGURES:
        assert f"]({fig})" in md


# Expected pixel sizes at 100 dpi for the tiny cache: 10 classes, 3 samples a class, 18 test predictions.
@pytest.mark.parametrize("name,size", [
    ("samples.png", (1200, 680)),  # 30 images, 8 columns x 4 rows, 1.5 x 1.7 in each
    ("curves.png", (1100, 420)),
    ("predictions.png", (1200, 780)),  # 18 images, 6 columns x 3 rows, 2.0 x 2.6 in each
    ("confusion.png", (920, 820)),  # 0.62 in a class + 2 in
    ("per_class.png", (1100, 450)),
])
def test_every_png_opens_with_the_expected_size(report_dir, name, size):
    with Image.open(report_dir / name) as im:
        im.load()
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # something was drawn


def test_report_json_agrees_with_ablate(report_dir, tiny_cache, tmp_path):
    rep = json.loads((report_dir / "report.json").read_text())
    r = _run("ablate", tiny_cache, "--views", "early,late,fused", "--heads", "linear,logreg", "--seeds", "0,1",
             "--out", tmp_path / "abl")
    assert r.exit_code == 0, r.output
    abl = json.loads((tmp_path / "abl" / "results.json").read_text())
    key = lambda row: (row["view"], row["head"], row["seed"])  # noqa: E731
    ours = {key(row): row for row in rep["paper"]["rows"]}
    theirs = {key(row): row for row in abl["rows"]}
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for k in ours:
        for field in ("test_acc", "train_acc", "test_loss", "train_loss", "epochs", "taps", "dim"):
            assert ours[k][field] == theirs[k][field], (k, field)
    assert rep["paper"]["summary"] == abl["summary"]
    assert rep["fingerprint"] == abl["fingerprint"] == open_cache(tiny_cache).fingerprint


def test_report_json_best_view_is_chosen_on_validation(report_dir):
    """The best row is the one with the best mean validation accuracy (the first on a tie), never the best test
    mean; its test accuracy is then read."""
    rep = json.loads((report_dir / "report.json").read_text())
    means = {(s["view"], s["head"]): s["test_acc_mean"] for s in rep["tuned"]["summary"]}
    val: dict = {}
    for r in rep["tuned"]["rows"]:
        val.setdefault((r["view"], r["head"]), []).append(r["val_acc"])
    by_val = {k: sum(v) / len(v) for k, v in val.items()}
    chosen = max(means, key=lambda k: by_val[k])  # summary order, the first on a tie
    assert (rep["best_view"], rep["best_head"]) == chosen
    assert means[chosen] == rep["best_test_acc"]
    assert rep["best_view"] in {s["view"] for s in rep["tuned"]["summary"]}
    # the pair search adds a features.i + features.18 view to the tuned rows
    pair = {s["view"] for s in rep["tuned"]["summary"] if s["view"].endswith(",features.18")}
    assert len(pair) == 1 and set(rep["tuned"]["pair_search"]) == {f"features.{i}" for i in range(18)}
    best_tap = max(rep["tuned"]["pair_search"], key=rep["tuned"]["pair_search"].get)
    assert pair == {f"{best_tap},features.18"}
    for row in rep["tuned"]["rows"]:
        assert row["fit_rows"] + row["val_rows"] == rep["provenance"]["train_size"]
        assert row["val_acc"] == max(row["grid"].values())
    assert rep["provenance"]["weights_sha256"] and rep["provenance"]["taps"]
    assert rep["command"].startswith("fusion-cache report")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_validation_split_is_disjoint_stratified_and_seeded(seed):
    y = np.repeat(np.arange(5), [40, 30, 20, 50, 10])
    fit_rows, val_rows = validation_split(y, 0.1, seed)
    assert not set(fit_rows) & set(val_rows)
    assert sorted([*fit_rows, *val_rows]) == list(range(len(y)))
    assert list(np.bincount(y[val_rows])) == [4, 3, 2, 5, 1]  # 10 % of each class
    again = validation_split(y, 0.1, seed)
    assert np.array_equal(again[1], val_rows)
    assert not np.array_equal(validation_split(y, 0.1, seed + 100)[1], val_rows)


@pytest.mark.parametrize("head", ["linear", "logreg", "knn"])
def test_the_test_split_never_influences_selection(encoded_cache, head):
    """Scrambling the test split changes only the final test number, never the chosen value or val scores."""
    cache = open_cache(encoded_cache)
    view = "early" if head == "knn" else "fused"  # kNN's cosine is swamped by the 1280 noise columns of fused
    a = tune(ViewStore(cache), view, head, 0, 0.2, max_iter=50)
    data = load_view(cache, view)
    rng = np.random.default_rng(0)
    store = ViewStore(cache)
    store.put(view, dataclasses.replace(data, X_test=rng.normal(size=data.X_test.shape).astype(np.float32),
                                        y_test=rng.permutation(data.y_test)))
    b = tune(store, view, head, 0, 0.2, max_iter=50)
    assert a.value == b.value and a.grid == b.grid and a.val_acc == b.val_acc
    assert a.test_acc > 0.9 and b.test_acc < 0.5  # the test split was really scrambled, and really read


def test_an_empty_grid_is_refused(encoded_cache):
    with pytest.raises(Exception, match="grid of the linear head is empty"):
        tune(ViewStore(open_cache(encoded_cache)), "fused", "linear", 0, 0.2, grid=())


def test_report_refuses_images_that_are_not_the_cache_source(tiny_cache, tmp_path):
    other = write_cifar(tmp_path / "other", seed=99)
    r = _run("report", tiny_cache, "--out", tmp_path / "r", "--data-root", other, *ARGS)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "are not the ones" in r.output and "pass --data-root" in r.output
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--val-fraction", "1.5"], "1.5 is out of range; pass a number > 0 and <= 0.5"),
    (["--seeds", "a,b"], "is not a comma-separated list of integers"),
    (["--views", "nope"], "unknown view"),
])
def test_report_bad_arguments(tiny_cache, tmp_path, args, message):
    r = _run("report", tiny_cache, "--out", tmp_path / "r", *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_report_on_an_output_path_that_is_a_file(tiny_cache, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = _run("report", tiny_cache, "--out", f)
    assert r.exit_code == 1 and "is a file; pass a folder" in r.output
    assert f.read_text() == "keep me"


def test_report_with_logreg_only_and_a_forced_rerun(tiny_cache, tmp_path):
    out = tmp_path / "r"
    args = ["report", tiny_cache, "--out", out, "--views", "late,fused", "--heads", "logreg", "--seeds", "0",
            "--max-iter", "30", "--no-pair-search"]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "report.json", "predictions.npz", *FIGURES])
    first = (out / "report.json").read_text()
    r = _run(*args)
    assert r.exit_code == 1 and "already holds results" in r.output and "pass --force" in r.output
    assert (out / "report.json").read_text() == first
    r = _run(*args[:-1], "--pair-search", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["tuned"]["pair_search"]  # the new report, whole
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary folder left beside it


def test_a_val_fraction_that_empties_a_class_is_refused():
    y = np.array([0] * 10 + [1] * 10 + [2])
    with pytest.raises(Exception, match="class index 2 has 1 train image: tuning needs 2 or more a class"):
        validation_split(y, 0.5, 0)
    y = np.array([0] * 10 + [1] * 10 + [2] * 2)  # 2 rows of 20 held out, unstratified (fewer than the classes)
    for seed in range(200):
        try:
            validation_split(y, 0.1, seed)
        except Exception as e:
            assert "--val-fraction 0.1 leaves class index 2 without training rows" in str(e)
            break
    else:
        raise AssertionError("no seed of 200 held out both rows of class 2")


def test_report_with_the_knn_head(tiny_cache, tmp_path):
    r = _run("report", tiny_cache, "--out", tmp_path / "r", "--views", "late,fused", "--heads", "knn,linear",
             "--seeds", "0", "--no-pair-search", "--val-fraction", "0.2", "--max-iter", "30")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    knn = [row for row in rep["tuned"]["rows"] if row["head"] == "knn"]
    assert len(knn) == 2 and all(row["k"] in (10, 20) for row in knn)  # 48 fit rows: larger k are not candidates
    assert all(set(row["grid"]) == {"10", "20"} for row in knn)
    assert rep["tuned"]["grids"]["knn"] == {"param": "k", "values": [10, 20, 50, 100, 200]}
    assert "`knn`: k in [10, 20, 50, 100, 200]" in (tmp_path / "r" / "report.md").read_text()
    assert all(row["train_acc"] is None for row in knn)
    assert all(row["train_acc"] is None for row in rep["paper"]["rows"] if row["head"] == "knn")


def test_heads_tuned_together_equal_heads_tuned_alone(encoded_cache):
    """tune_heads stacks the linear and logreg grids of one view, over every seed's fit rows, into one model:
    each head's choice, validation scores and refit must be those it gets when tuned on its own."""
    cache = open_cache(encoded_cache)
    both = tune_heads(ViewStore(cache), "fused", ["linear", "logreg", "knn"], [0, 1], 0.2, max_iter=300)
    assert [(r.head, r.seed) for r in both] == [(h, s) for h in ("linear", "logreg", "knn") for s in (0, 1)]
    for run in both:
        alone = tune(ViewStore(cache), "fused", run.head, run.seed, 0.2, max_iter=300)
        assert (run.head, run.value, run.grid, run.val_acc, run.test_acc) == \
            (alone.head, alone.value, alone.grid, alone.val_acc, alone.test_acc)
        if run.head != "knn":
            np.testing.assert_allclose(run.estimator.coef_, alone.estimator.coef_, atol=1e-4, rtol=0)


def test_seeds_that_choose_the_same_strength_share_one_refit(encoded_cache):
    """The refit on all of train has one optimum per strength: seeds whose validation splits chose the same
    weight decay get the same refit (fitted once, warm-started from the first seed's grid head), equal to that
    seed's refit alone."""
    cache = open_cache(encoded_cache)
    runs = tune_heads(ViewStore(cache), "fused", ["linear"], [0, 1, 2], 0.2, max_iter=300, grids={"linear": (3e-3,)})
    assert {r.value for r in runs} == {3e-3}
    for r in runs[1:]:
        assert np.array_equal(r.estimator.coef_, runs[0].estimator.coef_) and r.test_acc == runs[0].test_acc
    alone = tune(ViewStore(cache), "fused", "linear", 0, 0.2, max_iter=300, grid=(3e-3,))  # same warm start
    # The stacked grid head it starts from is converged to the solver's tolerance, not bit for bit the one fitted
    # alone, so the two refits agree to 1e-4 relative (coefficients reach 2.4 at this weak decay).
    np.testing.assert_allclose(runs[0].estimator.coef_, alone.estimator.coef_, atol=1e-4, rtol=1e-4)


def test_the_tuned_logreg_is_scikit_learns_logistic_regression(encoded_cache):
    """The C grid trains as the stacked model (weight decay 1 / (rows x C)); its refit must be the optimum
    scikit-learn's LogisticRegression finds at the chosen C on the same standardized features."""
    from sklearn.linear_model import LogisticRegression

    cache = open_cache(encoded_cache)
    run = tune(ViewStore(cache), "early", "logreg", 0, 0.2, max_iter=500)
    data = load_view(cache, "early")
    mean, scale = train_stats(data.X_train)  # the reference's own standardization, in float64
    Xs, Xte = (data.X_train - mean) / scale, (data.X_test - mean) / scale
    lr = LogisticRegression(C=run.value, max_iter=5000, tol=1e-10).fit(Xs, data.y_train)
    ours = run.estimator.predict_proba(data.X_test)
    np.testing.assert_allclose(ours, lr.predict_proba(Xte), atol=2e-3)
    np.testing.assert_allclose(run.estimator.coef_, lr.coef_, atol=5e-3)
    assert run.test_acc == lr.score(Xte, data.y_test)


@pytest.mark.parametrize("argv0", ["/venv/bin/fusion-cache", "/src/fusion_cache/__main__.py"])
def test_the_recorded_command_keeps_its_arguments(monkeypatch, argv0):
    # `python -m fusion_cache report ...` recorded "fusion-cache -m fusion_cache report", without its arguments
    from fusion_cache import cli

    monkeypatch.setattr(sys, "argv", [argv0, "report", "my cache.h5", "--out", "runs"])
    assert cli._command_line() == "fusion-cache report 'my cache.h5' --out runs"


def test_the_best_row_is_the_best_on_validation_not_on_test():
    """ReportResult.best on rows whose validation and test rankings disagree: validation wins, the first on a tie."""
    from types import SimpleNamespace

    from fusion_cache.report import ReportResult

    rows = [{"view": "late", "head": "linear", "val_acc": 0.80, "test_acc": 0.90},
            {"view": "fused", "head": "linear", "val_acc": 0.85, "test_acc": 0.70},
            {"view": "fused", "head": "linear", "val_acc": 0.83, "test_acc": 0.72},
            {"view": "all", "head": "linear", "val_acc": 0.84, "test_acc": 0.95}]
    summary = [{"view": v, "head": "linear", "test_acc_mean": t} for v, t in (("late", 0.9), ("fused", 0.71),
                                                                              ("all", 0.95))]
    fake = SimpleNamespace(tuned_rows=rows, tuned_summary=summary)
    assert ReportResult.best.fget(fake)["view"] == "fused"  # val 0.84 on average, tied with all: the first
    rows[-1]["val_acc"] = 0.86
    assert ReportResult.best.fget(fake)["view"] == "all"
