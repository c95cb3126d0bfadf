"""How files become pixels (decode.read_image): EXIF orientation applied, large images decoded reduced (a JPEG at a
smaller DCT scale, other formats box-reduced) keeping the shorter side at least REDUCE_MARGIN x the input size,
and --full-decode exactly the decoding from before. Real formats, written here from a real photograph
(scikit-learn's china.jpg and flower.jpg); every expected value comes from PIL or numpy directly, not from
read_image itself."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from fusion_cache import decode
from fusion_cache.backbone import PooledExtractor, Preprocess, build_model, load_weights
from fusion_cache.cache import open_cache
from fusion_cache.cli import main
from fusion_cache.decode import read_image
from fusion_cache.sources import LoadOptions
from fusion_cache.sources import load as load_listing

from .conftest import REAL_DATA_ENV, real_data

# The margin the docs state, and the cosine measured at it (scripts/decode_check.py: 12 camera-size JPEGs made
# from real photos, ImageNet MobileNetV2, 224, 184 and 128 px, every tap: worst 0.9933 at 184 px, the worst
# case of the margin; 0.9979 on this file's 1600 x 1200 photos at 64 px).
MARGIN = 2
STATED_COSINE = 0.993

# EXIF orientation -> what a viewer does to the stored (H, W, 3) raster to show it upright (the EXIF spec).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left to right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top to bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # stored turned 90 counter-clockwise: shown rotated 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # shown rotated 90 counter-clockwise
}


def photo(name: str = "china.jpg", size: tuple[int, int] = (1600, 1200), grain: bool = True,
          seed: int = 0) -> Image.Image:
    """A real photograph at `size` (4:3 crop, Lanczos upscale); `grain`: an unsharp mask and noise of sigma 4,
    the pixel-level detail a camera photo has and an upscale lacks."""
    from sklearn.datasets import load_sample_image

    im = Image.fromarray(load_sample_image(name)).crop((35, 0, 604, 427))  # 569 x 427, 4:3
    big = im.resize(size, Image.Resampling.LANCZOS)
    if not grain:
        return big
    arr = np.asarray(big.filter(ImageFilter.UnsharpMask(radius=2, percent=80, threshold=0)), np.float32)
    arr += np.random.default_rng(seed).normal(0, 4, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def save_image(im: Image.Image, path: Path, fmt: str = "JPEG", orientation: int | None = None) -> Path:
    """`im` as a JPEG (quality 90) or PNG file, with an EXIF orientation tag when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"quality": 90} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[decode.EXIF_ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    im.save(path, fmt, **kw)
    if orientation is not None:
        assert Image.open(path).getexif()[decode.EXIF_ORIENTATION] == orientation
    return path


def save_jpeg(im: Image.Image, path: Path, orientation: int | None = None) -> Path:
    return save_image(im, path, "JPEG", orientation)


def hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


def pil_rgb(path: Path) -> np.ndarray:
    """The old decoding: PIL's full decode made RGB, EXIF ignored."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def extract_args(root: Path, out: Path, weights_file: Path, image_size: int, *more) -> list:
    return ["extract", "--out", out, "--data-root", root, "--dataset", "imagefolder", "--weights", weights_file,
            "--image-size", image_size, "--batch-size", 64, "--workers", 0, "--no-download", "--no-progress", *more]


def all_features(path: Path) -> dict[str, dict[str, np.ndarray]]:
    cache = open_cache(path)
    return {s: {t: cache.features(t, s) for t in cache.taps} for s in ("train", "test")}


# ---------------------------------------------------------------------------------------------- EXIF


# (format, size, reduce_to): at full size; a JPEG drafted at 1/4 (640 x 480 at 32: 160 x 120); drafted at 1/8
# and then box-reduced by 4 (1600 x 1200 at 16: 200 x 150, then 50 x 38: the sizes do not divide, so reducing
# before or after the rotation gives other pixels); a PNG box-reduced by 7 (650 x 490 at 32: 93 x 70)
EXIF_CASES = {"full": ("JPEG", (96, 64), None), "drafted": ("JPEG", (640, 480), 32),
              "drafted-and-reduced": ("JPEG", (1600, 1200), 16), "png-reduced": ("PNG", (650, 490), 32)}


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("case", list(EXIF_CASES))
def test_exif_orientation_gives_the_physically_rotated_pixels(tmp_path, orientation, case):
    """A file tagged with an EXIF orientation decodes to its stored raster turned upright (numpy, by the EXIF
    spec) and then box-reduced: a JPEG's DCT draft is of the stored raster, the box reduction of the upright
    one, so a PNG holding the upright pixels decodes to exactly the same."""
    fmt, size, reduce_to = EXIF_CASES[case]
    im = photo(size=size)
    tagged = save_image(im, tmp_path / f"tagged.{fmt.lower()}", fmt, orientation)
    plain = save_image(im, tmp_path / f"plain.{fmt.lower()}", fmt)
    assert np.array_equal(pil_rgb(tagged), pil_rgb(plain))  # the same raster; only the EXIF tag differs
    with Image.open(plain) as p:  # the expected pixels, from PIL and numpy directly
        w, h = p.size
        f = max(1, min(w, h) // (MARGIN * reduce_to)) if reduce_to else 1
        s = max(d for d in (1, 2, 4, 8) if d <= f) if fmt == "JPEG" else 1
        if s > 1:
            p.draft(p.mode, (w // s, h // s))
        upright = Image.fromarray(np.ascontiguousarray(UPRIGHT[orientation](np.asarray(p.convert("RGB")))))
    left = max(1, min(upright.size) // (MARGIN * reduce_to)) if reduce_to else 1
    expected = np.asarray(upright.reduce(left) if left > 1 else upright)
    got = hwc(read_image(tagged, reduce_to=reduce_to))
    assert got.shape == expected.shape and np.array_equal(got, expected), (got.shape, expected.shape)
    unturned = hwc(read_image(plain, reduce_to=reduce_to))
    assert unturned.shape != expected.shape or not np.array_equal(unturned, expected)  # the test can fail
    if fmt == "PNG":  # lossless: the same pixels stored upright decode to exactly the same
        upright_file = tmp_path / "upright.png"
        Image.fromarray(np.ascontiguousarray(UPRIGHT[orientation](np.asarray(im)))).save(upright_file)
        assert np.array_equal(got, hwc(read_image(upright_file, reduce_to=reduce_to)))
    if case.startswith("drafted"):
        assert (s, left) == ((4, 1) if case == "drafted" else (8, 4))


def test_an_exif_rotated_jpeg_extracts_as_the_rotated_image(tmp_path, weights_file):
    """`fusion-cache extract` of JPEGs tagged with orientations 6, 8, 5 (mirrored), 2 (mirrored) and 3 caches
    exactly the features of the same pixels stored physically rotated, as PNG (lossless). 320 x 240 at 32 px is
    drafted at 1/2 scale, so the rotation is checked on the reduced path too."""
    layout = {"train/a/0": 6, "train/a/1": 1, "train/b/0": 8, "train/b/1": 5, "test/a/0": 2, "test/b/0": 3}
    tagged, rotated, unrotated = tmp_path / "tagged", tmp_path / "rotated", tmp_path / "unrotated"
    for i, (stem, o) in enumerate(layout.items()):
        im = photo("china.jpg" if i % 2 else "flower.jpg", size=(320, 240), seed=i)
        save_jpeg(im, tagged / f"{stem}.jpg", o)
        pixels = hwc(read_image(save_jpeg(im, tmp_path / "plain" / f"{stem}.jpg"), reduce_to=32))
        for root, a in ((rotated, UPRIGHT[o](pixels)), (unrotated, pixels)):
            (root / stem).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(a)).save(root / f"{stem}.png")
    caches = {}
    for root in (tagged, rotated, unrotated):
        r = run(*extract_args(root, tmp_path / f"{root.name}.h5", weights_file, 32))
        assert r.exit_code == 0, r.output
        caches[root.name] = all_features(tmp_path / f"{root.name}.h5")
    assert "EXIF orientation applied" in open_cache(tmp_path / "tagged.h5").meta.decode  # in the provenance
    for split in ("train", "test"):
        for tap, got in caches["tagged"][split].items():
            np.testing.assert_array_equal(got, caches["rotated"][split][tap], err_msg=f"{split} {tap}")
    late = caches["tagged"]["train"]["features.18"]
    assert not np.allclose(late, caches["unrotated"]["train"]["features.18"])  # rotation changes the features


# ---------------------------------------------------------------------------------------------- reduced decoding


def expected_reduced(path: Path, reduce_to: int) -> np.ndarray:
    """What the docs promise, worked out with PIL directly: factor f = shorter side // (MARGIN x reduce_to); a
    JPEG decoded by libjpeg at the largest DCT scale s in (1, 2, 4, 8) not over f, then box-reduced by
    (its shorter side // (MARGIN x reduce_to)); another format box-reduced by f after conversion to RGB."""
    with Image.open(path) as im:
        w, h = im.size
        f = max(1, min(w, h) // (MARGIN * reduce_to))
        if im.format in ("JPEG", "MPO"):
            s = max(d for d in (1, 2, 4, 8) if d <= f)
            if s > 1:
                im.draft(im.mode, (w // s, h // s))
                assert im.size == (math.ceil(w / s), math.ceil(h / s))
        rgb = im.convert("RGB")
    left = max(1, min(rgb.size) // (MARGIN * reduce_to))
    return np.asarray(rgb.reduce(left) if left > 1 else rgb)


SIZES = [(1600, 1200), (1279, 959), (1023, 767), (4001, 257), (257, 300), (127, 127), (130, 128)]


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG"])
def test_reduced_decoding_keeps_the_margin_and_no_more(tmp_path, fmt):
    """For every size and input size: the decoded shorter side is at least MARGIN x reduce_to when the file's is,
    at most about twice that (the file was reduced as far as the margin allows), and the pixels are exactly
    PIL's reduced decode: the DCT draft for a JPEG (and a camera's MPO, a JPEG with a second frame), the box
    reduce for other formats; a file too small to reduce decodes exactly as without reduce_to."""
    assert decode.REDUCE_MARGIN == MARGIN  # the margin the docs state and the cosine was measured at
    src = photo(size=(1600, 1200), grain=True)
    drafted = reduced = 0
    for i, (w, h) in enumerate(SIZES):
        im = src.resize((w, h), Image.Resampling.BILINEAR)
        f = tmp_path / f"{i}.{fmt.lower()}"
        if fmt == "MPO":
            im.save(f, "MPO", quality=90, save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
            assert Image.open(f).format == "MPO"
        else:
            im.save(f, fmt, quality=90) if fmt == "JPEG" else im.save(f, fmt)
        for reduce_to in (16, 32, 64, 100):
            got = hwc(read_image(f, reduce_to=reduce_to))
            side, floor = min(got.shape[:2]), MARGIN * reduce_to
            if min(w, h) < floor:
                assert np.array_equal(got, hwc(read_image(f))), (w, h, reduce_to)
                continue
            assert floor <= side <= 2 * floor, (w, h, reduce_to, got.shape)
            assert np.array_equal(got, expected_reduced(f, reduce_to)), (w, h, reduce_to)
            factor = min(w, h) // floor
            drafted += fmt != "PNG" and factor >= 2
            reduced += side < min(w, h)
    assert reduced >= 10 and (drafted >= 10 or fmt == "PNG")  # both kinds of factor exercised, many times


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_draft_and_become_rgb(tmp_path, mode):
    """A grayscale or CMYK JPEG drafts in its own mode and converts as at full size: the same reduced size as
    an RGB JPEG, gray in R = G = B, and within JPEG's noise of the full decode reduced the same way."""
    rgb = photo(size=(800, 600))
    f = tmp_path / f"{mode}.jpg"
    rgb.convert(mode).save(f, "JPEG", quality=90)
    assert Image.open(f).mode == mode
    got = hwc(read_image(f, reduce_to=32))  # factor 600 // 64 = 9: 1/8 DCT scale, 100 x 75
    assert got.shape == (75, 100, 3)
    assert np.array_equal(got, expected_reduced(f, 32))
    if mode == "L":
        assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])
    full = Image.fromarray(hwc(read_image(f))).reduce(8)
    assert np.abs(got.astype(int) - np.asarray(full, int)).mean() < 3


@pytest.mark.parametrize("kind", ["rgba", "palette", "gray16"])
def test_other_modes_reduce_after_the_conversion(tmp_path, kind):
    """PNGs of other modes are converted to RGB exactly as at full size (tests/test_images.py), then box-reduced."""
    arr = np.asarray(photo(size=(640, 480), grain=False))
    if kind == "rgba":
        alpha = np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))[..., None]
        im = Image.fromarray(np.concatenate([arr, alpha], axis=2), "RGBA")
    elif kind == "palette":
        im = Image.fromarray(arr).quantize(64)
    else:
        im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)  # I;16
    f = tmp_path / f"{kind}.png"
    im.save(f)
    full = hwc(read_image(f))
    got = hwc(read_image(f, reduce_to=32))  # factor 480 // 64 = 7
    assert got.shape == (69, 92, 3)
    assert np.array_equal(got, np.asarray(Image.fromarray(full).reduce(7)))


def test_reduced_network_input_is_close_to_the_full_decode(tmp_path):
    """What the network sees (the 64 px input after Preprocess.resize) from a 1600 x 1200 photo decoded at 1/8
    scale (200 x 150) is within a grey level on average of the full decode's (measured 0.4 to 0.75; at margin 1,
    decoded 100 x 75, 1.3 to 2.0)."""
    pre = Preprocess(64)
    for name in ("china.jpg", "flower.jpg"):
        f = save_jpeg(photo(name), tmp_path / name)
        full = pre.resize(read_image(f)).int()
        reduced = read_image(f, reduce_to=64)
        assert tuple(reduced.shape[1:]) == (150, 200)
        diff = (pre.resize(reduced).int() - full).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 16, (name, float(diff.mean()), int(diff.max()))


@pytest.mark.skipif(real_data() is None, reason=f"{REAL_DATA_ENV} not set to the shared data folder")
def test_reduced_features_are_within_the_stated_cosine_of_the_full_decode(tmp_path):
    """With the real ImageNet MobileNetV2, every tap's features from reduced decoding have a cosine of at least
    STATED_COSINE (the docs' figure) with the full decode's, on 1600 x 1200 photos at 64 px (measured worst
    0.9979, at features.18)."""
    weights = load_weights(str(real_data()[1]))
    table = decode_table()
    ex = PooledExtractor(build_model(weights).to(memory_format=torch.channels_last), list(table.names), None,
                         table).eval()
    pre = Preprocess(64)
    files = [save_jpeg(photo(name, seed=i), tmp_path / name) for i, name in enumerate(("china.jpg", "flower.jpg"))]

    def features(reduce_to):
        x = pre.normalize(torch.stack([pre.resize(read_image(f, reduce_to=reduce_to)) for f in files]))
        with torch.inference_mode():
            return {t: v.double().numpy() for t, v in ex(x.contiguous(memory_format=torch.channels_last)).items()}

    full, reduced = features(None), features(64)
    for t in table.names:
        cos = (full[t] * reduced[t]).sum(1) / (np.linalg.norm(full[t], axis=1) * np.linalg.norm(reduced[t], axis=1))
        assert cos.min() >= STATED_COSINE, (t, cos)
        assert not np.array_equal(full[t], reduced[t])  # it was reduced


def decode_table():
    from fusion_cache.backbones import resolve

    return resolve("mobilenet_v2").tap_table()


# ---------------------------------------------------------------------------------------------- --full-decode


def test_full_decode_is_the_old_decoding_bit_for_bit_and_never_shares_a_cache(tmp_path, weights_file):
    """--full-decode caches exactly what the decoding before reduced decoding gave: PIL's full decode made RGB,
    the cache's own Preprocess resize, the forward as extract builds it, the same batches. Without it, large
    files are reduced: other features, another fingerprint, and neither cache is reused for the other."""
    root = tmp_path / "photos"
    stems = ["train/a/0", "train/a/1", "train/b/0", "train/b/1", "test/a/0", "test/b/0"]
    for i, stem in enumerate(stems):
        save_jpeg(photo("china.jpg" if i % 2 else "flower.jpg", size=(800, 600), seed=i), root / f"{stem}.jpg")
    full_out, reduced_out = tmp_path / "full.h5", tmp_path / "reduced.h5"
    r = run(*extract_args(root, full_out, weights_file, 64, "--full-decode"))
    assert r.exit_code == 0, r.output
    r = run(*extract_args(root, reduced_out, weights_file, 64))
    assert r.exit_code == 0, r.output
    full, reduced = open_cache(full_out), open_cache(reduced_out)

    # the old path, by hand: no read_image, no reduce_to
    pre = Preprocess(full.meta.image_size, full.meta.mean, full.meta.std, full.meta.interpolation)
    model = build_model(load_weights(str(weights_file))).to(memory_format=torch.channels_last)
    ex = PooledExtractor(model, list(full.taps), full.meta.pool, full.meta.table).eval()
    listing = load_listing("imagefolder", root, LoadOptions()).given
    for split in ("train", "test"):
        files = [listing[split].file(int(i)) for i in full.indices(split)]
        images = torch.stack([pre.resize(TF.pil_to_tensor(Image.open(f).convert("RGB"))) for f in files])
        with torch.inference_mode():
            ref = ex(pre.normalize(images).contiguous(memory_format=torch.channels_last))
        for t in full.taps:
            np.testing.assert_array_equal(full.features(t, split), ref[t].numpy(), err_msg=f"{split} {t}")
            assert not np.array_equal(reduced.features(t, split), ref[t].numpy())  # 800 x 600 at 64: reduced

    assert full.meta.decode != reduced.meta.decode and "decoded at full size" in full.meta.decode
    assert full.meta.fingerprint != reduced.meta.fingerprint
    for out, flag in ((full_out, ()), (reduced_out, ("--full-decode",))):  # each cache, asked the other way
        before = out.read_bytes()
        r = run(*extract_args(root, out, weights_file, 64, *flag))
        assert r.exit_code != 0 and "built with other settings" in r.output and "--force" in r.output, r.output
        assert out.read_bytes() == before
    r = run(*extract_args(root, full_out, weights_file, 64, "--force"))
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    assert open_cache(full_out).meta.fingerprint == reduced.meta.fingerprint
