"""Which backbones fusion-cache can tap, and how: names, builders, weights names, preprocessing and tap tables.

A backbone is named as `fusion-cache extract --backbone NAME` takes it: a torchvision classification model
(`mobilenet_v2`, `resnet50`, any of `torchvision.models.list_models(module=torchvision.models)`) or `timm:NAME`
for any timm model. Its tap table is read from the model itself, never written by hand:

  1. the model is built on the `meta` device (no memory, no weights) and traced with torch.fx, through
     torchvision's `NodePathTracer` (the tracer behind `get_graph_node_names`; timm models with timm's
     non-traceable modules and functions as leaves), and every node's shape is propagated at the default size;
  2. a *block* is an instance of a module class that adds its own input to what it computed from it (a
     residual connection) in at least one place of the model: MobileNet's InvertedResidual, ResNet's
     Bottleneck, EfficientNet's MBConv, ConvNeXt's CNBlock, a ViT's EncoderBlock. Every instance of such a
     class is a tap, the outermost one where blocks nest;
  3. a map-producing stem (the input of the first block) and the last map (what the global pool reads, when
     it is not a block's output: MobileNetV2's features.18) are taps too;
  4. `late` is what the classifier's final nn.Linear receives: the average-pooled last map when nothing else
     comes between (most CNNs), otherwise a `vector` tap named `pre_logits` (ConvNeXt's normalized pooled map,
     a ViT's class token after the final norm); `early` is the last map tap at stride 16 for CNNs, the middle
     block for ViTs.
The table is checked when built: against the classifier's in_features and, for timm, its `feature_info`.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FusionCacheError, quote
from .taps import MOBILENET_V2, Tap, TapTable

DEFAULT_BACKBONE = "mobilenet_v2"
# The case study's defaults where they differ from the weights' own: CIFAR-10 at 128 px, ImageNet weights v1.
CASE_STUDY = {"mobilenet_v2": {"image_size": 128, "weights": "imagenet1k_v1"}}
# Backbones the test suite runs end to end (extract, fit, predict, export, and an independent forward).
TESTED = ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny",
          "vit_b_16", "timm:resnet50", "timm:efficientnet_b0", "timm:convnext_nano", "timm:vit_small_patch16_224",
          "timm:deit_tiny_patch16_224")
TABLE_SIZE = 224  # shapes (and so strides) of the tap table are read at this input size (the models' own)
HOW_TO_LIST = (f"tested: {', '.join(TESTED)} (`fusion-cache models`); any torchvision classification model "
               "(torchvision.models.list_models(module=torchvision.models)) or timm:NAME (timm.list_models()) may work")

_ADDS = {operator.add, operator.iadd, torch.add}
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {torch.flatten, nn.functional.dropout}
_PASS_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone name: the library that builds it and the model's name there."""

    name: str  # as the user spells it: mobilenet_v2, timm:resnet50
    library: str  # torchvision | timm
    arch: str  # the library's model name

    @property
    def library_version(self) -> str:
        return _library(self.library).__version__

    def create(self, **kwargs) -> nn.Module:
        """The architecture with freshly initialised weights (under the caller's device context and seed)."""
        if self.library == "timm":
            import timm

            return timm.create_model(self.arch, pretrained=False, **kwargs)
        import torchvision

        return torchvision.models.get_model(self.arch, weights=None, **kwargs)

    @property
    def tracer_kwargs(self) -> dict:
        """torch.fx tracer settings: timm's modules and functions that must stay leaves."""
        if self.library != "timm":
            return {}
        from timm.layers import get_notrace_functions, get_notrace_modules

        return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}

    def tap_table(self) -> TapTable:
        return tap_table(self.name)

    # -- weights and preprocessing

    def weight_names(self) -> list[str]:
        """Named pretrained weights: torchvision's weights enum members, timm's pretrained tags (lower case)."""
        if self.library == "timm":
            import timm

            return [n.split(".", 1)[1] for n in timm.list_pretrained(self.arch) if n.split(".", 1)[0] == self.arch]
        import torchvision

        try:
            return [w.name.lower() for w in torchvision.models.get_model_weights(self.arch)]
        except (ValueError, KeyError):
            return []

    def default_weights(self) -> str:
        if self.name in CASE_STUDY:
            return CASE_STUDY[self.name]["weights"]
        if self.library == "timm":
            import timm

            cfg = timm.get_pretrained_cfg(self.arch)
            tag = (cfg.tag if cfg is not None else None) or (self.weight_names() or [None])[0]
            if not tag:  # never fall back to random features silently
                raise FusionCacheError(f"timm:{self.arch} has no pretrained weights; pass --weights random or a "
                                       "weights file")
            return tag
        import torchvision

        try:
            return torchvision.models.get_model_weights(self.arch).DEFAULT.name.lower()
        except (ValueError, KeyError, AttributeError):
            return "random"

    def torchvision_weights(self, name: str | None):
        """The weights enum member `name` (None: the default one, whose metadata a local file or random weights
        are preprocessed with)."""
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(self.arch)
        except (ValueError, KeyError):
            return None
        if name is None:
            return enum.DEFAULT
        return {w.name.lower(): w for w in enum}[name.lower()]

    def preprocessing(self, weights_name: str | None) -> dict:
        """{mean, std, interpolation, image_size} from the weights' own metadata (torchvision's
        `weights.transforms()`, timm's `resolve_data_config`); `weights_name` None: the default weights'."""
        if self.library == "timm":
            import timm
            from timm.data import resolve_data_config

            cfg = timm.get_pretrained_cfg(f"{self.arch}.{weights_name}" if weights_name else self.arch)
            data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
            out = {"mean": tuple(float(x) for x in data["mean"]), "std": tuple(float(x) for x in data["std"]),
                   "interpolation": str(data["interpolation"]), "image_size": int(data["input_size"][-1])}
        else:
            w = self.torchvision_weights(weights_name)
            if w is None:
                out = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear",
                       "image_size": TABLE_SIZE}
            else:
                tf = w.transforms()
                out = {"mean": tuple(float(x) for x in tf.mean), "std": tuple(float(x) for x in tf.std),
                       "interpolation": tf.interpolation.value, "image_size": int(tf.crop_size[0])}
        if out["interpolation"] not in ("bilinear", "bicubic", "nearest"):
            out["interpolation"] = "bilinear"
        if self.name in CASE_STUDY:
            out["image_size"] = CASE_STUDY[self.name]["image_size"]
        return out

    def fixed_image_size(self, model: nn.Module | None = None) -> int | None:
        """The one input size a model with a fixed patch grid takes (torchvision's ViT, timm's strict
        PatchEmbed); None when any size in range runs."""
        model = model if model is not None else _meta_model(self.name)
        size = getattr(model, "image_size", None)
        if isinstance(size, int) and hasattr(model, "patch_size"):
            return size
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False):
            img = getattr(pe, "img_size", None)
            if img is not None:
                return int(img[0] if isinstance(img, (tuple, list)) else img)
        return None

    def check_image_size(self, size: int) -> None:
        """Refuse a size the model cannot run at, before any weights are loaded or files written."""
        fixed = self.fixed_image_size()
        if fixed is not None and size != fixed:
            patch = _patch_size(_meta_model(self.name))
            grid = f"{fixed // patch} x {fixed // patch} patches of {patch} px" if patch else "a fixed grid"
            raise FusionCacheError(f"{self.name} takes {fixed} px images only (its patch grid is fixed: {grid}); "
                                   f"pass --image-size {fixed} or leave it out")
        try:
            _shapes(self.name, size)
        except Exception as e:  # the model's own check, whatever its type
            raise FusionCacheError(f"{self.name} does not run at {size} px ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:100]}); pass a larger --image-size") from None


