"""Prints the largest |feature| of every tap of the tests' tiny cache (60 + 20 synthetic CIFAR-10 images at 48 px,
MobileNetV2 seeded as tests/conftest.py seeds it), with random-init and with calibrated BatchNorm statistics
(`fusion_cache.synthetic.calibrate_batchnorm`): why the tests' weights are calibrated.

    python scripts/tap_scales.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.models import mobilenet_v2

from fusion_cache.cache import open_cache
from fusion_cache.extract import ExtractConfig, extract
from fusion_cache.synthetic import calibrate_batchnorm, write_cifar


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_cifar(tmp / "cifar")
        for calibrated in (False, True):
            torch.manual_seed(1234)
            model = mobilenet_v2(weights=None)
            if calibrated:
                calibrate_batchnorm(model, 48, seed=1234)
            weights, out = tmp / f"w{calibrated}.pth", tmp / f"c{calibrated}.h5"
            torch.save(model.state_dict(), weights)
            extract(ExtractConfig(out=out, data_root=root, train_size=60, test_size=20, weights=str(weights),
                                  image_size=48, batch_size=16, download=False, skip_integrity_check=True,
                                  progress=False))
            cache = open_cache(out)
            scales = " ".join(f"{t.split('.')[-1]}:{np.abs(cache.features(t, 'train')).max():.2g}" for t in cache.taps)
            print(f"{'calibrated' if calibrated else 'random-init':<12} {scales}")


if __name__ == "__main__":
    main()
