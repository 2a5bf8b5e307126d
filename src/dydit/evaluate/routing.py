"""What a DyDiT switches off along a sampling schedule, and what it costs (docs/METHOD.md §7.3).

:class:`RoutingRecorder` wraps a DyDiT as a plain ``model(x, t, y)`` callable (masked execution)
and keeps the router decisions of every call, grouped by timestep. Two measurements use it:

- :func:`schedule_flops`: run a sampler (with guidance) and report, per sampling timestep, the
  attention and MLP MACs per image and the fractions of heads, MLP groups and tokens kept; this is
  ``dydit flops --checkpoint``, printed by :func:`schedule_flops_markdown`;
- :func:`routing_profile`: noise real images to each sampling timestep and keep the token masks,
  with the width plan of the same timesteps (the demo's FLOPs profile and token-keep pictures).

:func:`static_flops_markdown` is the per-component table of a complete (dense) forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dydit.conditioning import Condition
from dydit.diffusion import create_diffusion, guided
from dydit.diffusion.samplers import DEFAULT_STEPS
from dydit.errors import DyditError
from dydit.flops.analytic import per_sample_macs
from dydit.flops.formulas import config_macs_table, token_router_macs
from dydit.flow import create_process
from dydit.presets import FluxConfig, ModelConfig
from dydit.sample import SamplingSettings


class RoutingRecorder:
    """``recorder(x, t, y)`` runs ``model.forward_with_routing`` and keeps (heads, groups, tokens) of
    the rows of every timestep value in :attr:`by_timestep` (lists, one entry per call)."""

    def __init__(self, model: Any):
        self.model = model
        self.by_timestep: dict[int | float, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | Condition) -> Tensor:
        if isinstance(y, Condition):  # guidance passes a text condition on as one (2B rows)
            y = y.network_input()
        out, stats = self.model.forward_with_routing(x, t, y)
        for tv in t.unique().tolist():  # the samplers use one timestep per call; be general anyway
            rows = t == tv
            decisions = (stats.heads[rows], stats.groups[rows], stats.tokens[rows])
            self.by_timestep.setdefault(tv, []).append(decisions)  # int (DDPM) or float (flow) key
        return out

    def decisions(self, t: int | float) -> tuple[Tensor, Tensor, Tensor]:
        """heads (B, L, H), groups (B, L, H), tokens (B, L, N) of every row seen at timestep ``t``."""
        calls = self.by_timestep[t]
        return tuple(torch.cat([c[i] for c in calls]) for i in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class StepFlops:
    """One sampling timestep (DDPM step, or flow time in [0, 1]): mean attention and MLP MACs per
    image, mean fractions kept."""

    t: int | float
    attn: float
    mlp: float
    heads: float
    groups: float
    tokens: float


def schedule_flops(
    model: Any,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    samples: int = 4,
    cfg_scale: float = 1.5,
    seed: int = 0,
    device: str = "cpu",
) -> list[StepFlops]:
    """Sample ``samples`` images from a DyDiT and measure the realised work at every timestep.

    The model's own process (DDPM or flow matching, from its config) and a matching ``sampler``.
    Image i starts from the noise of seed ``seed + i``; labels are drawn with ``seed``. Returns
    one :class:`StepFlops` per sampling timestep, from the noise end (DDPM t = T-1 down, flow t = 0 up).
    """
    cfg = model.config
    process = create_process(cfg)
    settings = SamplingSettings(sampler=sampler, steps=steps or DEFAULT_STEPS)
    times = settings.network_times(process)  # the sampler's declared times; validates the pairing
    flux = isinstance(cfg, FluxConfig)
    if cfg_scale != 1.0 and not flux and cfg.class_dropout_prob == 0:
        raise DyditError("this model has no null class, so it cannot use guidance; pass --cfg-scale 1")
    dev = torch.device(device)
    model.to(dev).eval()
    recorder = RoutingRecorder(model)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(samples)]
    shape = (
        (cfg.latent_channels, cfg.sample_size, cfg.sample_size)
        if flux
        else (cfg.in_channels, cfg.input_size, cfg.input_size)
    )
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
    if flux:
        y: Any = _flux_condition(model, samples, seed).to(dev)
    else:  # (an unconditional U-ViT, num_classes 0, ignores its labels)
        y = torch.randint(max(cfg.num_classes, 1), (samples,), generator=torch.Generator().manual_seed(seed))
        y = y.to(dev)
    fn = guided(recorder, cfg_scale, null_class=None if flux else cfg.num_classes)
    with torch.no_grad():
        settings.function(fn, noise, process, settings.steps, model_kwargs=dict(y=y), generators=gens)
    attn_cost, mlp_cost = model.layer_costs()
    rows = []
    # in the sampler's order, from the noise end: t = T-1 down for DDPM, t = 0 up for flow matching
    # (the adaptive solver declares none: the times it chose, ascending)
    for t in times or sorted(recorder.by_timestep):
        h, g, k = recorder.decisions(t)
        rows.append(
            StepFlops(
                t=t,
                attn=per_sample_macs(h, g, k, attn_cost, 0).double().mean().item(),
                mlp=per_sample_macs(h, g, k, 0, mlp_cost).double().mean().item(),
                heads=h.float().mean().item(),
                groups=g.float().mean().item(),
                tokens=k.float().mean().item(),
            )
        )
    return rows


def _flux_condition(model: Any, samples: int, seed: int) -> Condition:
    """The text condition of ``samples`` images of a FLUX: the caption grammar's held-in evaluation
    prompts for a model with its own text encoder (docs/METHOD.md §17), cycled; otherwise random
    encoder outputs of the model's text width and length (seeded), as calibration uses."""
    if model.config.text_encoder:
        from dydit.data.compose_grammar import evaluation_prompts

        pool = [p.text for p in evaluation_prompts("train", per_category=max(1, samples), seed=seed)]
        return model.text_encoder.tokenizer([pool[i % len(pool)] for i in range(samples)])
    backbone = getattr(model, "backbone", model)
    return backbone.example_inputs(samples, torch.Generator().manual_seed(seed))[1]


