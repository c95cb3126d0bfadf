"""CIFAR-10 in its release format: `cifar-10-batches-py/` or `cifar-10-python.tar.gz`, checked against the release's
checksums, downloaded only into a missing or empty folder."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

from ..errors import FusionCacheError
from ..files import display_path
from .base import IntegrityWarning, Listing, Source

NAME = "cifar10"


def home(root: Path) -> Path:
    """The folder that holds CIFAR-10: `root`, or its parent when `root` is the batches folder or the tarball."""
    if (root.name == CIFAR10.base_folder and root.is_dir()) or (root.name == CIFAR10.filename and root.is_file()):
        return root.parent
    return root


def detect(root: Path) -> str | None:
    """`root` holds CIFAR-10's folder or tarball, or is one of them."""
    root = home(root)
    if (root / CIFAR10.base_folder).is_dir():
        return f"CIFAR-10 ({CIFAR10.base_folder}/)"
    if (root / CIFAR10.filename).is_file():
        return f"CIFAR-10 ({CIFAR10.filename})"
    return None


def check_root(root: Path) -> None:
    root = home(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise FusionCacheError(f"--data-root {display_path(root)} is a file; --dataset cifar10 reads a folder: pass "
                               "a folder, or --dataset manifest for a CSV list of images")


def test_split(root: Path) -> str | None:
    return "test batch"


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
    root = Path(root)
    folder = root / CIFAR10.base_folder
    tarball = root / CIFAR10.filename
    if not folder.is_dir() and not tarball.is_file():
        if os.path.isdir(root) and any(os.scandir(root)):
            raise FusionCacheError(
                f"CIFAR-10 not found in {display_path(root)}, which holds other files, so nothing is downloaded into "
                f"it; drop --dataset to read the folder as it is, or pass an empty or new --data-root to download "
                "CIFAR-10 there"
            )
        if not download:
            raise FusionCacheError(
                f"CIFAR-10 not found under {root}/ (looked for {CIFAR10.base_folder}/ and {CIFAR10.filename}); "
                "drop --no-download to fetch it, or point --data-root at a folder that holds it"
            )
        try:
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:
            raise FusionCacheError(
                f"could not download CIFAR-10 into {root}/ ({type(e).__name__}: {e}); "
                f"put {CIFAR10.filename} there by hand and pass --no-download"
            ) from None
    files = CIFAR10.train_list if split == "train" else CIFAR10.test_list
    wanted = [name for name, _ in files] + [CIFAR10.meta["filename"]]
    expected = {name: md5 for name, md5 in files} | {CIFAR10.meta["filename"]: CIFAR10.meta["md5"]}
    if folder.is_dir():
        blobs = {}
        for name in wanted:
            p = folder / name
            if not p.is_file():
                raise FusionCacheError(
                    f"{p} is missing; restore it, or delete {folder} and run again to re-download CIFAR-10"
                )
            blobs[name] = p.read_bytes()
        where = {name: str(folder / name) for name in wanted}
        bad = [n for n in wanted if hashlib.md5(blobs[n]).hexdigest() != expected[n]]
    else:
        md5_ok, blobs = _tar_contents(tarball)
        bad = [] if md5_ok else [CIFAR10.filename]
        where = {name: f"{tarball}:{CIFAR10.base_folder}/{name}" for name in wanted}
    notes = []
    if bad:
        shown = where[bad[0]] if bad[0] in where else str(tarball)
        if not skip_integrity_check:
            raise FusionCacheError(
                f"{shown} does not match the official CIFAR-10 checksum; if you trust this local copy, "
                "pass --skip-integrity-check, otherwise delete it and re-download"
            )
        copy = folder if folder.is_dir() else tarball
        msg = f"using the local CIFAR-10 copy {copy} although its checksums differ from the official release"
        warnings.warn(msg, IntegrityWarning, stacklevel=2)
        notes.append(msg)
    classes = _unpickle(blobs[CIFAR10.meta["filename"]], where[CIFAR10.meta["filename"]])[CIFAR10.meta["key"]]
    data, labels = [], []
    for name, _ in files:
        entry = _unpickle(blobs[name], where[name])
        try:
            arr = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise FusionCacheError(
                f"{where[name]} is not a CIFAR-10 batch ({type(e).__name__}: {e}); delete it and re-download"
            ) from None
        if len(arr) != len(lab) or len(lab) == 0 or lab.min() < 0 or lab.max() >= len(classes):
            raise FusionCacheError(
                f"{where[name]} is corrupt ({len(arr)} images, {len(lab)} labels); delete it and re-download"
            )
        data.append(arr)
        labels.append(lab)
    images = np.concatenate(data)
    labels_all = np.concatenate(labels)
    identity = hashlib.sha256(images.tobytes() + labels_all.tobytes()).hexdigest()
    digests = [hashlib.sha256(image.tobytes()).hexdigest() for image in images]  # for the leak report
    return Source("cifar10", split, list(classes), labels_all, identity, images=images, notes=notes, digests=digests)


_TAR_CACHE: dict = {}  # one tarball's members, so the train and test splits decompress it once


def _tar_contents(tarball: Path) -> tuple[bool, dict[str, bytes]]:
    """(md5 matches the release, {member name: bytes}) for every CIFAR-10 batch in the tarball, read once per
    process for both splits. The md5 runs in a thread beside the decompression (both release the GIL)."""
    st = tarball.stat()
    key = (str(tarball.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _TAR_CACHE:
        tar_bytes = tarball.read_bytes()
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        with ThreadPoolExecutor(1) as pool:
            md5 = pool.submit(lambda: hashlib.md5(tar_bytes).hexdigest())
            members = _read_tar_members(tarball, tar_bytes, names)
            md5_ok = md5.result() == CIFAR10.tgz_md5
        _TAR_CACHE.clear()
        _TAR_CACHE[key] = (md5_ok, members)
    return _TAR_CACHE[key]


def _read_tar_members(tarball: Path, tar_bytes: bytes, wanted: list[str]) -> dict[str, bytes]:
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if name in wanted and member.isfile():
                    out[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, Exception) as e:
        if isinstance(e, FusionCacheError):
            raise
        raise FusionCacheError(
            f"{tarball} is truncated or corrupt ({type(e).__name__}); delete it and download CIFAR-10 again"
        ) from None
    missing = [n for n in wanted if n not in out]
    if missing:
        raise FusionCacheError(f"{tarball} lacks {', '.join(missing)}; delete it and download CIFAR-10 again")
    return out


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = pickle.loads(blob, encoding="latin1")
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise FusionCacheError(
            f"{where} is truncated or corrupt ({type(e).__name__}); delete it and download CIFAR-10 again"
        ) from None
    if not isinstance(obj, dict):
        raise FusionCacheError(f"{where} is not a CIFAR-10 pickle; delete it and download CIFAR-10 again")
    return obj
