"""The mutation list of `make mutants` (scripts/mutants.py) stays in step with the code: every mutant's text is
found exactly once in its file, its tests exist, and the list covers the core rules. Running the mutants
themselves takes minutes, so it is `make mutants`, not part of the suite."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutants():
    spec = importlib.util.spec_from_file_location("fusion_cache_mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fusion_cache_mutants", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_the_code_as_it_is(mutants):
    assert mutants.check_list() == []


def test_the_list_covers_at_least_twenty_rules_in_the_package(mutants):
    assert len(mutants.MUTANTS) >= 20
    assert all(m.file.startswith("fusion_cache/") for m in mutants.MUTANTS)
    assert len({m.id for m in mutants.MUTANTS}) == len(mutants.MUTANTS)


def test_a_stale_or_empty_mutant_is_reported(mutants, monkeypatch):
    good = mutants.MUTANTS[0]
    stale = dataclasses.replace(good, id="stale", old="text that is in no file of the package")
    noop = dataclasses.replace(good, id="noop", new=good.old)
    untested = dataclasses.replace(good, id="untested", tests=("tests/test_nothing_here.py",))
    monkeypatch.setattr(mutants, "MUTANTS", (good, stale, noop, untested, good))
    problems = mutants.check_list()
    assert any(p.startswith("stale: its text occurs 0 times") for p in problems), problems
    assert "noop: old and new are the same" in problems
    assert "untested: no test file tests/test_nothing_here.py" in problems
    assert f"{good.id}: duplicate id" in problems
    assert len(problems) == 4, problems
