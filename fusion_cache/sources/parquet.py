"""Parquet files (pyarrow), as the Hugging Face Hub ships datasets: `data/train-00000-of-00004.parquet`,
`test-*`, `validation-*` (or `<split>/0000.parquet`), or any parquet files with an image column (HF `Image`
structs of `bytes` and `path`, or raw bytes) and a label column (`ClassLabel` ints named by the HF features
in the file's metadata, else ints or class names). Read in streamed record batches, one row group at a time:
pyarrow holds the row group's image column in memory while it reads it, so memory is bounded by the largest
row group, not the file (Hugging Face writes image datasets in groups of 100 rows; a file with row groups
over LARGE_ROW_GROUP is read with a warning that says how to rewrite it)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import FusionCacheError
from ..files import display_path, has_image_extension
from . import columns
from .base import SPLIT_NAMES, ItemReader, Listing

NAME = "parquet"
SUFFIX = ".parquet"
BATCH_ROWS = 64  # rows per record batch while listing and reading
READ_BUFFER = 1 << 20  # pyarrow reads column chunks through a buffer of this size
LARGE_ROW_GROUP = 256 << 20  # bytes: pyarrow holds a row group's column in memory while it reads it; warn above


def files(root: Path, depth: int = 2) -> list[str]:
    """The parquet files at `root` (itself, when it is one), or under it at most `depth` folders down, as sorted
    paths relative to it. Hidden folders are skipped."""
    return _walk(root, depth)[0]


def _walk(root: Path, depth: int = 2) -> tuple[list[str], bool]:
    """(`files(root)`, whether the folders walked also hold images: then it is an image folder with a stray
    parquet file, not a parquet dataset)."""
    if root.is_file():
        return ([root.name] if root.name.lower().endswith(SUFFIX) else []), False
    found, images = [], False
    top = str(root)
    for folder, dirs, names in os.walk(top):
        rel = os.path.relpath(folder, top)
        level = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth else []
        found += [os.path.normpath(os.path.join(rel, n)) for n in names if n.lower().endswith(SUFFIX)]
        images = images or any(has_image_extension(n) for n in names)
    return sorted(found), images


def configs(rels: list[str]) -> list[str]:
    """The folders that hold a configuration's files each (the Hub's `<config>/train-*.parquet` or
    `<config>/<split>/*.parquet`): a file's folder, less a last part named for a split."""
    out = []
    for rel in rels:
        parts = rel.replace(os.sep, "/").split("/")[:-1]
        if parts and parts[-1].lower() in SPLIT_NAMES:
            parts = parts[:-1]
        out.append("/".join(parts))
    return sorted(set(out))


def _files_of_one_config(root: Path) -> list[str]:
    found = files(root)
    held = configs(found)
    if len(held) > 1:
        names = ", ".join(f"{c or '.'}/" for c in held[:4])
        raise FusionCacheError(f"{display_path(root)} holds the parquet files of several configurations ({names}); "
                               "pass the folder of one of them as --data-root")
    return found


def detect(root: Path) -> str | None:
    try:
        found, images = _walk(root)
    except OSError:
        return None
    if not found or images:
        return None
    return f"{len(found)} parquet file{'s' if len(found) > 1 else ''}"


def check_root(root: Path) -> None:
    if not os.path.exists(root):
        raise FusionCacheError(f"--data-root {display_path(root)} does not exist; pass a parquet file or a folder of them")
    if not files(root):
        raise FusionCacheError(f"--data-root {display_path(root)} holds no .parquet files; pass a parquet file or a "
                               "folder of them (the Hub layout: data/train-*.parquet)")


def test_split(root: Path) -> str | None:
    splits = columns.by_split(_files_of_one_config(root), "parquet files", display_path(root))
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
    groups = columns.by_split(_files_of_one_config(root), "parquet files", shown)
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
            largest = max((pf.metadata.row_group(g).total_byte_size for g in range(pf.metadata.num_row_groups)),
                          default=0)
            if largest > LARGE_ROW_GROUP:
                warnings.warn(f"{where} has row groups of up to {largest / 2**20:.0f} MB, and each reader holds one "
                              "in memory; write it with smaller row groups (pyarrow.parquet.write_table(..., "
                              "row_group_size=100), as datasets writes images) to bound memory", ResourceWarning,
                              stacklevel=2)
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
            which = "" if split == "all" else f"{split} "
            raise FusionCacheError(f"the {which}parquet files of {shown} hold no rows; add rows or remove them")
    tag = f"fusion-cache parquet 1\n{image}\n{label}\n".encode()
    given = columns.sources(NAME, tag, items, Reader(image), names, where=f"{shown}: ")
    return Listing(NAME, given, {s: columns.files_named(rels) for s, rels in groups.items()})
