"""One plan, executed as planned (issue 21): both engines read exactly the bytes the driver hashed.

A manifest reached through a symbolic link reads its relative paths from the link's folder, on both engines;
an image whose bytes change after planning (another node's copy, an edit during the run) is a one-line error
and no cache, never a cache of other images; reuse compares the content fingerprint on both engines.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_cache.cache import open_cache, shard_folder
from fusion_cache.decode import ChangedImage
from fusion_cache.synthetic import write_image_folder

from .hostile import clean_failure, run, snapshot

BATCH = 4


def _write_manifest(folder: Path, images: Path) -> Path:
    """`folder/list.csv` listing every image under `images` (a folder of train/test class folders) by a path
    relative to `folder`."""
    rows = ["path,label,split"]
    for split in ("train", "test"):
        for f in sorted((images / split).rglob("*.png")):
            rows.append(f"{os.path.relpath(f, folder)},{f.parent.name},{split}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return folder / "list.csv"


@pytest.fixture(scope="module")
def linked(tmp_path_factory) -> dict[str, Path]:
    """A/list.csv beside A/imgs/; L/list.csv a link to it beside L/imgs/, other images under the same names;
    R/list.csv a real copy beside a copy of L's images (what the link means); E/list.csv a link with no
    images beside it."""
    tmp = tmp_path_factory.mktemp("linked")
    a, l, r, e = (tmp / n for n in "ALRE")
    for d in (a, l, r, e):
        d.mkdir()
    write_image_folder(a / "imgs", seed=0)
    write_image_folder(l / "imgs", seed=1)
    manifest = _write_manifest(a, a / "imgs")
    (l / "list.csv").symlink_to(os.path.relpath(manifest, l))
    (e / "list.csv").symlink_to(os.path.relpath(manifest, e))
    shutil.copytree(l / "imgs", r / "imgs")
    shutil.copy(manifest, r / "list.csv")
    return {"A": a / "list.csv", "L": l / "list.csv", "R": r / "list.csv", "E": e / "list.csv"}


def _args(manifest, out, weights_file, *extra):
    return ["extract", "--dataset", "manifest", "--data-root", manifest, "--out", out, "--weights", weights_file,
            "--train-size", "all", "--test-size", "all", "--image-size", 32, "--batch-size", BATCH, "--workers", 0,
            "--no-progress", *extra]


def _ray(*extra):
    return ["--engine", "ray", "--num-workers", 2, "--shard-size", 2 * BATCH, *extra]


def _local(manifest, out, weights_file, *extra):
    """The local engine at one torch thread, a Ray worker's count here: the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(*_args(manifest, out, weights_file, *extra))
    finally:
        torch.set_num_threads(threads)


def _features(path: Path) -> dict[str, np.ndarray]:
    c = open_cache(path)
    return {f"{s}/{t}": c.features(t, s) for s in ("train", "test") for t in c.taps}


