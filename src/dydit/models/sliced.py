"""Sliced inference engine for DyDiT: the work of masked heads, groups and tokens is really skipped.

docs/METHOD.md §3.5 (per-timestep width plans, sliced weights), §4.3 (gather/scatter of kept tokens over
the flattened batch) and §8 (what makes it fast). The released DyDiT code multiplies full tensors
by 0/1 masks and is slower than DiT; this engine computes exactly the masked model's output while
running attention on the active heads only (for DiT: their q/k/v rows and ``proj`` columns; full
``proj.bias``, which is the whole branch when no head is active) and the MLP on the active groups
only (``fc1`` rows, ``fc2`` columns, full ``fc2.bias``) and only on the tokens the SDT router
keeps: their rows of the flattened (B·N, D) activations are gathered and scattered back with
``index_add_``; skipped tokens get no update at all (§4.2).

The engine is written against the backbone contract (models/backbone.py), for any family: the rows
and columns of each head and group are the ones its blocks declare as units, and each layer runs the
block's own ``attention_half`` (as the masked loop does) with the active units' weights, then
:func:`gathered_mlp_update`, the token skip on the gathered rows. Width masks depend only on t
(§3.1): each step of the model's :meth:`~dydit.models.dydit.DyDiT.width_plan` becomes
:class:`StepPacks` (per layer, contiguous pre-sliced weights), built once per distinct t value from
packs cached per (layer, mask). A call costs one host sync to read t, one dict lookup and a loop
over layers (on CUDA one more sync per layer for the kept-token count). CFG halves share a pass
(same t); samples are grouped by t.

Optional ``torch.compile`` of the two per-layer regions (dynamic shapes, so head/group/token counts
do not trigger a recompilation per value; ``token_bucket`` pads the kept-token count to a multiple
of a bucket for static-shape modes such as CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import is_counting, record
from dydit.models.backbone import Weights, unit_weights
from dydit.models.dynamic import WidthPlan
from dydit.models.routers import token_router_logits

TokenLogitsFn = Callable[[int, Tensor], Tensor]  # (layer, x (B, N, D)) -> logits (B, N); kept iff > 0
KeptRows = tuple[Tensor | None, Tensor | None, Tensor, int]  # idx, sample, gate, number of MLP rows
RouterWeights = tuple[Tensor, Tensor, Tensor, Tensor]  # (w1, b1, w2, b2) of the SDT router


# Weight packs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pack:
    """The weights of the active units of one layer: heads (docs/METHOD.md §3.5 item 2) or MLP
    groups (item 3), sliced by the block's declared units (:func:`~dydit.models.backbone.unit_weights`)."""

    count: int  # active heads or groups
    weights: Weights  # per linear: the rows/columns of the active units; biases of outputs kept whole


@dataclass(frozen=True)
class StepPacks:
    """One step of a :class:`~dydit.models.dydit.WidthPlan` made concrete: the per-layer packs."""

    attn: tuple[Pack, ...]
    mlp: tuple[Pack, ...]


def attention_region(
    attention_half: Callable,
    state,
    mod: Sequence[Tensor],
    weights: Weights,
    count: int,
    static: tuple,
    router: RouterWeights | None,
) -> tuple:
    """The block's attention half with sliced weights, then the token router's logits on x (one
    region for ``torch.compile``). Returns (state, x, h, logits or None)."""
    state, x, h = attention_half(state, mod, weights, count, static, None)
    return state, x, h, None if router is None else token_router_logits(x, *router)


