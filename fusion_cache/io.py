"""Safe output: atomic file writes with fsync, strict JSON, and output folders that never mix or lose results.

Every file fusion-cache writes goes through `atomic_write` (a temporary sibling, fsynced, renamed), so a
file under its final name is always whole. Result folders (`fit --out`, `ablate --out`, `report --out`)
are built in a temporary sibling folder by `staged_folder` and swapped in only when complete, so a killed
run leaves the old results or the new ones, never a mix. Nothing that exists is replaced without `force`,
and a folder that holds files fusion-cache did not write is never replaced at all.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from .errors import FusionCacheError, quote


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable) -> Path:
    """Write via a temporary file in the same folder, fsync, and rename: `path` is never half-written.
    `write(f)` gets a binary file object."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj, indent: int | None = None) -> str:
    """JSON that never holds NaN or Infinity (which are not JSON): a non-finite number is a bug upstream."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    except ValueError as e:
        raise FusionCacheError(f"a result holds a non-finite number ({e}); this is a bug, please report it") from None


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def write_error(path: Path, e: OSError, done: int | None = None) -> FusionCacheError:
    """An OSError while writing `path`, as a one-line error with the fix."""
    where = f" after {done} rows" if done is not None else ""
    if e.errno == errno.ENOSPC or "No space" in str(e):
        err = FusionCacheError(
            f"disk full while writing {path}{where}; the partial file is kept and marked incomplete: "
            "free space and run the same command again to resume"
        )
        err.resumable = True
        return err
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission" in str(e):
        return FusionCacheError(f"cannot write {path}: permission denied; choose a writable --out")
    if e.errno == errno.ENOENT:
        return FusionCacheError(f"cannot write {path}: its folder does not exist; create it or choose another --out")
    return FusionCacheError(f"cannot write {path} ({e.strerror or e}); check the path and free space, then run again")


# ---------------------------------------------------------------------------------------------- output files


def check_output_file(out: str | Path, force: bool, inputs: Iterable[str | Path] = (), what: str = "--out",
                      example: str = "model.pt2") -> Path:
    """Refuse an output file that would destroy something: one of the command's inputs (always), an HDF5
    cache (always), or any existing file (unless `force`). Its folder must exist."""
    out = Path(out)
    if out.is_dir():
        raise FusionCacheError(f"{what} {out} is a folder; pass a file name such as {out / example}")
    if not out.parent.is_dir():
        raise FusionCacheError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    if out.exists() or out.is_symlink():
        resolved = out.resolve()
        for i in inputs:
            if Path(i).exists() and Path(i).resolve() == resolved:
                raise FusionCacheError(f"{what} {out} is this command's own input; choose another file name")
        if is_hdf5_file(out):
            raise FusionCacheError(f"{what} {out} is an HDF5 file (a cache?) and is never overwritten; "
                                   "choose another file name")
        if not force:
            raise FusionCacheError(f"{what} {out} already exists; pass --force to replace it, or choose another name")
    return out


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5_file(path: Path) -> bool:
    """Whether a regular file starts as HDF5 does (never call it on a FIFO: the read would block)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- output folders


def check_output_folder(out: str | Path, force: bool, ours: Callable[[str], bool]) -> Path:
    """Refuse an output folder that holds earlier results (unless `force`) or files fusion-cache did not
    write (always: replacing the folder would delete them). `ours(name)` says whether a file name is one
    this command writes. Called before any work, so a refusal costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FusionCacheError(f"--out {out} is a file; pass a folder")
    if out.is_dir():
        try:
            names = sorted(os.listdir(out))
        except OSError as e:
            raise FusionCacheError(f"cannot read --out folder {out} ({e.strerror}); choose another folder") from None
        foreign = [n for n in names if not ours(n)]
        if foreign:
            raise FusionCacheError(
                f"--out {out} holds files fusion-cache did not write (e.g. {quote(foreign[0])}); "
                "choose an empty or new folder"
            )
        if names and not force:
            raise FusionCacheError(
                f"--out {out} already holds results ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                "pass --force to replace them, or choose another folder"
            )
    if not out.parent.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FusionCacheError(f"cannot create folder {out.parent} ({e.strerror}); choose a writable --out") from None
    if not os.access(out.parent, os.W_OK):
        raise FusionCacheError(f"cannot write into {out.parent}: permission denied; choose a writable --out")
    return out


@contextmanager
def staged_folder(out: str | Path, force: bool, ours: Callable[[str], bool]):
    """Yield a temporary sibling folder to write results into; on success it replaces `out` in one rename
    (the old folder, if any, is moved aside first and deleted after). On any error the temporary folder is
    removed and `out` is left exactly as it was."""
    out = check_output_folder(out, force, ours)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
        check_output_folder(out, force, ours)  # nothing foreign appeared while we worked
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(out, old)
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from None
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---------------------------------------------------------------------------------------------- names of caches


def cache_labels(paths: Iterable[str | Path], backbones: Iterable[str] | None = None) -> list[str]:
    """A unique, stable name for each of several caches, to label their rows in one table.

    The name is the file stem (`data/resnet50.h5` -> `resnet50`). Stems that collide take their folder's name
    (`a/resnet50`, `b/resnet50`), then, if they still collide, their full file name (`a/resnet50.h5`), and a
    name still shared after that gets `#2`, `#3`, ... in the order given. The same paths give the same names.
    With `backbones` (one per path), a label is the backbone, then the name in parentheses where the two
    differ (`resnet50 (resnet50-aug)`; `resnet50` alone for `resnet50.h5`), so a table keeps its backbone.
    """
    paths = [Path(p) for p in paths]
    folder = [Path(os.path.abspath(p)).parent.name for p in paths]
    names = [p.stem for p in paths]
    for widen in (lambda i: f"{folder[i]}/{paths[i].stem}", lambda i: f"{folder[i]}/{paths[i].name}"):
        twice = {n for n in names if names.count(n) > 1}
        names = [widen(i) if n in twice else n for i, n in enumerate(names)]
    taken, seen = set(names), set()
    for i, n in enumerate(names):
        if n in seen:
            k = 2
            while f"{n} #{k}" in taken:
                k += 1
            names[i] = f"{n} #{k}"
            taken.add(names[i])
        seen.add(n)
    if backbones is None:
        return names
    return [b if n == b else f"{b} ({n})" for b, n in zip(backbones, names)]
