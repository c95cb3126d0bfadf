"""Tiny synthetic data in the real on-disk formats: CIFAR-10 pickles, PNG folders, a MobileNetV2 state_dict."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import mobilenet_v2

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS_TRAIN_BATCH = 2  # 5 batches x 10 classes x 2 = 100 train images
PER_CLASS_TEST = 4  # 40 test images
SMALL = 32  # image size used by the tests: MobileNetV2 runs at 32 px in milliseconds


def _cifar_batch(rng, per_class: int, label_offset: int = 0) -> dict:
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    # Class-dependent colour plus noise, so a head can learn something.
    base = (labels[:, None] * 25).astype(np.int64)
    data = np.clip(base + rng.integers(0, 40, size=(len(labels), 3072)), 0, 255).astype(np.uint8)
    return {"batch_label": "synthetic", "labels": labels.tolist(), "data": data}


def write_cifar(root: Path, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in torchvision's python-pickle layout (cifar-10-batches-py/)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(_cifar_batch(rng, PER_CLASS_TRAIN_BATCH), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(rng, PER_CLASS_TEST), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": 20, "num_vis": 3072}, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


def write_image_folder(root: Path, seed: int = 0) -> Path:
    """PNG folders with awkward images: grayscale, RGBA, palette, 16-bit, odd sizes."""
    rng = np.random.default_rng(seed)
    classes = ["cats", "dogs", "owls"]
    for split, n in (("train", 4), ("test", 2)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
                rgb = np.clip(ci * 80 + rng.integers(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8)
                kind = i % 4
                if kind == 0:
                    im = Image.fromarray(rgb)
                elif kind == 1:
                    im = Image.fromarray(rgb[..., 0])
                elif kind == 2:
                    alpha = rng.integers(0, 255, size=(h, w, 1)).astype(np.uint8)
                    im = Image.fromarray(np.concatenate([rgb, alpha], axis=2))
                else:
                    im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
                im.save(d / f"{i:03d}.png")
            if split == "train":
                sixteen = (rng.integers(0, 65535, size=(33, 45))).astype(np.uint16)
                Image.fromarray(sixteen).save(d / "zz_16bit.png")
    return root


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A random-init MobileNetV2 saved as a plain state_dict, as a user would save their own weights."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "mnv2-random.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, cifar_root, weights_file) -> Path:
    """A complete cache of the tiny CIFAR-10: 60 train and 20 test images at 48 px (resized), all 19 taps."""
    from fusion_cache.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    extract(ExtractConfig(out=out, data_root=cifar_root, train_size=60, test_size=20, weights=str(weights_file),
                          image_size=48, batch_size=16, download=False, skip_integrity_check=True,
                          progress=False))
    return out


REAL_DATA_ENV = "FUSION_CACHE_REAL_DATA"


def real_data() -> tuple[Path, Path] | None:
    """(folder with cifar-10-python.tar.gz, weights .pth) from $FUSION_CACHE_REAL_DATA, or None."""
    root = os.environ.get(REAL_DATA_ENV)
    if not root:
        return None
    root = Path(root)
    pths = sorted(root.glob("mobilenet_v2*.pth"))
    if not (root / "cifar-10-python.tar.gz").is_file() or not pths:
        return None
    return root, pths[0]


def write_synthetic_cache(path: Path, feats: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                          classes: list[str], complete: bool = True) -> Path:
    """A cache written through the real schema module, with features chosen by the test."""
    from fusion_cache.cache import CacheWriter, fingerprint

    taps = list(feats["train"])
    attrs = {"backbone": "mobilenet_v2", "weights": "synthetic", "weights_sha256": "0" * 64, "image_size": 32,
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": "none", "pool": "avg",
             "taps": taps, "dataset": "synthetic", "data_root": "", "classes": classes,
             "train_size": len(labels["train"]), "test_size": len(labels["test"]), "train_source_size": 0,
             "test_source_size": 0, "seed": 0, "dtype": "float32", "precision": "fp32", "integrity_checked": True,
             "versions": {}, "fingerprint": fingerprint({"synthetic": str(path)})}
    sizes = {s: len(labels[s]) for s in ("train", "test")}
    channels = {t: feats["train"][t].shape[1] for t in taps}
    with CacheWriter(path, attrs, sizes, channels, "float32") as w:
        for s in ("train", "test"):
            n = sizes[s]
            w.append(s, n, labels[s], np.arange(n), {t: feats[s][t] for t in taps})
        if complete:
            w.finish({"skipped": {}})
    return path


@pytest.fixture(scope="session")
def encoded_cache(tmp_path_factory) -> Path:
    """4 classes; the label is linearly encoded in features.13 only; features.3 and features.18 are noise."""
    rng = np.random.default_rng(0)
    feats, labels = {}, {}
    for split, n in (("train", 1000), ("test", 400)):
        y = rng.integers(0, 4, size=n)
        code = np.zeros((n, 96), np.float32)
        code[np.arange(n), y] = 4.0
        feats[split] = {
            "features.3": rng.normal(size=(n, 24)).astype(np.float32),
            "features.13": (code + rng.normal(size=(n, 96))).astype(np.float32),
            "features.18": rng.normal(size=(n, 64)).astype(np.float32),  # narrower than the real 1280: no overfit
        }
        labels[split] = y.astype(np.int64)
    return write_synthetic_cache(tmp_path_factory.mktemp("enc") / "encoded.h5", feats, labels, ["a", "b", "c", "d"])
