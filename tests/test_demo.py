"""The `dydit demo --fast` smoke run: the README's main command, end to end on tiny counts."""

from __future__ import annotations

import json
import math

import pytest

from dydit.apps.demo import BASE_CHECKPOINT, SHIPPED_DYDIT, SHIPPED_RECIPE, DemoConfig
from dydit.cli import main
from dydit.errors import DyditError


@pytest.mark.slow
def test_fast_demo_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["role"]: r for r in results["rows"]}
    # The dense DiT, the shipped DyDiT, the dense DiT at equal compute, the live fine-tune.
    assert set(rows) == {"dit", "dydit", "dit_equal", "live"}
    assert results["dydit_checkpoint"] == str(SHIPPED_DYDIT)
    eq = results["equal_compute"]
    assert eq["dense_steps"] == rows["dit_equal"]["steps"] == max(1, round(results["flops_ratio"] * 5))
    assert rows["dit_equal"]["macs_attn_mlp_per_image"] == pytest.approx(
        rows["dit"]["macs_attn_mlp_per_image"] * eq["dense_steps"] / 5
    )
    # The shipped DyDiT (λ = 0.5) really did about half the dense DiT's attention+MLP work.
    assert 0.4 < results["flops_ratio"] < 0.6
    assert results["speedup"] > 0
    for row in rows.values():
        assert math.isfinite(row["FD-FMNIST-classifier"])
        # The live fine-tune is judged by the classifier distance alone (no Inception pass).
        assert (
            ("FID" not in row) if row["role"] == "live" else (math.isfinite(row["FID"]) and row["FID"] >= 0)
        )
    for png in ("grid_dit.png", "grid_dydit.png", "flops_profile.png", "router_map.png", "token_keep.png"):
        assert (out / png).stat().st_size > 1000, png
    report = (out / "report.md").read_text()
    assert "measured FLOPs ratio" in report and "speed-up per network evaluation" in report
    assert eq["verdict"] in report and "at equal compute" in eq["verdict"]
    assert "report written to" in capsys.readouterr().out


def test_shipped_checkpoints_exist_and_are_small() -> None:
    for path in (BASE_CHECKPOINT, SHIPPED_DYDIT):
        assert path.is_file() and path.stat().st_size < 20 * 2**20, path


def test_shipped_dydit_is_the_base_with_routers_at_lambda_half() -> None:
    from dydit.checkpoint import load_dydit_checkpoint, read_checkpoint

    model = load_dydit_checkpoint(SHIPPED_DYDIT)
    base_sd, base_cfg = read_checkpoint(BASE_CHECKPOINT)
    assert model.config == base_cfg.replace(dynamic=True)
    assert set(model.state_dict()) > set(base_sd)  # the base's keys plus the routers
    meta = json.loads(safe_open_metadata(SHIPPED_DYDIT)["config"])
    assert meta["train"]["target"] == 0.5 and meta["train"]["init_from"].endswith(BASE_CHECKPOINT.name)
    # The recipe the frontier and lora_compare call the shipped one is the one it was trained with.
    train, demo = meta["train"], DemoConfig()
    assert (train["steps"], train["complete_steps"]) == (
        SHIPPED_RECIPE["finetune_steps"],
        SHIPPED_RECIPE["complete_steps"],
    )
    assert train["distill_weight"] == SHIPPED_RECIPE["distill_weight"]
    assert (train["batch_size"], train["lr"], train["router_lr"]) == (
        demo.finetune_batch,
        demo.lr,
        demo.router_lr,
    )
    assert (train["ema_decay"], train["seed"]) == (demo.ema_decay, demo.seed)


def safe_open_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_bad_demo_settings() -> None:
    with pytest.raises(DyditError, match="lambda"):
        DemoConfig(target=1.5)
    with pytest.raises(DyditError, match="sampler"):
        DemoConfig(sampler="euler_a")
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


def test_sampling_is_timed_after_a_warm_up_of_every_step(monkeypatch) -> None:
    """The demo times each model after an untimed pass over the whole sampling path. A simulated
    clock (no wall-clock assertion): a network call costs 1 per image, plus 100 the first time a
    (batch shape, t) pair is met and 1000 on the very first call: what first-call allocations,
    kernel selection and the sliced engine's per-step plans cost. The timed seconds must be the
    warm cost alone, whatever the model's place in line."""
    import torch
    from conftest import tiny_config

    from dydit.apps import demo
    from dydit.factory import build_model

    model = build_model(tiny_config(in_channels=1)).eval()
    clock = [0.0]
    seen: set = set()

    def net(x, t, y):
        key = (tuple(x.shape), tuple(t.tolist()))
        clock[0] += x.shape[0] + (0 if key in seen else 100) + (0 if seen else 1000)
        seen.add(key)
        return model(x, t, y)

    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])
    cfg = DemoConfig.smoke(num_samples=4, sample_batch=2, steps=3, device="cpu", progress=False)
    with torch.inference_mode():
        images, labels, result = demo.sample_timed("tiny", net, cfg, (1, 8, 8), 4)
    assert images.shape == (4, 8, 8, 1) and labels.tolist() == [0, 1, 2, 3]
    assert result.forwards == 4 * 3  # counted: the timed run only (3 steps, no guidance)
    assert result.seconds == result.forwards  # nothing cold was left for the timed run
    assert clock[0] > result.seconds  # ... because the warm-up paid for it