def _library(library: str):
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise FusionCacheError("timm is not installed; pip install timm to use timm:NAME backbones") from None
        return timm
    import torchvision

    return torchvision


@functools.lru_cache(maxsize=None)
def resolve(name: str | None) -> Backbone:
    """`mobilenet_v2`, `resnet50`, `timm:vit_small_patch16_224` -> Backbone; unknown names fail with how to list."""
    if name is not None and not name.strip():  # `--backbone ""` is a slip, not a request for the default
        raise FusionCacheError("the backbone name is empty; pass --backbone NAME, e.g. mobilenet_v2 or resnet50 "
                               "(`fusion-cache models` lists the tested ones)")
    name = (name or DEFAULT_BACKBONE).strip()
    if name.startswith("timm:"):
        arch = name[len("timm:"):]
        timm = _library("timm")
        if not arch or not timm.is_model(arch):
            raise FusionCacheError(f"unknown backbone {quote(name)}: timm has no model {quote(arch)}; {HOW_TO_LIST}")
        return Backbone(name, "timm", arch)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        hint = f" (timm has one: pass timm:{name})" if _is_timm_model(name) else ""
        raise FusionCacheError(f"unknown backbone {quote(name)}{hint}; {HOW_TO_LIST}")
    return Backbone(name, "torchvision", name)


