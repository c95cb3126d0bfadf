"""Datasets as they ship: parquet (the Hugging Face Hub layout), `save_to_disk` folders and WebDataset shards,
built here in their real formats from the same image bytes as an image folder. The same bytes must give
bit-identical features whatever the container (EXIF and reduced decoding included), and every container must
work with auto detection, the split, leaks and the Ray engine."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_cache import sources
from fusion_cache.cache import open_cache
from fusion_cache.decode import ChangedImage
from fusion_cache.errors import FusionCacheError
from fusion_cache.extract import ExtractConfig, extract, plan
from fusion_cache.leaks import LeakWarning
from fusion_cache.synthetic import folder_items, write_parquet, write_shards

from .hostile import clean_failure, run

SIZE = 32


def _jpeg(arr: np.ndarray, orientation: int | None = None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=90, exif=exif)
    else:
        img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 6 images: JPEGs (one EXIF-rotated, one large enough to be decoded reduced at 32 px), PNGs
    (RGBA, grayscale), each class's colour its own."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("containers") / "folder"
    for c, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            base = np.full((40 + 3 * i, 52, 3), 60 * c + 20, np.int64)
            arr = np.clip(base + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8)
            if i == 0:
                data = _jpeg(arr, orientation=6)
            elif i == 1:
                big = np.clip(np.kron(arr, np.ones((4, 4, 1))), 0, 255).astype(np.uint8)  # 160+ px: reduced
                data = _jpeg(big)
            elif i == 2:
                rgba = np.dstack([arr, rng.integers(0, 255, arr.shape[:2])]).astype(np.uint8)
                data = _png(Image.fromarray(rgba, "RGBA"))
            elif i == 3:
                data = _png(Image.fromarray(arr[..., 0], "L"))
            else:
                data = _jpeg(arr)
            ext = "png" if i in (2, 3) else "jpg"
            (root / name / f"{name}{i}.{ext}").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def items(folder):
    return folder_items(folder)


def _hf_dict(items, root: Path, splits=None) -> Path:
    datasets = pytest.importorskip("datasets")
    classes = sorted({c for c, _, _ in items})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": d, "path": n} for _, n, d in items],
                                     "label": [classes.index(c) for c, _, _ in items]}, features=features)
    if splits is None:
        ds.save_to_disk(str(root))
    else:
        datasets.DatasetDict({name: ds.select(rows) for name, rows in splits.items()}).save_to_disk(str(root))
    return root


def _cfg(out, root, weights_file, **kw) -> ExtractConfig:
    base = dict(out=Path(out), data_root=root, weights=str(weights_file), image_size=SIZE, batch_size=4,
                progress=False, workers=0)
    return ExtractConfig(**{**base, **kw})


def _assert_same_rows(a: Path, b: Path, same_classes: bool = True) -> None:
    ca, cb = open_cache(a), open_cache(b)
    assert ca.taps == cb.taps
    if same_classes:
        assert ca.classes == cb.classes
    for s in ("train", "test"):
        np.testing.assert_array_equal(ca.labels(s), cb.labels(s))
        assert len(ca.labels(s)) > 0
        for t in ca.taps:
            x, y = ca.features(t, s), cb.features(t, s)
            assert np.array_equal(x, y), f"{s} {t}: max diff {np.abs(x - y).max()}"


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, folder, weights_file) -> Path:
    out = tmp_path_factory.mktemp("folder-cache") / "folder.h5"
    extract(_cfg(out, folder, weights_file))
    return out


def _container(kind: str, items, root: Path) -> Path:
    if kind == "parquet":
        write_parquet(items, root, row_group_size=5)
    elif kind == "parquet-no-classlabel":
        write_parquet(items, root, class_label=False, names_as_labels=True, files=1)
    elif kind == "wds-cls":
        write_shards(items, root, per_shard=7, label="cls")
    elif kind == "wds-json":
        write_shards(items, root, per_shard=7, label="json")
    elif kind == "hf":
        _hf_dict(items, root)
    elif kind == "manifest":
        root.mkdir()
        (root / "m.csv").write_text("path,label\n" + "".join(
            f"{(Path(root).parent / 'img' / n).as_posix()},{c}\n" for c, n, _ in items))
        (root.parent / "img").mkdir()
        for _, n, d in items:
            (root.parent / "img" / n).write_bytes(d)
        return root / "m.csv"
    return root


@pytest.mark.parametrize("kind", ["parquet", "parquet-no-classlabel", "wds-cls", "wds-json", "hf", "manifest"])
def test_the_same_bytes_give_bit_identical_features_in_every_container(kind, items, folder_cache, weights_file,
                                                                         tmp_path):
    """Rows in the folder's order: the auto split depends on each image's bytes alone, so every container puts
    the same images in train and in test, and each one's features are the folder's, bit for bit."""
    root = _container(kind, items, tmp_path / kind)
    out = tmp_path / f"{kind}.h5"
    r = extract(_cfg(out, root, weights_file))
    assert r.counts == {s: len(open_cache(folder_cache).labels(s)) for s in ("train", "test")}
    _assert_same_rows(folder_cache, out, same_classes=kind != "wds-cls")
    if kind == "wds-cls":
        assert open_cache(out).classes == ["0", "1", "2"]  # cls members hold class indices
    assert open_cache(out).meta.decode == open_cache(folder_cache).meta.decode  # reduced, EXIF applied: as files


@pytest.mark.parametrize("kind, expected", [("parquet", "parquet"), ("wds-cls", "wds"), ("hf", "hf")])
def test_auto_detects_each_container(kind, expected, items, tmp_path):
    root = _container(kind, items, tmp_path / kind)
    name, found = sources.detect(root)
    assert name == expected and found
    if kind == "parquet":  # a single parquet file, and the Hub layout's data/ folder, too
        assert sources.detect(root / "data" / "train-00000-of-00001.parquet")[0] == "parquet"
        assert sources.detect(root / "data")[0] == "parquet"
    if kind == "wds-cls":
        assert sources.detect(root / "train-000000.tar")[0] == "wds"


def test_hub_layout_splits_come_from_file_names(items, tmp_path, weights_file):
    root = tmp_path / "hub"
    classes = ["cat", "dog", "eel"]
    write_parquet(items[:12], root, split="train", files=2, classes=classes)
    write_parquet(items[12:15], root, split="validation", classes=classes)
    write_parquet(items[15:], root, split="test", classes=classes)
    listing = sources.load("parquet", root)
    assert {s: len(src) for s, src in listing.given.items()} == {"train": 12, "val": 3, "test": 3}
    assert listing.given["test"].names[0] == "data/test-00000-of-00001.parquet[0]"
    assert sources.test_split("auto", root) == "test-*.parquet"
    r = run("extract", "--data-root", root, "--out", tmp_path / "hub.h5", "--weights", weights_file, "--image-size",
            SIZE, "--no-progress", "--test-fraction", "0.3")
    assert clean_failure(r, "--test-fraction applies to a dataset without a test split") is None


def test_shard_names_give_the_splits_and_a_mix_is_refused(items, tmp_path):
    root = tmp_path / "wds"
    train, test = [it for k, it in enumerate(items) if k % 3], items[::3]
    write_shards(train, root, split="train", per_shard=5, classes=["cat", "dog", "eel"])
    write_shards(test, root, split="test", per_shard=5, classes=["cat", "dog", "eel"])
    listing = sources.load("wds", root)
    assert {s: len(src) for s, src in listing.given.items()} == {"train": 12, "test": 6}
    write_shards(items[:2], root, split="shard", per_shard=5)  # shard-000000.tar: no split in its name
    with pytest.raises(FusionCacheError, match="name every one train-"):
        sources.load("wds", root)


def test_leaks_and_the_split_work_from_the_bytes(items, tmp_path, weights_file):
    """The same image in a train shard and a test shard is a leak, found from its bytes."""
    root = tmp_path / "leaky"
    train, test = [it for k, it in enumerate(items) if k % 3], items[::3]
    write_shards(train, root, split="train", per_shard=6, classes=["cat", "dog", "eel"])
    write_shards(test + [train[0]], root, split="test", per_shard=10, classes=["cat", "dog", "eel"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        the_plan, _ = plan(_cfg(tmp_path / "x.h5", root, weights_file))
    assert any(issubclass(w.category, LeakWarning) for w in caught)
    assert the_plan.meta.leaks and the_plan.meta.split["method"] == "given"
    r = run("extract", "--data-root", root, "--out", tmp_path / "l.h5", "--weights", weights_file, "--image-size",
            SIZE, "--no-progress", "--on-leak", "fail")
    assert clean_failure(r, "train-000000.tar/00000000") is None  # train[0], also the test shard's last sample


@pytest.mark.parametrize("case, fragment", [
    ("no-image-column", "--image-column"),
    ("no-label-column", "--label-column"),
    ("image-column-of-text", "not images"),
    ("wds-no-label", "--label-key"),
    ("wds-no-image", "has no image"),
    ("wds-json-no-field", "--label-key"),
    ("option-for-another-source", "--label-key applies to --dataset wds"),
    ("write-manifest", "--write-manifest lists image files"),
    ("one-class", "at least two classes"),
])
def test_bad_containers_are_one_line_errors_with_the_fix(case, fragment, items, tmp_path, weights_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "d"
    extra = []
    if case.startswith("no-") or case == "image-column-of-text":
        root.mkdir()
        cols = {"image": [{"bytes": d, "path": n} for _, n, d in items], "label": [c for c, _, _ in items]}
        if case == "no-image-column":
            cols["picture"] = cols.pop("image")
        elif case == "no-label-column":
            cols["fine_label"] = cols.pop("label")
        else:
            cols["image"] = [n for _, n, _ in items]
        pq.write_table(pa.table(cols), root / "train.parquet")
    elif case.startswith("wds"):
        root.mkdir()
        with tarfile.open(root / "train-000000.tar", "w") as tf:
            for k, (c, n, d) in enumerate(items):
                members = {"wds-no-label": [("jpg", d)], "wds-no-image": [("cls", b"0")],
                           "wds-json-no-field": [("jpg", d), ("json", json.dumps({"name": c}).encode())]}[case]
                for ext, blob in members:
                    info = tarfile.TarInfo(f"{k:04d}.{ext}")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    elif case == "option-for-another-source":
        write_parquet(items, root)
        extra = ["--label-key", "txt"]
    elif case == "write-manifest":
        write_shards(items, root)
        extra = ["--write-manifest", tmp_path / "split.csv"]
    elif case == "one-class":
        write_parquet([(items[0][0], n, d) for _, n, d in items], root)
    r = run("extract", "--data-root", root, "--out", tmp_path / "x.h5", "--weights", weights_file, "--image-size",
            SIZE, "--no-progress", *extra)
    assert clean_failure(r, fragment) is None
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "split.csv").exists()


def test_wds_label_key_reads_another_member_or_json_field(items, tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "train-000000.tar", "w") as tf:
        for k, (c, n, d) in enumerate(items):
            for ext, blob in (("png" if n.endswith("png") else "jpg", d), ("txt", c.upper().encode()),
                              ("json", json.dumps({"species": c}).encode())):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    opts = sources.LoadOptions(label_key="txt")
    assert sources.load("wds", root, opts).given["train"].classes == ["CAT", "DOG", "EEL"]
    src = sources.load("wds", root, sources.LoadOptions(label_key="species")).given["train"]
    assert src.classes == ["cat", "dog", "eel"]
    assert [src.classes[i] for i in src.labels] == [c for c, _, _ in items]
    assert src.identity != sources.load("wds", root, opts).given["train"].identity


def test_hf_dataset_dict_splits_and_left_out_splits(items, tmp_path):
    root = _hf_dict(items, tmp_path / "dd", {"train": range(12), "test": range(12, 18), "unlabeled": range(3)})
    name, found = sources.detect(root)
    assert name == "hf" and "unlabeled left out" in found
    listing = sources.load("hf", root)
    assert {s: len(src) for s, src in listing.given.items()} == {"train": 12, "test": 6}
    assert listing.given["train"].classes == ["cat", "dog", "eel"]
    for i in (0, 5, 11):  # each item's bytes, read back through the reader by its key
        src = listing.given["train"]
        assert src.reader.read(src.keys[i]) == items[i][2]


def test_hf_without_the_datasets_package_names_the_extra(items, tmp_path, monkeypatch, weights_file):
    root = _hf_dict(items, tmp_path / "one")
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    r = run("extract", "--data-root", root, "--out", tmp_path / "x.h5", "--weights", weights_file, "--image-size",
            SIZE, "--no-progress")
    assert clean_failure(r, "pip install 'fusion-cache[hf]'") is None


@pytest.mark.parametrize("kind", ["parquet", "wds-cls"])
def test_changed_container_after_planning_is_never_extracted(kind, items, tmp_path, weights_file):
    root = _container(kind, items, tmp_path / kind)
    the_plan, _ = plan(_cfg(tmp_path / "x.h5", root, weights_file))
    sp = the_plan.splits["train"]
    assert sp.image(0).shape[0] == 3
    swapped = [(c, n, items[(k + 1) % len(items)][2]) for k, (c, n, _) in enumerate(items)]
    _container(kind, swapped, tmp_path / f"{kind}-2")
    for new in (tmp_path / f"{kind}-2").rglob("*"):
        if new.is_file():
            target = tmp_path / kind / new.relative_to(tmp_path / f"{kind}-2")
            target.write_bytes(new.read_bytes())
    fresh = type(sp.reader)(**sp.reader.__getstate__())  # a new process's reader: nothing cached
    sp = type(sp)(**{**sp.__dict__, "reader": fresh})
    with pytest.raises(ChangedImage):
        sp.image(0)


def test_reader_streams_a_row_group_once_in_order(items, tmp_path, monkeypatch):
    """Items read in plan order pass through each row group's batches once: no batch is read twice."""
    import pyarrow.parquet as pq

    write_parquet(items, tmp_path / "p", row_group_size=6)
    src = sources.load("parquet", tmp_path / "p").given["train"]
    calls = []
    real = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("row_groups"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    fresh = type(src.reader)(**src.reader.__getstate__())
    got = [fresh.read(k) for k in src.keys]
    assert got == [d for _, _, d in items]
    assert calls == [[0], [1], [2]]


@pytest.fixture(scope="module")
def cluster_containers(tmp_path_factory, items):
    root = tmp_path_factory.mktemp("ray-containers")
    write_parquet(items, root / "parquet", row_group_size=4)
    write_shards(items, root / "wds", per_shard=5)
    return root


@pytest.mark.parametrize("kind", ["parquet", "wds"])
def test_ray_extraction_of_a_container_equals_the_local_one(kind, cluster_containers, cluster, weights_file, tmp_path):
    root = cluster_containers / kind
    local = tmp_path / "local.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each Ray worker's thread count here
    try:
        extract(_cfg(local, root, weights_file))
    finally:
        torch.set_num_threads(threads)
    ray_out = tmp_path / "ray.h5"
    r = extract(_cfg(ray_out, root, weights_file, engine="ray", num_workers=2, shard_size=4))
    assert not r.reused
    _assert_same_rows(local, ray_out)
    assert open_cache(local).fingerprint == open_cache(ray_out).fingerprint
    assert open_cache(ray_out).item_names("train") == open_cache(local).item_names("train")


# ---------------------------------------------------------------------------------------------- hostile cases


def test_an_image_folder_with_a_stray_tar_or_parquet_is_still_an_image_folder(folder, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(folder, root)
    write_shards(folder_items(folder)[:3], tmp_path / "w", split="backup")
    shutil.copy(tmp_path / "w" / "backup-000000.tar", root / "backup.tar")
    write_parquet(folder_items(folder)[:3], tmp_path / "p")
    shutil.copy(next((tmp_path / "p").rglob("*.parquet")), root / "cat" / "meta.parquet")
    assert sources.detect(root)[0] == "imagefolder"


def test_shards_in_split_folders(items, tmp_path):
    root = tmp_path / "wds"
    train, test = [it for k, it in enumerate(items) if k % 3], items[::3]
    write_shards(train, root / "train", split="shard", per_shard=5, classes=["cat", "dog", "eel"])
    write_shards(test, root / "test", split="shard", per_shard=5, classes=["cat", "dog", "eel"])
    assert sources.detect(root)[0] == "wds"
    listing = sources.load("wds", root)
    assert {s: len(src) for s, src in listing.given.items()} == {"train": 12, "test": 6}
    assert listing.given["test"].names[0] == "test/shard-000000.tar/00000000"


def _tar(path: Path, members) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


@pytest.mark.parametrize("case, fragment", [
    ("class-only-in-test", "class 'zebra' is in test but not in train"),
    ("minus-one-in-test", "class '-1' is in test but not in train"),
    ("several-configs", "several configurations"),
    ("bytes-field-of-text", "not images"),
    ("members-apart", "twice, apart"),
    ("truncated-in-data", "is damaged"),
])
def test_more_bad_containers_are_one_line_errors(case, fragment, items, tmp_path, weights_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "d"
    (c0, n0, d0), (c1, n1, d1) = items[0], items[6]
    if case == "class-only-in-test":
        write_parquet(items[:12], root, split="train", class_label=False, names_as_labels=True)
        write_parquet([("zebra", n, d) for _, n, d in items[12:]], root, split="test", class_label=False,
                      names_as_labels=True)
    elif case == "minus-one-in-test":
        write_shards(items[:12], root, split="train")
        _tar(root / "test-000000.tar", [("a.jpg", d0), ("a.cls", b"-1")])
    elif case == "several-configs":
        write_parquet(items, root / "cfgA")
        write_parquet(items, root / "cfgB")
    elif case == "bytes-field-of-text":
        root.mkdir()
        pq.write_table(pa.table({"image": [{"bytes": "x", "path": "a"}, {"bytes": "y", "path": "b"}],
                                 "label": [0, 1]}), root / "train.parquet")
    elif case == "members-apart":
        _tar(root / "train-000000.tar", [("a.jpg", d0), ("b.jpg", d1), ("b.cls", b"1"), ("a.cls", b"0")])
    elif case == "truncated-in-data":
        shard = _tar(root / "train-000000.tar", [("a.jpg", d0), ("a.cls", b"0"), ("b.jpg", d1), ("b.cls", b"1")])
        blob = shard.read_bytes()
        shard.write_bytes(blob[: blob.index(d1) + len(d1) // 2])  # cut inside the last image's data
    r = run("extract", "--data-root", root, "--out", tmp_path / "x.h5", "--weights", weights_file, "--image-size",
            SIZE, "--no-progress", "--workers", "0")
    assert clean_failure(r, fragment) is None
    assert not (tmp_path / "x.h5").exists()


def test_a_dataset_dict_with_two_folders_for_one_split_is_refused(items, tmp_path):
    root = _hf_dict(items, tmp_path / "dd", {"train": range(12), "training": range(12, 15), "test": range(15, 18)})
    with pytest.raises(FusionCacheError, match="holds both train and training for one split"):
        sources.load("hf", root)


def test_a_parquet_file_with_large_row_groups_warns(items, tmp_path, monkeypatch):
    from fusion_cache.sources import parquet

    write_parquet(items, tmp_path / "p", row_group_size=100)
    monkeypatch.setattr(parquet, "LARGE_ROW_GROUP", 1000)
    with pytest.warns(ResourceWarning, match="row_group_size=100"):
        sources.load("parquet", tmp_path / "p")


@pytest.mark.parametrize("change", ["delete", "garbage", "fewer-rows"])
def test_a_container_changed_under_decode_workers_is_a_one_line_error(change, items, tmp_path, weights_file):
    """In DataLoader worker processes (--workers 2), a container that went away or changed after planning is
    the same one-line error as in this process, never a worker's traceback."""
    from fusion_cache.engines import local

    root = tmp_path / "p"
    (path,) = write_parquet(items, root, row_group_size=100)
    cfg = _cfg(tmp_path / "x.h5", root, weights_file, workers=2)
    the_plan, weights = plan(cfg)
    if change == "delete":
        path.unlink()
    elif change == "garbage":
        path.write_bytes(b"not parquet at all" * 100)
    else:
        write_parquet(items[:2], root, row_group_size=100)
    with pytest.raises(FusionCacheError) as e:
        local.run(the_plan, cfg, weights)
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text and "cannot be read as it was planned" in text
    assert not (tmp_path / "x.h5").exists()


def test_source_options_are_recorded_and_shown_by_info(items, tmp_path, weights_file):
    root = tmp_path / "wds"
    write_shards(items, root, per_shard=7, label="json")
    out = tmp_path / "w.h5"
    r = run("extract", "--data-root", root, "--out", out, "--weights", weights_file, "--image-size", SIZE,
            "--no-progress", "--workers", "0", "--label-key", "label")
    assert r.exit_code == 0, r.output
    assert open_cache(out).meta.source_options == {"label_key": "label"}
    assert "--label-key label" in run("info", out).output
