"""The import direction of DESIGN.md §2 is one way; this walks src/dydit and fails on a reverse edge."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dydit"

# package -> packages it must never import
FORBIDDEN = {
    "diffusion": {"models", "train", "sample", "evaluate", "cli", "bench"},
    "flops": {"models", "diffusion", "train", "sample", "evaluate", "cli", "bench"},
    "models": {"train", "sample", "evaluate", "cli", "bench"},
    "data": {"models", "train", "sample", "evaluate", "cli"},
    "train": {"cli", "evaluate"},
    "evaluate": {"cli", "train"},
    "sample": {"cli", "train"},
    "sample_io": {"cli", "train", "sample", "models", "diffusion", "evaluate"},
    "presets": {"models", "diffusion", "flops", "train", "data", "sample", "evaluate", "cli"},
    "io": {
        "log",
        "models",
        "diffusion",
        "flops",
        "train",
        "data",
        "sample",
        "evaluate",
        "cli",
        "presets",
        "checkpoint",
    },
    "distributed": {
        "io",
        "log",
        "models",
        "diffusion",
        "flops",
        "train",
        "data",
        "sample",
        "evaluate",
        "cli",
    },
    "seeds": {
        "models",
        "diffusion",
        "flops",
        "train",
        "data",
        "sample",
        "evaluate",
        "cli",
        "presets",
        "io",
        "log",
    },
    "constants": {"models", "diffusion", "flops", "train", "data", "sample", "evaluate", "cli", "presets"},
}


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return {m.split(".")[1] for m in mods if m.startswith("dydit.") and m.count(".") >= 1}


def test_import_direction() -> None:
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        top = rel.parts[0].removesuffix(".py")
        for target in _imports(path) & FORBIDDEN.get(top, set()):
            bad.append(f"{rel} imports dydit.{target}")
    assert not bad, "reverse imports:\n" + "\n".join(sorted(bad))


def test_nothing_imports_cli() -> None:
    offenders = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "cli" not in p.parts and p.name != "__main__.py" and "cli" in _imports(p)
    ]
    assert not offenders
