"""CIFAR-100 and STL-10 from their release formats, as tiny copies built here in the real on-disk layouts.

CIFAR-100: `cifar-100-python/{train,test,meta}`, Python 2 pickles (byte-string keys, read with latin1, as
torchvision does) of (N, 3072) uint8 rows with fine and coarse labels, or the same files in
`cifar-100-python.tar.gz`. STL-10: `stl10_binary/{train,test}_{X,y}.bin` and `class_names.txt`, each image
stored channel by channel, each channel column by column, labels 1 to 10. Torchvision's own readers are run on
the same files (integrity check aside) as a second opinion on the pixels and labels.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR100, STL10

from fusion_cache import sources
from fusion_cache.cache import open_cache
from fusion_cache.errors import FusionCacheError
from fusion_cache.sources import LoadOptions
from fusion_cache.sources.base import IntegrityWarning

from .hostile import clean_failure, run, snapshot

FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]
STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
SKIP = LoadOptions(download=False, skip_integrity_check=True)


# ---------------------------------------------------------------------------------------------- the formats


def _py2_str(text: str) -> bytes:
    """A Python 2 `str` as cPickle writes it (SHORT_BINSTRING): a byte string, read back as str with latin1."""
    raw = text.encode("latin1")
    return b"U" + bytes([len(raw)]) + raw


def _py2_value(value) -> bytes:
    if isinstance(value, str):
        return _py2_str(value)
    if isinstance(value, list) and value and isinstance(value[0], str):
        return b"](" + b"".join(_py2_str(v) for v in value) + b"e"
    return pickle.dumps(value, protocol=2)[2:-1]  # the value's opcodes, without PROTO and STOP


def _py2_pickle(entries: dict) -> bytes:
    """A dict pickled as the CIFAR release's Python 2 pickles are: byte-string keys (and strings). Each value's
    opcodes are a pickle of their own; the memo slots they reuse are always written before they are read."""
    return b"\x80\x02}(" + b"".join(_py2_str(k) + _py2_value(v) for k, v in entries.items()) + b"u."


def _cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0, tarball: bool = False) -> dict:
    """root/cifar-100-python/ (or root/cifar-100-python.tar.gz alone): image i of a split is of fine class
    i % 100 (shuffled), and fine class c is in superclass c % 20. Returns {split: (images (N, 3, 32, 32), fine
    labels, coarse labels)}."""
    rng = np.random.default_rng(seed)
    build = root / "_build" if tarball else root
    folder = build / "cifar-100-python"
    folder.mkdir(parents=True)
    known = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100)
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        (folder / split).write_bytes(_py2_pickle({
            "filenames": [f"img_{i}.png" for i in range(len(fine))], "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine.tolist(), "coarse_labels": (fine % 20).tolist(), "data": data}))
        known[split] = (data.reshape(-1, 3, 32, 32), fine, fine % 20)
    (folder / "meta").write_bytes(_py2_pickle({"fine_label_names": FINE, "coarse_label_names": COARSE}))
    if tarball:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-100-python")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        build.rmdir()
    return known


def _stl10(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> dict:
    """root/stl10_binary/ with known images: {split: (images (N, 3, 96, 96) as seen, 0-based labels)}. A
    truncated unlabeled_X.bin lies beside them, which nothing may read."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    known = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per))
        images = rng.integers(0, 256, (len(labels), 3, 96, 96), dtype=np.uint8)
        # each channel column by column: the byte after pixel (row h, column w) is (h + 1, w)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        known[split] = (images, labels)
    (folder / "class_names.txt").write_text("".join(f"{c}\n" for c in STL_CLASSES))
    (folder / "unlabeled_X.bin").write_bytes(b"\x00" * 1000)
    return known


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_tiny_cifar100_is_the_release_format_as_torchvision_reads_it(tmp_path, monkeypatch):
    known = _cifar100(tmp_path)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="bytes")
    assert {b"data", b"fine_labels", b"coarse_labels"} <= set(raw)  # byte-string keys, as in the release
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    tv = CIFAR100(str(tmp_path), train=False)
    np.testing.assert_array_equal(tv.data, known["test"][0].transpose(0, 2, 3, 1))
    assert tv.targets == known["test"][1].tolist() and tv.classes == FINE


