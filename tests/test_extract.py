"""extract: taps, features equal to a direct forward, stratified subsets, provenance, reuse/refusal, errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.models import mobilenet_v2
from torchvision.transforms import v2

from fusion_cache.backbone import PooledExtractor
from fusion_cache.cache import open_cache
from fusion_cache.cli import main
from fusion_cache.sampler import stratified_subset
from fusion_cache.extract import ExtractConfig, extract
from fusion_cache.taps import ALL_TAPS, TAPS

from fusion_cache.synthetic import CIFAR_CLASSES, calibrate_batchnorm, write_cifar

from .features import (BF16, FLOAT16, FLOAT32, HALF_WEIGHTS, assert_all_taps_close, assert_features_close,
                       assert_order_one)


def _model(weights_file) -> torch.nn.Module:
    m = mobilenet_v2(weights=None)
    m.load_state_dict(torch.load(weights_file, weights_only=True))
    return m.eval()


def _direct_pooled(model, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Reference: run model.features block by block (NCHW, fp32) and average-pool every block output."""
    out = {}
    with torch.no_grad():
        h = x
        for i, block in enumerate(model.features):
            h = block(h)
            out[f"features.{i}"] = h.mean(dim=(2, 3)).numpy()
    return out


def _cifar_arrays(root: Path, split: str) -> np.ndarray:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    data = []
    for n in names:
        with open(root / "cifar-10-batches-py" / n, "rb") as f:
            data.append(pickle.load(f, encoding="latin1")["data"])
    return np.concatenate(data).reshape(-1, 3, 32, 32)


def test_declared_channels_and_strides_match_the_model():
    model = mobilenet_v2(weights=None).eval()
    ex = PooledExtractor(model, list(ALL_TAPS))
    with torch.no_grad():
        feats = ex(torch.zeros(1, 3, 64, 64))
        maps = ex.body(torch.zeros(1, 3, 64, 64))
    for tap in TAPS:
        assert feats[tap.name].shape == (1, tap.channels), tap.name
        assert 64 // maps[tap.name].shape[-1] == tap.reduction, tap.name
    assert sum(t.channels for t in TAPS) == 2816


@pytest.mark.parametrize("split", ["train", "test"])
def test_cached_features_equal_direct_forward(tiny_cache, cifar_root, weights_file, split):
    cache = open_cache(tiny_cache)
    idx = cache.indices(split)
    images = torch.from_numpy(_cifar_arrays(cifar_root, split)[idx])
    # An independent preprocessing path: torchvision's v2 transform objects, one image at a time.
    tf = v2.Compose([v2.Resize(48, antialias=True), v2.CenterCrop(48), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(img) for img in images])
    ref = _direct_pooled(_model(weights_file), x)
    assert cache.taps == list(ALL_TAPS)
    got = {tap: cache.features(tap, split) for tap in cache.taps}
    for tap in cache.taps:  # the test weights give every tap a real scale: a zeroed tap cannot hide in rounding
        assert_order_one(ref[tap], name=tap)
    assert_all_taps_close(got, ref, FLOAT32)  # every tap, each at its own scale
    # labels are the source labels at the stored indices
    with open(cifar_root / "cifar-10-batches-py" / ("test_batch" if split == "test" else "data_batch_1"), "rb") as f:
        first = pickle.load(f, encoding="latin1")["labels"]
    in_first = idx < len(first)
    assert np.array_equal(cache.labels(split)[in_first], np.asarray(first)[idx[in_first]])


