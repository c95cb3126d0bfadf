"""Your folder as it is: `--dataset auto`, the split made for you, split folders (train/val/test), leaks and
duplicates, and older caches reused only when decoding did not change. Tiny PNG/JPEG folders built in tmp."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from fusion_cache.cache import CacheMeta, open_cache
from fusion_cache.sources import SOURCES
from fusion_cache.split import auto_test_mask

from .hostile import clean_failure, run, snapshot

SIZE = 32
CLASSES = ("cat", "dog", "owl")


def _image(path: Path, seed: int, size=(40, 36), fmt: str = "PNG", exif=None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    im.save(path, fmt, **({"exif": exif} if exif is not None else {}))
    return path


def _class_folder(root: Path, per_class: int = 10, start: int = 0, classes=CLASSES) -> Path:
    for c, name in enumerate(classes):
        for i in range(start, start + per_class):
            _image(root / name / f"{i:03d}.png", seed=1000 * c + i)
    return root


def _extract(root: Path, out: Path, weights: Path, *more) -> object:
    return run("extract", "--data-root", root, "--out", out, "--weights", weights, "--image-size", SIZE,
               "--taps", "late", "--no-progress", "--workers", 0, *more)


def _split_of(cache_path: Path, root: Path) -> dict[str, str]:
    """{file relative to root: split} from the manifest extract wrote beside the cache."""
    with open(cache_path.with_suffix(".csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {str((cache_path.parent / r["path"]).resolve().relative_to(root.resolve())): r["split"] for r in rows}


# ---------------------------------------------------------------------------------------------- auto + split


def test_a_plain_class_folder_extracts_with_no_dataset_and_says_how_it_split(tmp_path, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=10)
    before = snapshot(root)
    out = tmp_path / "p.h5"
    r = _extract(root, out, weights_file, "--write-manifest", out.with_suffix(".csv"))
    assert r.exit_code == 0, r.output
    said = [line for line in r.output.splitlines() if "goes to test" in line]
    assert len(said) == 1 and "an image folder of 3 class folders (imagefolder)" in said[0], r.output
    assert "--test-fraction 0.2 (--split-seed 0;" in said[0]
    assert snapshot(root) == before, "extract wrote into the user's folder"
    cache = open_cache(out)
    assert cache.meta.dataset == "imagefolder" and cache.meta.split["method"] == "auto"
    assert cache.meta.split["test_fraction"] == 0.2 and cache.meta.split["seed"] == 0
    n_train, n_test = len(cache.labels("train")), len(cache.labels("test"))
    assert n_train + n_test == 30
    # stratified in expectation, and every class has images on both sides
    for c in range(3):
        assert (cache.labels("test") == c).sum() >= 1 and (cache.labels("train") == c).sum() >= 1
    info = run("info", out)
    assert "made for you from" in info.output and "20% of each class to test" in info.output, info.output
    split = _split_of(out, root)
    assert len(split) == 30 and sum(v == "test" for v in split.values()) == n_test
    # the cache itself records which image went where, row by row
    listed = [line.split("\t") for line in run("info", out, "--items").output.splitlines()]
    assert {name: s for s, name in listed} == split
    assert [name for s, name in listed if s == "test"] == cache.item_names("test")


def test_the_split_follows_the_seed_and_content_only(tmp_path, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=12)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 7)):
        out = tmp_path / f"{name}.h5"
        r = _extract(root, out, weights_file, "--split-seed", seed, "--write-manifest", out.with_suffix(".csv"))
        assert r.exit_code == 0, r.output
        outs[name] = _split_of(out, root)
    assert outs["a"] == outs["b"], "the same seed gave another split"
    assert outs["a"] != outs["c"], "another seed gave the same split"
    # renaming files does not move them: the place is a function of the content
    renamed = tmp_path / "renamed"
    shutil.copytree(root, renamed)
    for p in sorted(renamed.rglob("*.png")):
        p.rename(p.with_name("x" + p.name))
    out = tmp_path / "r.h5"
    assert _extract(renamed, out, weights_file, "--write-manifest", out.with_suffix(".csv")).exit_code == 0
    moved = {k.replace("/x", "/"): v for k, v in _split_of(out, renamed).items()}
    assert moved == outs["a"]


def test_adding_images_never_moves_existing_ones(tmp_path, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=15)
    first = tmp_path / "first.h5"
    assert _extract(root, first, weights_file, "--write-manifest", first.with_suffix(".csv")).exit_code == 0
    before = _split_of(first, root)
    _class_folder(root, per_class=15, start=100)  # 45 more images
    second = tmp_path / "second.h5"
    assert _extract(root, second, weights_file, "--write-manifest", second.with_suffix(".csv")).exit_code == 0
    after = _split_of(second, root)
    assert len(after) == 90
    assert {k: after[k] for k in before} == before, "an existing image changed sides when images were added"


def test_the_split_is_stratified_in_expectation_with_both_sides_per_class():
    """The rule itself, on many items: each class's test share is near the fraction; small classes keep an
    image on each side; a single-image class stays in train."""
    rng = np.random.default_rng(0)
    digests = [f"{rng.integers(0, 2**63):064x}" for _ in range(6002)]
    labels = np.array([0] * 3000 + [1] * 3000 + [2] * 2)
    test = auto_test_mask(digests, [str(i) for i in range(len(digests))], labels, 0.2, seed=0)
    for c in (0, 1):
        assert abs(test[labels == c].mean() - 0.2) < 0.03
    assert test[labels == 2].sum() == 1
    one = auto_test_mask(digests[:1], ["a"], np.array([0]), 0.99, seed=0)
    assert not one.any(), "a class of one image lost its only train image"
    other_seed = auto_test_mask(digests, [str(i) for i in range(len(digests))], labels, 0.2, seed=1)
    assert (other_seed != test).mean() > 0.2


def test_the_written_manifest_round_trips_to_the_same_features(tmp_path, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=8)
    out = tmp_path / "p.h5"
    manifest = tmp_path / "split.csv"
    assert _extract(root, out, weights_file, "--write-manifest", manifest).exit_code == 0
    again = tmp_path / "again.h5"
    r = _extract(manifest, again, weights_file)
    assert r.exit_code == 0, r.output
    a, b = open_cache(out), open_cache(again)
    assert b.meta.dataset == "manifest" and b.meta.split["method"] == "given"
    for split in ("train", "test"):
        assert np.array_equal(a.labels(split), b.labels(split))
        assert np.array_equal(a.features("features.18", split), b.features("features.18", split))
    # the written manifest is the same when written again; another split is not written over without --force
    text = manifest.read_bytes()
    assert _extract(root, tmp_path / "p2.h5", weights_file, "--write-manifest", manifest).exit_code == 0
    assert manifest.read_bytes() == text
    r = _extract(root, tmp_path / "p3.h5", weights_file, "--write-manifest", manifest, "--split-seed", 5)
    assert clean_failure(r, "already exists with another split; pass --force") is None, r.output
    assert manifest.read_bytes() == text and not (tmp_path / "p3.h5").exists()


# ---------------------------------------------------------------------------------------------- split folders


def test_train_and_val_folders_take_val_as_test(tmp_path, weights_file):
    root = tmp_path / "imagenet"
    _class_folder(root / "train", per_class=6)
    _class_folder(root / "val", per_class=2, start=50)
    out = tmp_path / "c.h5"
    r = _extract(root, out, weights_file)
    assert r.exit_code == 0, r.output
    assert "split folders train/, val/" in r.output and "train train/ (18 images), test val/ (6)" in r.output, r.output
    cache = open_cache(out)
    assert (len(cache.labels("train")), len(cache.labels("test"))) == (18, 6)
    assert cache.validation_rows() is None and cache.meta.split == {"method": "given", "train": "train/",
                                                                     "test": "val/"}
    r = _extract(root, tmp_path / "d.h5", weights_file, "--test-fraction", 0.3)
    assert clean_failure(r, "--test-fraction applies to a dataset without a test split, and this one has one "
                            "(val/); drop --test-fraction") is None, r.output
    assert not (tmp_path / "d.h5").exists()


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_a_val_folder_beside_test_is_the_validation_split_tuning_uses(tmp_path, weights_file, val_name):
    from fusion_cache.selection import ViewStore, tune_heads

    root = tmp_path / "data"
    _class_folder(root / "train", per_class=6)
    _class_folder(root / val_name, per_class=3, start=50)
    _class_folder(root / "test", per_class=2, start=80)
    out = tmp_path / "c.h5"
    r = _extract(root, out, weights_file)
    assert r.exit_code == 0, r.output
    assert f"validation {val_name}/ (9, cached with train; tuning chooses on it)" in r.output, r.output
    cache = open_cache(out)
    assert (len(cache.labels("train")), len(cache.labels("test"))) == (27, 6)
    rows = cache.validation_rows()
    assert rows is not None and len(rows) == 9 and (cache.indices("train")[rows] >= 18).all()
    run_ = tune_heads(ViewStore(cache), "late", ["knn"], [0, 1], val_fraction=0.5)
    assert [r.val_rows for r in run_] == [9, 9], "tuning did not choose on the given validation split"
    assert "tuning chooses on it" in run("info", out).output
    listed = [line.split("\t")[0] for line in run("info", out, "--items").output.splitlines()]
    assert listed.count("val") == 9 and listed.count("train") == 18 and listed.count("test") == 6


def test_two_folders_for_one_split_are_refused(tmp_path, weights_file):
    root = tmp_path / "data"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "val", per_class=1, start=50)
    _class_folder(root / "validation", per_class=1, start=60)
    r = _extract(root, tmp_path / "c.h5", weights_file)
    assert clean_failure(r, "holds both val/ and validation/ for one split; keep one of them") is None, r.output


# ---------------------------------------------------------------------------------------------- auto's rules


def test_auto_reads_cifar_and_manifests_by_their_rules(tmp_path, cifar_root, weights_file):
    r = _extract(cifar_root, tmp_path / "c.h5", weights_file, "--train-size", 20, "--test-size", 10,
                 "--skip-integrity-check", "--no-download")
    assert r.exit_code == 0, r.output
    assert "CIFAR-10 (cifar-10-batches-py/) (cifar10)" in r.output
    assert open_cache(tmp_path / "c.h5").meta.dataset == "cifar10"
    folder = _class_folder(tmp_path / "imgs", per_class=3)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"imgs/{c}/{i:03d}.png,{c}\n" for c in CLASSES for i in range(3)))
    r = _extract(manifest, tmp_path / "m.h5", weights_file)
    assert r.exit_code == 0, r.output
    assert "a CSV manifest (manifest)" in r.output and "goes to test" in r.output
    assert folder.is_dir()


def _cifar10_never_downloads(monkeypatch):
    import torchvision.datasets

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist; pass a folder of class folders"),
    ("empty", "is empty; pass --dataset cifar10 to download CIFAR-10 into it; the layouts known are cifar10:"),
    ("loose_images", "holds images but no class folders; put each class's images in a folder named after the class"),
    ("text_files", "holds no layout fusion-cache knows; the layouts known are cifar10:"),
    ("a_text_file", "is a file fusion-cache cannot read; the layouts known are"),
    ("split_names_without_train", "holds test/, val/ but no train/; add train/<class>/<image>"),
])
def test_auto_refuses_what_it_cannot_read_in_one_line_and_writes_nothing(tmp_path, weights_file, monkeypatch,
                                                                       case, fragment):
    _cifar10_never_downloads(monkeypatch)
    root = tmp_path / "root"
    if case == "empty":
        root.mkdir()
    elif case == "loose_images":
        _image(root / "a.png", 1)
        _image(root / "b.jpg", 2, fmt="JPEG")
    elif case == "text_files":
        root.mkdir()
        (root / "notes.txt").write_text("hello")
    elif case == "a_text_file":
        root = tmp_path / "notes.txt"
        root.write_text("hello")
    elif case == "split_names_without_train":
        _class_folder(root / "test", per_class=1)
        _class_folder(root / "val", per_class=1)
    before = snapshot(tmp_path)
    r = _extract(root, tmp_path / "c.h5", weights_file)
    assert clean_failure(r, fragment) is None, r.output
    assert r.output.count("\n") == 1
    assert snapshot(tmp_path) == before, "something landed on disk"


def test_an_explicit_cifar10_never_downloads_into_a_folder_of_images(tmp_path, weights_file, monkeypatch):
    _cifar10_never_downloads(monkeypatch)
    root = _class_folder(tmp_path / "photos", per_class=1)
    before = snapshot(root)
    r = _extract(root, tmp_path / "c.h5", weights_file, "--dataset", "cifar10")
    assert clean_failure(r, "which holds other files, so nothing is downloaded into it; drop --dataset") is None
    assert snapshot(root) == before


def test_the_registry_gives_the_cli_its_choices_and_help():
    from fusion_cache.sources import DATASETS

    assert DATASETS == ("auto", *SOURCES)
    text = " ".join(run("extract", "--help").output.split())
    for entry in SOURCES.values():
        assert entry.name in text and entry.layout.split(":")[0][:30] in text
        assert callable(entry.impl.detect) and callable(entry.impl.load) and callable(entry.impl.check_root)


# ---------------------------------------------------------------------------------------------- leaks


def _leaky(root: Path) -> Path:
    _class_folder(root / "train", per_class=4)
    _class_folder(root / "test", per_class=2, start=50)
    shutil.copy(root / "train" / "cat" / "000.png", root / "test" / "cat" / "copy.png")  # a leak
    shutil.copy(root / "train" / "dog" / "001.png", root / "train" / "dog" / "twice.png")  # a duplicate
    shutil.copy(root / "train" / "owl" / "002.png", root / "train" / "cat" / "owl-as-cat.png")  # two labels
    return root


def test_leaks_and_duplicates_are_warned_recorded_and_shown(tmp_path, weights_file):
    root = _leaky(tmp_path / "data")
    out = tmp_path / "c.h5"
    r = _extract(root, out, weights_file)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("Warning:")]
    assert any("1 test image(s) have the same content as a train image" in w and "cat/copy.png = cat/000.png" in w
               for w in warnings), r.output
    assert any("train: 2 extra copies" in w for w in warnings), r.output  # dog/twice.png and cat/owl-as-cat.png
    assert any("1 image content(s) carry two or more labels" in w and "owl-as-cat.png (cat)" in w
               for w in warnings), r.output
    leaks = open_cache(out).meta.leaks
    assert leaks["train_test"] == 1 and leaks["duplicates"] == {"train": 2, "test": 0}
    assert leaks["label_conflicts"] == 1
    assert "1 test image(s) also in train" in run("info", out).output


def test_on_leak_fail_stops_before_writing(tmp_path, weights_file):
    root = _leaky(tmp_path / "data")
    r = _extract(root, tmp_path / "c.h5", weights_file, "--on-leak", "fail")
    assert clean_failure(r, "1 test image(s) have the same content as a train image") is None, r.output
    assert "drop --on-leak fail to extract anyway" in r.output
    assert not (tmp_path / "c.h5").exists()
    clean = _class_folder(tmp_path / "clean" / "train", per_class=2).parent
    _class_folder(clean / "test", per_class=1, start=50)
    assert _extract(clean, tmp_path / "ok.h5", weights_file, "--on-leak", "fail").exit_code == 0


# ---------------------------------------------------------------------------------------------- older caches


def _as_schema_3(path: Path) -> None:
    """Rewrite a fresh cache's attributes as a schema-3 release wrote them: no decode, split or leaks, and the
    fingerprint those settings had then."""
    meta = open_cache(path).meta
    with h5py.File(path, "r+") as f:
        for name in ("decode", "split", "leaks"):
            del f.attrs[name]
        f.attrs["schema_version"] = 3
        f.attrs["fingerprint"] = meta.fingerprint_at(3)
    assert open_cache(path).meta.schema_version == 3


@pytest.mark.parametrize("rotated", [False, True])
def test_an_older_cache_is_reused_only_when_decoding_did_not_change(tmp_path, weights_file, rotated):
    root = tmp_path / "data"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "test", per_class=1, start=50)
    if rotated:  # an EXIF orientation: schema 3 ignored it, schema 4 turns the image upright
        exif = Image.Exif()
        exif[0x0112] = 6
        _image(root / "test" / "cat" / "phone.jpg", 9, fmt="JPEG", exif=exif.tobytes())
    out = tmp_path / "c.h5"
    assert _extract(root, out, weights_file, "--dataset", "imagefolder").exit_code == 0
    _as_schema_3(out)
    before = out.read_bytes()
    r = _extract(root, out, weights_file, "--dataset", "imagefolder")
    if rotated:
        assert clean_failure(r, "exists and was built with other settings; pass --force") is None, r.output
    else:
        assert r.exit_code == 0 and "reused" in r.output, r.output
    assert out.read_bytes() == before
    assert CacheMeta  # the schema the rewrite imitates is the one cache.py reads


# ---------------------------------------------------------------------------------------------- review findings


def test_split_folders_in_any_case_and_their_strays(tmp_path, weights_file):
    root = tmp_path / "data"
    _class_folder(root / "Train", per_class=3)
    _class_folder(root / "TEST", per_class=1, start=50)
    (root / ".ipynb_checkpoints").mkdir()
    _class_folder(root / "__MACOSX" / "train", per_class=1)
    r = _extract(root, tmp_path / "c.h5", weights_file)
    assert r.exit_code == 0 and "split folders Train/, TEST/" in r.output, r.output
    assert open_cache(tmp_path / "c.h5").meta.classes == CLASSES  # not Train/TEST, not the hidden folders
    _class_folder(root / "samples", per_class=1)
    r = _extract(root, tmp_path / "d.h5", weights_file)
    assert clean_failure(r, "and samples/, which is none of them; move samples/ out") is None, r.output
    # a class that happens to be called train, among other classes, is a class
    vehicles = _class_folder(tmp_path / "vehicles", per_class=4, classes=("bus", "car", "train"))
    r = _extract(vehicles, tmp_path / "v.h5", weights_file)
    assert r.exit_code == 0 and open_cache(tmp_path / "v.h5").meta.classes == ("bus", "car", "train"), r.output


def test_a_moved_dataset_reuses_its_auto_split_cache(tmp_path, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=4)
    out = tmp_path / "p.h5"
    assert _extract(root, out, weights_file).exit_code == 0
    moved = tmp_path / "moved"
    root.rename(moved)
    r = _extract(moved, out, weights_file)
    assert r.exit_code == 0 and "reused" in r.output, r.output


def test_copies_of_one_image_never_straddle_the_split_made_for_you(tmp_path, weights_file):
    root = tmp_path / "same"
    for c in ("a", "b"):
        for i in range(3):
            _image(root / c / f"{i}.png", seed=7)  # every image the same bytes
    r = _extract(root, tmp_path / "c.h5", weights_file, "--on-leak", "fail")
    assert "have the same content as a train image" not in r.output, r.output


def test_write_manifest_refusals(tmp_path, cifar_root, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=2)
    out = tmp_path / "c.h5"
    r = _extract(root, out, weights_file, "--write-manifest", out)
    assert clean_failure(r, "--write-manifest and --out name the same file") is None, r.output
    assert not out.exists()
    r = _extract(cifar_root, tmp_path / "x.h5", weights_file, "--train-size", 20, "--test-size", 10,
                 "--skip-integrity-check", "--write-manifest", tmp_path / "x.csv")
    assert clean_failure(r, "--write-manifest lists image files, and cifar10 holds its images as pixels") is None, \
        r.output
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.h5").exists()


def test_a_manifest_split_value_must_be_a_split(tmp_path, weights_file):
    _class_folder(tmp_path / "imgs", per_class=2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"imgs/{c}/{i:03d}.png,{c},{'TRAIN' if i == 0 else 'all'}\n" for c in CLASSES for i in range(2)))
    r = _extract(manifest, tmp_path / "c.h5", weights_file)
    assert clean_failure(r, "has the split 'all'; use train, test or val") is None, r.output


def test_an_older_cache_beside_a_val_folder_finds_its_images_again(tmp_path):
    from fusion_cache.sources import load
    from fusion_cache.split import as_recorded, make_splits

    root = tmp_path / "data"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "val", per_class=1, start=50)
    _class_folder(root / "test", per_class=1, start=80)
    listing = load("imagefolder", root)
    older = as_recorded(listing, {})  # schema 3 read train/ and test/ only
    assert (len(older.train), len(older.test)) == (6, 3) and older.train.identity == listing.given["train"].identity
    now = make_splits(listing)
    assert as_recorded(listing, now.record).train.identity == now.train.identity and len(now.train) == 9


def test_an_older_cache_with_a_fifo_does_not_hang(tmp_path, weights_file):
    import os
    import subprocess
    import sys

    root = tmp_path / "data"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "test", per_class=1, start=50)
    os.mkfifo(root / "train" / "cat" / "pipe.png")
    out = tmp_path / "c.h5"
    args = [sys.executable, "-m", "fusion_cache", "extract", "--data-root", root, "--out", out, "--weights",
            weights_file, "--image-size", SIZE, "--taps", "late", "--no-progress", "--workers", 0,
            "--on-bad-image", "skip"]
    assert subprocess.run([str(a) for a in args], capture_output=True, timeout=120).returncode == 0
    _as_schema_3(out)
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)  # hung before
    assert p.returncode == 0 and "reused" in p.stdout, p.stdout + p.stderr


def test_predict_decodes_new_photos_as_the_cache_decoded_its_own(tmp_path, weights_file):
    """A head fitted on a cache of large JPEGs (decoded reduced) gives, through `predict` on those same files,
    the logits it gives on their cached features: predict reduces them the same way."""
    from fusion_cache.headfile import load_head
    from fusion_cache.predict import build_deployed, predict

    root = tmp_path / "data"
    for c, name in enumerate(("cat", "dog")):
        for i in range(3):
            _image(root / "train" / name / f"{i}.jpg", 10 * c + i, size=(1600, 1200), fmt="JPEG")
            _image(root / "test" / name / f"{i}.jpg", 100 + 10 * c + i, size=(1600, 1200), fmt="JPEG")
    out = tmp_path / "c.h5"
    assert _extract(root, out, weights_file).exit_code == 0
    assert "reduced" in open_cache(out).meta.decode
    head_dir = tmp_path / "head"
    assert run("fit", out, "--features", "late", "--head", "logreg", "--out", head_dir).exit_code == 0
    head = load_head(head_dir)
    files = sorted((root / "test").rglob("*.jpg"))
    results = list(predict(build_deployed(head, str(weights_file)), head, files, progress=False))
    got = {Path(item["path"]).relative_to(root / "test").as_posix(): np.asarray(item["logits"]) for item in results}
    cache = open_cache(out)
    X = (cache.features("features.18", "test") - head.mean) / head.scale
    want = X @ head.coef.T + head.intercept
    for name, logits in zip(cache.item_names("test"), want):
        np.testing.assert_allclose(got[name], logits, rtol=1e-4, atol=1e-4)


def test_the_docs_table_of_layouts_is_the_registry():
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
    start = text.index("| `--dataset` | `--data-root` is |")
    rows = text[start:text.index("\n\n", start)].splitlines()[2:]
    assert [re.match(r"\s*\| `([^`]+)` \|", row)[1] for row in rows] == list(SOURCES)


def test_a_leak_between_files_of_the_same_relative_name_says_which_split_is_which():
    from fusion_cache.leaks import find

    d = "ab" * 32
    record = find({"train": (["a/0.png", "a/1.png"], [d, "cd" * 32], np.array([0, 0])),
                   "test": (["a/0.png"], [d], np.array([0]))}, ["a"])
    assert record["train_test"] == 1 and record["train_test_examples"] == ["test a/0.png = train a/0.png"]
    assert record["duplicates"] == {"train": 0, "test": 0} and record["label_conflicts"] == 0


def test_info_items_on_a_cache_whose_items_were_tampered_with(tmp_path, weights_file):
    root = _class_folder(tmp_path / "photos", per_class=3)
    out = tmp_path / "p.h5"
    assert _extract(root, out, weights_file).exit_code == 0
    with h5py.File(out, "r+") as f:
        del f["train/items/indices"]
        f["train/items"].create_dataset("indices", data=np.arange(2))
    r = run("info", out, "--items")
    assert clean_failure(r, "dataset train/items does not list every cached row; rebuild it") is None, r.output


def test_split_options_on_a_dataset_with_a_test_split_are_refused_before_anything_is_read(tmp_path):
    """Refused in validation: before the weights (here a file that does not exist) are loaded or a file hashed."""
    root = tmp_path / "data"
    _class_folder(root / "train", per_class=2)
    _class_folder(root / "test", per_class=1, start=50)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(f"data/train/{c}/000.png,{c},train\n" for c in CLASSES)
                        + "".join(f"data/test/{c}/050.png,{c},TEST\n" for c in CLASSES))
    missing = tmp_path / "no-such-weights.pth"
    for data_root, flag, where in ((root, "--test-fraction", "test/"), (manifest, "--split-seed", "the test rows"),
                                   (root, "--split-seed", "test/")):
        r = _extract(data_root, tmp_path / "c.h5", missing, flag, "0.3" if flag == "--test-fraction" else "3")
        assert clean_failure(r, f"{flag} applies to a dataset without a test split, and this one has one ({where}); "
                                f"drop {flag}") is None, r.output
