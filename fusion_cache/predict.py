"""A saved head on new images: rebuild backbone + taps + pooling + standardization + linear, predict, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .backbone import PooledExtractor, build_model, load_weights
from .decode import BadImage, read_image, reduce_for
from .files import display_path
from .errors import FusionCacheError
from .headfile import HeadFile
from .io import atomic_write, check_output_file


class DeployedModel(nn.Module):
    """Normalized image tensor (N, 3, S, S) -> logits (N, K): taps, pooling, standardization, linear."""

    def __init__(self, backbone: nn.Module, taps: list[str], coef, intercept, mean, scale, pool: str = "avg",
                 table=None):
        super().__init__()
        self.features = PooledExtractor(backbone, taps, pool, table)
        self.taps = list(taps)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.linear = nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(coef))
            self.linear.bias.copy_(torch.as_tensor(intercept))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        z = torch.cat([feats[t] for t in self.taps], dim=1)
        return self.linear((z - self.mean) / self.scale)


def build_deployed(head: HeadFile, weights: str | None = None) -> DeployedModel:
    """Rebuild the backbone from `weights` (default: the ones recorded) and refuse any other weights."""
    p = head.provenance
    spec = weights or p["weights"]
    loaded = load_weights(spec, seed=int(p["seed"]), backbone=head.backbone)
    if loaded.sha256 != p["weights_sha256"]:
        raise FusionCacheError(
            f"weights {spec} (sha256 {loaded.sha256[:12]}…) are not the ones this head's features came from "
            f"(sha256 {p['weights_sha256'][:12]}…, {p['weights']}); pass --weights with that file"
        )
    backbone = build_model(loaded).to(memory_format=torch.channels_last)  # as extract runs it: the same numbers
    model = DeployedModel(backbone, list(head.taps), head.coef, head.intercept, head.mean, head.scale,
                          head.pool, head.table)
    return model.eval().requires_grad_(False)


def predict(model: DeployedModel, head: HeadFile, paths: list[Path], batch_size: int = 64, top_k: int = 1,
            strict: bool = False, progress: bool | None = None):
    """Yield one dict per image: {path, class, prob, top: [[class, prob], ...], logits} or {path, error}."""
    pre = head.preprocess
    reduce_to = reduce_for(head.provenance.get("decode", ""), pre.image_size)  # as the cache's images were decoded
    classes = head.classes
    top_k = max(1, min(top_k, len(classes)))
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=None if progress is None else not progress)
    try:
        for lo in range(0, len(paths), batch_size):
            chunk = paths[lo : lo + batch_size]
            images, kept, errors = [], [], {}
            for p in chunk:
                shown = display_path(p)
                try:
                    images.append(pre.resize(read_image(p, name=shown, reduce_to=reduce_to)))
                    kept.append(p)
                except BadImage as e:
                    if strict:
                        raise FusionCacheError(f"cannot read image {e}; fix or remove it, or drop --strict") from None
                    errors[p] = str(e)[len(shown) + 2:] if str(e).startswith(f"{shown}: ") else str(e)
            logits = np.zeros((0, len(classes)), np.float32)
            if images:
                with torch.inference_mode():
                    logits = model(pre.normalize(torch.stack(images))).numpy()
            probs = _softmax(logits)
            results = {p: (logits[i], probs[i]) for i, p in enumerate(kept)}
            for p in chunk:
                if p in errors:
                    yield {"path": display_path(p), "error": errors[p]}
                    continue
                z, pr = results[p]
                order = np.argsort(-pr)[:top_k]
                yield {"path": display_path(p), "class": classes[order[0]], "prob": float(pr[order[0]]),
                       "top": [[classes[i], float(pr[i])] for i in order], "logits": z.tolist()}
            bar.update(len(chunk))
    finally:
        bar.close()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True) if len(z) else z
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True) if len(z) else e


EXTRA_FILE = "fusion_cache.json"


def export(head: HeadFile, out: str | Path, weights: str | None = None, force: bool = False) -> Path:
    """One `torch.export` program, normalized image in, logits out; classes and preprocessing in its extra files.
    `out` never replaces the head it reads or a cache, and another existing file only with `force`."""
    out = check_output_file(out, force, inputs=[head.path])
    model = build_deployed(head, weights)
    pre = head.preprocess
    example = torch.zeros(2, 3, pre.image_size, pre.image_size)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as e:  # pragma: no cover - depends on the torch version
        raise FusionCacheError(f"torch.export failed ({type(e).__name__}: {e}); upgrade torch") from None
    meta = {
        "classes": list(head.classes),
        "input": f"float32 (N, 3, S, S): RGB scaled to [0, 1], resized (shorter side, {pre.interpolation}) and "
                 "center-cropped to S, then (x - mean) / std per channel",
        "image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std),
        "interpolation": pre.interpolation, "backbone": head.backbone,
        "taps": list(head.taps), "weights_sha256": head.provenance["weights_sha256"],
        "fingerprint": head.fingerprint,
    }
    atomic_write(out, lambda f: torch.export.save(program, f, extra_files={EXTRA_FILE: json.dumps(meta)}))
    return out
