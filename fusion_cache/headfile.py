"""The head file (`head.pt`): what `fit --out` saves and `predict` / `export` load, written and checked here only.

A head is stored in its linear form, logits = ((x - mean) / scale) @ coef.T + intercept, with the taps it
reads, the class names, the fingerprint of the cache it was trained on and that cache's provenance (weights,
preprocessing, pooling). It is a plain dict of tensors and strings, so `torch.load(..., weights_only=True)`
reads it without running code. `load_head` checks everything `predict` and `export` rely on: shapes, class
count, finite weights, a positive finite scale, and the provenance fields, before any backbone is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import CacheMeta
from .errors import FusionCacheError
from .io import atomic_write, dumps_json
from .taps import MOBILENET_V2, TapTable

HEAD_FORMAT = "fusion-cache-head/1"
HEAD_FILE = "head.pt"
# Provenance fields a head needs to rebuild its backbone and preprocessing, parsed as CacheMeta parses them.
NEEDED = ("backbone", "weights", "weights_sha256", "image_size", "mean", "std", "pool", "seed")
# Recorded by schema-3 caches; a head trained on a schema-2 cache lacks them and reads MobileNetV2's.
LATER = {"library": "torchvision", "interpolation": "bilinear", "tap_table": {}}
_FIX = "re-run `fusion-cache fit ... --out` to save the head again"


@dataclass(frozen=True)
class HeadFile:
    """A saved head, typed and checked."""

    head: str  # the head kind that was trained (linear, logreg)
    taps: tuple[str, ...]  # the view's taps, in order: the columns of coef
    classes: tuple[str, ...]  # one per row of coef
    coef: np.ndarray  # (k, d) float32
    intercept: np.ndarray  # (k,)
    mean: np.ndarray  # (d,) feature standardization (zeros / ones when the head used raw features)
    scale: np.ndarray  # (d,), positive
    fingerprint: str  # of the cache the head was trained on
    provenance: dict  # that cache's metadata (CacheMeta.as_dict()) and its path
    path: Path | None = None

    @property
    def pool(self) -> str:
        return self.provenance["pool"]

    @property
    def image_size(self) -> int:
        return int(self.provenance["image_size"])

    @property
    def backbone(self) -> str:
        return self.provenance["backbone"]

    @property
    def table(self) -> TapTable:
        """The backbone's tap table, as the cache recorded it (schema 2: the case study's)."""
        t = self.provenance.get("tap_table") or {}
        return TapTable.from_json(t) if t else MOBILENET_V2

    @property
    def preprocess(self):
        """How images become the backbone's input, as the cache recorded it."""
        from .backbone import Preprocess

        p = self.provenance
        return Preprocess(int(p["image_size"]), tuple(p["mean"]), tuple(p["std"]),
                          p.get("interpolation", "bilinear"))

    def logits_from_features(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.scale) @ self.coef.T + self.intercept

    def check(self, where: str) -> None:
        def bad(what):
            raise FusionCacheError(f"{where}: {what}; {_FIX}")

        try:
            table = self.table
        except (TypeError, ValueError, KeyError) as e:
            bad(f"its tap table is malformed ({' '.join(str(e).split())[:80]})")
        if table.backbone != self.backbone:
            bad(f"its tap table is {table.backbone}'s, not {self.backbone}'s")
        if not self.taps or any(t not in table.names for t in self.taps) or len(set(self.taps)) != len(self.taps):
            bad(f"its taps {list(self.taps)[:4]} are not distinct known taps")
        if self.pool not in table.pools:
            bad(f"its pooling {self.pool!r} is unknown")
        if self.provenance.get("interpolation", "bilinear") not in ("bilinear", "bicubic", "nearest"):
            bad(f"its interpolation {self.provenance.get('interpolation')!r} is unknown")
        d = sum(table.channels(self.taps, self.pool))
        k = len(self.classes)
        if k < 2 or len(set(self.classes)) != k:
            bad(f"it has {k} distinct class names; a classifier needs two or more")
        for name, arr, shape in (("coef", self.coef, (k, d)), ("intercept", self.intercept, (k,)),
                                 ("mean", self.mean, (d,)), ("scale", self.scale, (d,))):
            if arr.shape != shape:
                bad(f"{name} has shape {tuple(arr.shape)}, expected {shape} ({k} classes, {d} features)")
            if not np.isfinite(arr).all():
                bad(f"{name} holds NaN or inf")
        if not (self.scale > 0).all():
            bad("scale holds zero or negative values")


