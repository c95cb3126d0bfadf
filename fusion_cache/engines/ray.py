"""The Ray engine: `fusion-cache extract --engine ray` runs the backbone on a Ray cluster's workers.

The work unit is a shard, a contiguous range of positions in one split's planned items. The driver's Plan
(`extract.plan`, the one the local engine executes too) goes to every worker once; Ray Data then gets one row
per missing shard: `(split, start, stop)`, never pixels of files. An actor pool of `_ShardWorker`s (the model
stays loaded) reads the Plan's items (absolute paths; every file's bytes checked against the Plan's sha256),
runs the extraction core (`engines.core.Core`), and writes the shard atomically under `<out>.shards/`
(`cache.write_shard`). A worker never plans. Ray restarts a killed worker and retries its shard (Ray Data's actor
pools default to unlimited restarts and task retries).

When every shard is there, the driver writes `<out>`: the cache schema, with virtual datasets over the shards
(`cache.write_virtual_cache`), so every command reads it as it reads a local cache. Re-running the command skips
the shards that are complete and of these settings (`cache.read_shard` checks each), and redoes the others. The
shard folder's rules live in `cache.py`, the only module that opens HDF5 files.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import cache as cache_mod
from ..backbone import LoadedWeights
from ..sampler import SPLITS
from ..errors import FusionCacheError, quote
from .core import Core, ExtractConfig, ExtractResult, Plan, no_bar, node_name

MAX_WORKERS = 4096
STAT_KEYS = ("extract_s", "write_s", "bytes")  # per shard, from its worker: reading + forward, writing, file size
DEFAULT_SHARDS = 64  # --shard-size default: about 1/64 of the images ...
MAX_SHARD_BATCHES = 64  # ... but at most 64 batches (4096 images at --batch-size 64)
EXTRA = "pip install 'fusion-cache[ray]'"
OPTIONS = {"ray_address": None, "num_workers": None, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0,
           "shard_size": None}  # this engine's options and their defaults: another engine refuses other values


def import_ray():
    """Ray and Ray Data, or a one-line error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FusionCacheError(f"--engine ray needs Ray Data, which is not installed; run `{EXTRA}`") from None
    return ray


def shard_size(cfg: ExtractConfig, total: int) -> int:
    """--shard-size, or by default about 1/64 of the `total` images in whole batches, 1 to 64 batches (4096
    images at --batch-size 64): enough shards to balance any pool of workers, few enough to cost nothing. It
    depends on the data alone, so a re-run with another worker count resumes the same shards."""
    if cfg.shard_size is not None:
        return cfg.shard_size
    batches = math.ceil(total / DEFAULT_SHARDS / cfg.batch_size)
    return min(max(batches, 1), MAX_SHARD_BATCHES) * cfg.batch_size


def validate(cfg: ExtractConfig) -> None:
    """Options of the Ray engine, and Ray itself, checked before any data is read."""
    k = cfg.shard_size
    if k is not None and (k <= 0 or k % cfg.batch_size):
        up = max(1, math.ceil(max(k, 1) / cfg.batch_size)) * cfg.batch_size
        raise FusionCacheError(f"--shard-size {k} is not a positive multiple of --batch-size {cfg.batch_size} (a "
                               f"shard must hold whole batches, for features identical to the local engine's); "
                               f"pass --shard-size {up}")
    if cfg.num_workers is not None and not 1 <= cfg.num_workers <= MAX_WORKERS:
        raise FusionCacheError(f"--num-workers {cfg.num_workers} is out of range; pass 1 to {MAX_WORKERS}")
    if not (0 <= cfg.gpus_per_worker <= 8) or not math.isfinite(cfg.gpus_per_worker):
        raise FusionCacheError(f"--gpus-per-worker {cfg.gpus_per_worker} is out of range; pass 0 to 8")
    if not (0 < cfg.cpus_per_worker <= 256) or not math.isfinite(cfg.cpus_per_worker):
        raise FusionCacheError(f"--cpus-per-worker {cfg.cpus_per_worker} is out of range; pass more than 0, up to 256")
    if cfg.device == "cuda" and cfg.gpus_per_worker == 0:
        raise FusionCacheError("--device cuda with --engine ray needs GPUs for the workers; pass --gpus-per-worker 1")
    if cfg.device == "cpu" and cfg.gpus_per_worker > 0:
        raise FusionCacheError("--device cpu contradicts --gpus-per-worker; drop one of them")
    if cfg.compile:
        raise FusionCacheError("--compile is not supported with --engine ray; drop it")
    if cfg.ray_address is not None and cfg.ray_address != "auto":
        host, _, port = cfg.ray_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise FusionCacheError(f"--ray-address {quote(cfg.ray_address)} is not auto or HOST:PORT; pass the address "
                                   "`ray start --head` printed, such as 10.0.0.1:6379")
    import_ray()  # a missing extra fails before the data is read


