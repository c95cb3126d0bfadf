"""Hugging Face `save_to_disk` folders: a `Dataset` (`state.json` and `dataset_info.json` beside its `.arrow`
files) or a `DatasetDict` (`dataset_dict.json` and a folder per split), read with the `datasets` package
(`pip install 'fusion-cache[hf]'`) as it is meant to be read: `load_from_disk`, memory-mapped, iterated in
Arrow batches. The image and label columns are read as in parquet files (`columns.py`): HF `Image` structs
or bytes, `ClassLabel` names from the dataset's features. Splits are the DatasetDict's: train, test and
validation (any of SPLIT_NAMES); a split by another name (`unlabeled`, ...) is left out, and said so."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FusionCacheError
from ..files import display_path
from . import columns
from .base import SPLIT_NAMES, ItemReader, Listing

NAME = "hf"
BATCH_ROWS = 64
DICT_FILE = "dataset_dict.json"
STATE_FILE = "state.json"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise FusionCacheError("reading a save_to_disk folder needs the datasets package; pip install "
                               "'fusion-cache[hf]'") from None
    return datasets


def _splits_file(root: Path) -> list[str] | None:
    """The split names a DatasetDict folder lists, or None when `root` is not one."""
    try:
        with open(root / DICT_FILE, encoding="utf-8") as f:
            splits = json.load(f).get("splits")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(s) for s in splits] if isinstance(splits, list) else None


def detect(root: Path) -> str | None:
    if not root.is_dir():
        return None
    splits = _splits_file(root)
    if splits is not None:
        left = [s for s in splits if s.lower() not in SPLIT_NAMES]
        kept = ", ".join(s for s in splits if s not in left) + (f"; {', '.join(left)} left out" if left else "")
        return f"a Hugging Face DatasetDict saved with save_to_disk ({kept})"
    if (root / STATE_FILE).is_file() and (root / "dataset_info.json").is_file():
        return "a Hugging Face Dataset saved with save_to_disk"
    return None


def check_root(root: Path) -> None:
    if not detect(root):
        raise FusionCacheError(f"--data-root {display_path(root)} is not a save_to_disk folder (no {DICT_FILE}, or "
                               f"{STATE_FILE} with dataset_info.json); pass the folder that save_to_disk wrote")


def test_split(root: Path) -> str | None:
    splits = {SPLIT_NAMES.get(s.lower()): s for s in (_splits_file(root) or [])}
    return next((f"{splits[s]}/" for s in ("test", "val") if s in splits), None)


class Reader(ItemReader):
    """Reads one image by (folder, split, row): the dataset loaded once per process, memory-mapped."""

    def __init__(self, image_column: str):
        self.image_column = image_column

    def read(self, key) -> bytes:
        folder, split, row = key
        loaded = self.__dict__.setdefault("_loaded", {})
        if (folder, split) not in loaded:
            ds = _datasets().load_from_disk(folder)
            ds = ds[split] if split is not None else ds
            loaded[(folder, split)] = ds.select_columns([self.image_column]).with_format("arrow")
        table = loaded[(folder, split)][row]
        return columns.cell_bytes(table.column(self.image_column)[0].as_py())


def load(root: Path, options) -> Listing:
    """Every split of the folder (a plain Dataset: one "all" split, to be split for you)."""
    check_root(root)
    image = options.image_column or columns.IMAGE_COLUMN
    label = options.label_column or columns.LABEL_COLUMN
    shown = display_path(root)
    folder = os.path.join(os.getcwd(), root)
    try:
        loaded = _datasets().load_from_disk(folder)
    except FusionCacheError:
        raise
    except Exception as e:
        raise FusionCacheError(f"cannot load {shown} with datasets.load_from_disk ({type(e).__name__}: "
                               f"{display_path(str(e))[:150]}); fix it, or save it again") from None
    if hasattr(loaded, "keys"):  # a DatasetDict
        chosen: dict[str, str] = {}
        for s in loaded.keys():
            given = SPLIT_NAMES.get(s.lower())
            if given in chosen:
                raise FusionCacheError(f"{shown} holds both {chosen[given]} and {s} for one split; keep one of them")
            if given:
                chosen[given] = s
        if "train" not in chosen:
            raise FusionCacheError(f"{shown} has the splits {', '.join(loaded.keys())} and none is train; save the "
                                   "training split as train")
        parts = {given: (name, loaded[name]) for given, name in chosen.items()}
    else:
        parts = {"all": (None, loaded)}
    items: dict[str, columns.Items] = {}
    names = None
    for given, (split, ds) in parts.items():
        where = f"{shown} split {split}" if split else shown
        columns.check_columns(ds.data.schema, image, label, where)
        names = columns.class_names(ds.features.to_dict(), label) or names
        its = items[given] = columns.Items()
        row = 0
        for batch in ds.select_columns([image, label]).with_format("arrow").iter(batch_size=BATCH_ROWS):
            for k, (blob, value) in enumerate(columns.rows(batch, image, label, lambda k: f"row {row + k} of {where}")):
                its.add(f"{split or 'rows'}[{row + k}]", (folder, split, row + k), blob, value)
            row += batch.num_rows
        if not its.names:
            raise FusionCacheError(f"{where} holds no rows; add rows or leave it out")
    tag = f"fusion-cache hf 1\n{image}\n{label}\n".encode()
    given = columns.sources(NAME, tag, items, Reader(image), names, where=f"{shown}: ")
    return Listing(NAME, given, {s: (f"{parts[s][0]}/" if parts[s][0] else "the dataset") for s in given})
