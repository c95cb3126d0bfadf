"""Leaks and duplicates, from the content digests every source lists: the same bytes in train and test (a leak:
the test score is not a test), the same bytes twice within a split, and the same bytes under two labels."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .files import is_content_digest

EXAMPLES = 3  # names shown in a warning and kept in the cache's record, per finding


class LeakWarning(UserWarning):
    """The same content in train and test, twice in a split, or under two labels."""


def find(splits: dict[str, tuple[list[str], list[str], np.ndarray]], classes: list[str]) -> dict:
    """The record for {split: (names, digests, labels)} of the items a cache holds: counts and a few names.

    - `train_test`: test items whose content is also in train; `train_test_examples`: "test name = train name".
    - `duplicates`: {split: items whose content appeared earlier in the same split}.
    - `label_conflicts`: contents that carry two or more labels; `label_conflict_examples`: their names.
    Items without a content digest (unreadable when listed) are left out.
    """
    first: dict[str, dict[str, str]] = {}  # split -> digest -> first name
    labels_of: dict[str, dict[int, str]] = defaultdict(dict)  # digest -> label -> first name
    duplicates = {}
    for split, (names, digests, labels) in splits.items():
        seen: dict[str, str] = {}
        twice = 0
        for name, digest, label in zip(names, digests, np.asarray(labels).tolist()):
            if not is_content_digest(digest):
                continue
            if digest in seen:
                twice += 1
            else:
                seen[digest] = name
            labels_of[digest].setdefault(int(label), name)
        first[split] = seen
        duplicates[split] = twice
    record: dict = {"duplicates": duplicates}
    if "train" in splits and "test" in splits:
        train = first["train"]
        names, digests, _ = splits["test"]
        pairs = [(n, train[d]) for n, d in zip(names, digests) if d in train]
        side = any(a == b for a, b in pairs[:EXAMPLES])  # names relative to each split's folder: say which is which
        leaked = [f"test {a} = train {b}" if side else f"{a} = {b}" for a, b in pairs]
        record |= {"train_test": len(leaked), "train_test_examples": leaked[:EXAMPLES]}
    conflicts = [by_label for by_label in labels_of.values() if len(by_label) > 1]
    record["label_conflicts"] = len(conflicts)
    record["label_conflict_examples"] = [
        " = ".join(f"{name} ({classes[label]})" for label, name in sorted(c.items())) for c in conflicts[:EXAMPLES]]
    return record


def leak_line(record: dict, fail: bool = False) -> str | None:
    """The train/test finding in one line (None without one): a warning, or with `fail` the error of
    --on-leak fail."""
    if not record.get("train_test"):
        return None
    fix = "or drop --on-leak fail to extract anyway" if fail else "or pass --on-leak fail to stop on this"
    return (f"{record['train_test']} test image(s) have the same content as a train image (a leak: "
            f"{'; '.join(record['train_test_examples'])}); remove them from one split, {fix}")


def warnings_for(record: dict) -> list[str]:
    """One line per finding, for the command line."""
    out = [leak_line(record)] if record.get("train_test") else []
    dup = {s: n for s, n in record.get("duplicates", {}).items() if n}
    if dup:
        out.append("the same content appears more than once within a split (" +
                   ", ".join(f"{s}: {n} extra cop{'y' if n == 1 else 'ies'}" for s, n in dup.items()) +
                   "); remove the copies to count each image once")
    if record.get("label_conflicts"):
        out.append(f"{record['label_conflicts']} image content(s) carry two or more labels "
                   f"({'; '.join(record['label_conflict_examples'])}); give each image one label")
    return out


def summary(record: dict) -> str:
    """One line for `info` and the report."""
    if not record:
        return "not checked (made before fusion-cache reported leaks)"
    dup = record.get("duplicates", {})
    return (f"{record.get('train_test', 0)} test image(s) also in train; duplicates within a split: "
            + ", ".join(f"{s} {n}" for s, n in dup.items())
            + f"; contents under two labels: {record.get('label_conflicts', 0)}")
