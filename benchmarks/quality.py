"""Benchmark (not a test): quality versus compute on Fashion-MNIST, the λ sweep of the paper's Table 8.

From the same base DiT (the shipped ``dydit/assets/dit-ti4-fmnist.safetensors`` unless
``--checkpoint``), this fine-tunes

- a DyDiT for every λ in ``--targets`` (default 0.3, 0.5, 0.7, 0.9), and
- the fair control the paper's reviewers asked for: the *static* DiT fine-tuned for the same
  number of iterations with the same data, batch, learning rate and EMA,

then samples the same seeds and labels from every model (the base DiT too), DyDiT through the sliced
engine, and reports FID (offline Inception), the Fréchet distance in a Fashion-MNIST classifier's
features, the measured FLOPs ratio ρ (multiply-accumulates the layers really performed, attention +
MLP, relative to the dense DiT) and the sampling speed-up over the dense base DiT, timed in the
same run. Writes ``quality.json``, ``quality.md`` (the table) and ``flops_fid.png`` to ``--out-dir``.
Fine-tunes resume when rerun.

Usage::

    python benchmarks/quality.py                         # the defaults of `dydit demo`, 4 λ values
    python benchmarks/quality.py --num-samples 200 --targets 0.5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dydit.apps.demo import (
    BASE_CHECKPOINT,
    DemoConfig,
    finetune,
    load_dit,
    load_sliced_dydit,
    measure,
)
from dydit.io import save_text
from dydit.log import machine_description


def parse() -> argparse.Namespace:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/quality", help="where runs, samples and results go")
    p.add_argument("--checkpoint", default=str(BASE_CHECKPOINT), help="base DiT (.safetensors export)")
    p.add_argument("--targets", default="0.3,0.5,0.7,0.9", help="comma-separated FLOPs targets lambda")
    p.add_argument("--finetune-steps", type=int, default=300,
                   help="iterations per fine-tune (default 300: the documented λ sweep)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="images per model")
    p.add_argument("--steps", type=int, default=d.steps, help="sampling steps (dpm++2m)")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="guidance scale (1: none)")
    p.add_argument("--no-control", action="store_true", help="skip the static fine-tuned DiT control")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--render", metavar="JSON", help="only redraw the table and plot of a quality.json")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.render:
        path = Path(args.render)
        render(json.loads(path.read_text())["rows"], path.parent)
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("quality")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.checkpoint)
    common = dict(finetune_steps=args.finetune_steps, num_samples=args.num_samples, steps=args.steps,
                  cfg_scale=args.cfg_scale, device=args.device, progress=False)  # fmt: skip
    cfg = DemoConfig(**common)
    dit = load_dit(base, args.device)
    rows: list[dict] = []

    def add_row(name: str, model, extra: dict) -> None:
        log.info("sampling and evaluating %s", name)
        r = measure(name, model, cfg, out / f"samples_{len(rows)}.npz")
        gflops = r.macs_total / r.forwards / 1e9
        rows.append(dict(model=name, seconds=r.seconds, macs_attn_mlp=r.macs_attn_mlp,
                         gflops_per_forward=gflops, **extra, **r.metrics))  # fmt: skip

    add_row("DiT (base)", dit, dict(kind="base", target=1.0))
    if not args.no_control:
        ckpt = finetune(cfg, base, out / "static-finetune", dynamic=False)
        add_row(f"DiT + {args.finetune_steps} steps (control)", load_dit(ckpt, args.device),
                dict(kind="control", target=1.0))  # fmt: skip
    for target in [float(x) for x in args.targets.split(",")]:
        ckpt = finetune(DemoConfig(**common, target=target), base, out / f"dydit-{target:g}")
        add_row(f"DyDiT λ={target:g} (sliced)", load_sliced_dydit(ckpt, args.device),
                dict(kind="dydit", target=target))  # fmt: skip

    for r in rows:
        r["flops_ratio"] = r["macs_attn_mlp"] / rows[0]["macs_attn_mlp"]
    result = dict(config=asdict(cfg), checkpoint=str(base), rows=rows, date=time.strftime("%Y-%m-%d"),
                  machine=machine_description(), torch=torch.__version__)  # fmt: skip
    save_text(out / "quality.json", json.dumps(result, indent=2) + "\n")
    render(rows, out)


def render(rows: list[dict], out: Path) -> None:
    """Write ``quality.md`` and ``flops_fid.png`` for ``rows`` and print the table.

    Speed-ups are against the static control when there is one: it has the base DiT's architecture
    and is timed after it in the same process, so its time is free of first-run effects (thread
    pools, kernel selection for the full batch) that a single short warm-up does not cover.
    """
    ref = next((r for r in rows if r["kind"] == "control"), rows[0])
    for r in rows:
        r["speedup"] = ref["seconds"] / r["seconds"]
    table = _markdown(rows, ref["model"])
    save_text(out / "quality.md", table)
    _plot(rows, out / "flops_fid.png")
    print(table)


def _markdown(rows: list[dict], reference: str) -> str:
    lines = [
        f"| model | ρ (measured) | GFLOPs / forward | sampling s | speed-up vs {reference} | FID | "
        "FD-FMNIST-classifier |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fid = r.get("FID", float("nan"))
        fd = r.get("FD-FMNIST-classifier", float("nan"))
        lines.append(f"| {r['model']} | {r['flops_ratio']:.3f} | {r['gflops_per_forward']:.4f} | "
                     f"{r['seconds']:.1f} | {r['speedup']:.2f}x | {fid:.2f} | {fd:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dy = [r for r in rows if r["kind"] == "dydit"]
    ax.plot([r["flops_ratio"] for r in dy], [r.get("FID") for r in dy], "o-", label="DyDiT (λ sweep)")
    for r in dy:
        ax.annotate(f"λ={r['target']:g}", (r["flops_ratio"], r.get("FID")), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
    for kind, marker in (("base", "s"), ("control", "^")):
        for r in (r for r in rows if r["kind"] == kind):
            ax.plot([r["flops_ratio"]], [r.get("FID")], marker, label=r["model"])
    ax.set_xlabel("measured FLOPs ratio ρ (attention + MLP)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("Fashion-MNIST: quality vs compute", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
