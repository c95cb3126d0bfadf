"""The docs site stays true: the generated pages match their sources, the cache-format examples read real caches
with h5py alone, and `mkdocs build --strict` builds every page of the nav."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fusion_cache import cache as cache_mod
from fusion_cache.cache import open_cache
from fusion_cache.cli import main as cli_main

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GOLDEN_CACHE = Path(__file__).parent / "data" / "golden" / "cache.h5"  # schema 3, written by scripts/make_golden.py
NAV = [("Home", "index.md"), ("Your data", "data.md"), ("Backbones", "backbones.md"),
       ("Heads and reports", "heads.md"), ("On a cluster", "cluster.md"), ("Cache format", "cache-format.md"),
       ("Command line", "cli.md"), ("Results", "results.md"), ("Benchmarks", "benchmarks.md"),
       ("Reliability", "reliability.md")]
TESTED = "<!-- tested: tests/test_docs.py -->"
EXAMPLE_PATH = "data/cifar10-paper.h5"  # the cache path the examples name; the tests put theirs in its place


docs = load_script("docs")


# ---------------------------------------------------------------------------------------------- generated pages


def test_cli_page_is_generated_from_the_current_help():
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == docs.cli_markdown(), \
        "docs/cli.md is stale: run `python scripts/docs.py`"


def _cli_sections(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^## (fusion-cache(?: \S+)?)\n\n```text\n(.*?)\n```$", text, re.S | re.M)}


def test_cli_page_is_what_a_terminal_shows(monkeypatch, capsys):
    """Each section is `fusion-cache NAME --help` as a 100-column terminal shows it (click reads COLUMNS; CliRunner
    would force 80), every command has one, and nothing depends on this machine's CPU count."""
    monkeypatch.setenv("COLUMNS", "100")
    sections = _cli_sections(docs.cli_markdown())
    assert list(sections) == ["fusion-cache"] + [f"fusion-cache {n}" for n in sorted(cli_main.commands)]
    for title, text in sections.items():
        capsys.readouterr()
        assert cli_main.main(title.split()[1:] + ["--help"], prog_name="fusion-cache", standalone_mode=False) == 0
        assert docs.machine_free(capsys.readouterr().out).rstrip("\n") == text, title
    assert "2 x CPUs]" in sections["fusion-cache extract"]  # --workers' range, as a rule, not this machine's count


def test_index_page_is_the_readme_made_for_the_site():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (DOCS / "index.md").read_text(encoding="utf-8") == docs.index_markdown(readme), \
        "docs/index.md is stale: run `python scripts/docs.py`"


def test_index_rewrites_links_for_the_site():
    readme = ("# t\n"
              "[guide](docs/heads.md#intervals) ![c](docs/results/paper/curves.png) [`cli`](./docs/cli.md)\n"
              "[changes](CHANGELOG.md) [Makefile](Makefile) [web](https://example.org/docs/x) [top](#t)\n"
              "`[kept](docs/a.md)` <img src=\"docs/results/full/confusion.png\">\n"
              "```\n[in code](docs/b.md)\n```\n")
    body = docs.index_markdown(readme).split("\n", 2)[2]
    assert docs.index_markdown(readme).startswith(docs.INDEX_HEADER)
    assert body == ("# t\n"
                    "[guide](heads.md#intervals) ![c](results/paper/curves.png) [`cli`](cli.md)\n"
                    "changes (`CHANGELOG.md`) `Makefile` [web](https://example.org/docs/x) [top](#t)\n"
                    "`[kept](docs/a.md)` <img src=\"results/full/confusion.png\">\n"
                    "```\n[in code](docs/b.md)\n```\n")


def test_check_names_the_stale_page(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "DOCS", tmp_path / "docs")
    assert docs.main([]) == 0
    assert docs.main(["--check"]) == 0
    with open(tmp_path / "README.md", "a", encoding="utf-8") as f:
        f.write("\nOne more line.\n")
    capsys.readouterr()
    assert docs.main(["--check"]) == 1
    assert capsys.readouterr().err == "docs/index.md is stale: run `python scripts/docs.py` and commit it\n"


# ---------------------------------------------------------------------------------------------- cache-format.md


def _examples() -> list[str]:
    text = (DOCS / "cache-format.md").read_text(encoding="utf-8")
    blocks = re.findall(re.escape(TESTED) + r"\n```python\n(.*?)\n```", text, re.S)
    assert len(blocks) == text.count(TESTED) == 2, "each tested marker is followed by a ```python block"
    for code in blocks:
        assert EXAMPLE_PATH in code and "fusion_cache" not in code
    return blocks


