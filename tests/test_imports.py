"""Imports go one way (docs/ARCHITECTURE.md §2): this walks src/dydit and fails on a reverse edge.

Every top-level module or package of ``dydit`` sits in one layer; a module may import its own layer
and the layers below, never one above. Within a layer, :data:`FORBIDDEN` names the edges that are
not allowed either (the network and the diffusion ignore each other, and so on). Imports are read
in every form: ``import dydit.x``, ``from dydit.x import y``, ``from dydit import x`` and relative
imports, at module level or inside functions.

Besides the layers, no module may take part in an import circle, inside a package or across
packages (:func:`test_no_import_circles`): module-level and function-level imports both count, since
a function-level import that closes a circle is still a mutual dependency (it only hides the circle
from the import machinery). ``from package import name`` counts as importing the module
``package.name`` when there is one, else the package's ``__init__``.
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
    {
        "presets",
        "constants",
        "log",
        "distributed",
        "io",
        "errors",
        "seeds",
        "conditioning",
        "text",
        "version",
    },
]
LAYERS[-1].add("presets_flux")  # the FLUX family's config and presets (issue 24), beside presets
LAYERS[-1].add("presets_uvit")  # the U-ViT family's config and presets (issue 26), beside presets
LAYERS[-1].add("config_checks")  # the config classes' shared field checks, beneath every presets module
LAYERS[2].add("sample_settings")  # how to sample (SamplingSettings), beside the sampling workflow
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}

# Edges inside one layer that are forbidden as well (package -> packages it must never import).
FORBIDDEN = {
    "train": {"evaluate"},
    "evaluate": {"train"},
    "sample": {"train", "evaluate"},
    "sample_settings": {"train", "evaluate", "sample"},
    "factory": {"checkpoint"},
    "models": {"diffusion", "flow", "data"},
    "diffusion": {"models", "flow", "flops", "data"},
    "flow": {"models"},
    "flops": {"models", "diffusion", "flow", "data"},
    "data": {"models", "diffusion", "flow", "flops"},
    "presets": {"io", "log", "distributed"},
    "presets_flux": {"presets", "io", "log", "distributed"},
    "presets_uvit": {"presets", "presets_flux", "io", "log", "distributed"},
    "config_checks": {"presets", "presets_flux", "presets_uvit", "io", "log", "distributed"},
    "io": {"presets", "log", "seeds"},
    "seeds": {"presets", "io", "log", "distributed", "constants"},
    "sample_io": {"models", "diffusion", "flow", "flops", "data", "viz"},
    "distributed": {"io", "log", "presets"},
    "constants": {"presets", "io", "log", "distributed"},
    "errors": {"presets", "constants", "io", "log", "distributed"},
    "conditioning": {"presets", "constants", "io", "log", "distributed", "seeds"},
    "text": {"presets", "constants", "io", "log", "distributed", "seeds"},
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


# Import circles between modules ------------------------------------------------------------------
def _module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(source: str, package: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``source`` (a module of ``package``) imports, at any depth
    of the file: ``import a.b``, ``from a.b import c`` (``a.b.c`` if it is a module, else ``a.b``)
    and relative imports."""

    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {known(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out |= {
                f"{module}.{a.name}" if f"{module}.{a.name}" in modules else known(module) for a in node.names
            }
    return out - {""}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of a module graph: each strongly connected set of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def test_no_import_circles() -> None:
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules(path.read_text(), package, set(modules)) - {name}
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_circles_are_found_at_module_and_function_level() -> None:
    modules = {"p", "p.a", "p.b", "p.c", "p.d"}
    graph = {
        "p": imported_modules("from p import a\n", "p", modules),  # a package importing its module
        "p.a": imported_modules("from .b import x\n", "p", modules),
        "p.b": imported_modules("def f():\n    import p.a\n", "p", modules),  # closes p.a <-> p.b
        "p.c": imported_modules("from p import d\n", "p", modules),
        "p.d": imported_modules("from p import c\n", "p", modules),  # module-level p.c <-> p.d
    }
    assert graph["p"] == {"p.a"} and graph["p.b"] == {"p.a"}
    assert import_circles(graph) == [["p.a", "p.b"], ["p.c", "p.d"]]
    assert import_circles({"p": {"p.a"}, "p.a": set()}) == []
