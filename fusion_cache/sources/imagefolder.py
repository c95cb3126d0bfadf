"""Image folders: one folder per class (`photos/<class>/*.jpg`), with or without split folders (`train/`, and
`test/`, `val/`, `valid/` or `validation/` beside it; any case, `training/` and `testing/` too), listed the way
torchvision's ImageFolder lists them, but safely: no loops, nothing opened while listing, every file hashed.
Hidden folders and `__MACOSX` are never classes or splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import FusionCacheError, quote
from ..files import classify, digests_of, display_path, has_image_extension, inside, is_dir, listing_identity, reason, walk
from .base import SPLIT_NAMES, Listing, Source

NAME = "imagefolder"


IGNORED = ("__MACOSX",)  # with hidden folders (.ipynb_checkpoints, .git): never a class or a split


def ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED


def _subfolders(root: Path) -> list[str]:
    """The folders in `root` that can be classes or splits: not hidden, not __MACOSX."""
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if is_dir(e) and not ignored(e.name))
    except OSError as e:
        raise FusionCacheError(f"cannot read folder {display_path(root)} ({reason(e)}); fix its permissions") from None


def _holds_classes(folder: Path) -> bool:
    """Whether `folder` holds class folders and no loose images (a split folder, not a class)."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return False
    loose = any(has_image_extension(e.name) and not is_dir(e) for e in entries)
    return not loose and any(is_dir(e) and not ignored(e.name) for e in entries)


def split_folders(root: Path, names: list[str] | None = None) -> dict[str, str] | None:
    """{given split: folder name} when `root` holds split folders, None when its folders are classes.

    Split folders are named train, test, val, valid or validation (training and testing too; any case). The
    layout is one of split folders when a train folder sits beside another split folder, or holds class
    folders of its own; a folder named train among other classes, holding images, is a class. Beside split
    folders, any other folder is an error (it would be neither), as are two folders for one split. `names`:
    `_subfolders(root)`, when the caller has it."""
    names = _subfolders(root) if names is None else names
    splits = {n: SPLIT_NAMES[n.lower()] for n in names if n.lower() in SPLIT_NAMES}
    trains = [n for n, s in splits.items() if s == "train"]
    if not trains:
        if names and len(splits) == len(names):
            raise FusionCacheError(f"{display_path(root)} holds {', '.join(n + '/' for n in names)} but no train/; "
                                   "add train/<class>/<image>, or put class folders straight in it")
        return None
    if len(splits) == 1 and not _holds_classes(root / trains[0]):
        return None  # a class that happens to be called train
    found: dict[str, str] = {}
    for n, s in splits.items():
        if s in found:
            raise FusionCacheError(f"{display_path(root)} holds both {found[s]}/ and {n}/ for one split; keep one "
                                   "of them")
        found[s] = n
    stray = [n for n in names if n not in splits]
    if stray:
        raise FusionCacheError(f"{display_path(root)} holds split folders ({', '.join(f + '/' for f in found.values())}"
                               f") and {stray[0]}/, which is none of them; move {stray[0]}/ out, or name it train, "
                               "test or val")
    return {s: found[s] for s in ("train", "val", "test") if s in found}


def split_folders_of(folder: Path) -> bool:
    """Whether `folder` holds a `train/` folder (a dataset of its own, when it was taken for a class)."""
    try:
        return (folder / "train").is_dir()
    except OSError:
        return False


def detect(root: Path) -> str | None:
    """A folder of class folders, or of split folders that hold class folders."""
    if not root.is_dir():
        return None
    names = _subfolders(root)
    if not names:
        return None
    splits = split_folders(root, names)
    if splits:
        return "an image folder with split folders " + ", ".join(f + "/" for f in splits.values())
    return f"an image folder of {len(names)} class folders"


def check_root(root: Path) -> None:
    if not os.path.exists(root):
        raise FusionCacheError(f"--data-root {display_path(root)} does not exist; pass the folder that holds "
                               "<class>/<image> files")
    if not os.path.isdir(root):
        raise FusionCacheError(
            f"--data-root {display_path(root)} is a file; --dataset imagefolder reads a folder: pass a folder, or "
            "--dataset manifest for a CSV list of images"
        )


