"""Golden files (issue 26, deliver 3): a cache and a head written once by an earlier release, and fixed digests.

`tests/data/golden/` holds what `scripts/make_golden.py` wrote with the release of its `golden.json`: a tiny image
folder (8 x 8 px PNGs, two classes), the cache `extract` made of it (three taps at 32 px), the head `fit --out` made
of that cache, and `golden.json` (the settings, the fingerprint, the head's labels and logits on the cache's test
rows). The weights are not committed: `golden_weights` regenerates their exact bytes from a counter-based
generator (no torch or NumPy RNG stream), and the first check is that their sha256 is the recorded one.

Every later release must open that cache, find its fingerprint both recorded and recomputable, reuse it when the
settings match (refuse it, without --force, when the installed torchvision differs from the one recorded: the
fingerprint holds the library version), and predict the recorded labels with the head. Beside them: every
feature-determining field of `CacheMeta` changes the fingerprint (the list read from the dataclass itself), a floor
of fields that must stay feature-determining, and the fingerprints of one fixed metadata record, schema 3 and
schema 2, as constants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fusion_cache.cache import LEGACY_SCHEMA, SCHEMA_VERSION, CacheMeta, lock_path, open_cache, partial_path
from fusion_cache.headfile import load_head
from fusion_cache.taps import MOBILENET_V2

from .features import assert_features_close
from .hostile import clean_failure, run

GOLDEN = Path(__file__).parent / "data" / "golden"
RECORD = GOLDEN / "golden.json"


# ---------------------------------------------------------------------------------------------- the weights

_GOLDEN_RATIO = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def counter_uniform(start: int, n: int) -> np.ndarray:
    """n float64 values in [0, 1): SplitMix64 of the counters start+1 ... start+n, top 53 bits. Plain uint64
    arithmetic, so the values never depend on a library's RNG stream (NumPy promises none for Generator)."""
    with np.errstate(over="ignore"):
        z = (np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN_RATIO
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def golden_tensors() -> dict[str, np.ndarray]:
    """A MobileNetV2 state_dict (torchvision's names and shapes) as little-endian NumPy arrays: every conv and
    linear weight uniform in +-sqrt(6 / fan_in) (drawn in sorted-name order from one counter), BatchNorm as
    the identity (weight 1, bias 0, running mean 0, variance 1), biases 0, num_batches_tracked 0. Pooled
    features are then of order 1 at every tap (about 0.1 to 10 at 32 px)."""
    from torchvision.models import mobilenet_v2

    with torch.device("meta"):
        ref = mobilenet_v2().state_dict()
    out, pos = {}, 0
    for name in sorted(ref):
        shape = tuple(ref[name].shape)
        n = int(np.prod(shape, dtype=np.int64))
        if not ref[name].is_floating_point():
            out[name] = np.zeros(shape, "<i8")
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("bias", "running_mean"):
            a = np.zeros(n)
        elif leaf == "running_var" or len(shape) == 1:  # a BatchNorm's variance or weight
            a = np.ones(n)
        else:
            a = (2.0 * counter_uniform(pos, n) - 1.0) * np.sqrt(6.0 / int(np.prod(shape[1:])))
            pos += n
        out[name] = a.reshape(shape).astype("<f4")
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> str:
    """Write `tensors` in the safetensors format byte by byte (no library, so no library version can change
    the bytes): an 8-byte little-endian header size, a JSON header (sorted keys, no spaces, padded with
    spaces to 8 bytes), then each tensor's bytes in sorted-name order. Returns the file's sha256."""
    dtypes = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}
    header, offset = {}, 0
    for name in sorted(tensors):
        a = tensors[name]
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = b"".join(np.ascontiguousarray(tensors[name]).tobytes() for name in sorted(tensors))
    blob = struct.pack("<Q", len(text)) + text + data
    Path(path).write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def golden_weights(path: Path) -> str:
    """Write the golden MobileNetV2 weights to `path` (.safetensors, about 14 MB); returns their sha256."""
    return write_safetensors(path, golden_tensors())


def extract_args(settings: dict) -> list[str]:
    """`fusion-cache extract` options for the recorded settings (paths are added by the caller)."""
    args = []
    for key, value in settings.items():
        if value is None:
            value = "all"
        elif isinstance(value, list):
            value = ",".join(value)
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def extract_config(settings: dict, data_root: Path, weights: Path, out: Path):
    """The same settings as the library's ExtractConfig."""
    from fusion_cache.extract import ExtractConfig

    values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    return ExtractConfig(out=out, data_root=data_root, weights=str(weights), progress=False, **values)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def weights(record, tmp_path_factory) -> Path:
    """The golden weights, regenerated, byte-identical to the file the golden cache was extracted with."""
    path = tmp_path_factory.mktemp("golden-weights") / "mobilenet_v2-golden.safetensors"
    assert golden_weights(path) == record["weights_sha256"], "the golden weights no longer regenerate byte for byte"
    return path


