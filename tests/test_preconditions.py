"""Every command validates everything before the first expensive step (the hostile corpus, second round).

`fit`, `ablate` and `report` check every head's preconditions against the cache's labels and taps (cheap to
read; features are not) before any features are read: the classes each head needs, the rows kNN's k needs
(the paper protocol's k and the tuned grid against each seed's fit rows), and the taps of the pair search.
Each case is one `Error:` line, exit 1 or 2, no traceback, with `Cache.features` made to fail if it is called
and no output folder written. Each failed on the code before: a scikit-learn traceback, or an error after the
paper protocol had run (with advice to pass `--k`, which `report` does not have).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from fusion_cache.cache import Cache

from .conftest import write_synthetic_cache
from .hostile import clean_failure, run

# ---------------------------------------------------------------------------------------------- fixtures


def synthetic(path: Path, train: list[int], test: list[int], classes: list[str], taps: dict[str, int],
              scale: float = 1.0) -> Path:
    """A cache of random features with the labels given."""
    rng = np.random.default_rng(0)
    y = {"train": np.array(train, np.int64), "test": np.array(test, np.int64)}
    feats = {s: {t: (scale * rng.normal(size=(len(y[s]), w))).astype(np.float32) for t, w in taps.items()}
             for s in y}
    return write_synthetic_cache(path, feats, y, classes)


FUSED = {"features.13": 96, "features.18": 1280}


@pytest.fixture(scope="module")
def one_class_cache(tmp_path_factory) -> Path:
    """Every image of one class (an image folder with one class folder)."""
    return synthetic(tmp_path_factory.mktemp("one-class") / "one.h5", [0] * 30, [0] * 10, ["a"], FUSED)


def extracted(tmp_path_factory, cifar_root, weights_file, name: str, *args) -> Path:
    """A real cache of the tiny CIFAR-10 (its images are where the cache says: the report's figures find them)."""
    out = tmp_path_factory.mktemp(name) / f"{name}.h5"
    r = run("extract", "--out", out, "--data-root", cifar_root, "--weights", weights_file, "--image-size", 32,
            "--no-download", "--skip-integrity-check", "--no-progress", *args)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def few_rows_cache(tmp_path_factory, cifar_root, weights_file) -> Path:
    """16 training rows: fewer than the paper protocol's k = 20."""
    return extracted(tmp_path_factory, cifar_root, weights_file, "few", "--train-size", 16, "--test-size", 10,
                     "--taps", "fused")


@pytest.fixture(scope="module")
def one_tap_cache(tmp_path_factory, cifar_root, weights_file) -> Path:
    """Only the late tap: the pair search has nothing to pair with it."""
    return extracted(tmp_path_factory, cifar_root, weights_file, "one-tap", "--train-size", 40, "--test-size", 10,
                     "--taps", "late")


@pytest.fixture
def no_features(monkeypatch):
    """Reading any features fails the test: the preconditions must come first."""
    def read(self, tap, split="train"):
        raise AssertionError(f"features of {tap} ({split}) were read before the preconditions were checked")

    monkeypatch.setattr(Cache, "features", read)


def _refused(result, fragment: str, out: Path | None = None) -> None:
    problem = clean_failure(result, fragment)
    assert problem is None, problem
    assert out is None or not out.exists(), "an output folder was written"


# ---------------------------------------------------------------------------------------------- classes


ONE_CLASS = [
    (["fit", "--head", "logreg"], "the logreg head needs at least 2 classes in the training rows"),
    (["fit", "--head", "knn"], "the knn head needs at least 2 classes in the training rows"),
    (["ablate", "--heads", "logreg", "--seeds", "0"], "the logreg head needs at least 2 classes"),
    (["ablate", "--heads", "linear,knn", "--seeds", "0"], "the knn head needs at least 2 classes"),
    (["report", "--out", "OUT"], "the logreg head needs at least 2 classes"),  # the paper protocol's logreg
    (["report", "--out", "OUT", "--heads", "linear"], "the linear head needs at least 2 classes in the fit rows"),
    (["report", "--out", "OUT", "--layer-curve"], "the logreg head needs at least 2 classes"),
]


@pytest.mark.parametrize("args, fragment", ONE_CLASS, ids=[" ".join(a) for a, _ in ONE_CLASS])
def test_one_class_is_refused_before_any_features_are_read(one_class_cache, no_features, tmp_path, args, fragment):
    out = tmp_path / "r"
    r = run(args[0], one_class_cache, *[str(out) if a == "OUT" else a for a in args[1:]])
    _refused(r, fragment, out)
    assert "extract images of 2 or more classes" in r.output


def test_a_one_class_linear_fit_still_runs(one_class_cache):
    """A softmax over one class is defined: the linear head's fit keeps working (behaviour on valid input)."""
    r = run("fit", one_class_cache, "--head", "linear", "--features", "late")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------- rows against k


def test_report_refuses_knn_with_fewer_rows_than_k_before_the_paper_protocol(few_rows_cache, no_features, tmp_path):
    out = tmp_path / "r"
    r = run("report", few_rows_cache, "--out", out, "--heads", "linear,knn", "--seeds", "0")
    _refused(r, "the knn head's k = 20 is larger than the 16 training rows", out)
    assert "leave knn out of --heads" in r.output and "--k" not in r.output  # report has no --k


def test_a_comparison_refuses_knn_with_fewer_rows_than_k(few_rows_cache, no_features, tmp_path):
    out = tmp_path / "r"
    r = run("report", few_rows_cache, "--out", out, "--heads", "knn", "--seeds", "0", "--layer-curve")
    _refused(r, "the knn head's k = 20 is larger than the 16 training rows", out)
    assert "--k" not in r.output


@pytest.mark.parametrize("command", [["ablate", "--heads", "linear,knn", "--seeds", "0"], ["fit", "--head", "knn"]])
def test_fit_and_ablate_refuse_k_beyond_the_rows_before_reading_features(few_rows_cache, no_features, command):
    r = run(command[0], few_rows_cache, *command[1:])
    _refused(r, "--k 20 is larger than the 16 training rows")
    assert "pass --k 16 or less" in r.output


def test_the_tuned_knn_grid_needs_its_smallest_k_within_the_fit_rows():
    """The tuned protocol tries the k of the grid that fit its fit rows: the smallest (10) must."""
    from fusion_cache.errors import FusionCacheError
    from fusion_cache.heads import HEAD_SPECS, check_can_fit

    smallest = min(HEAD_SPECS["knn"].grid)
    y = np.arange(smallest) % 2
    check_can_fit(["knn"], y, None, rows="fit")  # exactly the smallest k: it runs
    with pytest.raises(FusionCacheError) as e:
        check_can_fit(["knn"], y[:-1], None, rows="fit", where="seed 0's split", offered={"heads", "val_fraction"})
    assert str(e.value) == (f"the smallest k of the knn grid ({smallest}) is larger than the {smallest - 1} fit rows "
                            "of seed 0's split; pass a smaller --val-fraction, or re-extract with a larger "
                            "--train-size, or leave knn out of --heads")


# ---------------------------------------------------------------------------------------------- pair search


def test_the_pair_search_on_a_one_tap_cache_fails_before_the_paper_protocol(one_tap_cache, no_features, tmp_path):
    out = tmp_path / "r"
    r = run("report", one_tap_cache, "--out", out, "--views", "late", "--seeds", "0")
    _refused(r, "the pair search needs a tap besides features.18", out)
    assert "pass --no-pair-search" in r.output


# ---------------------------------------------------------------------------------------------- the registry


def test_fit_and_selection_never_branch_on_a_head_name():
    """What a head can do and needs is declared in heads.HEAD_SPECS: no comparison with a head's name, and no
    `in` test against one, in the modules that train heads."""
    from fusion_cache.heads import HEADS

    root = Path(__file__).resolve().parent.parent / "fusion_cache"
    for module in ("fit.py", "selection.py"):
        for node in ast.walk(ast.parse((root / module).read_text())):
            if isinstance(node, ast.Compare):
                named = [c.value for c in [node.left, *node.comparators]
                         if isinstance(c, ast.Constant) and c.value in HEADS]
                assert not named, f"{module}:{node.lineno} branches on the head name {named[0]!r}"


def test_every_head_declares_its_preconditions():
    from fusion_cache.heads import HEAD_SPECS

    for spec in HEAD_SPECS.values():
        assert 1 <= spec.min_classes <= spec.tuned_min_classes
        assert spec.rows_option is None or spec.rows_option in spec.options
        assert spec.family in ("l2", "neighbours", "closed_form")
        assert not spec.streams or spec.family == "closed_form"  # a streamed head tunes from its sums
        assert all(option in spec.options for option, _, _ in spec.divergence_fixes)
        assert all(option in spec.options for option in spec.applies_when)
        assert spec.has_linear_form or not spec.divergence_fixes  # only a trained head can diverge
