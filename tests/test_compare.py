"""Backbones compared: ablate and report on several caches of the same images (one table with a backbone
column, the layer curve), and the refusal to compare caches of different images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion_cache.backbones import tap_table
from fusion_cache.cache import open_cache
from fusion_cache.compare import layer_curve
from fusion_cache.heads import LinearHead

from .hostile import clean_failure, run, snapshot

BACKBONES = ("mobilenet_v2", "resnet18")


def _folder(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("test", 2)):
        for ci, c in enumerate(("ants", "bees")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = np.clip(ci * 90 + rng.integers(0, 120, size=(40, 44, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


def _extract(name: str, images: Path, out: Path) -> Path:
    r = run("extract", "--backbone", name, "--out", out, "--dataset", "imagefolder", "--data-root", images,
            "--train-size", "all", "--test-size", "all", "--weights", "random", "--image-size", 32, "--workers", 0,
            "--no-progress")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("compare")
    images = _folder(d / "images", 0)
    return [_extract(name, images, d / f"{name}.h5") for name in BACKBONES]


def test_ablate_several_caches_gives_one_table_with_a_backbone_column(caches, tmp_path):
    r = run("ablate", *caches, "--views", "early,late", "--heads", "linear", "--seeds", "0,1", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| backbone | view | head |")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["mobilenet_v2"] * 2 + ["resnet18"] * 2
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {(row["backbone"], row["view"]) for row in res["rows"]} == {(b, v) for b in BACKBONES for v in ("early", "late")}
    assert [c["backbone"] for c in res["caches"]] == list(BACKBONES)
    dims = {(s["backbone"], s["view"]): s["dim"] for s in res["summary"]}
    assert dims[("resnet18", "late")] == 512 and dims[("mobilenet_v2", "late")] == 1280
    assert (tmp_path / "a" / "results.csv").read_text().startswith("backbone,cache,view,")


def test_report_draws_the_layer_curve_of_each_backbone(caches, tmp_path):
    out = tmp_path / "r"
    r = run("report", *caches, "--out", out, "--views", "late", "--heads", "linear", "--seeds", "0,1")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["layer_curve.png", "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    curve = rep["layer_curve"]["rows"]
    for name in BACKBONES:
        rows = [x for x in curve if x["backbone"] == name]
        assert [x["tap"] for x in rows] == list(tap_table(name).names)
        assert [x["depth"] for x in rows] == sorted(x["depth"] for x in rows) and rows[-1]["depth"] == 1.0
        # each point is a head fitted here on that tap's features alone, read from the cache
        assert_points_are_single_tap_fits(open_cache(next(c for c in caches if c.stem == name)), rows)
    assert "| backbone | view | head |" in (out / "report.md").read_text()
    with Image.open(out / "layer_curve.png") as im:
        assert im.size == (900, 500)
    one = tmp_path / "one"
    r = run("report", caches[1], "--layer-curve", "--out", one, "--views", "late", "--heads", "linear", "--seeds", 0)
    assert r.exit_code == 0, r.output
    assert {x["backbone"] for x in json.loads((one / "report.json").read_text())["layer_curve"]["rows"]} == {"resnet18"}


def assert_points_are_single_tap_fits(cache, rows) -> None:
    """Each point of the curve (seeds 0 and 1) is the head fitted here on its tap's features alone."""
    for x in rows:
        accs = [single_tap_accuracy(cache, x["tap"], seed) for seed in (0, 1)]
        assert x["dim"] == cache.features(x["tap"]).shape[1]
        assert x["test_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-6), x["tap"]
        assert x["test_acc_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-6), x["tap"]


def single_tap_accuracy(cache, tap: str, seed: int) -> float:
    """The layer curve's head (compare.CURVE_PARAMS: linear, standardized, Adam 1e-3, batch 32, 10 epochs) on
    one tap's features alone, scored on the test split here. (The curve's accuracies are float32: compared to
    1e-6, far below one test image.)"""
    head = LinearHead(epochs=10, lr=1e-3, batch_size=32, standardize=True, random_state=seed)
    head.fit(cache.features(tap, "train"), cache.labels("train"))
    return float(np.mean(head.predict(cache.features(tap, "test")) == cache.labels("test")))


def test_each_point_of_the_layer_curve_is_its_tap_alone(encoded_cache):
    """On a cache whose label is encoded in features.13 only, that tap's point stands out; every point equals a
    head fitted here on its tap alone."""
    cache = open_cache(encoded_cache)
    rows = layer_curve(cache, [0, 1])
    assert [r["tap"] for r in rows] == list(cache.taps) == ["features.3", "features.13", "features.18"]
    assert_points_are_single_tap_fits(cache, rows)
    acc = {r["tap"]: r["test_acc_mean"] for r in rows}
    assert acc["features.13"] > 0.8 and acc["features.3"] < 0.45 and acc["features.18"] < 0.45, acc


def test_caches_of_other_images_are_not_compared(caches, tmp_path):
    other = _extract("resnet18", _folder(tmp_path / "images", 1), tmp_path / "other.h5")
    before = snapshot(tmp_path)
    for args, fragment in (
            (("ablate", caches[0], other), "hold different data (data_identity differs)"),
            (("report", caches[0], other, "--out", tmp_path / "r"), "hold different data (data_identity differs)"),
            (("ablate", caches[0], caches[0]), "are the same cache; pass each one once"),
            (("ablate", caches[0], caches[1], caches[1]), "are the same cache; pass each one once")):
        r = run(*args, "--views", "late", "--heads", "linear", "--seeds", 0)
        problem = clean_failure(r, fragment)
        assert problem is None, problem
        assert r.exit_code == 1
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option", [["--max-iter", "30"], ["--no-pair-search"], ["--val-fraction", "0.2"],
                                    ["--data-root", "."]])
def test_tuned_protocol_options_are_refused_in_a_comparison(caches, tmp_path, option):
    before = snapshot(tmp_path)
    r = run("report", *caches, "--out", tmp_path / "r", *option)
    flag = "--pair-search/--no-pair-search" if option[0] == "--no-pair-search" else option[0]
    problem = clean_failure(r, f"{flag} does not apply to a comparison of backbones")
    assert problem is None, problem
    assert snapshot(tmp_path) == before


def test_a_tap_list_of_one_backbone_is_refused_on_another(caches, tmp_path):
    """Named views (early, late, fused, all) resolve per backbone; a list of one backbone's taps does not."""
    before = snapshot(tmp_path)
    r = run("ablate", *caches, "--views", "features.13+features.18", "--heads", "linear", "--seeds", 0,
            "--out", tmp_path / "a")
    problem = clean_failure(r, "unknown view or tap 'features.13'; use one of early, late, fused, all or "
                               "comma-separated taps of resnet18 such as layer3.1,layer4.1")
    assert problem is None, problem
    assert snapshot(tmp_path) == before and not (tmp_path / "a").exists()
