"""What every engine shares: the extraction settings, the Plan it executes, and the batch core.

The flow is one-way: `extract.extract()` validates an `ExtractConfig`, makes one `Plan` (`extract.plan`), checks
reuse once, and hands the Plan to an engine (`engines.local`, `engines.ray`). An engine never plans: it reads
exactly the items the Plan lists, checking each file's bytes against the Plan's digest as it reads them, and
runs them through `Core`, the only place where preprocessing, the forward pass, pooling, precision and the
storage dtype live.
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import cache as cache_mod
from ..backbone import PRECISIONS, LoadedWeights, PooledExtractor, Preprocess, build_model, load_weights, resolve_device
from ..backbones import DEFAULT_BACKBONE, resolve
from ..decode import BadImage, ChangedImage, decode_bytes, read_image
from ..sampler import SPLITS
from ..errors import FusionCacheError
from ..files import display_path, is_content_digest



@dataclass
class ExtractConfig:
    """Everything `fusion-cache extract` takes. Fields that change the features go into the fingerprint."""

    out: Path
    dataset: str = "auto"  # auto (detect it from data_root) | a `sources.SOURCES` name: cifar10, imagefolder, manifest
    data_root: Path = Path("data")  # a folder; for manifest, the CSV file
    train_size: int | None | str = "default"  # None = the whole split; "default": the source's (cifar10: 5000, the
    test_size: int | None | str = "default"  # case study's subset, and 1000; others: all)
    test_fraction: float | None = None  # the split made for a dataset without a test split (None: 0.2)
    split_seed: int | None = None  # ... and its seed (None: 0)
    write_manifest: Path | None = None  # write the split as a CSV manifest (path,label,split)
    on_leak: str = "warn"  # warn | fail, when the same content is in train and test
    full_decode: bool = False  # decode every image at full size (default: large ones reduced, see decode.py)
    image_column: str | None = None  # parquet, hf: the image column (None: image)
    label_column: str | None = None  # parquet, hf: the label column (None: label)
    label_key: str | None = None  # wds: the label's member or json field (None: cls, else json's label)
    label_set: str | None = None  # cifar100: fine | coarse (None: fine)
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
    # -- the engine (provenance, not in the fingerprint): a name in `engines.ENGINES`
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


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SplitPlan:
    """The items of one split an engine reads, in cache order: position p is the cache's row p (before
    skipped unreadable images are dropped). Files are absolute paths as given (links not resolved); items
    inside containers are keys that the source's reader reads."""

    split: str
    indices: np.ndarray  # (n,) int64 positions in the source split (the cache's `indices`)
    labels: np.ndarray  # (n,) int64 class indices
    names: tuple[str, ...] | None = None  # file sources: display names, as errors and the cache show them
    files: tuple[str, ...] | None = None  # file sources: absolute paths to open
    digests: tuple[str, ...] | None = None  # file sources: sha256 of each file as listed, or why it is unreadable
    pixels: np.ndarray | None = None  # in-memory sources (CIFAR-10): (n, 3, H, W) uint8, the images themselves
    reduce_to: int | None = None  # file sources: decode large images reduced for this input size (None: full)
    reader: object | None = None  # containers (parquet, hf, wds): a `sources.base.ItemReader` of the bytes
    keys: tuple | None = None  # containers: each item's key for `reader` (names and digests as for files)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, position: int) -> torch.Tensor:
        """Item `position` as uint8 (3, H, W). A file is read once and its bytes checked against the plan's
        digest (`ChangedImage` when they differ); an undecodable one raises `BadImage`."""
        if self.pixels is not None:
            return torch.from_numpy(self.pixels[position])
        if self.reader is not None:  # an item inside a container: its bytes, checked against the planned digest
            try:
                data = self.reader.read(self.keys[position])
            except Exception as e:  # a container that changed or went away since it was listed: never skippable
                why = str(e) if isinstance(e, FusionCacheError) else f"{type(e).__name__}: {display_path(str(e))[:150]}"
                raise ChangedImage(f"{self.names[position]} cannot be read as it was planned ({why})") from None
            return decode_bytes(data, self.names[position], sha256=self.digests[position], reduce_to=self.reduce_to)
        digest = self.digests[position]
        if not is_content_digest(digest):  # unreadable when listed: read as is, and it fails as it failed then
            read_image(self.files[position], name=self.names[position], reduce_to=self.reduce_to)
            raise ChangedImage(f"{self.names[position]} was unreadable when listed ({digest}) but reads now")
        return read_image(self.files[position], name=self.names[position], sha256=digest, reduce_to=self.reduce_to)


