"""Hostile image folders through `fusion-cache extract` (issue 10, sections 3 and 4, the data side).

Every case is a small image folder with one hostile entry in train/cats/. A case either extracts (the entry
is counted as the case says, or left out when it is a duplicate or a loop), or fails with one `Error:` line
naming the file and the fix, writing nothing, and with `--on-bad-image skip` is skipped and listed in the
cache. Anything that could hang runs under a SIGALRM deadline, and the FIFO cases in a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fusion_cache.cache import lock_path, open_cache, partial_path
from fusion_cache.decode import BadImage, read_image
from fusion_cache.files import list_image_files
from fusion_cache.sources.imagefolder import load_image_folder
from fusion_cache.errors import FusionCacheError
from fusion_cache.synthetic import write_image_folder

from .hostile import clean_failure, denials, deny, run, snapshot  # noqa: F401 (denials: a fixture)

DEADLINE_S = 120  # generous on a shared 2-core machine; a case takes a few seconds
TRAIN = 9  # write_image_folder(n_train=2, n_test=1): 3 classes x (2 images + one 16-bit image)


class Hung(BaseException):
    """Raised by the deadline alarm; a BaseException so that no `except Exception` swallows it."""


@pytest.fixture(autouse=True)
def deadline():
    def fire(signum, frame):
        raise Hung(f"the test ran past {DEADLINE_S} s (a hang?)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the working folder (so stray files show in its snapshot), with a small image folder."""
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "data", n_train=2, n_test=1)
    return tmp_path, root


def _extract(root, weights, out, *extra):
    return run("extract", "--dataset", "imagefolder", "--data-root", root, "--weights", weights, "--train-size", "all",
               "--test-size", "all", "--image-size", 32, "--workers", 0, "--no-progress", "--out", out, *extra)


def _meta(out: Path):
    """The cache's typed attributes (train_size, skipped, fingerprint, classes)."""
    return open_cache(out).meta


