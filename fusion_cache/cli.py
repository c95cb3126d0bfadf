"""The `fusion-cache` command line: a thin Click layer over the library; errors become one-line messages."""

from __future__ import annotations

import math
import os
import shlex
import sys
import warnings
from pathlib import Path

import click

from .engines import ENGINES
from .sources import AUTO, DATASETS, SOURCES
from .errors import FusionCacheError, quote
from .heads import HEAD_SPECS, HEADS
from .io import dumps_json

MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_WORKERS = max(1, 2 * (os.cpu_count() or 1))  # decoding processes: never thousands


class _Group(click.Group):
    """Turns library errors into `Error: <message>` with exit code 1, never a traceback; warnings into one line."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            try:
                return super().invoke(ctx)
            except click.ClickException as e:  # click's own usage errors quote the input too: bound them
                if isinstance(getattr(e, "message", None), str) and len(e.message) > ERROR_LIMIT - 100:
                    e.message = _one_line(e.message, ERROR_LIMIT - 100)  # room for "Invalid value for '--x': "
                raise
            except FusionCacheError as e:
                raise click.ClickException(_one_line(str(e))) from None
            except KeyboardInterrupt:
                click.echo("Error: interrupted; run the same command again (an extract resumes where it stopped)",
                           err=True)
                ctx.exit(130)
            except MemoryError:
                raise click.ClickException("out of memory; use a smaller --batch-size, view or subset") from None
            except BrokenPipeError:  # `fusion-cache info x.h5 | head`: the reader left; nothing is wrong
                try:  # Python's recipe: stdout to devnull, so the flush at exit does not fail again
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                except (OSError, ValueError, AttributeError):
                    pass
                ctx.exit(0)
            except OSError as e:
                if os.environ.get("FUSION_CACHE_DEBUG"):
                    raise
                from .files import display_path

                where = f"{quote(display_path(e.filename), 200, marks=False)}: " if e.filename else ""
                raise click.ClickException(_one_line(f"{where}{e.strerror or e}; check the path, its permissions "
                                                     "and free space")) from None


ERROR_LIMIT = 600  # characters of an error or warning line; errors quote input through errors.quote, this is the backstop


def _one_line(text: str, limit: int = ERROR_LIMIT - len("Warning: ")) -> str:
    """One line of at most `limit` characters (with "Error: " before it, at most ERROR_LIMIT), for input quoted
    without bound: a word over 200 characters keeps only its ends, and a line still too long loses its middle,
    so that its start (the problem) and its end (the fix) stay."""
    words = [w if len(w) <= 200 else w[:170] + "…" + w[-20:] for w in text.split()]
    line = " ".join(words)
    if len(line) > limit:
        tail = limit // 3
        line = line[: limit - tail - 3] + " … " + line[-tail:]
    return line


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {_one_line(str(message))}", err=True)


class FiniteFloat(click.ParamType):
    """A finite number within [min, max] (open ends where asked): no nan, no inf."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{quote(value)} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{quote(value)} is not a finite number", param, ctx)
        lo_bad = self.min is not None and (x <= self.min if self.min_open else x < self.min)
        hi_bad = self.max is not None and (x >= self.max if self.max_open else x > self.max)
        if lo_bad or hi_bad:
            lo = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
            hi = "" if self.max is None else f"{'<' if self.max_open else '<='} {self.max:g}"
            self.fail(f"{x:g} is out of range; pass a number {' and '.join(b for b in (lo, hi) if b)}", param, ctx)
        return x


class SizeType(click.ParamType):
    """A positive number of images, or `all`."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value is None:
            n = value
        elif str(value).strip().lower() == "all":
            return "all"  # every image; None is "not given" (the source's default)
        else:
            try:
                n = int(str(value).strip())
            except ValueError:
                self.fail(f"'{value}' is not a number; pass a positive integer or 'all'", param, ctx)
        if n is not None and n <= 0:
            self.fail(f"must be positive, got {n}; pass a positive integer or 'all'", param, ctx)
        return n


def _size(value):
    """SizeType's value as ExtractConfig takes it: not given -> "default", 'all' -> None (every image)."""
    return "default" if value is None else None if value == "all" else value


def _csv(value: str, option: str) -> list[str]:
    """A comma-separated option; an empty item (`a,,b`, a trailing comma) is a mistake, not something to skip."""
    items = [v.strip() for v in value.split(",")]
    if not value.strip() or any(not v for v in items):
        raise click.BadParameter(f"{quote(value)} has an empty item; pass a comma-separated list such as a,b",
                                 param_hint=option)
    return items


def _seeds(value: str) -> list[int]:
    """Comma-separated seeds in numpy's range; a seed given twice is used once (with a note)."""
    try:
        seeds = [int(s) for s in _csv(value, "--seeds")]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers", param_hint="--seeds") from None
    bad = [x for x in seeds if not 0 <= x <= MAX_SEED]
    if bad:
        raise click.BadParameter(f"seed {bad[0]} is out of range; pass seeds between 0 and {MAX_SEED}",
                                 param_hint="--seeds")
    unique = list(dict.fromkeys(seeds))
    if len(unique) < len(seeds):
        click.echo(f"note: repeated seeds removed; running seeds {', '.join(map(str, unique))}", err=True)
    return unique


def _views(value: str, option: str) -> list[str]:
    """--views: views separated by commas, a tap list inside a view joined with '+'."""
    views = [v.replace("+", ",") for v in _csv(value, option)]
    for v in views:
        if any(not t.strip() for t in v.split(",")):
            raise click.BadParameter(f"{quote(value)} has an empty tap in a '+' list", param_hint=option)
    return list(dict.fromkeys(views))


