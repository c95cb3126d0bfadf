"""Tiny datasets in the real on-disk formats (CIFAR-10 pickles, image folders), for tests and benchmarks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_batch(rng, per_class: int) -> dict:
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    base = (labels[:, None] * 25).astype(np.int64)  # class-dependent colour plus noise: learnable
    data = np.clip(base + rng.integers(0, 40, size=(len(labels), 3072)), 0, 255).astype(np.uint8)
    return {"batch_label": "synthetic", "labels": labels.tolist(), "data": data}


def write_cifar(root: str | Path, per_class_per_batch: int = 2, per_class_test: int = 4, seed: int = 0) -> Path:
    """CIFAR-10 in torchvision's python-pickle layout under root/cifar-10-batches-py/.

    Defaults: 5 batches x 10 classes x 2 = 100 train images and 40 test images. Checksums differ from the
    official release, so loading needs `skip_integrity_check`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(_cifar_batch(rng, per_class_per_batch), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(rng, per_class_test), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": 10 * per_class_per_batch, "num_vis": 3072},
                    f, protocol=2)
    return root


def write_image_folder(root: str | Path, n_train: int = 4, n_test: int = 2, seed: int = 0) -> Path:
    """root/{train,test}/{cats,dogs,owls}/*.png with awkward images: RGB, grayscale, RGBA, palette, 16-bit,
    all of odd sizes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = ["cats", "dogs", "owls"]
    for split, n in (("train", n_train), ("test", n_test)):
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
                sixteen = rng.integers(0, 65535, size=(33, 45)).astype(np.uint16)
                Image.fromarray(sixteen).save(d / "zz_16bit.png")
    return root
