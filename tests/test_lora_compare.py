"""benchmarks/lora_compare.py on tiny settings: both fine-tunes run, resume, sample through the sliced
engine and are reported (json and markdown), the TD-LoRA run training a smaller fraction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

from dydit.apps import demo
from dydit.checkpoint.lora import read_lora
from dydit.factory import build_model
from dydit.presets import ModelConfig
from dydit.train.state import export_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_compare():
    return load_benchmark("lora_compare")


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    """An untrained one-block DiT on the Fashion-MNIST layout (1x32x32, 10 classes), exported."""
    mc = ModelConfig(depth=1, hidden_size=32, num_heads=2, patch_size=4, input_size=32, in_channels=1,
                     num_classes=10)  # fmt: skip
    return export_weights(tmp_path / "dit.safetensors", build_model(mc), {"model": mc.to_dict()})


def test_lora_compare_end_to_end(lora_compare, tiny_base, tmp_path, monkeypatch):
    seen: list[int] = []

    def metrics(npz, cfg):  # the classifier and Inception are not what is tested (and slow to build)
        images = np.load(npz)["arr_0"]
        seen.append(len(images))
        return {"FD-FMNIST-classifier": float(images.astype(float).mean())}

    monkeypatch.setattr(demo, "evaluate_samples", metrics)
    out = tmp_path / "cmp"
    argv = [
        "--base", str(tiny_base), "--out-dir", str(out), "--steps", "3", "--num-samples", "4",
        "--sample-steps", "2", "--no-inception", "--lora-rank", "4", "--lora-groups", "2", "--threads", "1",
        "--recipe", json.dumps({"finetune_batch": 8, "target_warmup_steps": 2, "target_hold_steps": 0}),
    ]  # fmt: skip
    result = lora_compare.main(argv)
    assert json.loads((out / "lora_compare.json").read_text()) == json.loads(json.dumps(result))
    full, lora = result["runs"]["full"], result["runs"]["lora"]
    assert seen == [4, 4]
    for run in (full, lora):
        assert run["steps_done"] == 3 and run["timed_steps"] == 3 and run["seconds_per_step"] > 0
        assert 0 < run["sample"]["rho"] <= 1.0 + 1e-9 and run["sample"]["macs_per_image"] > 0
        assert math.isfinite(run["sample"]["FD-FMNIST-classifier"])
        assert run["memory"]["peak_step_mib"] >= 0 and run["memory"]["method"]
        assert run["state_mib"]["adamw_moments"] == pytest.approx(2 * run["state_mib"]["gradients"])
    # Full fine-tuning trains everything but DiT's fixed positional embedding (64 tokens x width 32);
    # TD-LoRA a small part, and holds no EMA copy of the base.
    assert full["total_params"] - full["trainable_params"] == 64 * 32
    assert full["trainable_fraction"] == pytest.approx(full["trainable_params"] / full["total_params"])
    assert 0 < lora["trainable_fraction"] < full["trainable_fraction"]
    assert lora["total_params"] > full["total_params"]  # the base plus the adapters
    assert lora["state_mib"]["weights_and_ema"] < full["state_mib"]["weights_and_ema"]
    tensors, lc, _ = read_lora(lora["export"])
    assert (lc.rank, lc.groups) == (4, 2) and sum(v.numel() for v in tensors.values()) == lora[
        "trainable_params"
    ]
    assert Path(full["export"]).name == "ema.safetensors"
    table = (out / "lora_compare.md").read_text()
    assert "| full DyDiT fine-tune |" in table and "| TD-LoRA r=4, G=2 |" in table
    assert "Command: `python benchmarks/lora_compare.py --base" in table and "Machine:" in table
    assert "VmHWM" in table
    # Rerun: both runs are complete and the samples measured; nothing is trained or sampled again.
    # With a frontier.json, each point is placed on the dense curve at equal compute.
    per_step = full["sample"]["macs_per_image"] / full["sample"]["rho"] / 2  # dense, one sampler step
    dense = [dict(label="DiT (dense)", kind="dense", steps=n, macs_per_image=n * per_step, FID=30.0 / n,
                  sampler="dpm++2m", num_samples=4) for n in (1, 2, 3)]  # fmt: skip
    (tmp_path / "frontier.json").write_text(json.dumps({"points": dense}))
    again = lora_compare.main([*argv, "--frontier", str(tmp_path / "frontier.json")])
    assert seen == [4, 4] and again["runs"]["lora"]["sample"]["rho"] == lora["sample"]["rho"]
    assert again["runs"]["full"]["memory"] == full["memory"]
    for key in ("full", "lora"):
        eq = again["runs"][key]["sample"]["frontier"]
        rho = again["runs"][key]["sample"]["rho"]
        assert eq["dense_steps"] == max(1, round(2 * rho))
        if rho >= 0.5:  # inside the measured dense curve (1 to 3 steps): interpolated in MACs
            assert eq["frontier_fid"] == pytest.approx(np.interp(2 * rho, [1, 2, 3], [30.0, 15.0, 10.0]))
        else:
            assert "frontier_fid" not in eq
    assert "Frontier, TD-LoRA r=4, G=2:" in (out / "lora_compare.md").read_text()


def test_rho_is_the_sliced_engines_work_over_the_dense_dits(lora_compare, tmp_path, monkeypatch):
    """On the shipped DyDiT (λ = 0.5) the measured ρ is about a half of the dense DiT's work."""
    monkeypatch.setattr(demo, "evaluate_samples", lambda npz, cfg: {})
    cfg = demo.DemoConfig(num_samples=2, steps=4, sample_batch=2, progress=False)
    dense = lora_compare.dense_macs_per_evaluation(demo.BASE_CHECKPOINT, "cpu")
    run = {"label": "shipped", "export": str(demo.SHIPPED_DYDIT), "run_dir": str(tmp_path / "shipped")}
    shipped = lora_compare.sample_variant(run, False, cfg, dense, tmp_path)
    assert 0.3 < shipped["rho"] < 0.7
    assert shipped["macs_per_image"] == pytest.approx(shipped["rho"] * dense * cfg.steps, rel=1e-6)
