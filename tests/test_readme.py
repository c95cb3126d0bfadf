"""The README's commands work as shown: every `fusion-cache` line either runs on tiny data or, where it cannot
here, exists with every option it uses; every `make` target it names exists; every link points to a file.

The command lines are those of the README's ```bash blocks, backslash continuations joined and `# comments`
stripped. The `fusion-cache` lines (also `.venv/bin/fusion-cache`) run in README order in one temporary folder
that holds the inputs they name (`photos/`, a folder of class folders of small PNGs, and `new_photos/`), with
random weights at 32 px where a line would download ImageNet weights, and with fewer seeds and iterations for
`report` and `ablate` (`SHRINK`). The lines that need a network, a Ray cluster or minutes are run with `--help`
instead (`help_only` says which and why). Every line's options must be options of its subcommand, as its
`--help` lists them. `pip`, `python`, `git` and `ray` lines are counted and left alone. Then the README's
```python blocks run in the same folder, against the cache the commands wrote.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fusion_cache.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = ("fusion-cache", ".venv/bin/fusion-cache")
SKIPPED = ("pip", "python", "git", "ray")  # lines of these programs are counted, not run
# What a run here adds to a README line, when the line does not set it: no download, tiny images, few fits.
TINY = {"extract": ["--weights", "random", "--image-size", "32", "--no-progress"],
        "report": ["--seeds", "0", "--max-iter", "10", "--no-pair-search"],
        "ablate": ["--seeds", "0"]}
PER_CLASS = 18  # images per class in photos/: about 14 train after the 20 % split, enough for a 10-shot draw


# ---------------------------------------------------------------------------------------------- parsing


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced code blocks of one language, in order."""
    return [m.group(1) for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)]


def command_lines(text: str) -> list[list[str]]:
    """Each command of the bash blocks as argv: continuations joined, comments stripped, empty lines dropped."""
    out = []
    for block in code_blocks(text, "bash"):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def kind(argv: list[str]) -> str:
    if argv[0] in PROGRAMS:
        return "cli"
    if argv[0] == "make":
        return "make"
    if Path(argv[0]).name.startswith(SKIPPED):  # python, python3, .venv/bin/python, pip, ...
        return "skipped"
    return "unknown"


def cli_lines(text: str) -> list[list[str]]:
    """The `fusion-cache` commands as the arguments after the program name."""
    return [argv[1:] for argv in command_lines(text) if kind(argv) == "cli"]


def option_of(arg: str) -> str | None:
    """`--out` of `--out` or `--out=x`; None for a value (a negative number is a value)."""
    if not arg.startswith("-") or re.fullmatch(r"-[\d.]+", arg) or arg == "-":
        return None
    return arg.split("=", 1)[0]


def help_text(sub: str) -> str:
    result = CliRunner().invoke(main, [sub, "--help"])
    assert result.exit_code == 0, f"`fusion-cache {sub} --help` failed (exit {result.exit_code}):\n{result.output}"
    return result.output


def listed_options(help_out: str) -> set[str]:
    """The options a --help lists in its Options section (`-o, --out PATH`, `--pair-search / --no-pair-search`),
    not the ones its prose happens to mention."""
    section = help_out.split("\nOptions:\n", 1)[1]
    names = set()
    for line in section.splitlines():
        if re.match(r"^ {2}-", line):
            first_column = re.split(r"\s{2,}", line.strip())[0]
            names.update(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", first_column))
    return names


def unknown_options(argv: list[str]) -> list[str]:
    """The options of one `fusion-cache` line that its subcommand's --help does not list."""
    listed = listed_options(help_text(argv[0]))
    return [o for o in map(option_of, argv[1:]) if o and o not in listed]


def option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def help_only(argv: list[str]) -> str | None:
    """Why a README line is checked with --help instead of run here; None when it runs."""
    sub = argv[0]
    if sub == "models":
        return "it builds every tested backbone (tests/test_backbones.py runs it)"
    if sub == "extract":
        if option_value(argv, "--engine") == "ray":
            return "it starts a Ray cluster (tests/test_cluster.py runs the engine)"
        if option_value(argv, "--backbone") not in (None, "mobilenet_v2"):
            return "it downloads another network's weights (tests/test_backbones.py runs each on random weights)"
    return None


def tiny(argv: list[str]) -> list[str]:
    """The line as it runs here: TINY's options added where the line does not set them."""
    added, extra = [], TINY.get(argv[0], [])
    i = 0
    while i < len(extra):
        name = extra[i]
        takes_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        chunk = extra[i:i + 2] if takes_value else extra[i:i + 1]
        flag_pair = {name, name.replace("--no-", "--", 1)}
        if not any(option_of(a) in flag_pair for a in argv):
            added += chunk
        i += len(chunk)
    return argv + added


def make_targets(makefile: str) -> dict[str, str]:
    """target -> its recipe text, from the rules of a Makefile."""
    targets, current = {}, None
    for line in makefile.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", line)
        if m and not line.startswith("\t"):
            current = m.group(1)
            targets.setdefault(current, "")
        elif line.startswith("\t") and current:
            targets[current] += line + "\n"
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets


def links(text: str) -> list[str]:
    """Markdown link and image targets outside code blocks and code spans."""
    prose = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)", prose)


