"""The frozen backbone: weights, preprocessing, and the pooled multi-tap forward pass (any backbone of
`backbones`; MobileNetV2 by default)."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.ao.quantization import fuse_modules
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms.v2 import functional as TF

from .backbones import DEFAULT_BACKBONE, Backbone, conv_bn_pairs, resolve
from .errors import FusionCacheError, quote
from .taps import MOBILENET_V2, TapTable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INTERPOLATIONS = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC,
                  "nearest": TF.InterpolationMode.NEAREST}


def resize_sentence(interpolation: str = "bilinear") -> str:
    """How images are resized, recorded in every cache (bilinear: the sentence schema-2 caches hold)."""
    return f"{interpolation}-antialias shorter side to image_size, center crop, uint8"


RESIZE = resize_sentence("bilinear")


@dataclass(frozen=True)
class Preprocess:
    """How a uint8 RGB image becomes the network's input. Recorded in the cache and the head."""

    image_size: int = 128  # the case study resizes CIFAR-10's 32 px images to 128 px
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # the weights' own (timm's ViTs: bicubic)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (…, 3, H, W) -> uint8 (…, 3, S, S), as torchvision's Resize(S) + CenterCrop(S) on tensors."""
        s = self.image_size
        if images.shape[-2:] != (s, s):
            images = TF.resize(images, [s], interpolation=INTERPOLATIONS[self.interpolation], antialias=True)
            images = TF.center_crop(images, [s, s])
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32, scaled to [0, 1] and standardized with mean/std."""
        x = TF.to_dtype(images, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))


@dataclass
class LoadedWeights:
    name: str  # `imagenet1k_v1`, a timm tag, `random`, or the file path given
    sha256: str  # of the weights file actually loaded; for `random` and timm tags, of the state_dict
    state_dict: dict
    backbone: str = DEFAULT_BACKBONE  # the `backbones` name the state_dict belongs to
    file: Path | None = None  # the absolute path of a --weights PATH file (None: named or random weights)


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


def load_weights(spec: str | None, seed: int = 0, backbone: str | Backbone | None = None) -> LoadedWeights:
    """Named weights (torchvision's enum names such as `imagenet1k_v1`, timm's pretrained tags; downloaded
    once), `random` (seeded), or a PATH to a `.pth` state_dict or a `.safetensors` file of the backbone.

    A .pth is loaded with `weights_only=True`, so a pickle that carries code is refused rather than run; a
    .safetensors file holds no code at all. Either must match the architecture key for key and shape for shape.
    """
    bb = backbone if isinstance(backbone, Backbone) else resolve(backbone)
    spec = spec or bb.default_weights()
    key = spec.lower()
    if key == "default":  # the library's default weights (torchvision's DEFAULT, timm's default tag)
        key = bb.default_weights()
    names = bb.weight_names()
    if key in names:
        return _named_weights(bb, key)
    if key == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sd = bb.create().state_dict()
        return LoadedWeights("random", sha256_state_dict(sd), sd, bb.name)
    path = Path(spec)
    problem = _weights_file_problem(path)
    if problem:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise FusionCacheError(
            f"weights {quote(spec)} {problem}; pass {shown + ', ' if shown else ''}random, or the path of a .pth or "
            f".safetensors state_dict of {bb.name}"
        )
    sd = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pth(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FusionCacheError(
            f"{path} holds a {type(sd).__name__}, not a state_dict of tensors; "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    check_state_dict(sd, str(path), bb)
    return LoadedWeights(str(spec), sha256_file(path), sd, bb.name, path.resolve())


def _weights_file_problem(path: Path) -> str:
    """What keeps `path` from being read as a weights file ("not found", "is a folder", "is a character device",
    "is empty (0 bytes)", "cannot be read (permission denied)", ...), or "" for a readable, non-empty regular file.
    Nothing is read: a FIFO or a device would block or never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            return "is a broken symbolic link" if os.path.lexists(path) else "not found"
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be reached ({'permission denied' if isinstance(e, PermissionError) else e.strerror or e})"
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]
    what = next((name for test, name in kinds if test(st.st_mode)), None)
    if what is not None or not stat.S_ISREG(st.st_mode):
        return f"is {what or 'not a regular file'}, not a weights file"
    if st.st_size == 0:
        return "is empty (0 bytes), not a weights file"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        why = "permission denied" if isinstance(e, PermissionError) else e.strerror or type(e).__name__
        return f"cannot be read ({why})"
    return ""


def _named_weights(bb: Backbone, key: str) -> LoadedWeights:
    fix = f"connect to the internet or pass --weights PATH to a local {bb.name} state_dict (.pth or .safetensors)"
    if bb.library == "timm":
        import timm

        try:
            sd = timm.create_model(f"{bb.arch}.{key}", pretrained=True).state_dict()
        except Exception as e:  # network and hub errors come in many types
            raise FusionCacheError(f"could not download {bb.name}.{key} weights ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:120]}); {fix}") from None
        return LoadedWeights(key, sha256_state_dict(sd), sd, bb.name)
    weights = bb.torchvision_weights(key)
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # network errors come in many types
        raise FusionCacheError(f"could not download {key} weights ({type(e).__name__}: {e}); {fix}") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return LoadedWeights(key, sha256_file(file), sd, bb.name)


