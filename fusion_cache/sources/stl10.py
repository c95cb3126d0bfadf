"""STL-10 in its binary release format: `stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin,
class_names.txt}`, checked against the release's checksums, downloaded (and extracted, as torchvision does) only
into a missing or empty folder (the shared logic: `release.py`).

The labelled splits only: train (5,000 images) and test (8,000), 96 x 96 px. The 100,000 unlabelled images
(`unlabeled_X.bin`) are never read, so torchvision's `unlabeled` and `train+unlabeled` splits are out of scope,
as are its ten train folds (`fold_indices.txt`). The archive `stl10_binary.tar.gz` is recognized and downloaded
but not read (2.6 GB of gzip, mostly the unlabelled images): extract it first.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from torchvision.datasets import STL10
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import FusionCacheError
from ..files import display_path
from . import release
from .base import Listing, Source

NAME = "stl10"
SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE  # 27648: one image, channel by channel, each channel column by column


def _fetch(root: Path) -> None:
    download_and_extract_archive(STL10.url, str(root), filename=STL10.filename, md5=STL10.tgz_md5)


RELEASE = release.Release(NAME, "STL-10", STL10, _fetch, STL10.test_list[0][0], reads_archive=False)
detect = RELEASE.detect  # root holds STL-10's folder or archive, or is one of them
check_root = RELEASE.check_root
test_split = RELEASE.test_split


def files(split: str) -> tuple[list, list]:
    """([images file, md5], [labels file, md5]) of a labelled split, as torchvision lists them."""
    listed = STL10.train_list if split == "train" else STL10.test_list
    return listed[0], listed[1]


def load(root: Path, options) -> Listing:
    """Both labelled splits (`options`: a `sources.LoadOptions`)."""
    check_root(root)
    root = RELEASE.home(root)
    RELEASE.ensure(root, options.download)
    folder = root / RELEASE.folder
    if not folder.is_dir():
        raise FusionCacheError(f"{display_path(root)} holds {RELEASE.tarball} but not {RELEASE.folder}/, and the "
                               f"archive is not read as it is; extract it there (tar xzf {RELEASE.tarball}) and run "
                               "again")
    classes = _classes(RELEASE.present(folder / STL10.class_names_file, folder))
    given = {s: load_split(folder, s, classes, options.skip_integrity_check) for s in ("train", "test")}
    return Listing(NAME, given, {s: files(s)[0][0] for s in given}, downloadable=True)


def load_split(folder: Path, split: str, classes: list[str], skip_integrity_check: bool) -> Source:
    (x_name, x_md5), (y_name, y_md5) = files(split)
    x_path, y_path = (RELEASE.present(folder / n, folder) for n in (x_name, y_name))
    bad = [str(p) for p, md5 in ((x_path, x_md5), (y_path, y_md5)) if _md5(p) != md5]
    notes = RELEASE.integrity(bad, folder, skip_integrity_check)
    n_bytes = os.path.getsize(x_path)
    if n_bytes == 0 or n_bytes % IMAGE_BYTES:
        raise FusionCacheError(f"{x_path} is truncated ({n_bytes} bytes, not a whole number of {SIZE} x {SIZE} "
                               f"images of {IMAGE_BYTES} bytes); delete it and re-download")
    # the release stores each channel column by column (MATLAB's order): transposed to rows, as torchvision does
    stored = np.memmap(x_path, dtype=np.uint8, mode="r").reshape(-1, 3, SIZE, SIZE)
    images = np.ascontiguousarray(stored.transpose(0, 1, 3, 2))  # one copy, in memory
    del stored
    raw = np.fromfile(y_path, dtype=np.uint8)
    if len(raw) != len(images):
        raise FusionCacheError(f"{y_path} holds {len(raw)} labels for the {len(images)} images of {x_name}; "
                               "delete both and re-download")
    outside = raw[(raw < 1) | (raw > len(classes))]
    if len(outside):
        raise FusionCacheError(f"{y_path} holds label {outside[0]}, and the labels are 1 to {len(classes)}, one per "
                               f"class in {STL10.class_names_file}; delete it and re-download")
    labels = raw.astype(np.int64) - 1  # 1-based in the release
    identity = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Source(NAME, split, classes, labels, identity, images=images, notes=notes, digests=release.digests(images))


def _classes(path: Path) -> list[str]:
    """The class names, one a line (torchvision's `splitlines`; blank lines at the end left out)."""
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FusionCacheError(f"cannot read {path} ({type(e).__name__}); delete it and re-download") from None
    while names and not names[-1].strip():
        names.pop()
    if not names or any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise FusionCacheError(f"{path} does not list the class names one a line (empty, a blank line or a name "
                               "twice); delete it and re-download")
    return names


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()