# ---------------------------------------------------------------------------------------------- inputs


def write_photos(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> None:
    """photos/<class>/*.png (three classes, no split) and new_photos/*.png: small RGB images of distinct content."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(["cat", "dog", "owl"]):
        folder = root / "photos" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(ci * 80 + rng.integers(0, 80, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (root / "new_photos").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(36, 44, 3)).astype(np.uint8)).save(root / "new_photos" / f"{i}.png")


# ---------------------------------------------------------------------------------------------- tests

TEXT = README.read_text(encoding="utf-8")
CLI = cli_lines(TEXT)


def test_every_command_line_is_known():
    lines = command_lines(TEXT)
    counts = {k: sum(kind(a) == k for a in lines) for k in ("cli", "make", "skipped", "unknown")}
    unknown = [" ".join(a) for a in lines if kind(a) == "unknown"]
    assert not unknown, f"README commands this test does not know how to check: {unknown}"
    assert counts["cli"] >= 10 and counts["make"] >= 5, counts
    # pip, python and ray lines are shown, not run; the count keeps them from growing unseen.
    assert counts["skipped"] <= 4, [" ".join(a) for a in lines if kind(a) == "skipped"]


@pytest.mark.parametrize("argv", CLI, ids=[" ".join(a) for a in CLI])
def test_command_exists_with_every_option_it_shows(argv):
    assert not unknown_options(argv), f"`fusion-cache {' '.join(argv)}` uses options that " \
                                      f"`fusion-cache {argv[0]} --help` does not list: {unknown_options(argv)}"


def test_commands_run_in_order_on_tiny_data(tmp_path, monkeypatch):
    write_photos(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in CLI:
        if help_only(argv):
            continue
        args = tiny(argv)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (f"`fusion-cache {' '.join(argv)}` (run as `{' '.join(args)}`) exited "
                                       f"{result.exit_code}:\n{result.output[-3000:]}")
        ran.append(argv[0])
    assert {"extract", "report", "fit", "ablate", "predict", "export"} <= set(ran), ran
    assert Path("photos.h5").is_file() and Path("photos-report/report.json").is_file()
    for block in code_blocks(TEXT, "python"):  # the Python API example, on the cache the commands wrote
        exec(compile(block, "README.md (python block)", "exec"), {"__name__": "readme_example"})


def test_make_targets_exist_with_the_variables_shown():
    targets = make_targets((ROOT / "Makefile").read_text(encoding="utf-8"))
    for argv in (a for a in command_lines(TEXT) if kind(a) == "make"):
        names = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
        variables = [a.split("=", 1)[0] for a in argv[1:] if "=" in a]
        for name in names or ["(the default goal)"]:
            assert name in targets, f"`{' '.join(argv)}`: the Makefile has no target {name!r}"
            for var in variables:
                assert f"$({var})" in targets[name], f"`{' '.join(argv)}`: target {name!r} does not use {var}"


def test_links_are_relative_and_point_to_files():
    found = links(TEXT)
    assert "docs/results/layer-curve/layer_curve.png" in found
    for target in found:
        assert not re.match(r"^[a-zA-Z][\w+.-]*:|^/", target), f"README link {target} is not relative to the repo"
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README link {target} points to no file"


def test_results_markers_hold_one_table():
    start, end = TEXT.index("<!-- results:start -->"), TEXT.index("<!-- results:end -->")
    assert TEXT.count("<!-- results:start -->") == TEXT.count("<!-- results:end -->") == 1 and start < end
    assert "\n| view |" in TEXT[start:end]


# ---------------------------------------------------------------------------------------------- the checker fails


def test_an_option_that_does_not_exist_is_caught():
    doctored = TEXT.replace("--top-k 3", "--top-kk 3").replace("--features fused --out", "--feature fused --out")
    bad = {o for argv in cli_lines(doctored) for o in unknown_options(argv)}
    assert bad == {"--top-kk", "--feature"}


def test_a_command_that_does_not_exist_is_caught():
    result = CliRunner().invoke(main, ["predikt", "--help"])
    assert result.exit_code != 0
    with pytest.raises(AssertionError, match="predikt --help"):
        help_text("predikt")


def test_a_missing_make_target_and_an_unused_variable_are_caught():
    targets = make_targets("demo: install\n\tfusion-cache extract --weights $(WEIGHTS)\n\nx := 1\ntest:\n\tpytest\n")
    assert set(targets) == {"demo", "test"}
    assert "$(WEIGHTS)" in targets["demo"] and "$(WEIGHTS)" not in targets["test"]


def test_parsing_joins_continuations_and_strips_comments():
    text = "```bash\nfusion-cache fit a.h5 \\\n    --head ridge   # a comment\n# only a comment\n```\n"
    assert command_lines(text) == [["fusion-cache", "fit", "a.h5", "--head", "ridge"]]
    assert tiny(["report", "a.h5", "--seeds", "1", "--pair-search"]) == \
        ["report", "a.h5", "--seeds", "1", "--pair-search", "--max-iter", "10"]
