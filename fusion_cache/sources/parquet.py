"""Parquet files (pyarrow), as the Hugging Face Hub ships datasets: `data/train-00000-of-00004.parquet`,
`test-*`, `validation-*` (or `<split>/0000.parquet`), or any parquet files with an image column (HF `Image`
structs of `bytes` and `path`, or raw bytes) and a label column (`ClassLabel` ints named by the HF features
in the file's metadata, else ints or class names). Read in streamed record batches: one batch of rows in
memory at a time, whatever the file's size."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FusionCacheError
from ..files import display_path
from . import columns
from .base import ItemReader, Listing

NAME = "parquet"
SUFFIX = ".parquet"
BATCH_ROWS = 64  # rows per record batch while listing and reading
READ_BUFFER = 1 << 20  # pyarrow reads column chunks through a buffer of this size, not whole


def files(root: Path, depth: int = 2) -> list[str]:
    """The parquet files at `root` (itself, when it is one), or under it at most `depth` folders down, as sorted
    paths relative to it. Hidden folders are skipped."""
    if root.is_file():
        return [root.name] if root.name.lower().endswith(SUFFIX) else []
    found = []
    top = str(root)
    for folder, dirs, names in os.walk(top):
        rel = os.path.relpath(folder, top)
        level = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth else []
        found += [os.path.normpath(os.path.join(rel, n)) for n in names if n.lower().endswith(SUFFIX)]
    return sorted(found)


def detect(root: Path) -> str | None:
    try:
        found = files(root)
    except OSError:
        return None
    if not found:
        return None
    return f"{len(found)} parquet file{'s' if len(found) > 1 else ''}"


def check_root(root: Path) -> None:
    if not os.path.exists(root):
        raise FusionCacheError(f"--data-root {display_path(root)} does not exist; pass a parquet file or a folder of them")
    if not files(root):
        raise FusionCacheError(f"--data-root {display_path(root)} holds no .parquet files; pass a parquet file or a "
                               "folder of them (the Hub layout: data/train-*.parquet)")


def test_split(root: Path) -> str | None:
    splits = columns.by_split(files(root), "parquet files", display_path(root))
    return next((s + "-*.parquet" for s in ("test", "val") if s in splits), None)


class Reader(ItemReader):
    """Reads one image by (file, row group, row in the group): the group's rows stream in batches, kept while
    the rows asked for move forward, so items read in order pass through each file once."""

    def __init__(self, image_column: str):
        self.image_column = image_column

    def read(self, key) -> bytes:
        path, group, row = key
        state = getattr(self, "_at", None)
        if state is None or state[0] != (path, group) or row < state[1]:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path, buffer_size=READ_BUFFER)
            batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[self.image_column])
            state = self._at = [(path, group), 0, [], batches]
        while row >= state[1] + len(state[2]):
            state[1] += len(state[2])
            try:
                batch = next(state[3])
            except StopIteration:
                raise FusionCacheError(f"{display_path(path)} has no row {row} in row group {group}: it changed after "
                                       "it was listed; run the same command again") from None
            state[2] = [columns.cell_bytes(v) for v in batch.column(self.image_column).to_pylist()]
        return state[2][row - state[1]]


def load(root: Path, options) -> Listing:
    """Every parquet file at `root`, split by file names (else one "all" split, to be split for you)."""
    check_root(root)
    image = options.image_column or columns.IMAGE_COLUMN
    label = options.label_column or columns.LABEL_COLUMN
    top = root.parent if root.is_file() else root
    shown = display_path(root)
    groups = columns.by_split(files(root), "parquet files", shown)
    import pyarrow.parquet as pq

    items: dict[str, columns.Items] = {}
    names = None
    for split, rels in groups.items():
        its = items[split] = columns.Items()
        for rel in rels:
            path = os.path.join(os.getcwd(), top, rel)
            where = display_path(rel)
            try:
                pf = pq.ParquetFile(path, buffer_size=READ_BUFFER)
            except Exception as e:
                raise FusionCacheError(f"cannot read {where} as parquet ({type(e).__name__}: "
                                       f"{display_path(str(e))[:150]}); fix or remove it") from None
            columns.check_columns(pf.schema_arrow, image, label, where)
            feats = columns.features(pf.schema_arrow.metadata)
            these = columns.class_names(feats, label)
            if names is not None and these is not None and these != names:
                raise FusionCacheError(f"{where} names other classes than the parquet files before it; give every "
                                       "file the same ClassLabel")
            names = these if these is not None else names
            start = 0
            for group in range(pf.metadata.num_row_groups):
                row = 0
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[image, label]):
                    at = start + row
                    for k, (blob, value) in enumerate(columns.rows(batch, image, label,
                                                                    lambda k: f"row {at + k} of {where}")):
                        its.add(f"{where}[{at + k}]", (path, group, row + k), blob, value)
                    row += batch.num_rows
                start += row
        if not its.names:
            raise FusionCacheError(f"the {split} parquet files of {shown} hold no rows; add rows or remove them")
    tag = f"fusion-cache parquet 1\n{image}\n{label}\n".encode()
    given = columns.sources(NAME, tag, items, Reader(image), names, where=f"{shown}: ")
    return Listing(NAME, given, {s: columns.files_named(rels) for s, rels in groups.items()})