def gathered_mlp_update(
    x: Tensor,  # (B, N, D), updated in place
    h: Tensor,  # (B, N, D) modulated MLP input
    idx: Tensor | None,  # (M,) kept rows of the flattened (B·N) axis; None = all tokens
    sample: Tensor | None,  # (M,) sample index of each kept row (rows into gate)
    gate: Tensor,  # (B, D) gate, or (B+1, D) with a zero last row when idx is padded
    mlp_half: Callable[[Tensor, Weights], Tensor],
    weights: Weights,
) -> Tensor:
    """The token skip (``x + keep ⊙ gate·MLP_J(h)``, models/loop.py) computed on the kept rows only:
    gather -> the block's MLP half -> gate -> scatter-add (docs/METHOD.md §4.3)."""
    b, n, d = x.shape
    rows = h.reshape(b * n, d) if idx is None else h.reshape(b * n, d).index_select(0, idx)  # (M, D)
    u = mlp_half(rows, weights)  # (M, D)
    if idx is None:
        return x.addcmul_(gate[:, None, :], u.view(b, n, d))
    x.view(b * n, d).index_add_(0, idx, u * gate.index_select(0, sample))
    return x


def _time_values(timesteps: Iterable[float] | Tensor) -> Tensor:
    """t values as a flat CPU tensor; Python floats as float64 so that each keeps its exact value."""
    if isinstance(timesteps, Tensor):
        return timesteps.detach().flatten().cpu()
    values = list(timesteps)
    floats = any(isinstance(v, float) for v in values)
    return torch.as_tensor(values, dtype=torch.float64 if floats else None).flatten()


