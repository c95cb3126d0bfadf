"""The HDF5 feature cache: its schema, written and read here and nowhere else.

Layout (schema_version 1):

    /                     attrs: provenance (see `Cache.attrs`), `fingerprint`, `complete`
    /<split>/labels       (N,)   int64   class index into attrs["classes"]
    /<split>/indices      (N,)   int64   position of the image in the source split
    /<split>/features/<tap> (N, C) float32 (or float16): the tap's output, global-average-pooled

Splits are `train` and `test`. A cache is written under `<out>.partial`, flushed after every batch, and
renamed to `<out>` only after `complete` is set, so a file under the final name is always whole. A
partial file resumes from its last flushed batch when the same command runs again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import FusionCacheError
from .taps import resolve_view

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
SPLITS = ("train", "test")
# Attributes stored as lists (string or float arrays) and as JSON objects.
_LIST_ATTRS = ("taps", "classes", "mean", "std")
_JSON_ATTRS = ("versions", "skipped", "data_identity")


def fingerprint(spec: dict) -> str:
    """sha256 over everything that determines the features (weights, preprocessing, taps, data, subset)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()


def partial_path(path: str | Path) -> Path:
    return Path(str(path) + PARTIAL_SUFFIX)


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Cache:
    """A complete cache, opened read-only. `view()` is the entry point for heads and notebooks."""

    path: Path
    attrs: dict

    @property
    def taps(self) -> list[str]:
        return list(self.attrs["taps"])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    def view_taps(self, view: str) -> list[str]:
        return resolve_view(view, self.taps)

    def labels(self, split: str = "train") -> np.ndarray:
        return self._read(split, "labels")

    def indices(self, split: str = "train") -> np.ndarray:
        return self._read(split, "indices")

    def features(self, tap: str, split: str = "train") -> np.ndarray:
        if tap not in self.taps:
            raise FusionCacheError(f"tap '{tap}' is not in {self.path}; it holds {', '.join(self.taps)}")
        return self._read(split, f"features/{tap}")

    def view(self, view: str = "fused", split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(X, y) for a view: the view's pooled tap vectors concatenated in tap order, as float32."""
        taps = self.view_taps(view)
        X = np.concatenate([self.features(t, split).astype(np.float32, copy=False) for t in taps], axis=1)
        return X, self.labels(split)

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        with self._open() as f:
            return {s: {t: f[s]["features"][t].shape for t in self.taps} for s in SPLITS}

    def _read(self, split: str, name: str) -> np.ndarray:
        if split not in SPLITS:
            raise FusionCacheError(f"unknown split '{split}'; use train or test")
        with self._open() as f:
            return f[split][name][()]

    @contextmanager
    def _open(self):
        try:
            with h5py.File(self.path, "r") as f:
                yield f
        except (OSError, KeyError) as e:
            raise FusionCacheError(
                f"{self.path} could not be read ({e}); run `fusion-cache extract` again with --force to rebuild it"
            ) from None


def open_cache(path: str | Path) -> Cache:
    """Open and validate a cache: HDF5, a known schema version, complete, with every dataset present."""
    path = Path(path)
    if not path.exists():
        part = partial_path(path)
        hint = (
            f"; an interrupted extraction left {part}: run the same extract command again to resume it"
            if part.exists()
            else "; create it with `fusion-cache extract --out PATH`"
        )
        raise FusionCacheError(f"cache {path} does not exist{hint}")
    if not h5py.is_hdf5(path):
        raise FusionCacheError(f"{path} is not an HDF5 file; pass a cache written by `fusion-cache extract`")
    try:
        with h5py.File(path, "r") as f:
            attrs = read_attrs(f)
            version = attrs.get("schema_version")
            if version is None:
                raise FusionCacheError(f"{path} is not a fusion-cache file (no schema_version); pass a cache from `fusion-cache extract`")
            if int(version) > SCHEMA_VERSION:
                raise FusionCacheError(
                    f"{path} has schema_version {version}, newer than this fusion-cache understands ({SCHEMA_VERSION}); "
                    "upgrade fusion-cache"
                )
            if not attrs.get("complete", False):
                raise FusionCacheError(
                    f"{path} is an incomplete cache (extraction was interrupted); run the same extract command again to resume it"
                )
            for s in SPLITS:
                n = len(f[s]["labels"])
                for name in ["indices"] + [f"features/{t}" for t in attrs["taps"]]:
                    if len(f[s][name]) != n:
                        raise KeyError(f"{s}/{name} has {len(f[s][name])} rows, expected {n}")
    except FusionCacheError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise FusionCacheError(
            f"{path} is damaged or truncated ({e}); rebuild it with `fusion-cache extract --force`"
        ) from None
    return Cache(path, attrs)


def read_attrs(f: h5py.File) -> dict:
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if k in _JSON_ATTRS:
            v = json.loads(v)
        elif k in _LIST_ATTRS:
            v = [x.decode() if isinstance(x, bytes) else x.item() if hasattr(x, "item") else x for x in v]
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def write_attrs(f: h5py.File, attrs: dict) -> None:
    for k, v in attrs.items():
        if k in _JSON_ATTRS:
            f.attrs[k] = json.dumps(v, sort_keys=True)
        elif k in _LIST_ATTRS:
            if all(isinstance(x, str) for x in v):
                f.attrs[k] = np.array(v, dtype=h5py.string_dtype())
            else:
                f.attrs[k] = np.asarray(v, dtype=np.float64)
        elif v is None:
            f.attrs[k] = ""
        else:
            f.attrs[k] = v


def peek_fingerprint(path: Path) -> str | None:
    """The fingerprint of an existing complete cache, or None if `path` is not one."""
    try:
        return open_cache(path).fingerprint
    except FusionCacheError:
        return None


# ---------------------------------------------------------------------------------------------- writing


class CacheWriter:
    """Writes one cache under `<path>.partial`, resumable, then renames it into place.

    Usage:
        with CacheWriter(path, attrs, sizes, channels, dtype) as w:
            start = w.next_position(split)            # > 0 when resuming
            w.append(split, next_pos, labels, indices, {tap: (n, C) array})
            ...
            w.finish(extra_attrs)                     # sets complete, flushes, renames
    """

    def __init__(self, path: str | Path, attrs: dict, sizes: dict[str, int], channels: dict[str, int], dtype: str):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.attrs = dict(attrs)
        self.sizes = sizes
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.resumed_from: dict[str, int] = {}
        self.discarded_partial = False
        self._lock_fd: int | None = None
        self._f: h5py.File | None = None

    # -- lifecycle

    def __enter__(self) -> "CacheWriter":
        self._acquire_lock()
        try:
            self._open_partial()
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            self._release_lock()

    def _acquire_lock(self) -> None:
        lock = Path(str(self.path) + LOCK_SUFFIX)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _write_error(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FusionCacheError(
                    f"another extract is already writing {self.path} (lock {lock} is held); "
                    "wait for it to finish or choose another --out"
                ) from None
            try:  # the holder before us may have unlinked the lock file after we opened it
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                self._lock_path = lock
                return
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open_partial(self) -> None:
        if self.partial.exists():
            f = None
            try:
                f = h5py.File(self.partial, "r+")
                if f.attrs.get("fingerprint") == self.attrs["fingerprint"] and _layout_ok(f, self.sizes, self.channels):
                    for s in SPLITS:
                        rows = int(f[s].attrs["rows"])
                        for name in ["labels", "indices"] + [f"features/{t}" for t in self.channels]:
                            f[s][name].resize(rows, axis=0)
                        self.resumed_from[s] = int(f[s].attrs["next_position"])
                    self._f = f
                    return
            except Exception:  # a file killed mid-flush may be unreadable: start it again
                pass
            if f is not None:
                try:
                    f.close()
                except Exception:
                    pass
            self.resumed_from = {}
            self.partial.unlink()
            self.discarded_partial = True
        try:
            f = h5py.File(self.partial, "w")
        except OSError as e:
            raise _write_error(self.partial, e) from None
        self._f = f
        write_attrs(f, {**self.attrs, "schema_version": SCHEMA_VERSION, "complete": False})
        for s in SPLITS:
            g = f.create_group(s)
            g.attrs["rows"] = 0
            g.attrs["next_position"] = 0
            n = max(1, self.sizes[s])
            g.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(min(n, 4096),))
            g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(min(n, 4096),))
            feats = g.create_group("features")
            for tap, c in self.channels.items():
                rows = max(1, min(n, (1 << 20) // (c * self.dtype.itemsize)))  # ~1 MiB chunks
                feats.create_dataset(tap, shape=(0, c), maxshape=(None, c), dtype=self.dtype, chunks=(rows, c))
        f.flush()

    @contextmanager
    def discard_on_error(self):
        """Remove the partial file when the run fails for a reason a rerun would meet again (a NaN, a bad
        image). Interrupts and write errors (disk full) keep it, so the same command resumes."""
        try:
            yield
        except FusionCacheError as e:
            if not e.resumable:
                self.close()
                self.partial.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
            self._f = None

    # -- writing

    def next_position(self, split: str) -> int:
        return int(self._f[split].attrs["next_position"])

    def rows(self, split: str) -> int:
        return int(self._f[split].attrs["rows"])

    def skipped(self, split: str) -> list[str]:
        return json.loads(self._f[split].attrs.get("skipped", "[]"))

    def append(self, split: str, next_position: int, labels, indices, feats: dict[str, np.ndarray],
               skipped: list[str] = ()) -> None:
        """Append rows, then record progress and flush, so a kill leaves a resumable file."""
        g = self._f[split]
        rows = int(g.attrs["rows"])
        n = len(labels)
        try:
            for name, values in [("labels", labels), ("indices", indices)] + [
                (f"features/{t}", feats[t]) for t in self.channels
            ]:
                ds = g[name]
                ds.resize(rows + n, axis=0)
                ds[rows : rows + n] = values
            if skipped:
                g.attrs["skipped"] = json.dumps(self.skipped(split) + list(skipped))
            g.attrs["rows"] = rows + n
            g.attrs["next_position"] = next_position
            self._f.flush()
        except OSError as e:
            raise _write_error(self.partial, e, done=rows) from None

    def finish(self, extra_attrs: dict) -> None:
        f = self._f
        try:
            write_attrs(f, extra_attrs)
            f.attrs["complete"] = True
            f.flush()
            f.close()
            self._f = None
            with open(self.partial, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self.partial, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise _write_error(self.partial, e) from None


def _layout_ok(f: h5py.File, sizes: dict[str, int], channels: dict[str, int]) -> bool:
    try:
        for s in SPLITS:
            g = f[s]
            if int(g.attrs["rows"]) > sizes[s]:
                return False
            for t, c in channels.items():
                if g["features"][t].shape[1] != c or len(g["features"][t]) < int(g.attrs["rows"]):
                    return False
            if len(g["labels"]) < int(g.attrs["rows"]) or len(g["indices"]) < int(g.attrs["rows"]):
                return False
        return True
    except (KeyError, OSError, ValueError):
        return False


def _write_error(path: Path, e: OSError, done: int | None = None) -> FusionCacheError:
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
    return FusionCacheError(f"cannot write {path} ({e}); check the path and free space, then run again")
