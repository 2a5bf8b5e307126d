"""Closed-form, differentiable FLOPs of a routed DyDiT pass and the FLOPs-constrained loss.

docs/METHOD.md §5.3. With per-layer static costs A (attention) and M (MLP) from
:func:`dydit.flops.formulas.layer_costs`, for sample b and layer l:

    r_h = (1/H) Σ_h heads[b, l, h]     r_g = (1/H) Σ_j groups[b, l, j]     r_t = (1/N) Σ_n tokens[b, l, n]
    F_dyn(b) = Σ_l (A·r_h + M·r_g·r_t)        F_static = L·(A + M)
    ρ = mean_b F_dyn(b) / F_static             L_FLOPs = w·(ρ − λ_t)²,  w = 2 by default

Only attention and MLP work enter the ratio (embedders, adaLN, final layer and routers are
excluded). The ratio is computed in float32 (float64 if the masks are float64) whatever the mask
dtype and any enclosing autocast: under ``--bf16`` the router masks leave the network in bfloat16,
whose 8-bit mantissa would put an error of about 1e-3 on ρ, the size of the FLOPs-loss gradient
near convergence. This module never imports ``models``: the routing statistics are duck-typed (anything
with ``.heads``, ``.groups`` and ``.tokens``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from dydit.constants import FLOPS_LOSS_WEIGHT
from dydit.errors import DyditError


class RoutingLike(Protocol):
    """heads (B, L, H), groups (B, L, H), tokens (B, L, N): 0/1 router decisions."""

    heads: Tensor
    groups: Tensor
    tokens: Tensor


def _check_shapes(heads: Tensor, groups: Tensor, tokens: Tensor) -> None:
    if heads.ndim != 3 or groups.ndim != 3 or tokens.ndim != 3:
        raise ValueError(
            f"expected heads/groups (B, L, H) and tokens (B, L, N), got {tuple(heads.shape)}, "
            f"{tuple(groups.shape)}, {tuple(tokens.shape)}"
        )
    if heads.shape[:2] != groups.shape[:2] or heads.shape[:2] != tokens.shape[:2]:
        raise ValueError(
            f"batch/layer dims disagree: heads {tuple(heads.shape)}, groups {tuple(groups.shape)}, "
            f"tokens {tuple(tokens.shape)}"
        )


def _as_float(mask: Tensor) -> Tensor:
    """``mask`` as float32 at least (bool, int and bfloat16/float16 masks are widened; float64 kept)."""
    return mask.to(torch.promote_types(mask.dtype, torch.float32))


def per_sample_macs(
    heads: Tensor, groups: Tensor, tokens: Tensor, attn_cost: float, mlp_cost: float
) -> Tensor:
    """F_dyn(b) = Σ_l (A·r_h + M·r_g·r_t): attention + MLP MACs of each sample, (B,)."""
    _check_shapes(heads, groups, tokens)
    with torch.autocast(heads.device.type, enabled=False):  # the sums stay in float32 under autocast
        r_h = _as_float(heads).mean(-1)  # (B, L)
        r_g = _as_float(groups).mean(-1)  # (B, L)
        r_t = _as_float(tokens).mean(-1)  # (B, L)
        return (float(attn_cost) * r_h + float(mlp_cost) * r_g * r_t).sum(-1)


def per_sample_flops_ratio(
    heads: Tensor, groups: Tensor, tokens: Tensor, attn_cost: float, mlp_cost: float
) -> Tensor:
    """F_dyn(b) / F_static for every sample, (B,); 1 when every head, group and token is on.

    Args:
        heads: (B, L, H) head masks (a forced head 0 included as 1).
        groups: (B, L, H) MLP-group masks.
        tokens: (B, L, N) token masks.
        attn_cost, mlp_cost: per-layer MACs A and M of the complete layer.
    """
    _check_shapes(heads, groups, tokens)
    if attn_cost < 0 or mlp_cost < 0 or attn_cost + mlp_cost <= 0:
        raise ValueError(f"layer costs must be >= 0 and not both zero, got A={attn_cost}, M={mlp_cost}")
    # Normalise the costs first: A and M reach 1e9 MACs, the ratio stays well conditioned in float32.
    total = float(attn_cost) + float(mlp_cost)
    num_layers = heads.shape[1]
    return per_sample_macs(heads, groups, tokens, attn_cost / total, mlp_cost / total) / num_layers


def flops_ratio(stats: RoutingLike, attn_cost: float, mlp_cost: float) -> Tensor:
    """ρ: the batch mean of :func:`per_sample_flops_ratio` (a differentiable scalar)."""
    return per_sample_flops_ratio(stats.heads, stats.groups, stats.tokens, attn_cost, mlp_cost).mean()


def check_target(target: float) -> float:
    """A FLOPs target λ must lie in (0, 1]; returns it as a float or raises DyditError."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise DyditError(f"FLOPs target lambda must be a number in (0, 1], got {target!r}") from None
    if not 0.0 < value <= 1.0:
        raise DyditError(f"FLOPs target lambda must be in (0, 1], got {target}")
    return value


def flops_loss(rho: Tensor, target: float, weight: float = FLOPS_LOSS_WEIGHT) -> Tensor:
    """L_FLOPs = weight·(ρ − λ_t)² (docs/METHOD.md §5.3); λ_t outside (0, 1] raises DyditError."""
    target = check_target(target)
    if not weight >= 0:
        raise DyditError(f"FLOPs loss weight must be >= 0, got {weight}")
    return weight * (rho - target) ** 2