# The engine ---------------------------------------------------------------------------------------------
class SlicedDyDiT(nn.Module):
    """Inference-only DyDiT that skips masked work; ``engine(x, t, y) -> Tensor`` like every model.

    Args:
        model: a DyDiT over any backbone (models/backbone.py); put in eval mode.
        plan_timesteps: t values whose plan steps are packed now (others are packed on first use).
        token_logits: overrides the blocks' token routers: (layer, x (B, N, D)) -> (B, N); kept iff > 0.
        compile: compile the two per-layer regions with ``torch.compile(dynamic=True)``.
        compile_mode: passed to ``torch.compile`` (e.g. ``"max-autotune-no-cudagraphs"``).
        token_bucket: pad the kept-token count to a multiple of this (bounded shapes for static modes).

    Packs are sliced copies of the weights: call :meth:`clear_cache` after changing them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        plan_timesteps: Iterable[float] | Tensor | None = None,
        token_logits: TokenLogitsFn | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        token_bucket: int | None = None,
    ):
        super().__init__()
        if not hasattr(model, "width_plan"):
            raise DyditError("sliced execution needs a DyDiT (a model with width_plan and routers)")
        if token_bucket is not None and token_bucket < 1:
            raise DyditError(f"token_bucket must be positive, got {token_bucket}")
        self.model = model.eval()
        self._token_logits = token_logits
        self.token_bucket = token_bucket
        blocks = list(model.blocks)
        self.num_layers = len(blocks)
        self.num_heads = blocks[0].head_units.count
        self.num_groups = blocks[0].group_units.count
        self._attn_fn: Callable = attention_region
        self._mlp_fn: Callable = gathered_mlp_update
        # CUDA graphs (mode "reduce-overhead") must not copy the weights into static buffers per replay.
        self._static_weights = compile and "reduce-overhead" in (compile_mode or "")
        if compile:  # one function for every layer: the block's halves are static methods, passed in
            self._attn_fn = torch.compile(attention_region, dynamic=True, mode=compile_mode)
            self._mlp_fn = torch.compile(gathered_mlp_update, dynamic=True, mode=compile_mode)
        self.clear_cache()
        if plan_timesteps is not None:
            self.prepare(plan_timesteps)

    # caches -----------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget plan steps, weight packs and fused adaLN/router weights (after changing the weights)."""
        self._steps: dict[float, StepPacks] = {}
        self._attn_packs: dict[tuple[int, bytes], Pack] = {}
        self._mlp_packs: dict[tuple[int, bytes], Pack] = {}
        self._adaln: tuple[Tensor, Tensor, list[int]] | None = None
        self._routers: list[RouterWeights | None] | None = None

    def _apply(self, fn, recurse=True):  # .to() / .half() / .cuda(): packs must follow the weights
        out = super()._apply(fn, recurse)
        self.clear_cache()
        return out

    def train(self, mode: bool = True) -> SlicedDyDiT:
        if mode:
            raise DyditError("the sliced engine is inference-only; train the DyDiT model itself")
        return super().train(False)

    def cache_info(self) -> dict[str, int]:
        """Numbers of cached plan steps and packs, and the bytes held by sliced (non-shared) weights."""
        shared = {p.data_ptr() for p in self.model.parameters()}
        own = {
            w.data_ptr(): w.numel() * w.element_size()
            for pack in [*self._attn_packs.values(), *self._mlp_packs.values()]
            for pair in pack.weights.values()
            for w in pair
            if w is not None and w.data_ptr() not in shared
        }
        return {
            "plans": len(self._steps),
            "attn_packs": len(self._attn_packs),
            "mlp_packs": len(self._mlp_packs),
            "pack_bytes": sum(own.values()),
        }

    # plans --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, timesteps: Iterable[float] | Tensor) -> None:
        """Pack the plan steps of these t values (one call of ``model.width_plan`` for all of them)."""
        t = _time_values(timesteps)
        new = [i for i, v in enumerate(t.tolist()) if float(v) not in self._steps]
        if new:
            self.load_plan(self.model.width_plan(t[new]))

    def load_plan(self, plan: WidthPlan) -> None:
        """Pack every step of a width plan (steps already packed are kept)."""
        shape, groups = (self.num_layers, self.num_heads), (self.num_layers, self.num_groups)
        if plan.heads.shape[1:] != shape or plan.groups.shape[1:] != groups:
            raise DyditError(
                f"width masks must be (T, L, H) = (T, *{shape}) and (T, *{groups}), got "
                f"{tuple(plan.heads.shape)} and {tuple(plan.groups.shape)}"
            )
        for t, heads, groups in plan.steps():
            if t not in self._steps:
                layers = range(self.num_layers)
                self._steps[t] = StepPacks(
                    tuple(self._attn_pack(layer, heads[layer]) for layer in layers),
                    tuple(self._mlp_pack(layer, groups[layer]) for layer in layers),
                )

    def plan(self, t: float | Tensor) -> StepPacks:
        """The packs of the plan step of one t value (packed on first use)."""
        key = float(t)
        if key not in self._steps:
            self.prepare(t.reshape(1) if isinstance(t, Tensor) else [t])
        return self._steps[key]

    def _attn_pack(self, layer: int, heads: Tensor) -> Pack:
        key = (layer, heads.cpu().numpy().tobytes())
        if key not in self._attn_packs:
            block = self.model.blocks[layer]
            self._attn_packs[key] = self._pack(block, block.head_units, heads)
        return self._attn_packs[key]

    def _mlp_pack(self, layer: int, groups: Tensor) -> Pack:
        key = (layer, groups.cpu().numpy().tobytes())
        if key not in self._mlp_packs:
            block = self.model.blocks[layer]
            self._mlp_packs[key] = self._pack(block, block.group_units, groups)
        return self._mlp_packs[key]

    def _pack(self, block: nn.Module, units, active: Tensor) -> Pack:
        pack = Pack(*unit_weights(block, units, active))
        if self._static_weights:  # torch.compile's CUDA graphs: these weights keep their address
            for pair in pack.weights.values():
                for w in pair:
                    if w is not None:
                        torch._dynamo.mark_static_address(w)
        return pack

    def _fused_adaln(self) -> tuple[Tensor, Tensor, list[int]]:
        """All layers' modulation linears stacked into one matmul, and each layer's output size."""
        if self._adaln is None:
            linears = [block.modulation_linear for block in self.model.blocks]
            weight = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
            sizes = [lin.out_features for lin in linears]
            self._adaln = (weight, torch.cat([lin.bias.detach() for lin in linears]), sizes)
        return self._adaln

    def _router_weights(self) -> list[RouterWeights | None]:
        """Each block's SDT router weights (run inside the attention region); None with an override."""
        if self._routers is None:
            self._routers = []
            for block in self.model.blocks:
                router = None
                if self._token_logits is None:
                    router = tuple(w.detach() for w in block.token_selection.weights())
                    if self._static_weights:
                        for w in router:
                            torch._dynamo.mark_static_address(w)
                self._routers.append(router)
        return self._routers

    # forward ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) or scalar, y the backbone's condition input (labels (B,), a tensor of
        any shape with the batch first, or an object with ``len`` and ``select(rows)``) -> the
        output (B, C_out, H, W), equal to the masked DyDiT."""
        if self.model.training:
            raise DyditError("the sliced engine is inference-only: call model.eval() first")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape[0] != x.shape[0] or len(y) != x.shape[0]:
            raise DyditError(f"batch sizes differ: x {x.shape[0]}, t {t.shape[0]}, y {len(y)}")
        values = t.detach().cpu()  # the one host sync of the call
        first = values[0]
        if bool((values == first).all()):
            return self._forward_one_t(x, t, y, first)
        # Samples with different t have different plan steps: run each group and reassemble.
        out = None
        for value in torch.unique(values):
            rows = (values == value).nonzero().flatten().to(x.device)
            y_rows = y[rows] if isinstance(y, Tensor) else y.select(rows)
            part = self._forward_one_t(x[rows], t[rows], y_rows, value)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out

    def _forward_one_t(self, x: Tensor, t: Tensor, y: Tensor, t_value: Tensor) -> Tensor:
        model, step = self.model, self.plan(t_value)
        x = x.to(next(model.parameters()).dtype)
        state, c, _ = model.embed(x, t, y)  # the blocks' state, c (B, D)
        w, bias, sizes = self._fused_adaln()
        raws = F.linear(F.silu(c), w, bias).split(sizes, dim=1)  # per layer (B, M_l)
        record("adaLN", c.shape[0] * c.shape[1] * sum(sizes))
        routers = self._router_weights()
        counting = is_counting()  # the per-layer MACs are computed only for a counter
        for layer, block in enumerate(model.blocks):
            ap, mp, router = step.attn[layer], step.mlp[layer], routers[layer]
            mod = block.split_modulation(raws[layer])
            if counting:
                record("attention", block.attention_macs(state, ap.count))
            state, x, h, logits = self._attn_fn(
                block.attention_half, state, mod, ap.weights, ap.count, block.static, router
            )
            b, n, d = x.shape
            if logits is None:
                logits = self._token_logits(layer, x)
            elif counting:
                r = router[0].shape[0]  # D/16
                record("token_router", b * (formulas.linear_macs(n, d, r) + formulas.linear_macs(n, r, 1)))
            idx, sample, gate, rows = self._kept_rows(logits, block.mlp_gate(mod), n)
            if rows:
                x = self._mlp_fn(x.contiguous(), h, idx, sample, gate, block.mlp_half, mp.weights)
                if counting:
                    record("mlp", block.mlp_macs(rows, mp.count))
            state = block.finish(state, x, mod)
        return model.head(state, c)

    def _kept_rows(self, logits: Tensor, gate: Tensor, n: int) -> KeptRows:
        """(idx, sample, gate, rows) for the MLP: rows of kept tokens in the flattened batch (§4.3)."""
        keep = (logits > 0).flatten()  # (B·N,)
        idx = keep.nonzero().flatten()  # (M,), host sync on CUDA
        m = idx.numel()
        if m == keep.numel():
            return None, None, gate, m
        if m == 0:
            return idx, idx, gate, 0
        sample = torch.div(idx, n, rounding_mode="floor")
        if self.token_bucket is None:
            return idx, sample, gate, m
        padded = min(-(-m // self.token_bucket) * self.token_bucket, keep.numel())
        pad = padded - m  # extra rows point at row 0 with a zero gate: they add nothing
        if pad:
            idx = torch.cat([idx, idx.new_zeros(pad)])
            sample = torch.cat([sample, sample.new_full((pad,), gate.shape[0])])
            gate = torch.cat([gate, gate.new_zeros(1, gate.shape[1])])
        return idx, sample, gate, padded


def sliced(model: nn.Module, **kwargs) -> SlicedDyDiT:
    """Wrap a DyDiT in the sliced inference engine: ``sliced(model)(x, t, y)``. See :class:`SlicedDyDiT`."""
    return SlicedDyDiT(model, **kwargs)