def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


# ---------------------------------------------------------------------------------------------- tracing


@functools.lru_cache(maxsize=8)
def _meta_model(name: str) -> nn.Module:
    """The architecture without weights, for tracing; on the meta device (instant) where its init allows."""
    try:
        with torch.device("meta"):
            return resolve(name).create().eval()
    except (NotImplementedError, RuntimeError):  # an init that reads tensor values: build it for real
        return resolve(name).create().eval()


@functools.lru_cache(maxsize=8)
def _traced(name: str):
    """(model, graph, node -> qualified name) of the meta model, traced as `get_graph_node_names` traces it."""
    from torchvision.models.feature_extraction import NodePathTracer

    model = _meta_model(name)
    tracer = NodePathTracer(**resolve(name).tracer_kwargs)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise FusionCacheError(f"{name} cannot be tapped: torch.fx cannot trace it ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:100]}); {HOW_TO_LIST}") from None
    return model, graph, tracer.node_to_qualname


def conv_bn_pairs(name: str) -> list[list[str]]:
    """[conv, bn] module names wherever the traced graph feeds a plain Conv2d's output to a plain BatchNorm2d
    and to nothing else, each module called once: the pairs that fold into one convolution with the same
    function (a ResNet's bottlenecks and stem as well as MobileNetV2's Sequentials). A convolution whose
    output is itself a tap is left alone (folding would change the tap). A model that does not trace gives
    none."""
    try:
        model, graph, _ = _traced(name)
        taps = set(tap_table(name).names)
    except FusionCacheError:
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or type(modules.get(n.target)) is not nn.BatchNorm2d or len(n.args) != 1:
            continue
        conv = n.args[0]
        if (getattr(conv, "op", None) == "call_module" and type(modules.get(conv.target)) is nn.Conv2d
                and len(conv.users) == 1 and calls[conv.target] == 1 and calls[n.target] == 1
                and conv.target not in taps):
            pairs.append([conv.target, n.target])
    return pairs


def _shapes(name: str, size: int) -> dict:
    """node -> output shape at an input of `size` px (meta tensors: no compute). A copy of one worked out
    once per process: the tap table and the image-size check ask for the same one (224 px)."""
    return dict(_shapes_once(name, size))


@functools.lru_cache(maxsize=16)
def _shapes_once(name: str, size: int) -> dict:
    from torch.fx.passes.shape_prop import ShapeProp

    model, graph, _ = _traced(name)
    gm = torch.fx.GraphModule(model, graph)
    device = next(iter(model.parameters()), torch.empty(0, device="meta")).device
    ShapeProp(gm).propagate(torch.empty(1, 3, size, size, device=device))
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def _owner(qualname: str) -> str:
    return qualname.rsplit(".", 1)[0] if "." in qualname else ""


def _within(qualname: str, module: str) -> bool:
    return qualname.startswith(module + ".")


def _is_add(n) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))


def _passes(n, modules: dict) -> bool:
    """A node that hands its input on unchanged in eval mode (dropout, identity, flatten, reshape)."""
    if n.op == "call_module":
        return isinstance(modules.get(n.target), _PASS_MODULES)
    if n.op == "call_function":
        return n.target in _PASS_FUNCTIONS
    return n.op == "call_method" and n.target in _PASS_METHODS


def _strip(n, modules: dict):
    while _passes(n, modules) and n.all_input_nodes:
        n = n.all_input_nodes[0]
    return n


