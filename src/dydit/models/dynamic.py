"""The DyDiT method on any backbone: routers in its blocks, the masked dynamic layer, the layer loop.

arXiv 2410.03456; docs/METHOD.md §2 (one block), §3.3 (masks), §4.2 (token skip); docs/ARCHITECTURE.md
§7 (the backbone contract this module is written against). Per block, with the block's modulation
of c:

    state, x, h <- attention_half(state, mod; heads I)       # TDW heads
    logits      <- token_router(x)                           # SDT, on the routed stream after attention
    x           <- x + keep ⊙ (gate · MLP_J(h))              # the token skip; MLP groups J
    state       <- finish(state, x, mod)

:func:`add_routers` gives a backbone block its three routers (state-dict keys ``attn_rate``,
``mlp_rate``, ``token_selection`` inside the block, as in the released checkpoints) and the
methods of :class:`DynamicBlock`. :meth:`DynamicBlock.forward_masked` is the masked layer: full
weights and 0/1 masks, static shapes, differentiable (training, and the reference of the sliced
engine); :func:`masked_layers` is the loop over layers that ``DyDiT.forward_with_routing`` and
calibration's ``masked_forward`` both run. The sliced engine (models/sliced.py) runs the same
halves with the active units' weights and :func:`token_skip` on gathered rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops.counter import is_counting, record
from dydit.models.backbone import full_weights
from dydit.models.routers import TokenRouter, WidthRouter, gumbel_sigmoid

TokenLogitsFn = Callable[[int, Tensor], Tensor]  # (layer, x (B, N, D)) -> logits (B, N)
WidthFn = Callable[[int, nn.Module], tuple[Tensor, Tensor]]  # (layer, block) -> head, group masks


@dataclass(frozen=True)
class RoutingStats:
    """Router decisions of one forward pass, 0/1 values (straight-through gradients in training).

    heads (B, L, H) and groups (B, L, G) include a forced index 0 as constant 1; tokens (B, L, N).
    """

    heads: Tensor
    groups: Tensor
    tokens: Tensor

    def detach(self) -> RoutingStats:
        return RoutingStats(self.heads.detach(), self.groups.detach(), self.tokens.detach())


@dataclass(frozen=True)
class WidthPlan:
    """Evaluation width masks for the time values a sampler uses (docs/METHOD.md §3.5 step 1).

    The plan the sliced engine turns into per-step weight packs, and the demo plots. timesteps (T,)
    holds the time values as the model receives them (long DDPM timesteps, or floats); heads
    (T, L, H) and groups (T, L, G) are bool.
    """

    timesteps: Tensor
    heads: Tensor
    groups: Tensor

    def __len__(self) -> int:
        return self.timesteps.numel()

    def steps(self) -> Iterator[tuple[float, Tensor, Tensor]]:
        """(t, heads (L, H), groups (L, G)) for each planned time value, in plan order."""
        for i, t in enumerate(self.timesteps.tolist()):
            yield float(t), self.heads[i], self.groups[i]

    def lookup(self, t: float) -> tuple[Tensor, Tensor]:
        """(heads (L, H), groups (L, G)) for the time value ``t``."""
        hits = (self.timesteps == t).nonzero()
        if hits.numel() == 0:
            shown = [f"{v:g}" for v in self.timesteps.tolist()]
            shown = shown if len(shown) <= 8 else [*shown[:4], "...", *shown[-4:]]
            raise DyditError(f"timestep {float(t):g} is not in this width plan (planned: {shown})")
        i = int(hits[0, 0])
        return self.heads[i], self.groups[i]


def token_skip(x: Tensor, tokens: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """x + tokens ⊙ (gate · update): a skipped token gets no MLP update at all, its output bias
    included (docs/METHOD.md §4.2). x, update (B, N, D); tokens (B, N) 0/1; gate (B, D)."""
    update = gate.unsqueeze(1) * update
    return x + tokens.to(update.dtype).unsqueeze(-1) * update


class DynamicBlock:
    """What a backbone block gains with its routers (a mixin; :func:`add_routers` applies it).

    Head h and MLP group j are the block's declared units (``head_units``, ``group_units``).
    """

    attn_rate: WidthRouter  # TDW heads
    mlp_rate: WidthRouter  # TDW MLP groups
    token_selection: TokenRouter  # SDT

    @property
    def has_width_routers(self) -> bool:
        """False for a block made dynamic with token routing only (the released DyFLUX)."""
        return "attn_rate" in self._modules

    def _all_units(self, e: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Every head and group on, (B, H) and (B, G): a block without width routers."""
        counts = (self.head_units.count, self.group_units.count)
        return tuple(torch.ones(e.shape[0], k, dtype=dtype, device=e.device) for k in counts)

    def width_masks(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """0/1 head and group masks, (B, H) and (B, G), for the width routers' input e (B, D_w);
        Gumbel + STE in training mode; all ones without width routers."""
        if not self.has_width_routers:
            return self._all_units(e, e.dtype)
        return self.attn_rate(e), self.mlp_rate(e)

    def hard_width_masks(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation head and group masks, bool (B, H) and (B, G), whatever the module's mode."""
        if not self.has_width_routers:
            return self._all_units(e, torch.bool)
        return self.attn_rate.hard_mask(e), self.mlp_rate.hard_mask(e)

    def token_logits(self, x: Tensor, state=None, c: Tensor | None = None) -> Tensor:
        """Token-router logits (B, N) on the routed stream x (B, N, D) after attention. A router with
        ``reads_state`` also reads the block's ``token_context(state, c)`` (docs/ARCHITECTURE.md §7.2)."""
        if getattr(self.token_selection, "reads_state", False):
            return self.token_selection.logits(x, *self.token_context(state, c))
        return self.token_selection.logits(x)

    def finish_masked(self, state, x: Tensor, mod, groups: Tensor | None):
        """``finish``, given the group weights and masks when the block's finish uses them."""
        if getattr(self, "finish_uses_groups", False):
            return self.finish(state, x, mod, full_weights(self, self.group_units), groups)
        return self.finish(state, x, mod)

    def forward_masked(
        self,
        state,
        c: Tensor,
        heads: Tensor,
        groups: Tensor,
        tokens: Tensor | None = None,
        token_logits: Callable[[Tensor], Tensor] | None = None,
        token_hook: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[object, Tensor]:
        """The masked dynamic layer. c (B, D), heads (B, H) and groups (B, G) 0/1.

        ``tokens`` (B, N) overrides the token decisions; ``token_logits`` (x (B, N, D) -> (B, N))
        replaces the token router's logits and ``token_hook`` (logits -> logits) rewrites the
        router's. Returns the new state and the token mask (B, N).
        """
        heads_u, groups_u = self.head_units, self.group_units
        mod = self.modulation(c)
        counting = is_counting()
        if counting:
            record("attention", self.attention_macs(state, heads_u.count))
        weights = full_weights(self, heads_u)
        state, x, h = self.attention_half(state, mod, weights, heads_u.count, self.static, heads)
        if tokens is None:
            logits = self.token_logits(x, state, c) if token_logits is None else token_logits(x)
            logits = logits if token_hook is None else token_hook(logits)
            tokens = gumbel_sigmoid(logits, self.token_selection.training)  # (B, N)
        if counting:
            record("mlp", self.mlp_macs(h.shape[0] * h.shape[1], groups_u.count))
        update = self.mlp_half(h, full_weights(self, groups_u), groups)
        x = token_skip(x, tokens, self.mlp_gate(mod), update)
        return self.finish_masked(state, x, mod, groups), tokens


_DYNAMIC: dict[type, type] = {}


def register_dynamic_block(block_class: type, dynamic_class: type) -> None:
    """Name the class that :func:`add_routers` gives blocks of ``block_class`` (e.g. DyDiTBlock)."""
    _DYNAMIC[block_class] = dynamic_class


def dynamic_block_class(block_class: type) -> type:
    """``block_class`` with the :class:`DynamicBlock` methods (made once per class)."""
    if issubclass(block_class, DynamicBlock):
        return block_class
    if block_class not in _DYNAMIC:
        name, body = f"Dynamic{block_class.__name__}", {"__module__": block_class.__module__}
        _DYNAMIC[block_class] = type(name, (DynamicBlock, block_class), body)
    return _DYNAMIC[block_class]


def add_routers(block: nn.Module, width_dim: int, layout: str, width: bool = True) -> None:
    """Give a backbone block (in place) its head, MLP-group and token routers (docs/METHOD.md §3.1,
    §4.1) and the methods of :class:`DynamicBlock`. The routers are fresh ``nn.Linear`` layers: the
    caller initialises them (``DyDiT`` does). ``width=False`` adds the token router only; a block
    with ``make_token_router()`` brings its own token router (FLUX: DyFLUX's, docs/METHOD.md §15.2)."""
    if width:
        block.attn_rate = WidthRouter(width_dim, block.head_units.count, layout)
        block.mlp_rate = WidthRouter(width_dim, block.group_units.count, layout)
    make = getattr(block, "make_token_router", None)
    block.token_selection = TokenRouter(block.routed_dim) if make is None else make()
    block.__class__ = dynamic_block_class(type(block))


def masked_layers(
    blocks: nn.ModuleList,
    state,
    c: Tensor,
    width: WidthFn,
    token_logits: TokenLogitsFn | None = None,
    token_hook: TokenLogitsFn | None = None,
) -> tuple[object, RoutingStats]:
    """Run every block's masked layer: the one dynamic layer loop (docs/METHOD.md §2).

    ``width(layer, block)`` gives the layer's head and group masks (drawn just before the layer, so
    the Gumbel noise is drawn in one fixed order); ``token_logits(layer, x)`` replaces the token
    routers and ``token_hook(layer, logits)`` rewrites the routers' logits. Returns the state after
    the last block and the stacked decisions.
    """
    heads, groups, keep = [], [], []
    for layer, block in enumerate(blocks):
        h, g = width(layer, block)
        select = None if token_logits is None else (lambda x, layer=layer: token_logits(layer, x))
        hook = None if token_hook is None else (lambda z, layer=layer: token_hook(layer, z))
        state, k = block.forward_masked(state, c, h, g, token_logits=select, token_hook=hook)
        heads.append(h)
        groups.append(g)
        keep.append(k)
    return state, RoutingStats(torch.stack(heads, 1), torch.stack(groups, 1), torch.stack(keep, 1))
