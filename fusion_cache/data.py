"""Image sources (CIFAR-10, image folders and CSV manifests) and the class-stratified subset sampler."""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import mmap
import os
import pickle
import re
import stat
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from .errors import FusionCacheError, quote

SPLITS = ("train", "test")
DATASETS = ("cifar10", "imagefolder", "manifest")
MAX_PIXELS = 8192 * 8192  # larger images are refused before decoding (decompression bombs)
MAX_ASPECT = 50  # longer side / shorter side; a 200000x1 image would resize to a 25-gigapixel raster


class IntegrityWarning(UserWarning):
    """A local dataset copy was used although its checksums differ from the official release."""


@dataclass
class Source:
    """One split of a dataset: labels for every item, and a way to get uint8 (3, H, W) images by position."""

    dataset: str
    split: str
    classes: list[str]
    labels: np.ndarray  # (N,) int64, for the whole split
    identity: str  # hash of what the items are (pixels, or file names and contents); part of the cache fingerprint
    images: np.ndarray | None = None  # (N, 3, 32, 32) uint8 for in-memory datasets
    paths: list[str] | None = None  # image folders: display names relative to the split folder (printable,
    #                                 one line, valid UTF-8; see display_path), as listed and stored in caches
    root: Path | None = None
    notes: list[str] = field(default_factory=list)  # integrity notes only (extract records their absence)
    files: list[str] | None = None  # image folders: the real relative file names (os.fsdecode'd), to open
    digests: list[str] | None = None  # image folders: each file's sha256 as listed, or why it cannot be read

    def __len__(self) -> int:
        return len(self.labels)

    def file(self, index: int) -> str:
        """The absolute path of item `index`'s file, as given: links are not resolved and `..` is not folded
        away (`a/link/../x` is where the link's target's parent holds x, as the kernel reads it)."""
        files = self.files if self.files is not None else self.paths
        return os.path.join(os.getcwd(), self.root, files[index])

    def image(self, index: int) -> torch.Tensor:
        """The source image at `index` as uint8 (3, H, W) RGB; raises BadImage for undecodable files."""
        if self.images is not None:
            return torch.from_numpy(self.images[index])
        return read_image(self.file(index), name=self.paths[index])


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


def display_path(path: str | bytes | os.PathLike) -> str:
    r"""A file name as it can be printed, stored in JSON or HDF5, and kept on one line.

    Bytes that are not UTF-8 (e.g. b'caf\xe9.png' on Linux, which os.fsdecode turns into a lone surrogate)
    become the four characters `\xe9`; control and line-break characters (newline, tab, U+2028, ...) are
    escaped the same way. Valid UTF-8 names come back unchanged.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a str with surrogates that no file system name produces
        raw = os.fspath(path).encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _reason(e: OSError) -> str:
    """An OSError as a short reason without the path (which may not be printable)."""
    if e.errno == 40:  # ELOOP
        return "a symbolic link loop"
    if isinstance(e, FileNotFoundError):
        return "missing (a broken symbolic link?)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or type(e).__name__


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)  # torchvision's has_file_allowed_extension


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(top: str, boundary: str, visited: set) -> list[str]:
    """Files with image extensions under `top`, in torchvision's order: folders sorted by path, then names.

    Like os.walk(top, followlinks=True), except for links to folders: one that resolves inside `boundary`
    (its files are listed under their real place) or to a folder that holds `boundary` (a loop) is not
    followed, nor is any folder a second time (`visited`: (st_dev, st_ino) of every folder walked). Every
    non-folder entry with an image extension is returned, whatever it is (regular file, link, FIFO, ...);
    nothing is opened here.
    """
    found: dict[str, list[str]] = {}
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            raise FusionCacheError(
                f"cannot read folder {display_path(folder)} ({_reason(e)}); fix its permissions or remove it"
            ) from None
        names = []
        subfolders = []
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                is_dir = entry.is_dir()  # follows links, as os.walk does
            except OSError:
                is_dir = False
            if not is_dir:
                if _has_image_extension(entry.name):
                    names.append(entry.name)
                continue
            try:
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if _inside(real, boundary) or _inside(boundary, real):
                        continue  # a link back into the listing (duplicates) or to a folder above it (a loop)
                st = os.stat(entry.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in visited:
                visited.add((st.st_dev, st.st_ino))
                subfolders.append(entry.path)
        found[folder] = names
        stack.extend(reversed(subfolders))  # depth first in name order: the same choice on every file system
    return [os.path.join(folder, name) for folder in sorted(found) for name in sorted(found[folder])]


def _classify(path: str) -> tuple[str, tuple | None, bool]:
    """(problem or "", (st_dev, st_ino) of the file it names, is a symlink), from stat calls only: never opens."""
    try:
        st = os.lstat(path)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(path)
    except OSError as e:
        return _reason(e), None, True
    if not stat.S_ISREG(st.st_mode):
        return _kind(st.st_mode), None, link
    return "", (st.st_dev, st.st_ino), link


def _digest(path: str) -> str:
    """sha256 of a regular file's content, or a marker for one that cannot be read. Opened non-blocking and
    checked with fstat, so a file swapped for a FIFO after listing cannot hang the hash."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        return "unreadable: " + _reason(e)
    with os.fdopen(fd, "rb") as f:
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                return "special: " + _kind(mode)
            return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            return "unreadable: " + _reason(e)


