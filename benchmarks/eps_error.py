"""Benchmark (not a test): how well an ε-predicting Fashion-MNIST model denoises, per noise level.

For each checkpoint, the mean squared error of the predicted noise, E‖ε̂(x_t, t, y) − ε‖², on the
same training images and the same noise at given signal levels α (x_t = α·x0 + σ·ε): the DDPM DiT at
the discrete step whose √ᾱ is closest to α, a continuous-time VP model (the U-ViT, docs/METHOD.md
§16) at the time whose α is closest. Near pure noise the ideal error is about α²/σ²·Var(x0), far
below 1; a model stuck above it there starts every sampler from a wrong image (checkpoints/README.md
used this to tell an undertrained U-ViT from a broken one). Guidance is off; the conditional branch.

    python benchmarks/eps_error.py src/dydit/assets/dit-ti4-fmnist.safetensors \\
        src/dydit/assets/uvit-ti4-fmnist.safetensors --images 256
"""

from __future__ import annotations

import argparse
import math

import torch

import dydit
from dydit.data import make_dataset
from dydit.diffusion import GaussianDiffusion
from dydit.flow import create_process

DEFAULT_ALPHAS = "0.007,0.017,0.04,0.16,0.44,0.81,0.95,0.985"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="ε-predicting Fashion-MNIST exports (DiT DDPM, U-ViT)")
    p.add_argument("--images", type=int, default=256, help="training images (the first N; default 256)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"signal levels α (default {DEFAULT_ALPHAS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def eps_errors(
    model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, alphas: list[float]
):
    """[(α used, ε-MSE)] of ``model`` (eval mode) at the noise level nearest each α."""
    process = create_process(model.config)
    n = len(x0)
    if isinstance(process, GaussianDiffusion):  # DDPM: the discrete steps' √ᾱ
        signal = torch.as_tensor(process.alphas_cumprod, dtype=torch.float64).sqrt()
    else:  # continuous VP (U-ViT): α on a fine grid of t in (0, 1]
        grid = torch.linspace(1e-3, 1, 4000)
        signal = process.coefficients(grid)[0].reshape(-1)
    out = []
    for alpha in alphas:
        k = int(torch.argmin((signal - alpha).abs()))
        a = signal[k].item()
        if isinstance(process, GaussianDiffusion):  # the step k itself
            x_t, t = a * x0 + math.sqrt(1 - a * a) * noise, torch.full((n,), k)
        else:  # the time grid[k]
            t = torch.full((n,), grid[k].item())
            x_t, t = process.q_sample(x0, t, noise), process.original_timesteps(t)
        with torch.no_grad():
            eps = model(x_t, t, y)[:, : x0.shape[1]]  # a learned-sigma DiT: the ε channels
        out.append((a, (eps - noise).square().mean().item()))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    alphas = [float(a) for a in args.alphas.split(",")]
    ds = make_dataset("fashion-mnist", image_size=32)
    x0 = torch.stack([ds[i][0] for i in range(args.images)])
    y = torch.tensor([ds[i][1] for i in range(args.images)])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    print("| model | " + " | ".join(f"α {a:g}" for a in alphas) + " |")
    print("|---|" + "---:|" * len(alphas))
    for path in args.checkpoints:
        rows = eps_errors(dydit.load_model(path).eval(), x0, y, noise, alphas)
        print(f"| {path} | " + " | ".join(f"{e:.5f}" for _, e in rows) + " |")


if __name__ == "__main__":
    main()
