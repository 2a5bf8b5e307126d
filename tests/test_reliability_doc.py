"""docs/RELIABILITY.md stays true: every test it names exists, and every fault-suite test is named there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RELIABILITY.md"
# The suites whose every test must appear in the table.
SUITES = ("test_faults.py", "test_concurrency.py", "test_hostile_input.py", "test_properties.py")
# [test_file.py::test_name](../tests/test_file.py)
LINK = re.compile(r"\[(?P<file>test_\w+\.py)::(?P<name>test_\w+)\]\((?P<target>[^)\s]+)\)")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _references() -> list[tuple[str, str, str]]:
    return [(m["file"], m["name"], m["target"]) for m in LINK.finditer(DOC.read_text())]


def test_every_named_test_exists_and_is_linked_to_its_file() -> None:
    refs = _references()
    assert len(refs) >= 40, "the table lost its links"
    missing = []
    for file, name, target in refs:
        path = ROOT / "tests" / file
        assert target == f"../tests/{file}", f"{file}::{name} links to {target}"
        if not path.is_file() or name not in _test_functions(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/RELIABILITY.md names tests that do not exist: {missing}"


def test_every_fault_suite_test_is_in_the_table() -> None:
    named = {(file, name) for file, name, _ in _references()}
    absent = [
        f"{suite}::{name}"
        for suite in SUITES
        for name in sorted(_test_functions(ROOT / "tests" / suite))
        if (suite, name) not in named
    ]
    assert not absent, f"add these tests to docs/RELIABILITY.md: {absent}"


def test_plain_text_mentions_are_links_too() -> None:
    """A ``file.py::test`` written without a link would escape the existence check above."""
    text = LINK.sub("", DOC.read_text())
    loose = re.findall(r"test_\w+\.py::test_\w+", text)
    assert not loose, f"write these as links: {loose}"
