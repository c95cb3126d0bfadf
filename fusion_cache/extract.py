"""`fusion-cache extract`: validate the settings, plan once, reuse when nothing changed, hand the Plan to an engine.

The flow is one-way: `ExtractConfig` -> `validate` -> `plan` (a `Plan`: the cache's metadata and every item to
read, each file's content hashed) -> reuse check -> the engine's `run` (`engines/local.py`, `engines/ray.py`) ->
the cache writer (`cache.py`). Engines execute the Plan as it is; none of them plans again.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from . import cache as cache_mod
from .backbone import INTERPOLATIONS, PRECISIONS, Preprocess, load_weights, resize_sentence, versions
from .backbones import resolve
from .data import SPLITS, IntegrityWarning, Source, check_data_root, display_path, load_source, stratified_subset
from .engines import ENGINES
from .engines.core import ExtractConfig, ExtractResult, Plan, SplitPlan
from .errors import FusionCacheError, quote
from .taps import POOLS

__all__ = ["ExtractConfig", "ExtractResult", "Plan", "extract", "plan", "validate"]

DTYPES = cache_mod.DTYPES


def validate(cfg: ExtractConfig) -> None:
    """Every setting, checked before any weights or data are read."""
    if cfg.engine not in ENGINES:
        raise FusionCacheError(f"unknown --engine '{cfg.engine}'; use one of {', '.join(ENGINES)}")
    for name, engine in ENGINES.items():
        if name == cfg.engine:
            continue
        given = [k for k, default in engine.options.items() if getattr(cfg, k) != default]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise FusionCacheError(f"{flag} applies only to --engine {name}; add --engine {name} or drop {flag}")
    if cfg.image_size is not None and not 32 <= cfg.image_size <= 1024:
        raise FusionCacheError(f"--image-size {cfg.image_size} is out of range; pass 32 (MobileNetV2's minimum) to 1024")
    max_workers = 2 * (os.cpu_count() or 1)
    if cfg.workers is not None and not 0 <= cfg.workers <= max_workers:
        raise FusionCacheError(f"--workers {cfg.workers} is out of range; pass 0 to {max_workers} (2 x CPUs)")
    if not 0 <= cfg.seed < 2**32:
        raise FusionCacheError(f"--seed {cfg.seed} is out of range; pass 0 to {2**32 - 1}")
    if cfg.batch_size <= 0:
        raise FusionCacheError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.precision not in PRECISIONS:
        raise FusionCacheError(f"unknown --precision '{cfg.precision}'; use one of {', '.join(PRECISIONS)}")
    if cfg.pool is not None and cfg.pool not in POOLS:
        raise FusionCacheError(f"unknown --pool '{cfg.pool}'; use one of {', '.join(POOLS)}")
    if cfg.dtype not in DTYPES:
        raise FusionCacheError(f"unknown --dtype '{cfg.dtype}'; use one of {', '.join(DTYPES)}")
    if cfg.on_bad_image not in ("fail", "skip"):
        raise FusionCacheError(f"unknown --on-bad-image '{cfg.on_bad_image}'; use fail or skip")
    for name, n in (("train", cfg.train_size), ("test", cfg.test_size)):
        if n is not None and n <= 0:
            raise FusionCacheError(f"--{name}-size must be positive, got {n}; pass a positive integer or 'all'")
    if Path(cfg.out).is_dir():
        raise FusionCacheError(f"--out {cfg.out} is a folder; pass a file path such as {Path(cfg.out) / 'cache.h5'}")
    parent = Path(cfg.out).resolve().parent
    if not parent.is_dir():
        raise FusionCacheError(f"cannot write {cfg.out}: folder {parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise FusionCacheError(f"cannot write {cfg.out}: folder {parent} is not writable; choose a writable --out")
    cache_mod.check_cache_output(cfg.out)  # a lock or partial name, or a file fusion-cache did not write
    if cfg.weights is not None and not cfg.weights.strip():
        raise FusionCacheError("--weights is empty; pass a weights name, random, or the path of a weights file "
                               "(leave --weights out for the backbone's default)")
    ENGINES[cfg.engine].module.validate(cfg)
    check_data_root(cfg.dataset, cfg.data_root)  # a file for a folder dataset, a missing manifest: before the weights


def plan(cfg: ExtractConfig) -> tuple[Plan, object]:
    """Load the sources and weights and decide what the cache will hold: (the Plan, the loaded weights). No
    backbone pass yet. Every image file is hashed; its absolute path is kept as given (a manifest reached
    through a link reads its relative paths from the link's folder, as a shell does)."""
    validate(cfg)
    bb = resolve(cfg.backbone)
    table = bb.tap_table()
    taps = table.parse_taps(list(cfg.taps))
    pool = table.check_pool(cfg.pool or table.default_pool)
    weights = load_weights(cfg.weights, seed=cfg.seed, backbone=bb)  # before the data: a bad file fails fast
    pre = preprocess_for(bb, weights.name, cfg.image_size)
    data_root = Path.cwd() / cfg.data_root  # absolute, as given: links not resolved, `..` not folded away
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources = {s: load_source(cfg.dataset, data_root, s, cfg.download, cfg.skip_integrity_check)
                   for s in SPLITS}
    for message in dict.fromkeys(str(w.message) for w in caught):  # both splits share a tarball: warn once
        warnings.warn(message, IntegrityWarning, stacklevel=2)
    if sources["train"].classes != sources["test"].classes:
        only_test = [c for c in sources["test"].classes if c not in sources["train"].classes]
        only_train = [c for c in sources["train"].classes if c not in sources["test"].classes]
        c, has, lacks = (only_test[0], "test", "train") if only_test else (only_train[0], "train", "test")
        if cfg.dataset == "manifest":
            fix = (f"train and test must hold the same classes: add {lacks} rows labelled {quote(c)}, or remove "
                   f"its {has} rows")
        else:
            fix = "train and test must hold the same class folders"
        raise FusionCacheError(f"class {quote(c)} is in {has} but not in {lacks}; {fix}")
    sizes = {"train": cfg.train_size, "test": cfg.test_size}
    subsets = {s: stratified_subset(sources[s].labels, sizes[s], cfg.seed, s) for s in SPLITS}
    meta = cache_mod.CacheMeta.create(
        backbone=bb.name,
        weights_sha256=weights.sha256,
        image_size=pre.image_size,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        resize=resize_sentence(pre.interpolation),
        pool=pool,
        taps=tuple(taps),
        dataset=cfg.dataset,
        data_identity={s: sources[s].identity for s in SPLITS},
        subset={s: hash_indices(subsets[s]) for s in SPLITS},
        dtype=cfg.dtype,
        precision=cfg.precision,
        library=bb.library,
        library_version=bb.library_version,
        interpolation=pre.interpolation,
        tap_table=table.to_json(),
        weights=weights.name,
        data_root=display_path(data_root),
        classes=tuple(sources["train"].classes),
        train_size=len(subsets["train"]),
        test_size=len(subsets["test"]),
        train_source_size=len(sources["train"]),
        test_source_size=len(sources["test"]),
        seed=cfg.seed,
        integrity_checked=not any(src.notes for src in sources.values()),
        versions=versions(),
    )
    spec = str(weights.file) if weights.file else weights.name
    splits = {s: split_plan(sources[s], subsets[s]) for s in SPLITS}
    return Plan(meta, spec, cfg.seed, splits), weights


def split_plan(src: Source, chosen: np.ndarray) -> SplitPlan:
    """The chosen items of one split as an engine reads them: pixels for an in-memory source, else absolute
    files with their display names and content digests."""
    chosen = np.asarray(chosen, dtype=np.int64)
    labels = np.ascontiguousarray(src.labels[chosen])
    if src.images is not None:
        return SplitPlan(src.split, chosen, labels, pixels=np.ascontiguousarray(src.images[chosen]))
    return SplitPlan(src.split, chosen, labels, names=tuple(src.paths[i] for i in chosen),
                     files=tuple(src.file(i) for i in chosen), digests=tuple(src.digests[i] for i in chosen))


def preprocess_for(bb, weights_name: str, image_size: int | None) -> Preprocess:
    """Mean, std, interpolation and size from the weights' metadata (named weights: their own; a file or random
    weights: the default weights'); `image_size` overrides the size and is checked against the model."""
    named = weights_name.lower() if weights_name.lower() in bb.weight_names() else None
    d = bb.preprocessing(named)
    size = image_size or d["image_size"]
    bb.check_image_size(size)
    if d["interpolation"] not in INTERPOLATIONS:
        raise FusionCacheError(f"{bb.name}'s weights ask for {d['interpolation']} resizing, which fusion-cache lacks")
    return Preprocess(size, tuple(d["mean"]), tuple(d["std"]), d["interpolation"])


def hash_indices(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or reuse, or resume) the cache that `cfg` describes: validate, plan once, check reuse once,
    and hand the Plan to the chosen engine. Returns what was done."""
    the_plan, weights = plan(cfg)
    reused = existing_cache(Path(cfg.out), the_plan, cfg.force)
    if reused is not None:
        return reused
    return ENGINES[cfg.engine].module.run(the_plan, cfg, weights)


def existing_cache(out: Path, the_plan: Plan, force: bool) -> ExtractResult | None:
    """What an existing `out` means, for every engine: reused when it is complete with these settings (the
    content fingerprint; built by either engine), refused unless --force when it is anything else; None when
    it is to be (re)built."""
    if not os.path.lexists(out):
        return None
    meta = the_plan.meta
    held = cache_mod.peek_meta(out)
    existing = held.fingerprint if held is not None else None
    if existing in (meta.fingerprint, meta.legacy_fingerprint()) and existing and not force:
        # its rows: the planned ones less the skipped images
        return ExtractResult(out, True, {s: held.split_size(s) for s in SPLITS}, the_plan.dims)
    if not force:
        why = "was built with other settings" if existing else "is not a complete fusion-cache file"
        raise FusionCacheError(f"{out} exists and {why}; pass --force to replace it, or choose another --out")
    return None