def load_image_folder(root: str | Path, split: str) -> Source:
    r"""`root/<split>/<class>/<image>`, listed the way torchvision's ImageFolder lists it, but safely.

    Classes are the sorted names of the folders in `root/<split>/`; samples are the files with torchvision's
    image extensions (`IMG_EXTENSIONS`, any case) under each class folder, recursively, in torchvision's
    order (sorted folder paths, then sorted names), so class indices and sample positions are ImageFolder's.
    What differs from ImageFolder:

    - Links to folders are followed only when they point outside the split folder, and no folder is walked
      twice: a link to a parent (a loop) or to another class is ignored. A class folder that is such a link
      is refused with an error.
    - A symbolic link to a file that is already listed (by st_dev and st_ino: another class's image, or a
      second link to the same file) is counted once, at the file's real place or its first link.
    - Nothing is opened while listing. Broken links, link loops, FIFOs, sockets, device files and unreadable
      files stay in the listing and become bad images when read (`read_image` refuses them without opening
      a FIFO), so they follow `--on-bad-image`.
    - `paths` holds display names (`display_path`): names that are not UTF-8 work, and are shown and stored
      escaped (`caf\xe9.png`); `files` holds the real names.

    The identity (part of the cache fingerprint) is a sha256 over the class names and, for every sample in
    order, its relative path, label and the sha256 of its content, so a cache is reused only when every
    image is byte-for-byte the same. The content is hashed on every load, with no memo: a stat-keyed memo
    (size, mtime, inode) can be fooled by a same-size rewrite within the file system's timestamp resolution
    or with a restored mtime, and each CLI command is a fresh process, where a memo would rarely help. The
    hash reads every file once, which costs far less than decoding them.
    """
    root = Path(root)
    folder = root / split
    shown = display_path(folder)
    if not folder.is_dir():
        raise FusionCacheError(
            f"{shown} is not a folder; --dataset imagefolder expects {display_path(root)}/train/<class>/* and "
            f"{display_path(root)}/test/<class>/*"
        )
    top = str(folder)
    boundary = os.path.realpath(top)
    try:
        with os.scandir(top) as it:
            class_entries = sorted((e for e in it if _is_dir(e)), key=lambda e: e.name)
    except OSError as e:
        raise FusionCacheError(f"cannot read folder {shown} ({_reason(e)}); fix its permissions") from None
    if not class_entries:
        raise FusionCacheError(f"no images found under {shown} (no class folders); add <class>/<image> files")
    classes = [e.name for e in class_entries]
    shown_classes = [display_path(c) for c in classes]
    if len(set(shown_classes)) != len(classes):
        dup = next(c for c in shown_classes if shown_classes.count(c) > 1)
        raise FusionCacheError(f"two class folders in {shown} are both shown as {quote(dup)}; rename one of them")
    top_stat = os.stat(top)
    visited = {(top_stat.st_dev, top_stat.st_ino)}
    candidates: list[tuple[str, int]] = []
    for label, entry in enumerate(class_entries):
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            if _inside(real, boundary) or _inside(boundary, real):
                raise FusionCacheError(
                    f"class folder {display_path(entry.path)} is a link to {display_path(real)}, inside or above "
                    f"{shown} (a duplicate class or a loop); remove the link or replace it with a real folder"
                )
        try:
            st = os.stat(entry.path)
        except OSError as e:
            raise FusionCacheError(f"cannot read class folder {display_path(entry.path)} ({_reason(e)}); "
                                   "fix it or remove it") from None
        visited.add((st.st_dev, st.st_ino))
        files = _walk(entry.path, boundary, visited)
        if not files:
            raise FusionCacheError(
                f"class folder {display_path(entry.path)} holds no images; add images "
                f"({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove it"
            )
        candidates.extend((f, label) for f in files)

    checked = [(path, label, *_classify(path)) for path, label in candidates]
    real_files = {key for _, _, problem, key, link in checked if not problem and not link}
    linked: set = set()
    kept: list[tuple[str, int, str]] = []  # (path, label, problem)
    for path, label, problem, key, link in checked:
        if link and not problem:
            if key in real_files or key in linked:
                continue  # a link to a file that is already listed: counted once
            linked.add(key)
        kept.append((path, label, problem))
    digests = _digests([(path, problem) for path, _, problem in kept])
    rel = [os.path.relpath(path, top) for path, _, _ in kept]
    labels = np.asarray([label for _, label, _ in kept], dtype=np.int64)
    identity = _listing_identity(b"fusion-cache imagefolder 2\n", classes, rel, labels, digests)
    return Source("imagefolder", split, shown_classes, labels, identity, paths=[display_path(r) for r in rel],
                  root=folder, files=rel, digests=digests)


