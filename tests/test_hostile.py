"""The hostile-input corpus, generated: a real tiny cache and head tampered with in every way the formats allow,
outputs aimed at files that must survive, and options out of range. Each case must give exit 1 or 2, exactly
one `Error:` line, no traceback, and leave every file that existed before byte-identical.

Image folders (symlink loops, FIFOs, bombs, undecodable names) are in test_hostile_folders.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fusion_cache.cache import CacheMeta, partial_path
from fusion_cache.headfile import HEAD_FILE

from .conftest import write_synthetic_cache
from .hostile import clean_failure, run, small_cache, small_head, snapshot  # noqa: F401 (fixtures)

def _check(result, fragment, roots, before):
    problem = clean_failure(result, fragment)
    assert problem is None, problem
    assert "internal error" not in result.output
    assert snapshot(*roots) == before, "a file that existed before was changed"


# ---------------------------------------------------------------------------------------------- cache tampering

FIELDS = {f.name: f for f in dataclasses.fields(CacheMeta)}
OPTIONAL = {"device", "skipped", "engine", "shards", "leaks", "source_options"}  # provenance with a default: a cache without them is still
# whole (a schema-3 cache written before the ray engine has neither engine nor shards)
WRONG_TYPE = {"str": 7, "sha256": "xyz", "int": "seven", "bool": 3, "floats": "mean", "strs": 5, "json": "{not json"}


def _delete_attr(name):
    def tamper(f):
        del f.attrs[name]
    return tamper


def _set_attr(name, value):
    def tamper(f):
        f.attrs[name] = value
    return tamper


def _replace_dataset(name, value):
    def tamper(f):
        del f[name]
        f[name] = value
    return tamper


def _delete(name):
    def tamper(f):
        del f[name]
    return tamper


def _edit(name, fn):
    def tamper(f):
        data = f[name][()]
        fn(data)
        f[name][...] = data
    return tamper


def _cache_cases():
    cases = []
    for name, f in FIELDS.items():
        if name in OPTIONAL:
            continue
        expect = {"schema_version": "no schema_version", "complete": "incomplete cache",
                  "fingerprint": "do not match its fingerprint"}.get(name, f"attribute '{name}' is missing")
        cases.append((f"attr {name}: missing", _delete_attr(name), expect))
        value = WRONG_TYPE[f.metadata["kind"]]
        expect = "attribute 'schema_version' is not an integer" if name == "schema_version" else f"attribute '{name}'"
        cases.append((f"attr {name}: wrong type", _set_attr(name, value), expect))
    cases += [
        ("attr image_size: edited", _set_attr("image_size", 64), "do not match its fingerprint"),
        ("attr mean: edited", _set_attr("mean", np.array([0.5, 0.5, 0.5])), "do not match its fingerprint"),
        ("attr mean: NaN", _set_attr("mean", np.array([np.nan, 0.5, 0.5])), "attribute 'mean'"),
        ("attr mean: two values", _set_attr("mean", np.array([0.5, 0.5])), "attribute 'mean'"),
        ("attr std: zero", _set_attr("std", np.array([0.0, 0.2, 0.2])), "attribute 'mean'"),
        ("attr pool: unknown", _set_attr("pool", "median"), "attribute 'pool'"),
        ("attr dtype: unknown", _set_attr("dtype", "int8"), "attribute 'dtype'"),
        ("attr precision: unknown", _set_attr("precision", "fp8"), "attribute 'precision'"),
        ("attr taps: unknown", _set_attr("taps", np.array(["features.99"], dtype=h5py.string_dtype())),
         "attribute 'taps'"),
        ("attr taps: repeated", _set_attr("taps", np.array(["features.13"] * 2, dtype=h5py.string_dtype())),
         "attribute 'taps'"),
        ("attr classes: empty", _set_attr("classes", np.array([], dtype=h5py.string_dtype())),
         "attribute 'classes'"),
        ("attr train_size: negative", _set_attr("train_size", -1), "attribute 'train_size'"),
        ("attr train_size: too many", _set_attr("train_size", 41), "dataset train/labels has 40 rows"),
        ("attr versions: a list", _set_attr("versions", "[1, 2]"), "attribute 'versions'"),
        ("attr schema_version: older", _set_attr("schema_version", 1), "written by an older fusion-cache"),
        ("attr schema_version: newer", _set_attr("schema_version", 99), "upgrade fusion-cache"),
        ("attr complete: false", _set_attr("complete", False), "incomplete cache"),
        ("dataset train/labels: missing", _delete("train/labels"), "dataset train/labels is missing"),
        ("dataset train/indices: missing", _delete("train/indices"), "dataset train/indices is missing"),
        ("dataset train group: missing", _delete("train"), "dataset train/labels is missing"),
        ("dataset test/features/features.18: missing", _delete("test/features/features.18"),
         "dataset test/features/features.18 is missing"),
        ("dataset train/labels: float", _replace_dataset("train/labels", np.zeros(40, np.float32)),
         "dataset train/labels is float32"),
        ("dataset train/labels: 2-D", _replace_dataset("train/labels", np.zeros((40, 2), np.int64)),
         "not 1-D integer"),
        ("dataset train/labels: short", _replace_dataset("train/labels", np.zeros(39, np.int64)),
         "dataset train/labels has 39 rows"),
        ("dataset test/labels: out of range", _edit("test/labels", lambda a: a.__setitem__(0, 10)),
         "dataset test/labels holds 10"),
        ("dataset test/labels: negative", _edit("test/labels", lambda a: a.__setitem__(0, -1)),
         "dataset test/labels holds -1"),
        ("dataset train/indices: repeated", _edit("train/indices", lambda a: a.__setitem__(1, a[0])),
         "dataset train/indices holds positions"),
        ("dataset train/indices: beyond the source", _edit("train/indices", lambda a: a.__setitem__(0, 10**6)),
         "dataset train/indices holds positions"),
        ("dataset features: 1-D", _replace_dataset("train/features/features.13", np.zeros(40, np.float32)),
         "dataset train/features/features.13 is float32 (40,)"),
        ("dataset features: wrong width", _replace_dataset("train/features/features.13",
                                                           np.zeros((40, 95), np.float32)), "expected float32 (40, 96)"),
        ("dataset features: integer", _replace_dataset("train/features/features.18", np.zeros((40, 1280), np.int32)),
         "dataset train/features/features.18 is int32"),
        ("dataset features: float64", _replace_dataset("test/features/features.18", np.zeros((20, 1280))),
         "dataset test/features/features.18 is float64"),
        ("dataset features: short", _replace_dataset("test/features/features.13", np.zeros((19, 96), np.float32)),
         "expected float32 (20, 96)"),
        ("dataset features: a group", _replace_dataset("test/features/features.13", None),
         "dataset test/features/features.13 is missing"),
        ("features: NaN", _edit("train/features/features.13", lambda a: a.__setitem__((slice(0, 3), 0), np.nan)),
         "3 train rows of view 'fused' hold NaN or inf"),
        ("features: inf", _edit("test/features/features.18", lambda a: a.__setitem__((4, 7), np.inf)),
         "1 test rows of view 'fused' hold NaN or inf"),
    ]
    return cases


CACHE_CASES = _cache_cases()


@pytest.mark.parametrize("name,tamper,fragment", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_tampered_cache(small_cache, tmp_path, name, tamper, fragment):
    path = tmp_path / "c.h5"
    shutil.copy(small_cache, path)
    with h5py.File(path, "r+") as f:
        if name == "dataset features: a group":
            del f["test/features/features.13"]
            f.create_group("test/features/features.13")
        else:
            tamper(f)
    before = snapshot(tmp_path)
    command = "info" if "schema_version" in name or "complete" in name else "fit"
    _check(run(command, path, "--features", "fused") if command == "fit" else run(command, path), fragment,
           [tmp_path], before)


def _file_cases(small_cache: Path, tmp_path: Path):
    data = small_cache.read_bytes()
    cases = []
    for frac in (0.001, 0.1, 0.5, 0.9, 0.999):
        p = tmp_path / f"trunc{frac}.h5"
        p.write_bytes(data[: int(len(data) * frac)])
        cases.append((f"truncated at {frac}", p, "" if frac < 0.01 else "damaged or truncated"))
    (tmp_path / "empty.h5").write_bytes(b"")
    cases.append(("empty file", tmp_path / "empty.h5", "is not an HDF5 file"))
    (tmp_path / "noise.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    cases.append(("random bytes", tmp_path / "noise.h5", "is not an HDF5 file"))
    with h5py.File(tmp_path / "bare.h5", "w"):
        pass
    cases.append(("HDF5 without attributes", tmp_path / "bare.h5", "not a fusion-cache file"))
    (tmp_path / "adir.h5").mkdir()
    cases.append(("a folder", tmp_path / "adir.h5", "is a folder"))
    os.mkfifo(tmp_path / "fifo.h5")
    cases.append(("a FIFO", tmp_path / "fifo.h5", "is not a regular file"))
    os.symlink(tmp_path / "loop.h5", tmp_path / "loop.h5")
    cases.append(("a symlink loop", tmp_path / "loop.h5", ""))
    shutil.copy(small_cache, tmp_path / "p.h5.partial")
    cases.append(("only a partial left", tmp_path / "p.h5", "run the same extract command again to resume"))
    return cases


def test_unreadable_cache_files(small_cache, tmp_path):
    cases = _file_cases(small_cache, tmp_path)
    before = snapshot(tmp_path)
    for name, path, fragment in cases:
        for command in (["info", path], ["fit", path], ["ablate", path, "--seeds", "0"]):
            problem = clean_failure(run(*command), fragment or None)
            assert problem is None, f"{name}, {command[0]}: {problem}"
    assert snapshot(tmp_path) == before
    assert len(cases) == 12


# ---------------------------------------------------------------------------------------------- head tampering


def _head_cases():
    def drop(key):
        return lambda s: s.pop(key)

    def put(key, value):
        return lambda s: s.__setitem__(key, value)

    def tensor(key, fn):
        def tamper(s):
            t = s[key].clone()
            fn(t)
            s[key] = t
        return tamper

    def prov(fn):
        def tamper(s):
            import json

            p = json.loads(s["provenance"])
            fn(p)
            s["provenance"] = json.dumps(p)
        return tamper

    cases = [(f"head {k}: missing", drop(k), f"'{k}' is missing" if k != "format" else "is not a fusion-cache head")
             for k in ("format", "head", "taps", "classes", "coef", "intercept", "mean", "scale", "fingerprint",
                       "provenance")]
    cases += [
        ("head format: other", put("format", "fusion-cache-head/9"), "is not a fusion-cache head"),
        ("head coef: wrong shape", tensor("coef", lambda t: None) if False else put("coef", torch.zeros(3, 5)),
         "coef has shape (3, 5)"),
        ("head coef: NaN", tensor("coef", lambda t: t.__setitem__((0, 0), float("nan"))), "coef holds NaN or inf"),
        ("head intercept: inf", tensor("intercept", lambda t: t.__setitem__(0, float("inf"))),
         "intercept holds NaN or inf"),
        ("head scale: zero", tensor("scale", lambda t: t.__setitem__(3, 0.0)), "scale holds zero or negative"),
        ("head scale: negative", tensor("scale", lambda t: t.__setitem__(3, -1.0)), "scale holds zero or negative"),
        ("head scale: NaN", tensor("scale", lambda t: t.__setitem__(3, float("nan"))), "scale holds NaN or inf"),
        ("head mean: short", tensor("mean", lambda t: None) if False else put("mean", torch.zeros(5)),
         "mean has shape (5,)"),
        ("head coef: integer", put("coef", torch.zeros(3, 1376, dtype=torch.int64)), "'coef' is missing or not"),
        ("head classes: one", put("classes", ["cats"]), "1 distinct class names"),
        ("head classes: repeated", put("classes", ["a", "a", "b"]), "distinct class names"),
        ("head classes: not strings", put("classes", [1, 2, 3]), "'classes' is missing or not"),
        ("head taps: unknown", put("taps", ["features.13", "features.99"]), "are not distinct known taps"),
        ("head taps: other width", put("taps", ["features.13"]), "coef has shape"),
        ("head provenance: not JSON", put("provenance", "{oops"), "'provenance' is not JSON"),
        ("head provenance: a list", put("provenance", "[1]"), "'provenance' is not a JSON object"),
        ("head provenance: no weights_sha256", prov(lambda p: p.pop("weights_sha256")), "'weights_sha256' is missing"),
        ("head provenance: bad image_size", prov(lambda p: p.__setitem__("image_size", "big")), "'image_size'"),
        ("head provenance: image_size 0", prov(lambda p: p.__setitem__("image_size", 0)), "image_size 0 is out of range"),
        ("head provenance: unknown pool", prov(lambda p: p.__setitem__("pool", "median")), "pooling 'median'"),
        ("head provenance: std zero", prov(lambda p: p.__setitem__("std", [0, 1, 1])), "std positive"),
        ("head provenance: no seed", prov(lambda p: p.pop("seed")), "'seed' is missing"),
    ]
    return cases


HEAD_CASES = _head_cases()


@pytest.mark.parametrize("name,tamper,fragment", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_tampered_head(small_head, folder_root, tmp_path, name, tamper, fragment):
    d = tmp_path / "head"
    shutil.copytree(small_head, d)
    state = torch.load(d / HEAD_FILE, weights_only=True)
    tamper(state)
    torch.save(state, d / HEAD_FILE)
    before = snapshot(tmp_path)
    image = folder_root / "test" / "cats" / "000.png"
    _check(run("predict", d, image), fragment, [tmp_path], before)
    _check(run("export", d, "--out", tmp_path / "m.pt2"), fragment, [tmp_path], before)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _head_file_cases(small_head: Path):
    """(name, write(path)): head files that are no head at all."""
    return [
        ("empty", lambda p: p.write_bytes(b"")),
        ("truncated", lambda p: p.write_bytes((small_head / HEAD_FILE).read_bytes()[:500])),
        ("text", lambda p: p.write_text("hello")),
        ("a list", lambda p: torch.save([1, 2], p)),
        ("a pickle that runs code", lambda p: torch.save({"format": _Evil()}, p)),
    ]


def test_unreadable_head_files(small_head, tmp_path):
    cases = []
    for name, write in _head_file_cases(small_head):
        d = tmp_path / name
        d.mkdir()
        write(d / HEAD_FILE)
        cases.append((name, d))
    before = snapshot(tmp_path)
    for name, d in cases:
        problem = clean_failure(run("export", d, "--out", tmp_path / "m.pt2"))
        assert problem is None, f"{name}: {problem}"
    assert snapshot(tmp_path) == before and not Path("pwned.txt").exists()


# ---------------------------------------------------------------------------------------------- outputs


def _output_cases(tmp_path: Path):
    """(args, fragment): outputs aimed at what `test_outputs_never_destroy_what_was_there` puts in tmp_path."""
    precious, head, results, mixed, cache = (tmp_path / n for n in ("precious.txt", "head", "results", "mixed", "c.h5"))
    return [
        (["export", head, "--out", precious], "already exists; pass --force"),
        (["export", head, "--out", head / HEAD_FILE, "--force"], "is this command's own input"),
        (["export", head, "--out", cache, "--force"], "is an HDF5 file (a cache?) and is never overwritten"),
        (["export", head, "--out", tmp_path], "is a folder"),
        (["export", head, "--out", tmp_path / "no" / "m.pt2"], "does not exist"),
        (["fit", cache, "--out", head], "already holds results"),
        (["fit", cache, "--out", precious], "is a file; pass a folder"),
        (["fit", cache, "--out", mixed, "--force"], "holds files fusion-cache did not write (e.g. 'notes.txt')"),
        (["ablate", cache, "--seeds", "0", "--out", results], "already holds results"),
        (["ablate", cache, "--seeds", "0", "--out", head], "holds files fusion-cache did not write"),
        (["report", cache, "--out", mixed], "holds files fusion-cache did not write"),
        (["report", cache, "--out", results, "--force"], "holds files fusion-cache did not write"),
    ]


def test_outputs_never_destroy_what_was_there(small_cache, small_head, tmp_path):
    (tmp_path / "precious.txt").write_text("my thesis")
    shutil.copytree(small_head, tmp_path / "head")
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text("{}")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "report.md").write_text("old")
    (mixed / "notes.txt").write_text("mine")
    shutil.copy(small_cache, tmp_path / "c.h5")
    cases = _output_cases(tmp_path)
    before = snapshot(tmp_path)
    for args, fragment in cases:
        _check(run(*args), fragment, [tmp_path], before)
    assert len(cases) == 12


def test_force_replaces_a_head_folder_whole(small_cache, small_head, tmp_path):
    out = tmp_path / "head"
    shutil.copytree(small_head, out)
    old = (out / HEAD_FILE).read_bytes()
    r = run("fit", small_cache, "--features", "late", "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [HEAD_FILE, "metrics.json"]
    assert (out / HEAD_FILE).read_bytes() != old
    assert [p.name for p in tmp_path.iterdir()] == ["head"]  # no temporary folder left beside it


def test_a_failed_run_leaves_the_old_results(small_cache, tmp_path, monkeypatch):
    out = tmp_path / "ab"
    assert run("ablate", small_cache, "--views", "late", "--heads", "logreg", "--seeds", "0", "--out", out).exit_code == 0
    before = snapshot(tmp_path)
    import fusion_cache.fit as fit_mod

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed while writing the second file

    real = fit_mod.atomic_write_text
    calls = {"n": 0}

    def second_write_dies(path, text):
        calls["n"] += 1
        if calls["n"] == 2:
            boom()
        return real(path, text)

    monkeypatch.setattr(fit_mod, "atomic_write_text", second_write_dies)
    r = run("ablate", small_cache, "--views", "early", "--heads", "logreg", "--seeds", "0", "--out", out, "--force")
    assert r.exit_code == 130
    assert snapshot(tmp_path) == before  # the old results, whole; no temporary folder left


def _extract_args(cifar_root, weights_file, out):
    return ["extract", "--out", out, "--data-root", cifar_root, "--weights", weights_file, "--train-size", 20,
            "--test-size", 10, "--image-size", 32, "--taps", "late", "--no-download", "--skip-integrity-check",
            "--no-progress"]


def _foreign_cases(cifar_root: Path, tmp_path: Path):
    """(suffix, make(path), fragment): what may lie at OUT.partial or OUT.lock that fusion-cache did not put there."""
    return [
        (".partial", lambda p: p.mkdir(), "is a folder and is not a partial cache"),
        (".partial", lambda p: p.write_text("my notes"), "is a file and is not a partial cache"),
        (".partial", lambda p: os.symlink(cifar_root, p), "is a link"),
        (".partial", lambda p: os.mkfifo(p), "is not a regular file"),
        (".partial", lambda p: h5py.File(p, "w").close(), "is an HDF5 file that fusion-cache did not write"),
        (".lock", lambda p: p.mkdir(), "is a folder and is not an empty lock file"),
        (".lock", lambda p: p.write_text("pid 42"), "is a file and is not an empty lock file"),
        (".lock", lambda p: os.symlink(tmp_path / "elsewhere", p), "is a link"),
    ]


def test_foreign_partial_and_lock_files_are_refused(cifar_root, weights_file, tmp_path):
    cases = []
    for i, (suffix, make, fragment) in enumerate(_foreign_cases(cifar_root, tmp_path)):
        out = tmp_path / f"c{i}.h5"
        make(Path(str(out) + suffix))
        cases.append((out, fragment))
    before = snapshot(tmp_path)
    for out, fragment in cases:
        _check(run(*_extract_args(cifar_root, weights_file, out)), fragment, [tmp_path], before)
        assert not out.exists()
    assert len(cases) == 8


def test_a_partial_from_other_settings_needs_force(cifar_root, weights_file, tmp_path, small_cache):
    out = tmp_path / "c.h5"
    shutil.copy(small_cache, partial_path(out))
    with h5py.File(partial_path(out), "r+") as f:
        f.attrs["complete"] = False
    before = snapshot(tmp_path)
    _check(run(*_extract_args(cifar_root, weights_file, out)), "holds an interrupted extraction with other settings",
           [tmp_path], before)
    r = run(*_extract_args(cifar_root, weights_file, out), "--force")
    assert r.exit_code == 0, r.output
    assert out.exists() and not partial_path(out).exists()


# ---------------------------------------------------------------------------------------------- options


def _option_cases(cache, cifar_root, weights_file, tmp_path, head):
    ext = ["extract", "--out", tmp_path / "x.h5", "--data-root", cifar_root, "--weights", weights_file,
           "--no-download", "--skip-integrity-check"]
    return [
        ([*ext, "--image-size", 8], "--image-size"),
        ([*ext, "--image-size", 30000], "--image-size"),
        ([*ext, "--workers", 100000], "--workers"),
        ([*ext, "--seed", -1], "--seed"),
        ([*ext, "--seed", 2**40], "--seed"),
        ([*ext, "--batch-size", 0], "--batch-size"),
        ([*ext, "--taps", "features.13,,features.18"], "empty item"),
        ([*ext, "--taps", ""], "empty item"),
        ([*ext, "--train-size", 0], "--train-size"),
        (["fit", cache, "--lr", "nan"], "not a finite number"),
        (["fit", cache, "--weight-decay", "inf"], "not a finite number"),
        (["fit", cache, "--epochs", 0], "--epochs"),
        (["fit", cache, "--features", ""], "empty item"),
        (["fit", cache, "--features", ",late"], "empty item"),
        (["ablate", cache, "--seeds", "1,,2"], "empty item"),
        (["ablate", cache, "--seeds", "-3"], "out of range"),
        (["ablate", cache, "--seeds", str(2**33)], "out of range"),
        (["ablate", cache, "--views", "early,,late"], "empty item"),
        (["ablate", cache, "--views", "features.13+"], "empty tap"),
        (["ablate", cache, "--heads", ""], "empty item"),
        (["ablate", cache, "--C", "-1"], "--C"),
        (["report", cache, "--out", tmp_path / "r", "--val-fraction", 0], "--val-fraction"),
        (["report", cache, "--out", tmp_path / "r", "--val-fraction", 0.9], "--val-fraction"),
        (["report", cache, "--out", tmp_path / "r", "--val-fraction", "nan"], "not a finite number"),
        (["predict", head, tmp_path, "--top-k", 0], "--top-k"),
        (["predict", head, tmp_path / "none.png"], "does not exist"),
    ]


def test_options_out_of_range(small_cache, small_head, cifar_root, weights_file, tmp_path):
    cases = _option_cases(small_cache, cifar_root, weights_file, tmp_path, small_head)
    before = snapshot(tmp_path)
    for args, fragment in cases:
        problem = clean_failure(run(*args), fragment)
        assert problem is None, f"{args[0]} {args[-2:]}: {problem}"
    assert snapshot(tmp_path) == before and not (tmp_path / "x.h5").exists() and not (tmp_path / "r").exists()
    assert len(cases) == 26


def test_repeated_seeds_are_collapsed_with_a_note(small_cache):
    r = run("ablate", small_cache, "--views", "late", "--heads", "logreg", "--seeds", "0,0,1", "--json")
    assert r.exit_code == 0, r.output
    assert "note: repeated seeds removed; running seeds 0, 1" in r.output


# ---------------------------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def lost_class_cache(tmp_path_factory) -> Path:
    """Class 'c' lost every training image (as --on-bad-image skip can do) but has test images."""
    rng = np.random.default_rng(0)
    y = {"train": np.array([0, 1] * 20), "test": np.array([0, 1, 2] * 5)}
    feats = {s: {"features.13": rng.normal(size=(len(y[s]), 96)).astype(np.float32),
                 "features.18": rng.normal(size=(len(y[s]), 1280)).astype(np.float32)} for s in y}
    return write_synthetic_cache(tmp_path_factory.mktemp("lost") / "lost.h5", feats, y, ["a", "b", "c"])


NO_TRAINING_ROWS = [["fit", "--head", "linear"], ["fit", "--head", "logreg"], ["ablate", "--seeds", "0"]]


@pytest.mark.parametrize("args", NO_TRAINING_ROWS)
def test_a_class_without_training_rows_is_an_error_for_every_head(lost_class_cache, args):
    r = run(args[0], lost_class_cache, *args[1:])
    assert clean_failure(r, "class 'c' has no training rows") is None, r.output


def test_a_diverged_fit_is_an_error_not_a_number(small_cache):
    r = run("fit", small_cache, "--features", "late", "--lr", "1e30", "--epochs", 3, "--json")
    assert clean_failure(r, "the linear head diverged") is None, r.output
    assert "NaN" not in r.output and "Infinity" not in r.output


def _test_items(module, leave_out: tuple[str, ...] = ()) -> int:
    """How many tests pytest collects from the test functions of `module` (parametrizations multiplied)."""
    n = 0
    for name, fn in vars(module).items():
        if name.startswith("test_") and callable(fn) and name not in leave_out:
            k = 1
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "parametrize":
                    k *= len(mark.args[1])
            n += k
    return n


def _corpus_counts(tmp_path: Path) -> dict[str, list[int]]:
    """Each docs/reliability.md row's case counts, in its order, counted from the corpus itself."""
    from collections import defaultdict

    from . import test_advice as advice
    from . import test_hostile_folders as folders
    from . import test_hostile_hygiene as hygiene
    from . import test_hostile_plan as plan
    from . import test_preconditions as preconditions

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "small.h5").write_bytes(b"\0" * 64)  # `_file_cases` only slices the cache's bytes
    file_cases = _file_cases(fake / "small.h5", fake)
    outputs = len(_output_cases(fake)) + len(_foreign_cases(fake, fake)) + \
        len([test_a_partial_from_other_settings_needs_force])
    return {
        "caches": [len(CACHE_CASES), len(file_cases)],
        "heads": [len(HEAD_CASES), len(_head_file_cases(fake))],
        "outputs": [outputs],
        "image folders": [len(folders.CASES), _test_items(folders, leave_out=("test_hostile_folder",))],
        "options": [len(_option_cases(fake, fake, fake, fake, fake)), len(NO_TRAINING_ROWS),
                    len([test_a_diverged_fit_is_an_error_not_a_number])],
        "plans and advice": [_test_items(plan), _test_items(preconditions), _test_items(hygiene),
                         len(advice.cases(defaultdict(lambda: fake)))],
    }


