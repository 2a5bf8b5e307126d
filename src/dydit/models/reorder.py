"""Function-preserving reordering of heads and MLP groups by importance (docs/METHOD.md §3.4).

Optional and off by default (the released DyDiT training does not reorder). Before fine-tuning,
each block's heads and MLP channel groups can be sorted by a weight-norm importance score in
descending order, so that the always-on index 0 of the ``"forced_first"`` router layout is the
most important head/group.

- Which rows and columns are a head's or a group's is what the block declares as its units
  (models/backbone.py; for DiT: head h is rows h·d..(h+1)·d-1 of each of the q, k, v blocks of
  ``qkv`` and columns h·d..(h+1)·d-1 of ``proj``; MLP group j of H is rows j·g..(j+1)·g-1 of ``fc1``
  and the same columns of ``fc2``). Heads are independent and GELU is elementwise, so permuting a
  unit's rows and columns together leaves the block's output unchanged.
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
from dydit.models.backbone import permute_units, unit_importance


def head_importance(block: nn.Module) -> Tensor:
    """2-norm of each head's rows and columns as the block declares them (DiT: q/k/v rows with
    bias and ``proj`` columns), (H,)."""
    return unit_importance(block, block.head_units)


def group_importance(block: nn.Module, num_groups: int | None = None) -> Tensor:
    """2-norm of each MLP group's rows and columns (DiT: ``fc1`` rows with bias, ``fc2`` columns), (G,)."""
    units = block.group_units
    if num_groups is not None and num_groups != units.count:
        raise ValueError(f"the block declares {units.count} MLP groups, not {num_groups}")
    return unit_importance(block, units)


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
    permute_units(block, block.head_units, order)
    if hasattr(block, "attn_rate"):
        _permute_router(block.attn_rate, order.to(block.attn_rate.router.weight.device))


@torch.no_grad()
def permute_groups(block: nn.Module, order: Tensor) -> None:
    """New MLP group j is old group ``order[j]``; edits ``block`` in place."""
    permute_units(block, block.group_units, order)
    if hasattr(block, "mlp_rate"):
        _permute_router(block.mlp_rate, order.to(block.mlp_rate.router.weight.device))


def _descending(scores: Tensor) -> Tensor:
    return torch.argsort(scores, descending=True, stable=True).cpu()


def reorder_by_importance(
    model: nn.Module, heads: bool = True, groups: bool = True
) -> list[tuple[Tensor, Tensor]]:
    """Sort every block's heads and MLP groups by descending importance, in place.

    Works on a DiT or a DyDiT, or any backbone whose blocks declare their units
    (models/backbone.py). Returns per block the applied (head order, group order): new index i
    holds old index ``order[i]``.
    """
    orders = []
    for block in model.blocks:
        head_order = _descending(head_importance(block)) if heads else torch.arange(block.head_units.count)
        group_order = (
            _descending(group_importance(block)) if groups else torch.arange(block.group_units.count)
        )
        permute_heads(block, head_order)
        permute_groups(block, group_order)
        orders.append((head_order, group_order))
    return orders