def test_stratified_counts_and_provenance(tiny_cache, weights_file):
    cache = open_cache(tiny_cache)
    assert np.bincount(cache.labels("train"), minlength=10).tolist() == [6] * 10
    assert np.bincount(cache.labels("test"), minlength=10).tolist() == [2] * 10
    assert len(np.unique(cache.indices("train"))) == 60
    a = cache.meta
    assert a.weights_sha256 == hashlib.sha256(Path(weights_file).read_bytes()).hexdigest()
    assert a.taps == ALL_TAPS
    assert a.image_size == 48 and a.mean == (0.485, 0.456, 0.406) and a.std == (0.229, 0.224, 0.225)
    assert a.classes == tuple(CIFAR_CLASSES)
    assert a.dataset == "cifar10" and a.seed == 0 and a.train_size == 60 and a.test_size == 20
    assert a.schema_version == 4 and a.complete is True and a.integrity_checked is False
    assert {"torch", "torchvision", "h5py", "numpy", "sklearn", "fusion_cache"} <= set(a.versions)
    assert len(a.fingerprint) == 64 and a.fingerprint == a.compute_fingerprint()
    with h5py.File(tiny_cache, "r") as f:
        ds = f["train/features/features.18"]
        assert ds.chunks is not None and ds.maxshape == (None, 1280) and ds.dtype == np.float32
        assert f["train/labels"].dtype == np.int64 and f["train/indices"].dtype == np.int64


def test_view_api_concatenates_taps_in_order(tiny_cache):
    cache = open_cache(tiny_cache)
    X, y = cache.view("fused", split="train")
    assert X.shape == (60, 96 + 1280) and X.dtype == np.float32 and y.shape == (60,)
    np.testing.assert_array_equal(X[:, :96], cache.features("features.13"))
    np.testing.assert_array_equal(X[:, 96:], cache.features("features.18"))
    X2, _ = cache.view("features.0,features.18", split="test")
    assert X2.shape == (20, 32 + 1280)


def test_stratified_subset_is_seeded_proportional_and_unique():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    a = stratified_subset(labels, 20, seed=3)
    assert np.array_equal(a, stratified_subset(labels, 20, seed=3))
    assert not np.array_equal(a, stratified_subset(labels, 20, seed=4))
    assert len(np.unique(a)) == 20
    assert np.bincount(labels[a], minlength=4).tolist() == [10, 6, 3, 1]
    assert np.array_equal(stratified_subset(labels, None, seed=0), np.arange(100))


def _cfg(tmp_path, cifar_root, weights_file, **kw):
    base = dict(out=tmp_path / "c.h5", data_root=cifar_root, train_size=20, test_size=10, weights=str(weights_file),
                image_size=32, taps=("features.13", "features.18"), batch_size=8, download=False,
                skip_integrity_check=True, progress=False)
    return ExtractConfig(**{**base, **kw})


def test_reuse_and_refusal(tmp_path, cifar_root, weights_file):
    first = extract(_cfg(tmp_path, cifar_root, weights_file))
    assert not first.reused
    before = (tmp_path / "c.h5").stat().st_mtime_ns
    again = extract(_cfg(tmp_path, cifar_root, weights_file))
    assert again.reused and "reused" in again.summary()
    assert (tmp_path / "c.h5").stat().st_mtime_ns == before
    with pytest.raises(Exception, match="built with other settings; pass --force"):
        extract(_cfg(tmp_path, cifar_root, weights_file, seed=1))
    assert open_cache(tmp_path / "c.h5").meta.seed == 0  # the existing file is untouched
    forced = extract(_cfg(tmp_path, cifar_root, weights_file, seed=1, force=True))
    assert not forced.reused and open_cache(tmp_path / "c.h5").meta.seed == 1
    assert not (tmp_path / "c.h5.partial").exists() and not (tmp_path / "c.h5.lock").exists()


def test_fingerprint_changes_with_preprocessing(tmp_path, cifar_root, weights_file):
    extract(_cfg(tmp_path, cifar_root, weights_file))
    fp = open_cache(tmp_path / "c.h5").fingerprint
    extract(_cfg(tmp_path, cifar_root, weights_file, image_size=40, out=tmp_path / "d.h5"))
    assert open_cache(tmp_path / "d.h5").fingerprint != fp


