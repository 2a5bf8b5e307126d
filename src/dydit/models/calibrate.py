"""Routers calibrated to a target FLOPs ratio, for timing DyDiT models without trained routers.

docs/METHOD.md §3.1 (width routers read E_t only), §4.1 (token router), §5.3 (ρ) and §8. A DyDiT built
from a DiT keeps every head, group and token (router biases 15 / 35), so its sliced engine would
do all the work. To time large models at a chosen ρ, :func:`calibrate_routers` rewrites the routers:

- **Width routers.** A ridge regression finds a direction u with s(t) = u·E_t + u0 ≈ t/T over the
  calibration timesteps. The timesteps, sorted by s, are split into ``segments`` equal bins; in each
  layer the number of active heads (or groups) per bin rises or falls linearly around the target
  fraction (alternating direction by layer), with a random head order per layer, so the active sets
  are nested and each head is on for a prefix of the bins. Its router row becomes
  z(t) = threshold − dir·s(t) with the threshold half-way between two sorted s values, so the
  realised fraction over the calibration timesteps is exact and plans differ across t.
- **Token routers.** Layer by layer, in a masked forward pass on a calibration batch, the last bias
  of the token router is shifted by the quantile of its logits, so a chosen fraction of tokens is kept.

:func:`masked_forward` runs the masked blocks with optional overrides of the routers; the token
calibration uses it, and so do the equivalence tests of the sliced engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dydit.constants import NUM_TIMESTEPS
from dydit.errors import DyditError
from dydit.flops.formulas import layer_costs
from dydit.models.dynamic import masked_layers

# Router biases that keep an output always on / always off, whatever t is.
_ALWAYS = 1e4


@dataclass(frozen=True)
class Calibration:
    """Realised fractions after calibration (over the calibration timesteps and batch)."""

    heads: float  # mean fraction of active heads (forced head included)
    groups: float  # mean fraction of active MLP groups
    tokens: float  # mean fraction of kept tokens
    rho: float  # expected attention+MLP FLOPs ratio (§5.3) from the three fractions, per layer


def fractions_for_rho(
    rho: float,
    tokens: int | None = None,
    width: int | None = None,
    mlp_ratio: float = 4.0,
    keep: float = 0.75,
    costs: tuple[float, float] | None = None,
) -> tuple[float, float, float]:
    """(heads, groups, tokens) fractions reaching ρ with equal head and group fractions w.

    ρ = (w·A + w·keep·M) / (A + M) with A, M the per-layer attention and MLP MACs (§5.3): DiT's
    from ``tokens`` and ``width``, or any backbone's ``costs`` (``model.layer_costs()``), so
    w = ρ(A + M) / (A + keep·M). The token fraction is raised when w would exceed 1.
    """
    if not 0 < rho <= 1:
        raise DyditError(f"target rho must be in (0, 1], got {rho}")
    a, m = layer_costs(tokens, width, mlp_ratio) if costs is None else costs
    w = rho * (a + m) / (a + keep * m)
    if w > 1:
        w, keep = 1.0, (rho * (a + m) - a) / m
    return w, w, keep


def _time_direction(t_emb: Tensor, tau: Tensor, ridge: float = 1e-3) -> tuple[Tensor, float]:
    """Ridge regression tau ≈ t_emb @ u + u0; returns (u (D,), u0)."""
    e = t_emb.double()
    mean, tau_mean = e.mean(0), tau.double().mean()
    ec = e - mean
    gram = ec.T @ ec + ridge * ec.pow(2).sum() / e.shape[1] * torch.eye(e.shape[1], dtype=e.dtype)
    u = torch.linalg.solve(gram, ec.T @ (tau.double() - tau_mean))
    return u, float(tau_mean - mean @ u)


def segment_counts(fraction: float, num: int, segments: int, spread: float, minimum: int) -> list[int]:
    """Active counts per segment, non-increasing, averaging ``fraction·num`` (±1/segments)."""
    total = min(max(round(fraction * num * segments), minimum * segments), num * segments)
    ideal = [fraction * num * (1 + spread * (1 - 2 * (b + 0.5) / segments)) for b in range(segments)]
    counts = [min(max(int(math.floor(v)), minimum), num) for v in ideal]
    order = sorted(range(segments), key=lambda b: ideal[b] - math.floor(ideal[b]), reverse=True)
    i = 0
    while sum(counts) != total and i < 4 * segments * num:  # hand out (or take back) single units
        b = order[i % segments]
        if sum(counts) < total and counts[b] < num:
            counts[b] += 1
        elif sum(counts) > total and counts[b] > minimum:
            counts[b] -= 1
        i += 1
    return sorted(counts, reverse=True)


def _router_thresholds(
    k: int, s: Tensor, counts: list[int], forced: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per router output: (sign, threshold) with logit = threshold + sign·v(t), v = direction·s.

    ``s`` (T,) are the (direction-signed) scores; counts[b] outputs (forced head included) are on
    in bin b of the sorted scores. Switching outputs get sign −1 (on iff v(t) < threshold); outputs
    that are always on or always off get sign 0 and a large ± threshold.
    """
    order = torch.randperm(k, generator=generator)  # rank -> router output (a random head order)
    sorted_v = s.double().sort().values
    t_count, segments = s.numel(), len(counts)
    sign = torch.zeros(k, dtype=torch.float64)
    threshold = torch.zeros(k, dtype=torch.float64)
    for rank in range(k):
        bins_on = sum(1 for c in counts if c - int(forced) > rank)  # a prefix of the bins
        cut = round(bins_on * t_count / segments)
        out = int(order[rank])
        if cut <= 0:
            threshold[out] = -_ALWAYS
        elif cut >= t_count:
            threshold[out] = _ALWAYS
        else:
            threshold[out] = (sorted_v[cut - 1] + sorted_v[cut]) / 2  # half-way between two timesteps
            sign[out] = -1.0
    return sign, threshold


