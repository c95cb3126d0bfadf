"""The cache's train and test splits from the splits a dataset ships with, or made for you.

A dataset with a test split keeps it (`test/`, or `val/` when there is no `test/`). A `val/` beside a `test/` is
the validation split that tuning chooses on: its items are cached after train's, in the train split, and the
cache records where they start (`validation_from`), so `fit` trains on train + val and the tuned protocol
chooses on val instead of carving a validation split out of train.

A dataset without a test split is split for you: an item goes to test when a hash of the split seed and its
content digest falls under the test fraction. Each item's place is a function of its own bytes and the seed
alone, so adding images never moves existing ones, and the same image twice (a duplicate) always lands on
one side. Every class is split at the same rate (stratified in expectation, not in exact counts); a class
that would otherwise have no train image, or (with 2 or more distinct images) no test image, gets one: its
image with the highest (lowest) hash moves, with every copy of it, and may move back once the class grows.
(No rule can both keep each class's counts exact and never move an image when others are added: the first
image of a class must be in train, and then every image would be.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import FusionCacheError, quote
from .files import is_content_digest
from .sources.base import Listing, Source

DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


@dataclass
class Splits:
    """The cache's splits and how they were made (`record`, stored in the cache as its `split` attribute)."""

    train: Source
    test: Source
    record: dict

    @property
    def validation_from(self) -> int | None:
        """Train source positions from here on are the given validation split; None when there is none."""
        return self.record.get("validation_from")

    def assignment(self) -> list[tuple[str, Source]]:
        """(split as a manifest names it, source) with the given validation items under `val`."""
        if self.validation_from is None:
            return [("train", self.train), ("test", self.test)]
        n = self.validation_from
        return [("train", self.train.take(np.arange(n), "train")),
                ("val", self.train.take(np.arange(n, len(self.train)), "val")), ("test", self.test)]


def keys(digests: list[str], names: list[str], seed: int) -> np.ndarray:
    """Each item's place in [0, 1): sha256 of the seed and its content digest (of its name too when it has no
    digest because it could not be read), as a fraction."""
    out = np.empty(len(digests), dtype=np.float64)
    for i, (digest, name) in enumerate(zip(digests, names)):
        what = digest if is_content_digest(digest) else f"{digest}\0{name}"
        h = hashlib.sha256(f"fusion-cache split 1\n{seed}\n{what}".encode("utf-8", "surrogatepass")).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64
    return out


def auto_test_mask(digests: list[str], names: list[str], labels: np.ndarray, fraction: float,
                   seed: int) -> np.ndarray:
    """True for the items that go to test (see the module's docstring)."""
    u = keys(digests, names, seed)
    test = u < fraction
    labels = np.asarray(labels)
    for c in np.unique(labels):  # copies of one image share a key, and move together
        members = np.flatnonzero(labels == c)
        if test[members].all():  # no train image: the highest key goes back to train
            test[u == u[members].max()] = False
        if len(np.unique(u[members])) >= 2 and not test[members].any():  # no test image: the lowest key goes to test
            test[u == u[members].min()] = True
    return test


def make_splits(listing: Listing, test_fraction: float | None = None, split_seed: int | None = None) -> Splits:
    """The cache's train and test sources from `listing`; `test_fraction` and `split_seed` apply only to a
    dataset without a test split (None: their defaults), and are refused for one that has one."""
    given, where = listing.given, listing.where
    test_name = "test" if "test" in given else "val" if "val" in given else None
    if test_name is not None:
        if test_fraction is not None or split_seed is not None:
            flag = "--test-fraction" if test_fraction is not None else "--split-seed"
            raise FusionCacheError(f"{flag} applies to a dataset without a test split, and this one has one "
                                   f"({where[test_name]}); drop {flag}")
        train, test = given["train"], given[test_name]
        _same_classes(train, test, listing)
        record = {"method": "given", "train": where["train"], "test": where[test_name]}
        if test_name == "test" and "val" in given:
            _same_classes(train, given["val"], listing)
            record |= {"validation": where["val"], "validation_from": len(train)}
            train = train.join(given["val"], "train")
        return Splits(train, test, record)
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    seed = DEFAULT_SPLIT_SEED if split_seed is None else split_seed
    if not 0 < fraction < 1:
        raise FusionCacheError(f"--test-fraction {fraction:g} is out of range; pass a fraction between 0 and 1, "
                               f"such as {DEFAULT_TEST_FRACTION}")
    name = "train" if "train" in given else "all"
    whole = given[name]
    if whole.digests is None:
        raise FusionCacheError(f"{listing.dataset} lists no content digests, so it cannot be split for you")
    if len(whole) < 2:
        raise FusionCacheError(f"{where[name]}: {len(whole)} image(s), too few to split into train and test; "
                               "add images")
    test_mask = auto_test_mask(whole.digests, whole.names, whole.labels, fraction, seed)
    if not test_mask.any():
        raise FusionCacheError(f"{where[name]}: no class has 2 or more distinct images, so none is left for test; "
                               "add images")
    train = whole.take(np.flatnonzero(~test_mask), "train")
    test = whole.take(np.flatnonzero(test_mask), "test")
    record = {"method": "auto", "from": where[name], "test_fraction": fraction, "seed": seed,
              "rule": "an item is in test when sha256(seed, its content) falls under the fraction"}
    return Splits(train, test, record)


def describe(record: dict) -> str:
    """A cache's `split` record in one line, for `info` and the report."""
    if not record:
        return "the dataset's own train and test (made before schema 4)"
    if record.get("method") == "auto":
        return (f"made for you from {record['from']}: {100 * record['test_fraction']:g}% of each class to test by "
                f"content hash, split seed {record['seed']}")
    line = f"given: train {record['train']}, test {record['test']}"
    if record.get("validation"):
        line += (f", validation {record['validation']} (cached in train from source position "
                 f"{record['validation_from']}; tuning chooses on it)")
    return line


def as_recorded(listing: Listing, record: dict) -> Splits:
    """The splits a cache's `split` record describes, made again from `listing`. An older cache (no record)
    had its dataset's train and test only: a val/ beside them was not read then, and is not joined now."""
    if record.get("method") == "auto":
        return make_splits(listing, float(record["test_fraction"]), int(record["seed"]))
    if not record and "train" in listing.given and "test" in listing.given:
        return Splits(listing.given["train"], listing.given["test"], {})
    return make_splits(listing)


def _same_classes(train: Source, other: Source, listing: Listing) -> None:
    if train.classes == other.classes:
        return
    only_other = [c for c in other.classes if c not in train.classes]
    only_train = [c for c in train.classes if c not in other.classes]
    c, has, lacks = (only_other[0], other.split, "train") if only_other else (only_train[0], "train", other.split)
    if listing.dataset == "manifest":
        fix = (f"{train.split} and {other.split} must hold the same classes: add {lacks} rows labelled {quote(c)}, "
               f"or remove its {has} rows")
    else:
        fix = f"{train.split} and {other.split} must hold the same class folders"
    raise FusionCacheError(f"class {quote(c)} is in {has} but not in {lacks}; {fix}")
