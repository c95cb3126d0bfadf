"""The class-stratified subset sampler (`--train-size`, `--test-size`): which source items a cache holds."""

from __future__ import annotations

import numpy as np

from .errors import FusionCacheError

SPLITS = ("train", "test")


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
