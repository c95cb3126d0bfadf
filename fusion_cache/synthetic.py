"""Tiny datasets in the real on-disk formats (CIFAR-10 pickles, image folders), and random weights calibrated to
real scale, for tests and benchmarks."""

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


def calibrate_batchnorm(model, image_size: int, seed: int = 0, batches: int = 1, batch_size: int = 16):
    """Set every BatchNorm's running statistics of a freshly initialised `model` from a forward pass over
    seeded random images, and return the model in eval mode.

    A random-init network keeps its BatchNorms at running mean 0, variance 1: in eval mode they do not
    normalize, and pooled features shrink with depth (MobileNetV2's: 7e-9 at features.17-18 at 48 px; an
    EfficientNet-B0's: 1e-14) or grow (a ResNet-50's: 30 at 32 px), so that a zeroed tap hides under any
    absolute tolerance. After calibration each BatchNorm normalizes what it actually receives, as a trained
    network's do, and the pooled features are of order 1 at every tap (max |f| 0.18 to 10.4 over every tap
    of every tested backbone on the tests' images).

    Each image is a random flat colour plus uniform noise of a random amplitude (from none to the full
    range), clipped to [0, 1] and normalized with ImageNet's mean and std as fusion-cache's preprocessing
    does: low- and high-contrast images alike, so that the synthetic data sets (a class colour plus noise)
    stay of order 1 too (pure noise calibrates for high contrast only: a timm EfficientNet-B0 then reaches
    1e4 on low-contrast images). Only the BatchNorms run in train mode (dropout and drop-path stay off),
    with momentum None (a cumulative average over the `batches` batches); their momentum is restored
    afterwards. A model without BatchNorm (a ViT, a ConvNeXt) is returned unchanged, in eval mode. One
    thread (restored afterwards): the pass takes 0.25 s or less for every tested backbone at 32 px, where
    several OpenMP threads on busy shared cores took 3.5 s.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return model
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    momenta = [m.momentum for m in norms]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for _ in range(batches):
                base = torch.rand(batch_size, 3, 1, 1, generator=gen)
                amplitude = torch.rand(batch_size, 1, 1, 1, generator=gen)
                noise = torch.rand(batch_size, 3, image_size, image_size, generator=gen) - 0.5
                x = (base + amplitude * noise).clamp(0, 1)
                model((x - mean) / std)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
        torch.set_num_threads(threads)
    return model


# ---------------------------------------------------------------------------------------------- containers
# The same image bytes in the containers that Hugging Face and WebDataset ship, for tests and the benchmark:
# `items` is a list of (class name, file name, image bytes), as `folder_items` reads an image folder.


def folder_items(folder: str | Path) -> list[tuple[str, str, bytes]]:
    """(class, file name, bytes) of every image of `folder/<class>/<image>`, in an image folder's listing order."""
    folder = Path(folder)
    return [(c.name, f.name, f.read_bytes()) for c in sorted(folder.iterdir()) if c.is_dir()
            for f in sorted(c.iterdir()) if f.is_file()]


def write_parquet(items, root: str | Path, split: str = "train", files: int = 1, class_label: bool = True,
                  names_as_labels: bool = False, row_group_size: int = 100, classes=None) -> list[Path]:
    """`items` as the Hugging Face Hub ships them: root/data/<split>-0000i-of-0000n.parquet, an `image` column
    of Image structs (bytes, path) and a `label` column; with `class_label`, the HF features in the schema's
    metadata name the classes (else the labels are the class indices, or with `names_as_labels` the names).
    Row groups of `row_group_size` rows, as `datasets` writes image datasets (100). `classes`: the ClassLabel
    names (default: the items' classes, sorted)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = list(classes) if classes is not None else sorted({c for c, _, _ in items})
    folder = Path(root) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    features = {"image": {"_type": "Image"},
                "label": {"_type": "ClassLabel", "names": classes} if class_label else
                {"_type": "Value", "dtype": "string" if names_as_labels else "int64"}}
    written = []
    for i in range(files):
        part = items[i::files] if files > 1 else items
        labels = [c if names_as_labels else classes.index(c) for c, _, _ in part]
        table = pa.table({"image": [{"bytes": data, "path": name} for _, name, data in part], "label": labels})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        path = folder / f"{split}-{i:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        written.append(path)
    return written


def write_shards(items, root: str | Path, split: str = "train", per_shard: int = 100, label: str = "cls",
                 classes=None) -> list[Path]:
    """`items` as WebDataset shards root/<split>-00000i.tar: per sample `<key>.<ext>` and its label, a `cls`
    member (the class index in `classes`, default the items' classes sorted) or, with label="json", a `json`
    member {"label": class name}."""
    import io
    import json
    import tarfile

    classes = list(classes) if classes is not None else sorted({c for c, _, _ in items})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for s, lo in enumerate(range(0, len(items), per_shard)):
        path = root / f"{split}-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k, (c, name, data) in enumerate(items[lo : lo + per_shard]):
                key = f"{lo + k:08d}"
                meta = str(classes.index(c)).encode() if label == "cls" else json.dumps({"label": c}).encode()
                for member, blob in ((f"{key}.{name.rsplit('.', 1)[-1].lower()}", data), (f"{key}.{label}", meta)):
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
        written.append(path)
    return written
