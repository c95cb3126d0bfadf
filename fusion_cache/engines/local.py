"""The local engine: the Plan's batches through `Core` in this process, streamed into one cache file."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from .. import cache as cache_mod
from ..backbone import LoadedWeights
from ..sampler import SPLITS
from .core import Core, ExtractConfig, ExtractResult, Plan, no_bar

OPTIONS: dict = {}  # options of this engine alone (with their defaults); it takes none


def validate(cfg: ExtractConfig) -> None:
    """Nothing to check beyond the shared settings."""


def run(plan: Plan, cfg: ExtractConfig, weights: LoadedWeights) -> ExtractResult:
    """Write the cache the Plan describes to `cfg.out`, resuming its `.partial` file when there is one."""
    out = Path(cfg.out)
    cache_mod.refuse_shard_folder(out, cfg.force)
    core = Core(plan, cfg, weights)
    counts = plan.counts
    start = time.perf_counter()
    processed = 0
    with cache_mod.CacheWriter(out, plan.meta, force=cfg.force, items=plan.items()) as writer, ThreadPoolExecutor(1) as pool, \
            writer.discard_on_error():
        pending: Future | None = None
        total = sum(counts[s] - writer.next_position(s) for s in SPLITS)
        bar = tqdm(total=total, unit="img", desc="extract", disable=no_bar(cfg.progress), dynamic_ncols=True)
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
    return ExtractResult(out, False, counts, plan.dims, seconds, processed / max(seconds, 1e-9), resumed,
                         all_skipped)