@torch.no_grad()
def calibrate_width_routers(
    model: nn.Module,
    heads: float,
    groups: float,
    timesteps: Sequence[int] | Tensor | None = None,
    segments: int = 4,
    spread: float = 0.5,
    seed: int = 0,
) -> tuple[float, float]:
    """Set every width router so the mean head / group fractions over ``timesteps`` hit the targets.

    Returns the realised (heads, groups) fractions measured with ``model.width_masks``.
    """
    forced = model.router_layout == "forced_first"
    for name, value in (("heads", heads), ("groups", groups)):
        if not 0 <= value <= 1:
            raise DyditError(f"{name} fraction must be in [0, 1], got {value}")
    if not getattr(model, "width_routing", True):  # token routing only (the released DyFLUX)
        return 1.0, 1.0
    device = next(model.parameters()).device
    t = torch.as_tensor(_time_grid(model) if timesteps is None else timesteps).flatten().to(device)
    t_emb = model.width_embedding(t).float().cpu()  # (T, D): what the width routers read (§3.1)
    u, u0 = _time_direction(t_emb, t.float().cpu() / NUM_TIMESTEPS)
    s = t_emb.double() @ u + u0  # (T,)
    gen = torch.Generator().manual_seed(seed)
    for layer, block in enumerate(model.blocks):
        direction = 1.0 if layer % 2 == 0 else -1.0
        for rate, fraction in ((block.attn_rate, heads), (block.mlp_rate, groups)):
            router = rate.router
            counts = segment_counts(fraction, rate.num_units, segments, spread, minimum=int(forced))
            sign, threshold = _router_thresholds(router.out_features, direction * s, counts, forced, gen)
            # z(t) = threshold + sign·direction·(u·E_t + u0): linear in E_t, as the router is.
            router.weight.copy_((sign[:, None] * direction * u[None, :]).to(router.weight.dtype))
            router.bias.copy_((threshold + sign * direction * u0).to(router.bias.dtype))
    head_masks, group_masks = model.width_masks(t)
    return float(head_masks.float().mean()), float(group_masks.float().mean())


def _time_grid(model: nn.Module):
    """The time values to calibrate over: the backbone's ``time_grid()`` (FLUX: flow times in
    [0, 1]), else the DDPM timesteps 0..999."""
    grid = getattr(model, "time_grid", None)
    return range(NUM_TIMESTEPS) if grid is None else grid()


def _calibration_inputs(model: nn.Module, batch: int, gen: torch.Generator):
    """(x, y) for the token calibration: the backbone's ``example_inputs`` when it has them (a text
    family), else standard-normal latents and random labels from the DiT config."""
    make = getattr(model, "example_inputs", None)
    if make is not None:
        return make(batch, gen)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    return x, torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=gen)  # U-ViT uncond: 0


