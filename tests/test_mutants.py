"""The mutation-testing runner (tests/mutants/run.py) and the mutants it reads, without
running any mutant: `make mutants` does that."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.mutants.run import Mutant, MutantError, load_mutants, mutate, run_mutant

MUTANT_FILES = sorted((ROOT / "tests" / "mutants").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text, encoding="utf-8")
    return path


def one(old: str = "x = 1", tests: str = '["tests/t.py::test_a"]') -> str:
    return f"[[mutant]]\nname = 'm'\nfile = 'f.py'\nold = '{old}'\nnew = 'x = 2'\ntests = {tests}\n"


def test_every_mutant_applies_exactly_once_and_names_existing_tests() -> None:
    """A stale mutant (its `old` text edited away) or a renamed test is caught here, in the
    fast suite, before `make mutants` reports it."""
    mutants = load_mutants(MUTANT_FILES)
    assert mutants
    for m in mutants:
        mutate((ROOT / m.file).read_text(encoding="utf-8"), m)  # raises when stale
        for test in m.tests:
            path, _, name = test.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")  # the file exists
            if name:  # a node id: its test function exists too
                function = name.split("[")[0]
                assert re.search(rf"^def {re.escape(function)}\(", source, re.M), (m.name, test)


@pytest.mark.parametrize(
    "text, count", [("y = 0\n", "does not occur"), ("x = 1\nx = 1\n", "occurs 2 times")]
)
def test_stale_mutant_is_refused(text: str, count: str, tmp_path: Path) -> None:
    (mutant,) = load_mutants([write(tmp_path, one())])
    with pytest.raises(MutantError, match=f"stale: its `old` text {count}"):
        mutate(text, mutant)
    assert mutate("a\nx = 1\n", mutant) == "a\nx = 2\n"


def test_stale_mutant_is_reported_by_name_and_leaves_the_file(tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text("y = 0\n", encoding="utf-8")
    mutant = Mutant("m", "f.py", "x = 1", "x = 2", ["tests/t.py::test_a"], "m.toml")
    result = run_mutant(tmp_path, mutant, timeout=1)
    assert (result.name, result.status) == ("m", "stale")
    assert (tmp_path / "f.py").read_text(encoding="utf-8") == "y = 0\n"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[[mutant]]\nname = 'm'\n", r"missing \['file', 'old', 'new', 'tests'\]"),
        (one(tests="[]"), "no tests"),
        (one(old="x = 2"), "old == new"),
        (one() + "\n" + one(), "duplicate mutant names"),
        ("[[mutant]\n", "not valid TOML"),
    ],
)
def test_bad_mutant_files_are_refused(text: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(MutantError, match=match):
        load_mutants([write(tmp_path, text)])
