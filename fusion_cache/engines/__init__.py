"""Extraction engines: each executes a `core.Plan` and writes the cache it describes.

`ENGINES` is the registry, read by `extract`'s validation, the CLI's `--engine` choices and the docs. Each entry
names a module that defines `run(plan, cfg, weights)`, `validate(cfg)` and `OPTIONS` (the settings only that
engine takes, with their defaults). Modules are imported on first use, so listing the names costs nothing.
Engines sit side by side and never import each other; `core` is what they share.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Engine:
    name: str
    module_name: str  # relative to this package
    summary: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.module_name}")

    @property
    def options(self) -> dict:
        return self.module.OPTIONS


ENGINES: dict[str, Engine] = {
    "local": Engine("local", "local", "this process writes OUT"),
    "ray": Engine("ray", "ray", "workers of a Ray cluster write shards under OUT.shards/, and OUT reads them "
                                "(needs `pip install 'fusion-cache[ray]'`)"),
}
