"""Image conversion (data.read_image): every mode PIL opens becomes uint8 RGB, each pixel worked out by hand.
Transparent pixels are composited on white: out = a c + (1 - a) 255 with a = alpha / 255; the alphas below
(0, 51, 153, 255: a = 0, 0.2, 0.6, 1) make every expected value an integer, so rounding cannot hide a bug.
16-bit grayscale scales by 255 / 65535, 32-bit integers by 255 / their maximum, floats by 255 (1.0 is white),
each rounded half up and clipped to 0..255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_cache.decode import read_image


def rgb_of(path: Path) -> np.ndarray:
    """read_image's (3, H, W) uint8 tensor as (H, W, 3) integers."""
    t = read_image(path)
    assert t.dtype == torch.uint8 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy().astype(int)


def gray(values) -> np.ndarray:
    """An (H, W) gray level replicated into R, G and B."""
    return np.repeat(np.asarray(values)[..., None], 3, axis=2)


def on_white(rgb, alpha) -> np.ndarray:
    """a c + (1 - a) 255, rounded half up: the composite the hand-written values below come from."""
    a = np.asarray(alpha, np.float64)[..., None] / 255
    return np.floor(a * np.asarray(rgb) + (1 - a) * 255 + 0.5).astype(int)


def test_rgba_is_composited_on_white(tmp_path):
    px = np.array([[[100, 0, 255, 51], [50, 200, 10, 153]],
                   [[10, 20, 30, 0], [200, 100, 0, 255]]], np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    # 0.2 c + 204 | 0.6 c + 102 / fully transparent: white | opaque: the pixel itself
    expected = [[[224, 204, 255], [132, 222, 108]],
                [[255, 255, 255], [200, 100, 0]]]
    assert on_white(px[..., :3], px[..., 3]).tolist() == expected
    assert rgb_of(tmp_path / "a.png").tolist() == expected


def test_gray_with_alpha_is_composited_on_white(tmp_path):
    px = np.array([[[100, 51], [50, 153]], [[10, 0], [200, 255]]], np.uint8)
    Image.fromarray(px, "LA").save(tmp_path / "la.png")
    expected = gray([[224, 132], [255, 200]])
    assert rgb_of(tmp_path / "la.png").tolist() == expected.tolist()


def test_palette_with_a_transparent_index(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 128, 0, 0, 0, 255])  # red, green, blue
    im.save(tmp_path / "p.png", transparency=1)  # green is fully transparent
    assert Image.open(tmp_path / "p.png").info["transparency"] == 1
    assert rgb_of(tmp_path / "p.png").tolist() == [[[255, 0, 0], [255, 255, 255]],
                                                   [[0, 0, 255], [255, 255, 255]]]


def test_palette_with_an_alpha_per_entry(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 100, 0, 0, 0, 255])  # red, dark green, blue
    im.save(tmp_path / "p.png", transparency=bytes([255, 51, 0]))  # opaque, a = 0.2, transparent
    # dark green at a = 0.2: (0.2 * 0 + 204, 0.2 * 100 + 204, 204)
    assert rgb_of(tmp_path / "p.png").tolist() == [[[255, 0, 0], [204, 224, 204]],
                                                   [[255, 255, 255], [255, 0, 0]]]


def test_16_bit_gray_scales_by_65535(tmp_path):
    px = np.array([[0, 25700, 65535], [65407, 1000, 32768]], np.uint16)
    Image.fromarray(px).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    # v / 65535 * 255: 0 | 25700 = 257 x 100: 100 | 255 /
    # 65407: 254.502 -> 255 (by 65536: 254.498 -> 254) | 1000: 3.891 -> 4 (v >> 8 or truncation: 3) |
    # 32768: 127.502 -> 128
    assert rgb_of(tmp_path / "g16.png").tolist() == gray([[0, 100, 255], [255, 4, 128]]).tolist()


def test_32_bit_integers_scale_by_their_maximum(tmp_path):
    px = np.array([[-5, 0, 100], [200, 400, 399]], np.int32)
    Image.fromarray(px, "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    # v / 400 * 255: negative clips to 0 | 0 | 63.75 -> 64 / 127.5 -> 128 (half up) | 255 | 254.36 -> 254
    assert rgb_of(tmp_path / "i.tif").tolist() == gray([[0, 0, 64], [128, 255, 254]]).tolist()


def test_float_images_scale_by_255(tmp_path):
    px = np.array([[0.0, 0.25, 0.5], [1.0, 2.0, -1.0]], np.float32)
    Image.fromarray(px, "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    # v * 255: 0 | 63.75 -> 64 | 127.5 -> 128 / 255 | over 1: 255 | negative: 0
    assert rgb_of(tmp_path / "f.tif").tolist() == gray([[0, 64, 128], [255, 255, 0]]).tolist()


def test_cmyk(tmp_path):
    px = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 255, 0, 102], [0, 0, 0, 51]]], np.uint8)
    Image.fromarray(px, "CMYK").save(tmp_path / "c.tif")  # TIFF keeps CMYK losslessly
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    # (255 - c)(255 - k) / 255 per channel: no ink: white | full cyan: (0, 255, 255) /
    # full magenta with k = 102: (153, 0, 153) | k = 51 alone: 204 gray
    assert rgb_of(tmp_path / "c.tif").tolist() == [[[255, 255, 255], [0, 255, 255]],
                                                   [[153, 0, 153], [204, 204, 204]]]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_gray_and_bilevel(tmp_path, mode):
    px = np.array([[0, 255], [255, 0]], np.uint8) if mode == "1" else np.array([[0, 17], [128, 255]], np.uint8)
    Image.fromarray(px, "L").convert(mode).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == mode
    assert rgb_of(tmp_path / "g.png").tolist() == gray(px).tolist()
