"""Files on disk, listed safely: printable names, folder walks that never loop, stat-only classification, and
content digests. Nothing here opens an image for decoding (`decode.py` does) or knows a dataset layout
(`sources/`)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import FusionCacheError


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
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def reason(e: OSError) -> str:
    """An OSError as a short reason without the path (which may not be printable)."""
    if e.errno == 40:  # ELOOP
        return "a symbolic link loop"
    if isinstance(e, FileNotFoundError):
        return "missing (a broken symbolic link?)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or type(e).__name__


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)  # torchvision's has_file_allowed_extension


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk(top: str, boundary: str, visited: set) -> list[str]:
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
                f"cannot read folder {display_path(folder)} ({reason(e)}); fix its permissions or remove it"
            ) from None
        names = []
        subfolders = []
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                is_dir = entry.is_dir()  # follows links, as os.walk does
            except OSError:
                is_dir = False
            if not is_dir:
                if has_image_extension(entry.name):
                    names.append(entry.name)
                continue
            try:
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if inside(real, boundary) or inside(boundary, real):
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


def classify(path: str) -> tuple[str, tuple | None, bool]:
    """(problem or "", (st_dev, st_ino) of the file it names, is a symlink), from stat calls only: never opens."""
    try:
        st = os.lstat(path)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(path)
    except OSError as e:
        return reason(e), None, True
    if not stat.S_ISREG(st.st_mode):
        return file_kind(st.st_mode), None, link
    return "", (st.st_dev, st.st_ino), link


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_content_digest(value: str) -> bool:
    """Whether a listed digest is a file's sha256, not a marker for a file that could not be read (`digest`)."""
    return bool(_SHA256.match(value))


def digest(path: str) -> str:
    """sha256 of a regular file's content, or a marker for one that cannot be read. Opened non-blocking and
    checked with fstat, so a file swapped for a FIFO after listing cannot hang the hash."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        return "unreadable: " + reason(e)
    with os.fdopen(fd, "rb") as f:
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                return "special: " + file_kind(mode)
            return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            return "unreadable: " + reason(e)



def digests_of(items: list[tuple[str, str]]) -> list[str]:
    """For each (path, problem): "bad: <problem>" when a stat already found one (the file is not opened),
    else `digest(path)`. Four threads: hashlib releases the GIL, so the reads overlap."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda k: "bad: " + k[1] if k[1] else digest(k[0]), items))


def listing_identity(tag: bytes, classes: list[str], names: list[str], labels: np.ndarray,
                      digests: list[str]) -> str:
    """sha256 over `tag`, the class names, and every sample's name, label and content digest, in order."""
    h = hashlib.sha256(tag)
    for c in classes:
        h.update(os.fsencode(c) + b"\n")
    for name, label, digest in zip(names, labels, digests):
        h.update(os.fsencode(name) + b"\0" + str(int(label)).encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


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
            for f in sorted(Path(f) for f in walk(top, os.path.realpath(top), {(st.st_dev, st.st_ino)})):
                add(f)
        else:
            add(p)
    if not out:
        shown = ", ".join(display_path(i) for i in inputs)
        raise FusionCacheError(f"no images found in {shown}; pass image files or folders "
                               f"({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return out