def _read_pth(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise FusionCacheError("safetensors is not installed; pip install safetensors, or pass a .pth") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: the file's header or byte ranges are wrong
        raise FusionCacheError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:80]}); pass a file saved with safetensors.torch.save_file") from None


def check_state_dict(sd: dict, where: str, backbone: str | Backbone | None = None) -> None:
    """Strict key and shape match against the backbone's architecture, with a message that says what differs."""
    bb = backbone if isinstance(backbone, Backbone) else resolve(backbone)
    with torch.device("meta"):
        ref = bb.create().state_dict()
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
        what = "torchvision MobileNetV2 (width 1.0)" if bb.name == DEFAULT_BACKBONE else f"{bb.library} {bb.arch}"
        make = f"timm.create_model('{bb.arch}')" if bb.library == "timm" else f"torchvision.models.{bb.arch}()"
        raise FusionCacheError(
            f"{where} does not hold {what} weights: {', '.join(parts)}; pass a state_dict of {make}, "
            "or the --backbone it was saved from"
        )


def build_model(weights: LoadedWeights, fold_bn: bool = True) -> nn.Module:
    """The backbone with the weights, frozen, in eval mode. With `fold_bn` every BatchNorm that the traced
    graph shows taking a convolution's output, and that output alone, is folded into it (torch.ao's
    `fuse_modules` on `backbones.conv_bn_pairs`: all of MobileNetV2's, a ResNet's bottlenecks and stem). The
    same function to about 1e-6, faster on a CPU. The module names, and so the taps, are unchanged. Networks
    with no such pair (ViTs, ConvNeXts, timm's fused BatchNormAct) are left as they are."""
    bb = resolve(weights.backbone)
    # a file saved in float16 or bfloat16 (common for safetensors) runs in float32, as every other input does
    sd = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
          for k, v in weights.state_dict.items()}
    try:
        with torch.device("meta"):  # no random init to throw away; the weights are assigned as they are
            model = bb.create()
        model.load_state_dict(sd, strict=True, assign=True)
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # a buffer outside the state_dict
            model = bb.create()
            model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # named weights built for another variant (e.g. a ViT at 384 px)
        raise FusionCacheError(f"weights {weights.name} do not fit {bb.name} as fusion-cache builds it "
                               f"({' '.join(str(e).split())[:120]}); pass other --weights") from None
    model = model.eval().requires_grad_(False)
    if fold_bn:
        pairs = conv_bn_pairs(bb.name)
        if pairs:
            model = fuse_modules(model, pairs, inplace=True)
    return model


class PooledExtractor(nn.Module):
    """Backbone truncated at the taps (via `create_feature_extractor`), each output pooled to a vector.

    Maps (N, C, H, W): avg -> (N, C) global average; avgmax -> (N, 2C), global average then global max.
    Tokens (N, T, D): cls -> the class token; mean -> the patch-token mean; clsmean -> both, (N, 2D).
    Vectors (what the classifier receives): flattened as they are.
    forward(x) -> {tap: pooled float32}
    """

    def __init__(self, model: nn.Module, taps: list[str], pool: str | None = None, table: TapTable | None = None):
        super().__init__()
        self.table = table or MOBILENET_V2
        self.taps = list(taps)
        self.pool = self.table.check_pool(pool or self.table.default_pool)
        self.kinds = [self.table.tap(t).kind for t in self.taps]
        self.prefix = self.table.prefix_tokens
        tracer = resolve(self.table.backbone).tracer_kwargs if self.table is not MOBILENET_V2 else {}
        self.body = create_feature_extractor(model, return_nodes={self.table.node(t): t for t in self.taps},
                                             tracer_kwargs=tracer or None)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        out = {}
        for t, kind in zip(self.taps, self.kinds):
            f = feats[t].float()
            if kind == "map":
                avg = f.mean(dim=(2, 3))
                out[t] = avg if self.pool == "avg" else torch.cat([avg, f.amax(dim=(2, 3))], dim=1)
            elif kind == "tokens":
                cls, mean = f[:, 0], f[:, self.prefix:].mean(dim=1)
                out[t] = cls if self.pool == "cls" else mean if self.pool == "mean" else torch.cat([cls, mean], dim=1)
            else:
                out[t] = f.flatten(1)
        return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FusionCacheError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def versions() -> dict[str, str]:
    """The versions of the libraries that determine a result. scikit-learn's is read from its installed
    metadata, not by importing it (1.4 s, paid by every extract and every Ray worker)."""
    from importlib.metadata import version

    import h5py
    import numpy

    from . import __version__

    return {
        "fusion_cache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "numpy": numpy.__version__,
        "sklearn": version("scikit-learn"),
    }

