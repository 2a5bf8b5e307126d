"""The prepared GPU benchmark of issue 5 (docs/METHOD.md §8): DiT-XL/2 at 256 px, bf16, CFG, one H100.

Models and compiled graphs are built once; phases, each appending its rows to ``$OUT/bench.json``
and ``$OUT/bench.md`` as soon as it ends (a run cut short still leaves results):

1. batch 64 (128 rows with CFG): dense, dense-compiled, masked, sliced, sliced-compiled at ρ≈0.5
   (the paper's λ = 0.5 point), plus a 50-step DDIM sampler timing (s/image);
2. batches 8 and 256: dense, dense-compiled, sliced, sliced-compiled at ρ≈0.5;
3. batch 64 at ρ≈0.34 (half heads, half groups, half tokens: the §8 prototype's second point).

A phase is skipped when the time already spent plus its estimate exceeds ``--budget`` seconds.
``--dry`` runs the same phases on a tiny random model on the CPU in a few seconds (CI checks it).
Weights are random (adaLN-Zero layers filled with small random values) and the routers calibrated,
unless ``--checkpoint`` names a DyDiT checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dydit.apps.bench import Bench, BenchConfig, device_name
from dydit.apps.bench_report import markdown_table
from dydit.io import save_text
from dydit.seeds import parse_seed
from dydit.train import configure_torch

FAST = ("dense", "dense-compiled", "sliced", "sliced-compiled")
# (name, what to run, rough H100 seconds) for DiT-XL/2, bf16. The models, and the compiled graphs,
# are built once and shared by the phases; only the third one recalibrates the routers.
PHASES: list[tuple[str, dict, float]] = [
    ("b64-rho0.50", dict(batches=(64,), sampler_steps=50), 150.0),
    ("b8-b256-rho0.50", dict(batches=(8, 256), modes=FAST), 90.0),
    ("b64-rho0.34", dict(batches=(64,), modes=FAST, rho=0.34, token_keep=0.5), 30.0),
]
ALL_MODES = ("dense", "dense-compiled", "masked", "sliced", "sliced-compiled")


def base_config(args: argparse.Namespace) -> BenchConfig:
    if args.dry:  # tiny, CPU, seconds: exercises every code path of the real run
        return BenchConfig(
            model="DiT-S/2",
            device="cpu",
            dtype="float32",
            modes=("dense", "masked", "sliced"),
            timesteps=(999, 500),
            repeats=1,
            warmup=1,
            cfg_scale=1.5,
            seed=args.seed,
            overrides=dict(depth=2, hidden_size=64, num_heads=4, input_size=8, num_classes=10),
        )
    return BenchConfig(
        model="DiT-XL/2",
        checkpoint=args.checkpoint,
        device="cuda",
        dtype="bfloat16",
        modes=ALL_MODES,
        timesteps=(999, 749, 499, 249),
        repeats=args.repeats,
        warmup=1,
        cfg_scale=1.5,
        seed=args.seed,
    )


def phase_plan(base: BenchConfig, spec: dict, dry: bool) -> dict:
    """Arguments of :meth:`Bench.run` for one phase (shrunk, and without compiled modes, when dry)."""
    modes = tuple(m for m in spec.get("modes", base.modes) if m in base.modes)
    batches, steps = spec["batches"], spec.get("sampler_steps", 0)
    if dry:
        batches, steps = tuple(max(1, b // 32) for b in batches), min(steps, 2)
    return dict(batches=batches, modes=modes, sampler_steps=steps)


def environment(device: str) -> dict:
    env = {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DyDiT inference-speed benchmark on one GPU (issue 5).")
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md and env.json")
    p.add_argument("--dry", action="store_true", help="tiny CPU run of every phase (seconds)")
    p.add_argument(
        "--checkpoint", default=None, help="DyDiT checkpoint with trained routers (default: calibrate)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (default: 5)")
    p.add_argument("--budget", type=float, default=270.0, help="seconds; later phases are skipped past it")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed (default: 0)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(args)
    if args.dry:
        torch.set_num_threads(1)  # tiny matrices: threads only add stalls on a shared CPU
    if base.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu_bench: CUDA is not available (use --dry for the CPU check)", file=sys.stderr)
            return 2
        configure_torch(tf32=True)
    env = environment(base.device)
    save_text(out / "env.json", json.dumps(env, indent=1) + "\n")
    rows: list[dict] = []
    md = [
        f"# DyDiT inference speed: {base.model}, {base.dtype}, CFG {base.cfg_scale}",
        "",
        f"{env['device_name']}, torch {env['torch']}, {env['date']}",
        "",
    ]
    bench = Bench(base, log=lambda s: print("  " + s, file=sys.stderr, flush=True))
    for name, spec, estimate in PHASES:
        spent = time.perf_counter() - start
        if not args.dry and spent + estimate > args.budget:
            md += [f"## {name}: skipped ({spent:.0f} s spent, about {estimate:.0f} s more needed)", ""]
            print(f"gpu_bench: skipping {name}", file=sys.stderr)
            continue
        print(f"gpu_bench: phase {name} ({spent:.0f} s so far)", file=sys.stderr, flush=True)
        if "rho" in spec:
            bench.recalibrate(spec["rho"], spec["token_keep"])
        phase_rows = bench.run(**phase_plan(base, spec, args.dry))
        for r in phase_rows:
            r.extra["phase"] = name
        rows += [r.to_dict() for r in phase_rows]
        cfg = bench.cfg
        md += [
            f"## {name} (target rho {cfg.rho}, token keep {cfg.token_keep})",
            "",
            markdown_table(phase_rows),
            "",
        ]
        save_text(out / "bench.json", json.dumps(rows, indent=1) + "\n")
        save_text(out / "bench.md", "\n".join(md) + "\n")
    md.append(f"total {time.perf_counter() - start:.0f} s")
    save_text(out / "bench.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
