"""benchmarks/lora_compare.py on tiny settings: both fine-tunes run, resume, sample through the sliced
engine and are reported (json and markdown), the TD-LoRA run training a smaller fraction; on the
embedded DiT's layout and (``--t2i``) on a tiny text-to-image FLUX."""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import load_file
from test_t2i import _UniformClassifier, needs_fmnist

from dydit.apps import demo
from dydit.apps.demo_t2i import SPLITS, untrained_t2i
from dydit.checkpoint.lora import load_with_lora, read_lora
from dydit.data.compose_grammar import CATEGORIES
from dydit.errors import DyditError
from dydit.evaluate import classifier as clf
from dydit.factory import build_model
from dydit.flops.counter import count_flops
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


@needs_fmnist
def test_lora_compare_t2i_end_to_end(lora_compare, tmp_path, monkeypatch):
    """``--t2i``: both fine-tunes of a tiny text-to-image FLUX through ``dydit finetune``'s own parser,
    measured with the text-to-image frontier's path against the dense base on the same prompts."""
    import t2i_frontier  # loaded by lora_compare's fixture (benchmarks/ on sys.path)

    monkeypatch.setattr(clf, "load_classifier", lambda *a, **k: _UniformClassifier())
    dense = untrained_t2i(0)
    base = export_weights(tmp_path / "flux.safetensors", dense, {"model": dense.config.to_dict()})
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    out = tmp_path / "cmp"
    # Routers that switch work off within the two steps (λ at once, a large router rate): ρ < 1 tells
    # that the sliced engine really skips it and that it is counted.
    moving_routers = "--batch-size 4 --lr 1e-2 --router-lr 1 --target-warmup-steps 0 --target-hold-steps 0"
    argv = [
        "--t2i", "--base", str(base), "--out-dir", str(out), "--model", "DyFLUX-t2i-tiny",
        "--finetune-args", moving_routers, "--steps", "2", "--per-category", "1",
        "--sample-steps", "2", "--no-inception", "--lora-rank", "4", "--lora-groups", "2", "--threads", "1",
    ]  # fmt: skip
    result = lora_compare.main(argv)
    assert json.loads((out / "lora_compare.json").read_text()) == json.loads(json.dumps(result))
    assert result["family"] == "t2i" and set(result["runs"]) == {"full", "lora"}
    rec = result["recipe"]  # issue 25's fine-tune, then --finetune-args
    assert (rec["model"], rec["data"], rec["distill_weight"], rec["target"]) == (
        "DyFLUX-t2i-tiny", "fmnist-compose", 1.0, 0.5
    )  # fmt: skip
    assert (rec["batch_size"], rec["lr"], rec["router_lr"], rec["steps"], rec["lora_rank"]) == (
        4,
        1e-2,
        1,
        2,
        0,
    )
    s = result["sampling"]
    assert (s["splits"], s["sampler"], s["steps"], s["cfg_scale"]) == (["train", "held-out"], "euler", 2, 2.0)

    # The dense base: one evaluation's attention + MLP MACs, times 2 steps, times the 2 guidance passes.
    x = torch.zeros(1, 3, 64, 64)
    with torch.inference_mode(), count_flops() as fc:
        dense(x, torch.tensor([0.5]), dense.text_encoder.tokenizer(["a bag"]))
    per_evaluation = fc.by_component["attention"] + fc.by_component["mlp"]
    base_points = result["dense"]["sample"]["splits"]
    assert result["dense"]["sample"]["rho"] == 1.0
    for split in SPLITS:
        assert base_points[split]["macs_per_image"] == pytest.approx(2 * 2 * per_evaluation, rel=1e-9)

    full, lora = result["runs"]["full"], result["runs"]["lora"]
    for run in (full, lora):
        assert run["steps_done"] == 2 and run["timed_steps"] == 2 and run["seconds_per_step"] > 0
        smp = run["sample"]
        assert 0 < smp["rho"] < 0.95 and 0 < run["train_flops_ratio"] < 0.95
        macs = sum(p["macs_per_image"] * p["prompts"] for p in smp["splits"].values())
        dense_macs = sum(p["macs_per_image"] * p["prompts"] for p in base_points.values())
        assert smp["rho"] == pytest.approx(macs / dense_macs, rel=1e-12)
        for split, p in smp["splits"].items():
            assert p["split"] == split and p["steps"] == 2 and p["prompts"] == len(CATEGORIES)
            assert set(p["accuracy"]) == set(CATEGORIES) and 0 <= p["overall"] <= 1 and "FID" not in p
        assert run["memory"]["peak_step_mib"] >= 0 and run["memory"]["method"]
        assert run["state_mib"]["adamw_moments"] == pytest.approx(2 * run["state_mib"]["gradients"])
        words = shlex.split(run["command"])
        assert words[:6] == ["dydit", "finetune", "--model", "DyFLUX-t2i-tiny", "--init-from", str(base)]
        assert words[-2:] == ["--out-dir", run["run_dir"]] and "--distill-weight" in words
    assert "--lora" not in shlex.split(full["command"])
    assert shlex.split(lora["command"])[-6:-2] == ["--lora", "4", "--lora-groups", "2"]
    # Full fine-tuning trains every parameter of a FLUX (RoPE has none), its text encoder included;
    # TD-LoRA the adapters and routers alone, the only tensors its file holds.
    assert full["trainable_params"] == full["total_params"] and full["trainable_fraction"] == 1.0
    assert 0 < lora["trainable_fraction"] < 0.5 and lora["total_params"] > full["total_params"]
    assert lora["state_mib"]["weights_and_ema"] < full["state_mib"]["weights_and_ema"]
    tensors, lc, stored = read_lora(lora["export"])
    assert (lc.rank, lc.groups) == (4, 2) and stored["base"] == str(base)
    assert sum(v.numel() for v in tensors.values()) == lora["trainable_params"]
    # The base's tensors are those of the network the TD-LoRA file loads onto; its file is unchanged.
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    state = load_with_lora(lora["export"]).state_dict()
    base_sd = load_file(str(base))
    assert not set(tensors) & set(base_sd)
    for k, v in base_sd.items():
        assert torch.equal(state[k], v), k
    table = (out / "lora_compare.md").read_text()
    for row in (
        "| FLUX (dense base) | – | – | 1.000 |",
        "| full DyDiT fine-tune | ",
        "| TD-LoRA r=4, G=2 | ",
    ):
        assert row in table
    assert "Command: `python benchmarks/lora_compare.py --t2i --base" in table and "Machine:" in table
    assert f"    {lora['command']}" in table and "| TD-LoRA r=4, G=2 | held-out | " in table

    # Rerun: nothing trained or sampled again; with a text-to-image frontier.json of the same
    # settings, each prompt set of each run is placed on its dense curve at equal compute.
    def no_sampling(*a, **k):
        raise AssertionError("a measured model was sampled again")

    monkeypatch.setattr(t2i_frontier, "sample_prompts", no_sampling)
    per_step = base_points["train"]["macs_per_image"] / 2
    curve = [dict(label="FLUX (dense)", kind="dense", split=split, steps=n, macs_per_image=n * per_step,
                  overall=0.1 * n) for split in SPLITS for n in (1, 2, 3)]  # fmt: skip
    settings = dict(base=str(base), sampler="euler", cfg_scale=2.0, per_category=1, seed=0)
    (tmp_path / "frontier.json").write_text(json.dumps({"settings": settings, "points": curve}))
    again = lora_compare.main([*argv, "--frontier", str(tmp_path / "frontier.json")])
    for key in ("full", "lora"):
        run = again["runs"][key]
        assert {k: v for k, v in run["sample"].items() if k != "frontier"} == result["runs"][key]["sample"]
        for split, eq in run["sample"]["frontier"].items():
            macs = run["sample"]["splits"][split]["macs_per_image"]
            assert eq["dense_steps"] == max(1, round(macs / per_step))
            if macs >= per_step:
                assert eq["frontier_overall"] == pytest.approx(0.1 * macs / per_step)
    assert "Frontier, TD-LoRA r=4, G=2 (held-out):" in (out / "lora_compare.md").read_text()
    (tmp_path / "frontier.json").write_text(json.dumps({"settings": {**settings, "cfg_scale": 4.0}}))
    with pytest.raises(DyditError, match=r"other settings \(cfg_scale\)"):
        lora_compare.main([*argv, "--frontier", str(tmp_path / "frontier.json")])
    # Each comparison's own options and its own results directory.
    with pytest.raises(DyditError, match="--num-samples: not an option of the text-to-image"):
        lora_compare.main([*argv, "--num-samples", "4"])
    with pytest.raises(DyditError, match="--per-category: not an option of the embedded DiT"):
        lora_compare.main(["--per-category", "1"])
    with pytest.raises(DyditError, match="holds the other comparison"):
        lora_compare.main(["--base", str(demo.BASE_CHECKPOINT), "--out-dir", str(out)])