def _run_example(code: str, cache: Path, capsys) -> tuple[dict, str]:
    ns: dict = {"__name__": "__docs_example__"}
    capsys.readouterr()
    exec(compile(code.replace(EXAMPLE_PATH, str(cache)), "cache-format.md", "exec"), ns)
    return ns, capsys.readouterr().out


def _ray_layout_copy(src: Path, out: Path) -> Path:
    """The cache at `src` rewritten as the Ray engine lays it out: two shard files per split under
    `out.shards/`, and `out` holding virtual datasets over them (through cache.py's own writers)."""
    meta = dataclasses.replace(open_cache(src).meta, engine="ray", shards=4)
    folder = cache_mod.shard_folder(out)
    folder.mkdir()
    shards = {}
    with h5py.File(src, "r") as f:
        for s in ("train", "test"):
            g, n = f[s], meta.split_size(s)
            shards[s] = [cache_mod.write_shard(folder, meta, s, lo, hi, g["labels"][lo:hi], g["indices"][lo:hi],
                                               {t: g["features"][t][lo:hi] for t in meta.taps}, [])
                         for lo, hi in ((0, n // 2), (n // 2, n))]
    cache_mod.write_virtual_cache(out, meta, shards)
    return out


@pytest.fixture(scope="module")
def caches(tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """Real caches: extracted now (schema 4), its Ray layout, and the committed golden cache (schema 3)."""
    ray = _ray_layout_copy(tiny_cache, tmp_path_factory.mktemp("ray") / "tiny-ray.h5")
    assert open_cache(ray).meta.shards == 4
    return {"local": tiny_cache, "ray": ray, "golden": GOLDEN_CACHE}


@pytest.mark.parametrize("kind", ["local", "ray", "golden"])
def test_h5py_example_reads_what_fusion_cache_reads(caches, kind, capsys):
    path = caches[kind]
    code, view = _examples()[1], "late"
    if kind == "golden":  # it holds features.1, 6 and 13: the early view
        code, view = code.replace('["views"]["late"]', '["views"]["early"]'), "early"
    ns, out = _run_example(code, path, capsys)
    c = open_cache(path)
    for split in ("train", "test"):
        X, y = c.view(view, split)
        got_X, got_y = ns["data"][split]
        assert got_X.dtype == np.float32 and np.array_equal(got_X, X)
        assert np.array_equal(got_y, y)
        first = [c.classes[i] for i in y[:3]]
        assert f"{split} ({c.meta.split_size(split)}, {X.shape[1]}) first labels: {first}" in out
    assert f"fingerprint     {c.fingerprint}\n" in out and f"backbone        {c.backbone}\n" in out


def test_h5py_example_reads_any_list_of_taps(caches, capsys):
    """The comment's alternative: a list of taps, side by side, as the view `features.13,features.18`."""
    code = _examples()[1]
    late = 'json.loads(f.attrs["tap_table"])["views"]["late"]'
    assert late in code
    ns, _ = _run_example(code.replace(late, '["features.13", "features.18"]'), caches["local"], capsys)
    X, _ = open_cache(caches["local"]).view("features.13,features.18", "test")
    assert np.array_equal(ns["data"]["test"][0], X)


@pytest.mark.parametrize("kind", ["local", "golden"])
def test_fingerprint_example_recomputes_the_fingerprint(caches, kind, tmp_path, capsys):
    code = _examples()[0]
    ns, out = _run_example(code, caches[kind], capsys)
    assert ns["fingerprint_ok"] is True and out == "fingerprint matches: True\n"
    edited = shutil.copy(caches[kind], tmp_path / "edited.h5")
    with h5py.File(edited, "r+") as f:
        f.attrs["image_size"] = int(f.attrs["image_size"]) + 1  # a feature-determining attribute
    ns, _ = _run_example(code, edited, capsys)
    assert ns["fingerprint_ok"] is False


# ---------------------------------------------------------------------------------------------- the site


def test_nav_is_the_guide():
    import yaml  # mkdocs' own dependency (the dev extra): a missing one fails here, never skips

    with open(ROOT / "mkdocs.yml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    assert [tuple(entry.items())[0] for entry in config["nav"]] == NAV
    assert config["theme"]["name"] == "material"


def test_mkdocs_builds_every_page_strictly(tmp_path):
    """`mkdocs build --strict` (warnings fail: broken links and anchors, missing pages); needs the dev extra."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for _, page in NAV:
        html = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert html.is_file(), f"{page} was not built"
    assert (site / "results" / "paper" / "report" / "index.html").is_file()  # linked reports are pages too