def plan_shards(counts: dict[str, int], size: int) -> list[tuple[str, int, int]]:
    return [(s, lo, min(lo + size, counts[s])) for s in SPLITS for lo in range(0, counts[s], size)]


# ---------------------------------------------------------------------------------------------- driver


def run(plan: Plan, cfg: ExtractConfig, weights: LoadedWeights) -> ExtractResult:
    """Write the cache the Plan describes to `cfg.out` from shards that Ray workers extract; resumes the shards
    of an interrupted run. `weights` are the driver's: the workers load the Plan's and check their sha256."""
    ray = import_ray()
    out = Path(cfg.out)
    counts = plan.counts
    started = _connect(ray, cfg)  # before any file is touched: a wrong address or size costs nothing
    try:
        workers, cpus, threads = _pool(ray, cfg)
        with cache_mod.CacheLock(out):
            cache_mod.clear_partial(out, cfg.force)
            if cfg.force and os.path.lexists(out):  # --force on a finished cache rebuilds it, shards included
                cache_mod.remove_shards(out)
            folder = cache_mod.prepare_shard_folder(out, plan.meta.fingerprint, cfg.force)
            done, todo = {}, []
            for split, lo, hi in plan_shards(counts, shard_size(cfg, sum(counts.values()))):
                got = _read(folder, plan, split, lo, hi)
                if isinstance(got, cache_mod.Shard):
                    done[(split, lo)] = got
                else:
                    if got is not None:  # truncated, of other settings or rows: redone, never read
                        (folder / cache_mod.shard_name(split, lo, hi)).unlink(missing_ok=True)
                    todo.append((split, lo, hi))
            resumed = {s: sum(sh.stop - sh.start for (sp, _), sh in done.items() if sp == s) for s in SPLITS}
            start = time.perf_counter()
            processed = 0
            pool = (min(workers, len(todo)), cpus, threads)
            stats = {"workers": pool[0], "shards_done": len(todo), "per_worker": {}}
            for split, lo, hi, row in _discarding(out, _run(ray, cfg, plan, folder, todo, pool) if todo else ()):
                w = stats["per_worker"].setdefault(str(row["worker"]), dict.fromkeys(("rows", *STAT_KEYS), 0.0))
                for k in w:
                    w[k] += float(row[k])
                got = _read(folder, plan, split, lo, hi)
                if not isinstance(got, cache_mod.Shard):
                    raise FusionCacheError(f"a Ray worker wrote {folder / cache_mod.shard_name(split, lo, hi)}, "
                                           f"but it is {got or 'missing'}; check the shared storage, then run again")
                done[(split, lo)] = got
                processed += got.rows
            shards = {s: sorted((sh for (sp, _), sh in done.items() if sp == s), key=lambda sh: sh.start)
                      for s in SPLITS}
            rows = {s: sum(sh.rows for sh in shards[s]) for s in SPLITS}
            skipped = {s: [f for sh in shards[s] for f in sh.skipped] for s in SPLITS}
            skipped = {s: v for s, v in skipped.items() if v}
            final = replace(plan.meta, train_size=rows["train"], test_size=rows["test"], skipped=skipped,
                            device="cuda" if cfg.gpus_per_worker > 0 else "cpu", engine="ray",
                            shards=sum(len(v) for v in shards.values()), complete=True)
            cache_mod.write_virtual_cache(out, final, shards, plan.items())
            cache_mod.remove_shard_tmp(folder)
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    return ExtractResult(out, False, rows, plan.dims, seconds, processed / max(seconds, 1e-9), resumed, skipped,
                         stats)


