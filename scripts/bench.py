"""The performance benchmark: every figure a ratio of two measurements taken in this one run.

    python scripts/bench.py --data-root ../shared/data --weights ../shared/data/mobilenet_v2-7af39f22.pth \
        --skip-integrity-check [--full-cache data/cifar10-full.h5] [--out bench.json]

Keys of bench.json (each with the two measurements it divides):
  extract_vs_backbone_ratio      `extract` end to end (load, resize, normalize, forward, pool, HDF5 write) on the
                                 paper subset vs the raw backbone, torchvision's MobileNetV2 as it comes (same
                                 taps, batch, precision, device, channels_last, inference mode) on the same
                                 images, already preprocessed in memory
  extract_vs_backbone_ratio_resnet50, extract_vs_backbone_ratio_vit_small
                                 the same for torchvision's resnet50 (at --image-size) and timm's
                                 vit_small_patch16_224 (at its fixed 224 px), random weights, on a smaller subset
                                 (--backbone-train-size / --backbone-test-size), raw and extract measured in
                                 turns (--backbone-repeats rounds), best of each; --only-backbones: just these
  extract_vs_folded_backbone_ratio  the same against the backbone extract itself runs (BatchNorm folded into
                                 the convolutions): the cost of loading, preprocessing and writing alone
  ray_vs_local_ratio             `extract --engine ray` with 2 single-threaded Ray workers vs the local engine,
                                 both from nothing on the paper subset, in this run; ray.init and Ray Data's first
                                 job (its per-cluster actors) timed apart (ray_init_s, ray_data_first_job_s);
                                 with the cluster projection's inputs (ray_worker_img_per_s, shard write MB/s,
                                 bytes per image, dispatch shards/s, jpeg_decode_img_per_s_per_core, and
                                 jpeg_decode_checked_vs_plain_ratio: reads checked against the plan's sha256
                                 over plain reads, as throughputs, 1.0 = free);
                                 --only-ray measures just these
  imagefolder_vs_backbone_ratio  the same with the subset written out as a folder of JPEGs
  parquet_vs_imagefolder_ratio, wds_vs_imagefolder_ratio
                                 `extract` of the subset's JPEG bytes from parquet files (the Hub layout, 100-row
                                 groups) and from WebDataset shards (1000 samples each) vs the same bytes in a
                                 folder, in turns, best of two each; parquet_rss_ratio, wds_rss_ratio: peak RSS of
                                 an extract from each container of --container-rss-images vs a tenth of them;
                                 --only-containers: just these
  photos_vs_backbone_ratio       `extract` of a folder of --photos camera-size JPEGs (--photo-size, 12 megapixels;
                                 made from the real photographs scikit-learn and matplotlib ship, see
                                 camera_photos) at --photo-image-size px, reduced decoding as by default, vs the
                                 raw backbone's forward on as many images at that size, in this run;
                                 photos_full_decode_vs_backbone_ratio: the same extract with --full-decode (every
                                 photo decoded at full size, as before reduced decoding); --only-photos: just these
  ablation_speedup               a paper-style pipeline (per-image PIL transforms in a DataLoader, torchvision's
                                 MobileNetV2 as it comes, rerun every epoch for every view) vs one extract + the
                                 heads, for views x seeds x 2 epochs. The paper pipeline is timed over one epoch
                                 (train + test) and multiplied by the number of epochs it would run: its cost is
                                 the same every epoch. ablation_speedup_same_backbone gives the paper pipeline
                                 extract's own faster backbone: what the cache alone buys.
  head_vs_logreg_*               with --full-cache: the torch head (full-batch Adam on in-memory tensors) vs
                                 scikit-learn's LogisticRegression (standardized, C=0.1) on the all-blocks view
  rss_ratio                      peak RSS of an `extract` subprocess at --rss-images vs a tenth of them
  bf16_speedup, bf16_acc_delta   the raw extractor under bf16 autocast vs fp32; fused logreg accuracy from a bf16
                                 cache minus from an fp32 one
  float16_cache_*                a --dtype float16 cache vs float32: file size and fused logreg accuracy
  tuned_grid_vs_one_fit, tuned_vs_sklearn_*, knn_seconds_full
                                 with --full-cache: the tuned protocol's heads (see tuned_heads); --only-heads
                                 measures just these and merges them into --out
  heads_scaling, <head>_rss_<big>_vs_<next>, <head>_time_<big>_vs_<next>
                                 `fusion-cache fit CACHE --head H --features all --json` in its own process, each
                                 of --scaling-heads (ridge, linear and logreg with their default options;
                                 linear_lbfgs: --solver lbfgs --standardize --weight-decay 1e-3, the tuned
                                 protocol's fit) on synthetic caches (Gaussian class clusters, 10 classes,
                                 --scaling-width columns, --scaling-dtype, a test split of a tenth of train capped
                                 at 10,000) of each of --scaling-rows train rows, written through CacheWriter into
                                 the scratch folder: so the streaming path is the one measured. Each row: fit
                                 seconds (the fit's own JSON), wall seconds and peak RSS of the process, test
                                 accuracy. The ratios divide the largest size's peak RSS and fit seconds by the
                                 next largest's (ridge_rss_500k_vs_50k at the defaults); --only-heads-scaling
  ridge_grid_vs_one_fit          the ridge probe's whole grid (probe.tune: one seed's 33 alphas, validation on a
                                 tenth of train, the refit on all of it, streamed from the cache) vs one converged
                                 linear fit (the tuned protocol's: L-BFGS, standardized, weight decay 1e-2) on the
                                 same fit rows, its train rows read from the same cache; both from the file to a
                                 fitted head (ridge_grid_vs_one_fit_in_memory: against the fit alone), view `all`
                                 of --full-cache, else of the largest scaling cache; --only-ridge
Smaller sizes (--train-size, --image-size, ...) make a quick run; the test suite runs it on tiny synthetic data.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from fusion_cache.backbone import PRECISIONS, Preprocess, PooledExtractor, build_model, load_weights, versions
from fusion_cache.backbones import resolve
from fusion_cache.cache import open_cache
from fusion_cache.sampler import stratified_subset
from fusion_cache.synthetic import write_parquet, write_shards
from fusion_cache.sources import LoadOptions
from fusion_cache.sources import load as load_listing
from fusion_cache.extract import ExtractConfig, extract, preprocess_for
from fusion_cache.machine import machine
from fusion_cache.fit import HeadParams, ablate, fit_head, load_view
from fusion_cache.taps import DEFAULT_TAPS


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def backbone_throughput(weights, images: torch.Tensor, pre: Preprocess, batch: int, precision: str = "fp32",
                        fold_bn: bool = False, table=None) -> float:
    """Images/s of the extractor alone on preprocessed images held in memory (no loading, no writing).
    fold_bn=False: torchvision's MobileNetV2 (or `table`'s backbone) as it comes (the raw backbone); True: as
    `extract` builds it."""
    model = build_model(weights, fold_bn=fold_bn).to(memory_format=torch.channels_last)
    ex = PooledExtractor(model, list(table.names if table else DEFAULT_TAPS), None, table).eval()
    x_all = pre.normalize(images).contiguous(memory_format=torch.channels_last)
    dtype = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        ex(x_all[:batch])  # warm-up
        start = time.perf_counter()
        for lo in range(0, len(x_all), batch):
            out = ex(x_all[lo : lo + batch])
            _ = {t: v.float().numpy() for t, v in out.items()}  # the same host copy extract makes
    return len(x_all) / (time.perf_counter() - start)


def write_json(out: Path, res: dict) -> None:
    """`res` as `out`, written whole or not at all."""
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(res, indent=2))
    os.replace(tmp_out, out)


def run_record(keys: list[str]) -> dict:
    """Which command measured `keys`, on which machine (CPU model, cores, memory, torch, GPU), and when."""
    return {"command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]), "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "keys": keys}


def merge_part(out: Path, measure) -> int:
    """An --only-* run: `measure(scratch folder)`'s keys merged into the JSON already at `out`, the table printed."""
    res = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        part = measure(Path(tmp))
    res.update(part)
    res.setdefault("runs", []).append(run_record(sorted(part)))
    write_json(out, res)
    print(table(res))
    return 0