def _global_avg_pool(n, modules: dict) -> bool:
    if n.op == "call_module":
        m = modules.get(n.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    if n.op == "call_function" and n.target is nn.functional.adaptive_avg_pool2d:
        return (n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")) in (1, (1, 1))
    if (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return tuple(sorted(dims)) in ((2, 3), (-2, -1)) if isinstance(dims, (tuple, list)) else False
    return False


def _patch_size(model: nn.Module) -> int | None:
    p = getattr(model, "patch_size", None)
    if p is None and getattr(model, "patch_embed", None) is not None:
        p = getattr(model.patch_embed, "patch_size", None)
    if isinstance(p, (tuple, list)):
        p = p[0]
    return int(p) if p else None


@functools.lru_cache(maxsize=None)
def tap_table(name: str) -> TapTable:
    """The tap table of a backbone, read from the model (see the module docstring), checked."""
    bb = resolve(name)
    model, graph, qual = _traced(bb.name)
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    qn = {n: qual.get(n, n.name) for n in nodes}
    shapes = _shapes(bb.name, TABLE_SIZE)

    # 2. block classes: a module that adds its input to a value it computed from that input
    def depends(n, on, seen=None) -> bool:
        seen = set() if seen is None else seen
        stack = [n]
        while stack:
            x = stack.pop()
            if x is on:
                return True
            if x in seen:
                continue
            seen.add(x)
            stack.extend(x.all_input_nodes)
        return False

    classes = set()
    for n in nodes:
        if not _is_add(n):
            continue
        owner = _owner(qn[n])
        if owner not in modules or owner == "":
            continue
        args = [_strip(a, modules) if _within(qn[a], owner) else a for a in n.all_input_nodes]
        outside = [a for a in args if not _within(qn[a], owner) and a.op != "get_attr"]
        inside = [a for a in args if _within(qn[a], owner) and a.op != "get_attr"]
        if any(depends(i, o) for o in outside for i in inside):
            classes.add(type(modules[owner]))
    blocks = [p for p, m in modules.items() if p and type(m) in classes]
    blocks = [b for b in blocks if not any(_within(b, o) for o in blocks)]
    if not blocks:
        raise FusionCacheError(f"{name} cannot be tapped: it has no residual blocks (no module adds its input to "
                               f"what it computes); {HOW_TO_LIST}")
    last: dict[str, object] = {}  # module -> its last node (its output)
    for n in nodes:
        q = qn[n]
        while q:
            q = _owner(q)
            if q in modules:
                last[q] = n
        if n.op == "call_module":
            last[n.target] = n
    pos = {n: i for i, n in enumerate(nodes)}
    blocks.sort(key=lambda b: pos[last[b]])
    block_out = {last[b]: b for b in blocks}

    def name_of(n) -> str:
        """The outermost module whose output `n` is and that holds no block (MobileNetV2: features.0)."""
        q = qn[n]
        best = None
        for i in range(q.count(".") + 1, 0, -1):
            p = ".".join(q.split(".")[:i])
            if p in modules and last.get(p) is n and not any(_within(b, p) or b == p for b in blocks):
                best = p
        return best or q

    taps: list[tuple[str, object]] = []  # (name, node) in execution order
    # 3. the stem: the map the first block reads
    first = blocks[0]
    feeding = {a for n in nodes if _within(qn[n], first) for a in n.all_input_nodes
               if not _within(qn[a], first) and a.op not in ("get_attr", "placeholder")}
    if len(feeding) == 1:
        stem = _strip(feeding.pop(), modules)
        if stem.op != "placeholder" and len(shapes.get(stem.name, ())) == 4:
            taps.append((name_of(stem), stem))
    taps += [(b, last[b]) for b in blocks]
    # the last map, when the global pool does not read a block's output
    pool_node = next((n for n in nodes[pos[last[blocks[-1]]]:] if _global_avg_pool(n, modules)), None)
    if pool_node is not None:
        final = _strip(pool_node.all_input_nodes[0], modules)
        if final not in block_out and pos[final] > pos[last[blocks[-1]]]:
            taps.append((name_of(final), final))
    # 4. late: what the final nn.Linear receives
    linears = [n for n in nodes if n.op == "call_module" and isinstance(modules.get(n.target), nn.Linear)]
    if not linears:
        raise FusionCacheError(f"{name} cannot be tapped: it has no nn.Linear classifier; {HOW_TO_LIST}")
    classifier = linears[-1]
    feeds = classifier.all_input_nodes[0]
    source = _strip(feeds, modules)
    nodes_of = {}
    if pool_node is not None and source is pool_node and _strip(pool_node.all_input_nodes[0], modules) in \
            {node for _, node in taps}:
        late = next(t for t, node in taps if node is _strip(pool_node.all_input_nodes[0], modules))
    else:
        late = "pre_logits"
        taps.append((late, feeds))
        nodes_of[late] = qn[feeds]

    # shapes -> kinds, channels, strides
    patch = _patch_size(model)
    prefix = 0
    records = []
    for i, (t, n) in enumerate(taps):
        shape = shapes.get(n.name)
        if t == "pre_logits":
            flat = shape is not None and (len(shape) == 2 or len(shape) == 4 and shape[2] == shape[3] == 1)
            if not flat:
                raise FusionCacheError(f"{name} cannot be tapped: the classifier's input has shape {shape}")
            kind, ch, red = "vector", int(math.prod(shape[1:])), 1  # its stride: that of its source, below
        elif shape is not None and len(shape) == 4 and shape[2] == shape[3]:
            kind, ch, red = "map", int(shape[1]), TABLE_SIZE // int(shape[2])
        elif shape is not None and len(shape) == 3 and patch:
            grid = (TABLE_SIZE // patch) ** 2
            prefix = int(shape[1]) - grid
            kind, ch, red = "tokens", int(shape[2]), patch
        else:
            raise FusionCacheError(f"{name} cannot be tapped: block {t} gives shape {shape}, neither a square "
                                   f"(N, C, H, W) map nor (N, T, D) patch tokens; {HOW_TO_LIST}")
        records.append(Tap(t, ch, red, kind, (i + 1) / len(taps)))
    if records[-1].kind == "vector":  # the vector's stride: that of the map or tokens it came from
        records[-1] = Tap(records[-1].name, records[-1].channels, records[-2].reduction, "vector", 1.0)
    kinds = {r.kind for r in records}
    if "tokens" in kinds and "map" in kinds:
        raise FusionCacheError(f"{name} cannot be tapped: it mixes maps and tokens; {HOW_TO_LIST}")
    in_features = modules[classifier.target].in_features
    if next(r for r in records if r.name == late).channels != in_features:
        raise FusionCacheError(f"{name}: the late tap {late} is not the classifier's input width {in_features}")
    block_recs = [r for r in records if r.kind != "vector"]
    if "tokens" in kinds:
        early = block_recs[(len(block_recs) - 1) // 2].name
        default_pool = _default_token_pool(model, prefix)
    else:
        at16 = [r.name for r in block_recs if r.reduction == 16]
        early = at16[-1] if at16 else block_recs[(len(block_recs) - 1) // 2].name
        default_pool = "avg"
    table = TapTable(bb.name, tuple(records), {"early": (early,), "late": (late,)}, default_pool, prefix, nodes_of)
    if bb.library == "timm":
        _check_feature_info(table, model, last, block_out, modules)
    return table


def _default_token_pool(model: nn.Module, prefix: int) -> str:
    """The model's own global pool: torchvision's ViT and timm's `token` read the class token; timm's `avg`
    the patch-token mean."""
    pool = getattr(model, "global_pool", "token")
    if not isinstance(pool, str):
        pool = "token"
    return "cls" if pool == "token" and prefix > 0 else "mean"


def _check_feature_info(table: TapTable, model: nn.Module, last: dict, block_out: dict, modules: dict) -> None:
    """timm declares its stage outputs in `feature_info`; every one that ends at one of our taps must agree on
    channels and stride."""
    by_name = {t.name: t for t in table.taps}
    for info in getattr(model, "feature_info", []) or []:
        mod = info.get("module", "")
        node = last.get(mod)
        tap = by_name.get(mod) or by_name.get(block_out.get(node, ""))
        if tap is None or tap.kind == "vector":
            continue
        if tap.channels != info.get("num_chs") or (tap.kind == "map" and tap.reduction != info.get("reduction")):
            raise FusionCacheError(f"tap table of {table.backbone}: {tap.name} has {tap.channels} channels at stride "
                                   f"{tap.reduction}, but timm's feature_info says {info.get('num_chs')} at "
                                   f"{info.get('reduction')}")


def describe(name: str) -> dict:
    """One line of `fusion-cache models`: library, taps, widths and defaults."""
    bb = resolve(name)
    table = bb.tap_table()
    pre = bb.preprocessing(None)
    late = table.views["late"][0]
    return {"backbone": bb.name, "library": bb.library, "taps": len(table.taps), "early": table.views["early"][0],
            "late": late, "late_width": table.tap(late).channels, "pool": table.default_pool,
            "image_size": pre["image_size"], "fixed_size": bb.fixed_image_size() is not None}


# The case study's table is declared in taps.py (schema-2 caches use it); the traced one must equal it.
def check_case_study() -> None:
    traced = tap_table(DEFAULT_BACKBONE)
    if traced != MOBILENET_V2:
        raise FusionCacheError("the traced mobilenet_v2 tap table differs from taps.MOBILENET_V2")
