"""Feature taps and views of a backbone, as data: one `TapTable` per backbone, read through accessors.

A *tap* is a graph node of the backbone whose output is pooled to one vector per image:
  - a `map` (N, C, H, W), the output of a convolutional block: globally pooled with `avg` (C floats) or
    `avgmax` (average and max side by side, 2C floats);
  - `tokens` (N, T, D), the output of a transformer block: pooled with `cls` (the class token), `mean` (the
    mean of the patch tokens) or `clsmean` (both, 2D floats);
  - a `vector` (N, D): what the classifier's final nn.Linear receives when that is not a pooled block output
    (ConvNeXt's normalized pooled map, a ViT's pre-logits token, MobileNetV3's hidden layer); stored as is.
A *view* is a named list of taps whose pooled vectors are concatenated for a head: `early`, `late`, `fused`
(early + late) and `all`.

The tables are built from the models themselves (`backbones.tap_table`) and checked when built. The one
written here, `MOBILENET_V2`, is the case study's: schema-2 caches were written with it, and a test checks that
the table traced from torchvision's mobilenet_v2 equals it. The module-level names (`TAPS`, `VIEWS`,
`channels`, `parse_taps`, ...) are that table's, for code that only knows the case study.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from .errors import FusionCacheError, quote

KINDS = ("map", "tokens", "vector")

# Pooling of a tap's output -> (the kind it applies to, the multiple of the tap's channels it stores).
POOLS: dict[str, tuple[str, int]] = {
    "avg": ("map", 1),  # the case study's global average
    "avgmax": ("map", 2),  # global average, then global max
    "cls": ("tokens", 1),  # the class token
    "mean": ("tokens", 1),  # the mean of the patch tokens (prefix tokens left out, as timm's avg pool)
    "clsmean": ("tokens", 2),  # the class token, then the patch-token mean
}


@dataclass(frozen=True)
class Tap:
    name: str  # the node name, as `get_graph_node_names` spells it (a module's name: its last operation)
    channels: int  # C of a map, D of tokens or of a vector: the width of its pooled vector for a multiple-1 pool
    reduction: int  # input size / map size (the stride); a token's patch size; a vector: its map's stride
    kind: str = "map"  # map | tokens | vector
    depth: float = 0.0  # relative depth in (0, 1]: (position in execution order + 1) / number of taps


@dataclass(frozen=True)
class TapTable:
    """The taps of one backbone, in execution order, with its views and the poolings that fit it."""

    backbone: str
    taps: tuple[Tap, ...]
    views: dict = field(default_factory=dict)  # early, late -> tuple of tap names (fused and all derived)
    default_pool: str = "avg"
    prefix_tokens: int = 0  # leading non-patch tokens of token taps (class token, registers)
    nodes: dict = field(default_factory=dict)  # tap name -> graph node, where they differ (the `vector` tap)

    def __post_init__(self):
        self.check()

    # -- accessors, in the spirit of timm's FeatureInfo

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.taps)

    def tap(self, name: str) -> Tap:
        for t in self.taps:
            if t.name == name:
                return t
        raise self._unknown(name)

    def channels(self, taps: list[str] | tuple[str, ...], pool: str | None = None) -> list[int]:
        """Width of each tap's pooled vector in a cache: channels x the pooling's multiple (1 for a vector)."""
        pool = self.check_pool(pool or self.default_pool)
        return [t.channels * (POOLS[pool][1] if t.kind != "vector" else 1) for t in map(self.tap, taps)]

    def reduction(self, taps: list[str] | tuple[str, ...]) -> list[int]:
        return [self.tap(t).reduction for t in taps]

    def depth(self, taps: list[str] | tuple[str, ...]) -> list[float]:
        return [self.tap(t).depth for t in taps]

    def node(self, tap: str) -> str:
        """The graph node whose output a tap reads."""
        return self.nodes.get(tap, tap)

    @property
    def pools(self) -> tuple[str, ...]:
        kinds = {t.kind for t in self.taps}
        return tuple(p for p, (kind, _) in POOLS.items()
                     if kind in kinds and not (kind == "tokens" and p != "mean" and self.prefix_tokens == 0))

    def check_pool(self, pool: str) -> str:
        if pool not in self.pools:
            raise FusionCacheError(f"--pool {pool} does not fit {self.backbone}; use one of {', '.join(self.pools)}")
        return pool

    @property
    def all_views(self) -> dict[str, tuple[str, ...]]:
        early, late = tuple(self.views["early"]), tuple(self.views["late"])
        return {"early": early, "late": late, "fused": tuple(dict.fromkeys(early + late)), "all": self.names}

    # -- parsing taps and views

    def parse_taps(self, spec: str | list[str] | tuple[str, ...]) -> list[str]:
        """Turn `--taps` into an ordered, de-duplicated list of this table's tap names.

        Accepts a comma-separated list, a view name (`fused`), or `all`.
        """
        views = self.all_views
        out: list[str] = []
        items = _split(spec)
        _warn_twice(items, "--taps", "cached once")
        for item in items:
            for name in views.get(item, (item,)):
                if name not in self.names:
                    raise self._unknown(name, views=True)
                if name not in out:
                    out.append(name)
        if not out:
            raise FusionCacheError(f"no taps given; pass e.g. --taps {','.join(views['fused'])} or --taps all")
        return sorted(out, key=self.names.index)

    def resolve_view(self, spec: str, available: list[str] | tuple[str, ...]) -> list[str]:
        """Taps of a view (`early`, `late`, `fused`, `all`, or `TAP[,TAP...]`) that a cache must hold.

        `all` means every tap the cache holds. Errors name what the cache has.
        """
        spec = spec.strip()
        if spec == "all":
            return list(available)
        views = self.all_views
        if spec in views:
            taps = list(views[spec])
        else:
            taps = _split(spec)
            for t in taps:
                if t not in self.names:
                    raise FusionCacheError(
                        f"unknown view or tap {quote(t)}; use one of {', '.join(views)} "
                        f"or comma-separated taps{self._of()} such as {','.join(views['fused'])} "
                        f"(see `{self._taps_command()}`)"
                    )
            _warn_twice(taps, f"view {quote(spec)}", "used once")
            taps = list(dict.fromkeys(taps))
        missing = [t for t in taps if t not in available]
        if missing:
            raise FusionCacheError(
                f"view {quote(spec)} needs {', '.join(missing)}, which this cache lacks; it holds "
                f"{', '.join(available)}. Re-run extract with --taps including them"
            )
        return taps

    def _of(self) -> str:
        return "" if self.backbone == "mobilenet_v2" else f" of {self.backbone}"

    def _taps_command(self) -> str:
        return "fusion-cache taps" + ("" if self.backbone == "mobilenet_v2" else f" --backbone {self.backbone}")

    def _unknown(self, name: str, views: bool = False) -> FusionCacheError:
        where = self._of()
        names = self.names
        return FusionCacheError(
            f"unknown tap {quote(name)}; valid taps{where} are {names[0]} ... {names[-1]} "
            f"(see `{self._taps_command()}`)"
            + (f" or a view: {', '.join(self.all_views)}" if views else "")
        )

    # -- checks and serialization

    def check(self) -> None:
        """The invariants every later step relies on; a table that breaks one is refused when built."""
        def bad(why):
            raise FusionCacheError(f"tap table of {self.backbone}: {why}")

        if not self.taps:
            bad("no taps")
        names = [t.name for t in self.taps]
        if len(set(names)) != len(names):
            bad("a tap name appears twice")
        for t in self.taps:
            if t.kind not in KINDS:
                bad(f"tap {t.name} has unknown kind {t.kind!r}")
            if not (isinstance(t.channels, int) and t.channels > 0 and isinstance(t.reduction, int) and t.reduction > 0):
                bad(f"tap {t.name} has channels {t.channels!r} and reduction {t.reduction!r}; both must be positive")
            if not 0 < t.depth <= 1:
                bad(f"tap {t.name} has depth {t.depth!r}, outside (0, 1]")
        if [t.depth for t in self.taps] != sorted(t.depth for t in self.taps):
            bad("depths do not increase along the taps")
        for v in ("early", "late"):
            if not self.views.get(v) or any(n not in names for n in self.views[v]):
                bad(f"view {v} names no taps of the table")
        if not 0 <= self.prefix_tokens < 64:
            bad(f"prefix_tokens {self.prefix_tokens!r}")
        if self.default_pool not in self.pools:
            bad(f"default pool {self.default_pool!r} does not fit its taps")

    def to_json(self) -> dict:
        return {"backbone": self.backbone, "default_pool": self.default_pool, "prefix_tokens": self.prefix_tokens,
                "views": {k: list(v) for k, v in self.views.items()}, "nodes": dict(self.nodes),
                "taps": [{"name": t.name, "channels": t.channels, "reduction": t.reduction, "kind": t.kind,
                          "depth": t.depth} for t in self.taps]}

    @classmethod
    def from_json(cls, d: dict) -> "TapTable":
        """Parse and check a table recorded in a cache or a head; raises ValueError/TypeError when malformed."""
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, dict) or not isinstance(d.get("taps"), list):
            raise TypeError("not a tap table")
        taps = tuple(Tap(str(t["name"]), _int(t["channels"]), _int(t["reduction"]), str(t["kind"]), float(t["depth"]))
                     for t in d["taps"])
        views = {str(k): tuple(str(x) for x in v) for k, v in dict(d["views"]).items()}
        try:
            return cls(str(d["backbone"]), taps, views, str(d["default_pool"]), _int(d["prefix_tokens"]),
                       {str(k): str(v) for k, v in dict(d.get("nodes", {})).items()})
        except FusionCacheError as e:
            raise ValueError(str(e)) from None


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{v!r} is not an integer")
    return v


def _warn_twice(items: list[str], where: str, effect: str) -> None:
    """A tap (or view) named twice is a slip, not a request to use it twice: one line says so."""
    seen: set[str] = set()
    twice = next((t for t in items if t in seen or seen.add(t)), None)
    if twice is not None:
        warnings.warn(f"{where} names {quote(twice)} twice; it is {effect}", UserWarning, stacklevel=3)


def _split(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(spec, str):
        spec = spec.split(",")
    return [s.strip() for s in spec if s.strip()]


# ---------------------------------------------------------------------------------------------- the case study

# The 19 blocks of torchvision's mobilenet_v2().features (width 1.0): the table schema-2 caches were written with.
# `backbones.tap_table("mobilenet_v2")` traces the same table from the model; a test checks that they are equal.
_MNV2 = [("features.0", 32, 2),  # stem conv
         ("features.1", 16, 2), ("features.2", 24, 4), ("features.3", 24, 4), ("features.4", 32, 8),
         ("features.5", 32, 8), ("features.6", 32, 8), ("features.7", 64, 16), ("features.8", 64, 16),
         ("features.9", 64, 16), ("features.10", 64, 16), ("features.11", 96, 16), ("features.12", 96, 16),
         ("features.13", 96, 16),  # last block at stride 16: the case study's early/late split point
         ("features.14", 160, 32), ("features.15", 160, 32), ("features.16", 160, 32), ("features.17", 320, 32),
         ("features.18", 1280, 32)]  # final 1x1 conv: what the ImageNet classifier sees, average-pooled
MOBILENET_V2 = TapTable(
    "mobilenet_v2",
    tuple(Tap(n, c, r, "map", (i + 1) / len(_MNV2)) for i, (n, c, r) in enumerate(_MNV2)),
    {"early": ("features.13",), "late": ("features.18",)},
)

TAPS: tuple[Tap, ...] = MOBILENET_V2.taps
TAP_BY_NAME: dict[str, Tap] = {t.name: t for t in TAPS}
ALL_TAPS: tuple[str, ...] = MOBILENET_V2.names
EARLY_TAP = "features.13"
LATE_TAP = "features.18"
VIEWS: dict[str, tuple[str, ...]] = MOBILENET_V2.all_views
DEFAULT_TAPS: tuple[str, ...] = ALL_TAPS  # 2,816 floats an image: every view can be ablated from one cache


def channels(taps: list[str] | tuple[str, ...], pool: str = "avg") -> list[int]:
    """MobileNetV2's `TapTable.channels` (the case study's taps)."""
    if pool not in POOLS:
        raise FusionCacheError(f"unknown pooling '{pool}'; use one of {', '.join(POOLS)}")
    return MOBILENET_V2.channels(taps, pool)


def parse_taps(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    return MOBILENET_V2.parse_taps(spec)


def resolve_view(spec: str, available: list[str] | tuple[str, ...]) -> list[str]:
    return MOBILENET_V2.resolve_view(spec, available)