@dataclass(frozen=True)
class RoutingProfile:
    """Width plan (T timesteps) and token-keep masks tokens (T, n, L, N) of the first n images."""

    plan: Any  # dydit.models.dydit.WidthPlan
    tokens: Tensor
    timesteps: list[int]
    n: int


def routing_profile(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    timesteps: list[int],
    *,
    seed: int = 0,
    device: str = "cpu",
    max_images: int = 16,
) -> RoutingProfile:
    """Token masks measured on real forwards: pixel images (N, H, W, C) uint8 noised to each timestep.

    The width plan comes from the routers at the same timesteps (largest first).
    """
    n = min(max_images, len(images))
    x0 = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
    y = torch.from_numpy(labels[:n]).long().to(device)
    diffusion = create_diffusion()
    ts = sorted({int(t) for t in timesteps}, reverse=True)
    gen = torch.Generator().manual_seed(seed)
    recorder = RoutingRecorder(model)
    with torch.no_grad():
        for t in ts:
            tt = torch.full((n,), t, dtype=torch.long, device=device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            recorder(diffusion.q_sample(x0, tt, noise), tt, y)
    tokens = torch.stack([recorder.decisions(t)[2].float().cpu() for t in ts])  # (T, n, L, N)
    return RoutingProfile(model.width_plan(torch.tensor(ts)), tokens, ts, n)


def static_flops_markdown(title: str, cfg: ModelConfig | FluxConfig) -> str:
    """Per-component GFLOPs of one complete forward for one image, as a Markdown table."""
    if isinstance(cfg, FluxConfig):  # FLUX family (docs/METHOD.md §15.4)
        from dydit.models.flux import flux_macs_table

        table = flux_macs_table(cfg)
        side = cfg.sample_size
        # a FLUX with its own text encoder is one trained here, in pixel space (§17.6); others are latent
        size = "pixels" if cfg.text_encoder else f"latents ({8 * side} px)"
        head = (
            f"{title}: {cfg.latent_channels}x{side}x{side} {size}, {cfg.num_tokens} image "
            f"tokens + {cfg.max_text_length} text tokens"
        )
    else:
        table = config_macs_table(cfg)
        head = f"{title}: input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens"
    total = sum(table.values())
    lines = [
        head,
        "| component | GFLOPs | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {macs / 1e9:.4f} | {100 * macs / total:.2f}% |" for name, macs in table.items()]
    lines.append(f"| **total** | **{total / 1e9:.2f}** | 100% |")
    return "\n".join(lines)


def schedule_flops_markdown(
    cfg: ModelConfig | FluxConfig,
    rows: list[StepFlops],
    *,
    title: str,
    sampler: str,
    samples: int,
    cfg_scale: float,
    seed: int,
    per_timestep: bool = False,
) -> str:
    """The :func:`schedule_flops` measurement of a DyDiT with config ``cfg`` as Markdown tables."""
    flux = isinstance(cfg, FluxConfig)
    if flux:  # FLUX (§15.4): the text stream's MLP is never routed, so it counts with the rest
        from dydit.models.flux import flux_macs_table

        table = flux_macs_table(cfg)
        layers, width = cfg.depth, cfg.inner_dim  # double + single blocks, each routed
        channels = cfg.latent_channels
    else:
        table = config_macs_table(cfg)
        layers = getattr(cfg, "num_layers", cfg.depth)  # a U-ViT routes depth + 1 blocks
        width, channels = cfg.hidden_size, cfg.in_channels
    dense = sum(table.values())
    other = dense - table["attention"] - table["mlp"]
    # Token routers run on every image token of every layer; width routers are precomputed per t (§7.3).
    router = layers * token_router_macs(cfg.num_tokens, width)
    static_core = table["attention"] + table["mlp"]
    lines = [
        f"{title}: router layout {cfg.router_layout}, "
        f"input {channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} image tokens",
        f"token keep rates measured on the {sampler} trajectory: {len(rows)} timesteps, "
        f"{samples} images, cfg scale {cfg_scale:g}, seed {seed}",
    ]
    if per_timestep:
        lines += [
            "| timestep | heads on | groups on | tokens kept | GFLOPs | attn+MLP ratio |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            total = other + router + r.attn + r.mlp
            rates = " | ".join(f"{100 * v:.1f}%" for v in (r.heads, r.groups, r.tokens))
            lines.append(f"| {r.t} | {rates} | {total / 1e9:.6g} | {(r.attn + r.mlp) / static_core:.4f} |")
    attn = sum(r.attn for r in rows) / len(rows)
    mlp = sum(r.mlp for r in rows) / len(rows)
    total = other + router + attn + mlp
    lines += ["| component (mean over the schedule) | GFLOPs | share |", "|---|---:|---:|"]
    parts = (
        ("embedders, adaLN, final layer" + (", text-stream MLP" if flux else ""), other),
        ("attention", attn),
        ("mlp", mlp),
        ("token routers", router),
    )
    lines += [f"| {label} | {macs / 1e9:.6g} | {100 * macs / total:.2f}% |" for label, macs in parts]
    lines += [
        f"| **total** | **{total / 1e9:.6g}** | 100% |",
        f"attn+MLP ratio {(attn + mlp) / static_core:.4f}; total {100 * total / dense:.2f}% of the dense "
        f"model's {dense / 1e9:.6g} GFLOPs",
    ]
    return "\n".join(lines)
