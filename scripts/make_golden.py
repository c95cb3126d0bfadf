"""Write the golden files of tests/test_golden.py, ONCE, with the release installed now.

    python scripts/make_golden.py [--out tests/data/golden]

Writes into OUT (which must not exist yet: golden files are never rewritten by a later release, whose tests they
are there to check):
  images/{train,test}/{blue,red}/NNN.png   8 x 8 px RGB PNGs, a colour per class plus noise (5 + 3 train, 3 + 3 test)
  cache.h5                                 `fusion-cache extract` of that folder: 3 taps at 32 px
  head/head.pt                             `fusion-cache fit cache.h5 --out head` (linear, L-BFGS, standardized)
  golden.json                              the settings, versions, fingerprint and the head's labels and logits
The weights (a MobileNetV2 of about 14 MB) are not written here: `tests.test_golden.golden_weights` regenerates
their exact bytes, and golden.json records their sha256.

The package must be a commit's: a checkout whose fusion_cache/ has no uncommitted change, or that commit's
package on PYTHONPATH (`git archive HEAD fusion_cache | tar -x -C /tmp/release`, then
`PYTHONPATH=/tmp/release python scripts/make_golden.py`). golden.json records the commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import fusion_cache  # first: from PYTHONPATH or the installed package, never shadowed by the checkout below

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_golden import extract_args, golden_weights  # noqa: E402

# Everything `extract` is told besides the paths: ExtractConfig's field names (None: the whole split).
EXTRACT = {"dataset": "imagefolder", "train_size": None, "test_size": None, "image_size": 32,
           "taps": ["features.1", "features.6", "features.13"], "batch_size": 8, "seed": 0, "device": "cpu",
           "precision": "fp32", "dtype": "float32", "workers": 0}
FIT = ["--head", "linear", "--features", "all", "--solver", "lbfgs", "--standardize", "--weight-decay", "0.01",
       "--seed", "0"]
CLASSES = {"blue": (40, 60, 200), "red": (200, 50, 40)}
COUNTS = {"train": {"blue": 5, "red": 3}, "test": {"blue": 3, "red": 3}}


def write_images(root: Path) -> None:
    rng = np.random.default_rng(26)  # the PNGs are committed: this stream need not be stable
    for split, counts in COUNTS.items():
        for name, colour in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(counts[name]):
                pixels = np.clip(np.array(colour) + rng.integers(-60, 61, size=(8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def cli(*args, cwd: Path) -> str:
    """`python -m fusion_cache ARGS`, the package found as this process finds it (cwd is not the checkout)."""
    p = subprocess.run([sys.executable, "-m", "fusion_cache", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd)
    if p.returncode:
        sys.exit(f"fusion-cache {args[0]} failed:\n{p.stdout}{p.stderr}")
    return p.stdout + p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "golden")
    out = ap.parse_args().out.resolve()
    if out.exists():
        sys.exit(f"{out} exists: golden files are written once, by the release they record; remove it only to "
                 "replace them on purpose (every cache of the earlier releases is then untested)")

    import torch
    import torchvision

    from fusion_cache.backbone import versions
    from fusion_cache.cache import open_cache
    from fusion_cache.sources.imagefolder import load_image_folder
    from fusion_cache.headfile import load_head

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    package = Path(fusion_cache.__file__).resolve().parent
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fusion_cache"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    if package == ROOT / "fusion_cache" and dirty:
        sys.exit("fusion_cache/ has uncommitted changes: golden files record a commit's release; commit them, or "
                 "put `git archive HEAD fusion_cache` on PYTHONPATH")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stage = tmp / "golden"
        write_images(stage / "images")
        weights = tmp / "mobilenet_v2-golden.safetensors"
        sha = golden_weights(weights)
        # extract in place at the final path, so the cache's data_root names the committed folder
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, out)
        try:
            print(cli("extract", *extract_args(EXTRACT), "--data-root", out / "images", "--weights", weights,
                      "--out", out / "cache.h5", "--no-progress", cwd=tmp).strip())
            print(cli("fit", out / "cache.h5", *FIT, "--out", tmp / "head", cwd=tmp).strip())
            (out / "head").mkdir()
            shutil.copy(tmp / "head" / "head.pt", out / "head" / "head.pt")
        except BaseException:
            shutil.rmtree(out)
            raise

    cache = open_cache(out / "cache.h5")
    head = load_head(out / "head")
    X = np.concatenate([cache.features(t, "test") for t in head.taps], axis=1)
    logits = head.logits_from_features(X)
    top2 = np.sort(logits, axis=1)[:, -2:]
    paths = load_image_folder(out / "images", "test").paths
    record = {
        "written_by": f"scripts/make_golden.py, fusion-cache {fusion_cache.__version__} at commit {commit}",
        "schema_version": cache.meta.schema_version,
        "fingerprint": cache.fingerprint,
        "weights_sha256": sha,
        "library_version": torchvision.__version__,
        "versions": versions(),
        "torch": torch.__version__,
        "extract": EXTRACT,
        "fit": FIT,
        "classes": list(cache.classes),
        "train_size": cache.meta.train_size,
        "test_size": cache.meta.test_size,
        "test_labels": cache.labels("test").tolist(),
        "test_files": [paths[i] for i in cache.indices("test")],
        "head": {
            "taps": list(head.taps),
            "predicted": [head.classes[i] for i in logits.argmax(axis=1)],
            "logits": [[float(f"{v:.7g}") for v in row] for row in logits.tolist()],
            "smallest_margin": float(f"{(top2[:, 1] - top2[:, 0]).min():.4g}"),
        },
    }
    (out / "golden.json").write_text(json.dumps(record, indent=1) + "\n")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>7} {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")


if __name__ == "__main__":
    main()
