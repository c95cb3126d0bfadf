"""The ray engine (`extract --engine ray`) on a local Ray cluster started here with ray.init(num_cpus=2): features
equal to the local engine's, shards resumed and redone, a killed worker and a killed driver, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import ray
import torch

from fusion_cache.cache import open_cache, shard_folder, shard_name
from fusion_cache.extract import ExtractConfig, extract
from fusion_cache.synthetic import write_cifar

from .hostile import clean_failure, denials, deny, run, snapshot  # noqa: F401 (denials: a fixture)

BATCH = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A CIFAR-10 in the real pickle format, 200 train / 40 test images (enough shards to kill a run in)."""
    return write_cifar(tmp_path_factory.mktemp("ray-cifar"), per_class_per_batch=4)


def _cfg(out, data, weights_file, **kw) -> ExtractConfig:
    base = dict(out=Path(out), data_root=data, weights=str(weights_file), image_size=32, batch_size=BATCH,
                train_size=None, test_size=None, download=False, skip_integrity_check=True, progress=False)
    return ExtractConfig(**{**base, **kw})


def _args(out, data, weights_file, *extra):
    return ["extract", "--out", out, "--data-root", data, "--weights", weights_file, "--image-size", 32,
            "--batch-size", BATCH, "--train-size", "all", "--test-size", "all", "--no-download",
            "--skip-integrity-check", "--no-progress", *extra]


@pytest.fixture(scope="module")
def local_1thread(tmp_path_factory, data, weights_file) -> Path:
    """The local engine's cache at 1 torch thread: the thread count of each Ray worker here."""
    out = tmp_path_factory.mktemp("local") / "local.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(_cfg(out, data, weights_file))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ray_cache(tmp_path_factory, cluster, data, weights_file) -> Path:
    out = tmp_path_factory.mktemp("ray") / "ray.h5"
    r = extract(_cfg(out, data, weights_file, engine="ray", num_workers=2, shard_size=4 * BATCH))
    assert not r.reused and r.counts == {"train": 200, "test": 40}
    return out


def assert_same_features(a: Path, b: Path) -> None:
    """Bit-identical rows: labels, source indices and every tap's features, both splits."""
    ca, cb = open_cache(a), open_cache(b)
    assert ca.fingerprint == cb.fingerprint and ca.taps == cb.taps
    for s in ("train", "test"):
        np.testing.assert_array_equal(ca.labels(s), cb.labels(s))
        np.testing.assert_array_equal(ca.indices(s), cb.indices(s))
        for t in ca.taps:
            x, y = ca.features(t, s), cb.features(t, s)
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{s} {t}: max diff {np.abs(x - y).max()}"