def timed_extract(cfg: ExtractConfig) -> tuple[float, float]:
    """(images/s end to end, seconds) of one extract call that builds the cache from nothing."""
    start = time.perf_counter()
    r = extract(cfg)
    seconds = time.perf_counter() - start
    n = sum(r.counts.values())
    return n / seconds, seconds


OTHER_BACKBONES = {"resnet50": "resnet50", "vit_small": "timm:vit_small_patch16_224"}


def backbone_ratios(a, sources: dict, tmp: Path) -> dict:
    """extract_vs_backbone_ratio_<key> for resnet50 and vit_small, random weights (seed 0), all taps, each
    measured as the MobileNetV2 one: extract end to end vs the raw extractor on the same images in memory.
    The two are measured in turns (raw, extract, raw, extract, ...; --backbone-repeats rounds) and the best of
    each is compared: this machine's speed drifts by about 10 % over minutes, which interleaving cancels."""
    out = {}
    subsets = {"train": stratified_subset(sources["train"].labels, a.backbone_train_size, 0, "train"),
               "test": stratified_subset(sources["test"].labels, a.backbone_test_size, 0, "test")}
    for key, name in OTHER_BACKBONES.items():
        bb = resolve(name)
        weights = load_weights("random", seed=0, backbone=bb)
        pre = preprocess_for(bb, "random", None if bb.fixed_image_size() else a.image_size)
        images = torch.cat([pre.resize(torch.from_numpy(sources[s].images[subsets[s]])) for s in ("train", "test")])
        log(f"  {name}: {len(images)} images at {pre.image_size} px, {a.backbone_repeats} rounds")
        raws, extracts = [], []
        for i in range(a.backbone_repeats):
            raws.append(backbone_throughput(weights, images, pre, a.batch_size, table=bb.tap_table()))
            cfg = ExtractConfig(out=tmp / f"{key}-{i}.h5", data_root=a.data_root, backbone=name, weights="random",
                                image_size=pre.image_size, batch_size=a.batch_size, download=False,
                                skip_integrity_check=a.skip_integrity_check, progress=False, device="cpu",
                                train_size=a.backbone_train_size, test_size=a.backbone_test_size)
            extracts.append(timed_extract(cfg)[0])
            (tmp / f"{key}-{i}.h5").unlink()
        out[f"{key}_backbone_img_per_s"] = max(raws)
        out[f"{key}_extract_img_per_s"] = max(extracts)
        out[f"{key}_rounds_img_per_s"] = {"raw": raws, "extract": extracts}
        out[f"extract_vs_backbone_ratio_{key}"] = max(extracts) / max(raws)
    return out


class _NoOp:
    """A Ray Data worker that does nothing: what the driver and Ray Data cost per shard."""

    def __call__(self, batch):
        return batch


def ray_ratio(common: dict, tmp: Path, workers: int = 2, dispatch_shards: int = 200) -> dict:
    """ray_vs_local_ratio: the ray engine with `workers` single-threaded workers vs the local engine, both
    building the same cache from nothing in this run. The cluster's start-up is timed apart: `ray.init`, and a
    first tiny Ray Data job that starts Ray Data's per-cluster service actors (a standing cluster has them). The
    ray time counts everything of the job itself: starting the workers (imports, data, model), the shards and
    the virtual cache. The local engine runs with the process's torch threads, the ray workers with 1 thread
    each; their features are compared (relative difference).

    Also the inputs of the README's cluster projection: each worker's steady rate (its images over its seconds
    of reading + forward), the shard-write rate (bytes over seconds of writing), the cache's bytes per image,
    and the driver's dispatch rate (shards/s through Ray Data with workers that do nothing)."""
    import logging

    import numpy as np
    import ray
    import ray.data

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    init_s = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        start = time.perf_counter()
        ray.data.range(2, override_num_blocks=2).map_batches(lambda b: b, num_cpus=0.5).materialize()
        warm_s = time.perf_counter() - start
        local_ips, local_s = timed_extract(ExtractConfig(out=tmp / "local.h5", **common))
        start = time.perf_counter()
        r = extract(ExtractConfig(out=tmp / "ray.h5", **common, engine="ray", num_workers=workers,
                                  cpus_per_worker=1.0))
        ray_s = time.perf_counter() - start
        ray_ips = sum(r.counts.values()) / ray_s
        items = [{"i": i} for i in range(dispatch_shards)]
        start = time.perf_counter()
        ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _NoOp, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0.5).materialize()
        dispatch_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    a, b = open_cache(tmp / "local.h5"), open_cache(tmp / "ray.h5")
    diff = max(float(np.max(np.abs(a.features(t, s) - b.features(t, s)) / (np.abs(a.features(t, s)).max() or 1)))
               for t in a.taps for s in ("train", "test"))
    per = r.stats["per_worker"].values()
    rows = sum(w["rows"] for w in per)
    return {"ray_init_s": init_s, "ray_data_first_job_s": warm_s, "ray_workers": workers,
            "ray_extract_s": ray_s, "ray_img_per_s": ray_ips, "local_extract_s": local_s, "local_img_per_s": local_ips,
            "ray_vs_local_ratio": ray_ips / local_ips, "ray_vs_local_max_rel_diff": diff,
            "ray_shards": b.meta.shards,
            "ray_worker_img_per_s": [w["rows"] / w["extract_s"] for w in per],
            "ray_worker_busy_s": [w["extract_s"] + w["write_s"] for w in per],
            "ray_shard_write_mb_per_s": sum(w["bytes"] for w in per) / sum(w["write_s"] for w in per) / 1e6,
            "ray_shard_bytes_per_image": sum(w["bytes"] for w in per) / rows,
            "ray_dispatch_shards_per_s": dispatch_shards / dispatch_s}


def decode_rate(sources: dict, tmp: Path, n: int = 200, size: tuple[int, int] = (500, 375), crop: int = 224,
                rounds: int = 3) -> dict:
    """JPEG decode + resize images/s on one thread, for ImageNet-sized photos: CIFAR-10 images upscaled to
    500 x 375 with noise (so they do not compress like flat upscales), quality 90, resized and cropped to 224.
    What one CPU core feeds a worker that reads files. Also the cost of the plan's check of every file's bytes
    (`read_image(..., sha256=...)`, what both engines do) as a ratio: checked over plain reads, the same files,
    in alternating rounds, best round of each."""
    import hashlib

    import numpy as np

    from fusion_cache.decode import read_image

    rng = np.random.default_rng(0)
    folder = tmp / "decode"
    folder.mkdir()
    src = sources["train"]
    for i in range(n):
        img = Image.fromarray(src.images[i].transpose(1, 2, 0)).resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(img, np.float32) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    files = [(f, hashlib.sha256(f.read_bytes()).hexdigest()) for f in sorted(folder.glob("*.jpg"))]
    pre = Preprocess(crop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {"plain": float("inf"), "checked": float("inf")}
    try:
        for _ in range(rounds):
            for mode in best:
                start = time.perf_counter()
                for f, digest in files:
                    pre.resize(read_image(f, sha256=digest if mode == "checked" else None))
                best[mode] = min(best[mode], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"jpeg_decode_img_per_s_per_core": len(files) / best["plain"],
            "jpeg_decode_checked_vs_plain_ratio": best["plain"] / best["checked"]}


def ray_part(a, tmp: Path) -> dict:
    """ray_ratio on the paper subset, and the JPEG decode rate of ImageNet-sized photos for the projection."""
    common = dict(data_root=a.data_root, weights=a.weights, image_size=a.image_size, batch_size=a.batch_size,
                  download=False, skip_integrity_check=a.skip_integrity_check, progress=False, device="cpu",
                  train_size=a.train_size, test_size=a.test_size)
    out = ray_ratio(common, tmp)
    sources = load_listing("cifar10", Path(a.data_root), LoadOptions(False, a.skip_integrity_check)).given
    out.update(decode_rate(sources, tmp, n=min(200, len(sources["train"]))))
    return out


def camera_photos(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """An image folder (train/ and test/, one class per source photo) of `n` camera-size JPEGs (n >= 6), a
    fifth in test: the real photographs that ship with scikit-learn (china, flower) and matplotlib
    (grace_hopper), each cropped to the camera's aspect ratio at two framings (decode_check.variants), upscaled
    (Lanczos) to `size` (width x height), given camera-like grain (an unsharp mask and Gaussian noise of sigma 4:
    a smooth upscale compresses to half the bytes, and JPEG decoding costs by the byte), then written flipped or
    turned in each of the 8 ways, with a border of 0, 1, ... pixels cropped so that no two files are the same,
    at quality 88 to 92. About 2 MB per 12-megapixel file; a camera's are 3 to 6 MB, so decoding costs here are,
    if anything, lower than on real camera files."""
    import numpy as np
    from PIL import ImageFilter

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_check import source_photos, variants

    rng = np.random.default_rng(seed)
    bases = []
    for name, path in source_photos().items():
        with Image.open(path) as src:
            for _, im in variants(src.convert("RGB")):
                big = im.resize(size if im.width >= im.height else size[::-1], Image.Resampling.LANCZOS)
                sharp = np.asarray(big.filter(ImageFilter.UnsharpMask(radius=2, percent=80, threshold=0)), np.float32)
                noisy = sharp + rng.normal(0, 4, sharp.shape).astype(np.float32)
                bases.append((name, Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))))
    seen: dict[str, int] = {}
    for i in range(n):
        name, im = bases[i % len(bases)]
        seen[name] = seen.get(name, 0) + 1
        k = i // len(bases)
        if k % 8:
            im = im.transpose(list(Image.Transpose)[k % 8 - 1])
        border = k // 8
        if border:
            im = im.crop((border, border, im.width - border, im.height - border))
        d = root / ("test" if seen[name] % 5 == 2 else "train") / name  # each class's 2nd, 7th, 12th, ...
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:04d}.jpg", quality=88 + i % 5)
    return root


