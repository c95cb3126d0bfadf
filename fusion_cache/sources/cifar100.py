"""CIFAR-100 in its release format: `cifar-100-python/{train,test,meta}` or `cifar-100-python.tar.gz` (read
straight from the tarball), checked against the release's checksums, downloaded only into a missing or empty
folder (the shared logic: `release.py`). `--label-set fine` (the default) labels the 100 classes, `coarse` the 20
superclasses; the label set is part of each split's identity, so a cache of one is never reused for the other."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torchvision.datasets import CIFAR100

from ..errors import FusionCacheError
from . import release
from .base import Listing, Source

NAME = "cifar100"
RELEASE = release.Release(NAME, "CIFAR-100", CIFAR100,
                          lambda root: CIFAR100(str(root), train=True, download=True), "test batch")
LABEL_SETS = {"fine": ("fine_labels", CIFAR100.meta["key"]), "coarse": ("coarse_labels", "coarse_label_names")}
detect = RELEASE.detect  # root holds CIFAR-100's folder or tarball, or is one of them
check_root = RELEASE.check_root
test_split = RELEASE.test_split


def load(root: Path, options) -> Listing:
    """Both splits (`options`: a `sources.LoadOptions`, whose `label_set` is fine, coarse or None for fine)."""
    check_root(root)
    label_set = options.label_set or "fine"
    if label_set not in LABEL_SETS:
        raise FusionCacheError(f"unknown --label-set {label_set!r}; use fine or coarse")
    root = RELEASE.home(root)
    given = {s: load_split(root, s, label_set, options.download, options.skip_integrity_check)
             for s in ("train", "test")}
    return Listing(NAME, given, {"train": "train batch", "test": "test batch"}, downloadable=True)


def load_split(root: Path, split: str, label_set: str, download: bool, skip_integrity_check: bool) -> Source:
    labels_key, classes_key = LABEL_SETS[label_set]
    images, labels, classes, notes = release.load_batches(RELEASE, root, split, (labels_key,), classes_key,
                                                          download, skip_integrity_check)
    identity = hashlib.sha256(f"{NAME} {label_set}\n".encode() + images.tobytes() + labels.tobytes()).hexdigest()
    return Source(NAME, split, classes, labels, identity, images=images, notes=notes, digests=release.digests(images))
