"""`make demo`'s images (scripts/demo_data.py): scikit-learn's bundled digits as a folder of class folders,
written once, never over anything else, and read by `fusion-cache extract` as a folder it splits for you."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from fusion_cache.cache import open_cache

from .conftest import load_script
from .hostile import run, snapshot

ROOT = Path(__file__).parents[1]
DIGITS = load_digits()


demo = load_script("demo_data")


def _build(capsys, out: Path, *more) -> tuple[int, str, str]:
    rc = demo.main([str(out), *map(str, more)])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under `out` (hidden ones too): (inode, mtime_ns), which a rewrite or a replacement changes."""
    found = {}
    for top, _, names in os.walk(out):
        for n in names:
            st = os.stat(os.path.join(top, n))
            found[os.path.relpath(os.path.join(top, n), out)] = (st.st_ino, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """All 1,797 digits at the default 32 px."""
    out = tmp_path_factory.mktemp("demo") / "digits"
    assert demo.main([str(out)]) == 0
    return out


def test_the_folder_holds_every_digit_in_its_class_folder_as_the_source_pixels_enlarged(full):
    classes = sorted(p.name for p in full.iterdir() if p.is_dir())
    assert classes == [str(d) for d in range(10)]
    counts = {c: len(list((full / c).iterdir())) for c in classes}
    assert counts == {str(d): int(n) for d, n in enumerate(np.bincount(DIGITS.target))}
    assert sum(counts.values()) == 1797
    for c in classes:
        for png in (full / c).iterdir():
            i = int(png.stem)  # the name is the image's position in load_digits()
            assert DIGITS.target[i] == int(c), png
            with Image.open(png) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32)), png
                pixels = np.asarray(im)
            # dark ink on white: 0..16 of ink -> 255 - round(255 * ink / 16), each pixel a 4x4 block
            gray = 255 - np.rint(DIGITS.images[i] * 255 / 16)
            expected = np.kron(gray, np.ones((4, 4)))
            assert (pixels == expected[:, :, None]).all(), png


def test_per_class_keeps_the_first_images_of_each_class_at_the_size_asked(tmp_path, capsys):
    out = tmp_path / "small"
    rc, said, err = _build(capsys, out, "--per-class", 3, "--size", 64)
    assert rc == 0 and err == ""
    assert said == f"wrote 30 handwritten digits of 10 classes (64x64 RGB PNG, scikit-learn's load_digits) to {out}\n"
    for d in range(10):
        first = np.flatnonzero(DIGITS.target == d)[:3]
        assert sorted(p.name for p in (out / str(d)).iterdir()) == [f"{i:04d}.png" for i in first]
    with Image.open(out / "0" / "0000.png") as im:
        assert im.size == (64, 64)
        block = np.asarray(im)[:8, 8:16, 0]  # source pixel (0, 1): one 8x8 block
    assert (block == 255 - round(DIGITS.images[0][0, 1] * 255 / 16)).all()


def test_running_again_on_a_complete_folder_writes_nothing_and_says_so(full, capsys):
    before, content = _files(full), snapshot(full)
    rc, said, err = _build(capsys, full)
    assert rc == 0 and err == ""
    assert said == (f"{full} already holds the 1797 handwritten digits of 10 classes (32x32 RGB PNG, scikit-learn's "
                    "load_digits); nothing written\n")
    assert _files(full) == before and snapshot(full) == content


@pytest.mark.parametrize("make, fragment", [
    (lambda d: (d / "notes.txt").write_text("mine"), "holds files this script did not write"),
    (lambda d: ((d / "3").mkdir(), (d / "3" / "0003.png").write_bytes(b"not the demo's")),
     "holds files this script did not write"),
    (lambda d: (d / ".demo-digits.json").write_text("{}"), "holds files this script did not write"),
    (lambda d: (d / ".demo-digits.json").write_text('{"source": "sklearn.datasets.load_digits", "size": 32, '
                                                    '"per_class": null, "files": []}'),
     "holds files this script did not write"),
])
def test_a_folder_it_did_not_write_is_refused_in_one_line_and_left_as_it_was(tmp_path, capsys, make, fragment):
    out = tmp_path / "yours"
    out.mkdir()
    make(out)
    before = snapshot(out)
    rc, said, err = _build(capsys, out)
    assert rc == 1 and said == ""
    assert err.count("\n") == 1 and err.startswith(f"Error: {out} ") and fragment in err, err
    assert snapshot(out) == before