def test_tarball_gives_the_same_cache_as_the_extracted_folder(tmp_path, cifar_root, weights_file):
    tar_root = tmp_path / "tar"
    tar_root.mkdir()
    with tarfile.open(tar_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(cifar_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    extract(_cfg(tmp_path, cifar_root, weights_file))
    extract(_cfg(tmp_path, tar_root, weights_file, out=tmp_path / "t.h5"))
    a, b = open_cache(tmp_path / "c.h5"), open_cache(tmp_path / "t.h5")
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.features("features.18", "test"), b.features("features.18", "test"))
    assert list(tar_root.iterdir()) == [tar_root / "cifar-10-python.tar.gz"]  # nothing unpacked into the user's folder


def test_image_folder_of_awkward_images(tmp_path, folder_root, weights_file):
    out = tmp_path / "f.h5"
    res = extract(ExtractConfig(out=out, dataset="imagefolder", data_root=folder_root, train_size=None, test_size=None,
                                weights=str(weights_file), image_size=32, taps=("features.3", "features.18"),
                                batch_size=4, workers=0, progress=False))
    cache = open_cache(out)
    assert cache.classes == ["cats", "dogs", "owls"]
    assert res.counts == {"train": 15, "test": 6}
    # direct forward through PIL + torchvision transforms
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder_root / "train"))
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(32, antialias=True), v2.CenterCrop(32),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    rgb_like = [i for i, (p, _) in enumerate(ds.samples) if Image.open(p).mode in ("RGB", "L")]
    x = torch.stack([tf(Image.open(ds.samples[i][0]).convert("RGB")) for i in rgb_like])
    ref = _direct_pooled(_model(weights_file), x)
    rows = [list(cache.indices("train")).index(i) for i in rgb_like]
    assert cache.taps == ["features.3", "features.18"]
    assert_all_taps_close({t: cache.features(t)[rows] for t in cache.taps}, ref, FLOAT32)


# ---------------------------------------------------------------------------------------------- CLI errors


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _base_args(tmp_path, cifar_root, weights_file):
    return ["extract", "--out", tmp_path / "c.h5", "--data-root", cifar_root, "--weights", weights_file,
            "--train-size", 20, "--test-size", 10, "--image-size", 32, "--no-download", "--skip-integrity-check",
            "--no-progress", "--dataset", "cifar10"]


def test_cli_extract_and_info(tmp_path, cifar_root, weights_file):
    r = _run(*_base_args(tmp_path, cifar_root, weights_file), "--taps", "fused")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "train 20, test 10 images, 1376 dims" in r.output
    assert r.output.count("checksums differ from the official release") == 1  # the warning, once
    r = _run("info", tmp_path / "c.h5")
    assert r.exit_code == 0 and "features.13" in r.output and "sha256" in r.output
    r = _run(*_base_args(tmp_path, cifar_root, weights_file), "--taps", "fused")
    assert r.exit_code == 0 and "reused" in r.output


def test_cli_unknown_tap_lists_valid_ones(tmp_path, cifar_root, weights_file):
    r = _run(*_base_args(tmp_path, cifar_root, weights_file), "--taps", "features.19")
    assert r.exit_code == 1
    assert r.output == (
        "Error: unknown tap 'features.19'; valid taps are features.0 ... features.18 "
        "(see `fusion-cache taps`) or a view: early, late, fused, all\n"
    )


def test_cli_missing_dataset_with_no_download(tmp_path, weights_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("extract", "--out", tmp_path / "c.h5", "--data-root", empty, "--weights", weights_file, "--no-download",
             "--dataset", "cifar10")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith(f"Error: CIFAR-10 not found under {empty}/")
    assert "drop --no-download" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "c.h5").exists()


def test_cli_integrity_refusal_names_file_and_flag(tmp_path, cifar_root, weights_file):
    args = [a for a in _base_args(tmp_path, cifar_root, weights_file) if a != "--skip-integrity-check"]
    r = _run(*args)
    assert r.exit_code == 1
    assert "does not match the official CIFAR-10 checksum" in r.output and "--skip-integrity-check" in r.output
    assert "data_batch_1" in r.output and not (tmp_path / "c.h5").exists()


