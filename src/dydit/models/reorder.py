"""Function-preserving reordering of heads and MLP groups by importance (docs/METHOD.md §3.4).

Optional and off by default (the released DyDiT training does not reorder). Before fine-tuning,
each block's heads and MLP channel groups can be sorted by a weight-norm importance score in
descending order, so that the always-on index 0 of the ``"forced_first"`` router layout is the
most important head/group.

- Head h: rows h·d..(h+1)·d-1 of each of the q, k, v blocks of ``qkv`` (weights and bias) and
  columns h·d..(h+1)·d-1 of ``proj``. Attention heads are independent, so permuting them in both
  places leaves the block's output unchanged.
- MLP group j (H groups of g = hidden/H channels): rows j·g..(j+1)·g-1 of ``fc1`` (and bias) and
  the same columns of ``fc2``; the elementwise GELU commutes with the permutation.
- Importance: the 2-norm of all weights and biases that belong to the head or group.

Width routers of a DyDiT are permuted with their units. With ``"forced_first"`` routers, the unit
moved to index 0 becomes forced on and a forced unit moved elsewhere gets an always-on router row
(weight 0, bias ``WIDTH_ROUTER_INIT_BIAS``): exact for fresh routers, which is when reordering is
meant to run. Dense execution is always unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dydit.constants import WIDTH_ROUTER_INIT_BIAS


def head_importance(block: nn.Module) -> Tensor:
    """2-norm of each head's q/k/v rows (with bias) and ``proj`` columns, (H,)."""
    attn = block.attn
    h, d = attn.num_heads, attn.head_dim
    width = attn.qkv.in_features
    qkv_w = attn.qkv.weight.detach().reshape(3, h, d, width)
    qkv_b = attn.qkv.bias.detach().reshape(3, h, d)
    proj_w = attn.proj.weight.detach().reshape(width, h, d)
    return (qkv_w.pow(2).sum((0, 2, 3)) + qkv_b.pow(2).sum((0, 2)) + proj_w.pow(2).sum((0, 2))).sqrt()


def group_importance(block: nn.Module, num_groups: int) -> Tensor:
    """2-norm of each MLP group's ``fc1`` rows (with bias) and ``fc2`` columns, (G,)."""
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    width = fc1.in_features
    w1 = fc1.weight.detach().reshape(num_groups, -1, width)
    b1 = fc1.bias.detach().reshape(num_groups, -1)
    w2 = fc2.weight.detach().reshape(width, num_groups, -1)
    return (w1.pow(2).sum((1, 2)) + b1.pow(2).sum(1) + w2.pow(2).sum((0, 2))).sqrt()


def _permute_router(rate: nn.Module, order: Tensor) -> None:
    """Reorder a WidthRouter's units like the heads/groups it gates."""
    lin = rate.router
    if not rate.forced:
        lin.weight.copy_(lin.weight[order])
        lin.bias.copy_(lin.bias[order])
        return
    # Full H-row router with an always-on row for the forced unit 0; the new row 0 is dropped.
    w = torch.cat([torch.zeros_like(lin.weight[:1]), lin.weight])  # (H, D)
    b = torch.cat([torch.full_like(lin.bias[:1], WIDTH_ROUTER_INIT_BIAS), lin.bias])  # (H,)
    lin.weight.copy_(w[order][1:])
    lin.bias.copy_(b[order][1:])


@torch.no_grad()
def permute_heads(block: nn.Module, order: Tensor) -> None:
    """New head i is old head ``order[i]``; edits ``block`` in place."""
    attn = block.attn
    h, d = attn.num_heads, attn.head_dim
    width = attn.qkv.in_features
    order = order.to(attn.qkv.weight.device)
    attn.qkv.weight.copy_(attn.qkv.weight.reshape(3, h, d, width)[:, order].reshape(3 * h * d, width))
    attn.qkv.bias.copy_(attn.qkv.bias.reshape(3, h, d)[:, order].reshape(-1))
    attn.proj.weight.copy_(attn.proj.weight.reshape(width, h, d)[:, order].reshape(width, h * d))
    if hasattr(block, "attn_rate"):
        _permute_router(block.attn_rate, order)


@torch.no_grad()
def permute_groups(block: nn.Module, order: Tensor) -> None:
    """New MLP group j is old group ``order[j]``; edits ``block`` in place."""
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    g = len(order)
    width = fc1.in_features
    order = order.to(fc1.weight.device)
    fc1.weight.copy_(fc1.weight.reshape(g, -1, width)[order].reshape(-1, width))
    fc1.bias.copy_(fc1.bias.reshape(g, -1)[order].reshape(-1))
    fc2.weight.copy_(fc2.weight.reshape(width, g, -1)[:, order].reshape(width, -1))
    if hasattr(block, "mlp_rate"):
        _permute_router(block.mlp_rate, order)


def _descending(scores: Tensor) -> Tensor:
    return torch.argsort(scores, descending=True, stable=True).cpu()


def reorder_by_importance(
    model: nn.Module, heads: bool = True, groups: bool = True
) -> list[tuple[Tensor, Tensor]]:
    """Sort every block's heads and MLP groups by descending importance, in place.

    Works on a DiT or a DyDiT (H heads, H MLP groups per block). Returns per block the applied
    (head order, group order): new index i holds old index ``order[i]``.
    """
    orders = []
    for block in model.blocks:
        num = block.attn.num_heads
        identity = torch.arange(num)
        head_order = _descending(head_importance(block)) if heads else identity
        group_order = _descending(group_importance(block, num)) if groups else identity
        permute_heads(block, head_order)
        permute_groups(block, group_order)
        orders.append((head_order, group_order))
    if hasattr(model, "clear_cache"):
        model.clear_cache()  # weights changed in place: a DyDiT's sliced packs are stale
    return orders
