"""Imports go one way (docs/ARCHITECTURE.md §2): this walks src/dydit and fails on a reverse edge.

Every top-level module or package of ``dydit`` sits in one layer; a module may import its own layer
and the layers below, never one above. Within a layer, :data:`FORBIDDEN` names the edges that are
not allowed either (the network and the diffusion ignore each other, and so on). Imports are read
in every form: ``import dydit.x``, ``from dydit.x import y``, ``from dydit import x`` and relative
imports, at module level or inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dydit"

# Top to bottom: cli -> apps -> train/sample/evaluate -> checkpoint -> models/... -> the bottom.
LAYERS: list[set[str]] = [
    {"cli", "__main__"},
    {"apps"},
    {"train", "sample", "evaluate"},
    {"checkpoint", "factory"},
    {"models", "diffusion", "flow", "flops", "data", "viz", "sample_io"},
    {"presets", "constants", "log", "distributed", "io", "errors", "seeds", "conditioning"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}

# Edges inside one layer that are forbidden as well (package -> packages it must never import).
FORBIDDEN = {
    "train": {"evaluate"},
    "evaluate": {"train"},
    "sample": {"train", "evaluate"},
    "factory": {"checkpoint"},
    "models": {"diffusion", "flow", "data"},
    "diffusion": {"models", "flow", "flops", "data"},
    "flow": {"models"},
    "flops": {"models", "diffusion", "flow", "data"},
    "data": {"models", "diffusion", "flow", "flops"},
    "presets": {"io", "log", "distributed"},
    "io": {"presets", "log", "seeds"},
    "seeds": {"presets", "io", "log", "distributed", "constants"},
    "sample_io": {"models", "diffusion", "flow", "flops", "data", "viz"},
    "distributed": {"io", "log", "presets"},
    "constants": {"presets", "io", "log", "distributed"},
    "errors": {"presets", "constants", "io", "log", "distributed"},
    "conditioning": {"presets", "constants", "io", "log", "distributed", "seeds"},
}

TOP_LEVEL = {p.stem for p in SRC.glob("*.py")} | {
    p.name for p in SRC.iterdir() if (p / "__init__.py").exists()
}


def _imports(path: Path) -> set[str]:
    """Top-level ``dydit`` modules that the file ``path`` imports."""
    parts = ("dydit", *path.relative_to(SRC).with_suffix("").parts)
    package = ".".join(parts[:-1])  # of a module, and of a package's __init__ alike
    return imported_tops(path.read_text(), package)


def imported_tops(source: str, package: str) -> set[str]:
    """Top-level ``dydit`` modules imported by ``source``, a module of ``package``
    (``dydit.models.dit`` counts as ``models``)."""
    mods: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            mods.add(module)
            # ``from dydit import models`` and ``from dydit.models import dit`` import modules too
            mods |= {f"{module}.{a.name}" for a in node.names}
    return {m.split(".")[1] for m in mods if m.startswith("dydit.")} & TOP_LEVEL


def _edges() -> list[tuple[Path, str, str]]:
    out = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        top = rel.parts[0].removesuffix(".py")
        out += [(rel, top, target) for target in sorted(_imports(path) - {top})]
    return out


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(TOP_LEVEL - set(LEVEL) - {"__init__"})
    assert not unplaced, f"add these to LAYERS in {Path(__file__).name}: {unplaced}"


def test_import_direction() -> None:
    bad = []
    for rel, top, target in _edges():
        if top == "__init__":  # the curated public API: anything but the command line and apps
            if target in ("cli", "apps"):
                bad.append(f"{rel} imports dydit.{target}")
            continue
        if LEVEL[target] < LEVEL[top] or target in FORBIDDEN.get(top, set()):
            bad.append(f"{rel} imports dydit.{target}")
    assert not bad, "reverse imports:\n" + "\n".join(sorted(bad))


def test_nothing_imports_cli_or_apps() -> None:
    offenders = [
        f"{rel} imports dydit.{target}"
        for rel, top, target in _edges()
        if (target == "cli" and top not in ("cli", "__main__"))
        or (target == "apps" and top not in ("cli", "apps"))
    ]
    assert not offenders


def test_every_import_form_is_seen() -> None:
    """``from dydit import x``, relative and function-level imports count like ``import dydit.x``."""
    source = (
        "import dydit.flops\n"
        "from dydit import train, __version__\n"
        "from dydit.data import codec\n"
        "from .. import cli\n"
        "from ..apps import demo\n"
        "from .dit import DiT\n"
        "def f():\n"
        "    from dydit.sample import generate\n"
    )
    assert imported_tops(source, "dydit.models") == {
        "flops",
        "train",
        "data",
        "cli",
        "apps",
        "models",
        "sample",
    }