def _token_router_bias(block: nn.Module) -> Tensor:
    return block.token_selection.output_layer.bias


@torch.no_grad()
def masked_forward(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    width_masks: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    token_logits: Callable[[int, Tensor], Tensor] | None = None,
    token_hook: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Reference DyDiT inference by masking (docs/METHOD.md §2, §3.3, §4.2): full tensors times 0/1 masks.

    Runs the masked layer loop (:func:`~dydit.models.dynamic.masked_layers`) with evaluation
    width masks (per sample: each sample's own t). ``width_masks(t)`` may replace the model's,
    ``token_logits(layer, x)`` the token routers, and ``token_hook(layer, logits)`` may rewrite the
    logits (used by the token calibration). Returns (B, C_out, H, W).
    """
    width_masks = width_masks or model.width_masks
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    state, c, _ = model.embed(x, t, y)
    head_masks, group_masks = width_masks(t)  # (B, L, H), (B, L, G)

    def width(layer: int, block: nn.Module) -> tuple[Tensor, Tensor]:
        return head_masks[:, layer].to(c.dtype), group_masks[:, layer].to(c.dtype)

    if token_logits is not None and token_hook is not None:
        override = token_logits

        def token_logits(layer: int, z: Tensor) -> Tensor:
            return token_hook(layer, override(layer, z))

        token_hook = None
    state, _ = masked_layers(model.blocks, state, c, width, token_logits, token_hook)
    return model.head(state, c)


@torch.no_grad()
def calibrate_token_routers(model: nn.Module, keep: float, x: Tensor, t: Tensor, y: Tensor) -> float:
    """Shift each token router's last bias so that a fraction ``keep`` of the calibration tokens is kept.

    Runs :func:`masked_forward` once; layer ℓ is calibrated on the activations produced by the
    already-calibrated layers before it. Returns the realised mean kept fraction.
    """
    if not 0 <= keep <= 1:
        raise DyditError(f"token keep fraction must be in [0, 1], got {keep}")
    kept: list[float] = []

    def hook(layer: int, logits: Tensor) -> Tensor:
        bias = _token_router_bias(model.blocks[layer])
        flat = logits.float().flatten()
        raw = flat - float(bias)  # logits without the current bias
        if keep >= 1:
            new = -float(raw.min()) + 1.0
        elif keep <= 0:
            new = -float(raw.max()) - 1.0
        else:
            ranked = raw.sort(descending=True).values
            cut = min(max(round(keep * raw.numel()), 1), raw.numel() - 1)
            new = -float(ranked[cut - 1] + ranked[cut]) / 2  # keeps the top ``cut`` logits
        bias.fill_(new)
        out = (raw + new).view_as(logits).to(logits.dtype)
        kept.append(float((out > 0).float().mean()))
        return out

    masked_forward(model, x, t, y, token_hook=hook)
    return sum(kept) / len(kept)


@torch.no_grad()
def calibrate_routers(
    model: nn.Module,
    *,
    heads: float,
    groups: float,
    tokens: float,
    timesteps: Sequence[int] | Tensor | None = None,
    batch: int = 8,
    segments: int = 4,
    spread: float = 0.5,
    seed: int = 0,
) -> Calibration:
    """Calibrate width and token routers of a DyDiT (in place) and return the realised fractions.

    The token routers are calibrated on ``batch`` standard-normal latents at timesteps spread over
    ``timesteps`` with random labels (seeded).
    """
    if not hasattr(model, "width_masks"):
        raise DyditError("router calibration needs a DyDiT model (with width and token routers)")
    model.eval()
    h_frac, g_frac = calibrate_width_routers(model, heads, groups, timesteps, segments, spread, seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed + 1)
    grid = torch.as_tensor(_time_grid(model) if timesteps is None else timesteps).flatten()
    t = grid[torch.linspace(0, grid.numel() - 1, batch).round().long()].to(device)
    x, y = _calibration_inputs(model, batch, gen)
    x, y = x.to(device, dtype), y.to(device)
    k_frac = calibrate_token_routers(model, tokens, x, t, y)
    a, m = model.layer_costs()
    return Calibration(h_frac, g_frac, k_frac, (h_frac * a + g_frac * k_frac * m) / (a + m))
