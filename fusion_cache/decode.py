"""Image files to uint8 RGB tensors: the one place where bytes are decoded, checked against the plan's digest,
and made RGB. Sources list items; engines call `read_image`."""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from .files import OPEN_FLAGS, display_path, file_kind, reason

MAX_PIXELS = 8192 * 8192  # larger images are refused before decoding (decompression bombs)
MAX_ASPECT = 50  # longer side / shorter side; a 200000x1 image would resize to a 25-gigapixel raster
REDUCE_MARGIN = 2  # reduced decoding keeps the shorter side at least this many times the network's input size
EXIF_ORIENTATION = 0x0112


def describe(reduce: bool) -> str:
    """How files become pixels, recorded in every cache's fingerprint (`decode`)."""
    how = (f"JPEG decoded at a reduced DCT scale and other formats box-reduced, keeping the shorter side at least "
           f"{REDUCE_MARGIN}x image_size" if reduce else "decoded at full size")
    return f"EXIF orientation applied; {how}; alpha on white, 16-bit scaled to 8-bit, then RGB"


def reduce_for(description: str, image_size: int) -> int | None:
    """`read_image`'s `reduce_to` for files decoded as a cache's `decode` attribute says (predict's images are
    decoded as the cache's were)."""
    return image_size if description == describe(True) else None


class BadImage(Exception):
    """An image file that cannot be decoded. Its message is "<display name>: <reason>" on one line."""


class ChangedImage(Exception):
    """An image file whose bytes are not the ones the plan hashed: never skipped, always an error."""


def read_image(path: str | Path, name: str | None = None, sha256: str | None = None,
               reduce_to: int | None = None) -> torch.Tensor:
    """Any image file -> uint8 (3, H, W) RGB, upright (its EXIF orientation applied). Grayscale, palette, RGBA,
    CMYK and 16-bit all convert (see `_decode`).

    With `reduce_to` (the network's input size), an image whose shorter side is at least `REDUCE_MARGIN` times
    larger is decoded reduced, so that its shorter side stays at least `REDUCE_MARGIN * reduce_to` (and at
    most twice that): a JPEG (or a camera's MPO) is decoded by libjpeg at the smallest DCT scale that leaves this
    (1/2, 1/4 or 1/8: PIL's `draft`), then any image is box-reduced (`Image.reduce`) by the integer factor left,
    after its EXIF orientation and mode conversion, so a tagged file reduces exactly as the same pixels stored
    upright. The full-size raster of a reduced JPEG is never made; without `reduce_to`, nothing is reduced and
    the pixels are PIL's full decode made RGB, exactly as before reduced decoding.

    Raises `BadImage` ("<name>: <reason>", one printable line; `name` defaults to `display_path(path)`) for
    anything that is not a decodable image: a missing file or broken link, a FIFO, socket or device (never
    opened for reading: the file is opened non-blocking and checked with fstat first), an empty or
    undecodable file, and an image over `MAX_PIXELS` pixels or with an aspect ratio over `MAX_ASPECT`
    (checked on the header's size, before the raster is decoded; PIL's own decompression-bomb error and
    warning count too). Other warnings from PIL or torch while reading are silenced.

    With `sha256` (the digest the plan listed), the file is mapped once, its bytes checked, and the image
    decoded from that mapping: other content, or a file that can no longer be opened as the regular file it
    was, raises `ChangedImage` (never a skippable `BadImage`), so an image that changed after it was listed,
    or a node that holds other bytes or no file under the same path, can never change what is extracted.
    """
    shown = name if name is not None else display_path(path)
    planned = sha256 is not None

    def gone(reason: str) -> Exception:
        if planned:
            return ChangedImage(f"{shown} is not the file that was planned: it was readable when listed, and now "
                                f"{reason}")
        return BadImage(f"{shown}: {reason}")

    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        raise gone(reason(e)) from None
    with os.fdopen(fd, "rb") as f, contextlib.ExitStack() as stack:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise gone(reason(e)) from None
        if not stat.S_ISREG(st.st_mode):
            raise gone(f"{file_kind(st.st_mode)}, not an image file")
        source = f
        if planned:
            try:  # mapped, not read: the memory stays the page cache's, whatever the file's size
                source = stack.enter_context(mmap.mmap(fd, 0, access=mmap.ACCESS_READ)) if st.st_size else b""
            except (OSError, ValueError) as e:
                raise gone(reason(e) if isinstance(e, OSError) else str(e)) from None
            got = hashlib.sha256(source).hexdigest()
            if got != sha256:
                raise ChangedImage(f"{shown} is not the file that was planned: its content has sha256 {got[:12]}…, "
                                   f"the plan's {sha256[:12]}…")
        if st.st_size == 0:
            raise BadImage(f"{shown}: empty file (0 bytes)")
        return _decode_checked(source, shown, reduce_to)