# How docs/reliability.md says each group of cases runs: what the tests above run (a tampered cache goes through one
# command, info or fit; an unreadable cache file through all three).
RUNS = {"caches": ["each through `info` or `fit`", "each through `info`, `fit` and `ablate`"],
        "heads": ["each through `predict` and `export`", "each through `export`"]}


def test_corpus_size(tmp_path):
    """docs/reliability.md's hostile-corpus table states the corpus's counts: every group's numbers in order, what
    the cache and head cases run through, and their total."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text(encoding="utf-8")
    head = re.search(r"The corpus is generated and runs with the suite \(([^)]*)\), (\d+) cases:\n", text)
    assert head, "docs/reliability.md: no sentence 'The corpus is generated and runs with the suite (...), N cases:'"
    rows = text[head.end():].lstrip("\n").split("\n\n", 1)[0].splitlines()[2:]  # the table below it, less its header
    stated: dict[str, list[int]] = {}
    through: dict[str, list[str]] = {}
    for row in rows:
        group, cases, _what, runs = (cell.strip() for cell in row.strip().strip("|").split("|"))
        stated.setdefault(group, []).append(int(cases))
        through.setdefault(group, []).append(runs)
    for name, words in RUNS.items():
        assert through.get(name) == words, f"docs/reliability.md, {name}: its cases are not said to run {words}"
    counted = _corpus_counts(tmp_path)
    assert stated == counted, f"docs/reliability.md says {stated}, the corpus has {counted}"
    assert int(head[2]) == sum(sum(v) for v in counted.values()), "the stated total is not the sum of its cases"
    assert " ".join(head[1].split()) == ("`tests/test_hostile.py`, `tests/test_hostile_folders.py`, "
                                         "`tests/test_hostile_plan.py`, `tests/test_preconditions.py`, "
                                         "`tests/test_hostile_hygiene.py`, `tests/test_advice.py`")


def test_a_library_warning_is_one_line(small_cache, monkeypatch):
    import warnings

    import fusion_cache.cache as cache_mod

    real = cache_mod.open_cache

    def noisy(path):
        warnings.warn("torch says:\nsomething\n  over three lines", UserWarning)
        return real(path)

    monkeypatch.setattr(cache_mod, "open_cache", noisy)
    r = run("info", small_cache)
    assert r.exit_code == 0, r.output
    assert "Warning: torch says: something over three lines\n" in r.output
    assert "UserWarning" not in r.output and "warnings.warn" not in r.output


def test_an_os_error_is_one_line(small_cache, monkeypatch):
    import fusion_cache.fit as fit_mod

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", b"/tmp/caf\xe9")

    monkeypatch.setattr(fit_mod, "load_view", denied)
    r = run("fit", small_cache)
    assert clean_failure(r, "/tmp/caf\\xe9: Permission denied; check the path") is None, r.output


@pytest.mark.parametrize("change, message", [
    ({"image_size": 8}, "--image-size 8 is out of range"),
    ({"workers": 100000}, "--workers 100000 is out of range"),
    ({"seed": -1}, "--seed -1 is out of range"),
])
def test_library_bounds_without_the_cli(tmp_path, cifar_root, weights_file, change, message):
    from fusion_cache.errors import FusionCacheError
    from fusion_cache.extract import ExtractConfig, extract

    cfg = ExtractConfig(out=tmp_path / "c.h5", data_root=cifar_root, weights=str(weights_file), download=False,
                        skip_integrity_check=True, progress=False, **change)
    with pytest.raises(FusionCacheError, match=message):
        extract(cfg)
    assert not list(tmp_path.iterdir())