# ---------------------------------------------------------------------------------------------- the golden files


def test_golden_weights_regenerate_byte_for_byte(record, weights):
    from fusion_cache.backbone import load_weights

    loaded = load_weights(str(weights), backbone="mobilenet_v2")  # the tool accepts them as a .safetensors file
    assert loaded.sha256 == record["weights_sha256"] == open_cache(GOLDEN / "cache.h5").meta.weights_sha256
    assert set(loaded.state_dict) == set(golden_tensors())


def test_golden_cache_opens_with_its_recorded_metadata(record):
    cache = open_cache(GOLDEN / "cache.h5")
    meta = cache.meta
    settings = record["extract"]
    assert meta.fingerprint == record["fingerprint"], "the golden cache's stored fingerprint changed"
    assert meta.compute_fingerprint() == record["fingerprint"], \
        "the fingerprint of the golden cache's own attributes is not the one it was written with"
    assert meta.schema_version == record["schema_version"] and meta.complete
    assert (meta.backbone, meta.library, meta.library_version) == ("mobilenet_v2", "torchvision",
                                                                   record["library_version"])
    assert meta.weights_sha256 == record["weights_sha256"]
    assert list(meta.taps) == settings["taps"] == cache.taps
    assert (meta.image_size, meta.pool, meta.dtype, meta.precision, meta.dataset) == \
           (settings["image_size"], "avg", "float32", "fp32", "imagefolder")
    assert meta.classes == tuple(record["classes"])
    assert (meta.train_size, meta.test_size) == (record["train_size"], record["test_size"])
    assert meta.table == MOBILENET_V2 and meta.interpolation == "bilinear"
    for split in ("train", "test"):
        labels = cache.labels(split)
        assert len(labels) == meta.split_size(split)
        for tap, width in zip(meta.taps, MOBILENET_V2.channels(list(meta.taps), "avg")):
            x = cache.features(tap, split)
            assert x.shape == (len(labels), width) and x.dtype == np.float32 and np.isfinite(x).all()
            assert np.abs(x).max() > 0.05, f"{tap} {split}: the golden features are not of order 1"
    assert cache.labels("test").tolist() == record["test_labels"]


def _reuse_or_refuse(record: dict, weights: Path, tmp_path: Path) -> str:
    """Run the recorded extract onto a copy of the golden cache: reused when the installed torchvision is the
    recorded one, else refused without --force (the fingerprint holds the library version); the copy untouched
    either way. Then the fingerprint these settings make today, with only library_version set back to the
    recorded one, is the golden fingerprint. Returns what happened."""
    from fusion_cache.extract import plan

    out = tmp_path / "cache.h5"
    shutil.copy2(GOLDEN / "cache.h5", out)
    before, stat = out.read_bytes(), out.stat()
    r = run("extract", *extract_args(record["extract"]), "--data-root", GOLDEN / "images", "--weights", weights,
            "--out", out, "--no-progress")
    installed = torchvision.__version__
    if installed == record["library_version"]:
        assert r.exit_code == 0, r.output
        assert r.output.startswith(f"reused {out}: settings unchanged"), r.output
        outcome = "reused"
    else:
        problem = clean_failure(r, f"{out} exists and was built with other settings; pass --force")
        assert problem is None, problem
        outcome = "refused"
    assert out.read_bytes() == before and out.stat().st_mtime_ns == stat.st_mtime_ns, "the golden copy was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.h5"]
    assert not partial_path(out).exists() and not lock_path(out).exists()

    meta = plan(extract_config(record["extract"], GOLDEN / "images", weights, out))[0].meta
    assert meta.library_version == installed
    then = record["schema_version"]  # the golden cache's schema: its fingerprint is the one these settings had then
    assert (meta.fingerprint_at(then) == record["fingerprint"]) == (installed == record["library_version"])
    assert dataclasses.replace(meta, library_version=record["library_version"], schema_version=then) \
        .compute_fingerprint() == record["fingerprint"], "the same settings no longer make the golden fingerprint"
    return outcome


def test_golden_cache_is_reused_by_the_same_settings(record, weights, tmp_path):
    outcome = _reuse_or_refuse(record, weights, tmp_path)
    assert outcome == ("reused" if torchvision.__version__ == record["library_version"] else "refused")


