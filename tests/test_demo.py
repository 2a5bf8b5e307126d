"""The `dydit demo --fast` smoke run: the README's main command, end to end on tiny counts."""

from __future__ import annotations

import json
import math

import pytest

from dydit.cli import main
from dydit.demo import BASE_CHECKPOINT, DemoConfig
from dydit.errors import DyditError


@pytest.mark.slow
def test_fast_demo_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"].split()[0]: r for r in results["rows"]}
    assert set(rows) == {"DiT", "DyDiT"}
    # The sliced DyDiT really did less attention+MLP work than the dense DiT, or at most the same
    # (a 4-step fine-tune may not have switched anything off yet); never more.
    assert 0 < results["flops_ratio"] <= 1.0 + 1e-9
    assert results["speedup"] > 0
    for row in rows.values():
        assert math.isfinite(row["FID"]) and row["FID"] >= 0
        assert math.isfinite(row["FD-FMNIST-classifier"])
    for png in ("grid_dit.png", "grid_dydit.png", "flops_profile.png", "router_map.png", "token_keep.png"):
        assert (out / png).stat().st_size > 1000, png
    report = (out / "report.md").read_text()
    assert "measured FLOPs ratio" in report and "speed-up" in report
    assert "report written to" in capsys.readouterr().out


def test_shipped_checkpoint_exists_and_is_small() -> None:
    assert BASE_CHECKPOINT.is_file()
    assert BASE_CHECKPOINT.stat().st_size < 20 * 2**20


def test_bad_demo_settings() -> None:
    with pytest.raises(DyditError, match="lambda"):
        DemoConfig(target=1.5)
    with pytest.raises(DyditError, match="sampler"):
        DemoConfig(sampler="euler")
    assert main(["demo", "--dry-run", "--fast"]) == 0


def test_demo_help_states_the_real_defaults(capsys) -> None:
    """Every "(default X)" in `dydit demo --help` is DemoConfig's value, so the help cannot go stale."""
    import re

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())
    stated = dict(re.findall(r"--([a-z-]+) [A-Z_]+ (?:(?!--).)*?\(default ([^):]+)", text))
    assert {"target", "finetune-steps", "num-samples", "steps", "cfg-scale"} <= set(stated)
    defaults = DemoConfig()
    for flag, value in stated.items():
        field = {"cfg-scale": "cfg_scale"}.get(flag, flag.replace("-", "_"))
        assert str(getattr(defaults, field)) == value or float(getattr(defaults, field)) == float(value), flag
