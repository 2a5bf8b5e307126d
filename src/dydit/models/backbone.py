"""The backbone contract: what a network exposes to the DyDiT method (docs/ARCHITECTURE.md §7).

The method (routers, the masked layer loop, the sliced engine, reordering, FLOPs accounting) is
written against this contract only; DiT (and so SiT, the same network) implements it in
``models/dit.py``, and a new family implements it beside its own modules. A *backbone* is an
``nn.Module`` with

- ``embed(x, t, cond) -> (state, c, e)``: the stream(s) the blocks update (a Tensor, or any object
  the family's functions understand, e.g. an (image, text) pair), the conditioning vector c (B, D)
  that modulates every block, and e (B, D_w), what the width routers read (DiT: E_t);
- ``blocks`` (an ``nn.ModuleList`` of *blocks*, below) and ``head(state, c) -> output``;
- ``width_embedding(t) -> e`` from t alone (width decisions are planned per timestep),
  ``width_dim`` (D_w) and ``routed_tokens`` (N, the tokens of the stream the token router reads);
- ``macs_table()`` (per-sample MACs of the complete forward by component, :mod:`dydit.flops.formulas`)
  and ``layer_costs()``, the per-layer (A, M) of the FLOPs ratio (docs/METHOD.md §5.3).

A *block* declares

- ``head_units`` and ``group_units``: :class:`Units`, which rows or columns of which linears belong
  to each attention head and each MLP group, declared once; slicing (the sliced engine),
  importance and permutation (reordering) are the functions below, for every family;
- ``modulation(c)`` (recording its MACs), ``modulation_linear`` (the Linear on SiLU(c) that makes
  every modulation vector) with ``split_modulation(raw)``, and ``static`` (plain numbers such as
  norm epsilons that the functional halves take);
- the two functional halves, taking their weights as arguments (a :data:`Weights` dict: all units,
  or the active ones only): ``attention_half(state, mod, weights, count, static, head_mask) ->
  (state, x, h)`` with x the routed stream (B, N, D) after attention, the token router's input,
  and h (B, N, D) its MLP input; ``mlp_half(h, weights, group_mask) -> update`` on rows (..., D) of h;
  ``mlp_gate(mod) -> (B, D)``; these three are static methods (one compiled function serves
  every layer);
- ``finish(state, x, mod) -> state``: x after the token skip goes back into the state, and any work
  that is not routed (a text stream's MLP) runs; ``routed_dim`` (D of x);
- ``attention_macs(state, count)`` and ``mlp_macs(rows, count)``: MACs with ``count`` active units.

The token skip itself (x + keep ⊙ gate·MLP(h)) belongs to the method, not to the backbone.

Optional, for families whose routing reads more than x or whose un-routed work shares the width
units (FLUX, docs/ARCHITECTURE.md §7.2): a block may give ``make_token_router()`` (its own token
router; one with ``reads_state`` also receives ``token_context(state, c)``), and a block with
``finish_uses_groups`` gets ``finish(state, x, mod, weights, group_mask)`` with the group units'
weights (all of them with 0/1 masks in the masked layer, the active ones in the sliced engine). A
block whose ``finish`` runs its group units' linears complete (a U-ViT's time/class tokens) says
``finish_uses_complete_mlp``: with TD-LoRA adapters the sliced engine then passes ``finish(state, x,
mod, weights)`` every group's weights with the step's adapter merged (docs/METHOD.md §18). A
backbone may also make the calibration inputs: ``example_inputs(batch, generator) -> (x, y)`` and
``time_grid()`` (models/calibrate.py).

Optional, for step caching (models/cache.py, docs/METHOD.md §19): a block whose ``forward(state, c)``
is its dense layer on the seam's state says so with ``dense_forward = True`` (DiT, FLUX; the cache
then calls it, so a cached pass computes exactly the network's own forward; otherwise it runs the
halves with every unit), and a block that gives ``modulated_input(state, mod, static) -> Tensor``
(the normalised, modulated input its attention reads) supports TeaCache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Linear path inside a block -> (weight, bias): every unit, or the active ones only. A linear whose
# rows are sliced to no unit is (None, None); one whose columns are, (None, bias).
Weights = dict[str, tuple[Tensor | None, Tensor | None]]


@dataclass(frozen=True)
class UnitPart:
    """A run of rows (dim 0; the bias follows) or columns (dim 1) of one linear, ``size`` per unit.

    Unit k owns indices ``offset + k·size ... offset + (k + 1)·size - 1`` along ``dim``.
    """

    linear: str  # path of the nn.Linear inside the block, e.g. "attn.qkv"
    dim: int
    offset: int = 0


@dataclass(frozen=True)
class Units:
    """``count`` units (heads or MLP groups) of ``size`` rows/columns in each of ``parts``.

    Parts of one linear share its ``dim``; their order is the order of the sliced rows (DiT's
    fused qkv: the q, k and v parts of the active heads, as its attention function reads them).
    """

    count: int
    size: int
    parts: tuple[UnitPart, ...]

    def linears(self) -> dict[str, tuple[UnitPart, ...]]:
        """The parts of each linear, in declaration order."""
        out: dict[str, tuple[UnitPart, ...]] = {}
        for part in self.parts:
            out[part.linear] = (*out.get(part.linear, ()), part)
        return out

    def index(self, part: UnitPart, active: Tensor) -> Tensor:
        """Rows or columns of ``part`` owned by the units ``active`` (k,), unit by unit: (k·size,)."""
        span = torch.arange(self.size, device=active.device)
        return (part.offset + active[:, None] * self.size + span).flatten()


def _linear(block: nn.Module, path: str) -> nn.Linear:
    return block.get_submodule(path)


def full_weights(block: nn.Module, units: Units) -> Weights:
    """The weights of every unit: the block's own parameters (gradients flow)."""
    return {path: (lin.weight, lin.bias) for path in units.linears() for lin in [_linear(block, path)]}


