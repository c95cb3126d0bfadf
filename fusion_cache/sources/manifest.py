"""CSV manifests: a UTF-8 CSV with the header path,label (and optionally split), one row per image, read
strictly (each problem names its row) and safely (never a FIFO, never an endless line)."""

from __future__ import annotations

import codecs
import io
import csv
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FusionCacheError, quote
from ..files import OPEN_FLAGS, digests_of, display_path, file_kind, listing_identity, reason
from .base import SPLIT_NAMES, Listing, Source

NAME = "manifest"
MANIFEST_COLUMNS = ("path", "label", "split")  # split is optional: without it, the rows are split for you
REQUIRED_COLUMNS = ("path", "label")
MAX_MANIFEST_LINE = 1 << 20  # bytes in one line of a manifest; a row is a path, a label and a split
_MANIFEST_HELP = "a UTF-8 CSV whose header names the columns path,label and, optionally, split"


@dataclass
class _Row:
    path: str  # as written in the manifest
    label: str
    split: str
    problem: str  # why the file cannot be an image, from stat alone ("" when it is a regular file)


def _short(text: str, limit: int = 100) -> str:
    """A value from the manifest as an error message shows it: printable, and cut after `limit` characters."""
    return quote(display_path(text), limit, marks=False)


def _open_manifest(path: Path):
    """The manifest opened for binary reading: opened non-blocking and checked with fstat, so a FIFO or a
    device given as the manifest is refused, never read."""
    shown = display_path(path)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise FusionCacheError(
            f"manifest {shown} does not exist; pass --data-root the path of {_MANIFEST_HELP}"
        ) from None
    except OSError as e:
        raise FusionCacheError(f"cannot read manifest {shown} ({reason(e)}); fix its permissions") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise FusionCacheError(f"cannot read manifest {shown} ({reason(e)}); fix it or pass another file") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FusionCacheError(f"manifest {shown} is {file_kind(mode)}, not a CSV file; pass --data-root the path of "
                               f"{_MANIFEST_HELP}")
    return os.fdopen(fd, "rb")


def _manifest_lines(f, shown: str, count: list[int]):
    """The manifest's lines decoded as UTF-8, one at a time and at most MAX_MANIFEST_LINE bytes each, so a
    binary file or one endless line fails with its line number instead of filling memory. `count[0]`: lines read."""
    while True:
        raw = f.readline(MAX_MANIFEST_LINE + 1)
        if not raw:
            return
        count[0] += 1
        if len(raw) > MAX_MANIFEST_LINE:
            raise FusionCacheError(f"manifest {shown} row {count[0]} is over {MAX_MANIFEST_LINE >> 20} MiB long; "
                                   f"pass {_MANIFEST_HELP}, one row per image")
        if count[0] == 1 and raw.startswith(codecs.BOM_UTF8):  # as spreadsheets save UTF-8
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FusionCacheError(
                f"manifest {shown} row {count[0]} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                "of the row); save the manifest as UTF-8 CSV"
            ) from None


def _csv_rows(f, shown: str):
    """(row number, fields) for every non-blank row; csv errors become one-line FusionCacheErrors."""
    count = [0]
    reader = csv.reader(_manifest_lines(f, shown, count), strict=True)
    while True:
        number = count[0] + 1  # the line where the next row starts
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field limit" in str(e):
                why = (f"has a field over {csv.field_size_limit()} characters (an unclosed quote?); close the quote, "
                       "or shorten the path or label")
            elif "new-line character" in str(e):
                why = r"has a lone carriage return (\r); save the manifest with \n or \r\n line endings"
            else:
                why = (f"is not valid CSV ({e}); write a field that holds a comma or a quote in double quotes, "
                       'with each quote inside doubled ("")')
            raise FusionCacheError(f"manifest {shown} row {number} {why}") from None
        if fields:  # a blank line
            yield number, fields