def test_golden_cache_is_refused_under_another_torchvision(record, weights, tmp_path, monkeypatch):
    """The branch a later torchvision takes, run now: the installed version made to differ from the recorded."""
    monkeypatch.setattr(torchvision, "__version__", record["library_version"] + ".other")
    assert _reuse_or_refuse(record, weights, tmp_path) == "refused"


def test_golden_features_are_extracted_again(record, weights, tmp_path):
    """A fresh extraction with the recorded settings gives the golden features, per tap within 1e-4 of the
    tap's own scale (float32 kernels may differ in the last bits between releases)."""
    out = tmp_path / "again.h5"
    r = run("extract", *extract_args(record["extract"]), "--data-root", GOLDEN / "images", "--weights", weights,
            "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    golden, again = open_cache(GOLDEN / "cache.h5"), open_cache(out)
    fp_fields = [f.name for f in dataclasses.fields(CacheMeta) if f.metadata["fp"] and f.name != "library_version"
                 and f.metadata["since"] <= record["schema_version"]]  # the fields the golden cache's schema had
    assert {k: getattr(again.meta, k) for k in fp_fields} == {k: getattr(golden.meta, k) for k in fp_fields}
    for split in ("train", "test"):
        assert np.array_equal(again.labels(split), golden.labels(split))
        assert np.array_equal(again.indices(split), golden.indices(split))
        for tap in golden.taps:
            assert_features_close(again.features(tap, split), golden.features(tap, split), 1e-4, name=f"{tap} {split}")


def test_golden_head_predicts_the_recorded_labels(record):
    head = load_head(GOLDEN / "head")
    cache = open_cache(GOLDEN / "cache.h5")
    assert head.fingerprint == record["fingerprint"] == cache.fingerprint
    assert list(head.taps) == record["head"]["taps"] and list(head.classes) == record["classes"]
    X = np.concatenate([cache.features(t, "test") for t in head.taps], axis=1)
    logits = head.logits_from_features(X)
    predicted = [head.classes[i] for i in logits.argmax(axis=1)]
    assert predicted == record["head"]["predicted"]
    assert_features_close(logits, record["head"]["logits"], 1e-4, name="the golden head's logits")


def test_golden_head_predicts_the_test_images(record, weights):
    """`predict` rebuilds backbone, taps, pooling and standardization from the head and the weights: on the
    golden test images it gives the labels the head gave on the cached features."""
    r = run("predict", GOLDEN / "head", GOLDEN / "images" / "test", "--weights", weights, "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    got = {Path(item["path"]).relative_to(GOLDEN / "images" / "test").as_posix(): item["class"]
           for item in json.loads(r.output)}
    assert got == dict(zip(record["test_files"], record["head"]["predicted"]))


# ---------------------------------------------------------------------------------------------- the fingerprint

# One fixed metadata record; its fingerprints below were computed by the release that wrote this test (schema 3)
# and, for schema 2, by the schema-2 release itself (commit 929e15f^, fusion_cache/cache.py).
FIXED = dict(
    backbone="mobilenet_v2", weights_sha256="ab" * 32, image_size=128, mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225), resize="bilinear-antialias shorter side to image_size, center crop, uint8", pool="avg",
    taps=("features.13", "features.18"), dataset="cifar10", data_identity={"train": "1" * 64, "test": "2" * 64},
    subset={"train": "3" * 64, "test": "4" * 64}, dtype="float32", precision="fp32", weights="imagenet1k_v1",
    data_root="data", classes=("cat", "dog"), train_size=10, test_size=4, train_source_size=50, test_source_size=20,
    seed=0, integrity_checked=True, versions={"torchvision": "0.20.1"}, library="torchvision",
    library_version="0.20.1", interpolation="bilinear", tap_table=MOBILENET_V2.to_json(), device="cpu",
)
FIXED_FINGERPRINT = "e3459b492a809af8655e19a7577dd4cb5afff1b002585f064928cf57bb794ddf"  # schema 3
# Schema 4 added `decode` and `split`; FIXED_4's fingerprint was computed by the release that added them.
FIXED_4 = FIXED | dict(decode="EXIF orientation applied; decoded at full size; alpha on white, 16-bit scaled to "
                              "8-bit, then RGB", split={"method": "given", "train": "train/", "test": "test/"})
FIXED_FINGERPRINT_SCHEMA_4 = "14decd19d03074337fc7e52c0989a4fc2a40e7ab54a61162be658420f3e49675"
FIXED_FINGERPRINT_SCHEMA_2 = "ebcecc166b28373943bff8af0a193ec7aea4f7657b927e590f6b8d54f0716fb1"