def test_cli_truncated_batch_fails_even_with_the_flag(tmp_path, weights_file):
    root = write_cifar(tmp_path / "broken")
    p = root / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(p.read_bytes()[: 5000])
    r = _run(*_base_args(tmp_path, root, weights_file))
    assert r.exit_code == 1 and "data_batch_3 is truncated or corrupt" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c.h5").exists()


def test_cli_weights_of_another_architecture(tmp_path, cifar_root):
    from torchvision.models import resnet18

    w = tmp_path / "resnet.pth"
    torch.save(resnet18(weights=None).state_dict(), w)
    r = _run(*_base_args(tmp_path, cifar_root, w))
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "does not hold torchvision MobileNetV2 (width 1.0) weights" in r.output and "missing keys" in r.output
    assert not (tmp_path / "c.h5").exists()


def test_cli_weights_pickle_with_code_is_not_run(tmp_path, cifar_root):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    w = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": Evil()}, w)
    r = _run(*_base_args(tmp_path, cifar_root, w))
    assert r.exit_code == 1 and "not a plain state_dict" in r.output and "Traceback" not in r.output
    assert not marker.exists()


def test_cli_unwritable_output(tmp_path, cifar_root, weights_file):
    if os.geteuid() == 0:  # root writes anywhere on a normal filesystem; sysfs refuses even root
        out = Path("/sys/fusion-cache-test.h5")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "c.h5"
    args = _base_args(tmp_path, cifar_root, weights_file)
    args[args.index("--out") + 1] = out
    r = _run(*args)
    assert r.exit_code == 1 and r.output.count("\n") == 2  # the integrity warning, then the error
    assert f"Error: cannot write {out}" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_cli_bad_sizes(tmp_path, cifar_root, weights_file):
    args = _base_args(tmp_path, cifar_root, weights_file)
    args[args.index("--train-size") + 1] = "0"
    r = _run(*args)
    assert r.exit_code == 2 and "must be positive" in r.output
    args[args.index("--train-size") + 1] = "1000"
    r = _run(*args)
    assert r.exit_code == 1 and "--train-size 1000 is larger than the train split (100 images)" in r.output


def test_every_command_has_help_and_a_guide_page_that_shows_it():
    """Beyond the generated docs/cli.md: each command appears in the README or a written docs page."""
    root = Path(__file__).resolve().parents[1]
    guide = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
                    if p.name not in ("cli.md", "index.md"))
    for name, cmd in main.commands.items():
        assert cmd.help, name
        assert f"fusion-cache {name}" in guide, name
        r = _run(name, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output


def test_avgmax_pooling_stores_average_then_max(tmp_path, cifar_root, weights_file):
    extract(_cfg(tmp_path, cifar_root, weights_file, pool="avgmax", image_size=48))
    cache = open_cache(tmp_path / "c.h5")
    assert cache.meta.pool == "avgmax"
    idx = cache.indices("test")
    tf = v2.Compose([v2.Resize(48, antialias=True), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(img) for img in torch.from_numpy(_cifar_arrays(cifar_root, "test")[idx])])
    model = _model(weights_file)
    with torch.no_grad():
        maps = model.features[:14](x)
    got = cache.features("features.13", "test")
    assert got.shape == (10, 2 * 96)
    assert_features_close(got[:, :96], maps.mean(dim=(2, 3)).numpy(), FLOAT32, name="average")
    assert_features_close(got[:, 96:], maps.amax(dim=(2, 3)).numpy(), FLOAT32, name="max")
    extract(_cfg(tmp_path, cifar_root, weights_file, out=tmp_path / "a.h5", image_size=48))  # same, but avg
    assert open_cache(tmp_path / "a.h5").fingerprint != cache.fingerprint


@pytest.mark.parametrize("backbone, folded_bns", [("mobilenet_v2", 52), ("resnet18", 20), ("timm:resnet50", 53)])
def test_folding_batchnorm_keeps_the_function_and_the_tap_names(backbone, folded_bns):
    """Every BatchNorm that takes a convolution's output alone is folded into it: MobileNetV2's (all inside
    Sequentials) and a ResNet's (in its bottlenecks and stem, found in the traced graph). Every tap's pooled
    features stay the same to float rounding, at each tap's own scale."""
    from fusion_cache.backbone import LoadedWeights, PooledExtractor, build_model
    from fusion_cache.backbones import resolve

    torch.manual_seed(0)
    bb = resolve(backbone)
    model = bb.create()
    for k, v in model.state_dict().items():  # affine parameters far from the identity
        if k.endswith(".bias") or k.endswith(".weight") and v.ndim == 1:
            v.uniform_(0.5, 1.5)
    # running statistics of what each BatchNorm receives (far from mean 0, variance 1, so folding really
    # changes the weights), and every tap of order 1
    sd = calibrate_batchnorm(model, 64, seed=0).state_dict()
    w = LoadedWeights("test", "0" * 64, sd, backbone=bb.name)
    plain, folded = build_model(w, fold_bn=False), build_model(w)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) == folded_bns
    table = bb.tap_table()
    taps = list(table.names)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        a = PooledExtractor(plain, taps, None, table)(x)
        b = PooledExtractor(folded, taps, None, table)(x)
    for t in taps:
        assert_order_one(a[t].numpy(), name=t)
    assert_all_taps_close({t: b[t].numpy() for t in taps}, {t: a[t].numpy() for t in taps}, FLOAT32)


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, cifar_root, weights_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from click.testing import CliRunner

    from fusion_cache.cli import main

    r = CliRunner().invoke(main, ["extract", "--out", str(tmp_path / "c.h5"), "--data-root", str(cifar_root),
                                  "--weights", str(weights_file), "--no-download", "--skip-integrity-check",
                                  "--train-size", "20", "--test-size", "10", "--device", "cuda"])
    assert r.exit_code == 1 and "no CUDA GPU is visible; use --device cpu or auto" in r.output
    assert not (tmp_path / "c.h5").exists()


