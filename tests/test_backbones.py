"""Every tested backbone end to end: extract -> fit -> predict -> export on a tiny image folder, random weights
(BatchNorm statistics calibrated, so every tap is of order 1) saved to a file; the cached `late` vector
against an independent forward (a hook on the model's final nn.Linear, written here) at the vector's own
scale, the exported program against the head on the cached features; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from fusion_cache.backbones import TESTED, check_case_study, resolve, tap_table
from fusion_cache.cache import open_cache
from fusion_cache.headfile import load_head
from fusion_cache.synthetic import calibrate_batchnorm
from fusion_cache.taps import MOBILENET_V2

from .features import FLOAT32, assert_features_close, assert_order_one
from .hostile import clean_failure, run, snapshot


def _size(name: str) -> int:
    """The smallest size each model takes: 32 px for CNNs, the fixed 224 of a ViT's patch grid."""
    return 224 if "vit" in name or "deit" in name else 32


def _reference_model(name: str) -> nn.Module:
    """The model as its library builds it, seeded random weights, BatchNorm statistics calibrated on random
    images at the test's size (max |f| 0.18 to 10.4 over every tap of every backbone; uncalibrated,
    MobileNets' and EfficientNets' deep taps fall to 1e-9 and below). No fusion-cache code involved but
    that calibration (`fusion_cache.synthetic`, which the extraction never calls)."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    return calibrate_batchnorm(model, _size(name), seed=0)


def _reference_preprocessing(name: str, model: nn.Module) -> tuple[list[float], list[float], v2.InterpolationMode]:
    """Mean, std and interpolation as the library states them for the model's default weights."""
    if name.startswith("timm:"):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        modes = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}
        return list(cfg["mean"]), list(cfg["std"]), modes[cfg["interpolation"]]
    import torchvision

    tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return list(tf.mean), list(tf.std), tf.interpolation


