"""Feature taps and views of MobileNetV2, declared once as data.

A *tap* is a torchvision graph node whose output (N, C, H, W) is globally pooled to (N, C), or (N, 2C) with
`avgmax` pooling (`POOLS`).
A *view* is a named list of taps whose pooled vectors are concatenated for a head.
Everything else in fusion-cache reads taps and views from here; no layer index appears elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FusionCacheError


@dataclass(frozen=True)
class Tap:
    name: str  # torchvision node name, as `get_graph_node_names` spells it
    channels: int  # C of the block's output, i.e. the width of its pooled vector
    reduction: int  # input size / feature-map size (stride of the block's output)


# The 19 blocks of torchvision's mobilenet_v2().features (width 1.0). Checked against the model in tests.
TAPS: tuple[Tap, ...] = (
    Tap("features.0", 32, 2),  # stem conv
    Tap("features.1", 16, 2),
    Tap("features.2", 24, 4),
    Tap("features.3", 24, 4),
    Tap("features.4", 32, 8),
    Tap("features.5", 32, 8),
    Tap("features.6", 32, 8),
    Tap("features.7", 64, 16),
    Tap("features.8", 64, 16),
    Tap("features.9", 64, 16),
    Tap("features.10", 64, 16),
    Tap("features.11", 96, 16),
    Tap("features.12", 96, 16),
    Tap("features.13", 96, 16),  # last block at stride 16: the case study's early/late split point
    Tap("features.14", 160, 32),
    Tap("features.15", 160, 32),
    Tap("features.16", 160, 32),
    Tap("features.17", 320, 32),
    Tap("features.18", 1280, 32),  # final 1x1 conv: what the ImageNet classifier sees
)
TAP_BY_NAME: dict[str, Tap] = {t.name: t for t in TAPS}
ALL_TAPS: tuple[str, ...] = tuple(t.name for t in TAPS)

EARLY_TAP = "features.13"
LATE_TAP = "features.18"

# Named views. `fused` is the case study's model: early and late pooled vectors concatenated.
VIEWS: dict[str, tuple[str, ...]] = {
    "early": (EARLY_TAP,),
    "late": (LATE_TAP,),
    "fused": (EARLY_TAP, LATE_TAP),
    "all": ALL_TAPS,
}
DEFAULT_TAPS: tuple[str, ...] = ALL_TAPS  # 2,816 floats an image: every view can be ablated from one cache


# Global pooling of each tap's (N, C, H, W) map, and the multiple of C it stores: avg is the case study's
# global average; avgmax stores the average and the max side by side.
POOLS: dict[str, int] = {"avg": 1, "avgmax": 2}


def channels(taps: list[str] | tuple[str, ...], pool: str = "avg") -> list[int]:
    """Width of each tap's pooled vector in a cache: declared channels x the pooling's multiple."""
    if pool not in POOLS:
        raise FusionCacheError(f"unknown pooling '{pool}'; use one of {', '.join(POOLS)}")
    unknown = [t for t in taps if t not in TAP_BY_NAME]
    if unknown:
        raise FusionCacheError(f"unknown tap '{unknown[0]}'; valid taps are {ALL_TAPS[0]} ... {ALL_TAPS[-1]}")
    return [TAP_BY_NAME[t].channels * POOLS[pool] for t in taps]


def parse_taps(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Turn `--taps` into an ordered, de-duplicated list of declared tap names.

    Accepts a comma-separated list, a view name (`fused`), or `all`.
    """
    items = _split(spec)
    out: list[str] = []
    for item in items:
        names = VIEWS.get(item, (item,))
        for name in names:
            if name not in TAP_BY_NAME:
                raise FusionCacheError(
                    f"unknown tap '{name}'; valid taps are {ALL_TAPS[0]} ... {ALL_TAPS[-1]} "
                    f"(see `fusion-cache taps`) or a view: {', '.join(VIEWS)}"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise FusionCacheError("no taps given; pass e.g. --taps features.13,features.18 or --taps all")
    return sorted(out, key=ALL_TAPS.index)


def resolve_view(spec: str, available: list[str] | tuple[str, ...]) -> list[str]:
    """Taps of a view (`early`, `late`, `fused`, `all`, or `TAP[,TAP...]`) that a cache must hold.

    `all` means every tap the cache holds. Errors name what the cache has.
    """
    spec = spec.strip()
    if spec == "all":
        return list(available)
    if spec in VIEWS:
        taps = list(VIEWS[spec])
    else:
        taps = _split(spec)
        for t in taps:
            if t not in TAP_BY_NAME:
                raise FusionCacheError(
                    f"unknown view or tap '{t}'; use one of {', '.join(VIEWS)} "
                    f"or comma-separated taps such as {EARLY_TAP},{LATE_TAP}"
                )
    missing = [t for t in taps if t not in available]
    if missing:
        raise FusionCacheError(
            f"view '{spec}' needs {', '.join(missing)}, which this cache lacks; it holds "
            f"{', '.join(available)}. Re-run extract with --taps including them"
        )
    return taps


def _split(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(spec, str):
        spec = spec.split(",")
    return [s.strip() for s in spec if s.strip()]
