"""CIFAR-10 in its release format: `cifar-10-batches-py/` or `cifar-10-python.tar.gz`, checked against the release's
checksums, downloaded only into a missing or empty folder (the shared logic: `release.py`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torchvision.datasets import CIFAR10

from . import release
from .base import Listing, Source

NAME = "cifar10"
RELEASE = release.Release(NAME, "CIFAR-10", CIFAR10, lambda root: CIFAR10(str(root), train=True, download=True),
                          "test batch")
home = RELEASE.home  # the folder that holds CIFAR-10: root, or its parent when root is the batches folder or tarball
detect = RELEASE.detect  # root holds CIFAR-10's folder or tarball, or is one of them
check_root = RELEASE.check_root
test_split = RELEASE.test_split


def load(root: Path, options) -> Listing:
    """Both splits (`options`: a `sources.LoadOptions`); the train split first, so a download happens once."""
    check_root(root)
    root = home(root)
    given = {s: load_cifar10(root, s, options.download, options.skip_integrity_check) for s in ("train", "test")}
    return Listing(NAME, given, {"train": "train batches", "test": "test batch"}, downloadable=True)


def load_cifar10(root: str | Path, split: str, download: bool, skip_integrity_check: bool) -> Source:
    """CIFAR-10 from `root/cifar-10-batches-py/`, or straight from `root/cifar-10-python.tar.gz`.

    Checksums are torchvision's (`CIFAR10.train_list`, `.test_list`, `.tgz_md5`). A copy that differs is
    refused unless `skip_integrity_check`, which warns instead; an unreadable file fails either way.
    """
    images, labels, classes, notes = release.load_batches(RELEASE, Path(root), split, ("labels", "fine_labels"),
                                                          CIFAR10.meta["key"], download, skip_integrity_check)
    identity = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Source(NAME, split, classes, labels, identity, images=images, notes=notes, digests=release.digests(images))