def _read_manifest(path: Path) -> list[_Row]:
    """Every row of the manifest at `path`, checked: the header, each row's fields, and that each path names
    something that exists and is not a folder. Raises FusionCacheError at the first problem, naming its row."""
    shown = display_path(path)
    folder = path.parent
    rows: list[_Row] = []
    with _open_manifest(path) as f:
        records = _csv_rows(f, shown)
        first = next(records, None)
        if first is None:
            raise FusionCacheError(
                f"manifest {shown} is empty; write a header path,label,split, then one row per image"
            )
        header = [h.strip().lower() for h in first[1]]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            names = " or ".join(filter(None, (", ".join(missing[:-1]), missing[-1])))
            raise FusionCacheError(
                f"manifest {shown} has no {names} column in its header (row {first[0]}); make the first row "
                "path,label or path,label,split"
            )
        twice = next((c for c in MANIFEST_COLUMNS if header.count(c) > 1), None)
        if twice:
            raise FusionCacheError(f"manifest {shown} names the column {twice} twice in its header (row {first[0]}); "
                                   "keep one")
        at = {c: header.index(c) for c in MANIFEST_COLUMNS if c in header}
        for number, fields in records:
            where = f"manifest {shown} row {number}"
            if len(fields) != len(header):
                raise FusionCacheError(
                    f"{where} has {len(fields)} fields, the header {len(header)}; write a path or label that holds "
                    'a comma in double quotes ("a,b.png")'
                )
            p, label = fields[at["path"]], fields[at["label"]].strip()
            split = fields[at["split"]].strip() if "split" in at else "all"
            if not p:
                raise FusionCacheError(f"{where} has an empty path; give the image's path (absolute, or relative to "
                                       "the manifest's folder) or remove the row")
            if not label:
                raise FusionCacheError(f"{where} has an empty label; give the image's class name or remove the row")
            if display_path(label) != label:
                raise FusionCacheError(f"{where} has a label with a control character ({_short(label)}); "
                                       "use a printable class name")
            if "split" in at and split.lower() not in SPLIT_NAMES:
                raise FusionCacheError(f"{where} has the split '{_short(split)}'; use train, test or val (or "
                                       "drop the split column to have the rows split for you)")
            rows.append(_Row(p, label, SPLIT_NAMES.get(split.lower(), split), _manifest_entry(folder, p, where)))
    if not rows:
        raise FusionCacheError(f"manifest {shown} has a header but no rows; add one row per image: path,label,split")
    if "split" in at and not any(r.split == "train" for r in rows):
        raise FusionCacheError(f"manifest {shown} has no train rows; add rows with split train, or drop the split "
                               "column to have the rows split for you")
    return rows


def _manifest_entry(folder: Path, path: str, where: str) -> str:
    """What stat says of a row's file: "" for a regular file, a problem for one that exists but is no image
    file (a FIFO, socket or device: a bad image later, never opened). A path that does not exist (a broken
    link or a link loop too) or is a folder raises FusionCacheError: the manifest is wrong, not the image."""
    shown = _short(path)
    if "\0" in path:
        raise FusionCacheError(f"{where} has a path with a NUL character ({shown}); fix the path")
    try:
        st = os.stat(folder / path)
    except PermissionError:
        return "permission denied"  # a folder on the way is unreadable: a bad image, as in an image folder
    except OSError as e:
        if not os.path.lexists(folder / path):
            what = "does not exist"
        elif isinstance(e, FileNotFoundError):
            what = "is a broken symbolic link"
        else:
            what = f"cannot be opened ({reason(e)})"  # a symbolic link loop, ...
        raise FusionCacheError(
            f"{where}: {shown} {what}; fix the path (a relative path starts at the manifest's folder, "
            f"{display_path(folder.resolve())}) or remove the row"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise FusionCacheError(f"{where}: {shown} is a folder; list its image files, one row each")
    return "" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)


def test_split(path: Path) -> str | None:
    splits = {r.split for r in _read_manifest(Path(path))}
    return next((f"the {s} rows" for s in ("test", "val") if s in splits), None)


