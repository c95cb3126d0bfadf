"""predict and export: the cache, the predictor and the exported program are the same function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.models import mobilenet_v2

from fusion_cache.cache import open_cache
from fusion_cache.cli import main
from fusion_cache.decode import read_image
from fusion_cache.extract import ExtractConfig, extract
from fusion_cache.headfile import load_head
from fusion_cache.predict import build_deployed, predict
from fusion_cache.synthetic import calibrate_batchnorm

from .features import FLOAT32, assert_features_close, assert_order_one


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder_root, weights_file):
    """An image-folder cache at 32 px and a standardized linear head on its fused view."""
    d = tmp_path_factory.mktemp("pred")
    extract(ExtractConfig(out=d / "f.h5", dataset="imagefolder", data_root=folder_root, train_size=None,
                          test_size=None, weights=str(weights_file), image_size=32, taps=("features.13", "features.18"),
                          batch_size=4, workers=0, progress=False))
    r = _run("fit", d / "f.h5", "--features", "fused", "--standardize", "--epochs", 5, "--out", d / "head")
    assert r.exit_code == 0, r.output
    return d


def _test_paths(folder_root, cache):
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(folder_root / "test")).samples
    return [Path(samples[i][0]) for i in cache.indices("test")]


def test_predict_equals_head_on_cached_features(trained, folder_root, weights_file):
    cache = open_cache(trained / "f.h5")
    head = load_head(trained / "head")
    paths = _test_paths(folder_root, cache)
    model = build_deployed(head, str(weights_file))
    got = np.array([r["logits"] for r in predict(model, head, paths, batch_size=4, progress=False)])
    X, _ = cache.view("fused", "test")
    for tap in ("features.13", "features.18"):  # the head's input is at a real scale
        assert_order_one(cache.features(tap, "test"), name=tap)
    assert_features_close(got, head.logits_from_features(X), FLOAT32, name="predict logits")


def test_exported_program_runs_without_fusion_cache_and_agrees(trained, folder_root, weights_file, tmp_path):
    r = _run("export", trained / "head", "--out", tmp_path / "model.pt2", "--weights", weights_file)
    assert r.exit_code == 0, r.output
    cache = open_cache(trained / "f.h5")
    head = load_head(trained / "head")
    pre = head.preprocess
    x = torch.stack([pre.normalize(pre.resize(read_image(p))[None])[0] for p in _test_paths(folder_root, cache)])
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, json, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'fusion_cache':
            raise ImportError('fusion_cache is hidden in this test')
sys.meta_path.insert(0, Block())
import torch
try:
    import fusion_cache
    raise SystemExit('fusion_cache was importable')
except ImportError:
    pass
extra = {{"fusion_cache.json": ""}}
program = torch.export.load({str(tmp_path / 'model.pt2')!r}, extra_files=extra)
meta = json.loads(extra["fusion_cache.json"])
logits = program.module()(torch.load({str(tmp_path / 'x.pt')!r}))
torch.save(logits, {str(tmp_path / 'logits.pt')!r})
print(json.dumps(meta))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    meta = json.loads(p.stdout.strip().splitlines()[-1])
    assert meta["classes"] == ["cats", "dogs", "owls"] and meta["image_size"] == 32
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    exported = torch.load(tmp_path / "logits.pt").numpy()
    X, _ = cache.view("fused", "test")
    assert_features_close(exported, head.logits_from_features(X), FLOAT32, name="exported logits")


def test_wrong_weights_are_refused(trained, folder_root, tmp_path):
    torch.manual_seed(99)
    other = tmp_path / "other.pth"
    torch.save(calibrate_batchnorm(mobilenet_v2(weights=None), 32, seed=99).state_dict(), other)
    r = _run("predict", trained / "head", folder_root / "test", "--weights", other)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "are not the ones this head's features came from" in r.output and "pass --weights" in r.output


def test_corrupt_image_is_reported_not_fatal_unless_strict(trained, folder_root, weights_file, tmp_path):
    import shutil

    d = tmp_path / "imgs"
    shutil.copytree(folder_root / "test" / "cats", d)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "empty.jpg").write_bytes(b"")
    r = _run("predict", trained / "head", d, "--weights", weights_file, "--json")
    assert r.exit_code == 0, r.output
    assert "broken.png: cannot read" in r.output and "2 of 4 image(s) could not be read" in r.output
    r = _run("predict", trained / "head", d, "--weights", weights_file, "--strict")
    assert r.exit_code == 1 and "cannot read image" in r.output and "drop --strict" in r.output


def test_output_formats(trained, folder_root, weights_file):
    r = CliRunner().invoke(main, ["predict", str(trained / "head"), str(folder_root / "test"), "--weights",
                                  str(weights_file), "--json", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    items = json.loads(r.stdout)
    assert len(items) == 6
    for it in items:
        assert {"path", "class", "prob"} <= set(it) and it["class"] in ("cats", "dogs", "owls")
        assert 0 <= it["prob"] <= 1 and len(it["top"]) == 2 and it["top"][0] == [it["class"], it["prob"]]
    r = CliRunner().invoke(main, ["predict", str(trained / "head"), str(folder_root / "test" / "owls" / "000.png"),
                                  "--weights", str(weights_file)])
    fields = r.stdout.strip().split("\t")
    assert fields[0].endswith("000.png") and fields[1] in ("cats", "dogs", "owls") and 0 <= float(fields[2]) <= 1


def test_missing_head_dir(tmp_path):
    r = _run("predict", tmp_path / "nohead", tmp_path)
    assert r.exit_code == 1
    assert r.output == f"Error: no head.pt in {tmp_path / 'nohead'}; train one with `fusion-cache fit CACHE --out {tmp_path / 'nohead'}`\n"