def decode_bytes(data: bytes, name: str, sha256: str | None = None, reduce_to: int | None = None) -> torch.Tensor:
    """An image's bytes (an item inside a container: a parquet cell, a tar member) -> uint8 (3, H, W) RGB, decoded
    exactly as `read_image` decodes the same bytes in a file. With `sha256` (the plan's digest), other bytes raise
    `ChangedImage`; undecodable bytes raise `BadImage` ("<name>: <reason>")."""
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise ChangedImage(f"{name} is not the image that was planned: its content has sha256 {got[:12]}…, "
                               f"the plan's {sha256[:12]}…")
    if not len(data):
        raise BadImage(f"{name}: empty image (0 bytes)")
    return _decode_checked(io.BytesIO(data), name, reduce_to)


def _decode_checked(source, shown: str, reduce_to: int | None) -> torch.Tensor:
    """`_decode` of a file object or mapping, every failure a one-line `BadImage`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(source, reduce_to)
    except _TooLarge as e:
        raise BadImage(f"{shown}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m[1]) / 1e6:.0f} megapixels" if m else "too many pixels"
        raise BadImage(f"{shown}: image of {size}, over the {MAX_PIXELS / 1e6:.0f}-megapixel limit "
                       "(a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise BadImage(f"{shown}: not an image PIL can decode (unknown or damaged format)") from None
    except MemoryError:
        raise BadImage(f"{shown}: too large to decode in memory") from None
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        text = display_path(str(e))[:200]
        raise BadImage(f"{shown}: {type(e).__name__}: {text}") from None


class _TooLarge(Exception):
    pass


def reduce_factor(size: tuple[int, int], reduce_to: int | None) -> int:
    """The integer factor by which an image of `size` may shrink and keep its shorter side at least
    REDUCE_MARGIN * reduce_to (1: decode at full size)."""
    if not reduce_to:
        return 1
    return max(1, min(size) // (REDUCE_MARGIN * reduce_to))


def dct_scale(factor: int) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8: decode at 1/scale) for a reduction by `factor`: the largest not over it,
    so that the decoded shorter side, ceil(side / scale), stays at least side / factor."""
    return next(s for s in (8, 4, 2, 1) if s <= max(factor, 1))


def decodes_as_before(path: str | Path, reduce_to: int | None) -> bool:
    """Whether this file decodes to the same pixels as before schema 4 (full size, EXIF ignored): it carries no
    EXIF rotation and is not reduced. Reads the header only, of a regular file opened non-blocking (never a
    FIFO); a file that cannot be opened or read counts as changed."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            with Image.open(f) as im:
                if im.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
                    return False
                return reduce_factor(im.size, reduce_to) == 1
        except Exception:
            return False


def _decode(f, reduce_to: int | None = None) -> torch.Tensor:
    """Bytes -> uint8 (3, H, W), in this order: a JPEG's DCT-scale draft (with `reduce_to`), the EXIF orientation,
    the conversion to RGB, the box reduction left (with `reduce_to`). Modes become RGB one way: 16- and 32-bit
    gray scale to 8 bits (by 65535, or by the image's maximum for 32-bit), float by 255; alpha (RGBA, LA, a
    palette's transparency) is composited on white; everything else is PIL's `convert("RGB")` (CMYK, YCbCr,
    palette, 1-bit, L). A grayscale or CMYK JPEG is drafted in its own mode and converted after."""
    with Image.open(f) as im:
        w, h = im.size
        if w < 1 or h < 1:
            raise _TooLarge(f"image of {w}x{h} pixels has no pixels")
        if w * h > MAX_PIXELS:
            raise _TooLarge(f"image of {w}x{h} pixels ({w * h / 1e6:.0f} megapixels) is over the "
                            f"{MAX_PIXELS / 1e6:.0f}-megapixel limit (a decompression bomb?)")
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise _TooLarge(f"image of {w}x{h} pixels has an aspect ratio over {MAX_ASPECT}:1")
        scale = dct_scale(reduce_factor((w, h), reduce_to)) if isinstance(im, JpegImagePlugin.JpegImageFile) else 1
        if scale > 1:  # a JPEG (or a camera's MPO, which is one) decoded at 1/scale by libjpeg itself
            # PIL's draft picks the largest of 8, 4, 2, 1 not over min(w // size[0], h // size[1]); for
            # size = (w // scale, h // scale) that is in [scale, 2 scale), so exactly `scale`.
            im.draft(im.mode, (w // scale, h // scale))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # upright, as a person sees it (a no-op without an EXIF orientation)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        rgb = im.convert("RGB")
    factor = reduce_factor(rgb.size, reduce_to)  # what the DCT scale left to reduce, or the whole factor
    if factor > 1:
        rgb = rgb.reduce(factor)
    return TF.pil_to_tensor(rgb)