def test_split(root: Path) -> str | None:
    splits = split_folders(root) if os.path.isdir(root) else None
    if not splits:
        return None
    return next((splits[s] + "/" for s in ("test", "val") if s in splits), None)


def load(root: Path, options=None) -> Listing:
    """The class folders of `root`, or of each of its split folders."""
    check_root(root)
    names = _subfolders(root)
    splits = split_folders(root, names)
    if splits is None:
        if not names:
            loose = any(has_image_extension(e.name) for e in os.scandir(root))
            what = "images but no class folders" if loose else "no class folders"
            raise FusionCacheError(f"{display_path(root)} holds {what}; put each class's images in a folder named "
                                   "after the class (<class>/<image>)")
        for name in names:
            if split_folders_of(root / name):
                raise FusionCacheError(f"class folder {display_path(root / name)} holds split folders (train/, ...): it "
                                       "is a dataset, not a class; pass it as --data-root")
        return Listing(NAME, {"all": list_class_folder(root, "all")}, {"all": "the class folders"})
    given = {s: list_class_folder(root / name, s) for s, name in splits.items()}
    return Listing(NAME, given, {s: name + "/" for s, name in splits.items()})


def load_image_folder(root: str | Path, split: str) -> Source:
    """`root/<split>/<class>/<image>`: `list_class_folder` of `root/<split>`."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise FusionCacheError(
            f"{display_path(folder)} is not a folder; --dataset imagefolder reads {display_path(root)}/<class>/* "
            f"or split folders {display_path(root)}/train/<class>/* with test/ or val/ beside it"
        )
    return list_class_folder(folder, split)


def list_class_folder(folder: Path, split: str) -> Source:
    r"""`folder/<class>/<image>`, listed the way torchvision's ImageFolder lists it, but safely.

    Classes are the sorted names of the folders in `folder`; samples are the files with torchvision's
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
    shown = display_path(folder)
    top = str(folder)
    boundary = os.path.realpath(top)
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError as e:
        raise FusionCacheError(f"cannot read folder {shown} ({reason(e)}); fix its permissions") from None
    class_entries = sorted((e for e in entries if is_dir(e) and not ignored(e.name)), key=lambda e: e.name)
    if not class_entries:
        if any(has_image_extension(e.name) for e in entries):
            raise FusionCacheError(f"{shown} holds images but no class folders; put each class's images in a folder "
                                   "named after the class (<class>/<image>)")
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
            if inside(real, boundary) or inside(boundary, real):
                raise FusionCacheError(
                    f"class folder {display_path(entry.path)} is a link to {display_path(real)}, inside or above "
                    f"{shown} (a duplicate class or a loop); remove the link or replace it with a real folder"
                )
        try:
            st = os.stat(entry.path)
        except OSError as e:
            raise FusionCacheError(f"cannot read class folder {display_path(entry.path)} ({reason(e)}); "
                                   "fix it or remove it") from None
        visited.add((st.st_dev, st.st_ino))
        files = walk(entry.path, boundary, visited)
        if not files:
            raise FusionCacheError(
                f"class folder {display_path(entry.path)} holds no images; add images "
                f"({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove it"
            )
        candidates.extend((f, label) for f in files)

    checked = [(path, label, *classify(path)) for path, label in candidates]
    real_files = {key for _, _, problem, key, link in checked if not problem and not link}
    linked: set = set()
    kept: list[tuple[str, int, str]] = []  # (path, label, problem)
    for path, label, problem, key, link in checked:
        if link and not problem:
            if key in real_files or key in linked:
                continue  # a link to a file that is already listed: counted once
            linked.add(key)
        kept.append((path, label, problem))
    digests = digests_of([(path, problem) for path, _, problem in kept])
    rel = [os.path.relpath(path, top) for path, _, _ in kept]
    labels = np.asarray([label for _, label, _ in kept], dtype=np.int64)
    identity = listing_identity(b"fusion-cache imagefolder 2\n", classes, rel, labels, digests)
    return Source("imagefolder", split, shown_classes, labels, identity, paths=[display_path(r) for r in rel],
                  root=folder, files=rel, digests=digests)
