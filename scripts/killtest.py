"""SIGKILL `fusion-cache extract` at random moments, resume each time, and check nothing incomplete is trusted.

    python scripts/killtest.py [--kills 20] [--seed 0]

For each kill: start an extract of a synthetic CIFAR-10 (python-pickle format, 1,200 images at 64 px, batch 8),
SIGKILL it at a uniformly random moment within one uninterrupted run's duration, then check that
  - nothing under the final name reads as a complete cache unless it is one (bit-identical to the reference),
  - rerunning the same command finishes, and the result is bit-identical to an uninterrupted run.
Prints a summary line and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torchvision.models import mobilenet_v2

from fusion_cache.cache import open_cache, partial_path
from fusion_cache.errors import FusionCacheError
from fusion_cache.synthetic import write_cifar


def same(a: Path, b: Path) -> bool:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        if set(fa.attrs) != set(fb.attrs):
            return False
        if any(not np.array_equal(np.asarray(fa.attrs[k]), np.asarray(fb.attrs[k])) for k in fa.attrs):
            return False
        names = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return all(fa[n][()].tobytes() == fb[n][()].tobytes() and fa[n].dtype == fb[n].dtype for n in names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_cifar(tmp / "data", per_class_per_batch=20, per_class_test=20)
        torch.manual_seed(0)
        torch.save(mobilenet_v2(weights=None).state_dict(), tmp / "w.pth")
        args = ["--data-root", str(root), "--weights", str(tmp / "w.pth"), "--train-size", "all", "--test-size",
                "all", "--image-size", "64", "--batch-size", "8", "--no-download", "--skip-integrity-check",
                "--no-progress"]
        cmd = [sys.executable, "-m", "fusion_cache", "extract"]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--out", str(tmp / "ref.h5"), *args], check=True, capture_output=True)
        duration = time.perf_counter() - t0
        print(f"uninterrupted run: {duration:.1f} s (1,200 images); killing at uniform random moments in [0, {duration:.1f}] s")
        trusted_incomplete = identical = killed = resumed = 0
        for i in range(opts.kills):
            out = tmp / f"k{i}.h5"
            proc = subprocess.Popen([*cmd, "--out", str(out), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay = rng.uniform(0, duration)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            was_killed = proc.returncode == -signal.SIGKILL
            killed += was_killed
            try:  # anything that opens as a complete cache must be the complete, correct cache
                open_cache(out)
                if not same(out, tmp / "ref.h5"):
                    trusted_incomplete += 1
            except FusionCacheError:
                pass
            had_partial = partial_path(out).exists()
            r = subprocess.run([*cmd, "--out", str(out), *args], capture_output=True, text=True)
            resumed += "resumed from" in r.stdout
            ok = r.returncode == 0 and same(out, tmp / "ref.h5")
            identical += ok
            print(f"kill {i + 1:2d}: at {delay:5.2f} s, {'killed' if was_killed else 'finished first'}, "
                  f"partial left: {had_partial}, rerun: {'resumed' if 'resumed from' in r.stdout else 'fresh/reused'}, "
                  f"bit-identical: {ok}")
        print(f"SUMMARY: {killed}/{opts.kills} SIGKILLed mid-run, {trusted_incomplete} incomplete caches read as "
              f"complete, {resumed} reruns resumed a partial, {identical}/{opts.kills} results bit-identical")
        return 0 if trusted_incomplete == 0 and identical == opts.kills else 1


if __name__ == "__main__":
    sys.exit(main())
