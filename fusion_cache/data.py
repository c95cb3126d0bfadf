"""Image sources (CIFAR-10 and image folders) and the class-stratified subset sampler."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from .errors import FusionCacheError

SPLITS = ("train", "test")
PAPER_SIZES = {"train": 5000, "test": 1000}  # the case study's subset


class IntegrityWarning(UserWarning):
    """A local dataset copy was used although its checksums differ from the official release."""


@dataclass
class Source:
    """One split of a dataset: labels for every item, and a way to get uint8 (3, H, W) images by position."""

    dataset: str
    split: str
    classes: list[str]
    labels: np.ndarray  # (N,) int64, for the whole split
    identity: str  # hash of what the items are (pixels or file list); part of the cache fingerprint
    images: np.ndarray | None = None  # (N, 3, 32, 32) uint8 for in-memory datasets
    paths: list[str] | None = None  # for image folders, relative to the split folder
    root: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        """The source image at `index` as uint8 (3, H, W) RGB; raises BadImage for undecodable files."""
        if self.images is not None:
            return torch.from_numpy(self.images[index])
        return read_image(self.root / self.paths[index])


# ---------------------------------------------------------------------------------------------- CIFAR-10


def load_cifar10(root: str | Path, split: str, download: bool, skip_integrity_check: bool) -> Source:
    """CIFAR-10 from `root/cifar-10-batches-py/`, or straight from `root/cifar-10-python.tar.gz`.

    Checksums are torchvision's (`CIFAR10.train_list`, `.test_list`, `.tgz_md5`). A copy that differs is
    refused unless `skip_integrity_check`, which warns instead; an unreadable file fails either way.
    """
    root = Path(root)
    folder = root / CIFAR10.base_folder
    tarball = root / CIFAR10.filename
    if not folder.is_dir() and not tarball.is_file():
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
    return Source("cifar10", split, list(classes), labels_all, identity, images=images, notes=notes)


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


# ---------------------------------------------------------------------------------------------- folders


def load_image_folder(root: str | Path, split: str) -> Source:
    """`root/<split>/<class>/<image>` through torchvision's ImageFolder (file discovery and class order)."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise FusionCacheError(
            f"{folder} is not a folder; --dataset imagefolder expects {root}/train/<class>/* and {root}/test/<class>/*"
        )
    empty = sorted(p.name for p in folder.iterdir()
                   if p.is_dir() and not any(q.suffix.lower() in IMG_EXTENSIONS for q in p.rglob("*") if q.is_file()))
    if empty:
        raise FusionCacheError(
            f"class folder {folder / empty[0]} holds no images; add images ({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove it"
        )
    try:
        ds = ImageFolder(str(folder), loader=lambda p: p)  # torchvision's image extensions; other files are ignored
    except (FileNotFoundError, RuntimeError) as e:
        raise FusionCacheError(f"no images found under {folder} ({e}); add <class>/<image> files") from None
    paths = [str(Path(p).relative_to(folder)) for p, _ in ds.samples]
    labels = np.asarray(ds.targets, dtype=np.int64)
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0" + str((folder / p).stat().st_size).encode() + b"\n")
    return Source("imagefolder", split, list(ds.classes), labels, h.hexdigest(), paths=paths, root=folder)


def read_image(path: str | Path) -> torch.Tensor:
    """Any image file -> uint8 (3, H, W) RGB. Grayscale, palette, RGBA, CMYK and 16-bit all convert.

    Raises `BadImage` for files PIL cannot decode.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from None
    return TF.pil_to_tensor(rgb)


class BadImage(Exception):
    """An image file that cannot be decoded."""


def load_source(dataset: str, root: str | Path, split: str, download: bool = True,
                skip_integrity_check: bool = False) -> Source:
    if dataset == "cifar10":
        return load_cifar10(root, split, download, skip_integrity_check)
    if dataset == "imagefolder":
        return load_image_folder(root, split)
    raise FusionCacheError(f"unknown dataset '{dataset}'; use cifar10 or imagefolder")


# ---------------------------------------------------------------------------------------------- subset


def parse_size(value: str | int | None, split: str) -> int | None:
    """`--train-size`: a positive integer, or `all` (None). The default is the case study's size."""
    if value is None:
        return PAPER_SIZES[split]
    if isinstance(value, int):
        n = value
    elif str(value).strip().lower() == "all":
        return None
    else:
        try:
            n = int(str(value).strip())
        except ValueError:
            raise FusionCacheError(f"--{split}-size '{value}' is not a number; pass a positive integer or 'all'") from None
    if n <= 0:
        raise FusionCacheError(f"--{split}-size must be positive, got {n}; pass a positive integer or 'all'")
    return n


def stratified_subset(labels: np.ndarray, size: int | None, seed: int, split: str = "train") -> np.ndarray:
    """Sorted source indices of a class-stratified random subset of `size` items (all when None).

    Each class gets its share of `size` in proportion to its frequency (largest remainders break ties, then
    class order). Within a class the items are a seeded random draw. Same labels, size and seed: same subset.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if size is None or size == n:
        return np.arange(n, dtype=np.int64)
    if size > n:
        raise FusionCacheError(
            f"--{split}-size {size} is larger than the {split} split ({n} images); pass at most {n}, or 'all'"
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    take = np.floor(exact).astype(np.int64)
    short = size - int(take.sum())
    order = np.lexsort((np.arange(len(classes)), -(exact - take)))  # largest remainder first, stable
    take[order[:short]] += 1
    rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 2])
    chosen = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
