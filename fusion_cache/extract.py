"""One pass of the frozen backbone over a dataset, pooled tap features streamed into the cache."""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache as cache_mod
from .backbone import (PRECISIONS, INTERPOLATIONS, Preprocess, PooledExtractor, build_model, load_weights,
                       resize_sentence, resolve_device, versions)
from .backbones import DEFAULT_BACKBONE, resolve
from .data import (SPLITS, BadImage, IntegrityWarning, Source, check_data_root, display_path, load_source,
                   stratified_subset)
from .errors import FusionCacheError
from .taps import POOLS

DTYPES = cache_mod.DTYPES


@dataclass
class ExtractConfig:
    """Everything `fusion-cache extract` takes. Fields that change the features go into the fingerprint."""

    out: Path
    dataset: str = "cifar10"  # cifar10 | imagefolder | manifest
    data_root: Path = Path("data")  # a folder; for manifest, the CSV file
    train_size: int | None = 5000  # None = the whole split; 5000/1000 is the case study's subset
    test_size: int | None = 1000
    seed: int = 0  # draws the stratified subset (and the weights when --weights random)
    backbone: str = DEFAULT_BACKBONE  # a `backbones` name: mobilenet_v2, resnet50, timm:vit_small_patch16_224, ...
    weights: str | None = None  # None: the backbone's default (mobilenet_v2: imagenet1k_v1) | a name | random | PATH
    image_size: int | None = None  # None: the weights' own (mobilenet_v2: 128, the case study's CIFAR-10 upscale)
    taps: tuple[str, ...] = ("all",)  # every block: any view can be ablated later without re-extracting
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast for the forward pass
    pool: str | None = None  # None: the model's own (avg for CNNs) | avgmax | cls | mean | clsmean (token taps)
    dtype: str = "float32"  # storage dtype of the features: float32 | float16
    download: bool = True
    skip_integrity_check: bool = False
    force: bool = False  # replace an existing cache built with other settings
    workers: int | None = None  # DataLoader workers for image folders; None = min(4, CPUs)
    on_bad_image: str = "fail"  # fail | skip, for undecodable files in image folders
    compile: bool = False  # torch.compile the extractor
    progress: bool | None = None  # None: show the bar when stderr is a terminal
    # -- the engine (provenance, not in the fingerprint): local, or Ray workers writing shards (`cluster.py`)
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # None: start a local Ray | auto | HOST:PORT
    num_workers: int | None = None  # Ray workers; None: one per GPU (--gpus-per-worker > 0), else one per CPU
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0  # Ray's CPU reservation per worker; torch threads = max(1, floor(this))
    shard_size: int | None = None  # images per shard; None: 64 batches


@dataclass
class ExtractResult:
    path: Path
    reused: bool
    counts: dict[str, int]
    dims: int
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # the ray engine's: workers, per-worker rows and seconds

    def summary(self) -> str:
        counts = ", ".join(f"{s} {n}" for s, n in self.counts.items())
        if self.reused:
            return f"reused {self.path}: settings unchanged ({counts} images, {self.dims} dims); pass --force to rebuild"
        extra = ""
        if any(self.resumed_from.values()):
            extra += " resumed from " + ", ".join(f"{s} {n}" for s, n in self.resumed_from.items()) + ";"
        n_skipped = sum(len(v) for v in self.skipped.values())
        if n_skipped:
            extra += f" skipped {n_skipped} unreadable image(s), listed in the cache attrs;"
        return (
            f"wrote {self.path}: {counts} images, {self.dims} dims;{extra} "
            f"{self.seconds:.1f} s, {self.images_per_second:.0f} img/s"
        )


RAY_OPTIONS = {"ray_address": None, "num_workers": None, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0,
               "shard_size": None}  # their defaults: a non-default value asks for --engine ray