def unit_weights(block: nn.Module, units: Units, active: Tensor) -> tuple[int, Weights]:
    """(|active|, weights of the units where ``active`` (count,) is true), detached.

    All units: the block's own tensors, shared. None: sliced linears give (None, None) for rows and
    (None, bias) for columns (the branch is then the bias alone; docs/METHOD.md §3.5 items 2-3).
    """
    device = _linear(block, units.parts[0].linear).weight.device
    on = active.nonzero().flatten().to(device)  # (k,)
    k = int(on.numel())
    out: Weights = {}
    for path, parts in units.linears().items():
        lin = _linear(block, path)
        weight, bias = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        dim = parts[0].dim
        if k == units.count:
            out[path] = (weight, bias)
        elif k == 0:
            out[path] = (None, None if dim == 0 else bias)
        else:
            idx = torch.cat([units.index(p, on) for p in parts])
            w = weight.index_select(dim, idx).contiguous()
            out[path] = (w, bias.index_select(0, idx) if dim == 0 and bias is not None else bias)
    return k, out


def _segments(units: Units, part: UnitPart, t: Tensor) -> Tensor:
    """The part's span of ``t`` viewed per unit: (count, size, rest) for dim 0, (rest, count, size) for 1."""
    span = t.narrow(part.dim, part.offset, units.count * units.size)
    if part.dim == 0:
        return span.reshape(units.count, units.size, -1)
    return span.reshape(span.shape[0], units.count, units.size)


def unit_importance(block: nn.Module, units: Units) -> Tensor:
    """2-norm of all the weights and biases that belong to each unit, (count,) (docs/METHOD.md §3.4)."""
    dtype = torch.promote_types(_linear(block, units.parts[0].linear).weight.dtype, torch.float32)
    total = torch.zeros(units.count, dtype=dtype)
    for part in units.parts:
        lin = _linear(block, part.linear)
        seg = _segments(units, part, lin.weight.detach()).to(dtype)
        total += seg.pow(2).sum((1, 2) if part.dim == 0 else (0, 2)).cpu()
        if part.dim == 0 and lin.bias is not None:
            total += _segments(units, part, lin.bias.detach()).to(dtype).pow(2).sum((1, 2)).cpu()
    return total.sqrt()


@torch.no_grad()
def permute_units(block: nn.Module, units: Units, order: Tensor) -> None:
    """New unit i is old unit ``order[i]`` in every part (in place); the function is unchanged."""
    for part in units.parts:
        lin = _linear(block, part.linear)
        targets = [lin.weight] + ([lin.bias] if part.dim == 0 and lin.bias is not None else [])
        for t in targets:
            seg = _segments(units, part, t)
            idx = order.to(t.device)
            moved = seg[idx] if part.dim == 0 else seg[:, idx]  # a copy: safe to write back
            span = t.narrow(part.dim, part.offset, units.count * units.size)
            span.copy_(moved.reshape(span.shape))