def _same(a: Path, b: Path) -> bool:
    fa, fb = _features(a), _features(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


# ---------------------------------------------------------------------------------------------- links


@pytest.fixture(scope="module")
def local_linked(linked, weights_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local-linked") / "cache.h5"
    r = _local(linked["L"], out, weights_file)
    assert r.exit_code == 0, r.output
    return out


def test_a_linked_manifest_reads_the_images_beside_the_link(linked, local_linked, weights_file, tmp_path):
    """As a shell user expects: `L/list.csv -> A/list.csv` with `imgs/...` rows reads L/imgs, and the cache
    records L/list.csv as its data root, so report and reruns look there too."""
    for name in ("R", "A"):
        r = _local(linked[name], tmp_path / f"{name}.h5", weights_file)
        assert r.exit_code == 0, r.output
    assert _same(local_linked, tmp_path / "R.h5")
    assert not _same(local_linked, tmp_path / "A.h5")
    assert open_cache(local_linked).meta.data_root == os.path.abspath(linked["L"])


def test_the_ray_engine_reads_the_same_images_through_the_link(linked, local_linked, weights_file, cluster,
                                                                 tmp_path):
    """It used to read A's images (the workers resolved the link) and exit 0."""
    r = run(*_args(linked["L"], tmp_path / "ray.h5", weights_file), *_ray())
    assert r.exit_code == 0, r.output
    assert _same(tmp_path / "ray.h5", local_linked)
    assert open_cache(tmp_path / "ray.h5").meta.data_root == os.path.abspath(linked["L"])


def test_a_linked_manifest_without_images_beside_the_link_names_the_folder_it_read(linked, weights_file, tmp_path):
    before = snapshot(tmp_path)
    r = run(*_args(linked["E"], tmp_path / "e.h5", weights_file))
    assert clean_failure(r, "does not exist") is None, r.output
    assert os.path.dirname(os.path.abspath(linked["E"])) in r.output  # the link's folder, not its target's
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- other bytes


def _swap_after_planning(monkeypatch, victim: Path, other: Path | None) -> None:
    """Plan as usual, then put other bytes under `victim`'s name (`other`'s), or remove it (None): what a node
    with another copy of the data, or an edit during the run, shows the engine."""
    import fusion_cache.extract as extract_mod

    real = extract_mod.plan

    def plan_then_swap(cfg, say=None):
        got = real(cfg, say)
        if other is None:
            victim.unlink()
        else:
            shutil.copy(other, victim)
        return got

    monkeypatch.setattr(extract_mod, "plan", plan_then_swap)


@pytest.mark.parametrize("engine, other", [("local", "bytes"), ("ray", "bytes"), ("local", "none")])
def test_other_bytes_under_a_planned_name_are_an_error_and_no_cache(engine, other, weights_file, tmp_path,
                                                                    monkeypatch, request):
    """Other bytes, or no file at all, where the plan hashed one: an error even with --on-bad-image skip (a
    node without the data would otherwise drop its rows, and a later run reuse that cache as complete)."""
    if engine == "ray":
        request.getfixturevalue("cluster")
    folder = tmp_path / "data"
    folder.mkdir()
    write_image_folder(folder / "imgs", seed=0)
    manifest = _write_manifest(folder, folder / "imgs")
    victim = folder / "imgs" / "test" / "owls" / "001.png"
    _swap_after_planning(monkeypatch, victim, folder / "imgs" / "test" / "owls" / "000.png" if other == "bytes"
                         else None)
    out = tmp_path / "out" / "cache.h5"
    out.parent.mkdir()
    r = run(*_args(manifest, out, weights_file, "--on-bad-image", "skip"), *(_ray() if engine == "ray" else ()))
    assert clean_failure(r, "imgs/test/owls/001.png is not the file that was planned") is None, r.output
    fix = "put the same data at the same path on every node" if engine == "ray" else \
        "leave the images unchanged while extract runs"
    assert fix in r.output
    assert os.listdir(out.parent) == [], "no cache, no partial file, no shards"


def test_a_dotdot_after_a_linked_folder_is_read_as_the_kernel_reads_it(weights_file, tmp_path, monkeypatch):
    """`sl/../list.csv` with `sl -> deep/a/b` is deep/a/list.csv (the link's target's parent), as the shell
    and the kernel read it; folding `..` away as text would read ./list.csv, another manifest."""
    deep = tmp_path / "deep" / "a"
    (deep / "b").mkdir(parents=True)
    write_image_folder(deep / "imgs", seed=0)
    _write_manifest(deep, deep / "imgs")
    write_image_folder(tmp_path / "imgs", seed=1)  # a decoy the folded path would read
    _write_manifest(tmp_path, tmp_path / "imgs")
    (tmp_path / "sl").symlink_to(deep / "b")
    monkeypatch.chdir(tmp_path)
    for name, root in (("via.h5", "sl/../list.csv"), ("deep.h5", deep / "list.csv"),
                       ("decoy.h5", tmp_path / "list.csv")):
        r = run(*_args(root, tmp_path / name, weights_file))
        assert r.exit_code == 0, r.output
    assert _same(tmp_path / "via.h5", tmp_path / "deep.h5")
    assert not _same(tmp_path / "via.h5", tmp_path / "decoy.h5")


def test_reuse_compares_the_content_on_both_engines(weights_file, tmp_path):
    """Same names and labels, one image's bytes changed: neither engine reuses the cache (it is refused
    without --force; with it, rebuilt)."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_image_folder(folder / "imgs", seed=0)
    manifest = _write_manifest(folder, folder / "imgs")
    out = tmp_path / "cache.h5"
    assert run(*_args(manifest, out, weights_file)).exit_code == 0
    shutil.copy(folder / "imgs" / "train" / "cats" / "000.png", folder / "imgs" / "train" / "cats" / "001.png")
    before = snapshot(tmp_path)
    for extra in ((), _ray()):
        r = run(*_args(manifest, out, weights_file), *extra)
        assert clean_failure(r, "was built with other settings") is None, r.output
        assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- the plan


def test_the_plan_pickles_and_reads_only_the_planned_bytes(linked, weights_file, tmp_path):
    """What the ray engine ships to its workers: absolute files as given, their digests, the subset; after a
    pickle round trip it reads the same pixels, and refuses a file whose bytes changed."""
    from fusion_cache.extract import ExtractConfig, plan

    cfg = ExtractConfig(out=tmp_path / "x.h5", dataset="manifest", data_root=Path(os.path.relpath(linked["L"])),
                        weights=str(weights_file), image_size=32, train_size=None, test_size=None)
    p, _ = plan(cfg)
    q = pickle.loads(pickle.dumps(p))
    sp = q.splits["train"]
    assert q.meta.fingerprint == p.meta.fingerprint and len(sp) == len(p.splits["train"])
    link_folder = os.path.dirname(os.path.abspath(linked["L"]))  # (no link on the way from here to it)
    assert all(os.path.isabs(f) and os.path.normpath(f).startswith(link_folder) for f in sp.files)
    assert torch.equal(sp.image(0), p.splits["train"].image(0))
    copy = tmp_path / "copy.png"
    shutil.copy(sp.files[1], copy)
    sp2 = pickle.loads(pickle.dumps(sp))
    object.__setattr__(sp2, "files", (str(copy),) + sp.files[1:])  # item 0 is now item 1's bytes
    with pytest.raises(ChangedImage, match="is not the file that was planned"):
        sp2.image(0)


# ---------------------------------------------------------------------------------------------- running work


def test_a_ray_extraction_at_work_is_in_progress_not_interrupted(cifar_root, weights_file, tmp_path):
    """A local extract on the OUT of a ray driver still at work (it holds OUT.lock, its shard folder exists)
    used to be told to "run that command again to finish it"; it names the driver instead."""
    from fusion_cache.cache import CacheLock

    out = tmp_path / "cache.h5"
    shard_folder(out).mkdir()
    args = ["extract", "--out", out, "--data-root", cifar_root, "--weights", weights_file, "--image-size", 32,
            "--train-size", 20, "--test-size", 10, "--no-download", "--skip-integrity-check", "--no-progress"]
    with CacheLock(out):
        before = snapshot(tmp_path)
        for extra in ((), ("--force",)):
            r = run(*args, *extra)
            assert clean_failure(r, "in progress (pid ") is None, r.output
            assert f"pid {os.getpid()} on " in r.output
            assert snapshot(tmp_path) == before
    r = run(*args)
    assert clean_failure(r, "interrupted Ray extraction") is None, r.output
