"""WebDataset shards: plain tar files (`train-000000.tar`, ...) whose members are grouped into samples by key,
the member name up to the first dot of its base name (`abc.jpg` and `abc.cls` are sample `abc`), as the
`webdataset` package groups them. A sample's image is its `jpg`, `jpeg`, `png` or `webp` member; its label
the text of its `cls` member (an integer, or a class name), else the `label` field of its `json` member
(`--label-key` names another member or field). Read with the standard `tarfile`, one member at a time: a
shard is never loaded whole, and an image is read later by its offset in the shard."""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

from ..errors import FusionCacheError, quote
from ..files import display_path
from . import columns
from .base import SPLIT_NAMES, ItemReader, Listing

NAME = "wds"
SUFFIX = ".tar"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # in this order of preference when a sample has several
LABEL_FIELD = "label"  # of a json member, when there is no cls member and no --label-key
OPEN_SHARDS = 8  # shard files a reader keeps open, per process


def shards(root: Path) -> list[str]:
    """The tar shards at `root` (itself, when it is one), directly in it, or in its split folders (`train/`,
    `test/`, ...), sorted, relative to it."""
    return _scan(root)[0]


def _scan(root: Path) -> tuple[list[str], bool]:
    """(`shards(root)`, whether `root` also holds other folders: then it is an image folder with a stray tar,
    not a WebDataset)."""
    if root.is_file():
        return ([root.name] if root.name.lower().endswith(SUFFIX) else []), False
    found, other = [], False
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            if e.name.lower() not in SPLIT_NAMES:
                other = True
                continue
            with os.scandir(e.path) as inner:
                names = sorted(i.name for i in inner if not i.name.startswith("."))
            tars = [n for n in names if n.lower().endswith(SUFFIX) and os.path.isfile(os.path.join(e.path, n))]
            found += [f"{e.name}/{n}" for n in tars]
            other = other or len(tars) < len(names) and any(os.path.isdir(os.path.join(e.path, n)) for n in names)
        elif e.name.lower().endswith(SUFFIX) and e.is_file():
            found.append(e.name)
    return found, other


def detect(root: Path) -> str | None:
    try:
        found, other = _scan(root)
    except OSError:
        return None
    if not found or other:
        return None
    return f"{len(found)} WebDataset shard{'s' if len(found) > 1 else ''} (.tar)"


def check_root(root: Path) -> None:
    if not os.path.exists(root):
        raise FusionCacheError(f"--data-root {display_path(root)} does not exist; pass a folder of .tar shards")
    if not shards(root):
        raise FusionCacheError(f"--data-root {display_path(root)} holds no .tar shards; pass a .tar shard or a folder "
                               "of them (train-000000.tar, ...)")


def test_split(root: Path) -> str | None:
    splits = columns.by_split(shards(root), "shards", display_path(root))
    return next((s + "-*.tar" for s in ("test", "val") if s in splits), None)


class Reader(ItemReader):
    """Reads one image by (shard, offset, size): `os.pread` on a shard kept open (a few per process)."""

    def read(self, key) -> bytes:
        path, offset, size = key
        fds = self.__dict__.setdefault("_fds", {})
        if path not in fds:
            if len(fds) >= OPEN_SHARDS:
                os.close(fds.pop(next(iter(fds))))
            try:
                fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise FusionCacheError(f"cannot open shard {display_path(path)} ({e.strerror}); put the same data at "
                                       "the same path, and leave it unchanged while extract runs") from None
        return os.pread(fds[path], size, offset)


def _key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, as webdataset splits it: at the first dot of the base name."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m[1], m[2].lower()) if m else (name, "")