def validate(cfg: ExtractConfig) -> None:
    if cfg.engine not in ("local", "ray"):
        raise FusionCacheError(f"unknown --engine '{cfg.engine}'; use local or ray")
    if cfg.engine == "local":
        given = [k for k, default in RAY_OPTIONS.items() if getattr(cfg, k) != default]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise FusionCacheError(f"{flag} applies only to --engine ray; add --engine ray or drop {flag}")
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
    check_data_root(cfg.dataset, cfg.data_root)  # a file for a folder dataset, a missing manifest: before the weights


def plan(cfg: ExtractConfig, hash_contents: bool = True
         ) -> tuple[cache_mod.CacheMeta, dict[str, Source], dict[str, np.ndarray], object]:
    """Load the sources and weights and work out what the cache will hold; no backbone pass yet.

    `hash_contents=False` (a Ray worker, which checks what it sees against the driver's plan instead) lists
    image files without hashing their contents; the metadata's data identity is then not the cache's."""
    validate(cfg)
    bb = resolve(cfg.backbone)
    table = bb.tap_table()
    taps = table.parse_taps(list(cfg.taps))
    pool = table.check_pool(cfg.pool or table.default_pool)
    weights = load_weights(cfg.weights, seed=cfg.seed, backbone=bb)  # before the data: a bad file fails fast
    pre = preprocess_for(bb, weights.name, cfg.image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources = {
            s: load_source(cfg.dataset, cfg.data_root, s, cfg.download, cfg.skip_integrity_check, hash_contents)
            for s in SPLITS
        }
    for message in dict.fromkeys(str(w.message) for w in caught):  # both splits share a tarball: warn once
        warnings.warn(message, IntegrityWarning, stacklevel=2)
    if sources["train"].classes != sources["test"].classes:
        only_test = [c for c in sources["test"].classes if c not in sources["train"].classes]
        only_train = [c for c in sources["train"].classes if c not in sources["test"].classes]
        c, has, lacks = (only_test[0], "test", "train") if only_test else (only_train[0], "train", "test")
        if cfg.dataset == "manifest":
            fix = (f"train and test must hold the same classes: add {lacks} rows labelled {c!r}, or remove its "
                   f"{has} rows")
        else:
            fix = "train and test must hold the same class folders"
        raise FusionCacheError(f"class {c!r} is in {has} but not in {lacks}; {fix}")
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
        data_root=display_path(Path(cfg.data_root).resolve()),
        classes=tuple(sources["train"].classes),
        train_size=len(subsets["train"]),
        test_size=len(subsets["test"]),
        train_source_size=len(sources["train"]),
        test_source_size=len(sources["test"]),
        seed=cfg.seed,
        integrity_checked=not any(src.notes for src in sources.values()),
        versions=versions(),
    )
    return meta, sources, subsets, weights


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
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or reuse, or resume) the cache that `cfg` describes. Returns what was done."""
    if cfg.engine == "ray":
        from .cluster import extract_ray

        return extract_ray(cfg)
    meta, sources, subsets, weights = plan(cfg)
    out = Path(cfg.out)
    taps = list(meta.taps)
    table = meta.table
    widths = dict(zip(taps, table.channels(taps, meta.pool)))
    dims = sum(widths.values())
    counts = {s: len(subsets[s]) for s in SPLITS}
    reused = existing_cache(out, meta, cfg.force, counts, dims)
    if reused is not None:
        return reused

    _refuse_shard_folder(out, cfg.force)
    core = Core(cfg, meta, sources, subsets, weights)
    start = time.perf_counter()
    processed = 0
    with cache_mod.CacheWriter(out, meta, force=cfg.force) as writer, ThreadPoolExecutor(1) as pool, \
            writer.discard_on_error():
        pending: Future | None = None
        total = sum(counts[s] - writer.next_position(s) for s in SPLITS)
        bar = tqdm(total=total, unit="img", desc="extract", disable=_no_bar(cfg.progress), dynamic_ncols=True)
        try:
            for split in SPLITS:
                for batch in core.batches(split, writer.next_position(split), counts[split]):
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(writer.append, split, batch.next_position, batch.labels, batch.indices,
                                          batch.features, batch.skipped)
                    processed += len(batch.labels)
                    bar.update(batch.next_position - batch.start)
            if pending is not None:
                pending.result()
                pending = None
        finally:
            if pending is not None:
                try:
                    pending.result()
                except Exception:
                    pass
            bar.close()
        all_skipped = {s: writer.skipped(s) for s in SPLITS if writer.skipped(s)}
        counts = {s: writer.rows(s) for s in SPLITS}
        writer.finish(skipped=all_skipped, train_size=counts["train"], test_size=counts["test"],
                      device=str(core.device))
        resumed = dict(writer.resumed_from)
        if cfg.force:  # under the lock: a ray run on OUT may start the moment it is released
            cache_mod.remove_shards(out)  # a ray extraction's shards that OUT no longer points to
    seconds = time.perf_counter() - start
    return ExtractResult(out, False, counts, dims, seconds, processed / max(seconds, 1e-9), resumed, all_skipped)


def existing_cache(out: Path, meta: cache_mod.CacheMeta, force: bool, counts: dict[str, int], dims: int
                   ) -> ExtractResult | None:
    """What an existing `out` means, for both engines: reused when it is complete with these settings (built
    by either engine), refused unless --force when it is anything else; None when it is to be (re)built."""
    if not os.path.lexists(out):
        return None
    existing = cache_mod.peek_fingerprint(out)
    if existing in (meta.fingerprint, meta.legacy_fingerprint()) and existing and not force:
        return ExtractResult(out, True, counts, dims)
    if not force:
        why = "was built with other settings" if existing else "is not a complete fusion-cache file"
        raise FusionCacheError(f"{out} exists and {why}; pass --force to replace it, or choose another --out")
    return None


@dataclass
class Batch:
    """One batch of extracted rows: positions [start, next_position) of a split's chosen indices, minus the
    skipped unreadable images."""

    start: int
    next_position: int
    labels: np.ndarray  # (n,) int64
    indices: np.ndarray  # (n,) int64, positions in the source split
    features: dict[str, np.ndarray]  # {tap: (n, W)} in the cache's storage dtype
    skipped: list[str]  # display names of the unreadable images of this batch


class Core:
    """The extraction core that both engines call: a range of positions in one split's chosen indices in,
    pooled tap features out. Preprocessing, the forward pass, pooling, precision and the storage dtype live
    here and nowhere else; the local engine streams its batches into one file, a Ray worker into a shard.

    Batches start at multiples of `batch_size` counted from the split's first position, so any range that
    starts at such a multiple (a resumed run, a shard) meets exactly the batches of an uninterrupted run.
    """

    def __init__(self, cfg: ExtractConfig, meta: cache_mod.CacheMeta, sources: dict[str, Source],
                 subsets: dict[str, np.ndarray], weights, device: str | None = None, workers: int | None = None):
        self.cfg, self.meta, self.sources, self.subsets = cfg, meta, sources, subsets
        self.device = resolve_device(device or cfg.device)
        self.workers = cfg.workers if workers is None else workers
        self.widths = dict(zip(meta.taps, meta.table.channels(list(meta.taps), meta.pool)))
        model = build_model(weights).to(self.device)
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU alike
        self.extractor = PooledExtractor(model, list(meta.taps), meta.pool, meta.table).eval()
        if cfg.compile:
            self.extractor = torch.compile(self.extractor)
        self.pre = Preprocess(meta.image_size, meta.mean, meta.std, meta.interpolation)

    def batches(self, split: str, start: int, stop: int):
        """Yield the `Batch`es of positions [start, stop) of `split`; `start` must be a multiple of the batch
        size (or `stop`). An unreadable image raises unless --on-bad-image skip."""
        if start % self.cfg.batch_size and start != stop:
            raise ValueError(f"range start {start} is not a multiple of the batch size {self.cfg.batch_size}")
        src, idx = self.sources[split], self.subsets[split]
        for lo, next_pos, positions, images, bad in _batches(src, idx, start, stop, self.cfg.batch_size,
                                                             self.workers, self.device, self.pre):
            if bad and self.cfg.on_bad_image == "fail":
                raise FusionCacheError(
                    f"cannot read image {bad[0][0]}: {bad[0][1]}; fix or remove it, or pass --on-bad-image skip"
                )
            if len(positions):
                feats = _forward(self.extractor, images, self.pre, self.device, self.cfg.precision)
                _check_finite(feats, split, idx[positions[0]])
            else:
                feats = {t: np.zeros((0, c), np.float32) for t, c in self.widths.items()}
            yield Batch(lo, next_pos, src.labels[idx[positions]], idx[positions],
                        {t: v.astype(self.meta.dtype, copy=False) for t, v in feats.items()}, [n for n, _ in bad])


def _refuse_shard_folder(out: Path, force: bool) -> None:
    """The local engine does not silently leave a Ray extraction's shards beside the cache it replaces."""
    shards = cache_mod.shard_folder(out)
    if os.path.lexists(shards) and not force:
        raise FusionCacheError(f"{shards} holds the shards of a Ray extraction (--engine ray); run that command "
                               "again to finish it, or pass --force to replace it with a local extraction")


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _forward(extractor, images: torch.Tensor, pre: Preprocess, device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """uint8 (N, 3, S, S) -> {tap: (N, W) float32 numpy}; W = C (avg pooling) or 2C (avgmax)."""
    x = pre.normalize(images).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    dtype = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        feats = extractor(x)
    return {t: v.float().cpu().numpy() for t, v in feats.items()}


def _check_finite(feats: dict[str, np.ndarray], split: str, first_index: int) -> None:
    for t, v in feats.items():
        if not np.isfinite(v).all():
            raise FusionCacheError(
                f"the backbone produced NaN or inf at {t} for {split} images from index {first_index}; "
                "check the weights file, or use --precision fp32"
            )


def _batches(src: Source, idx: np.ndarray, start: int, stop: int, bs: int, workers: int | None,
             device: torch.device, pre: Preprocess):
    """Yield (start, next_position, positions kept, uint8 (n, 3, S, S) resized images, [(bad file, reason)])
    per batch of positions [start, stop)."""
    if src.images is not None:  # in memory (CIFAR-10): batched tensor resize, no per-image PIL work
        for lo in range(start, stop, bs):
            hi = min(lo + bs, stop)
            images = pre.resize(torch.from_numpy(src.images[idx[lo:hi]]))
            yield lo, hi, np.arange(lo, hi), images, []
        return
    dataset = _FolderDataset(src, idx, pre)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    positions = list(range(start, stop))
    batch_sampler = [positions[i : i + bs] for i in range(0, len(positions), bs)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    for batch_positions, (kept, images, bad) in zip(batch_sampler, loader):
        yield batch_positions[0], batch_positions[-1] + 1, np.asarray(kept, dtype=np.int64), images, bad


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, src: Source, idx: np.ndarray, pre: Preprocess):
        self.src, self.idx, self.pre = src, idx, pre

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, position: int):
        rel = self.src.paths[self.idx[position]]  # the display name, as BadImage messages start with it
        try:
            return position, self.pre.resize(self.src.image(self.idx[position])), None
        except BadImage as e:
            message = str(e)
            reason = message[len(rel) + 2:] if message.startswith(f"{rel}: ") else message
            return position, None, (rel, reason)


def _collate(items):
    kept = [p for p, img, err in items if img is not None]
    images = [img for p, img, err in items if img is not None]
    bad = [err for p, img, err in items if img is None]
    stacked = torch.stack(images) if images else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return kept, stacked, bad