def _linear_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's final nn.Linear receives, caught by a forward pre-hook."""
    final = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    caught = []
    handle = final.register_forward_pre_hook(lambda mod, args: caught.append(args[0].detach().flatten(1)))
    with torch.no_grad():
        model(x)
    handle.remove()
    return caught[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """2 classes x (2 train + 1 test) RGB PNGs of odd sizes: 4 train and 2 test images."""
    root = tmp_path_factory.mktemp("bb-images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for ci, c in enumerate(("ants", "bees")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
                px = np.clip(ci * 90 + rng.integers(0, 120, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


def _save_weights(name: str, model: nn.Module, folder: Path) -> Path:
    """The model's weights in a file, as a user saves them: timm's as .safetensors, torchvision's as .pth."""
    if name.startswith("timm:"):
        from safetensors.torch import save_file

        path = folder / "weights.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = folder / "weights.pth"
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("name", TESTED)
def test_extract_fit_predict_export(name, images, tmp_path):
    model = _reference_model(name)
    weights = _save_weights(name, model, tmp_path)
    size = _size(name)
    cache_path = tmp_path / "c.h5"
    r = run("extract", "--backbone", name, "--out", cache_path, "--dataset", "imagefolder", "--data-root", images,
            "--train-size", "all", "--test-size", "all", "--weights", weights, "--image-size", size, "--workers", 0,
            "--batch-size", 4, "--no-progress")
    assert r.exit_code == 0, r.output
    cache = open_cache(cache_path)
    table = tap_table(name)
    assert cache.meta.backbone == name and cache.meta.tap_table == table.to_json()
    assert cache.meta.library == resolve(name).library and cache.meta.library_version
    assert cache.taps == list(table.names)
    late = table.views["late"][0]

    # the cached late vector = what the final nn.Linear of the model, as its library runs it, receives
    mean, std, mode = _reference_preprocessing(name, model)
    assert (list(cache.meta.mean), list(cache.meta.std), cache.meta.interpolation) == (mean, std, mode.value)
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop(size),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    xs = {}
    for split in ("train", "test"):
        samples = ImageFolder(str(images / split)).samples
        paths = [Path(samples[i][0]) for i in cache.indices(split)]
        xs[split] = (paths, torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]))
        ref = _linear_input(model, xs[split][1]).numpy()
        got = cache.features(late, split)
        # at the vector's own scale: a zeroed or rescaled late tap fails (a cosine sees neither)
        assert_features_close(got, ref, FLOAT32, name=f"{name} {late} {split}")
        for tap in cache.taps:  # the test weights are at a real scale at every tap, so nothing hides in rounding
            assert_order_one(cache.features(tap, split), name=f"{name} {tap} {split}")

    # fit, then predict and the exported program agree with the head on the cached features
    r = run("fit", cache_path, "--features", "late", "--standardize", "--epochs", 2, "--out", tmp_path / "head")
    assert r.exit_code == 0, r.output
    head = load_head(tmp_path / "head")
    X, _ = cache.view("late", "test")
    expected = head.logits_from_features(X)
    r = run("predict", tmp_path / "head", *xs["test"][0], "--weights", weights, "--json", "--top-k", 2)
    assert r.exit_code == 0, r.output
    probs = np.exp(expected - expected.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for item, p in zip(json.loads(r.stdout), probs):  # predict's probabilities = softmax of the cached head's logits
        assert dict(item["top"]) == pytest.approx(dict(zip(head.classes, p.tolist())), abs=1e-5)
    r = run("export", tmp_path / "head", "--out", tmp_path / "model.pt2", "--weights", weights)
    assert r.exit_code == 0, r.output
    extra = {"fusion_cache.json": ""}
    program = torch.export.load(str(tmp_path / "model.pt2"), extra_files=extra)
    meta = json.loads(extra["fusion_cache.json"])
    assert meta["backbone"] == name and meta["image_size"] == size and meta["interpolation"] == mode.value
    with torch.no_grad():
        exported = program.module()(xs["test"][1]).numpy()
    assert_features_close(exported, expected, FLOAT32, name=f"{name} exported logits")


# ---------------------------------------------------------------------------------------------- tap tables


def test_traced_mobilenet_v2_table_is_the_case_studys():
    check_case_study()
    assert tap_table("mobilenet_v2") == MOBILENET_V2
    assert MOBILENET_V2.all_views["fused"] == ("features.13", "features.18")


@pytest.mark.parametrize("name, n_taps, early, late, pool", [
    ("resnet50", 17, "layer3.5", "layer4.2", "avg"),  # maxpool stem + 16 bottlenecks
    ("mobilenet_v3_large", 18, "features.12", "pre_logits", "avg"),  # its classifier has a hidden layer
    ("convnext_tiny", 20, "features.5.8", "pre_logits", "avg"),  # stem + 18 blocks + normalized pooled map
    ("vit_b_16", 13, "encoder.layers.encoder_layer_5", "pre_logits", "cls"),  # 12 blocks + the class token
    ("timm:efficientnet_b0", 17, "blocks.4.2", "bn2", "avg"),
    ("timm:vit_small_patch16_224", 13, "blocks.5", "pre_logits", "cls"),
])
def test_tables_have_one_tap_per_block_and_the_views(name, n_taps, early, late, pool):
    t = tap_table(name)
    assert len(t.taps) == n_taps and t.views["early"] == (early,) and t.views["late"] == (late,)
    assert t.default_pool == pool and t.taps[-1].depth == 1.0
    assert [x.depth for x in t.taps] == sorted(x.depth for x in t.taps)


@pytest.mark.parametrize("name", ["resnet18", "timm:deit_tiny_patch16_224"])
def test_declared_channels_and_strides_match_the_model(name):
    """The table is read on meta tensors; a real forward at 224 px gives the same widths and strides."""
    from torchvision.models.feature_extraction import create_feature_extractor

    t = tap_table(name)
    bb = resolve(name)
    torch.manual_seed(0)
    model = bb.create().eval()
    body = create_feature_extractor(model, {t.node(x.name): x.name for x in t.taps}, tracer_kwargs=bb.tracer_kwargs)
    with torch.no_grad():
        out = body(torch.randn(1, 3, 224, 224))
    for tap in t.taps:
        f = out[tap.name]
        if tap.kind == "map":
            assert f.shape[1] == tap.channels and 224 // f.shape[-1] == tap.reduction, tap
        else:
            assert f.shape[-1] == tap.channels, tap


def test_taps_and_models_commands():
    r = run("taps", "--backbone", "timm:vit_small_patch16_224")
    assert r.exit_code == 0, r.output
    assert "blocks.11" in r.output and "pre_logits" in r.output and "pools: cls, mean, clsmean (default cls)" in r.output
    r = run("taps")
    assert r.exit_code == 0 and "features.18" in r.output and "fused  features.13 + features.18" in r.output
    r = run("models")
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line.split() for line in r.output.splitlines()[1:-1]}
    assert set(lines) == set(TESTED)
    assert lines["mobilenet_v2"][2] == "19" and lines["resnet50"][2] == "17" and lines["vit_b_16"][2] == "13"


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    import torchvision

    path = tmp_path_factory.mktemp("bb-w") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _extract_args(out, images, *extra):
    return ("extract", "--out", out, "--dataset", "imagefolder", "--data-root", images, "--train-size", "all",
            "--test-size", "all", "--workers", 0, "--no-progress", *extra)


@pytest.mark.parametrize("extra, fragment", [
    (("--backbone", "nope_net"), "unknown backbone 'nope_net'; tested: mobilenet_v2, mobilenet_v3_large, resnet18"),
    (("--backbone", "timm:nope_net"), "timm has no model 'nope_net'"),
    (("--backbone", "vgg16", "--weights", "random"), "vgg16 cannot be tapped: it has no residual blocks"),
    (("--backbone", "resnet50", "--weights", "W"), "does not hold torchvision resnet50 weights"),
    (("--backbone", "vit_b_16", "--weights", "random", "--image-size", 64),
     "vit_b_16 takes 224 px images only (its patch grid is fixed: 14 x 14 patches of 16 px)"),
    (("--backbone", "resnet18", "--weights", "W", "--taps", "features.13"),
     "unknown tap 'features.13'; valid taps of resnet18 are maxpool ... layer4.1"),
    (("--backbone", "resnet18", "--weights", "W", "--pool", "cls"), "--pool cls does not fit resnet18"),
    (("--weights", "W"), "does not hold torchvision MobileNetV2 (width 1.0) weights"),
])
def test_bad_backbone_input_is_one_line_and_writes_nothing(extra, fragment, images, resnet18_weights, tmp_path):
    extra = tuple(resnet18_weights if a == "W" else a for a in extra)
    before = snapshot(tmp_path, images)
    r = run(*_extract_args(tmp_path / "c.h5", images, *extra))
    problem = clean_failure(r, fragment)
    assert problem is None, problem
    assert r.exit_code == 1
    assert snapshot(tmp_path, images) == before


def test_safetensors_file_that_is_not_one(images, tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    r = run(*_extract_args(tmp_path / "c.h5", images, "--backbone", "timm:resnet50", "--weights", bad))
    assert clean_failure(r, "is not a readable safetensors file") is None, r.output
    assert not (tmp_path / "c.h5").exists()


# ---------------------------------------------------------------------------------------------- schema-2 caches


def _as_schema_2(path: Path, **edit) -> None:
    """Rewrite a cache's attributes as a schema-2 fusion-cache wrote them: no library, library_version,
    interpolation or tap_table, and the schema-2 fingerprint (over the fields schema 2 had)."""
    import dataclasses

    import h5py

    meta = dataclasses.replace(open_cache(path).meta, schema_version=2, **edit)
    with h5py.File(path, "r+") as f:
        for name in ("library", "library_version", "interpolation", "tap_table"):
            if name in f.attrs:
                del f.attrs[name]
        f.attrs["schema_version"] = 2
        f.attrs["backbone"] = meta.backbone
        f.attrs["fingerprint"] = meta.compute_fingerprint()


def test_schema_2_caches_open_work_and_are_reused(tmp_path, cifar_root, weights_file):
    import shutil

    from fusion_cache.extract import ExtractConfig, extract

    cfg = ExtractConfig(out=tmp_path / "c.h5", data_root=cifar_root, train_size=20, test_size=10,
                        weights=str(weights_file), image_size=32, batch_size=8, download=False,
                        skip_integrity_check=True, progress=False)
    extract(cfg)
    fresh = open_cache(tmp_path / "c.h5")
    _as_schema_2(tmp_path / "c.h5")
    old = open_cache(tmp_path / "c.h5")
    assert old.meta.schema_version == 2 and old.table == MOBILENET_V2 and old.meta.library == "torchvision"
    assert old.fingerprint != fresh.fingerprint and old.meta.compute_fingerprint() == old.fingerprint
    np.testing.assert_array_equal(old.view("fused", "test")[0], fresh.view("fused", "test")[0])
    r = run("fit", tmp_path / "c.h5", "--features", "fused", "--out", tmp_path / "head")
    assert r.exit_code == 0, r.output
    r = run("export", tmp_path / "head", "--out", tmp_path / "m.pt2", "--weights", weights_file)
    assert r.exit_code == 0, r.output
    before = (tmp_path / "c.h5").stat().st_mtime_ns
    assert extract(cfg).reused and (tmp_path / "c.h5").stat().st_mtime_ns == before  # not rebuilt
    shutil.copy(tmp_path / "c.h5", tmp_path / "d.h5")
    _as_schema_2(tmp_path / "d.h5", backbone="resnet50")
    r = run("info", tmp_path / "d.h5")
    assert clean_failure(r, "a schema-2 cache can only be mobilenet_v2") is None, r.output