def _printable(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _png(path: Path, width: int, height: int) -> Path:
    """A 1-bit grayscale PNG of zeros written row by row through zlib: a few hundred KB whatever its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _image(path, size=(8, 8), value=128):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _cats(root: Path) -> Path:
    return root / "train" / "cats"


def _bytes_name(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


# -------------------------------------------------------------------------- the corpus
# Each builder mutates the folder and returns ("ok", train images), ("bad", file named in the error and in
# the skipped list), or ("error", fragment of an error that no option turns into a skip).


def symlink_loop_to_parent(tmp, root):
    os.symlink("..", _cats(root) / "loop")
    return "ok", TRAIN


def symlink_loop_to_itself(tmp, root):
    os.symlink(".", _cats(root) / "self")
    return "ok", TRAIN


def dir_link_to_dataset_root(tmp, root):
    os.symlink("../../..", _cats(root) / "up")
    return "ok", TRAIN


def dir_link_to_other_class(tmp, root):
    os.symlink("../dogs", _cats(root) / "dogs_too")
    return "ok", TRAIN


def dir_link_to_outside_folder(tmp, root):
    outside = tmp / "outside_dir"
    outside.mkdir()
    _image(outside / "a.png")
    _image(outside / "b.png", value=30)
    os.symlink("..", outside / "back")  # a loop inside the followed folder
    os.symlink(outside, _cats(root) / "more")
    return "ok", TRAIN + 2


def file_link_to_other_class(tmp, root):
    os.symlink("../dogs/000.png", _cats(root) / "borrowed.png")
    return "ok", TRAIN


def duplicate_link_same_class(tmp, root):
    os.symlink("001.png", _cats(root) / "000_dup.png")  # sorts before the file it names
    os.symlink("001.png", _cats(root) / "zzz_dup.png")
    return "ok", TRAIN


def file_link_outside(tmp, root):
    target = _image(tmp / "outside.png")
    os.symlink(target, _cats(root) / "ext.png")
    os.symlink(target, _cats(root) / "ext_again.png")  # two links to one file: counted once
    return "ok", TRAIN + 1


def one_pixel(tmp, root):
    _image(_cats(root) / "tiny.png", size=(1, 1))
    return "ok", TRAIN + 1


def aspect_50(tmp, root):
    _image(_cats(root) / "strip.png", size=(100, 2))  # exactly at the limit: accepted
    return "ok", TRAIN + 1


def folder_named_like_image(tmp, root):
    (_cats(root) / "empty.png").mkdir()
    (_cats(root) / "full.png").mkdir()
    _image(_cats(root) / "full.png" / "inner.jpg")
    return "ok", TRAIN + 1


def non_utf8_name(tmp, root):
    _image(_bytes_name(_cats(root), b"caf\xe9.png"))
    return "ok", TRAIN + 1


def broken_link(tmp, root):
    os.symlink("nowhere.png", _cats(root) / "broken.png")
    return "bad", "cats/broken.png"


def link_loop_file(tmp, root):
    os.symlink("loop.png", _cats(root) / "loop.png")
    return "bad", "cats/loop.png"


def link_to_dev_zero(tmp, root):
    os.symlink("/dev/zero", _cats(root) / "zeros.png")  # hashing it would read forever
    return "bad", "cats/zeros.png"


def unix_socket(tmp, root):
    cwd = os.getcwd()
    os.chdir(_cats(root))  # a relative name: AF_UNIX paths are limited to 107 bytes
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind("sock.png")
        s.close()
    finally:
        os.chdir(cwd)
    return "bad", "cats/sock.png"


def device_file(tmp, root):
    try:
        os.mknod(_cats(root) / "dev.png", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # like /dev/zero
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device file here ({e})")
    return "bad", "cats/dev.png"


def non_utf8_bad_name(tmp, root):
    _bytes_name(_cats(root), b"bad\xff.png").write_bytes(b"")
    return "bad", "cats/bad\\xff.png"


def newline_in_name(tmp, root):
    (_cats(root) / "two\nlines.png").write_bytes(b"not an image")
    return "bad", "cats/two\\x0alines.png"


def zero_bytes(tmp, root):
    (_cats(root) / "zero.png").write_bytes(b"")
    return "bad", "cats/zero.png"


def text_named_png(tmp, root):
    (_cats(root) / "notes.png").write_text("hello")
    return "bad", "cats/notes.png"


def apple_double(tmp, root):
    (_cats(root) / "._000.png").write_bytes(b"\x00\x05\x16\x07" + b"\0" * 80)
    return "bad", "cats/._000.png"


def header_only_png(tmp, root):
    full = _png(tmp / "h.png", 100, 100).read_bytes()
    (_cats(root) / "header.png").write_bytes(full[:33])  # signature + IHDR, no pixel data
    return "bad", "cats/header.png"


def bomb_30000(tmp, root):
    _png(_cats(root) / "bomb.png", 30000, 30000)
    return "bad", "cats/bomb.png"


def bomb_70_megapixels(tmp, root):
    _png(_cats(root) / "big.png", 10000, 7000)  # under PIL's own limit, over ours: refused before decoding
    return "bad", "cats/big.png"


def wide_strip(tmp, root):
    _image(_cats(root) / "wide.png", size=(3000, 1))
    return "bad", "cats/wide.png"


def tall_strip(tmp, root):
    _image(_cats(root) / "tall.png", size=(1, 3000))
    return "bad", "cats/tall.png"


def unreadable_file(tmp, root):
    deny(_image(_cats(root) / "locked.png"))  # as root, opening it is made to fail
    return "bad", "cats/locked.png"


def unreadable_folder(tmp, root):
    d = _cats(root) / "locked"
    d.mkdir()
    _image(d / "x.png")
    deny(d)  # as root, listing it is made to fail
    return "error", f"cannot read folder {d} (permission denied); fix its permissions or remove it"


def class_link_to_other_class(tmp, root):
    for split in ("train", "test"):
        os.symlink("cats", root / split / "kittens")
    return "error", "kittens is a link"


def class_link_loop(tmp, root):
    for split in ("train", "test"):
        os.symlink(".", root / split / "all")
    return "error", "all is a link"


CASES = [
    symlink_loop_to_parent, symlink_loop_to_itself, dir_link_to_dataset_root, dir_link_to_other_class,
    dir_link_to_outside_folder, file_link_to_other_class, duplicate_link_same_class, file_link_outside,
    one_pixel, aspect_50, folder_named_like_image, non_utf8_name,
    broken_link, link_loop_file, link_to_dev_zero, unix_socket, device_file, non_utf8_bad_name, newline_in_name,
    zero_bytes, text_named_png, apple_double, header_only_png, bomb_30000, bomb_70_megapixels, wide_strip,
    tall_strip, unreadable_file, unreadable_folder, class_link_to_other_class, class_link_loop,
]


def _nothing_written(out: Path, before: dict, tmp: Path) -> None:
    assert not out.exists() and not partial_path(out).exists() and not lock_path(out).exists()
    assert snapshot(tmp) == before, "the failed run changed files"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_folder(work, weights_file, denials, case):
    tmp, root = work
    kind, expect = case(tmp, root)
    out = tmp / "c.h5"
    before = snapshot(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _extract(root, weights_file, out)
    assert _printable(r.output), r.output
    assert not [w for w in caught if "Image" in str(w.message) or "tensor" in str(w.message)], caught
    if kind == "ok":
        assert r.exit_code == 0, r.output
        assert r.output.count("\n") == 1 and "Warning" not in r.output, r.output
        assert _meta(out).train_size == expect
        assert not _meta(out).skipped
        out.unlink()
        assert snapshot(tmp) == before
        return
    if kind == "error":
        assert clean_failure(r, expect) is None, clean_failure(r, expect)
        _nothing_written(out, before, tmp)
        r = _extract(root, weights_file, out, "--on-bad-image", "skip")
        assert clean_failure(r, expect) is None, clean_failure(r, expect)
        _nothing_written(out, before, tmp)
        return
    name = expect
    problem = clean_failure(r, f"cannot read image {name}: ")
    assert problem is None, problem
    assert "--on-bad-image skip" in r.output and r.output.count("\n") == 1, r.output
    _nothing_written(out, before, tmp)

    r = _extract(root, weights_file, out, "--on-bad-image", "skip")
    assert r.exit_code == 0, r.output
    assert _printable(r.output) and "Warning" not in r.output and "Traceback" not in r.output, r.output
    assert f"skipped unreadable train image: {name}\n" in r.output, r.output
    m = _meta(out)
    assert m.skipped == {"train": [name]} and m.train_size == TRAIN
    out.unlink()
    assert snapshot(tmp) == before, "the skip run changed the data"


def test_name_with_colon_space_is_listed_whole(work, weights_file):
    tmp, root = work
    (_cats(root) / "a: b.png").write_bytes(b"")
    r = _extract(root, weights_file, tmp / "c.h5", "--on-bad-image", "skip")
    assert r.exit_code == 0, r.output
    assert _meta(tmp / "c.h5").skipped == {"train": ["cats/a: b.png"]}


# -------------------------------------------------------------------------- FIFOs, in a subprocess


def _cli(*args, timeout=300):
    code = "import sys; from fusion_cache.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_fifo_is_a_bad_image_not_a_hang(tmp_path, weights_file):
    """Opening a FIFO for reading blocks until a writer comes: the subprocess and its timeout catch a hang."""
    root = write_image_folder(tmp_path / "data", n_train=2, n_test=1)
    os.mkfifo(_cats(root) / "pipe.png")
    os.mkfifo(root / "test" / "dogs" / "pipe2.jpg")
    before = snapshot(tmp_path)
    base = ["extract", "--dataset", "imagefolder", "--data-root", root, "--weights", weights_file,
            "--train-size", "all", "--test-size", "all", "--image-size", 32, "--workers", 0, "--no-progress"]
    out = tmp_path / "c.h5"
    p = _cli(*base, "--out", out)
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and errors[0].startswith("Error: cannot read image cats/pipe.png: "), p.stderr
    _nothing_written(out, before, tmp_path)
    p = _cli(*base, "--out", out, "--on-bad-image", "skip")
    assert p.returncode == 0, p.stderr
    assert "skipped unreadable train image: cats/pipe.png" in p.stderr
    assert "skipped unreadable test image: dogs/pipe2.jpg" in p.stderr
    assert _meta(out).skipped == {"train": ["cats/pipe.png"], "test": ["dogs/pipe2.jpg"]}


def test_non_utf8_names_print_on_a_real_stream(tmp_path, weights_file):
    """A pipe with strict UTF-8, as a terminal has: a surrogate in a printed name would crash the print."""
    root = write_image_folder(tmp_path / "data", n_train=2, n_test=1)
    _bytes_name(_cats(root), b"caf\xe9.png").write_bytes(b"")
    base = ["extract", "--dataset", "imagefolder", "--data-root", root, "--weights", weights_file,
            "--train-size", "all", "--test-size", "all", "--image-size", 32, "--workers", 0, "--no-progress"]
    p = _cli(*base, "--out", tmp_path / "c.h5")
    assert p.returncode == 1 and p.stderr.startswith("Error: cannot read image cats/caf\\xe9.png: "), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr


def test_read_image_never_blocks_on_a_fifo(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(BadImage, match="FIFO"):
        read_image(fifo)


# -------------------------------------------------------------------------- shapes and warnings


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding a raster fails the test: what is refused must be refused from the header alone."""
    def load(self):
        raise AssertionError(f"decoded a {self.size} raster")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_bomb_is_refused_before_decoding(tmp_path, no_decoding):
    with pytest.raises(BadImage, match="megapixel"):
        read_image(_png(tmp_path / "bomb.png", 30000, 30000))
    with pytest.raises(BadImage, match="10000x7000"):
        read_image(_png(tmp_path / "big.png", 10000, 7000))


@pytest.mark.parametrize("size", [(200000, 1), (1, 200000), (5100, 100)])
def test_extreme_aspect_is_refused_before_decoding(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("L", size).save(path)
    with pytest.raises(BadImage, match=f"{size[0]}x{size[1]}"):
        read_image(path)


def test_one_by_one_reads(tmp_path):
    assert read_image(_image(tmp_path / "dot.png", size=(1, 1))).shape == (3, 1, 1)


def test_pil_bomb_warning_becomes_a_bad_image_not_a_printed_warning(work, weights_file, monkeypatch):
    tmp, root = work
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above 1000 pixels, errors above 2000
    _image(_cats(root) / "000.png", size=(40, 40))  # 1600 pixels: PIL's warning, not its error
    with pytest.raises(BadImage, match="megapixel"):
        read_image(_cats(root) / "000.png")
    before = snapshot(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _extract(root, weights_file, tmp / "c.h5")
    assert clean_failure(r, "cannot read image cats/000.png") is None, clean_failure(r, "cannot read image")
    assert "Warning" not in r.output and "DecompressionBomb" not in r.output, r.output
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    _nothing_written(tmp / "c.h5", before, tmp)


# -------------------------------------------------------------------------- identity and order


def test_same_size_pixel_rewrite_changes_the_fingerprint(work, weights_file):
    tmp, root = work
    bmp = _cats(root) / "flat.bmp"  # uncompressed: the size depends on the dimensions only
    _image(bmp, size=(16, 16), value=10)
    out = tmp / "c.h5"
    r = _extract(root, weights_file, out)
    assert r.exit_code == 0 and r.output.startswith("wrote"), r.output
    first = _meta(out).fingerprint
    r = _extract(root, weights_file, out)
    assert r.exit_code == 0 and r.output.startswith("reused"), r.output  # nothing changed: reused

    st = bmp.stat()
    size = st.st_size
    _image(bmp, size=(16, 16), value=240)
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the pixels differ
    assert bmp.stat().st_size == size and bmp.stat().st_mtime_ns == st.st_mtime_ns
    r = _extract(root, weights_file, out)
    assert clean_failure(r, "built with other settings") is None, clean_failure(r, "built with other settings")
    r = _extract(root, weights_file, out, "--force")
    assert r.exit_code == 0 and r.output.startswith("wrote"), r.output
    assert _meta(out).fingerprint != first


def test_identity_covers_content_label_and_name(tmp_path):
    root = write_image_folder(tmp_path / "d", n_train=2, n_test=1)
    base = load_image_folder(root, "train").identity
    assert load_image_folder(root, "train").identity == base  # deterministic
    p = _cats(root) / "001.png"
    data = bytearray(p.read_bytes())
    data[-20] ^= 1  # one bit of the last chunk before IEND, same size
    p.write_bytes(bytes(data))
    changed = load_image_folder(root, "train").identity
    assert changed != base
    os.rename(p, _cats(root) / "002.png")
    assert load_image_folder(root, "train").identity != changed


def test_order_matches_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_image_folder(tmp_path / "d", n_train=3, n_test=1)
    for sub in ["a b", "a", "a/b", "A", "z-", "a.b", "a/b/c"]:
        d = _cats(root) / sub
        d.mkdir(parents=True, exist_ok=True)
        _image(d / "X.PNG")
        _image(d / "x.jpg")
    _image(_cats(root) / "Ab.Jpeg")
    (_cats(root) / "readme.txt").write_text("not an image")
    src = load_image_folder(root, "train")
    ds = ImageFolder(str(root / "train"))
    assert src.classes == ds.classes
    assert src.paths == [os.path.relpath(p, root / "train") for p, _ in ds.samples]
    assert src.labels.tolist() == ds.targets


def test_non_utf8_class_folder(work, weights_file):
    tmp, root = work
    for split in ("train", "test"):
        d = _bytes_name(root / split, b"ch\xe2t")
        d.mkdir()
        _image(d / "a.png", value=200)
    r = _extract(root, weights_file, tmp / "c.h5")
    assert r.exit_code == 0 and _printable(r.output), r.output
    m = _meta(tmp / "c.h5")
    assert "ch\\xe2t" in m.classes and m.train_size == TRAIN + 1


# -------------------------------------------------------------------------- predict's inputs


def test_list_image_files_is_safe_sorted_and_deduplicated(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    a = _image(d / "b.png")
    _image(d / "sub" / "a.jpg")
    os.symlink("..", d / "sub" / "loop")
    os.symlink("b.png", d / "a_link.png")
    os.mkfifo(d / "pipe.png")
    odd = _image(_bytes_name(d, b"\xff.png"))
    (d / "notes.txt").write_text("x")
    got = list_image_files([d, a])  # b.png twice: once by name, once in the folder
    assert got == sorted([d / "a_link.png", d / "sub" / "a.jpg", d / "pipe.png", odd])
    with pytest.raises(BadImage, match="FIFO"):
        read_image(d / "pipe.png")


@pytest.mark.parametrize("what", ["missing", "broken_link", "empty_folder", "non_utf8_missing"])
def test_list_image_files_errors_are_one_line(tmp_path, what):
    if what == "missing":
        inputs, fragment = [tmp_path / "nope.jpg"], "does not exist"
    elif what == "broken_link":
        os.symlink("nowhere", tmp_path / "l.png")
        inputs, fragment = [tmp_path / "l.png"], "broken link"
    elif what == "empty_folder":
        (tmp_path / "e").mkdir()
        (tmp_path / "e" / "x.txt").write_text("x")
        os.symlink(".", tmp_path / "e" / "loop")
        inputs, fragment = [tmp_path / "e"], "no images found"
    else:
        inputs, fragment = [_bytes_name(tmp_path, b"caf\xe9.png")], "caf\\xe9.png does not exist"
    with pytest.raises(FusionCacheError, match=None) as e:
        list_image_files(inputs)
    assert fragment in str(e.value) and "\n" not in str(e.value) and _printable(str(e.value))