def _discarding(out: Path, rows):
    """Pass the rows on; on a worker's error that a rerun would meet again, remove the shards, as the local
    engine removes its partial file: after the fix (the data changes) the same command starts clean."""
    try:
        yield from rows
    except FusionCacheError as e:
        if not e.resumable:
            cache_mod.remove_shards(out)
        raise


def _read(folder: Path, plan: Plan, split: str, lo: int, hi: int):
    """The complete shard of [lo, hi), the reason the file there is not one, or None when there is no file."""
    sp = plan.splits[split]
    return cache_mod.read_planned_shard(folder, plan.meta, split, lo, hi, sp.indices[lo:hi], sp.labels[lo:hi])


def _run(ray, cfg: ExtractConfig, plan: Plan, folder: Path, todo, pool):
    """Extract the `todo` shards on Ray; yields (split, start, stop) of each shard as its file is written.
    Every worker gets the Plan (files by absolute path) and the options that do not change the features."""
    import ray.data

    workers, cpus, threads = pool
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    worker_cfg = replace(cfg, progress=False, force=False, workers=cfg.workers or 0, compile=False,
                         device="cuda" if cfg.gpus_per_worker else "cpu")
    items = [{"split": s, "start": lo, "stop": hi} for s, lo, hi in todo]
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
        num_gpus=cfg.gpus_per_worker or None,
        fn_constructor_kwargs={"plan": ray.put(plan), "cfg": worker_cfg, "folder": str(folder.resolve()),
                               "threads": threads},
    )
    bar = tqdm(total=sum(hi - lo for _, lo, hi in todo), unit="img", desc=f"extract (ray, {workers} workers)",
               disable=no_bar(cfg.progress), dynamic_ncols=True)
    try:
        for row in _rows(results):
            if row["error"]:  # what a rerun would meet again (a bad image, a NaN, other data on a node)
                raise FusionCacheError(str(row["error"]))
            bar.update(int(row["stop"]) - int(row["start"]))
            yield str(row["split"]), int(row["start"]), int(row["stop"]), row
    finally:
        bar.close()


def _rows(results):
    """Iterate Ray Data's output; an exception of Ray's (not a worker's FusionCacheError, which comes back as
    a row) becomes one line."""
    it = iter(results.iter_rows())
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except FusionCacheError:
            raise
        except Exception as e:  # a worker's unexpected exception or a Ray system error: name it in one line
            cause = e
            while getattr(cause, "cause", None) is not None and cause.cause is not cause:  # RayTaskError's
                cause = cause.cause
            if isinstance(cause, FusionCacheError):
                raise cause from None
            text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(cause).split()))
            err = FusionCacheError(f"the Ray job failed ({type(cause).__name__}: {text[:200]}); see the Ray logs, "
                                   "then run the same command again to resume")
            err.resumable = True  # the shards written so far are kept
            raise err from None
        yield row


def _connect(ray, cfg: ExtractConfig) -> bool:
    """Join the cluster `--ray-address` names, or start a local one. True when we started it (and stop it)."""
    address = cfg.ray_address
    if address not in (None, "auto"):
        host, _, port = address.rpartition(":")
        try:  # Ray itself retries a wrong address for minutes
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise FusionCacheError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one with "
                                   "`ray start --head` and pass the address it prints, or drop --ray-address to "
                                   "start a local one") from None
    if ray.is_initialized():  # a notebook, a test or the bench holds a cluster already: use it
        return False
    # Ray's C++ core logs warnings meant for its developers to stderr (an actor pool's restartable actors
    # with arguments in the object store, each time): keep fatal ones only. It announces that setting once,
    # at init, which goes to Ray's own log folder with the rest of init's native output.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    try:
        with warnings.catch_warnings(), _native_stderr_to(Path(tempfile.gettempdir()) / "fusion-cache-ray-init.log"):
            warnings.simplefilter("ignore")
            if address is None:  # "local": a new cluster even where RAY_ADDRESS or a `ray start` names one
                ray.init(address="local", num_cpus=os.cpu_count() or 1, **quiet)
            else:
                ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        text = " ".join(str(e).split())
        if address is None:
            raise FusionCacheError(f"cannot start a local Ray cluster ({text[:160]}); start one with `ray start "
                                   "--head` and pass --ray-address auto, or use --engine local") from None
        raise FusionCacheError(f"cannot connect to Ray at {address} ({text[:160]}); start one with `ray start "
                               "--head`, or drop --ray-address to start a local one") from None
    return True