def _digests(items: list[tuple[str, str]]) -> list[str]:
    """For each (path, problem): "bad: <problem>" when a stat already found one (the file is not opened),
    else `_digest(path)`. Four threads: hashlib releases the GIL, so the reads overlap."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda k: "bad: " + k[1] if k[1] else _digest(k[0]), items))


def _listing_identity(tag: bytes, classes: list[str], names: list[str], labels: np.ndarray,
                      digests: list[str]) -> str:
    """sha256 over `tag`, the class names, and every sample's name, label and content digest, in order."""
    h = hashlib.sha256(tag)
    for c in classes:
        h.update(os.fsencode(c) + b"\n")
    for name, label, digest in zip(names, labels, digests):
        h.update(os.fsencode(name) + b"\0" + str(int(label)).encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- manifests

MANIFEST_COLUMNS = ("path", "label", "split")
MAX_MANIFEST_LINE = 1 << 20  # bytes in one line of a manifest; a row is a path, a label and a split
_MANIFEST_HELP = "a UTF-8 CSV whose header names the columns path,label,split"


@dataclass
class _Row:
    path: str  # as written in the manifest
    label: str
    split: str
    problem: str  # why the file cannot be an image, from stat alone ("" when it is a regular file)


def _short(text: str, limit: int = 100) -> str:
    """A value from the manifest as an error message shows it: printable, and cut after `limit` characters."""
    return quote(display_path(text), limit, marks=False)


def check_data_root(dataset: str, root: str | Path) -> None:
    """Fail fast when --data-root is the wrong kind of path: a folder for cifar10 and imagefolder, a readable
    CSV file for manifest (its rows are checked when it is loaded)."""
    if dataset not in DATASETS:
        raise FusionCacheError(f"unknown dataset '{dataset}'; use {', '.join(DATASETS[:-1])} or {DATASETS[-1]}")
    if dataset == "manifest":
        _open_manifest(Path(root)).close()
    elif os.path.exists(root) and not os.path.isdir(root):
        raise FusionCacheError(
            f"--data-root {display_path(root)} is a file; --dataset {dataset} reads a folder: pass a folder, or "
            "--dataset manifest for a CSV list of images"
        )


def _open_manifest(path: Path):
    """The manifest opened for binary reading: opened non-blocking and checked with fstat, so a FIFO or a
    device given as the manifest is refused, never read."""
    shown = display_path(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise FusionCacheError(
            f"manifest {shown} does not exist; pass --data-root the path of {_MANIFEST_HELP}"
        ) from None
    except OSError as e:
        raise FusionCacheError(f"cannot read manifest {shown} ({_reason(e)}); fix its permissions") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise FusionCacheError(f"cannot read manifest {shown} ({_reason(e)}); fix it or pass another file") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FusionCacheError(f"manifest {shown} is {_kind(mode)}, not a CSV file; pass --data-root the path of "
                               f"{_MANIFEST_HELP}")
    return os.fdopen(fd, "rb")


def _manifest_lines(f, shown: str, count: list[int]):
    """The manifest's lines decoded as UTF-8, one at a time and at most MAX_MANIFEST_LINE bytes each, so a
    binary file or one endless line fails with its line number instead of filling memory. `count[0]`: lines read."""
    while True:
        raw = f.readline(MAX_MANIFEST_LINE + 1)
        if not raw:
            return
        count[0] += 1
        if len(raw) > MAX_MANIFEST_LINE:
            raise FusionCacheError(f"manifest {shown} row {count[0]} is over {MAX_MANIFEST_LINE >> 20} MiB long; "
                                   f"pass {_MANIFEST_HELP}, one row per image")
        if count[0] == 1 and raw.startswith(codecs.BOM_UTF8):  # as spreadsheets save UTF-8
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FusionCacheError(
                f"manifest {shown} row {count[0]} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                "of the row); save the manifest as UTF-8 CSV"
            ) from None


def _csv_rows(f, shown: str):
    """(row number, fields) for every non-blank row; csv errors become one-line FusionCacheErrors."""
    count = [0]
    reader = csv.reader(_manifest_lines(f, shown, count), strict=True)
    while True:
        number = count[0] + 1  # the line where the next row starts
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field limit" in str(e):
                why = (f"has a field over {csv.field_size_limit()} characters (an unclosed quote?); close the quote, "
                       "or shorten the path or label")
            elif "new-line character" in str(e):
                why = r"has a lone carriage return (\r); save the manifest with \n or \r\n line endings"
            else:
                why = (f"is not valid CSV ({e}); write a field that holds a comma or a quote in double quotes, "
                       'with each quote inside doubled ("")')
            raise FusionCacheError(f"manifest {shown} row {number} {why}") from None
        if fields:  # a blank line
            yield number, fields


def _read_manifest(path: Path) -> list[_Row]:
    """Every row of the manifest at `path`, checked: the header, each row's fields, and that each path names
    something that exists and is not a folder. Raises FusionCacheError at the first problem, naming its row."""
    shown = display_path(path)
    folder = path.parent
    rows: list[_Row] = []
    with _open_manifest(path) as f:
        records = _csv_rows(f, shown)
        first = next(records, None)
        if first is None:
            raise FusionCacheError(
                f"manifest {shown} is empty; write a header path,label,split, then one row per image"
            )
        header = [h.strip().lower() for h in first[1]]
        missing = [c for c in MANIFEST_COLUMNS if c not in header]
        if missing:
            names = " or ".join(filter(None, (", ".join(missing[:-1]), missing[-1])))
            raise FusionCacheError(
                f"manifest {shown} has no {names} column in its header (row {first[0]}); make the first row "
                "path,label,split"
            )
        twice = next((c for c in MANIFEST_COLUMNS if header.count(c) > 1), None)
        if twice:
            raise FusionCacheError(f"manifest {shown} names the column {twice} twice in its header (row {first[0]}); "
                                   "keep one")
        at = {c: header.index(c) for c in MANIFEST_COLUMNS}
        for number, fields in records:
            where = f"manifest {shown} row {number}"
            if len(fields) != len(header):
                raise FusionCacheError(
                    f"{where} has {len(fields)} fields, the header {len(header)}; write a path or label that holds "
                    'a comma in double quotes ("a,b.png")'
                )
            p, label, split = fields[at["path"]], fields[at["label"]].strip(), fields[at["split"]].strip()
            if not p:
                raise FusionCacheError(f"{where} has an empty path; give the image's path (absolute, or relative to "
                                       "the manifest's folder) or remove the row")
            if not label:
                raise FusionCacheError(f"{where} has an empty label; give the image's class name or remove the row")
            if display_path(label) != label:
                raise FusionCacheError(f"{where} has a label with a control character ({_short(label)}); "
                                       "use a printable class name")
            if split not in SPLITS:
                raise FusionCacheError(f"{where} has the split '{_short(split)}'; use train or test")
            rows.append(_Row(p, label, split, _manifest_entry(folder, p, where)))
    if not rows:
        raise FusionCacheError(f"manifest {shown} has a header but no rows; add one row per image: path,label,split")
    for split in SPLITS:
        if not any(r.split == split for r in rows):
            raise FusionCacheError(f"manifest {shown} has no {split} rows; add rows with split {split} "
                                   "(a dataset needs both train and test images)")
    return rows


def _manifest_entry(folder: Path, path: str, where: str) -> str:
    """What stat says of a row's file: "" for a regular file, a problem for one that exists but is no image
    file (a FIFO, socket or device: a bad image later, never opened). A path that does not exist (a broken
    link or a link loop too) or is a folder raises FusionCacheError: the manifest is wrong, not the image."""
    shown = _short(path)
    if "\0" in path:
        raise FusionCacheError(f"{where} has a path with a NUL character ({shown}); fix the path")
    try:
        st = os.stat(folder / path)
    except PermissionError:
        return "permission denied"  # a folder on the way is unreadable: a bad image, as in an image folder
    except OSError as e:
        if not os.path.lexists(folder / path):
            what = "does not exist"
        elif isinstance(e, FileNotFoundError):
            what = "is a broken symbolic link"
        else:
            what = f"cannot be opened ({_reason(e)})"  # a symbolic link loop, ...
        raise FusionCacheError(
            f"{where}: {shown} {what}; fix the path (a relative path starts at the manifest's folder, "
            f"{display_path(folder.resolve())}) or remove the row"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise FusionCacheError(f"{where}: {shown} is a folder; list its image files, one row each")
    return "" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)


def load_manifest(path: str | Path, split: str) -> Source:
    """The `split` rows of a manifest: a UTF-8 CSV with a header naming the columns path, label and split.

    Paths are absolute or relative to the manifest's folder; labels are class names; split is train or test.
    Classes are the sorted labels of the split (as ImageFolder sorts class folders), samples are in row
    order, and `paths` holds the paths as written (`display_path`), `files` the same to open under `root`,
    the manifest's folder. Other columns are ignored, blank lines skipped, a UTF-8 byte order mark allowed,
    and whitespace around labels and splits (not paths) dropped.

    The whole manifest is read and checked on every call, so both splits see the same rows and the same
    errors: a missing or bad header, a row with the wrong number of fields, an empty path or label, an
    unknown split, no rows for a split, or a path that does not exist or is a folder raise FusionCacheError
    naming the row (rows are counted as lines, the header being row 1). A file that exists but is no image
    (undecodable, a FIFO, unreadable) is a bad image when read, and follows --on-bad-image.

    The identity is `load_image_folder`'s over the classes and every row's path as written, label and the
    sha256 of its content, so a cache is reused only when every image is byte-for-byte the same.
    """
    path = Path(path)
    mine = [r for r in _read_manifest(path) if r.split == split]
    classes = sorted({r.label for r in mine})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[r.label] for r in mine], dtype=np.int64)
    files = [r.path for r in mine]
    digests = _digests([(str(path.parent / r.path), r.problem) for r in mine])
    identity = _listing_identity(b"fusion-cache manifest 1\n", classes, files, labels, digests)
    return Source("manifest", split, classes, labels, identity, paths=[display_path(f) for f in files],
                  root=path.parent, files=files, digests=digests)