def _is_virtual(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return f["train/features"][open_cache(path).taps[0]].is_virtual


# ---------------------------------------------------------------------------------------------- equality


def test_ray_cache_equals_the_local_engine_bit_for_bit(ray_cache, local_1thread):
    """Same thread count per process (1): the same bits. The engine is provenance, not part of the fingerprint."""
    assert_same_features(ray_cache, local_1thread)
    meta = open_cache(ray_cache).meta
    assert meta.engine == "ray" and meta.shards == len(list(shard_folder(ray_cache).iterdir())) == 13 + 3
    assert open_cache(local_1thread).meta.engine == "local"
    assert _is_virtual(ray_cache)
    r = run("info", ray_cache)
    assert r.exit_code == 0 and "engine      ray, 16 shard files in ray.h5.shards/" in r.output


def test_ray_cache_reads_in_every_command(ray_cache, tmp_path):
    r = run("fit", ray_cache, "--head", "logreg", "--features", "fused", "--out", tmp_path / "head")
    assert r.exit_code == 0, r.output
    r = run("ablate", ray_cache, "--views", "early,late", "--heads", "logreg", "--seeds", "0",
            "--out", tmp_path / "ablate")
    assert r.exit_code == 0, r.output


def test_same_command_again_reuses_the_ray_cache(ray_cache, data, weights_file, cluster):
    before = snapshot(ray_cache.parent)
    r = extract(_cfg(ray_cache, data, weights_file, engine="ray", num_workers=2, shard_size=4 * BATCH))
    assert r.reused and snapshot(ray_cache.parent) == before
    # and the local engine's command reuses it too: same settings, same fingerprint
    assert extract(_cfg(ray_cache, data, weights_file)).reused


def test_force_on_a_finished_ray_cache_rebuilds_its_shards(ray_cache, data, weights_file, cluster, tmp_path):
    """As with the local engine, --force on a complete cache recomputes it (an interrupted run resumes)."""
    out = tmp_path / ray_cache.name
    shutil.copy(ray_cache, out)
    shutil.copytree(shard_folder(ray_cache), shard_folder(out))
    before = {p.name: p.stat().st_mtime_ns for p in shard_folder(out).iterdir()}  # copytree keeps mtimes
    r = extract(_cfg(out, data, weights_file, engine="ray", num_workers=2, shard_size=4 * BATCH, force=True))
    assert not r.reused and r.resumed_from == {"train": 0, "test": 0}
    after = {p.name: p.stat().st_mtime_ns for p in shard_folder(out).iterdir()}
    assert after.keys() == before.keys() and not any(after[n] == before[n] for n in after)
    assert_same_features(out, ray_cache)


def test_consolidate_copies_the_shards_into_one_file(ray_cache, local_1thread, tmp_path):
    one = tmp_path / "one.h5"
    r = run("consolidate", ray_cache, "--out", one)
    assert r.exit_code == 0, r.output
    assert not _is_virtual(one) and open_cache(one).meta.shards == 0
    assert_same_features(one, ray_cache)
    assert_same_features(one, local_1thread)
    before = snapshot(tmp_path, ray_cache.parent)
    for args, fragment in [((ray_cache, "--out", one), "exists; pass --force"),
                           ((ray_cache, "--out", ray_cache, "--force"), "itself or one of its shards"),
                           ((ray_cache, "--out", tmp_path), "is a folder")]:
        r = run("consolidate", *args)
        assert clean_failure(r, fragment) is None, r.output
    assert snapshot(tmp_path, ray_cache.parent) == before
    r = run("consolidate", ray_cache, "--out", one, "--force")
    assert r.exit_code == 0, r.output


def test_missing_or_damaged_shard_is_a_one_line_error(ray_cache, tmp_path):
    """HDF5 reads a missing source of a virtual dataset as zeros: the cache is checked shard by shard on open."""
    copy = tmp_path / "c.h5"  # the cache reads ray.h5.shards/, by the relative name it was written with
    shutil.copy(ray_cache, copy)
    shutil.copytree(shard_folder(ray_cache), tmp_path / shard_folder(ray_cache).name)
    assert run("info", copy).exit_code == 0
    victim = tmp_path / shard_folder(ray_cache).name / shard_name("train", 16, 32)
    victim.unlink()
    r = run("info", copy)
    assert clean_failure(r, "which is missing") is None, r.output
    with h5py.File(victim, "w") as f:
        f.attrs["complete"] = True
    r = run("fit", copy, "--head", "logreg")
    assert clean_failure(r, "incomplete or from other settings") is None, r.output


# ---------------------------------------------------------------------------------------------- resume


def test_rerun_redoes_only_missing_truncated_and_foreign_shards(ray_cache, data, weights_file, cluster, tmp_path):
    out = tmp_path / "r.h5"
    shutil.copytree(shard_folder(ray_cache), shard_folder(out))
    folder = shard_folder(out)
    names = sorted(p.name for p in folder.iterdir())
    missing, truncated, foreign, lying = (shard_name("train", 0, 16), shard_name("train", 48, 64),
                                          shard_name("test", 16, 32), shard_name("train", 96, 112))
    (folder / missing).unlink()
    data_bytes = (folder / truncated).read_bytes()
    (folder / truncated).write_bytes(data_bytes[: len(data_bytes) // 2])
    with h5py.File(folder / foreign, "r+") as f:  # a shard of other settings
        f.attrs["fingerprint"] = "0" * 64
    with h5py.File(folder / lying, "r+") as f:  # right settings, wrong rows
        f["labels"][0] = (f["labels"][0] + 1) % 10
    (folder / (shard_name("test", 0, 16) + ".tmp-dead01")).write_bytes(b"half a shard")
    kept = {n: os.stat(folder / n).st_ino for n in names if n not in (missing, truncated, foreign, lying)}

    r = extract(_cfg(out, data, weights_file, engine="ray", num_workers=2, shard_size=4 * BATCH))
    assert r.resumed_from == {"train": 200 - 3 * 16, "test": 40 - 16}
    assert sorted(p.name for p in folder.iterdir()) == names  # the tmp file is gone, every shard is there
    assert {n: os.stat(folder / n).st_ino for n in kept} == kept  # the good shards were not rewritten
    assert_same_features(out, ray_cache)


def test_a_worker_killed_mid_run_changes_nothing(ray_cache, data, weights_file, cluster, tmp_path):
    """`ray.kill` one Ray Data worker while it extracts; Ray restarts it and retries its shard."""
    from ray._private.state import actors
    from ray._raylet import ActorID

    out = tmp_path / "k.h5"
    killed: list[str] = []
    done_at_kill = []
    result: dict = {}

    def run_extract():
        result["r"] = extract(_cfg(out, data, weights_file, engine="ray", num_workers=2, shard_size=BATCH))

    t = threading.Thread(target=run_extract)
    t.start()
    deadline = time.monotonic() + 120
    while not killed and t.is_alive() and time.monotonic() < deadline:
        done = list(shard_folder(out).glob("*.h5")) if shard_folder(out).exists() else []
        if len(done) >= 2:
            for actor_id, a in actors().items():
                if a["ActorClassName"].startswith("MapWorker(MapBatches(_ShardWorker") and a["State"] == "ALIVE":
                    # ray.kill(handle, no_restart=False), from the actor's id: Ray Data keeps the handles
                    ray._private.worker.global_worker.core_worker.kill_actor(ActorID.from_hex(actor_id), False)
                    killed.append(actor_id)
                    done_at_kill.append(len(done))
                    break
        time.sleep(0.01)
    assert killed and done_at_kill[0] < 60 and t.is_alive(), "the kill came after the run"
    t.join(300)
    assert not t.is_alive() and "r" in result
    restarted = actors()[killed[0]]
    assert restarted["NumRestarts"] >= 1
    assert_same_features(out, ray_cache)


def test_driver_sigkill_then_rerun_resumes(ray_cache, data, weights_file, cluster, tmp_path):
    """The driver (a CLI process joined to the cluster) dies by SIGKILL mid-run; the same command resumes from
    the shards on disk and gives the same cache."""
    out = tmp_path / "d.h5"
    args = [str(a) for a in _args(out, data, weights_file, "--engine", "ray", "--ray-address", cluster,
                                  "--num-workers", 2, "--shard-size", BATCH)]
    proc = subprocess.Popen([sys.executable, "-m", "fusion_cache", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if shard_folder(out).exists() and len(list(shard_folder(out).glob("*.h5"))) >= 3:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    done = len(list(shard_folder(out).glob("*.h5")))
    assert not out.exists() and 3 <= done < 60, f"killed too late or too early: {done} shards"
    r = run(*_args(out, data, weights_file, "--engine", "ray", "--ray-address", cluster, "--num-workers", 2,
                   "--shard-size", BATCH))
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output
    assert_same_features(out, ray_cache)


# ---------------------------------------------------------------------------------------------- bad input


def test_other_settings_shards_need_force_and_the_local_engine_respects_them(ray_cache, data, weights_file,
                                                                              cluster, tmp_path):
    out = tmp_path / "o.h5"
    shutil.copytree(shard_folder(ray_cache), shard_folder(out))
    before = snapshot(tmp_path)
    ray_args = ["--engine", "ray", "--num-workers", 2, "--shard-size", 4 * BATCH]
    r = run(*_args(out, data, weights_file, *ray_args, "--pool", "avgmax"))
    assert clean_failure(r, "holds the shards of an extraction with other settings") is None, r.output
    r = run(*_args(out, data, weights_file))  # the local engine does not orphan them silently
    assert clean_failure(r, "holds the shards of an interrupted Ray extraction") is None, r.output
    assert snapshot(tmp_path) == before
    r = run(*_args(out, data, weights_file, "--force"))
    assert r.exit_code == 0, r.output
    assert not shard_folder(out).exists() and not _is_virtual(out)


@pytest.mark.parametrize("extra, fragment", [
    (["--ray-address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (["--ray-address", "nowhere"], "is not auto or HOST:PORT"),
    (["--num-workers", 0], "--num-workers 0 is out of range"),
    (["--num-workers", 100000], "--num-workers 100000 is out of range"),
    (["--num-workers", 3], "does not fit the Ray cluster's 2 CPUs; pass --num-workers 2 or fewer"),
    (["--cpus-per-worker", 4], "is more than the Ray cluster's 2 CPUs"),
    (["--gpus-per-worker", 1], "the Ray cluster has 0"),
    (["--shard-size", 6], "--shard-size 6 is not a positive multiple of --batch-size 4"),
    (["--device", "cuda"], "pass --gpus-per-worker 1"),
])
def test_bad_ray_options_are_one_line_errors(extra, fragment, data, weights_file, cluster, tmp_path):
    out = tmp_path / "x.h5"
    r = run(*_args(out, data, weights_file, "--engine", "ray", *extra))
    assert clean_failure(r, fragment) is None, r.output
    assert not out.exists() and not any(tmp_path.iterdir())


def test_ray_options_without_the_ray_engine_are_refused(data, weights_file, tmp_path):
    r = run(*_args(tmp_path / "x.h5", data, weights_file, "--num-workers", 2))
    assert clean_failure(r, "--num-workers applies only to --engine ray") is None, r.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("not a folder"), "is not a folder fusion-cache made for shards"),
    (lambda p: os.symlink("/tmp", p), "is not a folder fusion-cache made for shards"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "holds 'notes.txt', which is not a shard"),
])
def test_foreign_shard_folders_are_refused(make, fragment, data, weights_file, cluster, tmp_path):
    out = tmp_path / "f.h5"
    make(shard_folder(out))
    before = snapshot(tmp_path)
    r = run(*_args(out, data, weights_file, "--engine", "ray", "--force"))
    assert clean_failure(r, fragment) is None, r.output
    assert snapshot(tmp_path) == before and not out.exists()


def test_unreadable_shard_folder_is_a_one_line_error(data, weights_file, cluster, tmp_path, denials):
    out = tmp_path / "u.h5"
    shard_folder(out).mkdir()
    deny(shard_folder(out))  # as root, listing it is made to fail
    try:
        r = run(*_args(out, data, weights_file, "--engine", "ray"))
    finally:
        shard_folder(out).chmod(0o755)
    assert clean_failure(r, f"cannot read shard folder {shard_folder(out)} (Permission denied)") is None, r.output
    assert not out.exists()


def test_unwritable_shard_folder_is_a_one_line_error(data, weights_file, cluster, tmp_path, monkeypatch):
    """As root cannot be denied a folder, the access check itself is what is exercised here."""
    out = tmp_path / "w.h5"
    shard_folder(out).mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == shard_folder(out) else
                        real(p, mode, **kw))
    r = run(*_args(out, data, weights_file, "--engine", "ray"))
    assert clean_failure(r, "cannot write shard folder") is None, r.output


def test_missing_ray_extra_names_it(data, weights_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    r = run(*_args(tmp_path / "x.h5", data, weights_file, "--engine", "ray"))
    assert clean_failure(r, "pip install 'fusion-cache[ray]'") is None, r.output
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- hostile


def _copy_ray_cache(ray_cache: Path, where: Path) -> tuple[Path, Path]:
    """A copy of the ray cache and of its shard folder in `where`, the cache reading the copied shards."""
    copy = where / ray_cache.name
    shutil.copy(ray_cache, copy)
    shutil.copytree(shard_folder(ray_cache), shard_folder(copy))
    return copy, shard_folder(copy)


def _remap(cache: Path, dataset: str, source: str) -> None:
    """Point the virtual dataset `dataset` (one shard's rows: test, 0 to 16) at the file named `source`."""
    with h5py.File(cache, "r+") as f:
        ds = f[dataset]
        shape, dtype, fill = ds.shape, ds.dtype, [m for m in ds.virtual_sources()]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        for m in fill:
            first, last = m.vspace.get_select_bounds()
            name = source if m.file_name.endswith(shard_name("test", 0, 16)) else m.file_name
            n = last[0] - first[0] + 1
            layout[first[0]:last[0] + 1] = h5py.VirtualSource(name, m.dset_name, shape=(n, *shape[1:]))
        del f[dataset]
        f.create_virtual_dataset(dataset, layout)


def _link_test_shard_to_train(folder: Path) -> None:
    (folder / shard_name("test", 0, 16)).unlink()
    os.symlink(shard_name("train", 0, 16), folder / shard_name("test", 0, 16))


def _copy_train_shard_over_test(folder: Path) -> None:
    shutil.copy(folder / shard_name("train", 16, 32), folder / shard_name("test", 16, 32))


def _swap_train_shards(folder: Path) -> None:
    a, b = folder / shard_name("train", 16, 32), folder / shard_name("train", 32, 48)
    a.rename(folder / "x")
    b.rename(a)
    (folder / "x").rename(b)


def _float64_shard(folder: Path) -> None:
    with h5py.File(folder / shard_name("test", 0, 16), "r+") as f:
        for t in list(f["features"]):
            values = f["features"][t][()].astype(np.float64)
            del f["features"][t]
            f["features"].create_dataset(t, data=values)


@pytest.mark.parametrize("tamper, fragment", [
    (lambda c, d: _link_test_shard_to_train(d), "not a regular HDF5 file"),
    (lambda c, d: _copy_train_shard_over_test(d), "incomplete or from other settings (of another range)"),
    (lambda c, d: _swap_train_shards(d), "incomplete or from other settings (of another range)"),
    (lambda c, d: _float64_shard(d), "has a bad dataset features/"),
    (lambda c, d: _remap(c, "test/labels", str((d / shard_name("test", 0, 16)).resolve())),
     "which is not a shard file in a shard folder beside it"),
    (lambda c, d: _remap(c, "test/labels", f"../{c.parent.name}/{d.name}/{shard_name('test', 0, 16)}"),
     "which is not a shard file in a shard folder beside it"),
    (lambda c, d: _remap(c, "test/labels", "."), "which is not a shard file in a shard folder beside it"),
    (lambda c, d: _remap(c, "test/labels", f"{d.name}/{shard_name('train', 0, 16)}"), "maps shard"),
    (lambda c, d: _remap_dataset(c, "test/labels", "indices"), "maps shard"),
    (lambda c, d: _set_shards_attr(c, 3), "attribute 'shards' says 3"),
], ids=["linked", "copied-over", "swapped", "float64", "absolute-source", "source-outside", "self-source",
        "other-split-source", "labels-from-indices", "shards-attr"])
def test_a_shard_under_another_name_or_a_foreign_source_is_refused_on_open(ray_cache, tmp_path, tamper, fragment):
    """Each shard a cache reads is checked against its name and the dataset it feeds: a shard linked, copied or
    renamed over another, of another dtype, or a virtual dataset reading any other file, is refused with one
    line, never read (before, each of these handed out wrong rows silently)."""
    copy, folder = _copy_ray_cache(ray_cache, tmp_path)
    tamper(copy, folder)
    for command in (("info", copy), ("fit", copy, "--head", "logreg", "--out", tmp_path / "head")):
        r = run(*command)
        assert clean_failure(r, fragment) is None, r.output


def _remap_dataset(cache: Path, dataset: str, source_dataset: str) -> None:
    """Make `dataset` read `source_dataset` of the same shards (test/labels from the shards' indices)."""
    with h5py.File(cache, "r+") as f:
        ds = f[dataset]
        layout = h5py.VirtualLayout(shape=ds.shape, dtype=ds.dtype)
        for m in ds.virtual_sources():
            first, last = m.vspace.get_select_bounds()
            layout[first[0]:last[0] + 1] = h5py.VirtualSource(m.file_name, source_dataset,
                                                              shape=(last[0] - first[0] + 1,))
        del f[dataset]
        f.create_virtual_dataset(dataset, layout)


def _set_shards_attr(cache: Path, n: int) -> None:
    with h5py.File(cache, "r+") as f:
        f.attrs["shards"] = n


def test_a_cache_written_through_a_linked_folder_reads_its_shards_by_their_plain_name(ray_cache, data,
                                                                                         weights_file, cluster,
                                                                                         tmp_path):
    """The virtual sources are `<out>.shards/<shard>`, not a path computed through the resolved folder (which,
    with a link in --out's path, named the link and broke when the folder moved)."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    out = tmp_path / "link" / "l.h5"
    shutil.copytree(shard_folder(ray_cache), shard_folder(out))  # all done: only the cache is written
    extract(_cfg(out, data, weights_file, engine="ray", num_workers=2, shard_size=4 * BATCH))
    moved = tmp_path / "moved"
    (tmp_path / "real").rename(moved)  # the link now dangles; the cache and its folder moved together
    assert_same_features(moved / "l.h5", ray_cache)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_folder_named_like_a_shard_is_refused_not_a_half_done_removal(engine, ray_cache, data, weights_file,
                                                                          cluster, tmp_path):
    """A folder in the shard folder is not a shard fusion-cache wrote: the ray engine refuses it up front; the
    local engine's --force leaves the shard folder alone (it used to die on it halfway through removing the
    shards, after replacing OUT, with exit 1)."""
    out, folder = _copy_ray_cache(ray_cache, tmp_path)
    (folder / shard_name("train", 0, 16)).unlink()
    (folder / shard_name("train", 0, 16)).mkdir()
    args = _args(out, data, weights_file, "--force", "--pool", "avgmax")
    if engine == "ray":
        before = snapshot(tmp_path)
        r = run(*args, "--engine", "ray", "--shard-size", 4 * BATCH)
        assert clean_failure(r, f"holds '{shard_name('train', 0, 16)}', which is not a shard") is None, r.output
        assert snapshot(tmp_path) == before
    else:
        names = sorted(os.listdir(folder))
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert open_cache(out).meta.pool == "avgmax" and sorted(os.listdir(folder)) == names


def test_workers_get_absolute_paths(ray_cache, data, weights_file, cluster, tmp_path, monkeypatch):
    """Relative --data-root and --weights name the driver's folder; a cluster's workers run elsewhere (here: in
    the folder the cluster was started from), so they used to miss the weights or read another data root."""
    shutil.copy(weights_file, tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    r = run(*_args("rel.h5", os.path.relpath(data, tmp_path), "w.pth", "--engine", "ray", "--num-workers", 2,
                   "--shard-size", 4 * BATCH))
    assert r.exit_code == 0, r.output
    assert_same_features(tmp_path / "rel.h5", ray_cache)


def test_consolidate_refuses_a_new_file_in_the_shard_folder(ray_cache, tmp_path):
    before = snapshot(ray_cache.parent)
    r = run("consolidate", ray_cache, "--out", shard_folder(ray_cache) / "one.h5")
    assert clean_failure(r, "lies in its shard folder") is None, r.output
    assert snapshot(ray_cache.parent) == before


def test_local_force_removes_the_shards_under_the_lock(ray_cache, data, weights_file, tmp_path, monkeypatch):
    """A ray run on OUT may start the moment the lock is released: the shards go while it is held."""
    import fusion_cache.cache as cache_mod

    out, folder = _copy_ray_cache(ray_cache, tmp_path)
    held = []
    real = cache_mod.remove_shards
    monkeypatch.setattr(cache_mod, "remove_shards", lambda o: (held.append(cache_mod.lock_path(o).exists()),
                                                               real(o))[1])
    r = run(*_args(out, data, weights_file, "--force"))
    assert r.exit_code == 0, r.output
    assert held == [True] and not folder.exists()


# ---------------------------------------------------------------------------------------------- manifest


def test_a_manifest_under_the_ray_engine(folder_root, weights_file, cluster, tmp_path):
    """`--dataset manifest` works with both engines: the same rows and bytes, the same unreadable image skipped;
    with --on-bad-image fail the worker's error comes back as one line and nothing is left (the shards written
    before it are removed, as the local engine removes its partial file)."""
    from fusion_cache.sources.imagefolder import load_image_folder

    images = Path(shutil.copytree(folder_root, tmp_path / "images"))
    (images / "train" / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = ["path,label,split"]
    for split in ("train", "test"):
        src = load_image_folder(images, split)
        rows += [f"{split}/{f},{src.classes[label]},{split}" for f, label in zip(src.files, src.labels)]
    manifest = images / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    args = ["extract", "--dataset", "manifest", "--data-root", manifest, "--weights", weights_file,
            "--train-size", "all", "--test-size", "all", "--image-size", 32, "--batch-size", BATCH, "--workers", 0,
            "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run(*args, "--out", tmp_path / "local.h5", "--on-bad-image", "skip")
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    ray_args = [*args, "--engine", "ray", "--num-workers", 2, "--shard-size", 2 * BATCH]
    r = run(*ray_args, "--out", tmp_path / "ray.h5", "--on-bad-image", "skip")
    assert r.exit_code == 0, r.output
    assert_same_features(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert open_cache(tmp_path / "ray.h5").meta.skipped == {"train": ["train/cats/broken.png"]}
    r = run(*ray_args, "--out", tmp_path / "fail.h5")
    assert clean_failure(r, "cannot read image train/cats/broken.png") is None, r.output
    assert not (tmp_path / "fail.h5").exists() and not shard_folder(tmp_path / "fail.h5").exists()


def test_without_ray_address_a_local_cluster_starts_even_where_ray_address_is_set(monkeypatch, tmp_path):
    """RAY_ADDRESS (or a `ray start` cluster on the machine) makes a bare ray.init join that cluster, which then
    refuses num_cpus: with no --ray-address the engine asks Ray for a new local cluster, by name."""
    from fusion_cache.engines import ray as engine

    calls = []

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            calls.append(kwargs)

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert engine._connect(FakeRay, ExtractConfig(out=tmp_path / "c.h5", engine="ray")) is True
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= 1
    calls.clear()
    engine._connect(FakeRay, ExtractConfig(out=tmp_path / "c.h5", engine="ray", ray_address="auto"))
    assert calls[0]["address"] == "auto" and "num_cpus" not in calls[0]  # joining: Ray sizes the cluster