def test_a_half_precision_weights_file_runs_in_float32(cifar_root, weights_file, tmp_path):
    """A state_dict saved in float16 (as many safetensors files are) loads and runs in float32, with the
    features of the float32 weights to fp16 rounding at every tap's own scale, not a dtype traceback."""
    from .hostile import run

    sd = torch.load(weights_file, weights_only=True)
    half = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, half)
    outs = {}
    for name, w in (("half", half), ("full", weights_file)):
        r = run("extract", "--out", tmp_path / f"{name}.h5", "--data-root", cifar_root, "--weights", w,
                "--train-size", 8, "--test-size", 4, "--image-size", 32, "--skip-integrity-check", "--no-progress")
        assert r.exit_code == 0, r.output
        cache = open_cache(tmp_path / f"{name}.h5")
        outs[name] = {t: cache.features(t, "train") for t in cache.taps}
    assert list(outs["half"]) == list(ALL_TAPS)
    assert_all_taps_close(outs["half"], outs["full"], HALF_WEIGHTS)


# ---------------------------------------------------------------------------------------------- workers, precision


def test_folder_decoded_in_worker_processes_is_bit_identical(tmp_path, folder_root, weights_file):
    """--workers 2 (two DataLoader worker processes decode and resize the awkward images: 16-bit, RGBA,
    palette) gives the cache of --workers 0, bit for bit: every tap's features, the labels, the indices."""
    caches = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.h5"
        r = _run("extract", "--out", out, "--dataset", "imagefolder", "--data-root", folder_root, "--weights",
                 weights_file, "--train-size", "all", "--test-size", "all", "--image-size", 32, "--batch-size", 4,
                 "--workers", workers, "--no-progress")
        assert r.exit_code == 0, r.output
        caches[workers] = open_cache(out)
    a, b = caches[0], caches[2]
    assert a.fingerprint == b.fingerprint and a.taps == b.taps == list(ALL_TAPS)
    for split in ("train", "test"):
        assert len(a.labels(split)) == {"train": 15, "test": 6}[split]
        np.testing.assert_array_equal(b.labels(split), a.labels(split))
        np.testing.assert_array_equal(b.indices(split), a.indices(split))
        for tap in a.taps:
            fa, fb = a.features(tap, split), b.features(tap, split)
            assert fa.dtype == fb.dtype == np.float32 and fa.tobytes() == fb.tobytes(), (split, tap)
            assert_order_one(fa, name=tap)