def test_a_file_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "digits"
    out.write_bytes(b"a file")
    rc, said, err = _build(capsys, out)
    assert (rc, said, err) == (1, "", f"Error: {out} is a file; pass a new or empty folder\n")
    assert out.read_bytes() == b"a file"


@pytest.mark.parametrize("change, fragment", [
    (lambda d: (d / "2" / "0002.png").unlink(), "(2/0002.png is missing)"),
    (lambda d: (d / "2" / "0002.png").write_bytes(b"edited"), "(2/0002.png differs)"),
    (lambda d: (d / "7" / "extra.png").write_bytes(b"added"), "(7/extra.png was added)"),
])
def test_its_own_folder_changed_since_is_refused_and_left_as_it_was(tmp_path, capsys, change, fragment):
    out = tmp_path / "digits"
    assert _build(capsys, out, "--per-class", 3)[0] == 0
    change(out)
    before = snapshot(out)
    rc, said, err = _build(capsys, out, "--per-class", 3)
    assert rc == 1 and said == ""
    assert err == f"Error: {out} was changed since it was written {fragment}; remove it and rerun\n"
    assert snapshot(out) == before


def test_its_own_folder_with_other_settings_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "digits"
    assert _build(capsys, out, "--per-class", 3)[0] == 0
    before = snapshot(out)
    rc, said, err = _build(capsys, out, "--per-class", 4)
    assert (rc, said) == (1, "")
    assert err == (f"Error: {out} holds the demo digits written with --size 32 --per-class 3; pass those settings, "
                   "or a new or empty folder\n")
    assert snapshot(out) == before


def test_an_empty_folder_is_written_into(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc, said, _ = _build(capsys, out, "--per-class", 1)
    assert rc == 0 and said.startswith("wrote 10 handwritten digits")
    assert sorted(os.listdir(out)) == [".demo-digits.json"] + [str(d) for d in range(10)]


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    saved = []
    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        demo.main([str(tmp_path / "digits"), "--per-class", "2"])
    assert len(saved) == 5 and os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling


@pytest.mark.parametrize("args, message", [
    (["--size", "30"], "Error: --size must be a multiple of 8 from 8 to 1024, got 30\n"),
    (["--per-class", "0"], "Error: --per-class must be 1 or more, got 0\n"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, args, message):
    assert _build(capsys, tmp_path / "digits", *args) == (1, "", message)
    assert os.listdir(tmp_path) == []


def test_extract_reads_it_as_a_folder_of_class_folders_and_splits_it(tmp_path, capsys):
    root = tmp_path / "digits"
    assert _build(capsys, root, "--per-class", 4)[0] == 0
    out = tmp_path / "digits.h5"
    r = run("extract", "--data-root", root, "--out", out, "--weights", "random", "--image-size", 32,
            "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"{root}: an image folder of 10 class folders (imagefolder); no test split, so one was made" in r.output
    cache = open_cache(out)
    assert cache.meta.dataset == "imagefolder" and cache.meta.split["method"] == "auto"
    assert cache.classes == [str(d) for d in range(10)]
    train, test = cache.labels("train"), cache.labels("test")
    assert len(train) + len(test) == 40
    assert set(train.tolist()) == set(test.tolist()) == set(range(10))  # every class on both sides
    names = cache.item_names("train") + cache.item_names("test")
    assert sorted(names) == sorted(str(p.relative_to(root)) for p in root.glob("*/*.png"))
    for name, label in zip(names, np.concatenate([train, test])):
        assert name.split("/")[0] == str(label)  # each image is labelled by its folder
