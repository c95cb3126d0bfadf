"""Advice in an error names only options that the command printing it has.

For every command of the CLI, a set of errors provoked cheaply on tiny data: the precondition errors of `fit`,
`ablate` and `report`, and the common error paths of every command. Every `--option` word of the output must be
one of that command's Click options, unless the message gives it to another command by name: inside a
backquoted command line (`fusion-cache extract --out PATH`), or in a clause that says which command takes it
("re-extract with --precision fp32", "Re-run extract with --taps").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fusion_cache.cli import main

from .hostile import run
from .test_preconditions import FUSED, extracted, synthetic

OPTION = re.compile(r"--[a-z][a-z0-9-]*")
COMMANDS = main.commands
HELP = main.context_settings["help_option_names"]  # every command's (Click adds it outside `params`)
NAMES = "|".join(sorted(COMMANDS, key=len, reverse=True))
# `fusion-cache CMD ...` or `CMD ...` between backquotes: the whole span is that command's
QUOTED = re.compile(rf"`(?:fusion-cache )?({NAMES})\b[^`]*`")
# "re-extract with ...", "Re-run extract with ...", "the same extract command and ...": to the clause's end
NAMED = re.compile(rf"\b(?:re-)?({NAMES}) (?:with|command)\b[^,;()]*", re.IGNORECASE)


def options_of(command: str) -> set[str]:
    cmd = COMMANDS[command]
    return {o for p in cmd.params for o in p.opts + p.secondary_opts} | set(HELP)


def misplaced(command: str, text: str) -> list[str]:
    """The `--option` words of `text` that the command they are given to does not have."""
    wrong = []
    for pattern in (QUOTED, NAMED):
        def elsewhere(m):
            other = m.group(1).lower()
            wrong.extend(f"{o} (of {other})" for o in OPTION.findall(m.group(0)) if o not in options_of(other))
            return " "
        text = pattern.sub(elsewhere, text)
    return wrong + [o for o in OPTION.findall(text) if o not in options_of(command)]


def test_the_check_itself():
    assert misplaced("report", "pass --k 16 or less") == ["--k"]
    assert misplaced("report", "re-extract with a larger --train-size, or leave knn out of --heads") == []
    assert misplaced("fit", "rebuild it with `fusion-cache extract ... --force`") == []
    assert misplaced("info", "view 'x' needs a. Re-run extract with --taps including them; or pass --heads") == \
        ["--heads"]
    assert misplaced("fit", "see `fusion-cache taps --bogus`") == ["--bogus (of taps)"]


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def paths(tmp_path_factory, cifar_root, weights_file) -> dict[str, Path]:
    """Tiny caches, each made to fail one way, and a saved head."""
    tmp = tmp_path_factory.mktemp("advice")
    p = {
        "cifar": cifar_root, "weights": weights_file, "tmp": tmp,
        "one_class": synthetic(tmp / "one.h5", [0] * 30, [0] * 10, ["a"], FUSED),
        "synthetic": synthetic(tmp / "two.h5", [0, 1] * 20, [0, 1] * 5, ["a", "b"], FUSED),
        "other_data": synthetic(tmp / "three.h5", [0, 1, 2] * 10, [0, 1, 2] * 5, ["a", "b", "c"], FUSED),
        "huge": synthetic(tmp / "huge.h5", [0, 1] * 20, [0, 1] * 5, ["a", "b"], FUSED, scale=1e4),  # diverges
        "few": extracted(tmp_path_factory, cifar_root, weights_file, "advice-few", "--train-size", 16,
                         "--test-size", 10, "--taps", "fused"),
        "one_tap": extracted(tmp_path_factory, cifar_root, weights_file, "advice-one-tap", "--train-size", 40,
                             "--test-size", 10, "--taps", "late"),
        "missing": tmp / "missing.h5",
        "text": tmp / "notes.txt",
        "folder": tmp / "folder",
    }
    p["text"].write_text("hello")
    p["folder"].mkdir()
    (tmp / "out").mkdir()
    head = tmp / "head"
    r = run("fit", p["few"], "--out", head)
    assert r.exit_code == 0, r.output
    p["head"] = head
    return p


def cases(p: dict[str, Path]) -> list[list]:
    ext = ["extract", "--data-root", p["cifar"], "--weights", p["weights"], "--no-download", "--skip-integrity-check",
           "--no-progress", "--image-size", 32]
    out = p["tmp"] / "out"
    return [
        # extract
        [*ext, "--out", p["folder"]],
        [*ext, "--out", out / "x.h5", "--num-workers", 2],
        [*ext, "--out", out / "x.h5", "--train-size", 1000],
        [*ext, "--out", out / "x.h5", "--taps", "features.99"],
        [*ext, "--out", out / "x.h5", "--backbone", "no_such_net"],
        [*ext, "--out", p["few"], "--train-size", 17, "--test-size", 10, "--taps", "fused"],  # other settings
        [*ext, "--out", out / "x.h5", "--data-root", p["folder"]],  # no CIFAR-10 there (the last --data-root)
        [*ext, "--out", out / "x.h5", "--dataset", "manifest", "--data-root", p["tmp"] / "none.csv"],
        # info
        ["info", p["missing"]], ["info", p["text"]], ["info", p["folder"]],
        # consolidate
        ["consolidate", p["missing"], "--out", out / "c.h5"],
        ["consolidate", p["few"], "--out", p["text"]],
        ["consolidate", p["few"], "--out", p["folder"]],
        # taps, models
        ["taps", "--backbone", "no_such_net"], ["taps", "--backbone", "timm:no_such_net"],
        ["models", "extra"],
        # fit: preconditions, then the usual paths
        ["fit", p["one_class"], "--head", "logreg"], ["fit", p["one_class"], "--head", "knn"],
        ["fit", p["few"], "--head", "knn"], ["fit", p["few"], "--head", "knn", "--k", 5000],
        ["fit", p["few"], "--head", "knn", "--out", out / "h"],
        ["fit", p["few"], "--head", "knn", "--solver", "lbfgs"],
        ["fit", p["few"], "--features", "mid"], ["fit", p["one_tap"], "--features", "fused"],
        ["fit", p["huge"], "--features", "late"],
        ["fit", p["missing"]], ["fit", p["text"]],
        ["fit", p["few"], "--out", p["head"]],  # a head is already there
        # ablate
        ["ablate", p["one_class"], "--heads", "logreg", "--seeds", 0],
        ["ablate", p["few"], "--heads", "linear,knn", "--seeds", 0],
        ["ablate", p["few"], "--heads", "linear,bogus"],
        ["ablate", p["one_tap"], "--views", "early"],
        ["ablate", p["huge"], "--views", "late", "--heads", "linear", "--seeds", 0],
        ["ablate", p["synthetic"], p["other_data"]],
        ["ablate", p["few"], p["few"]],
        # report: preconditions, then the usual paths
        ["report", p["one_class"], "--out", out / "r"],
        ["report", p["one_class"], "--out", out / "r", "--heads", "linear"],
        ["report", p["few"], "--out", out / "r", "--heads", "knn", "--seeds", 0],
        ["report", p["one_tap"], "--out", out / "r", "--views", "late", "--seeds", 0],
        ["report", p["one_tap"], "--out", out / "r", "--views", "fused"],
        ["report", p["few"], "--out", out / "r", "--heads", "knn", "--layer-curve", "--seeds", 0],
        ["report", p["huge"], "--out", out / "r", "--heads", "linear", "--views", "late", "--layer-curve",
         "--seeds", 0],
        ["report", p["few"], p["one_tap"], "--out", out / "r", "--val-fraction", 0.2],
        ["report", p["synthetic"], p["other_data"], "--out", out / "r"],
        ["report", p["synthetic"], "--out", out / "r", "--views", "late", "--seeds", 0, "--no-pair-search"],
        ["report", p["few"], "--out", out / "r"],  # --val-fraction 0.1 leaves a class of 1 image no fit rows
        ["report", p["synthetic"], "--out", p["text"]],
        ["report", p["missing"], "--out", out / "r"],
        # predict, export
        ["predict", p["missing"], p["text"]], ["predict", p["folder"], p["text"]],
        ["predict", p["head"], p["tmp"] / "none.png"], ["predict", p["head"], p["text"], "--strict"],
        ["export", p["missing"], "--out", out / "m.pt2"], ["export", p["head"], "--out", p["text"]],
    ]


def test_every_error_names_only_options_of_its_command(paths):
    seen, wrong = set(), []
    for args in cases(paths):
        r = run(*args)
        command = args[0]
        seen.add(command)
        problems = misplaced(command, r.output)
        if r.exit_code == 0 or "Traceback" in r.output or r.exception and not isinstance(r.exception, SystemExit):
            problems.append(f"not a clean error (exit {r.exit_code}, {r.exception!r})")
        if problems:
            wrong.append(f"{' '.join(map(str, args))}\n    {r.output.strip()}\n    names {', '.join(problems)}")
    assert seen == set(COMMANDS), f"commands without a case: {sorted(set(COMMANDS) - seen)}"
    assert not wrong, "advice names options the command does not have:\n" + "\n".join(wrong)