def _features(value: str) -> str:
    _csv(value, "--features")
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fusion-cache")
def main():
    """Frozen-backbone transfer learning from cached features (MobileNetV2 by default; any
    torchvision classification model or timm:NAME with --backbone, see `models`).

    \b
    The workflow:
    1. `extract` runs the pretrained backbone once and stores the pooled output of
       every block (tap) in an HDF5 cache; `info` and `taps` describe it.
    2. `fit` trains a head on a view of that cache (early, late, fused, all, or any
       list of taps) in seconds; `ablate` compares views x heads x seeds.
    3. `report` runs the case study's protocol and a validation-tuned one, with
       tables and figures.
    4. `predict` classifies new images with a saved head; `export` writes it with
       the backbone as one torch.export program.

    Nothing is overwritten without --force. Run `fusion-cache COMMAND --help` for
    each command's options.
    """


# ---------------------------------------------------------------------------------------------- extract


@main.command(short_help="Run the backbone once; cache pooled features of every tap.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Cache file to write (HDF5), e.g. data/cifar10-paper.h5.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=AUTO, show_default=True,
              help="auto: tell from --data-root which of the layouts below it is, and say so. " +
                   " ".join(f"{e.name}: {e.layout}." for e in SOURCES.values()))
# readable=False: an unreadable --data-root gets fusion-cache's own one-line error with its fix, not click's usage error
@click.option("--data-root", type=click.Path(path_type=Path, readable=False), default=Path("data"), show_default=True,
              help="Your images: a folder of class folders (photos/<class>/*.jpg), with or without split folders "
                   "(train/ with test/ or val/), a CSV manifest, parquet files, a save_to_disk folder, WebDataset shards, "
                   "or a folder holding CIFAR-10, CIFAR-100 or STL-10.")
@click.option("--train-size", type=SizeType(), default=None,
              help="Class-stratified random subset of the train split, or 'all' [default: 5000 for cifar10, the "
                   "case study's; else all].")
@click.option("--test-size", type=SizeType(), default=None,
              help="Class-stratified random subset of the test split, or 'all' [default: 1000 for cifar10; else all].")
@click.option("--test-fraction", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None,
              help="For a dataset without a test split: the share of each class that goes to test, by a hash of "
                   "each image's content, so adding images never moves the others [default: 0.2]. Refused when "
                   "the dataset has a test split.")
@click.option("--split-seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Seed of that split [default: 0].")
@click.option("--write-manifest", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the split as a CSV manifest (path,label,split), to inspect or edit and pass back "
                   "as --data-root.")
@click.option("--on-leak", type=click.Choice(["warn", "fail"]), default="warn", show_default=True,
              help="What to do when a test image has the same content as a train image (duplicates within a "
                   "split and one content under two labels are always warned about).")
@click.option("--image-column", default=None, metavar="NAME",
              help="parquet and hf: the column that holds the images (HF Image structs or raw bytes) [default: image].")
@click.option("--label-column", default=None, metavar="NAME",
              help="parquet and hf: the column that holds the labels (ClassLabel ints, ints or names) [default: label].")
@click.option("--label-key", default=None, metavar="KEY",
              help="wds: the sample's member that holds its label (cls, txt, ...), or the field of its json member "
                   "[default: cls, else json's label].")
@click.option("--label-set", type=click.Choice(["fine", "coarse"]), default=None,
              help="cifar100: the 100 fine classes or the 20 coarse superclasses [default: fine].")
@click.option("--full-decode", is_flag=True,
              help="Decode every image at full size. By default an image whose shorter side is at least 4x the "
                   "input size is decoded reduced (a JPEG at a smaller DCT scale), keeping it at least 2x: much "
                   "faster for camera photos; see the docs' Your data page.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the subset draw (and of --weights random).")
@click.option("--backbone", default="mobilenet_v2", show_default=True,
              help="A torchvision classification model (resnet50, vit_b_16, ...) or timm:NAME. See `fusion-cache models`.")
@click.option("--weights", default=None,
              help="Named weights (torchvision: imagenet1k_v1, ...; timm: a pretrained tag; downloaded once) | random | "
                   "PATH to a .pth or .safetensors state_dict [default: mobilenet_v2's imagenet1k_v1, else the "
                   "library's default weights].")
@click.option("--image-size", type=click.IntRange(32, 1024), default=None,
              help="Images are resized (shorter side, the weights' interpolation) and center-cropped to this many "
                   "pixels (32-1024; a ViT takes only its patch grid's size) [default: 128 for mobilenet_v2, the "
                   "case study's; else the weights' own].")
@click.option("--taps", default="all", show_default=True,
              help="Comma-separated blocks to cache (features.0 ... features.18 for mobilenet_v2), or a view name. "
                   "See `fusion-cache taps --backbone NAME`.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Autocast precision of the forward pass (part of the cache fingerprint).")
@click.option("--pool", type=click.Choice(["avg", "avgmax", "cls", "mean", "clsmean"]), default=None,
              help="Pooling of each tap. Maps: avg (the case study) or avgmax (average and max, 2x the floats). "
                   "ViT tokens: cls, mean (patch tokens) or clsmean [default: the model's own global pool]. "
                   "A vector tap (pre_logits, the late view of ConvNeXt and ViTs) is stored as it is.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage dtype of the cached features.")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=None,
              help="Image-decoding processes (every layout but cifar10, cifar100 and stl10), at most 2 x CPUs "
                   "[default: min(4, CPUs)].")
@click.option("--on-bad-image", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="What to do with an image file that cannot be decoded; skipped files are listed in the cache.")
@click.option("--no-download", is_flag=True, help="Never download a built-in dataset (cifar10, cifar100, stl10); fail if it is not under "
                   "--data-root.")
@click.option("--skip-integrity-check", is_flag=True,
              help="Use a local copy of a built-in dataset whose checksums differ from the official release (warns). "
                   "Corrupt files still fail.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone (slower start, faster on long runs).")
@click.option("--force", is_flag=True, help="Replace an existing cache that was built with other settings.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar [default: when stderr is a terminal].")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="local", show_default=True,
              help=" ".join(f"{e.name}: {e.summary}." for e in ENGINES.values()) +
                   " Both execute the same plan and give the same cache (see the docs' On a cluster page).")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT",
              help="The Ray cluster to join (`ray start --head` prints it) [default: start a local one].")
