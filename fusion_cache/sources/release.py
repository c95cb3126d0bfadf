"""What the sources of official releases share (CIFAR-10, CIFAR-100, STL-10), with torchvision's names and
checksums: where a release is under --data-root (a folder holding its folder or archive, or either of them),
the download policy (only into a missing or empty folder), the checksum policy (a copy that differs is refused
unless --skip-integrity-check, which warns; an unreadable file fails either way), and CIFAR's python-pickle
batches, read from the folder or straight from the tarball."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FusionCacheError
from ..files import display_path
from .base import IntegrityWarning


@dataclass(frozen=True)
class Release:
    """One official release: its names, its download, and the policies every release source follows. A source
    module takes `detect`, `check_root` and `test_split` from it as they are."""

    name: str  # the registry name: cifar10
    title: str  # as messages name it: CIFAR-10
    tv: type  # torchvision's dataset class, whose attributes name the files and give their md5s
    fetch: Callable[[Path], object]  # downloads (and, where torchvision does, extracts) the release into a folder
    test_where: str  # where the test split is, as messages name it: "test batch"
    reads_archive: bool = True  # False: the archive must be extracted before it is read (STL-10's 2.6 GB)

    @property
    def folder(self) -> str:
        return self.tv.base_folder

    @property
    def tarball(self) -> str:
        return self.tv.filename

    def home(self, root: Path) -> Path:
        """The folder that holds the release: `root`, or its parent when `root` is the release's folder or
        archive."""
        if (root.name == self.folder and root.is_dir()) or (root.name == self.tarball and root.is_file()):
            return root.parent
        return root

    def detect(self, root: Path) -> str | None:
        """`root` holds the release's folder or archive, or is one of them."""
        root = self.home(root)
        if (root / self.folder).is_dir():
            return f"{self.title} ({self.folder}/)"
        if (root / self.tarball).is_file():
            return f"{self.title} ({self.tarball})"
        return None

    def check_root(self, root: Path) -> None:
        root = self.home(root)
        if os.path.exists(root) and not os.path.isdir(root):
            raise FusionCacheError(f"--data-root {display_path(root)} is a file; --dataset {self.name} reads a "
                                   "folder: pass a folder, or --dataset manifest for a CSV list of images")

    def test_split(self, root: Path) -> str | None:
        return self.test_where

    def ensure(self, root: Path, download: bool) -> None:
        """Make sure `root` holds the release's folder or archive: download it into a missing or empty folder
        when `download`; a folder that holds other files is never written to (hidden ones such as a
        repository's `data/.gitkeep` do not count)."""
        if (root / self.folder).is_dir() or (root / self.tarball).is_file():
            return
        if os.path.isdir(root) and any(not e.name.startswith(".") for e in os.scandir(root)):
            raise FusionCacheError(
                f"{self.title} not found in {display_path(root)}, which holds other files, so nothing is downloaded "
                f"into it; drop --dataset to read the folder as it is, or pass an empty or new --data-root to "
                f"download {self.title} there"
            )
        if not download:
            raise FusionCacheError(
                f"{self.title} not found under {root}/ (looked for {self.folder}/ and {self.tarball}); "
                "drop --no-download to fetch it, or point --data-root at a folder that holds it"
            )
        try:
            self.fetch(root)
        except Exception as e:
            by_hand = self.tarball if self.reads_archive else f"{self.folder}/ (tar xzf {self.tarball})"
            raise FusionCacheError(
                f"could not download {self.title} into {root}/ ({type(e).__name__}: {e}); "
                f"put {by_hand} there by hand and pass --no-download"
            ) from None

    def present(self, path: Path, folder: Path) -> Path:
        """`path`, a file of the release's `folder`; a missing one is an error that says how to restore it."""
        if not path.is_file():
            raise FusionCacheError(
                f"{path} is missing; restore it, or delete {folder} and run again to re-download {self.title}"
            )
        return path

    def integrity(self, bad: list[str], copy: Path, skip_integrity_check: bool) -> list[str]:
        """The integrity notes of the copy `copy`, whose files `bad` (as messages name them) differ from the
        release's checksums: none when none does; else refused unless `skip_integrity_check`, which warns."""
        if not bad:
            return []
        if not skip_integrity_check:
            raise FusionCacheError(
                f"{bad[0]} does not match the official {self.title} checksum; if you trust this local copy, "
                "pass --skip-integrity-check, otherwise delete it and re-download"
            )
        msg = f"using the local {self.title} copy {copy} although its checksums differ from the official release"
        warnings.warn(msg, IntegrityWarning, stacklevel=3)
        return [msg]


def digests(images: np.ndarray) -> list[str]:
    """Each image's sha256, for the leak report."""
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in images]


# ---------------------------------------------------------------------------------------------- CIFAR's pickles


