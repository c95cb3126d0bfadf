"""What every source gives: `Source` (one split's items: labels, and pixels or files with their content digests)
and `Listing` (the splits a dataset ships with, before `split.py` decides train, test and validation)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..decode import decode_bytes, read_image
from ..errors import FusionCacheError

SPLITS = ("train", "test")  # the splits a cache holds
GIVEN_SPLITS = ("all", "train", "test", "val")  # what a source can list: "all" when it has no split at all
SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test", "val": "val", "valid": "val",
               "validation": "val"}  # folder and manifest names of the splits, lower case (matched in any case)


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
    #                                 one line, valid UTF-8; see files.display_path), as listed and stored in caches
    root: Path | None = None
    notes: list[str] = field(default_factory=list)  # integrity notes only (extract records their absence)
    files: list[str] | None = None  # image folders: the real relative file names (os.fsdecode'd), to open
    digests: list[str] | None = None  # each item's sha256 as listed (files: or why it cannot be read; pixels: of them)
    roots: list[Path] | None = None  # per item, when items come from several folders (train/ and val/ joined)
    reader: "ItemReader | None" = None  # containers (parquet, hf, wds): reads an item's bytes by its key
    keys: list | None = None  # containers: each item's key for `reader` (where in which file its bytes are)

    def __len__(self) -> int:
        return len(self.labels)

    def file(self, index: int) -> str:
        """The absolute path of item `index`'s file, as given: links are not resolved and `..` is not folded
        away (`a/link/../x` is where the link's target's parent holds x, as the kernel reads it)."""
        files = self.files if self.files is not None else self.paths
        root = self.roots[index] if self.roots is not None else self.root
        return os.path.join(os.getcwd(), root, files[index])

    def image(self, index: int) -> torch.Tensor:
        """The source image at `index` as uint8 (3, H, W) RGB; raises BadImage for undecodable files."""
        if self.images is not None:
            return torch.from_numpy(self.images[index])
        if self.reader is not None:
            return decode_bytes(self.reader.read(self.keys[index]), self.paths[index])
        return read_image(self.file(index), name=self.paths[index])

    def take(self, indices: np.ndarray, split: str) -> "Source":
        """The items at `indices` (in that order) as a source of their own, named `split`. Its identity is this
        source's identity and the positions taken, so it changes with the content and with the choice."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        identity = hashlib.sha256(f"take {split}\n{self.identity}\n".encode() + idx.tobytes()).hexdigest()
        return replace(self, split=split, labels=self.labels[idx], identity=identity,
                       images=None if self.images is None else self.images[idx], paths=pick(self.paths),
                       files=pick(self.files), digests=pick(self.digests), roots=pick(self.roots), keys=pick(self.keys))

    def join(self, other: "Source", split: str) -> "Source":
        """This source's items, then `other`'s (same classes), as one source named `split`."""
        if self.classes != other.classes:
            raise FusionCacheError(f"the {self.split} and {other.split} splits hold different classes; "
                                   "give every split the same class folders")
        if (self.images is None) != (other.images is None) or self.reader != other.reader:
            raise FusionCacheError(f"the {self.split} and {other.split} splits are stored in different ways; store "
                                   "them alike")
        identity = hashlib.sha256(f"join {split}\n{self.identity}\n{other.identity}\n".encode()).hexdigest()
        both = (lambda a, b: None if a is None or b is None else list(a) + list(b))
        roots = [self.root] * len(self) if self.roots is None else self.roots
        other_roots = [other.root] * len(other) if other.roots is None else other.roots
        images = None if self.images is None else np.concatenate([self.images, other.images])
        files = images is None and self.reader is None
        return replace(self, split=split, labels=np.concatenate([self.labels, other.labels]), identity=identity,
                       images=images, paths=both(self.paths, other.paths), files=both(self.files, other.files),
                       digests=both(self.digests, other.digests), roots=roots + other_roots if files else None,
                       keys=both(self.keys, other.keys),
                       notes=list(dict.fromkeys(self.notes + other.notes)))

    @property
    def names(self) -> list[str]:
        """Each item's name as messages show it: its display path, or its position for in-memory images."""
        if self.paths is not None:
            return list(self.paths)
        return [f"{self.split}[{i}]" for i in range(len(self))]


class ItemReader:
    """Reads the bytes of items that live inside container files (a parquet row, a tar member, a row of a
    `save_to_disk` folder), given each item's key. One subclass per container, owned by its source module. It
    pickles (a Ray worker and each DataLoader worker gets a copy) and keeps open files and the last chunk read
    per process, never pickled: items read in plan order stream through each file once."""

    def read(self, key) -> bytes:
        raise NotImplementedError

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __eq__(self, other):
        return type(self) is type(other) and self.__getstate__() == other.__getstate__()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.__getstate__().items()))))


@dataclass
class Listing:
    """The splits a dataset ships with, as its source found them (`given`: keys in GIVEN_SPLITS), and where:
    `where[split]` is how messages name each one (`train/`, `val/`, `split column`)."""

    dataset: str
    given: dict[str, Source]
    where: dict[str, str] = field(default_factory=dict)
    downloadable: bool = False  # CIFAR-10: a built-in dataset that has its own test split