@click.option("--num-workers", type=int, default=None,
              help="Ray workers, each with the model loaded [default: as many as the cluster's GPUs (with "
                   "--gpus-per-worker) or CPUs fit].")
@click.option("--gpus-per-worker", type=FiniteFloat(0, 8), default=0.0, show_default=True,
              help="GPUs per Ray worker (0: run on CPU).")
@click.option("--cpus-per-worker", type=FiniteFloat(0, 256, min_open=True), default=1.0, show_default=True,
              help="CPUs reserved per Ray worker; its torch threads are this, rounded down (at least 1).")
@click.option("--shard-size", type=int, default=None,
              help="Images per shard, the Ray engine's unit of work and of resumption; a multiple of --batch-size "
                   "[default: about 1/64 of the images, 1 to 64 batches].")
def extract(out, dataset, data_root, train_size, test_size, test_fraction, split_seed, write_manifest, on_leak,
            image_column, label_column, label_key, label_set, full_decode, seed, backbone, weights, image_size, taps, batch_size,
            device, precision, pool, dtype, workers, on_bad_image, no_download, skip_integrity_check, compile_, force,
            progress, engine, ray_address, num_workers, gpus_per_worker, cpus_per_worker, shard_size):
    """Run the frozen backbone once and cache pooled features of every tap.

    Writes OUT atomically (OUT.partial, renamed when complete). Running the same
    command again reuses a finished cache, or resumes an interrupted one.

    \b
    Examples:
      fusion-cache extract --data-root photos/ --out photos.h5
      (photos/<class>/*.jpg: 20% of each class is set aside for test)
      fusion-cache extract --dataset cifar10 --out data/cifar10-paper.h5
      (the case study's 5000/1000 CIFAR-10 subset at 128 px)
    """
    from .sources.base import IntegrityWarning
    from .extract import ExtractConfig
    from .extract import extract as run_extract

    cfg = ExtractConfig(
        out=out, dataset=dataset, data_root=data_root, seed=seed,
        train_size=_size(train_size), test_size=_size(test_size),
        test_fraction=test_fraction, split_seed=split_seed, write_manifest=write_manifest, on_leak=on_leak,
        full_decode=full_decode, image_column=image_column, label_column=label_column, label_key=label_key,
        label_set=label_set,
        backbone=backbone, weights=weights, image_size=image_size, taps=tuple(_csv(taps, "--taps")),
        batch_size=batch_size, device=device,
        precision=precision, pool=pool, dtype=dtype, download=not no_download, skip_integrity_check=skip_integrity_check,
        force=force, workers=workers, on_bad_image=on_bad_image, compile=compile_, progress=progress,
        engine=engine, ray_address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, shard_size=shard_size,
    )
    with warnings.catch_warnings():  # a local copy used without checks is always said out loud
        warnings.simplefilter("always", IntegrityWarning)
        warnings.showwarning = _one_line_warning
        result = run_extract(cfg, say=lambda line: click.echo(line, err=True))
    for split, files in result.skipped.items():
        for f in files:
            click.echo(f"skipped unreadable {split} image: {f}", err=True)
    click.echo(result.summary())


# ---------------------------------------------------------------------------------------------- info / taps


@main.command(short_help="A cache's provenance and shapes.")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the attributes and shapes as one JSON object.")
@click.option("--items", is_flag=True, help="Print each cached image's split and name, one per line (tab-separated): "
                                              "which images went to train and which to test.")
