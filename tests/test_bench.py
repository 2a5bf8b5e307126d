"""``dydit bench`` and the prepared GPU script, on tiny CPU models (docs/METHOD.md §7.4, §8).

Speed is not asserted here (the CPU is shared); the tests check that every mode runs on the same
weights and inputs, that ρ, speed-up and efficiency are consistent, and that the outputs agree.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import save_file

from dydit.apps.bench import BenchConfig, BenchRow, run_bench
from dydit.apps.bench_report import markdown_table, write_json
from dydit.cli import main
from dydit.errors import DyditError
from dydit.factory import create_model
from dydit.models.dydit import DyDiT
from dydit.presets import ModelConfig, get_model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=4)
REQUIRED = ("mode", "model", "batch", "dtype", "device", "ms_per_forward", "flops_ratio")


def tiny_bench(**changes) -> BenchConfig:
    base = dict(
        model="DiT-S/2", overrides=TINY, batches=(1, 2), repeats=1, warmup=0, timesteps=(999, 400), seed=3
    )
    base.update(changes)
    return BenchConfig(**base)


def test_rows_for_every_mode_batch_and_measurement():
    rows = run_bench(tiny_bench(sampler_steps=2))
    assert len(rows) == 3 * 2 * 2  # modes x batches x (forward, sampler)
    for r in rows:
        d = r.to_dict()
        assert all(d[k] is not None for k in REQUIRED)
        assert d["rows"] == 2 * d["batch"]  # CFG halves in one pass
        assert r.ms_per_forward > 0
        if r.mode == "dense":
            assert r.flops_ratio == 1.0 and r.speedup == pytest.approx(1.0)
        else:
            assert 0.2 < r.flops_ratio < 0.8  # calibrated to rho 0.5
            assert r.efficiency == pytest.approx(r.speedup * r.flops_ratio)
    for r in rows:
        if r.mode == "sliced" and r.measurement == "forward":
            assert r.max_rel_err < 1e-4  # sliced output equals masked output
    sampler = [r for r in rows if r.measurement == "sampler"]
    assert all(r.s_per_image > 0 and r.steps == 2 for r in sampler)
    packs = [r.pack_memory_ratio for r in rows if r.measurement == "sampler" and r.mode == "sliced"]
    assert len(packs) == 2 and all(0 < p <= 0.5 for p in packs)
    assert all(r.pack_memory_ratio is None for r in rows if r.mode != "sliced" or r.measurement != "sampler")


def test_pack_memory_ratio_is_the_sampler_runs_packs_within_the_budget():
    rows = run_bench(tiny_bench(batches=(2,), modes=("sliced",), sampler_steps=6, pack_budget=None))
    unlimited = next(r.pack_memory_ratio for r in rows if r.measurement == "sampler")
    rows = run_bench(tiny_bench(batches=(2,), modes=("sliced",), sampler_steps=6, pack_budget=0.1))
    limited = next(r.pack_memory_ratio for r in rows if r.measurement == "sampler")
    assert limited <= 0.1 < unlimited
    with pytest.raises(DyditError, match="pack budget"):
        BenchConfig(pack_budget=-0.5)


def test_markdown_and_json(tmp_path):
    rows = run_bench(
        tiny_bench(batches=(1,), modes=("dense", "sliced"), cfg_scale=1.0, stat="min", repeats=2)
    )
    assert [r.rows for r in rows] == [1, 1]  # no CFG: one row per image
    assert all(r.ms_per_forward == r.ms_min <= r.ms_median for r in rows)
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| measurement | mode |") and len(table) == 2 + len(rows)
    write_json(rows, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [d["mode"] for d in data] == ["dense", "sliced"]
    assert all(k in d for d in data for k in REQUIRED)


def test_trained_routers_from_a_checkpoint_are_used_as_they_are(tmp_path):
    cfg = ModelConfig(patch_size=2, in_channels=4, dynamic=True, **TINY)
    model = DyDiT(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.attn_rate.router.bias.fill_(-50.0)  # only the forced head
            b.mlp_rate.router.bias.fill_(50.0)  # every group
    path = tmp_path / "dydit.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"config": json.dumps(cfg.to_dict())},
    )
    rows = run_bench(tiny_bench(model=None, checkpoint=str(path), batches=(1,), modes=("dense", "sliced")))
    a, m = 4 * 16 * 32**2 + 2 * 16**2 * 32, 8 * 16 * 32**2  # per-layer MACs, N = 16, D = 32
    # Token routers keep everything (bias 35): rho = (A/2 + M) / (A + M).
    assert rows[1].flops_ratio == pytest.approx((a / 2 + m) / (a + m))


def test_config_errors():
    with pytest.raises(DyditError, match="unknown bench mode"):
        BenchConfig(modes=("fast",))
    with pytest.raises(DyditError, match="stat"):
        BenchConfig(stat="mean")
    with pytest.raises(DyditError, match="dtype"):
        BenchConfig(dtype="int8")


def test_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            "DiT-S/8",
            "--image-size",
            "64",
            "--batch",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--timesteps",
            "500",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| forward | sliced | 1 | 2 |" in printed
    assert "per network evaluation" in printed and "round(rho*N) steps" in printed
    assert {d["mode"] for d in json.loads(out.read_text())} == {"dense", "masked", "sliced"}


def test_checkpoint_rows_name_its_model_and_path(tmp_path, capsys):
    """``bench --checkpoint`` labelled every row with the ``--model`` default (DiT-S/2) and did not say
    which file was timed: rows name the model loaded; the report and the JSON name the file."""
    cfg = get_model_config("DyDiT-Ti/4")
    path = tmp_path / "dydit-ti4.safetensors"
    save_file(
        {k: v.contiguous() for k, v in DyDiT(cfg).state_dict().items()},
        str(path),
        metadata={"config": json.dumps(cfg.to_dict())},
    )
    out = tmp_path / "bench.json"
    args = ["bench", "--checkpoint", str(path), "--batch", "1", "--repeats", "1", "--warmup", "0",
            "--timesteps", "500", "--cfg-scale", "1", "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert main([*args, "--modes", "dense,sliced"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"DyDiT-Ti/4 from {path} on ")
    rows = json.loads(out.read_text())
    assert {(r["model"], r["checkpoint"]) for r in rows} == {("DyDiT-Ti/4", str(path))}
    dit = tmp_path / "dit-ti4.safetensors"  # a DiT checkpoint: routers calibrated, rows say DiT
    save_file({k: v.contiguous() for k, v in create_model("DiT-Ti/4").state_dict().items()}, str(dit))
    assert main([*args[:2], str(dit), *args[3:], "--modes", "dense"]) == 0
    assert {r["model"] for r in json.loads(out.read_text())} == {"DiT-Ti/4"}


def test_cli_help_and_dry_run(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--json" in capsys.readouterr().out
    assert main(["bench", "--compile", "--dry-run", "--device", "cpu"]) == 0
    assert "sliced-compiled" in capsys.readouterr().out


def test_gpu_script_dry_path(tmp_path):
    gpu_bench = load_benchmark("gpu_bench")
    assert gpu_bench.main(["--dry", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {d["phase"] for d in data} == {name for name, _, _ in gpu_bench.PHASES}
    assert "## b64-rho0.50" in (tmp_path / "bench.md").read_text()
    sliced = [d for d in data if d["mode"] == "sliced" and d["measurement"] == "forward"]
    rho = {d["phase"]: d["flops_ratio"] for d in sliced}
    assert rho["b64-rho0.34"] < rho["b64-rho0.50"] - 0.1  # the last phase recalibrates the same models
    # The real configuration: XL/2 at 256 px (32x32 latents), bf16 on CUDA, CFG, batches 8/64/256.
    real = gpu_bench.base_config(gpu_bench_args(gpu_bench))
    assert (real.model, real.dtype, real.device, real.cfg_scale) == ("DiT-XL/2", "bfloat16", "cuda", 1.5)
    batches = {b for _, ch, _ in gpu_bench.PHASES for b in ch.get("batches", ())}
    assert batches == {8, 64, 256}
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_bench.sh")]).returncode == 0


def gpu_bench_args(module):
    import argparse

    return argparse.Namespace(dry=False, checkpoint=None, repeats=5, seed=0)


def test_row_to_dict_flattens_extra():
    r = BenchRow("dense", "m", 1, 2, "float32", "cpu", "forward", 1.0, 1.0, extra={"threads": 2})
    assert r.to_dict()["threads"] == 2 and "extra" not in r.to_dict()
