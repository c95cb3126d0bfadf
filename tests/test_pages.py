"""scripts/pages.py: the results page, the README's results table and the benchmarks page are generated from the
reports and JSON that `make results` and `make bench` write, so every number on them is one of those files'."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusion_cache.cli import main
from fusion_cache.fit import interval_cell
from fusion_cache.machine import describe, machine

from .conftest import load_script

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "pages.py"
ARGS = ["--views", "early,late,fused", "--heads", "linear,logreg", "--seeds", "0,1", "--val-fraction", "0.2",
        "--max-iter", "30"]


pages = load_script("pages")


@pytest.fixture(scope="module")
def results(tiny_cache, tmp_path_factory) -> Path:
    """docs/results/ as `make results` leaves it, from the tiny cache: paper, full (the same report) and the
    layer curve."""
    root = tmp_path_factory.mktemp("pages") / "results"
    r = CliRunner().invoke(main, ["report", str(tiny_cache), "--out", str(root / "paper"), *ARGS])
    assert r.exit_code == 0, r.output
    shutil.copytree(root / "paper", root / "full")
    r = CliRunner().invoke(main, ["report", str(tiny_cache), "--layer-curve", "--views", "early,late",
                                  "--heads", "linear", "--seeds", "0", "--out", str(root / "layer-curve")])
    assert r.exit_code == 0, r.output
    return root


def test_the_results_page_shows_every_row_of_the_reports(results):
    page = pages.results_page(results)
    report = json.loads((results / "paper" / "report.json").read_text())
    assert f"Machine: {report['machine']}." in page
    assert describe(machine()).split(",")[0] in report["machine"]  # the CPU model, read from the system
    for part in ("paper", "tuned"):
        for s in report[part]["summary"]:
            assert interval_cell(s) in page, (part, s["view"], s["head"])
    assert "*62.78*" in page and "*77.58*" in page  # the case study's own numbers, beside ours
    for curve in json.loads((results / "layer-curve" / "report.json").read_text())["layer_curve"]["rows"]:
        assert f"| `{curve['tap']}` |" in page
    for fig in ("samples", "curves", "confusion", "per_class"):
        assert f"(results/paper/{fig}.png)" in page
    assert "## Across backbones" in page and "BACKBONES=" in page  # said, not left out silently


def test_the_readme_table_is_rewritten_between_its_markers_only(results):
    readme = f"# x\n\nbefore\n{pages.START}\nold table\n{pages.END}\nafter\n"
    table = pages.readme_table(results)
    out = pages.with_readme_table(readme, table)
    assert out.startswith("# x\n\nbefore\n") and out.endswith(f"{pages.END}\nafter\n")
    assert "old table" not in out and table in out
    full = json.loads((results / "full" / "report.json").read_text())
    for s in full["tuned"]["summary"]:
        if s["head"] == "linear":
            assert interval_cell(s) in table
    with pytest.raises(SystemExit, match="results:start"):
        pages.with_readme_table("no markers\n", table)


def test_check_fails_on_a_stale_page_and_passes_once_regenerated(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{pages.START}\n{pages.END}\n")
    out = tmp_path / "results.md"
    args = ["--results", str(results), "--out", str(out), "--readme", str(readme)]
    stale = subprocess.run([sys.executable, str(SCRIPT), "check", *args], capture_output=True, text=True)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    assert subprocess.run([sys.executable, str(SCRIPT), "results", *args], capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, str(SCRIPT), "check", *args], capture_output=True).returncode == 0
    out.write_text(out.read_text().replace("Machine:", "Machines:"))
    assert subprocess.run([sys.executable, str(SCRIPT), "check", *args], capture_output=True).returncode == 1


def test_the_benchmarks_page_names_the_machine_and_judges_each_target(tmp_path):
    m = {"cpu": "Test CPU 9000", "arch": "x86_64", "cores": 2, "memory_gib": 23.5, "torch": "2.14.1", "gpu": None}
    new = tmp_path / "bench.json"
    new.write_text(json.dumps({"rss_ratio": 1.05, "bf16_speedup": 1.2, "float16_cache_size_ratio": 0.5,
                               "runs": [{"command": "python scripts/bench.py --x", "machine": m, "date": "2026-12-06",
                                         "keys": ["rss_ratio"]}]}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rss_ratio": 1.5}))
    page = pages.bench_page([new, old])
    assert "Machine: Test CPU 9000 (x86_64), 2 cores, 23.5 GiB, torch 2.14.1, no GPU." in page
    assert "`python scripts/bench.py --x`" in page
    assert "| `rss_ratio` | 1.05 | <= 1.1 | ✓ |" in page
    assert "| `bf16_speedup` | 1.20 | >= 1.6 | ✗ |" in page
    assert "| `float16_cache_size_ratio` | 0.50 | report |  |" in page
    assert "| `rss_ratio` | 1.50 | <= 1.1 | ✗ |" in page  # the old file's own value, under its own heading
    assert "Machine and command: not recorded in this file." in page  # a file without them says so


@pytest.mark.parametrize("value,target,mark", [(0.95, ">= 0.95", "✓"), (0.94, ">= 0.95", "✗"), (30.0, "<= 30 s", "✓"),
                                               (-0.004, "within 0.005", "✓"), (-0.006, "within 0.005", "✗"),
                                               (1.0, "report", ""), (1.0, "(overhead)", "")])
def test_met(value, target, mark):
    assert pages.met(value, target) == mark