@contextmanager
def _native_stderr_to(path: Path):
    """Point file descriptor 2 at `path` (appending) for the block: native libraries' prints go there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:  # no log file: keep the terminal
        os.close(saved)
        yield
        return
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _pool(ray, cfg: ExtractConfig) -> tuple[int, float, int]:
    """(workers, CPUs reserved per worker, torch threads per worker), checked against the cluster's resources."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if cfg.gpus_per_worker > 0:
        fit = int(gpus // cfg.gpus_per_worker)
        if fit < 1:
            raise FusionCacheError(f"--gpus-per-worker {cfg.gpus_per_worker:g} asks for GPUs, but the Ray cluster "
                                   f"has {gpus:g}; drop --gpus-per-worker or add GPU nodes")
    else:
        fit = int(cpus // cfg.cpus_per_worker)
        if fit < 1:
            raise FusionCacheError(f"--cpus-per-worker {cfg.cpus_per_worker:g} is more than the Ray cluster's "
                                   f"{cpus:g} CPUs; pass --cpus-per-worker {max(cpus, 0.1):g} or less")
    workers = cfg.num_workers if cfg.num_workers is not None else fit
    if workers > fit:
        what = f"{gpus:g} GPUs" if cfg.gpus_per_worker > 0 else f"{cpus:g} CPUs"
        raise FusionCacheError(f"--num-workers {workers} does not fit the Ray cluster's {what}; pass --num-workers "
                               f"{fit} or fewer")
    # Reserve a little less than asked, so Ray Data's own small tasks are never starved of a CPU slot.
    reserve = cfg.cpus_per_worker * 0.95
    return workers, reserve, max(1, int(cfg.cpus_per_worker))


# ---------------------------------------------------------------------------------------------- worker


class _ShardWorker:
    """A Ray actor: loads the Plan's weights (checking their sha256), keeps the model loaded, and turns
    `(split, start, stop)` rows into shard files of the Plan's items. It never plans. Errors come back as rows,
    not exceptions, so Ray does not retry what would fail again."""

    def __init__(self, plan, cfg: ExtractConfig, folder: str, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        if isinstance(plan, ray.ObjectRef):
            plan = ray.get(plan)
        self.meta, self.folder, self.error = plan.meta, Path(folder), ""
        try:
            where = node_name()
            self.core = Core(plan, cfg, plan.load_weights(where), where=where)
        except FusionCacheError as e:
            self.error = str(e)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("split", "start", "stop", "rows", "error", "worker", *STAT_KEYS)}
        for split, lo, hi in zip(batch["split"], batch["start"], batch["stop"]):
            split, lo, hi = str(split), int(lo), int(hi)
            error, stats = self.error, dict.fromkeys(("rows", *STAT_KEYS), 0.0)
            if not error:
                try:
                    stats = self._shard(split, lo, hi)
                except FusionCacheError as e:
                    error = str(e)
            for k, v in (("split", split), ("start", lo), ("stop", hi), ("error", error),
                         ("worker", f"{socket.gethostname()}:{os.getpid()}"), *stats.items()):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}

    def _shard(self, split: str, lo: int, hi: int) -> dict:
        t0 = time.perf_counter()
        parts = list(self.core.batches(split, lo, hi))
        taps = list(self.meta.taps)
        feats = {t: np.concatenate([b.features[t] for b in parts]) for t in taps}
        labels = np.concatenate([b.labels for b in parts])
        indices = np.concatenate([b.indices for b in parts])
        skipped = [f for b in parts for f in b.skipped]
        t1 = time.perf_counter()
        shard = cache_mod.write_shard(self.folder, self.meta, split, lo, hi, labels, indices, feats, skipped)
        t2 = time.perf_counter()
        return {"rows": float(len(labels)), "extract_s": t1 - t0, "write_s": t2 - t1,
                "bytes": float(os.path.getsize(shard.path))}