def load_batches(release: Release, root: Path, split: str, labels_key: tuple[str, ...], classes_key: str,
                 download: bool, skip_integrity_check: bool) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64, classes, integrity notes) of one split of a CIFAR
    release, from `root/<folder>/`, or straight from `root/<tarball>`, checked against torchvision's checksums
    (`train_list`, `test_list`, `meta`, `tgz_md5`). The labels are a batch's first key of `labels_key` that it
    holds; the classes are the meta file's `classes_key`."""
    release.ensure(root, download)
    tv = release.tv
    folder = root / release.folder
    tarball = root / release.tarball
    files = tv.train_list if split == "train" else tv.test_list
    meta_name = tv.meta["filename"]
    wanted = [name for name, _ in files] + [meta_name]
    expected = {name: md5 for name, md5 in files} | {meta_name: tv.meta["md5"]}
    if folder.is_dir():
        blobs = {name: release.present(folder / name, folder).read_bytes() for name in wanted}
        where = {name: str(folder / name) for name in wanted}
        bad = [where[n] for n in wanted if hashlib.md5(blobs[n]).hexdigest() != expected[n]]
    else:
        md5_ok, blobs = _tar_contents(release, tarball)
        bad = [] if md5_ok else [str(tarball)]
        where = {name: f"{tarball}:{release.folder}/{name}" for name in wanted}
    notes = release.integrity(bad, folder if folder.is_dir() else tarball, skip_integrity_check)
    classes = _unpickle(release, blobs[meta_name], where[meta_name]).get(classes_key)
    if not isinstance(classes, (list, tuple)) or not classes:
        raise FusionCacheError(f"{where[meta_name]} holds no class names ({classes_key}); delete it and re-download")
    data, labels = [], []
    for name, _ in files:
        entry = _unpickle(release, blobs[name], where[name])
        try:
            arr = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            key = next((k for k in labels_key if k in entry), labels_key[-1])
            lab = np.asarray(entry[key], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise FusionCacheError(
                f"{where[name]} is not a {release.title} batch ({type(e).__name__}: {e}); delete it and re-download"
            ) from None
        if len(arr) != len(lab) or len(lab) == 0 or lab.min() < 0 or lab.max() >= len(classes):
            raise FusionCacheError(
                f"{where[name]} is corrupt ({len(arr)} images, {len(lab)} labels); delete it and re-download"
            )
        data.append(arr)
        labels.append(lab)
    return np.concatenate(data), np.concatenate(labels), list(classes), notes


_TAR_CACHE: dict = {}  # one tarball's members, so the train and test splits decompress it once


def _tar_contents(release: Release, tarball: Path) -> tuple[bool, dict[str, bytes]]:
    """(md5 matches the release, {member name: bytes}) for every batch in the tarball, read once per process for
    both splits. The md5 runs in a thread beside the decompression (both release the GIL)."""
    st = tarball.stat()
    key = (str(tarball.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _TAR_CACHE:
        tar_bytes = tarball.read_bytes()
        names = [n for n, _ in release.tv.train_list + release.tv.test_list] + [release.tv.meta["filename"]]
        with ThreadPoolExecutor(1) as pool:
            md5 = pool.submit(lambda: hashlib.md5(tar_bytes).hexdigest())
            members = _read_tar_members(release, tarball, tar_bytes, names)
            md5_ok = md5.result() == release.tv.tgz_md5
        _TAR_CACHE.clear()
        _TAR_CACHE[key] = (md5_ok, members)
    return _TAR_CACHE[key]


def _read_tar_members(release: Release, tarball: Path, tar_bytes: bytes, wanted: list[str]) -> dict[str, bytes]:
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
            for member in tar:
                folder, _, name = member.name.removeprefix("./").rpartition("/")
                if folder == release.folder and name in wanted and member.isfile():
                    out[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, Exception) as e:
        if isinstance(e, FusionCacheError):
            raise
        raise FusionCacheError(
            f"{tarball} is truncated or corrupt ({type(e).__name__}); delete it and download {release.title} again"
        ) from None
    missing = [n for n in wanted if n not in out]
    if missing:
        raise FusionCacheError(f"{tarball} lacks {', '.join(missing)}; delete it and download {release.title} again")
    return out


def _unpickle(release: Release, blob: bytes, where: str) -> dict:
    """A pickled batch: a dict whose keys (the release's Python 2 strings) come as str with latin1."""
    try:
        obj = pickle.loads(blob, encoding="latin1")
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise FusionCacheError(
            f"{where} is truncated or corrupt ({type(e).__name__}); delete it and download {release.title} again"
        ) from None
    if not isinstance(obj, dict):
        raise FusionCacheError(f"{where} is not a {release.title} pickle; delete it and download {release.title} again")
    return obj