def photos_ratio(a, tmp: Path) -> dict:
    """photos_vs_backbone_ratio and photos_full_decode_vs_backbone_ratio: `extract` of a folder of camera-size
    JPEGs (reduced decoding, then --full-decode) vs the raw backbone's forward on as many images, already
    decoded and resized in memory, at --photo-image-size px; all in this run, each extract once, the backbone
    before and after them (the faster of the two: a slower one is this machine drifting, not the backbone)."""
    from fusion_cache.decode import read_image

    w, h = (int(v) for v in a.photo_size.lower().split("x"))
    start = time.perf_counter()
    folder = camera_photos(tmp / "photos", a.photos, (w, h))
    files = sorted(folder.rglob("*.jpg"))
    log(f"  {len(files)} photos of {w}x{h} written in {time.perf_counter() - start:.0f} s, "
        f"{sum(f.stat().st_size for f in files) / len(files) / 1e6:.1f} MB each")
    weights = load_weights(a.weights)
    pre = preprocess_for(resolve(weights.backbone), weights.name, a.photo_image_size)
    images = torch.stack([pre.resize(read_image(f, reduce_to=pre.image_size)) for f in files])
    before = backbone_throughput(weights, images, pre, a.batch_size)
    common = dict(data_root=folder, dataset="imagefolder", weights=a.weights, image_size=pre.image_size,
                  batch_size=a.batch_size, download=False, progress=False, device="cpu", workers=a.workers,
                  train_size=None, test_size=None)
    reduced_ips, _ = timed_extract(ExtractConfig(out=tmp / "photos.h5", **common))
    full_ips, _ = timed_extract(ExtractConfig(out=tmp / "photos-full.h5", **common, full_decode=True))
    backbone_ips = max(before, backbone_throughput(weights, images, pre, a.batch_size))  # before and after: drift
    return {"photos": len(files), "photo_size": [w, h], "photo_image_size": pre.image_size,
            "photo_mb": sum(f.stat().st_size for f in files) / len(files) / 1e6,
            "photos_backbone_img_per_s": backbone_ips, "photos_extract_img_per_s": reduced_ips,
            "photos_full_decode_extract_img_per_s": full_ips,
            "photos_vs_backbone_ratio": reduced_ips / backbone_ips,
            "photos_full_decode_vs_backbone_ratio": full_ips / backbone_ips}


def jpeg_items(src, indices) -> list[tuple[str, str, bytes]]:
    """(class, file name, JPEG bytes) of the source's images at `indices`, as write_jpeg_folder writes them."""
    out = []
    for i in indices:
        buf = io.BytesIO()
        Image.fromarray(src.images[i].transpose(1, 2, 0)).save(buf, "JPEG", quality=95)
        out.append((src.classes[src.labels[i]], f"{i:05d}.jpg", buf.getvalue()))
    return out


def write_containers(root: Path, items: dict) -> dict[str, Path]:
    """{"parquet": folder, "wds": folder} holding `items` ({split: [(class, name, bytes)]}) as the Hub's parquet
    layout (100-row groups, as datasets writes images) and as WebDataset shards of 1000 samples."""
    classes = sorted({c for its in items.values() for c, _, _ in its})
    for split, its in items.items():
        write_parquet(its, root / "parquet", split=split, classes=classes)
        write_shards(its, root / "wds", split=split, per_shard=1000, classes=classes)
    return {"parquet": root / "parquet", "wds": root / "wds"}


