"""Items inside containers (parquet files, `save_to_disk` folders, tar shards) made into Sources: each item's
image bytes hashed as they stream past, raw labels turned into classes once every split is read, and the
image and label columns of Arrow tables read the way Hugging Face stores them (an `Image` struct of
`bytes` and `path`, or raw bytes; labels as `ClassLabel` ints with their names in the features, or plain
ints or strings). No container is opened here: each source module owns its format and its `ItemReader`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import FusionCacheError, quote
from ..files import listing_identity
from .base import ItemReader, Source

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


@dataclass
class Items:
    """One split's items as a container source lists them, in order: display names, reader keys, content
    digests and raw labels (ints or strings, as stored)."""

    names: list[str] = field(default_factory=list)
    keys: list = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    raw: list = field(default_factory=list)

    def add(self, name: str, key, data: bytes | str, label) -> None:
        """One item: its image bytes (hashed here, not kept), or their sha256 already computed."""
        self.names.append(name)
        self.keys.append(key)
        self.digests.append(data if isinstance(data, str) else hashlib.sha256(data).hexdigest())
        self.raw.append(label)


def sources(dataset: str, tag: bytes, items: dict[str, Items], reader: ItemReader, names: list[str] | None = None,
            where: str = "") -> dict[str, Source]:
    """{split: Source} with one class list for every split: `names` (ClassLabel names, indexed by the raw ints)
    when given, else the raw labels' distinct values (ints in numeric order, strings in sorted order, as an
    image folder sorts its class folders). `tag` (the source, its options) starts each identity."""
    raw = [v for its in items.values() for v in its.raw]
    if names is not None:
        bad = next((v for v in raw if not isinstance(v, (int, np.integer)) or not 0 <= v < len(names)), None)
        if bad is not None:
            raise FusionCacheError(f"{where}a label is {bad!r}, which is not one of the {len(names)} class indices of "
                                   "its ClassLabel; give every image a label (an unlabelled split cannot be cached)")
        classes = list(names)
        index = {i: i for i in range(len(names))}
    else:
        kinds = {type(v) for v in raw}
        if not kinds <= {int, str} or len(kinds) > 1:
            raise FusionCacheError(f"{where}labels must be all integers or all class names, and they are "
                                   f"{', '.join(sorted(k.__name__ for k in kinds))}; store one kind")
        values = sorted(set(raw))
        classes = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
    if len(classes) < 2:
        raise FusionCacheError(f"{where}all images have one label ({classes[0] if classes else 'none'}); a classifier "
                               "needs at least two classes")
    if "train" in items and names is None:  # a class seen only outside train is a mistake (an unlabelled -1?)
        in_train = set(items["train"].raw)
        for split, its in items.items():
            stray = next((v for v in its.raw if v not in in_train), None)
            if stray is not None:
                raise FusionCacheError(f"{where}class {quote(str(stray))} is in {split} but not in train; give train "
                                       f"images of every class, or remove its {split} images (an unlabelled split, "
                                       "-1, cannot be cached)")
    out = {}
    for split, its in items.items():
        labels = np.asarray([index[v] for v in its.raw], dtype=np.int64)
        identity = listing_identity(tag + f"{split}\n".encode(), classes, its.names, labels, its.digests)
        out[split] = Source(dataset, split, classes, labels, identity, paths=its.names, digests=its.digests,
                            reader=reader, keys=its.keys)
    return out


def features(metadata: dict | None) -> dict:
    """The Hugging Face features stored in an Arrow schema's metadata ({} when there are none)."""
    text = (metadata or {}).get(b"huggingface")
    if not text:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return (info.get("info") or {}).get("features") or {}


def class_names(feats: dict, label_column: str) -> list[str] | None:
    """The ClassLabel names of `label_column`, or None when it is not a ClassLabel."""
    feat = feats.get(label_column) or {}
    if feat.get("_type") == "ClassLabel" and feat.get("names"):
        return [str(n) for n in feat["names"]]
    return None


def check_columns(schema, image_column: str, label_column: str, where: str) -> None:
    """Both columns present, the image column of images (an Image struct or bytes): else one line with the fix."""
    import pyarrow as pa

    names = schema.names
    for column, flag in ((image_column, "--image-column"), (label_column, "--label-column")):
        if column not in names:
            raise FusionCacheError(f"{where} has no column {quote(column)} (its columns: {', '.join(names)}); pass "
                                   f"{flag} NAME")
    kind = schema.field(image_column).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        kind = kind.field("bytes").type
    ok = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not ok:
        raise FusionCacheError(f"column {quote(image_column)} of {where} holds {schema.field(image_column).type}, not "
                               "images (an Image struct of bytes and path, or raw bytes); pass --image-column with "
                               "the image column")


def rows(batch, image_column: str, label_column: str, where: str):
    """(image bytes, raw label) of each row of an Arrow record batch or table."""
    import pyarrow as pa

    images = batch.column(image_column)
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    data = images.field("bytes") if pa.types.is_struct(images.type) else images
    for k, (blob, label) in enumerate(zip(data.to_pylist(), batch.column(label_column).to_pylist())):
        if blob is None:
            raise FusionCacheError(f"{where(k)} has no image bytes (only a path, or nothing); store the images in the "
                                   "dataset (Hugging Face: push or save it with the images embedded)")
        if label is None:
            raise FusionCacheError(f"{where(k)} has no label; give every image a label (an unlabelled split cannot "
                                   "be cached)")
        yield blob, label


def cell_bytes(value) -> bytes:
    """An image cell's bytes: an Image struct's `bytes`, or the raw bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value or b""


def split_in_name(relative: str) -> str | None:
    """The split a shard's or a part file's name gives (`train-00000-of-00004.parquet`, `test-000001.tar`,
    `data/validation/0000.parquet`): the first word of its name, else its closest folder named like a split."""
    import re

    from .base import SPLIT_NAMES

    parts = relative.replace("\\", "/").split("/")
    first = re.split(r"[-_.]", parts[-1], maxsplit=1)[0].lower()
    if first in SPLIT_NAMES:
        return SPLIT_NAMES[first]
    return next((SPLIT_NAMES[p.lower()] for p in reversed(parts[:-1]) if p.lower() in SPLIT_NAMES), None)


def files_named(rels: list[str]) -> str:
    """How messages and the split record name a split's files: the first, and how many more."""
    from ..files import display_path

    return display_path(rels[0]) + (f" and {len(rels) - 1} more" if len(rels) > 1 else "")


def by_split(files: list[str], what: str, root_shown: str) -> dict[str, list[str]]:
    """{given split: files} from the files' names ("all" when no name gives a split); a mix of named and
    unnamed files is an error that names one of each."""
    found = {f: split_in_name(f) for f in files}
    named = [f for f, s in found.items() if s]
    unnamed = [f for f, s in found.items() if not s]
    if named and unnamed:
        raise FusionCacheError(f"{root_shown} holds {what} named for a split ({named[0]}) and {what} that are not "
                               f"({unnamed[0]}); name every one train-*, test-* or validation-*, or none")
    out: dict[str, list[str]] = {}
    for f in files:
        out.setdefault(found[f] or "all", []).append(f)
    if named and "train" not in out:
        raise FusionCacheError(f"{root_shown} holds {what} for {', '.join(out)} but none for train; add train-* "
                               f"{what}, or name none of them for a split (one is then made for you)")
    return {s: out[s] for s in ("all", "train", "val", "test") if s in out}
