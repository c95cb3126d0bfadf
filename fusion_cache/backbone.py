"""The frozen backbone: MobileNetV2 weights, preprocessing, and the pooled multi-tap forward pass."""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.ao.quantization import fuse_modules
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms.v2 import functional as TF

from .errors import FusionCacheError
from .taps import POOLS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NAMED_WEIGHTS = {"imagenet1k_v1": MobileNet_V2_Weights.IMAGENET1K_V1, "imagenet1k_v2": MobileNet_V2_Weights.IMAGENET1K_V2}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RESIZE = "bilinear-antialias shorter side to image_size, center crop, uint8"  # recorded in every cache


@dataclass(frozen=True)
class Preprocess:
    """How a uint8 RGB image becomes the network's input. Recorded in the cache and the head."""

    image_size: int = 128  # the case study resizes CIFAR-10's 32 px images to 128 px
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (…, 3, H, W) -> uint8 (…, 3, S, S), as torchvision's Resize(S) + CenterCrop(S) on tensors."""
        s = self.image_size
        if images.shape[-2:] != (s, s):
            images = TF.resize(images, [s], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            images = TF.center_crop(images, [s, s])
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32, scaled to [0, 1] and standardized with mean/std."""
        x = TF.to_dtype(images, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))


@dataclass
class LoadedWeights:
    name: str  # `imagenet1k_v1`, `random`, or the file path given
    sha256: str  # of the weights file actually loaded; for `random`, of the seeded state_dict
    state_dict: dict


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(state_dict: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_weights(spec: str, seed: int = 0) -> LoadedWeights:
    """`imagenet1k_v1|imagenet1k_v2` (torchvision weights API, downloads once), `random` (seeded), or a PATH.

    A PATH must hold a MobileNetV2 state_dict; it is loaded with `weights_only=True`, so a pickle that
    carries code is refused rather than run.
    """
    key = spec.lower()
    if key in NAMED_WEIGHTS:
        weights = NAMED_WEIGHTS[key]
        try:
            sd = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # network errors come in many types
            raise FusionCacheError(
                f"could not download {key} weights ({type(e).__name__}: {e}); "
                "connect to the internet or pass --weights PATH to a local MobileNetV2 state_dict"
            ) from None
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        return LoadedWeights(key, sha256_file(file), sd)
    if key == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sd = mobilenet_v2(weights=None).state_dict()
        return LoadedWeights("random", sha256_state_dict(sd), sd)
    path = Path(spec)
    if not path.is_file():
        raise FusionCacheError(
            f"weights '{spec}' not found; pass imagenet1k_v1, imagenet1k_v2, random, or the path of a .pth state_dict"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = [line for line in str(e).splitlines() if "nsupported" in line and ("GLOBAL" in line or "global" in line)]
        if not unsafe:
            raise FusionCacheError(
                f"{path} is not a readable PyTorch weights file (UnpicklingError); "
                "pass a .pth saved with torch.save(model.state_dict(), path)"
            ) from None
        raise FusionCacheError(
            f"{path} is not a plain state_dict and was not loaded, because it would run code "
            f"({unsafe[0].strip()[:100]}); save the weights with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:  # torch.load raises RuntimeError, EOFError, struct.error, ... on files it cannot parse
        raise FusionCacheError(
            f"{path} is not a readable PyTorch weights file ({type(e).__name__}); "
            "pass a .pth saved with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FusionCacheError(
            f"{path} holds a {type(sd).__name__}, not a state_dict of tensors; "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    check_state_dict(sd, str(path))
    return LoadedWeights(str(spec), sha256_file(path), sd)


def check_state_dict(sd: dict, where: str) -> None:
    """Strict key and shape match against torchvision's mobilenet_v2, with a message that says what differs."""
    ref = mobilenet_v2(weights=None).state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    wrong = [k for k in ref if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(ref[k].shape)})")
        raise FusionCacheError(
            f"{where} does not hold torchvision MobileNetV2 (width 1.0) weights: {', '.join(parts)}; "
            "pass a state_dict of torchvision.models.mobilenet_v2()"
        )


def build_model(weights: LoadedWeights, fold_bn: bool = True) -> nn.Module:
    """MobileNetV2 with the weights, frozen, in eval mode. With `fold_bn` every BatchNorm that follows a
    convolution is folded into it (torch.ao's `fuse_modules`): the same function to about 1e-6, about a
    third faster on a CPU. The module names, and so the taps, are unchanged."""
    model = mobilenet_v2(weights=None)
    model.load_state_dict(weights.state_dict, strict=True)
    model = model.eval().requires_grad_(False)
    if fold_bn:
        model = fuse_modules(model, _conv_bn_pairs(model), inplace=True)
    return model


def _conv_bn_pairs(model: nn.Module) -> list[list[str]]:
    """[conv, bn] module names for every Conv2d directly followed by a BatchNorm2d inside a Sequential."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, first), (b, second) in zip(children, children[1:]):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    prefix = f"{name}." if name else ""
                    pairs.append([prefix + a, prefix + b])
    return pairs


class PooledExtractor(nn.Module):
    """Backbone truncated at the taps (via `create_feature_extractor`), each output globally pooled.

    pool="avg": (N, C) global average. pool="avgmax": (N, 2C), global average then global max.
    forward(x) -> {tap: pooled float32}
    """

    def __init__(self, model: nn.Module, taps: list[str], pool: str = "avg"):
        super().__init__()
        if pool not in POOLS:
            raise FusionCacheError(f"unknown pooling '{pool}'; use one of {', '.join(POOLS)}")
        self.taps = list(taps)
        self.pool = pool
        self.body = create_feature_extractor(model, return_nodes={t: t for t in self.taps})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        out = {}
        for t in self.taps:
            f = feats[t].float()
            avg = f.mean(dim=(2, 3))
            out[t] = avg if self.pool == "avg" else torch.cat([avg, f.amax(dim=(2, 3))], dim=1)
        return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FusionCacheError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def versions() -> dict[str, str]:
    import h5py
    import numpy
    import sklearn

    from . import __version__

    return {
        "fusion_cache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "numpy": numpy.__version__,
        "sklearn": sklearn.__version__,
    }