def containers_part(a, sources: dict, subsets: dict, tmp: Path) -> dict:
    """parquet_vs_imagefolder_ratio and wds_vs_imagefolder_ratio: `extract` of the same JPEG bytes from parquet
    files and from tar shards vs from a folder, in this run, in turns (folder, parquet, wds, twice; the best of
    each); parquet_rss_ratio and wds_rss_ratio: the peak RSS of an extract of --container-rss-images from each
    container vs a tenth of them (at --rss-image-size: memory, not speed)."""
    items = {s: jpeg_items(sources[s], subsets[s]) for s in ("train", "test")}
    roots = {"imagefolder": tmp / "c-folder"}
    for split, its in items.items():
        for c, name, data in its:
            (roots["imagefolder"] / split / c).mkdir(parents=True, exist_ok=True)
            (roots["imagefolder"] / split / c / name).write_bytes(data)
    roots.update(write_containers(tmp / "c", items))
    common = dict(weights=a.weights, image_size=a.image_size, batch_size=a.batch_size, download=False,
                  progress=False, device="cpu", workers=a.workers, train_size=None, test_size=None)
    ips: dict[str, float] = {}
    for round_ in range(2):
        for kind, root in roots.items():
            got, _ = timed_extract(ExtractConfig(out=tmp / f"c-{kind}-{round_}.h5", data_root=root, **common))
            ips[kind] = max(ips.get(kind, 0.0), got)
    res = {f"{k}_img_per_s": v for k, v in ips.items()}
    res |= {f"{k}_vs_imagefolder_ratio": ips[k] / ips["imagefolder"] for k in ("parquet", "wds")}
    big = a.container_rss_images
    sizes = {"small": max(2, big // 10), "large": big}
    rss: dict = {}
    src = sources["train"]
    for size_name, n in sizes.items():
        its = jpeg_items(src, stratified_subset(src.labels, min(n, len(src)), 1, "train"))
        train = [it for k, it in enumerate(its) if k % 6]
        test = [it for it in its[::6] if it[0] in {c for c, _, _ in train}]  # every test class is in train
        made = write_containers(tmp / f"rss-{size_name}", {"train": train, "test": test})
        for kind, root in made.items():
            rss.setdefault(kind, {})[size_name] = peak_rss_mb([
                "--data-root", str(root), "--out", str(tmp / f"rss-{kind}-{size_name}.h5"), "--weights",
                str(a.weights), "--image-size", str(a.rss_image_size), "--no-progress", "--device", "cpu"])
    res["container_rss_images"] = {k: min(n, len(src)) for k, n in sizes.items()}
    res["container_rss_mb"] = rss
    res |= {f"{k}_rss_ratio": v["large"] / v["small"] for k, v in rss.items()}
    return res


def write_jpeg_folder(root: Path, sources: dict, subsets: dict) -> Path:
    for split, src in sources.items():
        for i in subsets[split]:
            d = root / split / src.classes[src.labels[i]]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(src.images[i].transpose(1, 2, 0)).save(d / f"{i:05d}.jpg", quality=95)
    return root


def paper_pipeline_epoch(weights, root: Path, image_size: int, batch: int, workers: int, fast: bool) -> float:
    """Seconds for one epoch of the case study's pipeline: PIL transforms per image in a DataLoader, the frozen
    backbone run on every batch (train split, then the test split for the epoch's test accuracy), with the case
    study's two taps. fast=False: torchvision's MobileNetV2 as it comes (NCHW, BatchNorm layers), as the case
    study runs it; fast=True: the backbone extract uses (folded BatchNorm, channels_last), so that the speedup
    left is the cache's alone."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(),
                             transforms.Normalize(Preprocess().mean, Preprocess().std)])
    fmt = torch.channels_last if fast else torch.contiguous_format
    model = build_model(weights, fold_bn=fast).to(memory_format=fmt)
    ex = PooledExtractor(model, ["features.13", "features.18"]).eval()
    start = time.perf_counter()
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / split, tf), batch_size=batch,
                                             num_workers=workers, shuffle=split == "train")
        with torch.inference_mode():
            for x, _ in loader:
                ex(x.contiguous(memory_format=fmt))
    return time.perf_counter() - start


# Runs argv[2:] with its stdout into the file argv[1], then prints its wall seconds and ru_maxrss (KiB) of
# RUSAGE_CHILDREN: a fresh wrapper per measurement, so that the peak is this command's alone (a process's
# RUSAGE_CHILDREN keeps the largest peak of every child it ever waited for).
_MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'wb')); w = time.perf_counter() - t; "
            "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def measured_run(argv: list[str], stdout_path: str | Path = os.devnull) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `argv` run in its own process, its stdout written to `stdout_path`."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(stdout_path), *argv], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    wall, kib = r.stdout.split()[-2:]
    return float(wall), int(kib) / 1024


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of `fusion-cache extract ARGS` in its own process (ru_maxrss of the waited-for child)."""
    return measured_run([sys.executable, "-m", "fusion_cache", "extract", *args])[1]


RESULTS_FULL = Path(__file__).resolve().parents[1] / "docs" / "results" / "full" / "report.json"


def reported_best() -> float:
    """The best tuned view's test accuracy on the results page (`make results`' full CIFAR-10 report)."""
    return json.loads(RESULTS_FULL.read_text())["best_test_acc"]


def tuned_report(a, tmp: Path) -> dict:
    """tuned_report_vs_extract: `make reproduce-full`'s two commands, timed in turns in one run: the full
    CIFAR-10 extraction (50,000 / 10,000 images, avgmax pooling, every tap) and its report (early, late, fused
    and all plus the best pair, linear, 3 seeds: the paper protocol, the pair search, the tuned protocol and
    the figures). Also the best tuned view's accuracy against the results page's."""
    cache, out = tmp / "full.h5", tmp / "report"
    flags = ["--skip-integrity-check"] if a.skip_integrity_check else []
    log("tuned report: extract full CIFAR-10 (avgmax, every tap)")
    extract_s, _ = measured_run([sys.executable, "-m", "fusion_cache", "extract", "--dataset", "cifar10",
                                 "--data-root", str(a.data_root), "--weights", str(a.weights), *flags,
                                 "--train-size", "all", "--test-size", "all", "--pool", "avgmax", "--out", str(cache)])
    log(f"  {extract_s:.0f} s; report (early, late, fused, all + pair; linear; seeds 0,1,2)")
    report_s, report_rss = measured_run([sys.executable, "-m", "fusion_cache", "report", str(cache), "--out", str(out),
                                         "--views", "early,late,fused,all", "--heads", "linear", "--seeds", "0,1,2",
                                         "--data-root", str(a.data_root)])
    r = json.loads((out / "report.json").read_text())
    log(f"  {report_s:.0f} s; best {r['best_view']} {100 * r['best_test_acc']:.2f} %")
    chosen = {f"{row['view']}/{row['seed']}": {"weight_decay": row["weight_decay"], "tried": list(row["grid"])}
              for row in r["tuned"]["rows"]}
    return {"tuned_extract_s": extract_s, "tuned_report_s": report_s, "tuned_report_peak_rss_mb": report_rss,
            "tuned_report_vs_extract": report_s / extract_s, "tuned_report_seconds": r["seconds"],
            "tuned_best_view": r["best_view"], "tuned_best_test_acc": r["best_test_acc"],
            "tuned_best_vs_reported_points": 100 * (r["best_test_acc"] - reported_best()),
            "tuned_chosen": chosen, "tuned_answer": r.get("answer")}


def fused_logreg_acc(path: Path) -> float:
    return fit_head(open_cache(path), "fused", "logreg", HeadParams(), 0).test_acc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, help="required unless only --only-heads, --only-heads-scaling or "
                    "--only-ridge runs (they read no images)")
    ap.add_argument("--weights", help="required as --data-root")
    ap.add_argument("--skip-integrity-check", action="store_true")
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--views", default="early,late,fused")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rss-images", type=int, default=60000, help="images of the larger RSS run (train + test)")
    ap.add_argument("--rss-image-size", type=int, default=32, help="image size of the RSS runs (memory, not speed)")
    ap.add_argument("--full-cache", type=Path, help="a full CIFAR-10 cache (all taps) for head_vs_logreg")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the tuned-heads keys (default: every CPU)")
    ap.add_argument("--backbone-repeats", type=int, default=3,
                    help="rounds of (raw, extract) for the resnet50/vit_small ratios; the best of each is compared")
    ap.add_argument("--backbone-train-size", type=int, default=500,
                    help="train images of the resnet50/vit_small ratios (enough that start-up costs amortize)")
    ap.add_argument("--backbone-test-size", type=int, default=100, help="test images of the resnet50/vit_small ratios")
    ap.add_argument("--only-backbones", action="store_true",
                    help="measure only the resnet50 and vit_small extract ratios and merge them into --out")
    ap.add_argument("--only-ray", action="store_true",
                    help="measure only ray_vs_local_ratio (and the cluster projection's inputs), merge into --out")
    ap.add_argument("--photos", type=int, default=80, help="camera-size JPEGs of the photos_* keys")
    ap.add_argument("--photo-size", default="4000x3000", help="their width x height (12 megapixels)")
    ap.add_argument("--photo-image-size", type=int, default=224, help="the network's input size for the photos")
    ap.add_argument("--only-photos", action="store_true",
                    help="measure only the photos_* keys (camera-size JPEGs) and merge them into --out")
    ap.add_argument("--container-rss-images", type=int, default=6000,
                    help="images of the larger parquet and wds RSS runs (the smaller: a tenth)")
    ap.add_argument("--only-containers", action="store_true",
                    help="measure only the parquet_* and wds_* keys and merge them into --out")
    ap.add_argument("--only-heads", action="store_true",
                    help="measure only the tuned-heads keys on --full-cache and merge them into --out")
    ap.add_argument("--scaling-rows", default="5000,50000,500000",
                    help="train rows of the heads-scaling caches (each at least 100)")
    ap.add_argument("--scaling-width", type=int, default=512,
                    help="columns of the heads-scaling caches: a sum of MobileNetV2 tap widths (most multiples of 8 "
                         "from 16 to 2816)")
    ap.add_argument("--scaling-dtype", choices=("float16", "float32"), default="float16",
                    help="storage dtype of the heads-scaling caches")
    ap.add_argument("--scaling-heads", default=",".join(SCALING_HEADS),
                    help=f"heads of the scaling table, of {', '.join(SCALING_HEADS)}")
    ap.add_argument("--only-heads-scaling", action="store_true",
                    help="measure only the heads-scaling table and keys (synthetic caches) and merge them into --out")
    ap.add_argument("--only-tuned-report", action="store_true",
                    help="only tuned_report_vs_extract: full CIFAR-10 extracted (avgmax) then reported, in turns "
                         "(about 10 minutes on 2 cores; 1.4 GB of scratch)")
    ap.add_argument("--only-ridge", action="store_true",
                    help="measure only ridge_grid_vs_one_fit (on --full-cache, else the largest scaling cache) and "
                         "merge it into --out; with --only-heads-scaling, both")
    a = ap.parse_args()
    try:
        a.scaling_rows = sorted({int(v) for v in a.scaling_rows.split(",")})
    except ValueError:
        ap.error(f"--scaling-rows must be comma-separated integers, got {a.scaling_rows!r}")
    if a.scaling_rows[0] < 100:
        ap.error(f"--scaling-rows must each be at least 100, got {a.scaling_rows[0]}")
    if scaling_taps(a.scaling_width) is None:
        ap.error(f"--scaling-width {a.scaling_width} is no sum of MobileNetV2 tap widths; use a multiple of 8 "
                 "from 16 to 2800 (e.g. 256 or 512)")
    a.scaling_heads = a.scaling_heads.split(",")
    unknown = [h for h in a.scaling_heads if h not in SCALING_HEADS]
    if unknown:
        ap.error(f"--scaling-heads: unknown {unknown[0]!r}; use some of {', '.join(SCALING_HEADS)}")
    if not (a.only_heads or a.only_heads_scaling or a.only_ridge) and (a.data_root is None or a.weights is None):
        ap.error("the following arguments are required: --data-root, --weights")
    for name in ("threads", "backbone_train_size", "backbone_test_size", "backbone_repeats", "photos"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.container_rss_images < 200:  # a tenth of them: 2 images a class, so that every test class is in train
        ap.error(f"--container-rss-images must be at least 200, got {a.container_rss_images}")
    if a.photos < 6:
        ap.error(f"--photos must be at least 6 (each source photo in train and test), got {a.photos}")
    if a.threads > 4 * (os.cpu_count() or 1):
        ap.error(f"--threads must be at most 4 x CPUs ({4 * (os.cpu_count() or 1)}), got {a.threads}")
    warnings.filterwarnings("once", category=UserWarning)  # the local-copy warning, once, not per extract
    if a.only_heads:
        if not a.full_cache:
            ap.error("--only-heads needs --full-cache")
        return merge_part(a.out, lambda tmp: tuned_heads(a.full_cache, threads=a.threads))

    if a.only_heads_scaling or a.only_ridge:
        if a.only_heads_scaling or not a.full_cache:  # before the scratch folder is made: one line, no traceback
            check_scaling_space(Path(tempfile.gettempdir()), a)
        return merge_part(a.out, lambda tmp: {**(heads_scaling(a, tmp) if a.only_heads_scaling else {}),
                                              **(ridge_grid(a, tmp) if a.only_ridge else {})})

    if a.only_tuned_report:
        return merge_part(a.out, lambda tmp: tuned_report(a, tmp))

    if a.only_ray:
        return merge_part(a.out, lambda tmp: ray_part(a, tmp))

    if a.only_photos:
        return merge_part(a.out, lambda tmp: photos_ratio(a, tmp))

    if a.only_containers:
        sources = load_listing("cifar10", Path(a.data_root), LoadOptions(False, a.skip_integrity_check)).given
        subsets = {s: stratified_subset(sources[s].labels, n, 0, s) for s, n in (("train", a.train_size),
                                                                                 ("test", a.test_size))}
        return merge_part(a.out, lambda tmp: containers_part(a, sources, subsets, tmp))

    if a.only_backbones:
        sources = load_listing("cifar10", Path(a.data_root), LoadOptions(False, a.skip_integrity_check)).given
        return merge_part(a.out, lambda tmp: backbone_ratios(a, sources, tmp))

    check_scaling_space(Path(tempfile.gettempdir()), a)  # now, not after an hour of the other parts
    views, seeds = a.views.split(","), [int(s) for s in a.seeds.split(",")]
    weights = load_weights(a.weights)
    pre = Preprocess(a.image_size)
    res: dict = {"machine": {**machine(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
                 "versions": versions(), "args": {k: str(v) for k, v in vars(a).items()}}
    common = dict(data_root=a.data_root, weights=a.weights, image_size=a.image_size, batch_size=a.batch_size,
                  download=False, skip_integrity_check=a.skip_integrity_check, progress=False, device="cpu",
                  train_size=a.train_size, test_size=a.test_size)

    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        tmp = Path(tmp)
        sources = load_listing("cifar10", Path(a.data_root), LoadOptions(False, a.skip_integrity_check)).given
        subsets = {"train": stratified_subset(sources["train"].labels, a.train_size, 0, "train"),
                   "test": stratified_subset(sources["test"].labels, a.test_size, 0, "test")}
        images = torch.cat([pre.resize(torch.from_numpy(sources[s].images[subsets[s]])) for s in ("train", "test")])
        n = len(images)

        log(f"[1/7] raw extractor vs extract end to end, {n} CIFAR-10 images")
        backbone_ips = backbone_throughput(weights, images, pre, a.batch_size)
        extract_ips, extract_s = timed_extract(ExtractConfig(out=tmp / "paper.h5", **common))
        folded_ips = backbone_throughput(weights, images, pre, a.batch_size, fold_bn=True)
        res["backbone_img_per_s"] = backbone_ips
        res["extract_img_per_s"] = extract_ips
        res["extract_vs_backbone_ratio"] = extract_ips / backbone_ips
        res["folded_backbone_img_per_s"] = folded_ips  # the extractor extract runs: BatchNorm folded into convs
        res["extract_vs_folded_backbone_ratio"] = extract_ips / folded_ips  # loading + writing overhead only
        log("[1b/7] the same for resnet50 and vit_small, random weights")
        res.update(backbone_ratios(a, sources, tmp))

        log("[1c/7] the ray engine (2 single-threaded workers) vs the local engine")
        res.update(ray_part(a, tmp))

        log("[2/7] image folder of JPEGs")
        folder = write_jpeg_folder(tmp / "jpeg", sources, subsets)
        folder_cfg = ExtractConfig(out=tmp / "jpeg.h5", **{**common, "data_root": folder, "train_size": None,
                                                          "test_size": None}, dataset="imagefolder",
                                   workers=a.workers)
        folder_ips, _ = timed_extract(folder_cfg)
        res["imagefolder_img_per_s"] = folder_ips
        res["imagefolder_vs_backbone_ratio"] = folder_ips / backbone_ips
        log("[2a/7] the same JPEGs as parquet files and WebDataset shards; peak RSS of each at 1x and 10x")
        res.update(containers_part(a, sources, subsets, tmp))
        log(f"[2b/7] {a.photos} camera-size JPEGs at {a.photo_image_size} px, reduced and full decoding")
        res.update(photos_ratio(a, tmp))

        log(f"[3/7] paper-style pipeline vs cache, {len(views)} views x {len(seeds)} seeds x 2 epochs")
        epoch_s = paper_pipeline_epoch(weights, folder, a.image_size, 32, a.workers, fast=False)
        fast_epoch_s = paper_pipeline_epoch(weights, folder, a.image_size, 32, a.workers, fast=True)
        passes = 2 * len(views) * len(seeds)  # the backbone reruns every epoch of every view x seed
        start = time.perf_counter()
        ablate(open_cache(tmp / "paper.h5"), views, ["linear"], seeds, HeadParams())
        heads_s = time.perf_counter() - start
        cache_s = extract_s + heads_s
        res["paper_pipeline_epoch_s"] = {"as_the_case_study": epoch_s, "same_backbone_as_extract": fast_epoch_s}
        res["paper_pipeline_s"] = epoch_s * passes
        res["cache_pipeline_s"] = cache_s
        res["cache_heads_s"] = heads_s
        res["ablation_speedup"] = epoch_s * passes / cache_s
        res["ablation_speedup_same_backbone"] = fast_epoch_s * passes / cache_s

        log("[4/7] peak RSS of extract, small vs large")
        rss_args = ["--data-root", str(a.data_root), "--weights", str(a.weights), "--image-size",
                    str(a.rss_image_size), "--no-download", "--no-progress", "--device", "cpu"]
        if a.skip_integrity_check:
            rss_args.append("--skip-integrity-check")
        big = a.rss_images
        big_train = min(big * 5 // 6, len(sources["train"]))
        big_test = min(big - big_train, len(sources["test"]))
        small_train, small_test = max(1, big_train // 10), max(1, big_test // 10)
        rss_small = peak_rss_mb(["--out", str(tmp / "rss-small.h5"), "--train-size", str(small_train),
                                 "--test-size", str(small_test), *rss_args])
        rss_big = peak_rss_mb(["--out", str(tmp / "rss-big.h5"), "--train-size", str(big_train),
                               "--test-size", str(big_test), *rss_args])
        res["rss_images"] = {"small": small_train + small_test, "large": big_train + big_test}
        res["rss_mb"] = {"small": rss_small, "large": rss_big}
        res["rss_ratio"] = rss_big / rss_small

        log("[5/7] bf16 autocast vs fp32")
        bf16_ips = backbone_throughput(weights, images, pre, a.batch_size, "bf16")
        fp32_ips = backbone_throughput(weights, images, pre, a.batch_size, "fp32")
        extract(ExtractConfig(out=tmp / "bf16.h5", **common, precision="bf16"))
        acc32, acc16 = fused_logreg_acc(tmp / "paper.h5"), fused_logreg_acc(tmp / "bf16.h5")
        res["bf16_img_per_s"], res["fp32_img_per_s"] = bf16_ips, fp32_ips
        res["bf16_speedup"] = bf16_ips / fp32_ips
        res["fused_logreg_acc"] = {"fp32": acc32, "bf16": acc16}
        res["bf16_acc_delta"] = acc16 - acc32

        log("[6/7] float16 cache")
        extract(ExtractConfig(out=tmp / "f16.h5", **common, dtype="float16"))
        size32, size16 = (tmp / "paper.h5").stat().st_size, (tmp / "f16.h5").stat().st_size
        acc_f16 = fused_logreg_acc(tmp / "f16.h5")
        res["float16_cache_bytes"] = {"float32": size32, "float16": size16}
        res["float16_cache_size_ratio"] = size16 / size32
        res["float16_cache_acc_delta"] = acc_f16 - acc32

        log(f"[6a/7] heads scaling: {', '.join(a.scaling_heads)} on {a.scaling_rows} synthetic rows x "
            f"{a.scaling_width}")
        res.update(heads_scaling(a, tmp))
        log(f"[6b/7] the ridge probe's whole grid vs one linear fit on {a.full_cache or 'the largest scaling cache'}")
        res.update(ridge_grid(a, tmp))

    if a.full_cache:
        log(f"[7/8] torch head vs logreg on {a.full_cache}, all blocks")
        res.update(head_vs_logreg(a.full_cache))
        log(f"[8/8] tuned heads on {a.full_cache}, all blocks")
        res.update(tuned_heads(a.full_cache, threads=a.threads))
    else:
        log("[7/8] [8/8] skipped head_vs_logreg and tuned heads: pass --full-cache")

    res["runs"] = [run_record(sorted(k for k in res if k not in ("machine", "versions", "args")))]
    write_json(a.out, res)
    print(table(res))
    return 0


# The torch head of head_vs_logreg: standardized features held in memory as one tensor, full-batch-ish Adam.
FAST_HEAD = HeadParams(epochs=4, lr=1e-3, batch_size=1024, standardize=True)


def head_vs_logreg(path: Path) -> dict:
    cache = open_cache(path)
    data = load_view(cache, "all")
    fast = fit_head(cache, "all", "linear", FAST_HEAD, 0, data=data)
    base = fit_head(cache, "all", "logreg", HeadParams(C=0.1), 0, data=data)
    return {"head_s": fast.fit_seconds, "logreg_s": base.fit_seconds, "head_acc": fast.test_acc,
            "logreg_acc": base.test_acc, "head_params": fast.params, "head_vs_logreg_time_ratio":
            fast.fit_seconds / base.fit_seconds, "head_vs_logreg_acc_delta": fast.test_acc - base.test_acc,
            "head_vs_logreg_train_rows": int(len(data.y_train))}


def tuned_heads(path: Path, seed: int = 0, val_fraction: float = 0.1, threads: int | None = None) -> dict:
    """The tuned protocol's keys on the all-blocks view of one cache, measured side by side in this run:
    - tuned_grid_vs_one_fit: the project's tuned protocol for `linear` (the 6-point weight-decay grid trained as
      one stacked model on the fit rows, the choice on validation, the warm-started refit on all of train) vs
      one cold converged fit of the same solver at the chosen strength on all of train;
    - tuned_vs_sklearn_grid: what a user would write with scikit-learn (LogisticRegression, lbfgs, cold fits over
      the same grid expressed as C = 1 / (weight_decay x rows), the choice on validation, a cold refit) vs the
      project's grid; both on the same standardized features; and their test accuracies;
    - knn_seconds_full: the kNN head with k chosen on the same validation split from its grid, refit on all of
      train and tested.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from fusion_cache.grid import Eigenbasis, fit_l2_grid
    from fusion_cache.heads import HEAD_SPECS
    from fusion_cache.selection import JACOBI_REFRESH, ROTATED_TOL, ViewStore, tune, validation_split

    torch.set_num_threads(threads or os.cpu_count() or 1)
    cache = open_cache(path)
    store = ViewStore(cache)
    Xtr, Xte, _, _ = store.standardized("all")  # reading and standardizing the view: outside both timings
    data = store.data("all")
    y = torch.from_numpy(data.y_train)
    fit_rows, val_rows = validation_split(data.y_train, val_fraction, seed)
    k = len(cache.classes)
    grid = HEAD_SPECS["linear"].grid
    out = {"tuned_rows": {"fit": int(len(fit_rows)), "val": int(len(val_rows)), "dim": int(data.dim)},
           "tuned_threads": torch.get_num_threads()}

    log("  tuned linear: the report's own path (eigenbasis, stacked grid, validation, warm refit)")
    t = time.perf_counter()
    run = tune(store, "all", "linear", seed, val_fraction, max_iter=1000, full_grid=True)  # all 6 points
    grid_s = time.perf_counter() - t
    ours_acc = run.test_acc
    log(f"  chosen weight decay {run.value:g}, {grid_s:.1f} s, test {100 * ours_acc:.2f} %")
    t = time.perf_counter()
    basis = Eigenbasis.of(Xtr)  # a single fit builds its own basis, as the grid did
    one = fit_l2_grid(basis.rotate(Xtr), y, k, [run.value], max_iter=1000, precondition=basis, rotated=True,
                      tol=ROTATED_TOL, refresh=JACOBI_REFRESH)
    one_s = time.perf_counter() - t
    del basis
    log(f"  one cold fit at {run.value:g}: {one_s:.1f} s")
    out.update({"tuned_grid_s": grid_s, "one_fit_s": one_s, "tuned_grid_vs_one_fit": grid_s / one_s,
                "tuned_weight_decay": run.value, "tuned_test_acc": ours_acc, "tuned_val_scores": run.grid,
                "one_fit_iters": int(one.n_iter[0])})
    store.drop("all")

    log("  scikit-learn LogisticRegression over the same grid, cold fits")
    Xa, Xt = Xtr.numpy(), Xte.numpy()
    Xf, Xv = Xa[fit_rows], Xa[val_rows]
    t = time.perf_counter()
    scores = []
    for wd in grid:
        lr = LogisticRegression(C=1.0 / (wd * len(fit_rows)), max_iter=1000).fit(Xf, data.y_train[fit_rows])
        scores.append(lr.score(Xv, data.y_train[val_rows]))
        log(f"    C for weight decay {wd:g}: val {100 * scores[-1]:.2f} % ({time.perf_counter() - t:.0f} s)")
    wd = grid[int(np.argmax(scores))]
    best = LogisticRegression(C=1.0 / (wd * len(data.y_train)), max_iter=1000).fit(Xa, data.y_train)
    sk_s = time.perf_counter() - t
    sk_acc = float(best.score(Xt, data.y_test))
    out.update({"sklearn_grid_s": sk_s, "sklearn_weight_decay": wd, "sklearn_test_acc": sk_acc,
                "tuned_vs_sklearn_grid": sk_s / grid_s, "tuned_vs_sklearn_acc_delta": ours_acc - sk_acc})

    log("  knn, k chosen on validation")
    del Xf, Xv, Xa, Xt, Xtr, Xte
    t = time.perf_counter()
    run = tune(ViewStore(cache), "all", "knn", seed, val_fraction)
    out.update({"knn_seconds_full": time.perf_counter() - t, "knn_k": run.value, "knn_test_acc": run.test_acc,
                "knn_val_acc": run.val_acc})
    return out


# The heads-scaling table: label -> `fusion-cache fit` options (each head's defaults; linear_lbfgs: the tuned
# protocol's solver at one strength).
SCALING_HEADS = {
    "ridge": ["--head", "ridge"],
    "linear": ["--head", "linear"],
    "linear_lbfgs": ["--head", "linear", "--solver", "lbfgs", "--standardize", "--weight-decay", "1e-3"],
    "logreg": ["--head", "logreg"],
}
SCALING_CLASSES = 10
SCALING_KEY = re.compile(r"^[a-z_]+_(rss|time)_\d+k?_vs_\d+k?$")


def scaling_taps(width: int) -> list[str] | None:
    """MobileNetV2 taps whose average-pooled widths sum to `width` (the fewest such, in table order), or None."""
    from fusion_cache.taps import MOBILENET_V2

    best: dict[int, list[str]] = {0: []}
    for tap in MOBILENET_V2.taps:
        for total, taps in list(best.items()):
            w = total + tap.channels
            if w <= width and (w not in best or len(taps) + 1 < len(best[w])):
                best[w] = taps + [tap.name]
    return best.get(width)


def scaling_test_rows(rows: int) -> int:
    return max(10, min(rows // 10, 10_000))


def scaling_path(tmp: Path, rows: int, a) -> Path:
    return tmp / f"scaling-{rows}x{a.scaling_width}-{a.scaling_dtype}.h5"


def size_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def check_scaling_space(folder: Path, a) -> None:
    """Exit with one line when `folder`'s disk cannot hold the largest synthetic cache (the smaller ones are
    deleted before it is written)."""
    import numpy as np

    n = max(a.scaling_rows)
    need = int(1.05 * (n + scaling_test_rows(n)) * a.scaling_width * np.dtype(a.scaling_dtype).itemsize) + (64 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"bench: the {n:,}-row synthetic cache needs {need / 1e9:.2f} GB free in {folder}, which "
                         f"has {free / 1e9:.2f} GB; free some, point TMPDIR at a larger disk, or pass smaller "
                         "--scaling-rows")


def write_scaling_cache(path: Path, rows: int, width: int, dtype: str = "float16", seed: int = 0,
                        chunk: int = 32768) -> Path:
    """A real cache (CacheWriter, MobileNetV2 taps summing to `width` columns, `dtype`) of `rows` train rows and
    scaling_test_rows(rows) test rows: SCALING_CLASSES Gaussian clusters, balanced, their centres 4 noise
    deviations apart on average (the same centres at every size), every column given a positive offset and its
    own scale as pooled features have. Written in chunks: the bench never holds the whole matrix."""
    import numpy as np

    from fusion_cache.cache import CacheMeta, CacheWriter
    from fusion_cache.taps import MOBILENET_V2

    taps = scaling_taps(width)
    widths = [MOBILENET_V2.tap(t).channels for t in taps]
    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((SCALING_CLASSES, width)) * (4.0 / np.sqrt(2 * width))).astype(np.float32)
    offset = np.abs(rng.standard_normal(width)).astype(np.float32)
    col_scale = np.exp(0.5 * rng.standard_normal(width)).astype(np.float32)
    sizes = {"train": rows, "test": scaling_test_rows(rows)}
    meta = CacheMeta.create(
        backbone="mobilenet_v2", weights_sha256="0" * 64, image_size=32, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), resize="none", pool="avg", taps=tuple(taps), dataset="synthetic",
        data_identity={"synthetic": f"gaussian clusters, seed {seed}, {rows} rows x {width}"}, subset={},
        dtype=dtype, precision="fp32", weights="synthetic", data_root="",
        classes=tuple(f"class{i}" for i in range(SCALING_CLASSES)), train_size=sizes["train"],
        test_size=sizes["test"], train_source_size=sizes["train"], test_source_size=sizes["test"], seed=seed,
        integrity_checked=True, versions={}, tap_table=MOBILENET_V2.to_json())
    with CacheWriter(path, meta) as w:
        for split, n in sizes.items():
            split_rng = np.random.default_rng([seed, rows, split == "test"])
            labels = split_rng.permutation(np.arange(n) % SCALING_CLASSES)
            for lo in range(0, n, chunk):
                y = labels[lo : lo + chunk]
                X = (centres[y] + split_rng.standard_normal((len(y), width), dtype=np.float32)) * col_scale + offset
                w.append(split, lo + len(y), y, np.arange(lo, lo + len(y)),
                         dict(zip(taps, np.split(X, np.cumsum(widths)[:-1], axis=1))))
        w.finish(skipped={})
    return path


def heads_scaling(a, tmp: Path) -> dict:
    """heads_scaling rows and the <head>_rss_/<head>_time_<big>_vs_<next> keys: each of --scaling-heads fit by
    `fusion-cache fit CACHE --features all --json` in its own process on a synthetic cache of each of
    --scaling-rows, smallest first. Each cache is deleted once measured, except the largest when the ridge
    part will need it (no --full-cache)."""
    check_scaling_space(tmp, a)
    sizes, width = a.scaling_rows, a.scaling_width
    rows_out = []
    for n in sizes:
        path = scaling_path(tmp, n, a)
        start = time.perf_counter()
        write_scaling_cache(path, n, width, a.scaling_dtype)
        log(f"  {n:,} + {scaling_test_rows(n):,} rows x {width} ({a.scaling_dtype}) written in "
            f"{time.perf_counter() - start:.1f} s, {path.stat().st_size / 1e6:.0f} MB")
        for label in a.scaling_heads:
            got = tmp / "fit.json"
            wall, rss = measured_run([sys.executable, "-m", "fusion_cache", "fit", str(path), *SCALING_HEADS[label],
                                      "--features", "all", "--json"], got)
            fit = json.loads(got.read_text())
            got.unlink()
            rows_out.append({"head": label, "options": " ".join(SCALING_HEADS[label][2:]), "rows": n,
                             "test_rows": scaling_test_rows(n), "width": width, "fit_seconds": fit["fit_seconds"],
                             "wall_seconds": wall, "peak_rss_mb": rss, "test_acc": fit["test_acc"]})
            log(f"    {label:<13} fit {fit['fit_seconds']:7.2f} s, wall {wall:7.2f} s, peak RSS {rss:7.0f} MB, "
                f"test {100 * fit['test_acc']:.2f} %")
        if n != sizes[-1] or a.full_cache:
            path.unlink()
    res: dict = {"heads_scaling": rows_out, "heads_scaling_setup": {
        "rows": sizes, "width": width, "dtype": a.scaling_dtype, "classes": SCALING_CLASSES,
        "taps": scaling_taps(width), "heads": {h: " ".join(SCALING_HEADS[h]) for h in a.scaling_heads}}}
    if len(sizes) >= 2:
        big, nxt = sizes[-1], sizes[-2]
        at = {(r["head"], r["rows"]): r for r in rows_out}
        for label in a.scaling_heads:
            b, m = at[label, big], at[label, nxt]
            res[f"{label}_rss_{size_tag(big)}_vs_{size_tag(nxt)}"] = b["peak_rss_mb"] / m["peak_rss_mb"]
            res[f"{label}_time_{size_tag(big)}_vs_{size_tag(nxt)}"] = b["fit_seconds"] / m["fit_seconds"]
    return res


def ridge_grid(a, tmp: Path, seed: int = 0, val_fraction: float = 0.1) -> dict:
    """ridge_grid_vs_one_fit on view `all` of --full-cache, else of the largest scaling cache (written here if
    heads_scaling has not left it in `tmp`): the ridge probe's whole grid for one seed (probe.tune over
    HEAD_SPECS['ridge'].grid, streamed from the cache: the sums over train, the validation scores of every
    alpha, the refit on all of train) vs one converged linear fit of the tuned protocol (L-BFGS, standardized,
    weight decay 1e-2, up to 1000 iterations) on the same fit rows, its train rows read from the same cache.
    The view's train rows are read once before either timing, so that both find the file in the page cache.
    Test accuracies are computed outside both timings."""
    import numpy as np

    from fusion_cache import probe
    from fusion_cache.heads import HEAD_SPECS
    from fusion_cache.selection import validation_split

    torch.set_num_threads(a.threads)
    if a.full_cache:
        path = a.full_cache
    else:
        path = scaling_path(tmp, max(a.scaling_rows), a)
        if not path.exists():
            check_scaling_space(tmp, a)
            write_scaling_cache(path, max(a.scaling_rows), a.scaling_width, a.scaling_dtype)
    view = "all"
    cache = open_cache(path)
    y = cache.labels("train")
    fit_rows, val_rows = validation_split(y, val_fraction, seed, cache.validation_rows())
    k = len(cache.classes)
    for _ in cache.iter_view(view, "train"):  # the page cache warm for both
        pass
    grid = HEAD_SPECS["ridge"].grid
    log(f"  ridge: {len(grid)} alphas on {len(fit_rows):,} fit rows, {len(val_rows):,} validation rows of {path}")
    rows = probe.CacheRows(cache, view)
    start = time.perf_counter()
    tuned = probe.tune(rows, k, {seed: (fit_rows, val_rows)}, grid)[seed]
    ridge_s = time.perf_counter() - start
    ridge_acc = float(np.mean(probe.predict(tuned.estimator, rows, "test") == rows.labels("test")))
    alpha = grid[tuned.best]
    log(f"  ridge grid {ridge_s:.2f} s, alpha {alpha:g}, test {100 * ridge_acc:.2f} %")

    start = time.perf_counter()
    X, y_train = cache.view(view, "train")
    X, y_fit = X[fit_rows], y_train[fit_rows]
    load_s = time.perf_counter() - start
    est = HEAD_SPECS["linear"].build_tuned(1e-2, seed, max_iter=1000)
    start = time.perf_counter()
    est.fit(X, y_fit)
    fit_s = time.perf_counter() - start
    del X
    X_test, y_test = cache.view(view, "test")
    linear_acc = float(est.score(X_test, y_test))
    log(f"  linear: read {load_s:.2f} s + fit {fit_s:.2f} s ({est.n_iter_} L-BFGS iterations), "
        f"test {100 * linear_acc:.2f} %")
    return {"ridge_grid": {"cache": str(path), "view": view, "dim": rows.dim, "fit_rows": int(len(fit_rows)),
                           "val_rows": int(len(val_rows)), "test_rows": int(len(y_test)), "grid_points": len(grid),
                           "threads": torch.get_num_threads(), "val_scores": [float(v) for v in tuned.scores],
                           "linear": {"weight_decay": 1e-2, "solver": "lbfgs", "standardize": True,
                                      "max_iter": 1000, "iterations": int(est.n_iter_)}},
            "ridge_grid_s": ridge_s, "ridge_alpha": alpha, "ridge_val_acc": float(tuned.scores[tuned.best]),
            "ridge_test_acc": ridge_acc, "ridge_linear_read_s": load_s, "ridge_linear_fit_s": fit_s,
            "ridge_linear_test_acc": linear_acc, "ridge_grid_vs_one_fit": ridge_s / (load_s + fit_s),
            "ridge_grid_vs_one_fit_in_memory": ridge_s / fit_s, "ridge_vs_linear_acc_delta": ridge_acc - linear_acc}


def scaling_markdown(rows: list[dict]) -> str:
    lines = ["| head | train rows | width | fit s | wall s | peak RSS MB | test acc % |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['head']} | {r['rows']:,} | {r['width']} | {r['fit_seconds']:.2f} | "
                     f"{r['wall_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {100 * r['test_acc']:.2f} |")
    return "\n".join(lines)


ROWS = [
    ("extract_vs_backbone_ratio", ">= 0.95", "{:.2f}"),
    ("extract_vs_backbone_ratio_resnet50", ">= 0.95", "{:.2f}"),
    ("extract_vs_backbone_ratio_vit_small", ">= 0.95", "{:.2f}"),
    ("extract_vs_folded_backbone_ratio", "(overhead)", "{:.2f}"),
    ("ray_vs_local_ratio", ">= 0.8", "{:.2f}"),
    ("jpeg_decode_checked_vs_plain_ratio", ">= 0.9", "{:.2f}"),
    ("imagefolder_vs_backbone_ratio", ">= 0.8", "{:.2f}"),
    ("parquet_vs_imagefolder_ratio", ">= 0.9", "{:.2f}"),
    ("wds_vs_imagefolder_ratio", ">= 0.9", "{:.2f}"),
    ("parquet_rss_ratio", "<= 1.1", "{:.2f}"),
    ("wds_rss_ratio", "<= 1.1", "{:.2f}"),
    ("photos_vs_backbone_ratio", ">= 0.5", "{:.2f}"),
    ("photos_full_decode_vs_backbone_ratio", "(full decode)", "{:.2f}"),
    ("ablation_speedup", ">= 15", "{:.1f}"),
    ("ablation_speedup_same_backbone", "(cache alone)", "{:.1f}"),
    ("head_vs_logreg_time_ratio", "<= 0.1", "{:.3f}"),
    ("head_vs_logreg_acc_delta", ">= -0.005", "{:+.4f}"),
    ("rss_ratio", "<= 1.1", "{:.2f}"),
    ("bf16_speedup", ">= 1.6", "{:.2f}"),
    ("bf16_acc_delta", "within 0.005", "{:+.4f}"),
    ("float16_cache_size_ratio", "report", "{:.2f}"),
    ("float16_cache_acc_delta", "report", "{:+.4f}"),
    ("tuned_grid_vs_one_fit", "<= 3", "{:.2f}"),
    ("tuned_vs_sklearn_grid", ">= 10", "{:.1f}"),
    ("tuned_vs_sklearn_acc_delta", "within 0.003", "{:+.4f}"),
    ("knn_seconds_full", "<= 30 s", "{:.1f}"),
    ("ridge_rss_500k_vs_50k", "<= 1.1", "{:.2f}"),
    ("ridge_time_500k_vs_50k", "report", "{:.2f}"),
    ("ridge_grid_vs_one_fit", "<= 1.2", "{:.2f}"),
    ("ridge_vs_linear_acc_delta", "report", "{:+.4f}"),
    ("tuned_report_vs_extract", "<= 1.0", "{:.2f}"),
    ("tuned_best_vs_reported_points", "within 0.2", "{:+.2f}"),
]


def table(res: dict) -> str:
    """The heads-scaling rows as a Markdown table (when measured), then every key with its target: those of
    ROWS, then the other heads-scaling ratios (named by the sizes measured)."""
    fixed = {key for key, _, _ in ROWS}
    rows = ROWS + [(key, "<= 1.1" if key.startswith("ridge_rss_") else "report", "{:.2f}")
                   for key in res if SCALING_KEY.match(key) and key not in fixed]
    lines = [scaling_markdown(res["heads_scaling"]), ""] if res.get("heads_scaling") else []
    lines.append(f"{'key':<38} {'value':>10}  target")
    for key, target, fmt in rows:
        value = fmt.format(res[key]) if key in res else "skipped"
        lines.append(f"{key:<38} {value:>10}  {target}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