def info(cache, as_json, items):
    """Print a cache's provenance (weights, preprocessing, taps, data, versions) and shapes."""
    from .cache import open_cache, shard_folder
    from .leaks import summary as leak_summary
    from .split import describe as split_line

    c = open_cache(cache)
    if items:
        for split in ("train", "test"):
            names = c.item_names(split)
            if names is None:
                raise FusionCacheError(f"{cache} does not record its items' names (CIFAR-10's pixels, or a cache made "
                                       "before schema 4); its rows are source positions: see `info --json`")
            rows = c.validation_rows() if split == "train" else None
            valid = set(rows.tolist()) if rows is not None else ()
            for row, name in enumerate(names):
                click.echo(f"{'val' if row in valid else split}\t{name}")
        return
    shapes = c.shapes()
    m = c.meta
    if as_json:
        click.echo(dumps_json({"path": str(c.path), "attrs": m.as_dict(),
                               "shapes": {s: {t: list(v) for t, v in d.items()} for s, d in shapes.items()}}, indent=2))
        return
    click.echo(f"cache       {c.path}")
    click.echo(f"fingerprint {m.fingerprint}")
    click.echo(f"backbone    {m.backbone} ({m.library} {m.library_version})  weights {m.weights}  "
               f"sha256 {m.weights_sha256}")
    click.echo(f"preprocess  {m.image_size} px, {m.resize}, mean {list(m.mean)}, std {list(m.std)}")
    given = "".join(f", --{k.replace('_', '-')} {v}" for k, v in sorted(m.source_options.items()))
    click.echo(f"dataset     {m.dataset} ({m.data_root}), {len(m.classes)} classes, seed {m.seed}{given}")
    click.echo(f"split       {split_line(m.split)}")
    click.echo(f"subset      train {m.train_size} of {m.train_source_size}, test {m.test_size} of {m.test_source_size}")
    click.echo(f"decode      {m.decode or 'full size, EXIF orientation ignored (made before schema 4)'}")
    click.echo(f"leaks       {leak_summary(m.leaks)}")
    click.echo(f"features    {m.dtype}, {m.pool}-pooled, forward in {m.precision}, device {m.device or '?'}")
    click.echo(f"engine      {m.engine}" + (f", {m.shards} shard files in {shard_folder(c.path).name}/ (virtual "
                                            "datasets; `fusion-cache consolidate` makes one file)"
                                            if m.shards else ""))
    if not m.integrity_checked:
        click.echo("integrity   NOT checked (--skip-integrity-check)")
    for split, files in m.skipped.items():
        click.echo(f"skipped     {split}: {len(files)} unreadable image(s)")
    click.echo("versions    " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    click.echo("taps:")
    for t in c.taps:
        click.echo(f"  {t:<12} train {shapes['train'][t]}  test {shapes['test'][t]}")


@main.command(short_help="Copy a sharded (ray engine) cache into one file.")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The single-file cache to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out (never the input or its shards).")
def consolidate(cache, out, force):
    """Copy CACHE, whose features are virtual datasets over OUT.shards/ files
    (`extract --engine ray`), into one self-contained cache file: the same
    features, bit for bit, and the same fingerprint.

    \b
    Example:
      fusion-cache consolidate data/imagenet.h5 --out data/imagenet-one.h5
    """
    from .cache import consolidate as run

    meta = run(cache, out, force)
    click.echo(f"wrote {out}: {meta.train_size + meta.test_size} rows from {cache} in one file")


@main.command(short_help="A backbone's taps and the named views.")
@click.option("--backbone", default="mobilenet_v2", show_default=True,
              help="A torchvision classification model or timm:NAME (see `fusion-cache models`).")
def taps(backbone):
    """List a backbone's taps (node, kind, channels, stride, relative depth) and the named views.

    The taps are read from the model: every residual block, the stem and the last
    map, and what the classifier's final nn.Linear receives.
    """
    from .backbones import resolve

    table = resolve(backbone).tap_table()
    w = max(12, max(len(t.name) for t in table.taps))
    click.echo(f"{'tap':<{w}} {'kind':<7} {'channels':>8} {'stride':>6} {'depth':>5}")
    for t in table.taps:
        click.echo(f"{t.name:<{w}} {t.kind:<7} {t.channels:>8} {t.reduction:>6} {t.depth:>5.2f}")
    click.echo("")
    click.echo(f"pools: {', '.join(table.pools)} (default {table.default_pool})")
    click.echo("views:")
    for name, members in table.all_views.items():
        shown = "every cached tap" if name == "all" else " + ".join(members)
        click.echo(f"  {name:<6} {shown}")


@main.command(short_help="The tested backbones and their tap counts.")
def models():
    """List the backbones the test suite runs end to end, with their taps and defaults.

    Any other torchvision classification model, or timm:NAME, can be tried with
    `fusion-cache taps --backbone NAME`: a model that cannot be tapped says why.
    """
    from .backbones import TESTED, describe

    click.echo(f"{'backbone':<28} {'library':<11} {'taps':>4} {'late':>6} {'pool':<5} {'size':>4}  early / late")
    for name in TESTED:
        d = describe(name)
        click.echo(f"{d['backbone']:<28} {d['library']:<11} {d['taps']:>4} {d['late_width']:>6} {d['pool']:<5} "
                   f"{d['image_size']:>4}{'*' if d['fixed_size'] else ' '} {d['early']} / {d['late']}")
    click.echo("late: width of what the classifier receives; size: default image size (* the only one it takes)")


# ---------------------------------------------------------------------------------------------- fit / ablate


def _head_options(f):
    """Hyper-parameters shared by `fit` and `ablate` (the case study's protocol by default)."""
    options = [
        click.option("--epochs", type=click.IntRange(1, 10_000), default=2, show_default=True,
                     help="linear: passes over the train split."),
        click.option("--lr", type=FiniteFloat(0, min_open=True), default=1e-3, show_default=True,
                     help="linear: Adam learning rate (> 0)."),
        click.option("--batch-size", type=click.IntRange(1, 1 << 20), default=32, show_default=True,
                     help="linear: mini-batch size."),
        click.option("--weight-decay", type=FiniteFloat(0), default=0.0, show_default=True,
                     help="linear: L2 penalty (>= 0)."),
        click.option("--standardize", is_flag=True,
                     help="linear: standardize features with train-split statistics (logreg always does)."),
        click.option("--solver", type=click.Choice(["adam", "lbfgs"]), default="adam", show_default=True,
                     help="linear: Adam mini-batches (the case study) or full-batch L-BFGS to convergence."),
        click.option("--C", "C", type=FiniteFloat(0, min_open=True), default=0.1, show_default=True,
                     help="logreg: inverse L2 strength of LogisticRegression (> 0)."),
        click.option("--k", "k", type=click.IntRange(1, 100_000), default=20, show_default=True,
                     help="knn: neighbours that vote (cosine similarity on standardized, L2-normalized features)."),
        click.option("--alpha", "alpha", type=FiniteFloat(0), default=0.1, show_default=True,
                     help="ridge: L2 strength per training row (>= 0): mean squared error + alpha ||W||^2 on "
                          "standardized features, i.e. scikit-learn's RidgeClassifier(alpha = rows x alpha)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


HEAD_OPTIONS = ("epochs", "lr", "batch_size", "weight_decay", "standardize", "solver", "C", "k", "alpha")


def _fewshot_options(f):
    """--train-per-class and --draws, shared by `fit`, `ablate` and `report` (the few-shot protocol)."""
    options = [
        click.option("--train-per-class", type=click.IntRange(1, 1 << 30), default=None, metavar="K",
                     help="Few-shot: train each head on K images of each class drawn (seeded) from the cache's "
                          "train split, outside its own validation split [default: all of train]."),
        click.option("--draws", type=click.IntRange(1, 10_000), default=1, show_default=True, metavar="N",
                     help="Few-shot: repeat the draw N times per seed (with --train-per-class); tables give "
                          "mean ± std over all (seed, draw) runs."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


BASELINE_HELP = ("Compare every row of the table with this row on the same test images (paired bootstrap "
                 "interval of the difference, McNemar's p, Holm-corrected): VIEW keeps each row's own head, "
                 "VIEW:HEAD is one row for all (e.g. fused, late:logreg). [default: late with each row's own head, "
                 "the network's own last layer; no comparisons where --views has no late]")


def _baseline(value):
    """predictions.Baseline from --baseline (None: the default, late with each row's own head)."""
    from .predictions import DEFAULT_BASELINE, Baseline

    return DEFAULT_BASELINE if value is None else Baseline.parse(value)


def _fewshot(train_per_class, draws):
    """FewShot from the options, or None; --draws without --train-per-class is a usage error."""
    from .fewshot import FewShot

    ctx = click.get_current_context()
    if train_per_class is None:
        if ctx.get_parameter_source("draws") not in (click.core.ParameterSource.DEFAULT, None):
            raise click.UsageError("--draws repeats a few-shot draw and needs --train-per-class K; pass "
                                   "--train-per-class, or leave --draws out")
        return None
    fs = FewShot(train_per_class, draws)
    fs.check()
    return fs


def _params(heads: list[str], **values):
    """HeadParams from the head options; an option given on the command line that none of `heads` takes is
    an error (e.g. `--head knn --solver lbfgs`), not something to ignore."""
    from .fit import HeadParams, head_spec

    ctx = click.get_current_context()
    specs = [head_spec(h) for h in heads]
    for name in HEAD_OPTIONS:
        given = ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
        if given and not any(name in spec.command_options for spec in specs):
            takers = [h for h, spec in _head_specs().items() if name in spec.command_options]
            raise click.UsageError(f"--{name.replace('_', '-')} does not apply to the {' or '.join(heads)} head; "
                                   f"it is an option of {', '.join(takers)}")
    p = HeadParams(**values)
    p.check()
    return p


def _head_specs():
    from .heads import HEAD_SPECS

    return HEAD_SPECS


def _command_line() -> str:
    """The command as typed, for a result's provenance: through the console script or `python -m
    fusion_cache`, with its arguments; under another caller (a test's CliRunner) only the command's path."""
    argv0 = Path(sys.argv[0]) if sys.argv else Path()
    if str(argv0).endswith("fusion-cache") or (argv0.name == "__main__.py" and argv0.parent.name == "fusion_cache"):
        return "fusion-cache " + shlex.join(sys.argv[1:])
    return "fusion-cache " + " ".join(click.get_current_context().command_path.split()[1:])


@main.command(short_help="Train one head on a view of a cache.")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--head", type=click.Choice(HEADS), default="linear", show_default=True,
              help="; ".join(f"{name}: {spec.description}" for name, spec in HEAD_SPECS.items()) + ".")
@click.option("--features", "view", default="fused", show_default=True,
              help="View to train on: early, late, fused (early+late), all (every cached tap), or TAP[,TAP...].")
@_head_options
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seeds the head's initialisation and batch order.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (accuracies as fractions) instead of a table.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder to save the head in (head.pt: weights, feature statistics, taps, classes, fingerprint) "
                   "and metrics.json.")
@click.option("--force", is_flag=True, help="Replace a head already saved in --out.")
@_fewshot_options
def fit(cache, head, view, epochs, lr, batch_size, weight_decay, standardize, solver, C, k, alpha, seed, as_json, out,
        force, train_per_class, draws):
    """Train a head on a view of CACHE and report train and test accuracy per epoch.

    \b
    Example (the case study's head on its fused features):
      fusion-cache fit data/cifar10-paper.h5 --head linear --features fused
    """
    from .cache import open_cache
    from .fit import HEAD_FILES, check_saveable, fit_head, save_head
    from .io import check_output_folder

    params = _params([head], epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     standardize=standardize, solver=solver, C=C, k=k, alpha=alpha)
    fewshot = _fewshot(train_per_class, draws)
    _features(view)
    if out and fewshot is not None and fewshot.draws > 1:
        raise click.UsageError(f"--out saves one head, and --draws {fewshot.draws} fits {fewshot.draws}; pass "
                               "--draws 1 to save the head of draw 0, or leave --out out")
    c = open_cache(cache)
    if out:
        check_saveable(head)
        check_output_folder(out, force, lambda name: name in HEAD_FILES)  # before the work, not after
    offered = {p.name for p in click.get_current_context().command.params}
    if fewshot is not None:
        _fit_fewshot(c, view, head, params, seed, fewshot, offered, as_json, out, force)
        return
    r = fit_head(c, view, head, params, seed, offered=offered)
    y_test = c.labels("test")
    r.add_interval(y_test)  # the 95 % interval over the test images, into metrics.json and the JSON
    if out:
        save_head(r, out, force)
    if as_json:
        d = r.to_json()
        click.echo(dumps_json({k: d[k] for k in ("head", "view", "features", "dim", "seed", "params", "epochs",
                                                 "train_acc", "test_acc", "test_acc_lo", "test_acc_hi", "bootstrap",
                                                 "fit_seconds", "fingerprint", "provenance") if k in d}))
        return
    click.echo(f"{head} head on '{view}' ({', '.join(r.features)}; {r.dim} dims), seed {seed}")
    click.echo(f"{'epoch':>5} {'train loss':>10} {'train acc %':>11} {'test loss':>9} {'test acc %':>10}")
    for e in r.epochs:
        click.echo(_epoch_line(e))
    click.echo(f"test accuracy {100 * r.test_acc:.2f} %{_interval(r.test_acc_lo, r.test_acc_hi, len(y_test))} in "
               f"{r.fit_seconds:.2f} s" + (f"; saved to {out}" if out else ""))


def _interval(lo, hi, n_test: int, runs: str = "") -> str:
    """` [78.60, 83.40] (95 % interval over the 1,000 test images)`: what follows an accuracy in a printed line."""
    if lo is None:
        return ""
    return f" [{100 * lo:.2f}, {100 * hi:.2f}] (95 % interval over the {n_test:,} test images{runs})"


def _epoch_line(e: dict) -> str:
    """One row of fit's per-epoch table; '—' where a head has no such number (knn: no training score; ridge:
    scores, not probabilities, so no loss)."""
    def num(v, width, scale=1.0, digits=4):
        return f"{'—':>{width}}" if v is None else f"{scale * v:>{width}.{digits}f}"

    return (f"{e['epoch']:>5} {num(e['train_loss'], 10)} {num(e['train_acc'], 11, 100, 2)} "
            f"{num(e['test_loss'], 9)} {num(e['test_acc'], 10, 100, 2)}")


def _fit_fewshot(c, view, head, params, seed, fewshot, offered, as_json, out, force):
    """`fit --train-per-class K [--draws N]`: one fit per draw of `seed`; its table, or one JSON object whose
    `runs` are the draws and whose test_acc is their mean (test_acc_std their sample std)."""
    import numpy as np

    from . import stats
    from .fewshot import header
    from .fit import fit_draws, save_head
    from .predictions import bootstrap_record, correct

    results = fit_draws(c, view, head, params, seed, fewshot, offered)
    y_test = c.labels("test")
    for r in results:  # each draw's own interval (metrics.json of a saved head)
        r.add_interval(y_test)
    # the draws' interval: the test images and the draws resampled together (stats.accuracy_interval)
    iv = None if any(r.test_pred is None for r in results) else \
        stats.accuracy_interval(correct(np.stack([r.test_pred for r in results]), y_test))
    if out:
        save_head(results[0], out, force)
    test = np.array([r.test_acc for r in results])
    train = None if any(r.train_acc is None for r in results) else np.array([r.train_acc for r in results])
    std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
    if as_json:
        first = results[0].to_json()
        click.echo(dumps_json({
            **{k: first[k] for k in ("head", "view", "features", "dim", "seed", "params")},
            "train_per_class": fewshot.train_per_class, "draws": fewshot.draws, "combine": fewshot.record()["combine"],
            "runs": [{**r.fewshot, "epochs": r.epochs, "train_acc": r.train_acc, "test_acc": r.test_acc,
                      "test_acc_lo": r.test_acc_lo, "test_acc_hi": r.test_acc_hi, "fit_seconds": r.fit_seconds}
                     for r in results],
            "train_acc": None if train is None else float(train.mean()),
            "train_acc_std": None if train is None else std(train),
            "test_acc": float(test.mean()), "test_acc_std": std(test),
            "test_acc_lo": None if iv is None else iv.lo, "test_acc_hi": None if iv is None else iv.hi,
            "bootstrap": bootstrap_record(),
            "fit_seconds": float(sum(r.fit_seconds for r in results)),
            "fingerprint": first["fingerprint"], "provenance": first["provenance"]}))
        return
    r0 = results[0]
    click.echo(f"{head} head on '{view}' ({', '.join(r0.features)}; {r0.dim} dims), seed {seed}")
    click.echo(header(fewshot.record()))
    if len(results) == 1:  # one draw: fit's own per-epoch table
        click.echo(f"{'epoch':>5} {'train loss':>10} {'train acc %':>11} {'test loss':>9} {'test acc %':>10}")
        for e in r0.epochs:
            click.echo(_epoch_line(e))
        click.echo(f"test accuracy {100 * r0.test_acc:.2f} %{_interval(r0.test_acc_lo, r0.test_acc_hi, len(y_test))}"
                   f" in {r0.fit_seconds:.2f} s (draw 0, rows sha256 "
                   f"{r0.fewshot['draw_rows_sha256'][:16]})" + (f"; saved to {out}" if out else ""))
        return
    click.echo(f"{'draw':>4} {'train rows':>10} {'train acc %':>11} {'test loss':>9} {'test acc %':>10}  rows sha256")
    n_rows = fewshot.train_per_class * len(c.classes)
    for r in results:
        tr = f"{'—':>11}" if r.train_acc is None else f"{100 * r.train_acc:>11.2f}"
        loss = f"{'—':>9}" if r.test_loss is None else f"{r.test_loss:>9.4f}"
        click.echo(f"{r.fewshot['draw']:>4} {n_rows:>10} {tr} {loss} {100 * r.test_acc:>10.2f}  "
                   f"{r.fewshot['draw_rows_sha256'][:16]}")
    click.echo(f"test accuracy {100 * test.mean():.2f} ± {100 * std(test):.2f} % over {len(results)} draws"
               + ("" if iv is None else _interval(iv.lo, iv.hi, len(y_test), " and the draws"))
               + f" in {sum(r.fit_seconds for r in results):.2f} s")


@main.command(short_help="Views x heads x seeds from one cache, or one per backbone.")
@click.argument("caches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--views", default="early,late,fused,all", show_default=True,
              help="Comma-separated views; a tap list inside a view uses '+', e.g. features.13+features.18.")
@click.option("--heads", default="linear,logreg", show_default=True, help=f"Comma-separated heads: {', '.join(HEADS)}.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; results are mean ± std over them.")
@_head_options
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for results.json (one row per run), results.csv, results.md and predictions.npz (every "
                   "run's test predictions).")
@click.option("--force", is_flag=True, help="Replace the results already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows and summary as JSON instead of a table.")
@click.option("--baseline", default=None, metavar="VIEW[:HEAD]", help=BASELINE_HELP)
@_fewshot_options
def ablate(caches, views, heads, seeds, epochs, lr, batch_size, weight_decay, standardize, solver, C, k, alpha, out,
           force,
           as_json, train_per_class, draws, baseline):
    """Compare views x heads x seeds on CACHES, with no re-extraction.

    Several caches (one per backbone, extracted from the same images) give one
    table with a backbone column.

    \b
    Example:
      fusion-cache ablate data/cifar10-paper.h5 --views early,late,fused,all --seeds 0,1,2 --out data/ablation
      fusion-cache ablate data/mnv2.h5 data/resnet50.h5 --views early,late,fused --heads linear
    """
    from .cache import open_cache
    from .fit import ABLATION_FILES, ablate_caches, markdown_table, summarize_table, table_labels, write_ablation
    from .fit import ablate as run_ablate
    from .io import check_output_folder
    from .predictions import bootstrap_record, public

    seed_list = _seeds(seeds)
    view_list = _views(views, "--views")
    head_list = list(dict.fromkeys(_csv(heads, "--heads")))
    base = _baseline(baseline)
    base.check(view_list, head_list)  # a row of the table, before anything is fitted
    params = _params(head_list, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     standardize=standardize, solver=solver, C=C, k=k, alpha=alpha)
    fewshot = _fewshot(train_per_class, draws)
    opened = [open_cache(c) for c in caches]
    if len(opened) > 1:
        from .fit import check_same_data

        check_same_data(opened)
    offered = {p.name for p in click.get_current_context().command.params}  # advice names only these options
    if out:
        check_output_folder(out, force, lambda name: name in ABLATION_FILES)

    def tick(row):
        if not as_json:
            who = f"{row['backbone']} " if "backbone" in row else ""
            draw = f" draw {row['draw']}" if "draw" in row else ""
            click.echo(f"  {who}{row['view']:<10} {row['head']:<7} seed {row['seed']}{draw}: test "
                       f"{100 * row['test_acc']:.2f} % ({row['fit_seconds']:.1f} s)", err=True)

    if len(opened) == 1:
        c = opened[0]
        rows = run_ablate(c, view_list, head_list, seed_list, params, progress=tick, offered=offered, fewshot=fewshot)
    else:
        rows = ablate_caches(opened, view_list, head_list, seed_list, params, progress=tick, offered=offered,
                             fewshot=fewshot)
    from dataclasses import asdict

    meta = {"cache": str(opened[0].path), "fingerprint": opened[0].fingerprint, "command": _command_line(),
            "seeds": seed_list, "params": asdict(params)}
    if fewshot is not None:
        meta["fewshot"] = fewshot.record()
    if len(opened) > 1:
        meta["caches"] = [{"cache": str(c.path), "fingerprint": c.fingerprint, "backbone": c.backbone} for c in opened]
    y_test = table_labels(opened)
    summary, record = summarize_table(rows, y_test, base)  # intervals and comparisons, computed once
    if out:
        write_ablation(rows, out, meta, force, y_test, base, table=(summary, record))
    if as_json:
        click.echo(dumps_json({**meta, "bootstrap": bootstrap_record(), "baseline": record, "rows": public(rows),
                               "summary": summary}))
        return
    if fewshot is not None:
        from .fewshot import header

        click.echo(header(meta["fewshot"]))
    click.echo(markdown_table(summary, record))
    if out:
        click.echo(f"wrote {out}/results.json, results.csv, results.md, predictions.npz")


# ---------------------------------------------------------------------------------------------- report


@main.command(short_help="Case-study and tuned protocols, tables and figures; or backbones compared.")
@click.argument("caches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for report.md, report.json, the PNGs and predictions.npz.")
@click.option("--views", default="early,late,fused,all", show_default=True,
              help="Comma-separated views; a tap list inside a view uses '+'.")
@click.option("--heads", default="linear,logreg", show_default=True,
              help=f"Comma-separated heads: {', '.join(HEADS)}.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of the heads and of the validation split.")
@click.option("--val-fraction", type=FiniteFloat(0, 0.5, min_open=True), default=0.1, show_default=True,
              help="Tuned protocol: share of train held out (stratified) to choose the L2 strength (0-0.5).")
@click.option("--pair-search/--no-pair-search", default=True, show_default=True,
              help="Tuned protocol: also find the tap that best complements the late view (features.18 for "
                   "mobilenet_v2), on validation, and tune that pair.")
@click.option("--data-root", type=click.Path(path_type=Path, readable=False), default=None,
              help="Where the cache's images are, for the figures: a folder, or the CSV of a manifest cache "
                   "[default: the one recorded in the cache].")
@click.option("--max-iter", type=click.IntRange(1, 10_000), default=200, show_default=True,
              help="Tuned protocol: L-BFGS iterations per grid head (each stops earlier once converged).")
@click.option("--walk-grid", is_flag=True,
              help="Tuned protocol: walk the linear and logreg grids strongest first and stop once validation "
                   "accuracy falls below its best, instead of fitting every point: the same choice on a curve with "
                   "one peak, without the weakest strengths past it.")
@click.option("--layer-curve", is_flag=True,
              help="Compare backbones instead of the two-protocol report: the case study's protocol on every cache "
                   "in one table, and the layer curve (a head on each single tap against its relative depth). "
                   "Implied by several caches; works on one cache too.")
@click.option("--force", is_flag=True, help="Replace an earlier report in --out.")
@click.option("--baseline", default=None, metavar="VIEW[:HEAD]", help=BASELINE_HELP)
@_fewshot_options
def report(caches, out, views, heads, seeds, val_fraction, pair_search, data_root, max_iter, walk_grid, layer_curve,
           force, train_per_class, draws, baseline):
    """Reproduce the case study and go past it: tables, JSON and five figures in OUT.

    
    Two protocols on one cache:
      paper  2 epochs, Adam 1e-3, batch 32, raw features (and logreg C=0.1), over seeds
      tuned  L2 strength chosen on a validation split of train, refit, test once
    OUT gets report.md, report.json (best_view, best_test_acc), samples.png,
    curves.png, predictions.png, confusion.png, per_class.png and predictions.npz.
    Every test accuracy has a 95 % bootstrap interval, and every row is compared
    with its --baseline row (paired bootstrap, McNemar's p, Holm-corrected); the
    report's first paragraph says whether fusing early and late layers helps.

    Several CACHES (one per backbone, the same images), or --layer-curve: OUT gets
    report.md, report.json and layer_curve.png, the case study's protocol on every
    cache in one table with a backbone column, and the layer curve.
    """
    from .cache import open_cache
    from .io import check_output_folder, staged_folder
    from .machine import describe as describe_machine
    from .machine import machine as machine_info
    from .report import REPORT_FILES, ReportConfig, figure_sources, render_figures, run_report, write_report

    cfg = ReportConfig(views=_views(views, "--views"), heads=list(dict.fromkeys(_csv(heads, "--heads"))),
                       seeds=_seeds(seeds), val_fraction=val_fraction, pair_search=pair_search, max_iter=max_iter,
                       full_grid=not walk_grid, fewshot=_fewshot(train_per_class, draws), baseline=_baseline(baseline))
    cfg.check()
    offered = {p.name for p in click.get_current_context().command.params}  # advice names only these options
    machine = describe_machine(machine_info())
    if len(caches) > 1 or layer_curve:
        ctx = click.get_current_context()
        for name in ("val_fraction", "pair_search", "max_iter", "walk_grid", "data_root", "baseline"):  # the two-protocol report's
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None):
                flag = "--pair-search/--no-pair-search" if name == "pair_search" else f"--{name.replace('_', '-')}"
                raise click.UsageError(f"{flag} does not apply to a comparison of backbones (several caches or "
                                       "--layer-curve), which runs the case study's protocol only; leave it out")
        from .compare import COMPARE_FILES, run_comparison, write_comparison
        from .fit import check_same_data

        opened = [open_cache(c) for c in caches]
        check_same_data(opened)
        ours = lambda name: name in COMPARE_FILES  # noqa: E731
        check_output_folder(out, force, ours)
        result = run_comparison(opened, cfg.views, cfg.heads, cfg.seeds, progress=lambda m: click.echo(m, err=True),
                                offered=offered, fewshot=cfg.fewshot)
        with staged_folder(out, force, ours) as tmp:
            write_comparison(result, tmp, _command_line(), machine)
        for cache_rows in [[r for r in result["layer_curve"]["rows"] if r["cache"] == str(c.path)] for c in opened]:
            best = max(cache_rows, key=lambda r: r["test_acc_mean"])
            click.echo(f"{best.get('label', best['backbone'])}: best single tap {best['tap']} (depth {best['depth']:.2f}), "
                       f"{100 * best['test_acc_mean']:.2f} % test accuracy"
                       + _interval(best.get("test_acc_lo"), best.get("test_acc_hi"),
                                   result["paper"]["summary"][0]["n_test"], " and the runs"))
        click.echo(f"wrote {out}/report.md, report.json and layer_curve.png")
        return
    c = open_cache(caches[0])
    cfg.check(c, offered)  # every view, head and the pair search, from the labels and taps, before the figures
    ours = lambda name: name in REPORT_FILES  # noqa: E731
    check_output_folder(out, force, ours)  # before minutes of fitting, not after
    sources = figure_sources(c, data_root)
    r = run_report(c, cfg, progress=lambda msg: click.echo(msg, err=True), offered=offered)
    with staged_folder(out, force, ours) as tmp:
        render_figures(r, c, tmp, sources)
        write_report(r, tmp, _command_line(), machine)
    best = r.best
    if cfg.fewshot is not None:
        from .fewshot import header

        click.echo(header(cfg.fewshot.record()))
    click.echo(f"best view (tuned, chosen on validation): {best['view']} with {best['head']}, "
               f"{100 * best['test_acc_mean']:.2f} ± {100 * best['test_acc_std']:.2f} % test accuracy"
               + _interval(best.get("test_acc_lo"), best.get("test_acc_hi"), best.get("n_test", 0), " and the runs")
               + f" (tuned protocol {r.seconds['pair_search'] + r.seconds['tuned']:.0f} s, paper protocol "
               f"{r.seconds['paper']:.0f} s)")
    if r.answer is not None:
        click.echo(r.answer["text"])
    click.echo(f"wrote {out}/report.md, report.json, predictions.npz and 5 figures")


# ---------------------------------------------------------------------------------------------- predict / export


@main.command(short_help="Classify images with a saved head.")
@click.argument("head_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", default=None,
              help="Backbone weights [default: those the head recorded]; refused unless their sha256 matches.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=1, show_default=True, help="Classes to print per image.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True, help="Images per forward pass.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of reporting it.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: {path, class, prob} per image.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal].")
def predict(head_dir, images, weights, top_k, batch_size, strict, as_json, progress):
    """Classify image files or folders with a head saved by `fit --out HEAD_DIR`.

    Rebuilds the backbone, taps, pooling and standardization the head was trained
    with. Prints one line per image: path, class, probability.

    \b
    Example:
      fusion-cache predict data/head photos/ --top-k 3
    """
    from .files import list_image_files
    from .headfile import load_head
    from .predict import build_deployed
    from .predict import predict as run_predict

    head = load_head(head_dir)
    model = build_deployed(head, weights)
    paths = list_image_files(list(images))
    results, failed = [], 0
    for r in run_predict(model, head, paths, batch_size, top_k, strict, progress):
        if "error" in r:
            failed += 1
            click.echo(f"{r['path']}: cannot read ({r['error']})", err=True)
            if as_json:
                results.append({"path": r["path"], "class": None, "prob": None, "error": r["error"]})
            continue
        if as_json:
            item = {"path": r["path"], "class": r["class"], "prob": r["prob"]}
            if top_k > 1:
                item["top"] = r["top"]
            results.append(item)
        else:
            click.echo(f"{r['path']}\t" + "\t".join(f"{c}\t{p:.4f}" for c, p in r["top"]))
    if as_json:
        click.echo(dumps_json(results, indent=2))
    if failed == len(paths):
        raise FusionCacheError(f"none of the {len(paths)} image(s) could be read (each is listed above); pass "
                               "image files that PIL can open")
    if failed:
        click.echo(f"{failed} of {len(paths)} image(s) could not be read and were skipped (listed above)", err=True)


@main.command(short_help="A saved head + backbone as one torch.export program.")
@click.argument("head_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="The .pt2 file to write (torch.export program + fusion_cache.json extra file).")
@click.option("--weights", default=None, help="Backbone weights [default: those the head recorded].")
@click.option("--force", is_flag=True, help="Replace an existing --out file (never the head itself or a cache).")
def export(head_dir, out, weights, force):
    """Write one standalone torch.export program: normalized image tensor in, logits out.

    Load it without fusion-cache:

    \b
      extra = {"fusion_cache.json": ""}
      program = torch.export.load("model.pt2", extra_files=extra)
      meta = json.loads(extra["fusion_cache.json"])   # classes, image_size, mean, std
      logits = program.module()(x)                     # x: (N, 3, S, S), normalized
    """
    from .predict import export as run_export
    from .headfile import load_head

    path = run_export(load_head(head_dir), out, weights, force)
    click.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
