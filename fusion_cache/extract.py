"""`fusion-cache extract`: validate the settings, plan once, reuse when nothing changed, hand the Plan to an engine.

The flow is one-way: `ExtractConfig` -> `validate` -> `plan` (a `Plan`: the cache's metadata and every item to
read, each file's content hashed) -> reuse check -> the engine's `run` (`engines/local.py`, `engines/ray.py`) ->
the cache writer (`cache.py`). Engines execute the Plan as it is; none of them plans again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from . import cache as cache_mod
from .backbone import INTERPOLATIONS, PRECISIONS, Preprocess, load_weights, resize_sentence, versions
from .backbones import resolve
from . import leaks as leaks_mod
from . import sources as sources_mod
from .decode import decodes_as_before
from .decode import describe as describe_decode
from .files import display_path, is_content_digest
from .io import check_output_file
from .leaks import LeakWarning
from .sampler import SPLITS, stratified_subset
from .sources import LoadOptions
from .sources import manifest as manifest_source
from .sources.base import IntegrityWarning, Source
from .split import make_splits
from .engines import ENGINES
from .engines.core import ExtractConfig, ExtractResult, Plan, SplitPlan
from .errors import FusionCacheError
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
        if isinstance(n, int) and n <= 0:
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
    if cfg.on_leak not in ("warn", "fail"):
        raise FusionCacheError(f"unknown --on-leak '{cfg.on_leak}'; use warn or fail")
    for name, n in (("train", cfg.train_size), ("test", cfg.test_size)):
        if isinstance(n, str) and n != "default":
            raise FusionCacheError(f"--{name}-size {n!r} is not a size; pass a positive integer or 'all'")
    if cfg.write_manifest is not None:
        check_manifest_output(cfg)
    # a file for a folder dataset, a missing manifest, a folder auto cannot read: before the weights
    sources_mod.check_root(cfg.dataset, Path(cfg.data_root))
    sources_mod.check_options(cfg.dataset, Path(cfg.data_root), load_options(cfg))
    if cfg.test_fraction is not None or cfg.split_seed is not None:
        where = sources_mod.test_split(cfg.dataset, Path(cfg.data_root))
        if where is not None:
            flag = "--test-fraction" if cfg.test_fraction is not None else "--split-seed"
            raise FusionCacheError(f"{flag} applies to a dataset without a test split, and this one has one "
                                   f"({where}); drop {flag}")


def load_options(cfg: ExtractConfig) -> LoadOptions:
    return LoadOptions(cfg.download, cfg.skip_integrity_check, image_column=cfg.image_column,
                       label_column=cfg.label_column, label_key=cfg.label_key, label_set=cfg.label_set)


def plan(cfg: ExtractConfig, say=None) -> tuple[Plan, object]:
    """Load the sources and weights and decide what the cache will hold: (the Plan, the loaded weights). No
    backbone pass yet. Every image file is hashed; its absolute path is kept as given (a manifest reached
    through a link reads its relative paths from the link's folder, as a shell does). `say` gets one-line
    notes: what `--dataset auto` found and how the splits were made."""
    validate(cfg)
    say = say or (lambda line: None)
    bb = resolve(cfg.backbone)
    table = bb.tap_table()
    taps = table.parse_taps(list(cfg.taps))
    pool = table.check_pool(cfg.pool or table.default_pool)
    weights = load_weights(cfg.weights, seed=cfg.seed, backbone=bb)  # before the data: a bad file fails fast
    pre = preprocess_for(bb, weights.name, cfg.image_size)
    data_root = Path.cwd() / cfg.data_root  # absolute, as given: links not resolved, `..` not folded away
    dataset, found = sources_mod.resolve(cfg.dataset, data_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listing = sources_mod.load(dataset, data_root, load_options(cfg))
    for message in dict.fromkeys(str(w.message) for w in caught):  # both splits share a tarball: warn once
        warnings.warn(message, IntegrityWarning, stacklevel=2)
    splits = make_splits(listing, cfg.test_fraction, cfg.split_seed)
    sources = {"train": splits.train, "test": splits.test}
    if cfg.write_manifest is not None and (splits.train.images is not None or splits.train.reader is not None):
        how = "as pixels" if splits.train.images is not None else "inside its files"
        raise FusionCacheError(f"--write-manifest lists image files, and {dataset} holds its images {how}; drop "
                               "--write-manifest")
    if found or splits.record["method"] != "given" or splits.validation_from is not None:
        say(decision(cfg.data_root, dataset, found, splits))  # what auto found, or a split the user did not give
    defaults = DEFAULT_SIZES.get(dataset, {})
    sizes = {s: defaults.get(s) if n == "default" else n for s, n in (("train", cfg.train_size),
                                                                        ("test", cfg.test_size))}
    subsets = {s: stratified_subset(sources[s].labels, sizes[s], cfg.seed, s) for s in SPLITS}
    all_names = {s: sources[s].names for s in SPLITS}  # a list built once per split
    names = {s: [all_names[s][i] for i in subsets[s]] for s in SPLITS}
    leaks = leaks_mod.find({s: (names[s], [sources[s].digests[i] for i in subsets[s]], sources[s].labels[subsets[s]])
                            for s in SPLITS if sources[s].digests is not None}, sources["train"].classes)
    if cfg.on_leak == "fail" and leaks_mod.leak_line(leaks):
        raise FusionCacheError(leaks_mod.leak_line(leaks, fail=True))
    for line in leaks_mod.warnings_for(leaks):
        warnings.warn(line, LeakWarning, stacklevel=2)
    files = sources["train"].images is None
    reduce_to = None if cfg.full_decode or not files else pre.image_size
    meta = cache_mod.CacheMeta.create(
        backbone=bb.name,
        weights_sha256=weights.sha256,
        image_size=pre.image_size,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        resize=resize_sentence(pre.interpolation),
        pool=pool,
        taps=tuple(taps),
        dataset=dataset,
        data_identity={s: sources[s].identity for s in SPLITS},
        subset={s: hash_indices(subsets[s]) for s in SPLITS},
        dtype=cfg.dtype,
        precision=cfg.precision,
        library=bb.library,
        library_version=bb.library_version,
        interpolation=pre.interpolation,
        tap_table=table.to_json(),
        decode=describe_decode(not cfg.full_decode) if files else PIXELS_AS_STORED,
        split=splits.record,
        leaks=leaks,
        source_options={k: v for k, v in dataclasses.asdict(load_options(cfg)).items()
                        if k in sources_mod.OPTION_FLAGS and v is not None},
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
    if cfg.write_manifest is not None:
        written = write_manifest(cfg.write_manifest, splits, cfg.force)
        say(f"wrote the split to {display_path(written)} (path,label,split; pass it as --data-root to reuse or edit it)")
    spec = str(weights.file) if weights.file else weights.name
    plans = {s: split_plan(sources[s], subsets[s], reduce_to) for s in SPLITS}
    return Plan(meta, spec, cfg.seed, plans), weights


DEFAULT_SIZES = {"cifar10": {"train": 5000, "test": 1000}}  # the case study's subset; other sources: every image
PIXELS_AS_STORED = "pixels as the dataset stores them (no file decoding)"


def decision(data_root, dataset: str, found: str | None, splits) -> str:
    """One line: what was read (and what `auto` found), and how train and test were made."""
    what = f"{found} ({dataset})" if found else f"--dataset {dataset}"
    r = splits.record
    n_train, n_test = len(splits.train), len(splits.test)
    if r["method"] == "auto":
        how = (f"no test split, so one was made: each image goes to test when a hash of its content falls under "
               f"--test-fraction {r['test_fraction']:g} (--split-seed {r['seed']}; each class keeps an image on each "
               f"side): train {n_train}, test {n_test}")
    elif r.get("validation"):
        n_val = n_train - r["validation_from"]
        how = (f"its own splits: train {r['train']} ({r['validation_from']} images), validation {r['validation']} "
               f"({n_val}, cached with train; tuning chooses on it), test {r['test']} ({n_test})")
    else:
        how = f"its own splits: train {r['train']} ({n_train} images), test {r['test']} ({n_test})"
    return f"{display_path(data_root)}: {what}; {how}"


def check_manifest_output(cfg: ExtractConfig) -> None:
    """--write-manifest may replace a file only with --force, never the command's own input or a cache; an
    existing manifest with the same content is left as it is (a rerun after a failure), so this is checked
    again, on the content, when it is written."""
    out = Path(cfg.write_manifest)
    for other, flag in ((cfg.out, "--out"), (cfg.data_root, "--data-root")):
        if os.path.abspath(out) == os.path.abspath(other) or (out.exists() and Path(other).exists()
                                                                and out.resolve() == Path(other).resolve()):
            raise FusionCacheError(f"--write-manifest and {flag} name the same file ({display_path(out)}); choose "
                                   "another name for the manifest")
    if out.exists() and not cfg.force and is_manifest_like(out):
        check_output_file(out, True, inputs=(cfg.data_root, cfg.out), what="--write-manifest", example="split.csv")
        return
    check_output_file(out, cfg.force, inputs=(cfg.data_root, cfg.out), what="--write-manifest", example="split.csv")


def is_manifest_like(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(b"path,label,split\n")) == b"path,label,split\n"
    except OSError:
        return False


def write_manifest(path, splits, force: bool) -> Path:
    """The split as a manifest (path,label,split): every item of the source splits, paths relative to the
    manifest's folder where they can be. A manifest with other content is replaced only with --force."""
    out = Path(path)
    rows = []
    for name, src in splits.assignment():
        rows += [(src.file(i), src.classes[int(label)], name) for i, label in enumerate(src.labels)]
    return manifest_source.write(out, rows, replace=force)


def split_plan(src: Source, chosen: np.ndarray, reduce_to: int | None = None) -> SplitPlan:
    """The chosen items of one split as an engine reads them: pixels for an in-memory source, else absolute
    files with their display names and content digests (`reduce_to`: see `decode.read_image`)."""
    chosen = np.asarray(chosen, dtype=np.int64)
    labels = np.ascontiguousarray(src.labels[chosen])
    if src.images is not None:
        return SplitPlan(src.split, chosen, labels, pixels=np.ascontiguousarray(src.images[chosen]))
    if src.reader is not None:
        return SplitPlan(src.split, chosen, labels, names=tuple(src.paths[i] for i in chosen),
                         digests=tuple(src.digests[i] for i in chosen), reduce_to=reduce_to, reader=src.reader,
                         keys=tuple(src.keys[i] for i in chosen))
    return SplitPlan(src.split, chosen, labels, names=tuple(src.paths[i] for i in chosen),
                     files=tuple(src.file(i) for i in chosen), digests=tuple(src.digests[i] for i in chosen),
                     reduce_to=reduce_to)


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


def decoded_as_before(the_plan: Plan) -> bool:
    """Whether every planned file decodes as it did before schema 4 (no EXIF rotation, nothing reduced), so an
    older cache with the same older fingerprint holds these features. Reads image headers only."""
    return all(decodes_as_before(f, sp.reduce_to) for sp in the_plan.splits.values()
               for f, digest in zip(sp.files or (), sp.digests or ()) if is_content_digest(digest))  # unreadable: as then


def hash_indices(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def extract(cfg: ExtractConfig, say=None) -> ExtractResult:
    """Extract (or reuse, or resume) the cache that `cfg` describes: validate, plan once, check reuse once,
    and hand the Plan to the chosen engine. Returns what was done; `say` gets plan's one-line notes."""
    the_plan, weights = plan(cfg, say)
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
    same = existing == meta.fingerprint or (
        held is not None and held.schema_version < meta.schema_version
        and existing == meta.fingerprint_at(held.schema_version) and decoded_as_before(the_plan))
    if same and existing and not force:
        # its rows: the planned ones less the skipped images
        return ExtractResult(out, True, {s: held.split_size(s) for s in SPLITS}, the_plan.dims)
    if not force:
        why = "was built with other settings" if existing else "is not a complete fusion-cache file"
        raise FusionCacheError(f"{out} exists and {why}; pass --force to replace it, or choose another --out")
    return None