FP_FIELDS = [f.name for f in dataclasses.fields(CacheMeta) if f.metadata["fp"]]
OTHER_FIELDS = [f.name for f in dataclasses.fields(CacheMeta) if not f.metadata["fp"] and f.name != "schema_version"]
# Fields that must stay feature-determining: dropping fp=True from one of them shrinks FP_FIELDS (and so the
# parametrized test below) without failing it; this floor fails instead.
MUST_BE_FP = {"precision", "dtype", "weights_sha256", "image_size", "mean", "std", "pool", "taps", "data_identity",
              "subset", "backbone", "resize", "interpolation", "dataset", "library", "library_version", "tap_table",
              "decode", "split"}
# A realistic other value where one exists; other fields get one from their kind (`_changed`).
REALISTIC = {"precision": "bf16", "dtype": "float16", "pool": "avgmax", "interpolation": "bicubic",
             "backbone": "resnet50", "library": "timm", "library_version": "0.20.2", "image_size": 224,
             "dataset": "imagefolder", "taps": ("features.18", "features.13"), "mean": (0.5, 0.5, 0.5)}


def _fixed() -> CacheMeta:
    return CacheMeta(**FIXED_4)


def _changed(name: str, value):
    """Another value of a field of the same kind."""
    if name in REALISTIC:
        return REALISTIC[name]
    kind = {f.name: f.metadata["kind"] for f in dataclasses.fields(CacheMeta)}[name]
    change = {
        "str": lambda v: v + "-other",
        "sha256": lambda v: "cd" * 32 if v != "cd" * 32 else "ef" * 32,
        "int": lambda v: v + 1,
        "bool": lambda v: not v,
        "floats": lambda v: (v[0] + 0.001, *v[1:]),
        "strs": lambda v: (*v, "other"),
        "json": lambda v: {**v, "other": "1"},
    }
    if kind not in change:
        pytest.fail(f"field {name} is of kind {kind!r}, which this test cannot change yet: add it to _changed")
    return change[kind](value)


def test_the_fixed_record_has_its_golden_fingerprint():
    meta = _fixed()
    assert meta.compute_fingerprint() == FIXED_FINGERPRINT_SCHEMA_4, \
        "the fingerprint's serialization or its fields changed: every cache on disk would be refused"
    assert CacheMeta.create(**FIXED_4).fingerprint == FIXED_FINGERPRINT_SCHEMA_4
    # a schema-3 cache of the same settings has the fingerprint the schema-3 release computed
    assert meta.fingerprint_at(3) == FIXED_FINGERPRINT
    assert dataclasses.replace(CacheMeta(**FIXED), schema_version=3).compute_fingerprint() == FIXED_FINGERPRINT


def test_the_fixed_record_has_its_golden_schema_2_fingerprint():
    """A schema-2 cache's fingerprint, as the schema-2 release computed it, is what `legacy_fingerprint` gives
    (so `extract` reuses those caches) and what a schema-2 record recomputes (so they open)."""
    meta = _fixed()
    assert meta.schema_version == SCHEMA_VERSION == 4
    assert meta.legacy_fingerprint() == FIXED_FINGERPRINT_SCHEMA_2
    legacy = dataclasses.replace(meta, schema_version=LEGACY_SCHEMA)
    assert legacy.compute_fingerprint() == FIXED_FINGERPRINT_SCHEMA_2
    # schema 2 had no library, library_version, interpolation or tap_table: they are not in its fingerprint
    for name, value in (("library_version", "9.9"), ("tap_table", {})):
        assert dataclasses.replace(legacy, **{name: value}).compute_fingerprint() == FIXED_FINGERPRINT_SCHEMA_2


def test_feature_determining_fields_include_the_floor():
    assert MUST_BE_FP <= set(FP_FIELDS), f"no longer in the fingerprint: {sorted(MUST_BE_FP - set(FP_FIELDS))}"


@pytest.mark.parametrize("name", FP_FIELDS)
def test_each_feature_determining_field_changes_the_fingerprint(name):
    meta = _fixed()
    other = dataclasses.replace(meta, **{name: _changed(name, getattr(meta, name))})
    assert getattr(other, name) != getattr(meta, name)
    assert other.compute_fingerprint() != meta.compute_fingerprint(), f"{name} does not change the fingerprint"


@pytest.mark.parametrize("name", OTHER_FIELDS)
def test_provenance_fields_leave_the_fingerprint(name):
    meta = _fixed()
    other = dataclasses.replace(meta, **{name: _changed(name, getattr(meta, name))})
    assert other.compute_fingerprint() == meta.compute_fingerprint(), f"provenance field {name} changes it"


def test_the_schema_version_changes_the_fingerprint():
    meta = _fixed()
    assert dataclasses.replace(meta, schema_version=5).compute_fingerprint() != meta.compute_fingerprint()
