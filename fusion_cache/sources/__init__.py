"""The registry of image sources: one module each, behind one small interface.

A source module has `NAME`, `detect(root) -> str | None` (what it recognizes at --data-root, in a few words),
`check_root(root)` (fail fast on the wrong kind of path), `test_split(root) -> str | None` (where its own test
split is, found without hashing anything; None when it has none) and `load(root, options) -> Listing` (the
splits it ships with, every item labelled and content-hashed). The registry gives `--dataset` its choices and help, `auto` its
rules (tried in registry order) and the docs their table; adding a source is one module and one line here.
Modules are imported when used, so the command line starts without torch.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FusionCacheError


@dataclass(frozen=True)
class SourceEntry:
    name: str
    module: str
    layout: str  # what --data-root is, for --help and the docs
    options: tuple[str, ...] = ()  # the `LoadOptions` fields beyond download and integrity that it reads

    @property
    def impl(self):
        return importlib.import_module(self.module)


@dataclass(frozen=True)
class LoadOptions:
    download: bool = True  # sources that can download (CIFAR-10) do so only into a missing or empty folder
    skip_integrity_check: bool = False
    image_column: str | None = None  # parquet, hf: the column of images (None: "image")
    label_column: str | None = None  # parquet, hf: the column of labels (None: "label")
    label_key: str | None = None  # wds: the member (or json field) that holds the label (None: cls, else json's label)
    label_set: str | None = None  # cifar100: fine | coarse (None: fine)


OPTION_FLAGS = {"image_column": "--image-column", "label_column": "--label-column", "label_key": "--label-key",
                "label_set": "--label-set"}


SOURCES = {e.name: e for e in (
    SourceEntry("cifar10", "fusion_cache.sources.cifar10",
                "CIFAR-10: a folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz (downloaded into a "
                "missing or empty folder when named explicitly)"),
    SourceEntry("cifar100", "fusion_cache.sources.cifar100",
                "CIFAR-100: a folder holding cifar-100-python/ or cifar-100-python.tar.gz (downloaded into a "
                "missing or empty folder when named explicitly); --label-set fine (100 classes, the default) or "
                "coarse (20 superclasses)", options=("label_set",)),
    SourceEntry("stl10", "fusion_cache.sources.stl10",
                "STL-10: a folder holding stl10_binary/ (its labelled train and test splits; the "
                "stl10_binary.tar.gz archive is downloaded and extracted into a missing or empty folder when named "
                "explicitly)"),
    SourceEntry("hf", "fusion_cache.sources.hf",
                "a Hugging Face save_to_disk folder (a Dataset, or a DatasetDict of train, test, validation): an "
                "image column and a label column (needs `pip install 'fusion-cache[hf]'`)",
                options=("image_column", "label_column")),
    SourceEntry("parquet", "fusion_cache.sources.parquet",
                "parquet files, or a folder of them as the Hugging Face Hub ships them (data/train-*.parquet, "
                "test-*, validation-*): an image column (HF Image structs or bytes) and a label column",
                options=("image_column", "label_column")),
    SourceEntry("wds", "fusion_cache.sources.wds",
                "WebDataset shards: .tar files (train-000000.tar, test-*.tar, ...), each sample an image (jpg, jpeg, "
                "png or webp) with a cls member or a json label", options=("label_key",)),
    SourceEntry("manifest", "fusion_cache.sources.manifest",
                "a CSV file with the header path,label[,split], one row per image (path absolute or relative "
                "to the CSV's folder; split train, test or val)"),
    SourceEntry("imagefolder", "fusion_cache.sources.imagefolder",
                "a folder of class folders (<class>/<image>), or of split folders train/ with test/, val/, valid/ "
                "or validation/ beside it, each holding class folders"),
)}
AUTO = "auto"
DATASETS = (AUTO, *SOURCES)


def layouts() -> str:
    """The layouts `auto` knows, in one line."""
    return "; ".join(f"{e.name}: {e.layout}" for e in SOURCES.values())


def detect(root: Path) -> tuple[str, str]:
    """(dataset name, what was found) for `--dataset auto`: the first source whose rule matches. Never
    downloads; a missing, empty or unknown --data-root is an error that lists the layouts known."""
    shown = _shown(root)
    if not os.path.lexists(root):
        raise FusionCacheError(f"--data-root {shown} does not exist; pass a folder of class folders (<class>/<image>),"
                               " a CSV manifest, parquet files, .tar shards, or a folder holding CIFAR-10 (add "
                               "--dataset cifar10 to download it)")
    for entry in SOURCES.values():
        found = entry.impl.detect(root)
        if found:
            return entry.name, found
    if os.path.isdir(root):
        try:
            names = [e.name for e in os.scandir(root)]
        except OSError as e:
            raise FusionCacheError(f"cannot read --data-root {shown} ({e.strerror}); fix its permissions") from None
        from ..files import has_image_extension

        if any(has_image_extension(n) for n in names):
            raise FusionCacheError(f"--data-root {shown} holds images but no class folders; put each class's images "
                                   "in a folder named after the class (<class>/<image>), or list them in a CSV "
                                   "manifest (path,label)")
        what = "is empty" if not names else "holds no layout fusion-cache knows"
        fix = "; pass --dataset cifar10 to download CIFAR-10 into it" if not names else ""
        raise FusionCacheError(f"--data-root {shown} {what}{fix}; the layouts known are {layouts()}")
    raise FusionCacheError(f"--data-root {shown} is a file fusion-cache cannot read; the layouts known are {layouts()}")


def resolve(dataset: str, root: Path) -> tuple[str, str | None]:
    """(the dataset to read, what `auto` found, or None when the dataset was named)."""
    if dataset == AUTO:
        return detect(root)
    if dataset not in SOURCES:
        raise FusionCacheError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    return dataset, None


def check_root(dataset: str, root: Path) -> None:
    """Fail fast when --data-root is the wrong kind of path for `dataset` (auto: when nothing matches)."""
    name, _ = resolve(dataset, root)
    SOURCES[name].impl.check_root(root)


def check_options(dataset: str, root: Path, options: LoadOptions) -> None:
    """Fail fast on a source option (--image-column, --label-set, ...) that the dataset at `root` does not read."""
    name, _ = resolve(dataset, root)
    for field, flag in OPTION_FLAGS.items():
        if getattr(options, field) is not None and field not in SOURCES[name].options:
            takers = [e.name for e in SOURCES.values() if field in e.options]
            raise FusionCacheError(f"{flag} applies to --dataset {' or '.join(takers)}, and this --data-root is "
                                   f"{name}; drop {flag}")


def test_split(dataset: str, root: Path) -> str | None:
    """Where the dataset's own test split is (None: it has none, and one will be made), before any hashing."""
    name, _ = resolve(dataset, root)
    return SOURCES[name].impl.test_split(root)


def load(dataset: str, root: Path, options: LoadOptions = LoadOptions()):
    """The splits the dataset at `root` ships with (a `Listing`); `dataset` is a registry name, not auto."""
    if dataset not in SOURCES:
        raise FusionCacheError(f"unknown dataset {dataset!r}; use one of {', '.join(SOURCES)}")
    return SOURCES[dataset].impl.load(root, options)


def _shown(root) -> str:
    from ..files import display_path

    return display_path(root)