def test_bf16_and_float16_are_close_to_fp32_and_never_reused_for_each_other(tmp_path, cifar_root, weights_file):
    """--precision bf16 (autocast) and --dtype float16 (storage) give the fp32 features to a stated bound at
    every tap's own scale (bf16: BF16 of max|f|, float16: FLOAT16; tests/features.py). Precision and dtype
    are in the fingerprint: a cache of one is refused (not reused, not replaced) for a request of another,
    both ways, until --force rebuilds it with the new setting."""
    base = [a for a in _base_args(tmp_path, cifar_root, weights_file) if a != tmp_path / "c.h5"]
    out = base.index("--out") + 1
    runs = {"fp32": (), "bf16": ("--precision", "bf16"), "f16": ("--dtype", "float16")}

    def run(name, path, *extra):
        args = list(base)
        args.insert(out, path)
        return _run(*args, *runs[name], *extra)

    caches = {}
    threads = torch.get_num_threads()
    # one thread: bf16 autocast on a CPU without native bf16, its OpenMP threads on shared cores, can stall
    # (measured: 10 images at 32 px from 0.25 s to 100 s)
    torch.set_num_threads(1)
    try:
        for name in runs:
            r = run(name, tmp_path / f"{name}.h5")
            assert r.exit_code == 0 and "wrote" in r.output, r.output
            caches[name] = open_cache(tmp_path / f"{name}.h5")
    finally:
        torch.set_num_threads(threads)
    fp32, bf16, f16 = caches["fp32"], caches["bf16"], caches["f16"]
    assert (fp32.meta.precision, fp32.meta.dtype) == ("fp32", "float32")
    assert (bf16.meta.precision, bf16.meta.dtype) == ("bf16", "float32")
    assert (f16.meta.precision, f16.meta.dtype) == ("fp32", "float16")
    assert len({fp32.fingerprint, bf16.fingerprint, f16.fingerprint}) == 3
    for split in ("train", "test"):
        ref = {t: fp32.features(t, split) for t in fp32.taps}
        assert len(ref) == len(ALL_TAPS)
        assert all(bf16.features(t, split).dtype == np.float32 for t in bf16.taps)
        assert all(f16.features(t, split).dtype == np.float16 for t in f16.taps)
        errors = assert_all_taps_close({t: bf16.features(t, split) for t in bf16.taps}, ref, BF16)
        assert max(errors.values()) > 10 * FLOAT32, errors  # bf16 really ran (measured: 0.09 to 0.115)
        assert_all_taps_close({t: f16.features(t, split) for t in f16.taps}, ref, FLOAT16)

    # every other setting requested on each cache: refused with the same message, the file untouched
    for have, want in (("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "f16"), ("f16", "fp32")):
        path = tmp_path / f"{have}.h5"
        before = (path.stat().st_mtime_ns, caches[have].fingerprint)
        r = run(want, path)
        assert r.exit_code == 1, (have, want, r.output)
        assert r.output.splitlines()[-1] == (f"Error: {path} exists and was built with other settings; pass --force "
                                             "to replace it, or choose another --out"), (have, want, r.output)
        assert (path.stat().st_mtime_ns, open_cache(path).fingerprint) == before, (have, want)
    r = run("bf16", tmp_path / "bf16.h5")  # the same settings are still reused
    assert r.exit_code == 0 and "reused" in r.output, r.output
    r = run("f16", tmp_path / "fp32.h5", "--force")  # --force rebuilds with the setting asked for
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    rebuilt = open_cache(tmp_path / "fp32.h5")
    assert rebuilt.meta.dtype == "float16" and rebuilt.fingerprint == f16.fingerprint