def _label(members: dict[str, bytes], label_key: str | None, where: str):
    """A sample's raw label: an int when its text is one, else the text (a class name)."""
    if label_key is None and "cls" in members:
        value = members["cls"].decode("utf-8", "replace").strip()
    elif label_key is not None and label_key.lower() in members and label_key.lower() != "json":
        value = members[label_key.lower()].decode("utf-8", "replace").strip()
    elif "json" in members:
        field = label_key or LABEL_FIELD
        try:
            meta = json.loads(members["json"])
        except ValueError:
            raise FusionCacheError(f"{where}: its json member is not valid JSON; fix the shard") from None
        value = meta.get(field) if isinstance(meta, dict) else None
        if value is None or isinstance(value, (bool, float, list, dict)):
            raise FusionCacheError(f"{where} has no label: its json has no integer or text field {quote(field)}; pass "
                                   "--label-key with the field (or the member) that holds the label")
    else:
        wanted = f"{quote(label_key)} member" if label_key else "cls member"
        raise FusionCacheError(f"{where} has no label: no {wanted} and no json member; pass --label-key with the "
                               "member (or json field) that holds the label, or add .cls files")
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    if isinstance(value, str) and not value:
        raise FusionCacheError(f"{where} has an empty label; give every sample a label")
    return value


def _samples(path: str, shown: str, label_key: str | None):
    """(sample key, (offset, size) of its image, its sha256, raw label) of each sample of one shard, in order.
    The tar is read member by member (TarFile's own list of members is emptied as it goes); each image is
    hashed, not kept, and the samples are checked once the whole shard is read, so a sample whose members
    are apart is named as such."""
    import hashlib

    wanted = {"cls", "json", (label_key or "").lower()} - {""}
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise FusionCacheError(f"cannot read shard {shown} as an uncompressed tar ({e}); WebDataset shards are "
                               "plain .tar files") from None
    with tf:
        current = None
        while True:
            try:
                info = tf.next()
                tf.members = []  # streaming: TarFile would keep every member's header
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = _key(info.name)
                if key != current:
                    if key in samples:
                        raise FusionCacheError(f"shard {shown} holds sample {quote(key)} twice, apart; keep each "
                                               "sample's members together, once")
                    current = key
                    samples[key] = {"members": {}, "image": None}
                    order.append(key)
                sample = samples[key]
                held = sample["image"]
                if ext in IMAGE_KEYS and (held is None or IMAGE_KEYS.index(ext) < IMAGE_KEYS.index(held[2])):
                    if info.issparse():
                        raise FusionCacheError(f"{info.name} in shard {shown} is a sparse tar member; write the "
                                               "shard without --sparse")
                    digest = hashlib.sha256(tf.extractfile(info).read()).hexdigest()  # hashed, not kept
                    sample["image"] = ((info.offset_data, info.size), digest, ext)
                elif ext in wanted:
                    sample["members"][ext] = tf.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise FusionCacheError(f"shard {shown} is damaged ({e}); rewrite it") from None
    for key in order:
        sample = samples[key]
        where = f"sample {quote(key)} of {shown}"
        if sample["image"] is None:
            raise FusionCacheError(f"{where} has no image ({', '.join(IMAGE_KEYS)}); remove it from the shard")
        yield key, sample["image"][0], sample["image"][1], _label(sample["members"], label_key, where)


def load(root: Path, options) -> Listing:
    """Every shard at `root`, split by shard names (else one "all" split, to be split for you)."""
    check_root(root)
    top = root.parent if root.is_file() else root
    shown = display_path(root)
    items: dict[str, columns.Items] = {}
    groups = columns.by_split(shards(root), "shards", shown)
    for split, rels in groups.items():
        its = items[split] = columns.Items()
        for rel in rels:
            path = os.path.join(os.getcwd(), top, rel)
            for key, (offset, size), digest, label in _samples(path, display_path(rel), options.label_key):
                its.add(f"{display_path(rel)}/{display_path(key)}", (path, offset, size), digest, label)
        if not its.names:
            which = "" if split == "all" else f"{split} "
            raise FusionCacheError(f"the {which}shards of {shown} hold no samples; add samples or remove them")
    tag = f"fusion-cache wds 1\n{options.label_key or ''}\n".encode()
    given = columns.sources(NAME, tag, items, Reader(), where=f"{shown}: ")
    return Listing(NAME, given, {s: columns.files_named(rels) for s, rels in groups.items()})