def list_image_files(inputs: list[str | Path]) -> list[Path]:
    """`fusion-cache predict`'s inputs: files as given, folders searched recursively for image extensions.

    Each folder's images come sorted (as sorted Paths); inputs keep their order. Folders are walked as
    `load_image_folder` walks a class folder: links to folders outside it are followed, links back into it
    or above it are not, no folder is walked twice. The same file reached twice (a link, or a file also
    given by name) is listed once. Nothing is opened here: FIFOs, broken links and other non-images are
    listed, and `read_image` reports them as bad images without blocking.
    Raises FusionCacheError when an input does not exist or no image is found.
    """
    out: list[Path] = []
    seen: set = set()

    def add(p: Path) -> None:
        try:
            st = os.stat(p)
            key = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else os.path.abspath(p)
        except OSError:
            key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in inputs:
        p = Path(os.fsdecode(item))
        if not os.path.exists(p):
            why = "is a broken link" if os.path.lexists(p) else "does not exist"
            raise FusionCacheError(f"{display_path(p)} {why}; pass image files or folders")
        if os.path.isdir(p):
            top = str(p)
            st = os.stat(top)
            for f in sorted(Path(f) for f in _walk(top, os.path.realpath(top), {(st.st_dev, st.st_ino)})):
                add(f)
        else:
            add(p)
    if not out:
        shown = ", ".join(display_path(i) for i in inputs)
        raise FusionCacheError(f"no images found in {shown}; pass image files or folders "
                               f"({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return out


def read_image(path: str | Path, name: str | None = None, sha256: str | None = None) -> torch.Tensor:
    """Any image file -> uint8 (3, H, W) RGB. Grayscale, palette, RGBA, CMYK and 16-bit all convert.

    Raises `BadImage` ("<name>: <reason>", one printable line; `name` defaults to `display_path(path)`) for
    anything that is not a decodable image: a missing file or broken link, a FIFO, socket or device (never
    opened for reading: the file is opened non-blocking and checked with fstat first), an empty or
    undecodable file, and an image over `MAX_PIXELS` pixels or with an aspect ratio over `MAX_ASPECT`
    (checked on the header's size, before the raster is decoded; PIL's own decompression-bomb error and
    warning count too). Other warnings from PIL or torch while reading are silenced.

    With `sha256` (the digest the plan listed), the file is mapped once, its bytes checked, and the image
    decoded from that mapping: other content, or a file that can no longer be opened as the regular file it
    was, raises `ChangedImage` (never a skippable `BadImage`), so an image that changed after it was listed,
    or a node that holds other bytes or no file under the same path, can never change what is extracted.
    """
    shown = name if name is not None else display_path(path)
    planned = sha256 is not None

    def gone(reason: str) -> Exception:
        if planned:
            return ChangedImage(f"{shown} is not the file that was planned: it was readable when listed, and now "
                                f"{reason}")
        return BadImage(f"{shown}: {reason}")

    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise gone(_reason(e)) from None
    with os.fdopen(fd, "rb") as f, contextlib.ExitStack() as stack:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise gone(_reason(e)) from None
        if not stat.S_ISREG(st.st_mode):
            raise gone(f"{_kind(st.st_mode)}, not an image file")
        source = f
        if planned:
            try:  # mapped, not read: the memory stays the page cache's, whatever the file's size
                source = stack.enter_context(mmap.mmap(fd, 0, access=mmap.ACCESS_READ)) if st.st_size else b""
            except (OSError, ValueError) as e:
                raise gone(_reason(e) if isinstance(e, OSError) else str(e)) from None
            got = hashlib.sha256(source).hexdigest()
            if got != sha256:
                raise ChangedImage(f"{shown} is not the file that was planned: its content has sha256 {got[:12]}…, "
                                   f"the plan's {sha256[:12]}…")
        if st.st_size == 0:
            raise BadImage(f"{shown}: empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return _decode(source)
        except _TooLarge as e:
            raise BadImage(f"{shown}: {e}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            m = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(m[1]) / 1e6:.0f} megapixels" if m else "too many pixels"
            raise BadImage(f"{shown}: image of {size}, over the {MAX_PIXELS / 1e6:.0f}-megapixel limit "
                           "(a decompression bomb?)") from None
        except UnidentifiedImageError:
            raise BadImage(f"{shown}: not an image PIL can decode (unknown or damaged format)") from None
        except MemoryError:
            raise BadImage(f"{shown}: too large to decode in memory") from None
        except Exception as e:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error, ...
            text = display_path(str(e))[:200]
            raise BadImage(f"{shown}: {type(e).__name__}: {text}") from None


class _TooLarge(Exception):
    pass


def _decode(f) -> torch.Tensor:
    with Image.open(f) as im:
        w, h = im.size
        if w < 1 or h < 1:
            raise _TooLarge(f"image of {w}x{h} pixels has no pixels")
        if w * h > MAX_PIXELS:
            raise _TooLarge(f"image of {w}x{h} pixels ({w * h / 1e6:.0f} megapixels) is over the "
                            f"{MAX_PIXELS / 1e6:.0f}-megapixel limit (a decompression bomb?)")
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise _TooLarge(f"image of {w}x{h} pixels has an aspect ratio over {MAX_ASPECT}:1")
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
    return TF.pil_to_tensor(rgb)


class BadImage(Exception):
    """An image file that cannot be decoded. Its message is "<display name>: <reason>" on one line."""


class ChangedImage(Exception):
    """An image file whose bytes are not the ones the plan hashed: never skipped, always an error."""


def load_source(dataset: str, root: str | Path, split: str, download: bool = True,
                skip_integrity_check: bool = False) -> Source:
    """One split of a dataset, every image file hashed (`Source.digests`)."""
    if dataset == "manifest":
        return load_manifest(root, split)  # checks its own path
    check_data_root(dataset, root)  # an unknown dataset, a file for a folder
    if dataset == "cifar10":
        return load_cifar10(root, split, download, skip_integrity_check)
    return load_image_folder(root, split)


# ---------------------------------------------------------------------------------------------- subset


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
    take = counts * size // n
    remainder = counts * size % n  # in exact integers: equal shares tie exactly (5.6 - 5 < 1.6 - 1 in floats)
    short = size - int(take.sum())
    order = np.lexsort((np.arange(len(classes)), -remainder))  # largest remainder first, ties to class order
    take[order[:short]] += 1
    rng = np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 2])
    chosen = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