def load(path: Path, options=None) -> Listing:
    """Every split the manifest's rows name (`all` when it has no split column)."""
    rows = _read_manifest(Path(path))
    given = {s: _source(Path(path), s, [r for r in rows if r.split == s])
             for s in dict.fromkeys(r.split for r in rows)}
    where = {s: ("every row" if s == "all" else f"the {s} rows") for s in given}
    return Listing(NAME, given, where)


def load_manifest(path: str | Path, split: str) -> Source:
    """The `split` rows of a manifest: a UTF-8 CSV with a header naming the columns path, label and, optionally,
    split.

    Paths are absolute or relative to the manifest's folder; labels are class names; split is train, test or
    val (valid and validation mean val); without a split column every row is in the split `all`.
    Classes are the sorted labels of the split (as ImageFolder sorts class folders), samples are in row
    order, and `paths` holds the paths as written (`display_path`), `files` the same to open under `root`,
    the manifest's folder. Other columns are ignored, blank lines skipped, a UTF-8 byte order mark allowed,
    and whitespace around labels and splits (not paths) dropped.

    The whole manifest is read and checked on every call, so both splits see the same rows and the same
    errors: a missing or bad header, a row with the wrong number of fields, an empty path or label, an
    unknown split, no train rows, or a path that does not exist or is a folder raise FusionCacheError
    naming the row (rows are counted as lines, the header being row 1). A file that exists but is no image
    (undecodable, a FIFO, unreadable) is a bad image when read, and follows --on-bad-image.

    The identity is `load_image_folder`'s over the classes and every row's path as written, label and the
    sha256 of its content, so a cache is reused only when every image is byte-for-byte the same.
    """
    path = Path(path)
    return _source(path, split, [r for r in _read_manifest(path) if r.split == split])


def _source(path: Path, split: str, mine: list[_Row]) -> Source:
    classes = sorted({r.label for r in mine})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[r.label] for r in mine], dtype=np.int64)
    files = [r.path for r in mine]
    digests = digests_of([(str(path.parent / r.path), r.problem) for r in mine])
    identity = listing_identity(b"fusion-cache manifest 1\n", classes, files, labels, digests)
    return Source("manifest", split, classes, labels, identity, paths=[display_path(f) for f in files],
                  root=path.parent, files=files, digests=digests)


def check_root(path: Path) -> None:
    """A readable CSV file (its rows are checked when it is loaded)."""
    _open_manifest(Path(path)).close()


def detect(root: Path) -> str | None:
    """A `.csv` file."""
    if root.suffix.lower() == ".csv" and not root.is_dir():
        return "a CSV manifest"
    return None


def write(out: Path, rows: list[tuple[str, str, str]], replace: bool = False) -> Path:
    """Write (absolute file, label, split) rows as a manifest at `out`, atomically: paths under the manifest's
    folder relative to it, others absolute, as given. An existing file with this content is left as it is;
    one with other content is replaced only when `replace` (--force)."""
    from ..io import atomic_write_bytes

    folder = str(Path.cwd() / out.parent)  # as given: `.` dropped, links and `..` kept (as the paths are)
    prefix = folder.rstrip(os.sep) + os.sep
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for path, label, split in rows:
        shown = path[len(prefix):] if path.startswith(prefix) else path
        try:
            shown.encode("utf-8")
        except UnicodeEncodeError:
            raise FusionCacheError(f"the file name {_short(shown)} is not UTF-8, so it cannot be written to a manifest "
                                   "(a UTF-8 CSV); rename the file, or drop --write-manifest") from None
        writer.writerow([shown, label, split])
    data = buf.getvalue().encode("utf-8")
    try:
        if out.is_file() and out.read_bytes() == data:
            return out
    except OSError:
        pass
    if os.path.lexists(out) and not replace:
        raise FusionCacheError(f"--write-manifest {display_path(out)} already exists with another split; pass "
                               "--force to replace it, or choose another name")
    return atomic_write_bytes(out, data)
