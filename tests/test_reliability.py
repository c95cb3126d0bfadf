"""Interrupted runs, concurrent writers and hostile inputs: nothing is lost, nothing half-written is trusted."""

from __future__ import annotations

import errno
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fusion_cache.cache import CacheWriter, open_cache, partial_path
from fusion_cache.cli import SizeType, main
from fusion_cache.sampler import stratified_subset
from fusion_cache.errors import FusionCacheError
from fusion_cache.synthetic import write_cifar, write_image_folder


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_same_cache(a: Path, b: Path) -> None:
    """Bit-identical datasets and equal attributes (both files complete)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert dict(fa.attrs).keys() == dict(fb.attrs).keys()
        for k in fa.attrs:
            assert np.array_equal(np.asarray(fa.attrs[k]), np.asarray(fb.attrs[k])), k

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                x, y = obj[()], fb[name][()]
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name

        fa.visititems(visit)


# ---------------------------------------------------------------------------------------------- kill + resume


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, weights_file):
    root = write_cifar(tmp_path_factory.mktemp("killdata"), per_class_per_batch=6, per_class_test=6)
    d = tmp_path_factory.mktemp("kill")
    args = ["--data-root", root, "--weights", weights_file, "--train-size", "all", "--test-size", "all",
            "--image-size", 64, "--batch-size", 4, "--no-download", "--skip-integrity-check"]
    r = _run("extract", "--out", d / "reference.h5", "--no-progress", *args)
    assert r.exit_code == 0, r.output
    return d, [str(a) for a in args]


def _extract_and_kill_after(out: Path, args: list[str], images: int) -> tuple[bool, str]:
    """Start `python -m fusion_cache extract` and SIGKILL it once its progress bar passes `images`.
    Returns whether it was killed (False if it finished first) and what it printed on stdout."""
    proc = subprocess.Popen([sys.executable, "-m", "fusion_cache", "extract", "--out", str(out), "--progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def watch():
        buf = b""
        while True:
            chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(64)
            if not chunk:
                return
            buf = (buf + chunk)[-400:]
            found = re.findall(rb"(\d+)/\d+ \[", buf)
            if found and int(found[-1]) >= images:
                proc.send_signal(signal.SIGKILL)
                proc.stderr.read()  # drain, so a process that finishes before the signal lands never blocks
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    stdout = proc.stdout.read().decode()  # the summary line is the only stdout, printed at the very end
    proc.wait(timeout=300)
    t.join(timeout=5)
    return proc.returncode == -signal.SIGKILL, stdout


@pytest.mark.parametrize("kill_at", [[8], [120, 300], [4, 200, 330]])
def test_sigkill_then_resume_is_bit_identical(kill_setup, tmp_path, kill_at):
    d, args = kill_setup
    out = tmp_path / "c.h5"
    kills = 0
    late_kill = False  # a kill well after the first flushed batch: the next run must resume, not restart
    finished = ""
    for n in kill_at:
        resumable = late_kill and partial_path(out).exists()
        killed, stdout = _extract_and_kill_after(out, args, n)
        if not killed:  # the run finished before the signal landed (a fast machine): it must still have resumed
            assert out.exists(), stdout
            finished = stdout
            break
        kills += 1
        late_kill = n >= 120
        # nothing under the final name, or (never) something complete; a partial is refused
        assert not out.exists()
        with pytest.raises(FusionCacheError, match="run the same extract command again to resume"):
            open_cache(out)
        if partial_path(out).exists():
            with pytest.raises(FusionCacheError, match="incomplete|damaged"):
                open_cache(partial_path(out))
    assert kills >= 1  # the test killed a running extract at least once
    if not finished:
        resumable = late_kill and partial_path(out).exists()
        r = _run("extract", "--out", out, "--no-progress", *args)
        assert r.exit_code == 0, r.output
        finished = r.output
    if late_kill:
        assert resumable and "resumed from" in finished, finished
    assert not partial_path(out).exists() and not Path(str(out) + ".lock").exists()
    assert_same_cache(out, d / "reference.h5")


def test_a_second_writer_is_refused(tiny_cache, tmp_path, cifar_root, weights_file):
    out = tmp_path / "c.h5"
    with CacheWriter(out, open_cache(tiny_cache).meta):
        r = _run("extract", "--out", out, "--data-root", cifar_root, "--weights", weights_file, "--train-size", 20,
                 "--test-size", 10, "--image-size", 32, "--no-download", "--skip-integrity-check")
        assert r.exit_code == 1
        assert f"Error: another extract is already writing {out}" in r.output and "choose another --out" in r.output


def test_disk_full_keeps_a_resumable_partial(tmp_path, cifar_root, weights_file, monkeypatch):
    args = ["--data-root", cifar_root, "--weights", weights_file, "--train-size", 40, "--test-size", 20,
            "--image-size", 32, "--batch-size", 8, "--no-download", "--skip-integrity-check", "--no-progress"]
    assert _run("extract", "--out", tmp_path / "ref.h5", *args).exit_code == 0
    calls = {"n": 0}
    real = h5py.Dataset.__setitem__

    def full_after_a_while(self, key, value):
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_after_a_while)
    out = tmp_path / "c.h5"
    r = _run("extract", "--out", out, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: disk full while writing {out}.partial" in r.output and "run the same command again to resume" in r.output
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(FusionCacheError, match="incomplete"):
        open_cache(partial_path(out))
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    r = _run("extract", "--out", out, *args)
    assert r.exit_code == 0 and "resumed from" in r.output
    assert_same_cache(out, tmp_path / "ref.h5")


# ---------------------------------------------------------------------------------------------- bad inputs


def _folder_with(tmp_path: Path, name: str, make) -> Path:
    root = write_image_folder(tmp_path / "imgs")
    make(root / "train" / "cats" / name)
    return root


def _truncate(src_kind):
    def make(path: Path):
        im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3)).astype(np.uint8))
        im.save(path)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return make


FOLDER_CASES = {
    "truncated.jpg": _truncate("jpeg"),
    "truncated.png": _truncate("png"),
    "zero.png": lambda p: p.write_bytes(b""),
    "notanimage.jpg": lambda p: p.write_text("this is a text file with an image name"),
}


@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_bad_image_fails_by_default_and_is_skipped_on_request(tmp_path, weights_file, name):
    root = _folder_with(tmp_path, name, FOLDER_CASES[name])
    base = ["extract", "--dataset", "imagefolder", "--data-root", root, "--weights", weights_file, "--train-size",
            "all", "--test-size", "all", "--image-size", 32, "--workers", 0, "--no-progress"]
    out = tmp_path / "c.h5"
    r = _run(*base, "--out", out)
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("\n") == 1
    assert r.output.startswith(f"Error: cannot read image cats/{name}") and "--on-bad-image skip" in r.output
    assert not out.exists() and not partial_path(out).exists()
    r = _run(*base, "--out", out, "--on-bad-image", "skip")
    assert r.exit_code == 0, r.output
    assert f"skipped unreadable train image: cats/{name}" in r.output and "skipped 1 unreadable image" in r.output
    c = open_cache(out)
    assert c.meta.skipped == {"train": [f"cats/{name}"]} and c.meta.train_size == 15


def test_every_image_mode_just_works(tmp_path, weights_file):
    root = write_image_folder(tmp_path / "imgs")
    rgb = np.random.default_rng(1).integers(0, 255, (30, 50, 3)).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(root / "train" / "dogs" / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).convert("LA").save(root / "train" / "dogs" / "la.png")
    r = _run("extract", "--dataset", "imagefolder", "--data-root", root, "--weights", weights_file, "--train-size",
             "all", "--test-size", "all", "--image-size", 32, "--workers", 0, "--out", tmp_path / "c.h5",
             "--no-progress")
    assert r.exit_code == 0, r.output
    assert open_cache(tmp_path / "c.h5").meta.train_size == 17
    assert np.isfinite(open_cache(tmp_path / "c.h5").features("features.18")).all()


def _make_nan_weights(path: Path) -> Path:
    from torchvision.models import mobilenet_v2

    sd = mobilenet_v2(weights=None).state_dict()
    sd["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, path)
    return path


def _newer_schema(tiny_cache: Path, path: Path) -> Path:
    shutil.copy(tiny_cache, path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    return path


def _truncated_cache(tiny_cache: Path, path: Path) -> Path:
    data = tiny_cache.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


# (case name, CLI args after the command, expected message fragment); `T` is tmp_path, filled in per case.
def _corpus(tmp_path: Path, cifar_root: Path, weights_file: Path, tiny_cache: Path):
    ext = ["extract", "--out", tmp_path / "c.h5", "--data-root", cifar_root, "--image-size", 32, "--train-size", 20,
           "--test-size", 10, "--no-download", "--skip-integrity-check", "--no-progress"]
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    empty_cls = write_image_folder(tmp_path / "emptycls")
    (empty_cls / "train" / "bats").mkdir()
    (empty_cls / "test" / "bats").mkdir()
    extra_cls = write_image_folder(tmp_path / "extracls")
    shutil.copytree(extra_cls / "test" / "owls", extra_cls / "test" / "bats")
    folder = ["extract", "--out", tmp_path / "c.h5", "--dataset", "imagefolder", "--weights", weights_file,
              "--train-size", "all", "--test-size", "all", "--image-size", 32, "--workers", 0]
    return [
        ("weights: a list", [*ext, "--weights", lst], "holds a list, not a state_dict"),
        ("weights: a tensor", [*ext, "--weights", tensor], "holds a Tensor, not a state_dict"),
        ("weights: not a torch file", [*ext, "--weights", junk], "is not a readable PyTorch weights file"),
        ("weights: missing file", [*ext, "--weights", tmp_path / "nope.pth"], "not found"),
        ("weights: NaN", [*ext, "--weights", _make_nan_weights(tmp_path / "nan.pth")], "produced NaN or inf"),
        ("size: negative", [*ext, "--weights", weights_file, "--train-size", "-5"], "must be positive"),
        ("size: words", [*ext, "--weights", weights_file, "--test-size", "many"], "is not a number"),
        ("size: too large", [*ext, "--weights", weights_file, "--test-size", 41], "larger than the test split"),
        ("image size: tiny", [*ext, "--weights", weights_file, "--image-size", 8], "not in the range 32<=x<=1024"),
        ("out: a folder", [*ext[:1], "--out", tmp_path, *ext[3:], "--weights", weights_file], "is a folder"),
        ("out: no such folder", [*ext[:1], "--out", tmp_path / "no" / "c.h5", *ext[3:], "--weights", weights_file],
         "does not exist"),
        ("folder: empty class", [*folder, "--data-root", empty_cls], "holds no images"),
        ("folder: class only in test", [*folder, "--data-root", extra_cls], "is in test but not in train"),
        ("folder: datasets taken for classes", [*folder, "--data-root", tmp_path], "is a dataset, not a class"),
        ("cache: newer schema", ["info", _newer_schema(tiny_cache, tmp_path / "new.h5")], "upgrade fusion-cache"),
        ("cache: truncated", ["fit", _truncated_cache(tiny_cache, tmp_path / "trunc.h5")], "damaged or truncated"),
        ("cache: not HDF5", ["ablate", junk], "is not an HDF5 file"),
        ("cache: missing", ["info", tmp_path / "none.h5"], "does not exist"),
        ("fit: unknown tap in view", ["fit", tiny_cache, "--features", "features.99"], "unknown view or tap"),
        ("ablate: bad seeds", ["ablate", tiny_cache, "--seeds", "a,b"], "not a comma-separated list of integers"),
        ("ablate: unknown head", ["ablate", tiny_cache, "--heads", "svm"], "unknown head 'svm'"),
    ]


def test_bad_input_corpus(tmp_path, cifar_root, weights_file, tiny_cache):
    cases = _corpus(tmp_path, cifar_root, weights_file, tiny_cache)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    failures = []
    for name, args, fragment in cases:
        r = _run(*args)
        err_lines = [l for l in r.output.splitlines() if l.startswith("Error")]
        ok = (r.exit_code in (1, 2) and "Traceback" not in r.output
              and (r.exception is None or isinstance(r.exception, SystemExit))
              and len(err_lines) == 1 and fragment in r.output)
        if not ok:
            failures.append(f"{name}: exit {r.exit_code}, {r.output!r}, {r.exception!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "c.h5").exists() and not partial_path(tmp_path / "c.h5").exists()
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # no existing file was touched
    assert len(cases) == 21


def test_existing_non_cache_file_is_not_overwritten(tmp_path, cifar_root, weights_file):
    out = tmp_path / "precious.h5"
    out.write_text("my thesis")
    r = _run("extract", "--out", out, "--data-root", cifar_root, "--weights", weights_file, "--train-size", 20,
             "--test-size", 10, "--image-size", 32, "--no-download", "--skip-integrity-check")
    assert r.exit_code == 1 and "is not a cache that fusion-cache wrote" in r.output
    assert "pass --force" not in r.output  # --force would not replace it either
    assert out.read_text() == "my thesis"


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=2, max_size=8), frac=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_stratified_sampler_properties(counts, frac, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    n = max(1, int(round(frac * len(labels))))
    a = stratified_subset(labels, n, seed)
    assert len(a) == n and len(np.unique(a)) == n  # exact size, no duplicates
    assert np.array_equal(a, stratified_subset(labels, n, seed))  # stable for a seed
    got = np.bincount(labels[a], minlength=len(counts))
    assert got.tolist() == largest_remainder(counts, n)


def largest_remainder(counts: list[int], size: int) -> list[int]:
    """Each class's share of `size` in proportion to its count, in exact integer arithmetic: the floor of
    count x size / total, then one more row for each of the largest remainders; equal remainders go to the
    earlier class."""
    total = sum(counts)
    take = [c * size // total for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(counts[i] * size % total), i))
    for i in by_remainder[: size - sum(take)]:
        take[i] += 1
    return take


@pytest.mark.parametrize("counts, size, expected", [
    # shares 2.5, 1.5, 1.0: floors 2, 1, 1; one row left; remainders .5, .5, 0: the tie goes to class 0
    pytest.param([5, 3, 2], 5, [3, 1, 1], id="5-of-5,3,2"),
    # shares 1.2, 1.2, 0.6: floors 1, 1, 0; the one row left goes to the largest remainder, class 2's .6
    pytest.param([4, 4, 2], 3, [1, 1, 1], id="3-of-4,4,2"),
    # shares 3, 1.5, 0.5: remainders 0, .5, .5 tie: class 1, the earlier, gets the row; class 2 none
    pytest.param([6, 3, 1], 5, [3, 2, 0], id="5-of-6,3,1"),
    # shares 2/3 each: three equal remainders, two rows: classes 0 and 1
    pytest.param([1, 1, 1], 2, [1, 1, 0], id="2-of-1,1,1"),
    # shares 1.5 each: two rows left over four equal remainders: classes 0 and 1
    pytest.param([3, 3, 3, 3], 6, [2, 2, 1, 1], id="6-of-3,3,3,3"),
    # shares 10/3, 5/3, 5/3, 1/3: floors 3, 1, 1, 0; two rows left to the remainders 2/3: classes 1 and 2
    pytest.param([10, 5, 5, 1], 7, [3, 2, 2, 0], id="7-of-10,5,5,1"),
    # shares 5.6, 1.6, 0.8: floors 5, 1, 0; two rows left: class 2 (.8), then the tie .6 / .6 to class 0.
    # In floating point 5.6 - 5 < 1.6 - 1: a tie must be decided in exact arithmetic
    pytest.param([14, 4, 2], 8, [6, 1, 1], id="8-of-14,4,2"),
    # shares 1.8, 7.2: floors 1, 7; the row left goes to class 0's .8: all of class 0
    pytest.param([2, 8], 9, [2, 7], id="9-of-2,8"),
    # the whole split
    pytest.param([7, 3], 10, [7, 3], id="10-of-7,3"),
])
def test_stratified_sampler_counts_by_largest_remainder(counts, size, expected):
    assert largest_remainder(counts, size) == expected  # the test's own rule agrees with the hand-worked counts
    classes = 10 * np.arange(len(counts)) + 3  # labels 3, 13, 23, ...: class order is label order
    labels = np.repeat(classes, counts)
    np.random.default_rng(0).shuffle(labels)
    for seed in (0, 1):
        got = labels[stratified_subset(labels, size, seed)]
        assert [int((got == c).sum()) for c in classes] == expected


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(-10**6, 10**6).map(str), st.text(max_size=8), st.sampled_from(["all", "ALL", " all "])))
def test_size_option_parsing(value):
    import click

    try:
        got = SizeType().convert(value, None, None)
    except click.BadParameter as e:
        assert "positive integer or 'all'" in str(e)
        return
    if value.strip().lower() == "all":
        assert got == "all"  # every image (None is "not given": the source's default)
    else:
        assert got == int(value.strip()) and got > 0
