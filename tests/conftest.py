"""Tiny synthetic data in the real on-disk formats: CIFAR-10 pickles, PNG folders, a MobileNetV2 state_dict."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v2

from fusion_cache.synthetic import calibrate_batchnorm, write_cifar, write_image_folder

SMALL = 32  # image size used by the tests: MobileNetV2 runs at 32 px in milliseconds


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module that asks for it: 2 CPUs. Its GCS address lets a subprocess join."""
    import logging

    import ray

    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield info.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A random-init MobileNetV2 saved as a plain state_dict, as a user would save their own weights; its
    BatchNorm statistics calibrated on random images, so that every tap's pooled features are of order 1 (max
    |f| 1.8 to 4.1 at 48 px; uncalibrated they decay to 7e-9 at features.17-18, below any absolute tolerance)."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "mnv2-random.pth"
    torch.save(calibrate_batchnorm(mobilenet_v2(weights=None), 48, seed=1234).state_dict(), path)
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
    from fusion_cache.cache import CacheMeta, CacheWriter

    taps = list(feats["train"])
    sizes = {s: len(labels[s]) for s in ("train", "test")}
    meta = CacheMeta.create(
        backbone="mobilenet_v2", weights_sha256="0" * 64, image_size=32, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), resize="none", pool="avg", taps=tuple(taps), dataset="synthetic",
        data_identity={"synthetic": str(path)}, subset={}, dtype="float32", precision="fp32", weights="synthetic",
        data_root="", classes=tuple(classes), train_size=sizes["train"], test_size=sizes["test"],
        train_source_size=sizes["train"], test_source_size=sizes["test"], seed=0, integrity_checked=True, versions={},
    )
    with CacheWriter(path, meta) as w:
        for s in ("train", "test"):
            n = sizes[s]
            w.append(s, n, labels[s], np.arange(n), {t: feats[s][t] for t in taps})
        if complete:
            w.finish(skipped={})
    return path


@pytest.fixture(scope="session")
def encoded_cache(tmp_path_factory) -> Path:
    """4 classes; the label is linearly encoded in features.13 only; features.3 and features.18 are noise."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 1280))
    feats, labels = {}, {}
    for split, n in (("train", 1000), ("test", 400)):
        y = rng.integers(0, 4, size=n)
        code = np.zeros((n, 96), np.float32)
        code[np.arange(n), y] = 4.0
        feats[split] = {
            "features.3": rng.normal(size=(n, 24)).astype(np.float32),
            "features.13": (code + rng.normal(size=(n, 96))).astype(np.float32),
            # the real width, but noise of rank 16: no label information, and too few directions to overfit
            "features.18": (rng.normal(size=(n, 16)) @ mix).astype(np.float32),
        }
        labels[split] = y.astype(np.int64)
    return write_synthetic_cache(tmp_path_factory.mktemp("enc") / "encoded.h5", feats, labels, ["a", "b", "c", "d"])


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package), for tests of its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fusion_cache_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
