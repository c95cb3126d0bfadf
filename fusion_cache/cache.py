"""The HDF5 feature cache: its schema and metadata, written and read here and nowhere else.

Layout (schema_version 4; docs/cache-format.md describes every attribute):

    /                        attrs: `CacheMeta` (provenance, fingerprint, schema_version, complete)
    /<split>/labels          (N,)   int64   class index into the `classes` attribute
    /<split>/indices         (N,)   int64   position of the image in the source split
    /<split>/features/<tap>  (N, W) float32 (or float16): the tap's pooled output; W = C for `avg` pooling,
                                            2C for `avgmax` (meta.table.channels(taps, pool) gives W)
    /<split>/items/indices, names  (M,) int64, str: file sources' every planned item's position and name

Schema 3 records the backbone's library and version, its tap table and the resize interpolation (all in the
fingerprint). Schema-2 caches (MobileNetV2 only, from before any other backbone) still open: their missing
fields read as torchvision's MobileNetV2 with the case study's table (`taps.MOBILENET_V2`), and their
fingerprint is checked over the schema-2 fields it was computed from.

Splits are `train` and `test`. A cache is written under `<out>.partial`, flushed after every batch, and
renamed to `<out>` only after `complete` is set, so a file under the final name is always whole. A
partial file resumes from its last flushed batch when the same command runs again.

`CacheMeta` declares every attribute once, with its type and whether it determines the features; the
fingerprint is computed from the feature-determining fields, so a new field cannot be left out of it.
`open_cache` checks every attribute, dataset shape, dtype and label range before handing out one number.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import socket
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import FusionCacheError, quote
from .io import is_hdf5_file, write_error
from .taps import MOBILENET_V2, TapTable

SCHEMA_VERSION = 4  # 4: `decode` (EXIF, reduced decoding) and `split` in the fingerprint; `leaks`
LEGACY_SCHEMA = 2  # MobileNetV2-only caches: read, never written
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
SPLITS = ("train", "test")
DTYPES = ("float32", "float16")  # storage dtype of the features
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast precision of the forward pass
ENGINES = ("local", "ray")  # provenance: who ran the backbone
SHARDS_SUFFIX = ".shards"  # the ray engine's shard folder beside the cache
SHARD_SCHEMA = 1
_REBUILD = "rebuild it with `fusion-cache extract ... --force`"


def partial_path(path: str | Path) -> Path:
    return Path(str(path) + PARTIAL_SUFFIX)


def lock_path(path: str | Path) -> Path:
    return Path(str(path) + LOCK_SUFFIX)


def shard_folder(path: str | Path) -> Path:
    return Path(str(path) + SHARDS_SUFFIX)


# ---------------------------------------------------------------------------------------------- metadata


def _attr(kind: str, fp: bool = False, since: int = LEGACY_SCHEMA, **kw):
    """A CacheMeta field: `kind` names its parser (_PARSERS); `fp` marks it as determining the features;
    `since` is the first schema that has it (older caches read its default and leave it out of the fingerprint)."""
    return field(metadata={"kind": kind, "fp": fp, "since": since}, **kw)


@dataclass(frozen=True)
class CacheMeta:
    """Every attribute of a cache, typed. Fields marked fp=True determine the features and make the
    fingerprint; the others are provenance. Parsed and checked by `from_attrs`, written by `to_attrs`."""

    # -- what determines the features (the fingerprint)
    backbone: str = _attr("str", fp=True)  # a `backbones` name: mobilenet_v2, resnet50, timm:vit_small_patch16_224
    weights_sha256: str = _attr("sha256", fp=True)  # of the weights file actually loaded
    image_size: int = _attr("int", fp=True)  # resize shorter side + center crop to this
    mean: tuple[float, ...] = _attr("floats", fp=True)  # normalization, per RGB channel
    std: tuple[float, ...] = _attr("floats", fp=True)
    resize: str = _attr("str", fp=True)  # how images are resized (a sentence)
    pool: str = _attr("str", fp=True)  # a key of taps.POOLS
    taps: tuple[str, ...] = _attr("strs", fp=True)  # in cache order
    dataset: str = _attr("str", fp=True)  # cifar10 | imagefolder | ...
    data_identity: dict = _attr("json", fp=True)  # {split: hash of the source items (pixels or file contents)}
    subset: dict = _attr("json", fp=True)  # {split: sha256 of the chosen source indices}
    dtype: str = _attr("str", fp=True)  # storage dtype of the features
    precision: str = _attr("str", fp=True)  # autocast precision of the forward pass
    # -- provenance
    weights: str = _attr("str")  # what --weights said: a name or a path
    data_root: str = _attr("str")
    classes: tuple[str, ...] = _attr("strs")
    train_size: int = _attr("int")  # rows actually cached (after skipped images)
    test_size: int = _attr("int")
    train_source_size: int = _attr("int")  # images in the source split
    test_source_size: int = _attr("int")
    seed: int = _attr("int")  # of the subset draw (and of --weights random)
    integrity_checked: bool = _attr("bool")  # False: a local copy used with --skip-integrity-check
    versions: dict = _attr("json")  # library versions that wrote the cache
    # -- what determines the features too, since schema 3 (a schema-2 cache reads these defaults)
    library: str = _attr("str", fp=True, since=3, default="torchvision")  # torchvision | timm
    library_version: str = _attr("str", fp=True, since=3, default="")  # schema 2: read from `versions`
    interpolation: str = _attr("str", fp=True, since=3, default="bilinear")  # of the resize, the weights' own
    tap_table: dict = _attr("json", fp=True, since=3, default_factory=dict)  # taps.TapTable.to_json(); schema 2: {}
    # -- what determines the features too, since schema 4 (older caches decoded at full size, EXIF ignored)
    decode: str = _attr("str", fp=True, since=4, default="")  # how files become pixels (decode.describe)
    split: dict = _attr("json", fp=True, since=4, default_factory=dict)  # how train/test were made (split.py)
    # -- provenance with a default
    device: str = _attr("str", default="")  # where the forward pass ran
    skipped: dict = _attr("json", default_factory=dict)  # {split: [unreadable files]}
    engine: str = _attr("str", default="local")  # local | ray (the datasets are then virtual, over shard files)
    shards: int = _attr("int", default=0)  # shard files a ray cache reads (0: one self-contained file)
    leaks: dict = _attr("json", default_factory=dict)  # leaks.py: the same content in train and test, duplicates
    source_options: dict = _attr("json", default_factory=dict)  # the source's options as given (--image-column, ...;
    #                      their effect on the items is in data_identity), so that report reads the source the same way
    # -- state
    schema_version: int = _attr("int", default=SCHEMA_VERSION)
    complete: bool = _attr("bool", default=False)
    fingerprint: str = _attr("sha256", default="")

    @classmethod
    def create(cls, **values) -> "CacheMeta":
        """A new cache's metadata, checked, with its fingerprint computed from the fp fields."""
        meta = cls(**values)
        meta = dataclasses.replace(meta, fingerprint=meta.compute_fingerprint())
        meta.check("new cache")
        return meta

    def compute_fingerprint(self) -> str:
        """sha256 over the schema version and every feature-determining field that schema has."""
        spec = {"schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            if f.metadata["fp"] and f.metadata["since"] <= self.schema_version:
                v = getattr(self, f.name)
                spec[f.name] = list(v) if isinstance(v, tuple) else v
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def fingerprint_at(self, schema: int) -> str | None:
        """The fingerprint an older schema's cache with these settings has (None when that schema cannot describe
        them). Its features are the same as these only where the newer fields change nothing: `extract` checks
        that (schema 4's decoding: `decode.decodes_as_before`) before it reuses such a cache."""
        if schema == LEGACY_SCHEMA:
            return self.legacy_fingerprint()
        if schema == SCHEMA_VERSION:
            return self.fingerprint
        if self.split.get("method", "given") != "given" or self.split.get("validation_from") is not None:
            return None  # older schemas only had the given train and test splits
        return dataclasses.replace(self, schema_version=schema).compute_fingerprint()

    def legacy_fingerprint(self) -> str | None:
        """The fingerprint a schema-2 cache with the same features has, or None if schema 2 cannot describe
        these settings (another backbone, library or resize). Lets `extract` reuse the caches made before."""
        if self.split.get("method", "given") != "given" or self.split.get("validation_from") is not None:
            return None
        if (self.backbone, self.library, self.interpolation) != ("mobilenet_v2", "torchvision", "bilinear") or \
                self.table != MOBILENET_V2:
            return None
        return dataclasses.replace(self, schema_version=LEGACY_SCHEMA).compute_fingerprint()

    @functools.cached_property
    def table(self) -> TapTable:
        """The backbone's tap table, as recorded (schema 2: the case study's)."""
        if not self.tap_table:
            return MOBILENET_V2
        return TapTable.from_json(self.tap_table)

    def split_size(self, split: str) -> int:
        return self.train_size if split == "train" else self.test_size

    def width(self, tap: str) -> int:
        return self.table.channels([tap], self.pool)[0]

    def to_attrs(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = f.metadata["kind"]
            if kind == "json":
                out[f.name] = json.dumps(v, sort_keys=True)
            elif kind == "strs":
                out[f.name] = np.array(list(v), dtype=h5py.string_dtype())
            elif kind == "floats":
                out[f.name] = np.asarray(v, dtype=np.float64)
            else:
                out[f.name] = v
        return out

    def as_dict(self) -> dict:
        """Plain JSON-ready values (for `info --json` and result provenance)."""
        return {f.name: (list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple)
                         else getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_attrs(cls, attrs, where: str) -> "CacheMeta":
        """Parse HDF5 attributes; every field of the cache's schema present (unless it is optional provenance)
        and of its type. A schema-2 cache gets the MobileNetV2 values of the fields schema 3 added."""
        version = _as_int(attrs.get("schema_version", SCHEMA_VERSION))
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in attrs:
                optional = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                if not optional or f.metadata["since"] > LEGACY_SCHEMA and version >= f.metadata["since"]:
                    raise FusionCacheError(f"{where}: attribute '{f.name}' is missing; {_REBUILD}")
                continue
            try:
                values[f.name] = _PARSERS[f.metadata["kind"]](attrs[f.name])
            except (TypeError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FusionCacheError(f"{where}: attribute '{f.name}' is not {_KIND_NAMES[f.metadata['kind']]} "
                                       f"({str(e)[:80]}); {_REBUILD}") from None
        meta = cls(**values)
        if version == LEGACY_SCHEMA and not meta.library_version:
            meta = dataclasses.replace(meta, library_version=str(meta.versions.get("torchvision", "")))
        meta.check(where)
        return meta

    @classmethod
    def parse_fields(cls, values: dict, names: tuple[str, ...], where: str, fix: str) -> dict:
        """Parse some fields from a JSON-decoded dict (a head's provenance) with the same typed parsers."""
        kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(cls)}
        out = {}
        for name in names:
            if name not in values:
                raise FusionCacheError(f"{where}: '{name}' is missing; {fix}")
            try:
                out[name] = _PARSERS[kinds[name]](values[name])
            except (TypeError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FusionCacheError(f"{where}: '{name}' is not {_KIND_NAMES[kinds[name]]} ({str(e)[:80]}); "
                                       f"{fix}") from None
        return out

    def check(self, where: str) -> None:
        """Value checks beyond types: known pooling, dtype, precision and taps; sane sizes."""
        def bad(name, why):
            raise FusionCacheError(f"{where}: attribute '{name}' {why}; {_REBUILD}")

        try:
            table = self.table
        except (TypeError, ValueError, KeyError) as e:
            bad("tap_table", f"is not a tap table ({' '.join(str(e).split())[:80]})")
        if self.schema_version == LEGACY_SCHEMA and self.backbone != "mobilenet_v2":
            bad("backbone", f"is {self.backbone!r}, but a schema-2 cache can only be mobilenet_v2")
        if table.backbone != self.backbone:
            bad("tap_table", f"is the table of {table.backbone}, not of {self.backbone}")
        if self.library not in ("torchvision", "timm"):
            bad("library", f"is {self.library!r}, not torchvision or timm")
        if self.pool not in table.pools:
            bad("pool", f"is {self.pool!r}, not one of {', '.join(table.pools)}")
        if self.engine not in ENGINES:
            bad("engine", f"is {self.engine!r}, not one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"is {self.dtype!r}, not one of {', '.join(DTYPES)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"is {self.precision!r}, not one of {', '.join(PRECISIONS)}")
        if not self.taps:
            bad("taps", "is empty")
        unknown = [t for t in self.taps if t not in table.names]
        if unknown:
            bad("taps", f"names an unknown tap {unknown[0]!r}")
        if len(set(self.taps)) != len(self.taps):
            bad("taps", "lists a tap twice")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            bad("classes", "is empty or lists a class twice")
        if not 1 <= self.image_size <= 4096:
            bad("image_size", f"is {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            bad("mean", "and std must be 3 finite numbers each, std positive")
        for name in ("train_size", "test_size", "train_source_size", "test_source_size", "seed", "shards"):
            if getattr(self, name) < 0:
                bad(name, f"is negative ({getattr(self, name)})")
        for name in ("data_identity", "subset", "versions", "skipped", "split", "leaks", "source_options"):
            if not isinstance(getattr(self, name), dict):
                bad(name, "is not a JSON object")


def _as_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, str):
        return v
    raise TypeError(f"a {type(v).__name__}")


def _as_int(v) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"a {type(v).__name__}")
    return int(v)


def _as_bool(v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"a {type(v).__name__}")
    return bool(v)


def _as_sha256(v) -> str:
    s = _as_str(v)
    if s and (len(s) != 64 or any(c not in "0123456789abcdef" for c in s)):
        raise ValueError(f"{s[:20]!r} is not a sha256 hex digest")
    return s


def _as_floats(v) -> tuple[float, ...]:
    if isinstance(v, (list, tuple)) and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise TypeError("not a list of numbers")
    a = np.asarray(v)
    if a.ndim != 1 or a.dtype.kind not in "fiu":
        raise TypeError("not a list of numbers")
    if not np.isfinite(a).all():
        raise ValueError("holds NaN or inf")
    return tuple(float(x) for x in a)


def _as_strs(v) -> tuple[str, ...]:
    if isinstance(v, (str, bytes)):
        raise TypeError("a single string, not a list")
    a = np.asarray(v, dtype=object)
    if a.ndim != 1:
        raise TypeError("not a list of strings")
    return tuple(_as_str(x) for x in a)


def _as_json(v) -> dict:
    obj = v if isinstance(v, dict) else json.loads(_as_str(v))
    if not isinstance(obj, dict):
        raise TypeError(f"JSON {type(obj).__name__}, not an object")
    return obj


_PARSERS = {"str": _as_str, "int": _as_int, "bool": _as_bool, "sha256": _as_sha256, "floats": _as_floats,
            "strs": _as_strs, "json": _as_json}
_KIND_NAMES = {"str": "a string", "int": "an integer", "bool": "a boolean", "sha256": "a sha256 hex digest",
               "floats": "a list of finite numbers", "strs": "a list of strings", "json": "a JSON object"}


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Cache:
    """A complete, validated cache, opened read-only. `view()` is the entry point for heads and notebooks."""

    path: Path
    meta: CacheMeta

    @property
    def taps(self) -> list[str]:
        return list(self.meta.taps)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def backbone(self) -> str:
        return self.meta.backbone

    @property
    def table(self) -> TapTable:
        return self.meta.table

    def view_taps(self, view: str) -> list[str]:
        return self.meta.table.resolve_view(view, self.taps)

    def labels(self, split: str = "train") -> np.ndarray:
        return self._read(split, "labels")

    def indices(self, split: str = "train") -> np.ndarray:
        return self._read(split, "indices")

    def item_names(self, split: str = "train") -> list[str] | None:
        """Each row's item as the source named it (its file's display path), read from the cache's record of
        the items planned for `split`; None for a cache without one (pixels, or made before schema 4)."""
        with self._open() as f:
            g = f[split].get("items")
            if g is None:
                return None
            try:
                where = dict(zip(g["indices"][()].tolist(), (n.decode("utf-8") for n in g["names"][()])))
                return [where[i] for i in f[split]["indices"][()].tolist()]
            except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
                raise FusionCacheError(f"{self.path}: dataset {split}/items does not list every cached row; "
                                       f"{_REBUILD}") from None

    def validation_rows(self) -> np.ndarray | None:
        """The train rows that came from the dataset's own validation split (`val/` beside `test/`), which the
        tuned protocol chooses on; None when the dataset has none (tuning then carves one out of train)."""
        start = self.meta.split.get("validation_from")
        if start is None:
            return None
        return np.flatnonzero(self.indices("train") >= int(start))

    def features(self, tap: str, split: str = "train") -> np.ndarray:
        """(N, W) pooled features of one tap: W = C for avg pooling, 2C for avgmax."""
        if tap not in self.taps:
            raise FusionCacheError(f"tap '{tap}' is not in {self.path}; it holds {', '.join(self.taps)}")
        return self._read(split, f"features/{tap}")

    def view(self, view: str = "fused", split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(X, y) for a view: the view's pooled tap vectors concatenated in tap order, as float32."""
        taps = self.view_taps(view)
        X = np.concatenate([self.features(t, split).astype(np.float32, copy=False) for t in taps], axis=1)
        return X, self.labels(split)

    def iter_view(self, view: str = "fused", split: str = "train", rows: np.ndarray | None = None,
                  chunk_bytes: int = 64 << 20):
        """The view's rows in chunks read straight from the file, memory one chunk: yields (positions, X, y),
        X float32 (m, d) with the view's taps side by side. `rows`: the positions to yield (sorted; None: all);
        each chunk reads a contiguous block of about `chunk_bytes` and keeps the requested rows of it."""
        taps = self.view_taps(view)
        if split not in SPLITS:
            raise FusionCacheError(f"unknown split '{split}'; use train or test")
        width = sum(self.meta.width(t) for t in taps)
        block = max(256, chunk_bytes // max(1, 4 * width))
        with self._open() as f:
            g = f[split]
            n = g["labels"].shape[0]
            wanted = None if rows is None else np.asarray(rows, dtype=np.int64)
            for lo in range(0, n, block):
                hi = min(n, lo + block)
                if wanted is None:
                    pos = np.arange(lo, hi)
                else:
                    pos = wanted[np.searchsorted(wanted, lo):np.searchsorted(wanted, hi)]
                    if len(pos) == 0:
                        continue
                X = np.empty((hi - lo, width), np.float32)
                col = 0
                for t in taps:
                    w = self.meta.width(t)
                    X[:, col:col + w] = g["features"][t][lo:hi]
                    col += w
                y = g["labels"][lo:hi]
                if wanted is not None:
                    X, y = X[pos - lo], y[pos - lo]
                yield pos, X, y

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
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise FusionCacheError(f"{self.path} could not be read ({str(e)[:120]}); {_REBUILD}") from None


def open_cache(path: str | Path) -> Cache:
    """Open and validate a cache: every attribute typed, the fingerprint matching them, complete, and every
    dataset present with the right rank, dtype, width and length, labels within the classes."""
    path = Path(path)
    if not path.exists():
        part = partial_path(path)
        holder = lock_holder(path)
        if holder:
            hint = (f" yet: an extraction is in progress ({holder}, writing {part if part.exists() else 'it'}); "
                    "wait for it to finish, then run this command again")
        elif part.exists():
            hint = f"; an interrupted extraction left {part}: run the same extract command again to resume it"
        else:
            hint = "; create it with `fusion-cache extract --out PATH`"
        raise FusionCacheError(f"cache {path} does not exist{hint}")
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise FusionCacheError(f"cannot read {path} ({e.strerror}); pass a readable cache file") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise FusionCacheError(f"{path} is {kind}; pass a cache file written by `fusion-cache extract`")
    if not os.access(path, os.R_OK):
        raise FusionCacheError(f"cannot read {path}: permission denied; pass a readable cache file")
    if not h5py.is_hdf5(path):
        raise FusionCacheError(f"{path} is not an HDF5 file; pass a cache written by `fusion-cache extract`")
    where = str(path)
    try:
        with h5py.File(path, "r") as f:
            raw = _raw_attrs(f, where)
            _check_schema(raw, where)
            meta = CacheMeta.from_attrs(raw, where)
            if not meta.complete:
                raise _in_progress(path) or FusionCacheError(
                    f"{path} is an incomplete cache (extraction was interrupted); run the same extract command "
                    "again to resume it"
                )
            if meta.compute_fingerprint() != meta.fingerprint:
                raise FusionCacheError(
                    f"{where}: its attributes do not match its fingerprint (edited after extraction?); {_REBUILD}"
                )
            _check_virtual_sources(f, meta, path)
            _check_layout(f, meta, where)
    except FusionCacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # (HDF5 refuses a file being written)
        raise _in_progress(path) or FusionCacheError(f"{path} is damaged or truncated ({str(e)[:120]}); "
                                                     f"{_REBUILD}") from None
    return Cache(path, meta)


def _in_progress(path: Path) -> FusionCacheError | None:
    """The error for a cache, or its `.partial` file, that an extraction holding the lock is writing now."""
    final = Path(str(path)[: -len(PARTIAL_SUFFIX)]) if str(path).endswith(PARTIAL_SUFFIX) else path
    holder = lock_holder(final)
    if holder is None:
        return None
    return FusionCacheError(f"{path} is being written: an extraction is in progress ({holder}); wait for it to "
                            f"finish, then use {final}")


def _raw_attrs(f: h5py.File, where: str) -> dict:
    out = {}
    for k in f.attrs:
        try:
            v = f.attrs[k]
        except (OSError, TypeError, ValueError) as e:
            raise FusionCacheError(f"{where}: attribute '{k}' cannot be read ({str(e)[:80]}); {_REBUILD}") from None
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def _check_schema(raw: dict, where: str) -> None:
    if "schema_version" not in raw:
        raise FusionCacheError(f"{where} is not a fusion-cache file (no schema_version); "
                               "pass a cache from `fusion-cache extract`")
    try:
        version = _as_int(raw["schema_version"])
    except TypeError:
        raise FusionCacheError(f"{where}: attribute 'schema_version' is not an integer; {_REBUILD}") from None
    if version > SCHEMA_VERSION:
        raise FusionCacheError(f"{where} has schema_version {version}, newer than this fusion-cache understands "
                               f"({SCHEMA_VERSION}); upgrade fusion-cache")
    if version < LEGACY_SCHEMA:
        raise FusionCacheError(f"{where} has schema_version {version}, written by an older fusion-cache; {_REBUILD}")


def _check_layout(f: h5py.File, meta: CacheMeta, where: str) -> None:
    for s in SPLITS:
        n = meta.split_size(s)
        source = meta.train_source_size if s == "train" else meta.test_source_size
        for name in ("labels", "indices"):
            ds = _dataset(f, f"{s}/{name}", where)
            if ds.ndim != 1 or ds.dtype.kind not in "iu":
                raise FusionCacheError(f"{where}: dataset {s}/{name} is {ds.dtype} {ds.shape}, not 1-D integer; "
                                       f"{_REBUILD}")
            if len(ds) != n:
                raise FusionCacheError(f"{where}: dataset {s}/{name} has {len(ds)} rows, but {s}_size says {n}; "
                                       f"{_REBUILD}")
        labels = f[s]["labels"][()]
        if n and (labels.min() < 0 or labels.max() >= len(meta.classes)):
            bad = int(labels.max() if labels.max() >= len(meta.classes) else labels.min())
            raise FusionCacheError(f"{where}: dataset {s}/labels holds {bad}, outside the {len(meta.classes)} "
                                   f"classes; {_REBUILD}")
        indices = f[s]["indices"][()]
        if n and (indices.min() < 0 or indices.max() >= source or len(np.unique(indices)) != n):
            raise FusionCacheError(f"{where}: dataset {s}/indices holds positions outside the source split "
                                   f"({source} images) or repeats one; {_REBUILD}")
        for tap in meta.taps:
            ds = _dataset(f, f"{s}/features/{tap}", where)
            want = (n, meta.width(tap))
            if ds.ndim != 2 or ds.dtype != np.dtype(meta.dtype) or ds.shape != want:
                raise FusionCacheError(f"{where}: dataset {s}/features/{tap} is {ds.dtype} {ds.shape}; expected "
                                       f"{meta.dtype} {want} ({meta.pool} pooling); {_REBUILD}")


def _dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise FusionCacheError(f"{where}: dataset {name} is missing; {_REBUILD}")
    return obj


def peek_meta(path: Path) -> CacheMeta | None:
    """The metadata of an existing complete cache, or None if `path` is not one."""
    try:
        return open_cache(path).meta
    except FusionCacheError:
        return None


# ---------------------------------------------------------------------------------------------- writing


class CacheWriter:
    """Writes one cache under `<path>.partial`, resumable, then renames it into place.

    Usage:
        with CacheWriter(path, meta) as w:                 # meta: CacheMeta.create(...), complete=False
            start = w.next_position(split)                 # > 0 when resuming
            w.append(split, next_pos, labels, indices, {tap: (n, W) array})
            ...
            w.finish(skipped=..., train_size=..., ...)     # sets complete, flushes, renames

    A `<path>.partial` or `<path>.lock` that fusion-cache did not write (a folder, a link, a file that is not
    a partial cache) is refused, never deleted. A partial from other settings is replaced only with `force`.
    """

    def __init__(self, path: str | Path, meta: CacheMeta, force: bool = False, items: dict | None = None):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.meta = meta
        self.items = items  # {split: (source indices, names)} of the planned items (`write_items`), or None
        self.force = force
        self.sizes = {s: meta.split_size(s) for s in SPLITS}
        self.channels = dict(zip(meta.taps, meta.table.channels(meta.taps, meta.pool)))
        self.dtype = np.dtype(meta.dtype)
        self.resumed_from: dict[str, int] = {}
        self._lock: CacheLock | None = None
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
        self._lock = CacheLock(self.path).acquire()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _open_partial(self) -> None:
        if _refuse_foreign(self.partial, _empty_or_hdf5, "is not a partial cache that fusion-cache wrote"):
            f = None
            try:
                f = h5py.File(self.partial, "r+")
                ours = "schema_version" in f.attrs and not bool(f.attrs.get("complete", True))
                same = ours and f.attrs.get("fingerprint") == self.meta.fingerprint
                other_settings = ours and not same and "fingerprint" in f.attrs
                legacy = ours and _as_int(f.attrs["schema_version"]) == LEGACY_SCHEMA
                if same and _layout_ok(f, self.sizes, self.channels):
                    for s in SPLITS:
                        rows = int(f[s].attrs["rows"])
                        for name in ["labels", "indices"] + [f"features/{t}" for t in self.channels]:
                            f[s][name].resize(rows, axis=0)
                        self.resumed_from[s] = int(f[s].attrs["next_position"])
                    self._f = f
                    return
            except Exception:  # a file killed mid-flush may be unreadable: it is ours, start it again
                ours, other_settings, legacy = True, False, False
            if f is not None:
                try:
                    f.close()
                except Exception:
                    pass
            if not ours:
                raise FusionCacheError(f"{self.partial} is an HDF5 file that fusion-cache did not write as a partial "
                                       "cache; move it away or choose another --out")
            if other_settings and not self.force:
                if legacy:
                    raise FusionCacheError(f"{self.partial} holds an interrupted extraction of an older fusion-cache "
                                           "(cache schema 2), which cannot be resumed; pass --force to start over")
                raise FusionCacheError(
                    f"{self.partial} holds an interrupted extraction with other settings; run that command again to "
                    "resume it, or pass --force to start over"
                )
            self.resumed_from = {}
            self.partial.unlink()
        try:
            f = h5py.File(self.partial, "w")
        except OSError as e:
            raise write_error(self.partial, e) from None
        self._f = f
        for k, v in dataclasses.replace(self.meta, complete=False).to_attrs().items():
            f.attrs[k] = v
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
            if self.items:
                write_items(g, *self.items[s])
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
            raise write_error(self.partial, e, done=rows) from None

    def finish(self, **final) -> CacheMeta:
        """Record the final provenance fields (`skipped`, sizes, `device`), mark complete, rename into place."""
        meta = dataclasses.replace(self.meta, **final, complete=True)
        f = self._f
        try:
            for k, v in meta.to_attrs().items():
                f.attrs[k] = v
            f.flush()
            f.close()
            self._f = None
            _publish(self.partial, self.path)
        except OSError as e:
            raise write_error(self.partial, e) from None
        return meta


def _publish(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the folder: `path` is whole or absent, even after a power cut."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CacheLock:
    """`<path>.lock`, held (flock) by whoever writes `<path>`: the local engine's CacheWriter or the ray engine's
    driver, for its whole run. The holder writes `{"pid": N, "host": "NAME"}` into it, so that a second
    command can say who is at work (`lock_holder`). A second writer gets a one-line error naming the holder; a
    lock file that is neither empty nor such a record is refused, never deleted.

    Acquiring also refuses `path` itself where writing it would destroy something: a name ending in .lock or
    .partial (another cache's lock or partial file), or an existing entry that is not a cache fusion-cache
    wrote (a text file, a folder, a link): --force replaces caches only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = lock_path(self.path)
        self._fd: int | None = None

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "CacheLock":
        lock = self.lock
        check_cache_output(self.path)
        while True:
            _refuse_foreign(lock, _is_lock_file, "is not an empty lock file or a lock file that fusion-cache wrote")
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise write_error(lock, e) from None
            if not _flock_soon(fd):
                holder = _holder_of(fd)
                os.close(fd)
                raise FusionCacheError(
                    f"another extract is already writing {self.path} (in progress: {holder} holds {lock}); "
                    "wait for it to finish or choose another --out"
                ) from None
            try:  # the holder before us may have unlinked the lock file after we opened it
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
                except OSError as e:
                    os.close(fd)
                    raise write_error(lock, e) from None
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.lock)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def _flock_soon(fd: int, tries: int = 5) -> bool:
    """Take the exclusive lock without waiting on a writer, but through a `lock_holder` that holds a shared
    lock for an instant: a few tries, 20 ms apart."""
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.02)
    return False


_HOLDER_BYTES = 512  # a lock file's record is far shorter


def _holder_record(data: bytes) -> dict | None:
    """{"pid": int, "host": str} from a lock file's bytes, or None when they are not such a record."""
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(d, dict) or set(d) != {"pid", "host"} or not isinstance(d["host"], str) or \
            isinstance(d["pid"], bool) or not isinstance(d["pid"], int):
        return None
    return d


def _is_lock_file(path: Path, st) -> bool:
    """A lock file fusion-cache made: empty (made, not yet written) or holding a holder record."""
    if st.st_size == 0:
        return True
    if st.st_size > _HOLDER_BYTES:
        return False
    try:
        with open(path, "rb") as f:
            return _holder_record(f.read(_HOLDER_BYTES)) is not None
    except OSError:
        return False


def _holder_of(fd: int) -> str:
    """"pid N on HOST" from an open lock file, or "another process" while its holder has not written it."""
    try:
        d = _holder_record(os.pread(fd, _HOLDER_BYTES, 0))
    except OSError:
        d = None
    return f"pid {d['pid']} on {quote(d['host'], marks=False)}" if d else "another process"


def lock_holder(cache_path: Path) -> str | None:
    """Who is writing `cache_path` right now, for messages that would otherwise guess "interrupted".

    Returns "pid N on HOST" when `<cache_path>.lock` is held by a live process (a `CacheLock`: the local
    engine's writer or the ray engine's driver, which hold it for their whole run); "another process" when it
    is held but the holder has not recorded itself yet; None when nobody holds it (no lock file, or one left
    behind by a killed run), so that what lies there was interrupted. Never blocks and never creates, writes
    or removes a file: it tries a non-blocking shared lock and lets go of it at once."""
    lock = lock_path(cache_path)
    try:
        if not stat.S_ISREG(os.lstat(lock).st_mode):
            return None
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_of(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_cache_output(out: str | Path) -> None:
    """Refuse `out` as the name of a cache to write when writing it would destroy something: a name ending in
    .lock or .partial (fusion-cache's names for another cache's lock and partial files), or an existing entry
    that is not a cache fusion-cache wrote. --force replaces a cache (complete, or damaged: any HDF5 file with
    fusion-cache's attributes or that HDF5 cannot open), never a text file, a folder or a link."""
    out = Path(out)
    for suffix, what in ((LOCK_SUFFIX, "lock"), (PARTIAL_SUFFIX, "partial")):
        if out.name.endswith(suffix):
            raise FusionCacheError(f"--out {quote(out, 200, marks=False)} ends in {suffix}, the name fusion-cache "
                                   f"gives to a cache's {what} file; choose a name that does not end in .lock or "
                                   ".partial")
    _refuse_foreign(out, _is_our_cache_file, "is not a cache that fusion-cache wrote (--force replaces only those)")


def _is_our_cache_file(path: Path, st) -> bool:
    """A regular file that is empty, or HDF5 with a schema_version attribute, or HDF5 too damaged to open."""
    if st.st_size == 0:
        return True
    if not is_hdf5_file(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return "schema_version" in f.attrs
    except Exception:  # truncated or torn: a cache killed mid-write, or one HDF5 cannot read any more
        return True


def _refuse_foreign(path: Path, ok, why: str) -> bool:
    """True when `path` exists and passes `ok(path, stat)`; absent: False; anything else (a folder, a link, a FIFO,
    a file that fails `ok`) is refused with an error, never removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise FusionCacheError(f"cannot inspect {path} ({e.strerror}); move it away or choose another --out") from None
    if not stat.S_ISREG(st.st_mode) or not ok(path, st):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a link" if stat.S_ISLNK(st.st_mode) else \
            "not a regular file" if not stat.S_ISREG(st.st_mode) else "a file"
        raise FusionCacheError(f"{path} is {kind} and {why}; move it away or choose another --out")
    return True


def _empty_or_hdf5(path: Path, st) -> bool:
    """A regular file (so reading cannot block) that is empty (killed at creation) or starts as HDF5 does."""
    return st.st_size == 0 or is_hdf5_file(path)


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


# ---------------------------------------------------------------------------------------------- shards


# The ray engine's shard files, one per contiguous range [start, stop) of a split's chosen positions, in
# `<cache>.shards/<split>-<start>-<stop>.h5` (10-digit positions). A shard holds the rows of one split as the
# cache does (`labels`, `indices`, `features/<tap>`, at its root) and these attributes:
#     shard_schema, fingerprint (the cache's), split, start, stop, rows, skipped (JSON list), complete
# It is written under `<name>.tmp-<id>` and renamed when whole. The cache file then maps its datasets onto the
# shards as h5py virtual datasets (`write_virtual_cache`); `open_cache` checks every shard it reads.

_SHARD_NAME = re.compile(r"^(train|test)-(\d{10})-(\d{10})\.h5$")
_SHARD_TMP = re.compile(r"^(train|test)-(\d{10})-(\d{10})\.h5\.tmp-[0-9a-f]+$")
_SHARD_SOURCE = re.compile(r"^[^/]+\.shards/(train|test)-(\d{10})-(\d{10})\.h5$")  # as a virtual dataset names it


def shard_name(split: str, start: int, stop: int) -> str:
    return f"{split}-{start:010d}-{stop:010d}.h5"


def is_shard_file_name(name: str) -> bool:
    """A name fusion-cache gives to shard files and their temporary files."""
    return bool(_SHARD_NAME.match(name) or _SHARD_TMP.match(name))


def is_shard_tmp_name(name: str) -> bool:
    return bool(_SHARD_TMP.match(name))


def foreign_entries(folder: Path, names: list[str]) -> list[str]:
    """The entries `names` of a shard folder that fusion-cache did not make: misnamed, or folders."""
    return [n for n in names if not is_shard_file_name(n) or stat.S_ISDIR(os.lstat(Path(folder) / n).st_mode)]


@dataclass
class Shard:
    """A complete shard file: positions [start, stop) of `split`, `rows` of them cached (the rest skipped)."""

    path: Path
    split: str
    start: int
    stop: int
    rows: int
    skipped: list[str] = field(default_factory=list)


def write_shard(folder: Path, meta: CacheMeta, split: str, start: int, stop: int, labels: np.ndarray,
                indices: np.ndarray, feats: dict[str, np.ndarray], skipped: list[str]) -> Shard:
    """Write one shard atomically (a temporary name, then a rename). Any process may call it: a Ray worker does."""
    path = Path(folder) / shard_name(split, start, stop)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid():x}{os.urandom(4).hex()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"shard_schema": SHARD_SCHEMA, "fingerprint": meta.fingerprint, "split": split,
                            "start": start, "stop": stop, "rows": len(labels), "skipped": json.dumps(list(skipped)),
                            "complete": False})
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("indices", data=np.asarray(indices, dtype=np.int64))
            g = f.create_group("features")
            for tap in meta.taps:
                g.create_dataset(tap, data=np.asarray(feats[tap], dtype=meta.dtype))
            f.attrs["complete"] = True
        _publish(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    return Shard(path, split, start, stop, len(labels), list(skipped))


def read_shard(path: Path, meta: CacheMeta, split: str, start: int, stop: int, expected: np.ndarray,
               expected_labels: np.ndarray) -> Shard | str:
    """The shard at `path` if it is complete, of these settings, and holds exactly the rows of positions
    [start, stop) (`expected`: their source indices, `expected_labels` their labels) in order, minus those it
    lists as skipped, with their true labels; otherwise the reason it is not (it is then redone, never read)."""
    try:
        if not _is_regular_hdf5(path):
            return "not an HDF5 file"
        with h5py.File(path, "r") as f:
            head = _shard_header(f, meta, split, start, stop)
            if isinstance(head, str):
                return head
            rows, skipped = head
            indices, labels = f["indices"][()], f["labels"][()]
            keep = np.isin(expected, indices)
            if len(indices) != int(keep.sum()) or not np.array_equal(expected[keep], indices) or \
                    len(expected) - rows != len(skipped):
                return "holds other rows"
            if not np.array_equal(labels, np.asarray(expected_labels)[keep]):
                return "holds wrong labels"
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        return f"unreadable ({str(e)[:60]})"
    return Shard(Path(path), split, start, stop, rows, skipped)


def _is_regular_hdf5(path: Path) -> bool:
    """A regular file (not a link, a folder or a FIFO, so reading cannot block) that starts as HDF5 does."""
    return stat.S_ISREG(os.lstat(path).st_mode) and is_hdf5_file(path)


def _shard_header(f: h5py.File, meta: CacheMeta, split: str, start: int, stop: int) -> tuple[int, list[str]] | str:
    """(rows, skipped) of an open shard file that is complete, of these settings and of [start, stop) of `split`,
    whose datasets have the shapes and dtypes of `rows` rows (none virtual); otherwise the reason it is not."""
    a = f.attrs
    if _as_int(a.get("shard_schema", -1)) != SHARD_SCHEMA or not _as_bool(a.get("complete", False)):
        return "incomplete"
    if _as_str(a.get("fingerprint", "")) != meta.fingerprint:
        return "written with other settings"
    if (_as_str(a["split"]), _as_int(a["start"]), _as_int(a["stop"])) != (split, start, stop):
        return "of another range"
    rows = _as_int(a["rows"])
    skipped = json.loads(_as_str(a["skipped"]))
    if not isinstance(skipped, list) or not all(isinstance(x, str) for x in skipped):
        return "has a bad skipped list"
    for name, width in [("labels", None), ("indices", None)] + [(f"features/{t}", meta.width(t))
                                                                for t in meta.taps]:
        ds = f.get(name)
        want = (rows,) if width is None else (rows, width)
        dtype = np.dtype(np.int64) if width is None else np.dtype(meta.dtype)
        if not isinstance(ds, h5py.Dataset) or ds.shape != want or ds.dtype != dtype or ds.is_virtual:
            return f"has a bad dataset {name}"
    return rows, skipped


def write_items(group: h5py.Group, indices, names) -> None:
    """`<split>/items/{indices,names}`: the source position and name of every item planned for the split, so
    that the cache records which items went to which split (rows find theirs through `<split>/indices`)."""
    g = group.create_group("items")
    g.create_dataset("indices", data=np.asarray(indices, dtype=np.int64))
    g.create_dataset("names", data=np.asarray(list(names), dtype=object), dtype=h5py.string_dtype())


def read_items(path: Path, split: str) -> tuple[np.ndarray, list[str]] | None:
    with h5py.File(path, "r") as f:
        g = f[split].get("items")
        if g is None:
            return None
        return g["indices"][()], [n.decode("utf-8") for n in g["names"][()]]


def write_virtual_cache(out: Path, meta: CacheMeta, shards: dict[str, list[Shard]],
                        items: dict | None = None) -> CacheMeta:
    """Write the cache `out` (its writer holds the lock) with the given final metadata, its datasets virtual
    over `shards` (in `<out>.shards/`, in position order per split), under `<out>.partial`, renamed when
    complete. Sources are named relative to the cache's folder, as `_check_virtual_sources` requires."""
    out = Path(out)
    partial = partial_path(out)
    widths = {t: meta.width(t) for t in meta.taps}
    try:
        with h5py.File(partial, "w") as f:
            for k, v in dataclasses.replace(meta, complete=False).to_attrs().items():
                f.attrs[k] = v
            for s in SPLITS:
                g = f.create_group(s)
                g.create_group("features")
                n = sum(sh.rows for sh in shards[s])
                for name, width, dtype in [("labels", None, np.int64), ("indices", None, np.int64)] + [
                        (f"features/{t}", w, np.dtype(meta.dtype)) for t, w in widths.items()]:
                    shape = (n,) if width is None else (n, width)
                    if n == 0:
                        g.create_dataset(name, shape=shape, dtype=dtype)
                        continue
                    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                    pos = 0
                    for sh in shards[s]:
                        if sh.rows:
                            rel = f"{shard_folder(out).name}/{sh.path.name}"  # beside the cache, wherever it is
                            src_shape = (sh.rows,) if width is None else (sh.rows, width)
                            layout[pos : pos + sh.rows] = h5py.VirtualSource(rel, name, shape=src_shape)
                            pos += sh.rows
                    g.create_virtual_dataset(name, layout)
                if items:
                    write_items(g, *items[s])
            f.attrs["complete"] = True
        _publish(partial, out)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise write_error(out, e) from None
    return meta


def _check_virtual_sources(f: h5py.File, meta: CacheMeta, path: Path) -> None:
    """Every file a virtual dataset reads is a shard file in a shard folder beside the cache (`<name>.shards/`,
    by a relative name), a regular file, complete, of the cache's fingerprint and of the range its name says,
    and it is mapped whole into the same dataset of its own split. (HDF5 reads a missing source as zeros,
    silently; a shard renamed, linked or copied over another would hand out another range's rows.)"""
    uses: dict[str, list[tuple[str, str, int]]] = {}  # file -> [(virtual dataset, its dataset, rows mapped)]

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for m in obj.virtual_sources():
                first, last = m.vspace.get_select_bounds()  # the whole source dataset maps onto these rows
                uses.setdefault(m.file_name, []).append((name, m.dset_name, last[0] - first[0] + 1))

    f.visititems(visit)
    for name, reads in uses.items():
        where = _SHARD_SOURCE.match(name)
        if where is None:
            raise FusionCacheError(f"{path} reads its features from {name!r}, which is not a shard file in a "
                                   f"shard folder beside it; {_REBUILD}")
        src = path.parent / name
        fix = (f"keep the shard folder {src.parent} where it was written, beside the cache, or rebuild the cache "
               "with the same extract command and --force")
        split, start, stop = where[1], int(where[2]), int(where[3])
        try:
            if not os.path.lexists(src) or not _is_regular_hdf5(src):
                raise FusionCacheError(f"{path} reads its features from shard {src}, which is missing or not a "
                                       f"regular HDF5 file; {fix}")
            with h5py.File(src, "r") as g:
                head = _shard_header(g, meta, split, start, stop)
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise FusionCacheError(f"{path} reads shard {src}, which is damaged ({str(e)[:80]}); {fix}") from None
        if isinstance(head, str):
            raise FusionCacheError(f"{path} reads shard {src}, which is incomplete or from other settings ({head}); "
                                   f"{fix}")
        wrong = [v for v, d, rows in reads if v != f"{split}/{d}" or rows != head[0]]
        if wrong:
            raise FusionCacheError(f"{path}: dataset {wrong[0]} maps shard {src} onto rows it does not hold; "
                                   f"{_REBUILD}")
    if len(uses) > meta.shards or meta.shards and not uses:  # (a shard of skipped images only is not read)
        raise FusionCacheError(f"{path}: attribute 'shards' says {meta.shards} but its datasets read {len(uses)} "
                               f"shard files; {_REBUILD}")


def refuse_shard_folder(out: Path, force: bool) -> None:
    """The local engine does not silently leave a Ray extraction's shards beside the cache it replaces."""
    shards = shard_folder(out)
    if not os.path.lexists(shards):
        return
    holder = lock_holder(out)
    if holder:
        raise FusionCacheError(f"{shards} holds the shards of a Ray extraction in progress ({holder}); wait for "
                               "it to finish, or choose another --out")
    if not force:
        raise FusionCacheError(f"{shards} holds the shards of an interrupted Ray extraction (--engine ray); run "
                               "that command again to finish it, or pass --force to replace it with a local "
                               "extraction")


def clear_partial(out: Path, force: bool) -> None:
    """Before the ray engine writes `out` (holding its lock): a local engine's interrupted `<out>.partial` is
    kept unless --force; one the ray engine left (its virtual cache, killed before the rename) is removed."""
    part = partial_path(out)
    if not os.path.lexists(part):
        return
    _refuse_foreign(part, _empty_or_hdf5, "is not a partial cache that fusion-cache wrote")
    try:
        with h5py.File(part, "r") as f:
            engine = _as_str(f.attrs.get("engine", "local"))
    except Exception:  # an empty or torn file: ours, killed mid-write
        engine = "ray"
    if engine != "ray" and not force:
        raise FusionCacheError(f"{part} holds an interrupted local extraction; run the command again without "
                               "--engine ray to resume it, or pass --force to start over")
    part.unlink()


def prepare_shard_folder(out: Path, fingerprint: str, force: bool) -> Path:
    """`<out>.shards/`, created or checked (the caller holds `out`'s lock): it may hold only shard files. Shards
    of other settings are replaced with --force; without it, a folder whose shards are all of other settings
    is refused (another command's interrupted run). Leftover temporary files of killed workers are removed."""
    folder = shard_folder(out)
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise FusionCacheError(f"{folder} is not a folder fusion-cache made for shards; move it away or choose "
                               "another --out")
    if not folder.exists():
        try:
            folder.mkdir()
        except OSError as e:
            raise FusionCacheError(f"cannot create {folder} ({e.strerror}); choose a writable --out") from None
        return folder
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise FusionCacheError(f"cannot read shard folder {folder} ({e.strerror}); fix its permissions or move it "
                               "away") from None
    foreign = foreign_entries(folder, names)
    if foreign:
        raise FusionCacheError(f"{folder} holds {quote(foreign[0])}, which is not a shard fusion-cache wrote; move it "
                               "away or choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FusionCacheError(f"cannot write shard folder {folder}: permission denied; fix its permissions")
    remove_shard_tmp(folder)
    shards = [n for n in names if not is_shard_tmp_name(n)]
    fingerprints = {_shard_fingerprint(folder / n) for n in shards}
    if shards and fingerprint not in fingerprints and fingerprints - {None}:
        if not force:
            raise FusionCacheError(f"{folder} holds the shards of an extraction with other settings; run that "
                                   "command again to finish it, or pass --force to start over")
        for n in shards:
            (folder / n).unlink(missing_ok=True)
    return folder


def _shard_fingerprint(path: Path) -> str | None:
    try:
        if not os.path.isfile(path) or not is_hdf5_file(path):
            return None
        with h5py.File(path, "r") as f:
            return _as_str(f.attrs.get("fingerprint"))
    except Exception:
        return None


def remove_shard_tmp(folder: Path) -> None:
    """Remove the temporary files of shard writers that were killed (`<shard>.tmp-<id>`)."""
    for n in os.listdir(folder):
        if is_shard_tmp_name(n):
            (Path(folder) / n).unlink(missing_ok=True)


def read_planned_shard(folder: Path, meta: CacheMeta, split: str, start: int, stop: int, expected: np.ndarray,
                       expected_labels: np.ndarray) -> Shard | str | None:
    """`read_shard` of the shard of [start, stop) in `folder`, or None when there is no file."""
    path = Path(folder) / shard_name(split, start, stop)
    if not os.path.lexists(path):
        return None
    return read_shard(path, meta, split, start, stop, expected, expected_labels)


def remove_shards(out: Path) -> int:
    """Remove `<out>.shards/` if it holds only files named as shards (anything else stays, and so does the
    folder). Returns how many files were removed."""
    folder = shard_folder(out)
    if not folder.is_dir() or folder.is_symlink():
        return 0
    names = os.listdir(folder)
    if foreign_entries(folder, names):
        return 0
    for n in names:
        (folder / n).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    return len(names)


def consolidate(path: str | Path, out: str | Path, force: bool = False, block: int = 4096) -> CacheMeta:
    """Copy a cache (typically the ray engine's, virtual over shard files) into one self-contained cache file
    `out`, written like any cache (`<out>.partial`, resumable, renamed when complete). Same rows, same bytes of
    features, same fingerprint; the metadata says engine ray, 0 shards."""
    src = open_cache(path)
    out = Path(out)
    if out.is_dir():
        raise FusionCacheError(f"--out {out} is a folder; pass a file path such as {out / 'cache.h5'}")
    if not out.resolve().parent.is_dir():
        raise FusionCacheError(f"cannot write {out}: folder {out.resolve().parent} does not exist; create it or "
                               "choose another --out")
    folder = shard_folder(src.path).resolve()
    if out.resolve() == src.path.resolve() or out.resolve().parent == folder:
        raise FusionCacheError(f"--out {out} is {path} itself or one of its shards, or lies in its shard folder; "
                               "choose another --out")
    check_cache_output(out)  # a lock or partial name, or a file that is no cache: refused, --force or not
    if os.path.lexists(out) and not force:
        raise FusionCacheError(f"{out} exists; pass --force to replace it, or choose another --out")
    meta = dataclasses.replace(src.meta, shards=0, complete=False)
    items = {s: read_items(src.path, s) for s in SPLITS}
    with CacheWriter(out, meta, force=force, items=items if all(items.values()) else None) as w, \
            h5py.File(src.path, "r") as f:
        for s in SPLITS:
            n = meta.split_size(s)
            for lo in range(w.next_position(s), n, block):
                hi = min(lo + block, n)
                g = f[s]
                w.append(s, hi, g["labels"][lo:hi], g["indices"][lo:hi],
                         {t: g["features"][t][lo:hi] for t in meta.taps})
        return w.finish()
