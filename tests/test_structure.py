"""The package's shape, read from its source with `ast`: no import circle, data flowing one way
(config -> plan -> engine -> cache writer), engines side by side, and one owner per file format."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fusion_cache"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions alike."""
    modules = modules or _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        package = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {t for t in targets if t in modules and t != m and t != "fusion_cache"}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    assert cycles(imports()) == []


def test_engines_sit_side_by_side_below_extract():
    """Engines share `engines.core`, never import each other or `extract` (the dispatcher): the config and
    the Plan travel down and never come back."""
    edges = imports()
    engines = [m for m in edges if m.startswith("fusion_cache.engines.") and m != "fusion_cache.engines.core"]
    assert sorted(engines) == ["fusion_cache.engines.local", "fusion_cache.engines.ray"]
    for m in engines + ["fusion_cache.engines.core"]:
        bad = {t for t in edges[m] if t in engines or t in ("fusion_cache.extract", "fusion_cache.cli")}
        assert not bad, f"{m} imports {bad}"


def test_every_registered_engine_has_its_module():
    from fusion_cache.engines import ENGINES

    for name, engine in ENGINES.items():
        mod = engine.module
        assert callable(mod.run) and callable(mod.validate) and isinstance(mod.OPTIONS, dict), name
        assert Path(mod.__file__).name == f"{engine.module_name}.py"


def _calls(tree: ast.AST, owner: str, attr: str) -> int:
    return sum(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr and
               isinstance(n.func.value, ast.Name) and n.func.value.id == owner for n in ast.walk(tree))


@pytest.mark.parametrize("owner, attr, home", [("h5py", "File", "cache.py"), ("h5py", "VirtualLayout", "cache.py")])
def test_one_module_owns_the_cache_format(owner, attr, home):
    users = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _calls(ast.parse(p.read_text()), owner, attr)]
    assert users == [home], f"{owner}.{attr} is called in {users}"