@dataclass(frozen=True)
class Plan:
    """What an extraction will write, decided once by the driver and executed as is by every engine: the
    cache's metadata (settings and fingerprint), how to load the weights again (checked against their
    sha256), and each split's items. It pickles: the Ray engine ships it to its workers."""

    meta: cache_mod.CacheMeta
    weights: str  # an absolute weights file, a weights name, or "random" (with `seed`)
    seed: int
    splits: dict[str, SplitPlan]

    @property
    def counts(self) -> dict[str, int]:
        return {s: len(self.splits[s]) for s in SPLITS}

    def items(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]] | None:
        """{split: (source indices, names)} of the planned files, recorded in the cache (None for pixels)."""
        if any(sp.names is None for sp in self.splits.values()):
            return None
        return {s: (sp.indices, sp.names) for s, sp in self.splits.items()}

    @property
    def widths(self) -> dict[str, int]:
        return dict(zip(self.meta.taps, self.meta.table.channels(list(self.meta.taps), self.meta.pool)))

    @property
    def dims(self) -> int:
        return sum(self.widths.values())

    def load_weights(self, where: str) -> LoadedWeights:
        """The planned weights, loaded here (`where`: who loads them, for the error), or an error naming the
        fix when they are not the planned ones."""
        weights = load_weights(self.weights, seed=self.seed, backbone=resolve(self.meta.backbone))
        if weights.sha256 != self.meta.weights_sha256:
            raise FusionCacheError(f"{where} loaded other weights than the driver ({self.weights}); put the same "
                                   "weights file at the same path on every node")
        return weights


# ---------------------------------------------------------------------------------------------- the core


@dataclass
class Batch:
    """One batch of extracted rows: positions [start, next_position) of a split's planned items, minus the
    skipped unreadable images."""

    start: int
    next_position: int
    labels: np.ndarray  # (n,) int64
    indices: np.ndarray  # (n,) int64, positions in the source split
    features: dict[str, np.ndarray]  # {tap: (n, W)} in the cache's storage dtype
    skipped: list[str]  # display names of the unreadable images of this batch


class Core:
    """The extraction core that both engines call: a range of positions in one split's planned items in,
    pooled tap features out. The local engine streams its batches into one file, a Ray worker into a shard.

    Batches start at multiples of `batch_size` counted from the split's first position, so any range that
    starts at such a multiple (a resumed run, a shard) meets exactly the batches of an uninterrupted run.
    `where` names the process in errors ("" for the local engine, the node for a Ray worker).
    """

    def __init__(self, plan: Plan, cfg: ExtractConfig, weights: LoadedWeights, device: str | None = None,
                 workers: int | None = None, where: str = ""):
        self.plan, self.cfg, self.meta, self.where = plan, cfg, plan.meta, where
        self.device = resolve_device(device or cfg.device)
        self.workers = cfg.workers if workers is None else workers
        self.widths = plan.widths
        model = build_model(weights).to(self.device)
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU alike
        self.extractor = PooledExtractor(model, list(self.meta.taps), self.meta.pool, self.meta.table).eval()
        if cfg.compile:
            self.extractor = torch.compile(self.extractor)
        self.pre = Preprocess(self.meta.image_size, self.meta.mean, self.meta.std, self.meta.interpolation)

    def batches(self, split: str, start: int, stop: int):
        """Yield the `Batch`es of positions [start, stop) of `split`; `start` must be a multiple of the batch
        size (or `stop`). An unreadable image raises unless --on-bad-image skip; a file whose bytes are not
        the planned ones always raises."""
        if start % self.cfg.batch_size and start != stop:
            raise ValueError(f"range start {start} is not a multiple of the batch size {self.cfg.batch_size}")
        sp = self.plan.splits[split]
        for lo, next_pos, positions, images, bad, changed in _batches(sp, start, stop, self.cfg.batch_size,
                                                                      self.workers, self.device, self.pre):
            if changed:
                if self.where:
                    raise FusionCacheError(f"{changed[0]} (on {self.where}); put the same data at the same path "
                                           "on every node, and leave the images unchanged while extract runs")
                raise FusionCacheError(f"{changed[0]}; leave the images unchanged while extract runs, then run "
                                       "the same command again")
            if bad and self.cfg.on_bad_image == "fail":
                raise FusionCacheError(
                    f"cannot read image {bad[0][0]}: {bad[0][1]}; fix or remove it, or pass --on-bad-image skip"
                )
            if len(positions):
                feats = _forward(self.extractor, images, self.pre, self.device, self.meta.precision)
                _check_finite(feats, split, sp.indices[positions[0]])
            else:
                feats = {t: np.zeros((0, c), np.float32) for t, c in self.widths.items()}
            yield Batch(lo, next_pos, sp.labels[positions], sp.indices[positions],
                        {t: v.astype(self.meta.dtype, copy=False) for t, v in feats.items()}, [n for n, _ in bad])


