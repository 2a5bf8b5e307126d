"""Citations of docs/METHOD.md and docs/ARCHITECTURE.md stay true; the repository stands alone.

- Every "docs/METHOD.md §x" (or "docs/METHOD.md §x", and likewise for ARCHITECTURE.md) in src/, tests/
  benchmarks/, docs/ and README.md names a section heading of that file. Lists after one mention count too:
  "(docs/METHOD.md §1.3, §1.4, §7.2)" cites three sections; a mention of another document ends the list.
- No file of the repository points into the team's private notes beside it (a sibling "shared" folder).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"METHOD.md": ROOT / "docs" / "METHOD.md", "ARCHITECTURE.md": ROOT / "docs" / "ARCHITECTURE.md"}
CITING = ("src", "tests", "benchmarks", "docs", "README.md")

# "## 5. Losses", "### 5.3 FLOPs-constrained loss", "### 8.3b With torch.compile ..."
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*[a-z]?)[.\s]", re.MULTILINE)
MENTION = re.compile(r"(?<![\w/.-])(?:docs/)?(METHOD\.md|ARCHITECTURE\.md)")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*[a-z]?)")
OTHER_DOC = re.compile(r"\b[\w-]+\.md\b")
# Built from two parts so that this file does not contain what it looks for.
NOTES_PATH = ".." + "/shared"
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "build", "dist"}


def section_ids(text: str) -> set[str]:
    """Section numbers of the headings of a METHOD.md text: {"0", "0.1", ..., "13"}."""
    return set(HEADING.findall(text))


def cited_sections(line: str) -> list[tuple[str, str]]:
    """(document, section number) pairs a line cites, in order."""
    out = []
    for mention in MENTION.finditer(line):
        rest = line[mention.end() :]
        other = OTHER_DOC.search(rest)
        if other:
            rest = rest[: other.start()]
        out += [(mention[1], sec) for sec in SECTION.findall(rest)]
    return out


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files (weights, images)


def _files_under(top: Path) -> Iterator[Path]:
    if top.is_file():
        yield top
        return
    for path in sorted(top.rglob("*")):
        parts = path.relative_to(ROOT).parts
        skipped = set(parts) & SKIP_DIRS or any(p.endswith(".egg-info") for p in parts)
        if path.is_file() and not skipped:
            yield path


def _repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files; without git, a walk that skips build output."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    names = [n for n in out.split("\0") if n]
    if names:
        return [ROOT / n for n in names if (ROOT / n).is_file()]
    return list(_files_under(ROOT))


def test_parser_reads_lists_and_stops_at_other_documents() -> None:
    m = "METHOD.md"
    assert cited_sections("(docs/METHOD.md §1.3, §1.4, §7.2).") == [(m, "1.3"), (m, "1.4"), (m, "7.2")]
    assert cited_sections("see docs/METHOD.md §8.3b and §1.1.") == [(m, "8.3b"), (m, "1.1")]
    assert cited_sections("(docs/METHOD.md §1.6, §6; NOTES.md §3 rule 4)") == [(m, "1.6"), (m, "6")]
    assert cited_sections("(docs/METHOD.md §6.2; docs/ARCHITECTURE.md §6.3)") == [
        (m, "6.2"),
        ("ARCHITECTURE.md", "6.3"),
    ]
    assert cited_sections("no citation §5 here") == []
    assert section_ids("## 5. Losses\n### 5.3 FLOPs loss\n### 8.3b Graphs\n") == {"5", "5.3", "8.3b"}


def test_docs_have_unique_numbered_sections() -> None:
    for name, path in DOCS.items():
        ids = HEADING.findall(path.read_text(encoding="utf-8"))
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        assert not duplicates, f"{name}: duplicate section numbers {duplicates}"
    method = section_ids(DOCS["METHOD.md"].read_text(encoding="utf-8"))
    assert {str(i) for i in range(14)} <= method, "docs/METHOD.md lost a top-level section"


def test_every_citation_names_an_existing_section() -> None:
    sections = {name: section_ids(path.read_text(encoding="utf-8")) for name, path in DOCS.items()}
    bad, count = [], 0
    for top in CITING:
        for path in _files_under(ROOT / top):
            text = _text(path)
            if text is None or not MENTION.search(text):
                continue
            for lineno, line in enumerate(text.splitlines(), 1):
                for doc, sec in cited_sections(line):
                    count += 1
                    if sec not in sections[doc]:
                        bad.append(f"{path.relative_to(ROOT)}:{lineno}: {doc} §{sec}")
    assert count >= 50, f"only {count} citations found: is the parser still reading them?"
    assert not bad, "citations of sections that do not exist in docs/:\n" + "\n".join(bad)


def test_nothing_points_outside_the_repository_at_private_notes() -> None:
    offenders = []
    for path in _repo_files():
        text = _text(path)
        if text is not None and NOTES_PATH in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"files mentioning {NOTES_PATH!r}: {offenders}"


def test_the_modules_and_objects_architecture_md_names_exist() -> None:
    """Every backticked ``package.module(.Object)`` in docs/ARCHITECTURE.md's concept table resolves."""
    import importlib

    import dydit

    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("## 5.")[1].split("\n## ")[0]
    names = set(re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", table))
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        obj: object = None
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module("dydit." + ".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            break
        if obj is None and not hasattr(dydit.DyDiT, parts[-1]):
            missing.append(name)
    assert not missing, f"docs/ARCHITECTURE.md names what does not exist: {missing}"
