"""Benchmark (not a test): what distillation and the complete-model loss add to a fine-tuning step.

Times one DyDiT fine-tuning step (loss, backward, optimizer step) on the shipped base's architecture
with random Fashion-MNIST-shaped data, in four compositions of the loss, interleaved (repeat r of
every composition before repeat r+1 of any) so that load changes hit all alike:

- diffusion + FLOPs loss only,
- + distillation from the frozen base (one teacher forward, no backward),
- + the complete-model loss (one more forward and backward of the student),
- + both (the shipped recipe).

Usage::

    python benchmarks/distill_cost.py [--batch 64] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dydit.apps.demo import BASE_CHECKPOINT
from dydit.checkpoint import load_dydit_checkpoint, load_model
from dydit.diffusion import create_diffusion
from dydit.flops.formulas import layer_costs
from dydit.log import machine_description
from dydit.train.step import TrainForward, compute_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="images per step (default %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per composition")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_model(BASE_CHECKPOINT).requires_grad_(False).eval()
    student = load_dydit_checkpoint(BASE_CHECKPOINT).train()
    mc = student.config
    net, diffusion = TrainForward(student), create_diffusion()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    costs = layer_costs(mc.num_tokens, mc.hidden_size, mc.mlp_ratio)
    x0 = torch.randn(args.batch, mc.in_channels, mc.input_size, mc.input_size)
    y = torch.randint(0, mc.num_classes, (args.batch,))
    modes = {"diffusion + FLOPs": (False, 0.0), "+ distillation": (False, 1.0),
             "+ complete-model loss": (True, 0.0), "+ both (shipped recipe)": (True, 1.0)}  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, (complete, weight) in modes.items():
            t = torch.randint(0, 1000, (args.batch,))
            start = time.perf_counter()
            loss, _, _ = compute_loss(net, diffusion, x0, y, t, torch.randn_like(x0), lambda_t=0.5,
                                      complete=complete, layer_costs=costs, teacher=teacher,
                                      distill_weight=weight)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if r:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["diffusion + FLOPs"])
    print(f"{machine_description()}, torch {torch.__version__}, batch {args.batch}, median of {args.repeats}")
    print("| loss composition | ms / step | vs diffusion + FLOPs |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.0f} | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