def test_the_tiny_stl10_is_the_release_format_as_torchvision_reads_it(tmp_path, monkeypatch):
    known = _stl10(tmp_path)
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    tv = STL10(str(tmp_path), split="test")
    np.testing.assert_array_equal(tv.data, known["test"][0])
    np.testing.assert_array_equal(tv.labels, known["test"][1])
    assert tv.classes == STL_CLASSES


# ---------------------------------------------------------------------------------------------- CIFAR-100


def test_cifar100_folder_and_tarball_give_the_known_pixels_and_fine_labels(tmp_path):
    known = _cifar100(tmp_path / "folder")
    _cifar100(tmp_path / "tar", tarball=True)  # the same seed: the same content
    assert [p.name for p in (tmp_path / "tar").iterdir()] == ["cifar-100-python.tar.gz"]
    with pytest.warns(IntegrityWarning):
        a = sources.load("cifar100", tmp_path / "folder", SKIP)
    with pytest.warns(IntegrityWarning):
        b = sources.load("cifar100", tmp_path / "tar", SKIP)
    assert [p.name for p in (tmp_path / "tar").iterdir()] == ["cifar-100-python.tar.gz"]  # nothing unpacked
    for split in ("train", "test"):
        x, y = a.given[split], b.given[split]
        np.testing.assert_array_equal(x.images, known[split][0])
        np.testing.assert_array_equal(x.labels, known[split][1])
        np.testing.assert_array_equal(y.images, x.images)
        np.testing.assert_array_equal(y.labels, x.labels)
        assert x.classes == y.classes == FINE and x.identity == y.identity and x.dataset == "cifar100"
        assert x.images.dtype == np.uint8 and x.labels.dtype == np.int64 and len(x.digests) == len(x)
    assert a.downloadable and a.where == {"train": "train batch", "test": "test batch"}
    assert a.given["train"].identity != a.given["test"].identity


def test_cifar100_coarse_labels_classes_and_identity(tmp_path):
    known = _cifar100(tmp_path)
    warnings.simplefilter("ignore", IntegrityWarning)
    default = sources.load("cifar100", tmp_path, SKIP)
    fine = sources.load("cifar100", tmp_path, LoadOptions(False, True, label_set="fine"))
    coarse = sources.load("cifar100", tmp_path, LoadOptions(False, True, label_set="coarse"))
    for split in ("train", "test"):
        assert default.given[split].identity == fine.given[split].identity  # fine is the default
        np.testing.assert_array_equal(default.given[split].labels, known[split][1])
        np.testing.assert_array_equal(coarse.given[split].labels, known[split][2])
        np.testing.assert_array_equal(coarse.given[split].images, fine.given[split].images)
        assert coarse.given[split].identity != fine.given[split].identity
    assert coarse.given["train"].classes == COARSE and fine.given["train"].classes == FINE


