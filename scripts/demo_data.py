"""Write the demo's images: scikit-learn's bundled handwritten digits as a folder of class folders.

    python scripts/demo_data.py OUT_DIR [--size 32] [--per-class N]

OUT_DIR/<digit>/<index>.png for the 1,797 8x8 images of `sklearn.datasets.load_digits()` (10 classes, 0 to 9;
the data ships inside scikit-learn, so nothing is downloaded). Each image is drawn as dark ink on white (a
pixel's 0..16 of ink becomes the gray level 255 - round(255 * ink / 16)), enlarged by nearest neighbour to
--size pixels (a multiple of 8: every source pixel becomes a square block) and saved as an RGB PNG. `index` is
the image's position in load_digits(), so `3/0042.png` is `load_digits().images[42]`. --per-class N keeps the
first N images of each class, in that order.

The folder is written beside OUT_DIR under a hidden temporary name and renamed into place when complete, with
a record (OUT_DIR/.demo-digits.json: the settings and each file's sha256). Running the script again on a
complete folder written with the same settings writes nothing and says so. Anything else is refused with one
line and exit status 1, and left untouched: a file, a non-empty folder this script did not write, a folder it
wrote with other settings, or one changed since (a file missing, edited or added).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

RECORD = ".demo-digits.json"  # hidden: a folder of class folders ignores it
SOURCE = "sklearn.datasets.load_digits"
INK_LEVELS = 16  # load_digits' pixels count ink from 0 to 16


class Refused(Exception):
    """OUT_DIR is not a folder this script may write, or reuse as it is."""


def digit_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """One 8x8 load_digits image as a (size, size, 3) uint8 RGB array: dark ink on white, each source pixel a
    (size/8)-pixel square."""
    gray = 255 - np.rint(255.0 * np.asarray(image, dtype=np.float64) / INK_LEVELS).astype(np.uint8)
    block = size // image.shape[0]
    big = np.repeat(np.repeat(gray, block, axis=0), block, axis=1)
    return np.repeat(big[:, :, None], 3, axis=2)


def chosen(targets: np.ndarray, per_class: int | None) -> list[int]:
    """Positions in load_digits() to write: all, or the first `per_class` of each class, in order."""
    seen: dict[int, int] = {}
    keep = []
    for i, t in enumerate(targets.tolist()):
        if per_class is None or seen.get(t, 0) < per_class:
            seen[t] = seen.get(t, 0) + 1
            keep.append(i)
    return keep


def settings(size: int, per_class: int | None) -> dict:
    return {"source": SOURCE, "size": size, "per_class": per_class}


def describe(s: dict) -> str:
    return f"--size {s['size']} --per-class {'all' if s['per_class'] is None else s['per_class']}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder: Path) -> set[str]:
    """Relative paths of the files under `folder`, less hidden names (the record, .DS_Store, ...)."""
    found = set()
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.update(os.path.relpath(os.path.join(top, n), folder) for n in names if not n.startswith("."))
    return found


def check_existing(out: Path, wanted: dict) -> dict | None:
    """The record of a complete folder written with `wanted` settings; None when `out` is missing or empty
    (to be written); Refused otherwise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise Refused(f"{out} is a file; pass a new or empty folder")
    if not any(out.iterdir()):
        return None
    try:
        record = json.loads((out / RECORD).read_text())
        files = record["files"]
        held = {k: record[k] for k in wanted}
        if not isinstance(files, dict):
            raise TypeError(files)
    except (OSError, ValueError, KeyError, TypeError):
        raise Refused(f"{out} holds files this script did not write; pass a new or empty folder") from None
    if held != wanted:
        raise Refused(f"{out} holds the demo digits written with {describe(held)}; pass those settings, or a "
                      "new or empty folder")
    for rel, digest in sorted(files.items()):
        path = out / rel
        if not path.is_file():
            raise Refused(f"{out} was changed since it was written ({rel} is missing); remove it and rerun")
        if sha256(path) != digest:
            raise Refused(f"{out} was changed since it was written ({rel} differs); remove it and rerun")
    extra = sorted(files_in(out) - set(files))
    if extra:
        raise Refused(f"{out} was changed since it was written ({extra[0]} was added); remove it and rerun")
    return record


def write(out: Path, size: int, per_class: int | None) -> tuple[bool, int, int]:
    """Write (or find complete) the digits in `out`: (written, images, classes)."""
    if size % 8 or not 8 <= size <= 1024:
        raise ValueError(f"--size must be a multiple of 8 from 8 to 1024, got {size}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class must be 1 or more, got {per_class}")
    out = Path(out)
    wanted = settings(size, per_class)
    record = check_existing(out, wanted)
    if record is not None:
        classes = {rel.split(os.sep)[0] for rel in record["files"]}
        return False, len(record["files"]), len(classes)
    from sklearn.datasets import load_digits  # after the check: a rerun that writes nothing stays quick

    digits = load_digits()
    keep = chosen(digits.target, per_class)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        files = {}
        for i in keep:
            rel = os.path.join(str(digits.target[i]), f"{i:04d}.png")
            path = tmp / rel
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(digit_pixels(digits.images[i], size), "RGB").save(path, format="PNG")
            files[rel] = sha256(path)
        (tmp / RECORD).write_text(json.dumps({**wanted, "files": files}, indent=1, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        check_existing(out, wanted)  # nothing appeared in `out` while we wrote
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True, len(keep), len({digits.target[i] for i in keep})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, metavar="OUT_DIR", help="folder to write <digit>/<index>.png into")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels, a multiple of 8 [default: 32]")
    ap.add_argument("--per-class", type=int, default=None, metavar="N",
                    help="the first N images of each class [default: all, 174 to 183 a class]")
    args = ap.parse_args(argv)
    try:
        written, n, classes = write(args.out, args.size, args.per_class)
    except (Refused, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: cannot write {args.out} ({e.strerror or e}); pass a writable new or empty folder",
              file=sys.stderr)
        return 1
    what = f"{n} handwritten digits of {classes} classes ({args.size}x{args.size} RGB PNG, scikit-learn's load_digits)"
    print(f"wrote {what} to {args.out}" if written else f"{args.out} already holds the {what}; nothing written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