def save_head(head: HeadFile, out_dir: str | Path) -> Path:
    """Write `out_dir/head.pt` atomically (the folder must exist). Checked before writing."""
    head.check("the head to save")
    state = {
        "format": HEAD_FORMAT,
        "head": head.head,
        "taps": list(head.taps),
        "classes": list(head.classes),
        "coef": torch.from_numpy(np.ascontiguousarray(head.coef, dtype=np.float32)),
        "intercept": torch.from_numpy(np.ascontiguousarray(head.intercept, dtype=np.float32)),
        "mean": torch.from_numpy(np.ascontiguousarray(head.mean, dtype=np.float32)),
        "scale": torch.from_numpy(np.ascontiguousarray(head.scale, dtype=np.float32)),
        "fingerprint": head.fingerprint,
        "provenance": dumps_json(head.provenance),
    }
    path = Path(out_dir) / HEAD_FILE
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_head(head_dir: str | Path) -> HeadFile:
    """Load and check a head saved by `fit --out` (the folder, or its head.pt)."""
    head_dir = Path(head_dir)
    f = head_dir / HEAD_FILE if head_dir.is_dir() else head_dir
    if not f.is_file():
        raise FusionCacheError(f"no {HEAD_FILE} in {head_dir}; train one with `fusion-cache fit CACHE --out {head_dir}`")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FusionCacheError(f"{f} is not a readable head ({type(e).__name__}); {_FIX}") from None
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise FusionCacheError(f"{f} is not a fusion-cache head ({HEAD_FORMAT}); {_FIX}")
    where = str(f)

    def get(key, kind):
        v = state.get(key)
        if kind == "str" and isinstance(v, str):
            return v
        if kind == "strs" and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            return tuple(v)
        if kind == "tensor" and isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            return v.detach().to(torch.float32).numpy()
        raise FusionCacheError(f"{where}: '{key}' is missing or not {kind.replace('strs', 'a list of strings')}; {_FIX}")

    try:
        provenance = json.loads(get("provenance", "str"))
    except json.JSONDecodeError:
        raise FusionCacheError(f"{where}: 'provenance' is not JSON; {_FIX}") from None
    if not isinstance(provenance, dict):
        raise FusionCacheError(f"{where}: 'provenance' is not a JSON object; {_FIX}")
    parsed = CacheMeta.parse_fields(provenance, NEEDED, f"{where}: provenance", _FIX)
    later = [k for k in LATER if k in provenance]
    parsed.update(CacheMeta.parse_fields(provenance, tuple(later), f"{where}: provenance", _FIX))
    for k, v in LATER.items():
        parsed.setdefault(k, v)
    if len(parsed["mean"]) != 3 or len(parsed["std"]) != 3 or not all(s > 0 for s in parsed["std"]):
        raise FusionCacheError(f"{where}: provenance mean/std are not 3 numbers with std positive; {_FIX}")
    if not 16 <= parsed["image_size"] <= 4096:
        raise FusionCacheError(f"{where}: provenance image_size {parsed['image_size']} is out of range; {_FIX}")
    fingerprint = get("fingerprint", "str")
    head = HeadFile(get("head", "str"), get("taps", "strs"), get("classes", "strs"), get("coef", "tensor"),
                    get("intercept", "tensor"), get("mean", "tensor"), get("scale", "tensor"), fingerprint,
                    {**provenance, **parsed}, f)
    head.check(where)
    return head

