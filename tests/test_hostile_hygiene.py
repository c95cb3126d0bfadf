"""Hostile inputs, second round (issue 21, "Hygiene"): unbounded input in error lines, empty names, taps named
twice, weights that are no file, --force on files fusion-cache did not write, lock and partial names as outputs,
work in progress described as interrupted, predict's exit code, and rows of several caches told apart.

Each case must give exit 1 or 2, exactly one `Error:` line, no traceback, and leave every file as it was."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import h5py
import pytest

from fusion_cache.cache import CacheLock, partial_path

from .hostile import (clean_failure, denials, deny, extract_args, run, small_cache, small_head,  # noqa: F401
                      snapshot)  # (denials, small_cache, small_head: fixtures)

LONG = "x" * 100_000
LINE_LIMIT = 600  # cli.ERROR_LIMIT: "a few hundred characters"



def _check(result, fragment, roots=(), before=None):
    problem = clean_failure(result, fragment)
    assert problem is None, problem
    assert "internal error" not in result.output
    if before is not None:
        assert snapshot(*roots) == before, "a file that existed before was changed"


# ---------------------------------------------------------------------------------------------- errors


def _long_cases(cache: Path, cifar_root: Path, weights_file: Path, tmp_path: Path):
    """(args, fragment): input of 100,000 characters (a class folder name of 250, the most a file system allows)."""
    ext = extract_args(cifar_root, weights_file, tmp_path / "o.h5")
    manifest = tmp_path / "m.csv"
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    manifest.write_text(f"path,label,split\n{image},a,train\n{image},a,test\n{image},{LONG},test\n")
    folder = tmp_path / "folder"
    for split, cls in (("train", "a"), ("test", "a"), ("test", "c" * 250)):
        (folder / split / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / split / cls / "0.png")
    return [
        ([*ext, "--backbone", LONG], "unknown backbone"),
        ([*ext, "--backbone", "timm:" + LONG], "unknown backbone"),
        (["taps", "--backbone", LONG], "unknown backbone"),
        ([*ext, "--taps", LONG], "unknown tap"),
        ([*ext, "--taps", LONG + ",,"], "empty item"),
        ([*ext, "--weights", LONG], "weights"),
        ([*ext, "--dataset", LONG], "--dataset"),
        ([*ext[:2], tmp_path / LONG, *ext[3:]], "File name too long"),
        (["fit", cache, "--features", LONG], "unknown view or tap"),
        (["ablate", cache, "--views", LONG, "--seeds", 0], "unknown view or tap"),
        (["ablate", cache, "--heads", LONG, "--seeds", 0], "unknown head"),
        (["extract", "--out", tmp_path / "m.h5", "--dataset", "manifest", "--data-root", manifest, "--weights",
          weights_file, "--train-size", "all", "--test-size", "all", "--image-size", 32, "--workers", 0,
          "--no-progress"], "is in test but not in train"),
        (["extract", "--out", tmp_path / "f.h5", "--dataset", "imagefolder", "--data-root", folder, "--weights",
          weights_file, "--train-size", "all", "--test-size", "all", "--image-size", 32, "--workers", 0,
          "--no-progress"], "is in test but not in train"),
    ]


def test_long_input_gives_a_short_error_line(small_cache, cifar_root, weights_file, tmp_path):
    cases = _long_cases(small_cache, cifar_root, weights_file, tmp_path)
    before = snapshot(tmp_path)
    for args, fragment in cases:
        r = run(*args)
        problem = clean_failure(r, fragment)
        assert problem is None, f"{args[0]} {str(args[-2])[:30]}: {problem[:300]}"
        longest = max(len(line) for line in r.output.splitlines())
        assert longest <= LINE_LIMIT, f"{args[0]} {str(args[-2])[:30]}: a line of {longest} characters"
    assert snapshot(tmp_path) == before


def test_quoted_input_is_shortened_with_an_ellipsis(small_cache):
    r = run("fit", small_cache, "--features", LONG)
    assert f"unknown view or tap '{'x' * 80}…'" in r.output, r.output[:300]


def test_unknown_names_give_the_command_that_lists_them(small_cache, cifar_root, weights_file, tmp_path):
    ext = extract_args(cifar_root, weights_file, tmp_path / "o.h5")
    _check(run(*ext, "--backbone", "resnet9000"), "`fusion-cache models`")
    _check(run(*ext, "--taps", "features.99"), "`fusion-cache taps`")
    _check(run(*ext, "--backbone", "resnet18", "--taps", "layer9"), "`fusion-cache taps --backbone resnet18`")
    _check(run("fit", small_cache, "--features", "middle"), "`fusion-cache taps`")  # was: no way to list them


# ---------------------------------------------------------------------------------------------- inputs


def test_an_empty_backbone_is_an_error(cifar_root, weights_file, tmp_path):
    before = snapshot(tmp_path)
    for args in (extract_args(cifar_root, weights_file, tmp_path / "o.h5", "--backbone", ""), ["taps", "--backbone", ""],
                 ["taps", "--backbone", "  "]):
        _check(run(*args), "the backbone name is empty", [tmp_path], before)
    assert not (tmp_path / "o.h5").exists()


def test_empty_taps_and_features_stay_errors(small_cache, cifar_root, weights_file, tmp_path):
    """A guard that already held before this round: an empty --taps or --features is a usage error."""
    _check(run(*extract_args(cifar_root, weights_file, tmp_path / "o.h5", "--taps", "")), "--taps")
    _check(run("fit", small_cache, "--features", ""), "--features")
    assert not (tmp_path / "o.h5").exists()


def test_a_tap_named_twice_is_used_once_with_a_warning(small_cache, cifar_root, weights_file, tmp_path):
    once, twice = tmp_path / "once.h5", tmp_path / "twice.h5"
    assert run(*extract_args(cifar_root, weights_file, once, "--taps", "features.13")).exit_code == 0
    r = run(*extract_args(cifar_root, weights_file, twice, "--taps", "features.13,features.13"))
    assert r.exit_code == 0, r.output
    assert "Warning: --taps names 'features.13' twice; it is cached once" in r.output
    with h5py.File(once, "r") as a, h5py.File(twice, "r") as b:
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        for split in ("train", "test"):
            assert (a[split]["features/features.13"][()] == b[split]["features/features.13"][()]).all()
    r = run("fit", small_cache, "--features", "features.18,features.18", "--json")
    assert r.exit_code == 0, r.output
    assert "Warning: view 'features.18,features.18' names 'features.18' twice; it is used once" in r.output
    result = json.loads(r.stdout)
    assert result["dim"] == 1280 and result["features"] == ["features.18"]


# ---------------------------------------------------------------------------------------------- files


def test_weights_that_are_no_regular_file_say_what_they_are(cifar_root, weights_file, tmp_path, denials):
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.pth").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.pth")
    shutil.copy(weights_file, tmp_path / "locked.pth")
    deny(tmp_path / "locked.pth")
    cases = [("/dev/null", "is a character device"), (tmp_path / "folder", "is a folder"),
             (tmp_path / "empty.pth", "is empty (0 bytes)"), (tmp_path / "fifo.pth", "is a FIFO"),
             (tmp_path / "locked.pth", "cannot be read (permission denied)"),
             (tmp_path / "missing.pth", "not found"), ("", "--weights is empty"), (" ", "--weights is empty")]
    before = snapshot(tmp_path)
    for weights, fragment in cases:
        args = extract_args(cifar_root, weights_file, tmp_path / "o.h5")
        args[args.index("--weights") + 1] = weights
        _check(run(*args), fragment, [tmp_path], before)
    assert not (tmp_path / "o.h5").exists()


def test_force_replaces_only_what_fusion_cache_wrote(small_cache, cifar_root, weights_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis")
    (tmp_path / "data.h5").write_bytes(b"")
    with h5py.File(tmp_path / "theirs.h5", "w") as f:  # someone's own HDF5 file
        f["x"] = [1, 2, 3]
    before = snapshot(tmp_path)
    for out in (notes, tmp_path / "theirs.h5"):
        _check(run("consolidate", small_cache, "--out", out, "--force"), "is not a cache that fusion-cache wrote",
               [tmp_path], before)
        _check(run(*extract_args(cifar_root, weights_file, out, "--force")), "is not a cache that fusion-cache wrote",
               [tmp_path], before)
        r = run(*extract_args(cifar_root, weights_file, out))  # without --force: not told to pass it
        _check(r, "is not a cache that fusion-cache wrote", [tmp_path], before)
        assert "pass --force" not in r.output
    # what fusion-cache wrote is replaced, as before
    shutil.copy(small_cache, tmp_path / "copy.h5")
    r = run("consolidate", small_cache, "--out", tmp_path / "copy.h5", "--force")
    assert r.exit_code == 0, r.output


def test_lock_and_partial_names_are_refused_as_outputs(small_cache, cifar_root, weights_file, tmp_path):
    before = snapshot(tmp_path)
    for name in ("x.h5.lock", "x.h5.partial"):
        _check(run("consolidate", small_cache, "--out", tmp_path / name), "the name fusion-cache gives",
               [tmp_path], before)
        _check(run(*extract_args(cifar_root, weights_file, tmp_path / name)), "the name fusion-cache gives",
               [tmp_path], before)


# ---------------------------------------------------------------------------------------------- running work


def test_an_extraction_in_progress_is_not_called_interrupted(small_cache, cifar_root, weights_file, tmp_path):
    out = tmp_path / "c.h5"
    shutil.copy(small_cache, partial_path(out))
    with h5py.File(partial_path(out), "r+") as f:
        f.attrs["complete"] = False
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    lock = CacheLock(out).acquire()  # an extract at work on `out`, as seen from a second command
    try:
        before = snapshot(tmp_path)
        for args in (["fit", out], ["info", out], ["info", partial_path(out)], ["ablate", out, "--seeds", 0]):
            r = run(*args)
            _check(r, f"an extraction is in progress ({holder}", [tmp_path], before)
            assert "interrupted" not in r.output
        r = run(*extract_args(cifar_root, weights_file, out))
        _check(r, f"in progress: {holder} holds", [tmp_path], before)
        assert json.loads(Path(str(out) + ".lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    finally:
        lock.release()
    r = run("fit", out)  # nobody holds the lock now: what is left was interrupted
    _check(r, "an interrupted extraction left")


def test_lock_holder(tmp_path):
    from fusion_cache.cache import lock_holder

    out = tmp_path / "c.h5"
    assert lock_holder(out) is None
    with CacheLock(out):
        assert lock_holder(out) == f"pid {os.getpid()} on {socket.gethostname()}"
    assert lock_holder(out) is None
    Path(str(out) + ".lock").write_text(json.dumps({"pid": 1, "host": "gone"}))  # left by a killed run
    assert lock_holder(out) is None
    with CacheLock(out):  # a killed run's lock file is taken over
        assert lock_holder(out) == f"pid {os.getpid()} on {socket.gethostname()}"


# ---------------------------------------------------------------------------------------------- exit codes


def test_predict_fails_when_no_image_can_be_read(small_head, cifar_root, tmp_path):
    from PIL import Image

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (bad / "empty.jpg").write_bytes(b"")
    for extra in ([], ["--json"]):
        r = run("predict", small_head, bad, *extra)
        _check(r, "none of the 2 image(s) could be read")
    Image.new("RGB", (32, 32), (90, 30, 200)).save(bad / "good.png")
    r = run("predict", small_head, bad)
    assert r.exit_code == 0, r.output
    assert "2 of 3 image(s) could not be read and were skipped" in r.output


# ---------------------------------------------------------------------------------------------- labels


def test_cache_labels_are_unique_and_stable():
    from fusion_cache.io import cache_labels

    assert cache_labels(["d/mobilenet_v2.h5", "d/resnet18.h5"]) == ["mobilenet_v2", "resnet18"]
    assert cache_labels(["a/r.h5", "b/r.h5", "c.h5"]) == ["a/r", "b/r", "c"]
    assert cache_labels(["a/r.h5", "a/r.hdf5"]) == ["a/r.h5", "a/r.hdf5"]
    assert cache_labels(["a/r.h5", "a/r.h5"]) == ["a/r.h5", "a/r.h5 #2"]
    assert cache_labels(["a/r.h5", "b/r.h5"], ["resnet18"] * 2) == ["resnet18 (a/r)", "resnet18 (b/r)"]
    assert cache_labels(["x/resnet18.h5"], ["resnet18"]) == ["resnet18"]


def test_report_tells_two_caches_of_one_backbone_apart(small_cache, cifar_root, weights_file, tmp_path):
    a, b = tmp_path / "a" / "small.h5", tmp_path / "b" / "small.h5"
    a.parent.mkdir()
    b.parent.mkdir()
    shutil.copy(small_cache, a)
    r = run(*extract_args(cifar_root, weights_file, b, "--taps", "fused", "--pool", "avgmax"))  # the same images
    assert r.exit_code == 0, r.output
    out = tmp_path / "r"
    r = run("report", a, b, "--out", out, "--views", "late", "--heads", "linear", "--seeds", 0)
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| mobilenet_v2")]
    assert "mobilenet_v2 (a/small)" in rows and "mobilenet_v2 (b/small)" in rows, md
    assert "mobilenet_v2 (a/small): best single tap" in r.output and "mobilenet_v2 (b/small)" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert {x["label"] for x in rep["layer_curve"]["rows"]} == {"mobilenet_v2 (a/small)", "mobilenet_v2 (b/small)"}