def no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable` for --progress/--no-progress (None: tqdm decides from the terminal)."""
    return None if progress is None else not progress


def node_name() -> str:
    return f"the Ray worker on {socket.gethostname()}"


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


def _batches(sp: SplitPlan, start: int, stop: int, bs: int, workers: int | None, device: torch.device,
             pre: Preprocess):
    """Yield (start, next_position, positions kept, uint8 (n, 3, S, S) resized images, [(bad file, reason)],
    [changed file message]) per batch of positions [start, stop)."""
    if sp.pixels is not None:  # in memory (CIFAR-10): batched tensor resize, no per-image PIL work
        for lo in range(start, stop, bs):
            hi = min(lo + bs, stop)
            images = pre.resize(torch.from_numpy(sp.pixels[lo:hi]))
            yield lo, hi, np.arange(lo, hi), images, [], []
        return
    dataset = _FileDataset(sp, pre)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    positions = list(range(start, stop))
    batches = [positions[i : i + bs] for i in range(0, len(positions), bs)]
    # Each batch is decoded by all the workers, a part each, and put together again here: one worker per batch
    # would leave the others idle on the first batch and on a short run (camera photos: 40 ms each).
    parts, owner = [], []
    for b, batch in enumerate(batches):
        size = -(-len(batch) // max(1, workers))
        for j in range(0, len(batch), size):
            parts.append(batch[j : j + size])
            owner.append(b)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=parts, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    for b, group in itertools.groupby(zip(owner, loader), key=lambda item: item[0]):
        pieces = [piece for _, piece in group]
        kept = [p for piece in pieces for p in piece[0]]
        images = [piece[1] for piece in pieces if len(piece[1])]
        stacked = torch.cat(images) if images else pieces[0][1]
        bad = [e for piece in pieces for e in piece[2]]
        changed = [c for piece in pieces for c in piece[3]]
        yield batches[b][0], batches[b][-1] + 1, np.asarray(kept, dtype=np.int64), stacked, bad, changed


class _FileDataset(torch.utils.data.Dataset):
    """A split plan's files for a DataLoader: (position, resized image or None, (name, reason) or None,
    changed-file message or None). Errors come back as values: a DataLoader worker's exception would not."""

    def __init__(self, sp: SplitPlan, pre: Preprocess):
        self.sp, self.pre = sp, pre

    def __len__(self) -> int:
        return len(self.sp)

    def __getitem__(self, position: int):
        name = self.sp.names[position]
        try:
            return position, self.pre.resize(self.sp.image(position)), None, None
        except ChangedImage as e:
            return position, None, None, str(e)
        except BadImage as e:
            message = str(e)
            reason = message[len(name) + 2:] if message.startswith(f"{name}: ") else message
            return position, None, (name, reason), None


def _collate(items):
    kept = [p for p, img, _, _ in items if img is not None]
    images = [img for _, img, _, _ in items if img is not None]
    bad = [err for _, _, err, _ in items if err is not None]
    changed = [c for _, _, _, c in items if c is not None]
    stacked = torch.stack(images) if images else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return kept, stacked, bad, changed