def test_cifar100_identity_holds_the_label_set_even_where_the_labels_agree(tmp_path):
    """Fine labels 0-19 only, each its own superclass: the same label arrays, still two identities."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    labels = list(range(20))
    data = np.zeros((20, 3072), np.uint8)
    for split in ("train", "test"):
        (folder / split).write_bytes(_py2_pickle({"fine_labels": labels, "coarse_labels": labels, "data": data}))
    (folder / "meta").write_bytes(_py2_pickle({"fine_label_names": FINE, "coarse_label_names": COARSE}))
    warnings.simplefilter("ignore", IntegrityWarning)
    fine = sources.load("cifar100", tmp_path, SKIP).given["test"]
    coarse = sources.load("cifar100", tmp_path, LoadOptions(False, True, label_set="coarse")).given["test"]
    np.testing.assert_array_equal(fine.labels, coarse.labels)
    assert fine.identity != coarse.identity


def test_cifar100_checksums_are_torchvisions(tmp_path, monkeypatch):
    _cifar100(tmp_path / "d")
    folder = tmp_path / "d" / "cifar-100-python"
    with pytest.raises(FusionCacheError) as e:
        sources.load("cifar100", tmp_path / "d", LoadOptions(download=False))
    assert str(e.value) == (f"{folder / 'train'} does not match the official CIFAR-100 checksum; if you trust this "
                            "local copy, pass --skip-integrity-check, otherwise delete it and re-download")
    with pytest.warns(IntegrityWarning, match="using the local CIFAR-100 copy .* checksums differ"):
        listing = sources.load("cifar100", tmp_path / "d", SKIP)
    assert listing.given["train"].notes and listing.given["test"].notes
    # the md5s of this copy as torchvision's: accepted, with no warning and no note
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", dict(CIFAR100.meta, md5=_md5(folder / "meta")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        listing = sources.load("cifar100", tmp_path / "d", LoadOptions(download=False))
    assert not listing.given["train"].notes and not listing.given["test"].notes
    _cifar100(tmp_path / "t", tarball=True)
    tarball = tmp_path / "t" / "cifar-100-python.tar.gz"
    with pytest.raises(FusionCacheError, match=f"^{tarball} does not match the official CIFAR-100 checksum"):
        sources.load("cifar100", tarball, LoadOptions(download=False))


# ---------------------------------------------------------------------------------------------- STL-10


def test_stl10_pixels_labels_and_classes_are_the_known_ones(tmp_path):
    known = _stl10(tmp_path)
    assert not np.array_equal(known["train"][0], known["train"][0].transpose(0, 1, 3, 2))
    with pytest.warns(IntegrityWarning):
        listing = sources.load("stl10", tmp_path, SKIP)
    for split in ("train", "test"):
        src = listing.given[split]
        np.testing.assert_array_equal(src.images, known[split][0])  # rows as rows: the columns transposed
        np.testing.assert_array_equal(src.labels, known[split][1])  # 0-based
        assert src.labels.min() == 0 and src.labels.max() == 9 and src.labels.dtype == np.int64
        assert src.classes == STL_CLASSES and src.images.flags.c_contiguous and src.dataset == "stl10"
    assert listing.where == {"train": "train_X.bin", "test": "test_X.bin"} and listing.downloadable
    with pytest.warns(IntegrityWarning):
        inner = sources.load("stl10", tmp_path / "stl10_binary", SKIP)  # --data-root at the folder itself
    assert inner.given["test"].identity == listing.given["test"].identity


def test_stl10_checksums_are_torchvisions(tmp_path, monkeypatch):
    _stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    with pytest.raises(FusionCacheError) as e:
        sources.load("stl10", tmp_path, LoadOptions(download=False))
    assert str(e.value) == (f"{folder / 'train_X.bin'} does not match the official STL-10 checksum; if you trust "
                            "this local copy, pass --skip-integrity-check, otherwise delete it and re-download")
    with pytest.warns(IntegrityWarning, match=f"using the local STL-10 copy {folder} although"):
        assert sources.load("stl10", tmp_path, SKIP).given["test"].notes
    md5 = {n: _md5(folder / n) for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")}
    monkeypatch.setattr(STL10, "train_list", [[n, md5[n]] for n in ("train_X.bin", "train_y.bin")]
                        + [["unlabeled_X.bin", "0" * 32]])
    monkeypatch.setattr(STL10, "test_list", [[n, md5[n]] for n in ("test_X.bin", "test_y.bin")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        listing = sources.load("stl10", tmp_path, LoadOptions(download=False))
    assert not listing.given["train"].notes and not listing.given["test"].notes
    (folder / "test_y.bin").write_bytes(bytes(reversed((folder / "test_y.bin").read_bytes())))  # labels changed
    with pytest.raises(FusionCacheError, match="test_y.bin does not match the official STL-10 checksum"):
        sources.load("stl10", tmp_path, LoadOptions(download=False))


# ---------------------------------------------------------------------------------------------- auto and downloads


def test_auto_detects_each_layout(tmp_path):
    _cifar100(tmp_path / "c")
    _cifar100(tmp_path / "t", tarball=True)
    _stl10(tmp_path / "s")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stl10_binary.tar.gz").write_bytes(b"not read")
    cases = {
        tmp_path / "c": ("cifar100", "CIFAR-100 (cifar-100-python/)"),
        tmp_path / "c" / "cifar-100-python": ("cifar100", "CIFAR-100 (cifar-100-python/)"),
        tmp_path / "t": ("cifar100", "CIFAR-100 (cifar-100-python.tar.gz)"),
        tmp_path / "t" / "cifar-100-python.tar.gz": ("cifar100", "CIFAR-100 (cifar-100-python.tar.gz)"),
        tmp_path / "s": ("stl10", "STL-10 (stl10_binary/)"),
        tmp_path / "s" / "stl10_binary": ("stl10", "STL-10 (stl10_binary/)"),
        tmp_path / "a": ("stl10", "STL-10 (stl10_binary.tar.gz)"),
        tmp_path / "a" / "stl10_binary.tar.gz": ("stl10", "STL-10 (stl10_binary.tar.gz)"),
    }
    for root, expected in cases.items():
        assert sources.detect(root) == expected, root
    assert sources.test_split("auto", tmp_path / "c") == "test batch"
    assert sources.test_split("auto", tmp_path / "s") == "test_X.bin"
    with pytest.raises(FusionCacheError) as e:  # the archive alone: detected, and not read
        sources.load("stl10", tmp_path / "a" / "stl10_binary.tar.gz", SKIP)
    assert str(e.value) == (f"{tmp_path / 'a'} holds stl10_binary.tar.gz but not stl10_binary/, and the archive is "
                            "not read as it is; extract it there (tar xzf stl10_binary.tar.gz) and run again")


def test_downloads_go_only_into_a_missing_or_empty_folder_named_explicitly(tmp_path, monkeypatch):
    calls = []

    def fake_cifar100_download(self):
        calls.append(("cifar100", self.root))
        _cifar100(Path(self.root))  # torchvision downloads the tarball and extracts it

    def fake_archive(url, root, filename=None, md5=None):
        calls.append(("stl10", url, root, filename, md5))
        _stl10(Path(root))
        (Path(root) / filename).write_bytes(b"the archive")

    monkeypatch.setattr(CIFAR100, "download", fake_cifar100_download)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr("fusion_cache.sources.stl10.download_and_extract_archive", fake_archive)
    for name in ("cifar100", "stl10"):
        other = tmp_path / f"other-{name}"
        other.mkdir()
        (other / "notes.txt").write_text("mine")
        with pytest.raises(FusionCacheError, match="which holds other files, so nothing is downloaded into it"):
            sources.load(name, other, SKIP)
        with pytest.raises(FusionCacheError, match="not found under .*; drop --no-download"):
            sources.load(name, tmp_path / f"none-{name}", SKIP)
        (tmp_path / f"empty-{name}").mkdir()
        with pytest.raises(FusionCacheError, match="is empty; pass --dataset cifar10"):  # auto never downloads
            sources.detect(tmp_path / f"empty-{name}")
    assert calls == []
    with pytest.warns(IntegrityWarning):
        c = sources.load("cifar100", tmp_path / "new-c", LoadOptions(skip_integrity_check=True))
    with pytest.warns(IntegrityWarning):
        s = sources.load("stl10", tmp_path / "empty-stl10", LoadOptions(skip_integrity_check=True))
    assert calls == [("cifar100", str(tmp_path / "new-c")),
                     ("stl10", STL10.url, str(tmp_path / "empty-stl10"), STL10.filename, STL10.tgz_md5)]
    kept = tmp_path / "kept"  # a repository's data/ with only its .gitkeep: downloaded into, the file kept
    kept.mkdir()
    (kept / ".gitkeep").write_text("")
    with pytest.warns(IntegrityWarning):
        sources.load("cifar100", kept, LoadOptions(skip_integrity_check=True))
    assert calls[-1] == ("cifar100", str(kept)) and (kept / ".gitkeep").read_text() == ""
    assert len(c.given["train"]) == 200 and len(s.given["test"]) == 10


def test_a_failed_download_says_what_to_put_there_by_hand(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR100, "download", offline)
    monkeypatch.setattr("fusion_cache.sources.stl10.download_and_extract_archive", offline)
    with pytest.raises(FusionCacheError) as e:
        sources.load("cifar100", tmp_path / "c", LoadOptions())
    assert str(e.value) == (f"could not download CIFAR-100 into {tmp_path / 'c'}/ (OSError: network unreachable); "
                            "put cifar-100-python.tar.gz there by hand and pass --no-download")
    with pytest.raises(FusionCacheError) as e:
        sources.load("stl10", tmp_path / "s", LoadOptions())
    assert str(e.value) == (f"could not download STL-10 into {tmp_path / 's'}/ (OSError: network unreachable); "
                            "put stl10_binary/ (tar xzf stl10_binary.tar.gz) there by hand and pass --no-download")


# ---------------------------------------------------------------------------------------------- the command


def _extract(root: Path, out: Path, *more):
    return run("extract", "--data-root", root, "--out", out, "--weights", "random", "--image-size", 32,
               "--taps", "late", "--no-progress", "--no-download", "--skip-integrity-check", *more)


def test_cli_extract_cifar100_fine_and_coarse(tmp_path):
    _cifar100(tmp_path / "data", n_train=20, n_test=20)
    r = _extract(tmp_path / "data", tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    assert "CIFAR-100 (cifar-100-python/) (cifar100)" in r.output  # auto; every image by default
    cache = open_cache(tmp_path / "f.h5")
    assert cache.meta.dataset == "cifar100" and list(cache.meta.classes) == FINE
    assert (cache.meta.train_size, cache.meta.test_size) == (20, 20)
    assert cache.features("features.18", "train").shape[0] == 20
    r = _extract(tmp_path / "data", tmp_path / "f.h5", "--label-set", "fine")
    assert r.exit_code == 0 and "reused" in r.output, r.output
    r = _extract(tmp_path / "data", tmp_path / "f.h5", "--label-set", "coarse")
    assert clean_failure(r, "was built with other settings") is None, r.output  # never reused for coarse
    r = _extract(tmp_path / "data", tmp_path / "c.h5", "--label-set", "coarse", "--dataset", "cifar100")
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "c.h5")
    assert list(cache.meta.classes) == COARSE and cache.meta.test_size == 20
    assert sorted(set(cache.labels("test").tolist())) == list(range(20))


def test_cli_extract_stl10(tmp_path):
    known = _stl10(tmp_path / "data")
    r = _extract(tmp_path / "data", tmp_path / "s.h5")
    assert r.exit_code == 0, r.output
    assert "STL-10 (stl10_binary/) (stl10)" in r.output
    cache = open_cache(tmp_path / "s.h5")
    assert cache.meta.dataset == "stl10" and list(cache.meta.classes) == STL_CLASSES
    assert (cache.meta.train_size, cache.meta.test_size) == (20, 10) and not cache.meta.integrity_checked
    assert cache.features("features.18", "test").shape[0] == 10
    assert sorted(cache.labels("test").tolist()) == sorted(known["test"][1].tolist())
    before = snapshot(tmp_path / "data")
    r = _extract(tmp_path / "data", tmp_path / "x.h5", "--label-set", "coarse")
    assert clean_failure(r, "Error: --label-set applies to --dataset cifar100, and this --data-root is stl10; "
                            "drop --label-set") is None, r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "x.h5").exists() and snapshot(tmp_path / "data") == before


# ---------------------------------------------------------------------------------------------- malformed files


def _cifar100_broken(root: Path, case: str) -> None:
    _cifar100(root)
    folder = root / "cifar-100-python"
    if case == "no_meta":
        (folder / "meta").unlink()
    elif case == "truncated":
        (folder / "train").write_bytes((folder / "train").read_bytes()[:5000])
    elif case == "no_coarse_labels":
        (folder / "test").write_bytes(_py2_pickle({"fine_labels": [0], "data": np.zeros((1, 3072), np.uint8)}))
    elif case == "no_coarse_names":
        (folder / "meta").write_bytes(_py2_pickle({"fine_label_names": FINE}))
    elif case == "label_out_of_range":
        (folder / "test").write_bytes(_py2_pickle({"fine_labels": [100], "coarse_labels": [0],
                                                   "data": np.zeros((1, 3072), np.uint8)}))
    elif case == "not_a_dict":
        (folder / "test").write_bytes(pickle.dumps([1, 2], protocol=2))
    elif case == "a_file":
        (root / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b not really")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


@pytest.mark.parametrize("case, more, fragment", [
    ("no_meta", (), "cifar-100-python/meta is missing; restore it, or delete"),
    ("truncated", (), "cifar-100-python/train is truncated or corrupt (UnpicklingError); delete it and download "
                      "CIFAR-100 again"),
    ("no_coarse_labels", ("--label-set", "coarse"), "cifar-100-python/test is not a CIFAR-100 batch (KeyError: "
                                                    "'coarse_labels'); delete it and re-download"),
    ("no_coarse_names", ("--label-set", "coarse"), "cifar-100-python/meta holds no class names "
                                                   "(coarse_label_names); delete it and re-download"),
    ("label_out_of_range", (), "cifar-100-python/test is corrupt (1 images, 1 labels)"),
    ("not_a_dict", (), "cifar-100-python/test is not a CIFAR-100 pickle"),
    ("a_file", (), "cifar-100-python.tar.gz is truncated or corrupt"),
])
def test_malformed_cifar100_is_one_line(tmp_path, case, more, fragment):
    _cifar100_broken(tmp_path / "data", case)
    r = _extract(tmp_path / "data", tmp_path / "c.h5", "--dataset", "cifar100", *more)
    assert clean_failure(r, fragment) is None, r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "c.h5").exists()


def _stl10_broken(root: Path, case: str) -> None:
    _stl10(root)
    folder = root / "stl10_binary"
    if case == "truncated":
        (folder / "test_X.bin").write_bytes((folder / "test_X.bin").read_bytes()[:-100])
    elif case == "empty":
        (folder / "train_X.bin").write_bytes(b"")
    elif case == "counts_differ":
        (folder / "test_y.bin").write_bytes((folder / "test_y.bin").read_bytes()[:-1])
    elif case in ("label_zero", "label_eleven"):
        y = bytearray((folder / "train_y.bin").read_bytes())
        y[3] = 0 if case == "label_zero" else 11
        (folder / "train_y.bin").write_bytes(bytes(y))
    elif case == "no_class_names":
        (folder / "class_names.txt").unlink()
    elif case == "blank_class_name":
        (folder / "class_names.txt").write_text("airplane\n\nbird\n")
    elif case == "no_test_y":
        (folder / "test_y.bin").unlink()


@pytest.mark.parametrize("case, fragment", [
    ("truncated", "test_X.bin is truncated (276380 bytes, not a whole number of 96 x 96 images of 27648 bytes); "
                  "delete it and re-download"),
    ("empty", "train_X.bin is truncated (0 bytes"),
    ("counts_differ", "test_y.bin holds 9 labels for the 10 images of test_X.bin; delete both and re-download"),
    ("label_zero", "train_y.bin holds label 0, and the labels are 1 to 10, one per class in class_names.txt"),
    ("label_eleven", "train_y.bin holds label 11, and the labels are 1 to 10"),
    ("no_class_names", "stl10_binary/class_names.txt is missing; restore it, or delete"),
    ("blank_class_name", "class_names.txt does not list the class names one a line"),
    ("no_test_y", "stl10_binary/test_y.bin is missing; restore it"),
])
def test_malformed_stl10_is_one_line(tmp_path, case, fragment):
    _stl10_broken(tmp_path / "data", case)
    r = _extract(tmp_path / "data", tmp_path / "s.h5", "--dataset", "stl10")
    assert clean_failure(r, fragment) is None, r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("name", ["cifar100", "stl10"])
def test_a_file_where_a_folder_is_needed_fails_fast(tmp_path, name):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(FusionCacheError) as e:
        sources.check_root(name, f)
    assert str(e.value) == (f"--data-root {f} is a file; --dataset {name} reads a folder: pass a folder, or "
                            "--dataset manifest for a CSV list of images")


def test_a_tarball_member_of_the_same_name_in_another_folder_is_never_read(tmp_path):
    """Only cifar-100-python/<name> is the release's file: a stray zzz/train after it changes nothing."""
    import gzip
    import io

    known = _cifar100(tmp_path / "r", tarball=True)
    tarball = tmp_path / "r" / "cifar-100-python.tar.gz"
    with tarfile.open(tarball, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, blob in members:
            tar.addfile(m, io.BytesIO(blob) if blob is not None else None)
        stray = tarfile.TarInfo("zzz/train")
        stray.size = 5
        tar.addfile(stray, io.BytesIO(b"junk!"))
    tarball.write_bytes(gzip.compress(buf.getvalue()))
    with pytest.warns(IntegrityWarning):
        got = sources.load("cifar100", tmp_path / "r", SKIP).given["train"]
    np.testing.assert_array_equal(got.images, known["train"][0])
