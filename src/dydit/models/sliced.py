"""Sliced inference engine for DyDiT: the work of masked heads, groups and tokens is really skipped.

METHOD.md §3.5 (per-timestep width plans, sliced weights), §4.3 (gather/scatter of kept tokens over
the flattened batch) and §8 (what makes it fast). The released DyDiT code multiplies full tensors
by 0/1 masks and is slower than DiT; this engine computes exactly the masked model's output while
running only

- attention on the |I| active heads: the q/k/v rows and ``proj`` columns of those heads, fused SDPA,
  and the full ``proj.bias`` (with I = ∅ the branch is ``proj.bias``; METHOD.md §3.5 item 2);
- the MLP on the |J| active groups (``fc1`` rows, ``fc2`` columns, full ``fc2.bias``) and only on
  the tokens the SDT router keeps: their rows of the flattened (B·N, D) activations are gathered,
  pass fc1 -> GELU -> fc2, are multiplied by the per-sample gate and scattered back (``index_add_``);
  skipped tokens get no update at all (no ``fc2.bias`` either, §4.2).

Width masks depend only on t (§3.1), so a *step plan* (per layer: an attention pack and an MLP pack
of contiguous, pre-sliced weights) is built once per distinct t value, from packs cached per
(layer, mask) pattern. A forward call costs one host sync to read t, one dict lookup, and a loop
over layers (one more sync per layer on CUDA for the kept-token count). Both CFG halves share one
pass because their t, hence their plan, are equal. All samples of a call are grouped by t.

Optional ``torch.compile`` of the two per-layer regions (dynamic shapes, so head/group/token counts
do not trigger a recompilation per value; ``token_bucket`` pads the kept-token count to a multiple
of a bucket for static-shape modes such as CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import record

WidthMasksFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # t (T,) -> heads (T, L, H), groups (T, L, H)
TokenLogitsFn = Callable[[int, Tensor], Tensor]  # (layer, x (B, N, D)) -> logits (B, N); kept iff > 0


# Weight packs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnPack:
    """Attention weights of the active heads I of one layer (METHOD.md §3.5 item 2)."""

    num_heads: int  # |I|
    qkv_weight: Tensor | None  # (3·|I|·d, D): [q; k; v] rows of the heads in I, head-major
    qkv_bias: Tensor | None  # (3·|I|·d,)
    proj_weight: Tensor | None  # (D, |I|·d)
    proj_bias: Tensor  # (D,), always added

    @property
    def args(self) -> tuple:
        """The arguments of :func:`attention_region` that come from the pack."""
        return self.qkv_weight, self.qkv_bias, self.proj_weight, self.proj_bias, self.num_heads


@dataclass(frozen=True)
class MlpPack:
    """MLP weights of the active groups J of one layer (METHOD.md §3.5 item 3)."""

    num_groups: int  # |J|
    fc1_weight: Tensor | None  # (|J|·g, D)
    fc1_bias: Tensor | None  # (|J|·g,)
    fc2_weight: Tensor | None  # (D, |J|·g)
    fc2_bias: Tensor  # (D,), added for every kept token

    @property
    def args(self) -> tuple:
        """The arguments of :func:`mlp_region` that come from the pack."""
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias


@dataclass(frozen=True)
class StepPlan:
    """Per-layer packs for one timestep value."""

    attn: tuple[AttnPack, ...]
    mlp: tuple[MlpPack, ...]


def slice_attention(qkv: nn.Linear, proj: nn.Linear, heads: Tensor) -> AttnPack:
    """Pack the q/k/v rows and proj columns of the heads where ``heads`` (H,) is true."""
    width = proj.out_features
    num_heads = heads.numel()
    d = width // num_heads
    active = heads.nonzero().flatten().to(qkv.weight.device)  # (|I|,)
    if active.numel() == num_heads:  # full width: share the model's own tensors
        return AttnPack(
            num_heads, qkv.weight.detach(), qkv.bias.detach(), proj.weight.detach(), proj.bias.detach()
        )
    if active.numel() == 0:
        return AttnPack(0, None, None, None, proj.bias.detach())
    within = torch.arange(d, device=active.device)
    cols = (active[:, None] * d + within).flatten()  # (|I|·d,) channels of the active heads
    rows = torch.cat([part * width + cols for part in range(3)])  # (3·|I|·d,) rows in the q, k, v blocks
    return AttnPack(
        int(active.numel()),
        qkv.weight.detach().index_select(0, rows),
        qkv.bias.detach().index_select(0, rows),
        proj.weight.detach().index_select(1, cols).contiguous(),
        proj.bias.detach(),
    )


def slice_mlp(fc1: nn.Linear, fc2: nn.Linear, groups: Tensor) -> MlpPack:
    """Pack the fc1 rows and fc2 columns of the groups where ``groups`` (G,) is true; g = hidden / G."""
    num_groups = groups.numel()
    g = fc1.out_features // num_groups
    active = groups.nonzero().flatten().to(fc1.weight.device)  # (|J|,)
    if active.numel() == num_groups:
        return MlpPack(
            num_groups, fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), fc2.bias.detach()
        )
    if active.numel() == 0:
        return MlpPack(0, None, None, None, fc2.bias.detach())
    rows = (active[:, None] * g + torch.arange(g, device=active.device)).flatten()  # (|J|·g,)
    return MlpPack(
        int(active.numel()),
        fc1.weight.detach().index_select(0, rows),
        fc1.bias.detach().index_select(0, rows),
        fc2.weight.detach().index_select(1, rows).contiguous(),
        fc2.bias.detach(),
    )


# The two per-layer regions (plain functions of tensors, so torch.compile sees no modules) -------------
def attention_region(
    x: Tensor,  # (B, N, D) residual stream
    mod: Tensor,  # (B, 6, D): shift_msa, 1+scale_msa, gate_msa, shift_mlp, 1+scale_mlp, gate_mlp
    qkv_weight: Tensor | None,
    qkv_bias: Tensor | None,
    proj_weight: Tensor | None,
    proj_bias: Tensor,
    num_heads: int,
    eps: float,
    mlp_eps: float,
    router: tuple[Tensor, Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """x + gate_msa·Attn_I(modulate(LN x)); then the MLP input h (B, N, D) and token logits (B, N)."""
    b, n, d = x.shape
    if num_heads > 0:
        h = torch.addcmul(mod[:, 0, None], F.layer_norm(x, (d,), eps=eps), mod[:, 1, None])  # (B, N, D)
        qkv = F.linear(h, qkv_weight, qkv_bias).view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, |I|, N, d)
        o = F.linear(o.transpose(1, 2).reshape(b, n, -1), proj_weight, proj_bias)  # (B, N, D)
        x = torch.addcmul(x, mod[:, 2, None], o)
    else:  # no active head: the branch is proj.bias (METHOD.md §3.5 item 2)
        x = torch.addcmul(x, mod[:, 2, None], proj_bias)
    logits = None
    if router is not None:  # SDT router on the raw post-attention stream (METHOD.md §4.1)
        w1, b1, w2, b2 = router
        logits = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2).squeeze(-1)  # (B, N)
    h = torch.addcmul(mod[:, 3, None], F.layer_norm(x, (d,), eps=mlp_eps), mod[:, 4, None])  # (B, N, D)
    return x, h, logits


def mlp_region(
    x: Tensor,  # (B, N, D), updated in place
    h: Tensor,  # (B, N, D) modulated MLP input
    idx: Tensor | None,  # (M,) kept rows of the flattened (B·N) axis; None = all tokens
    sample: Tensor | None,  # (M,) sample index of each kept row (rows into gate)
    gate: Tensor,  # (B, D) gate_mlp, or (B+1, D) with a zero last row when idx is padded
    fc1_weight: Tensor | None,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor | None,
    fc2_bias: Tensor,
) -> Tensor:
    """x + gate_mlp·MLP_J(h) on the kept tokens (gather -> fc1 -> GELU -> fc2 -> gate -> scatter)."""
    b, n, d = x.shape
    rows = h.reshape(b * n, d) if idx is None else h.reshape(b * n, d).index_select(0, idx)  # (M, D)
    if fc1_weight is not None:
        u = F.linear(F.gelu(F.linear(rows, fc1_weight, fc1_bias), approximate="tanh"), fc2_weight, fc2_bias)
    else:  # no active group: the MLP output is fc2.bias for every kept token (METHOD.md §3.5 item 3)
        u = fc2_bias.expand_as(rows)
    if idx is None:
        return x.addcmul_(gate[:, None, :], u.view(b, n, d))
    u = u * gate.index_select(0, sample)  # (M, D)
    x.view(b * n, d).index_add_(0, idx, u)
    return x


# The engine ---------------------------------------------------------------------------------------------
class SlicedDyDiT(nn.Module):
    """Inference-only DyDiT that skips masked work; ``engine(x, t, y) -> Tensor`` like every model.

    Args:
        model: a DyDiT (or any DiT with ``width_masks`` and blocks with ``token_logits``). Put in eval mode.
        plan_timesteps: t values whose step plans are built now (others are built on first use).
        width_masks: overrides ``model.width_masks``: t (T,) -> (heads, groups), each (T, L, H) bool.
        token_logits: overrides the blocks' token routers: (layer, x (B, N, D)) -> (B, N); kept iff > 0.
        compile: compile the two per-layer regions with ``torch.compile(dynamic=True)``.
        compile_mode: passed to ``torch.compile`` (e.g. ``"max-autotune-no-cudagraphs"``).
        token_bucket: pad the kept-token count to a multiple of this (bounded shapes for static modes).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        plan_timesteps: Iterable[float] | Tensor | None = None,
        width_masks: WidthMasksFn | None = None,
        token_logits: TokenLogitsFn | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        token_bucket: int | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        self._width_masks = width_masks if width_masks is not None else getattr(model, "width_masks", None)
        if self._width_masks is None:
            raise DyditError("sliced execution needs width masks: pass a DyDiT or a width_masks function")
        self._token_logits = token_logits
        if token_bucket is not None and token_bucket < 1:
            raise DyditError(f"token_bucket must be positive, got {token_bucket}")
        self.token_bucket = token_bucket
        blocks = list(model.blocks)
        self.num_layers = len(blocks)
        self.num_heads = model.config.num_heads
        self.eps = float(blocks[0].norm1.eps)
        self.mlp_eps = float(blocks[0].norm2.eps)  # differs for diffusers-convention models
        self._attn_fn: Callable = attention_region
        self._mlp_fn: Callable = mlp_region
        # CUDA graphs (mode "reduce-overhead") must not copy the weights into static buffers per replay.
        self._static_weights = compile and "reduce-overhead" in (compile_mode or "")
        if compile:
            self._attn_fn = torch.compile(attention_region, dynamic=True, mode=compile_mode)
            self._mlp_fn = torch.compile(mlp_region, dynamic=True, mode=compile_mode)
        self.clear_cache()
        if plan_timesteps is not None:
            self.prepare(plan_timesteps)

    # caches -----------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget plans, weight packs and fused adaLN weights (call after changing the model's weights)."""
        self._plans: dict[float, StepPlan] = {}
        self._attn_packs: dict[tuple[int, bytes], AttnPack] = {}
        self._mlp_packs: dict[tuple[int, bytes], MlpPack] = {}
        self._adaln: tuple[Tensor, Tensor] | None = None
        self._routers: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] | None = None

    def _apply(self, fn, recurse=True):  # .to() / .half() / .cuda(): packs must follow the weights
        out = super()._apply(fn, recurse)
        self.clear_cache()
        return out

    def train(self, mode: bool = True) -> SlicedDyDiT:
        if mode:
            raise DyditError("the sliced engine is inference-only; train the DyDiT model itself")
        return super().train(False)

    def cache_info(self) -> dict[str, int]:
        """Numbers of cached step plans and packs, and the bytes held by sliced (non-shared) weights."""
        shared = {p.data_ptr() for p in self.model.parameters()}
        own = {
            w.data_ptr(): w.numel() * w.element_size()
            for pack in [*self._attn_packs.values(), *self._mlp_packs.values()]
            for w in vars(pack).values()
            if isinstance(w, Tensor) and w.data_ptr() not in shared
        }
        return {
            "plans": len(self._plans),
            "attn_packs": len(self._attn_packs),
            "mlp_packs": len(self._mlp_packs),
            "pack_bytes": sum(own.values()),
        }

    @torch.inference_mode()
    def prepare(self, timesteps: Iterable[float] | Tensor) -> None:
        """Build the step plans of these t values (one call of the width routers for all of them)."""
        t = torch.as_tensor(timesteps if isinstance(timesteps, Tensor) else list(timesteps)).flatten()
        keys = [float(v) for v in t.tolist()]
        new = [i for i, k in enumerate(keys) if k not in self._plans]
        if not new:
            return
        device = next(self.model.parameters()).device
        heads, groups = self._width_masks(t[new].to(device))  # (T, L, H) each
        heads, groups = heads.bool().cpu(), groups.bool().cpu()
        if heads.shape[1:] != (self.num_layers, self.num_heads) or groups.shape[1:] != heads.shape[1:]:
            raise DyditError(
                f"width masks must be (T, {self.num_layers}, {self.num_heads}), got {tuple(heads.shape)}"
            )
        for row, i in enumerate(new):
            attn, mlp = [], []
            for layer, block in enumerate(self.model.blocks):
                hk = (layer, heads[row, layer].numpy().tobytes())
                if hk not in self._attn_packs:
                    pack = slice_attention(block.attn.qkv, block.attn.proj, heads[row, layer])
                    self._attn_packs[hk] = self._mark_static(pack)
                gk = (layer, groups[row, layer].numpy().tobytes())
                if gk not in self._mlp_packs:
                    self._mlp_packs[gk] = self._mark_static(
                        slice_mlp(block.mlp.fc1, block.mlp.fc2, groups[row, layer])
                    )
                attn.append(self._attn_packs[hk])
                mlp.append(self._mlp_packs[gk])
            self._plans[keys[i]] = StepPlan(tuple(attn), tuple(mlp))

    def _mark_static(self, pack):
        """Tell torch.compile's CUDA graphs that these weights keep their address (no copy per replay)."""
        if self._static_weights:
            for w in vars(pack).values():
                if isinstance(w, Tensor):
                    torch._dynamo.mark_static_address(w)
        return pack

    def plan(self, t: float) -> StepPlan:
        """The step plan of one t value (built on first use)."""
        if float(t) not in self._plans:
            self.prepare([float(t)])
        return self._plans[float(t)]

    def _fused_adaln(self) -> tuple[Tensor, Tensor]:
        """All layers' adaLN linears stacked into one (L·6D, D) matmul; +1 folded into the scale biases."""
        if self._adaln is None:
            ws, bs = [], []
            for block in self.model.blocks:
                lin = block.adaLN_modulation[-1]
                bias = lin.bias.detach().clone().view(6, -1)
                bias[1] += 1  # 1 + scale_msa
                bias[4] += 1  # 1 + scale_mlp
                ws.append(lin.weight.detach())
                bs.append(bias.flatten())
            self._adaln = (torch.cat(ws).contiguous(), torch.cat(bs))
        return self._adaln

    def _router_packs(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor] | None]:
        """(w1, b1, w2, b2) of each block's SDT router MLP, or None where the block has none."""
        if self._routers is None:
            self._routers = []
            for block in self.model.blocks:
                head = getattr(getattr(block, "token_selection", None), "mlp_head", None)
                if head is None:
                    self._routers.append(None)
                    continue
                first, last = head[0], head[-1]
                router = (
                    first.weight.detach(),
                    first.bias.detach(),
                    last.weight.detach(),
                    last.bias.detach(),
                )
                if self._static_weights:
                    for w in router:
                        torch._dynamo.mark_static_address(w)
                self._routers.append(router)
        return self._routers

    # forward ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) or scalar, y (B,) -> (B, C_out, H, W), equal to the masked DyDiT."""
        if self.model.training:
            raise DyditError("the sliced engine is inference-only: call model.eval() first")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape[0] != x.shape[0] or y.shape[0] != x.shape[0]:
            raise DyditError(f"batch sizes differ: x {x.shape[0]}, t {t.shape[0]}, y {y.shape[0]}")
        values = t.detach().cpu()  # the one host sync of the call
        first = values[0]
        if bool((values == first).all()):
            return self._forward_one_t(x, t, y, float(first))
        # Samples with different t have different plans: run each group and reassemble.
        out = None
        for value in torch.unique(values):
            rows = (values == value).nonzero().flatten().to(x.device)
            part = self._forward_one_t(x[rows], t[rows], y[rows], float(value))
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out

    def _forward_one_t(self, x: Tensor, t: Tensor, y: Tensor, t_value: float) -> Tensor:
        model = self.model
        plan = self.plan(t_value)
        x = x.to(next(model.parameters()).dtype)
        tokens, c, _ = model.embed(x, t, y)  # (B, N, D), (B, D)
        tokens = tokens.contiguous()  # mlp_region views it as (B·N, D) rows
        b, n, d = tokens.shape
        w, bias = self._fused_adaln()
        mods = F.linear(F.silu(c), w, bias).view(b, self.num_layers, 6, d)  # (B, L, 6, D)
        record("adaLN", b * self.num_layers * formulas.linear_macs(1, d, 6 * d))
        routers = self._router_packs() if self._token_logits is None else [None] * self.num_layers
        hidden = model.config.mlp_hidden
        for layer in range(self.num_layers):
            ap, mp, mod = plan.attn[layer], plan.mlp[layer], mods[:, layer]
            tokens, h, logits = self._attn_fn(tokens, mod, *ap.args, self.eps, self.mlp_eps, routers[layer])
            record("attention", b * formulas.attention_macs(n, d, ap.num_heads, self.num_heads))
            if logits is None:
                logits = self._logits_eager(layer, tokens)
            if logits is not None and routers[layer] is not None:
                r = routers[layer][0].shape[0]  # D/16
                record("token_router", b * (formulas.linear_macs(n, d, r) + formulas.linear_macs(n, r, 1)))
            idx, sample, gate, rows = self._kept_rows(logits, mod[:, 5], n)
            if rows == 0:
                continue
            tokens = self._mlp_fn(tokens, h, idx, sample, gate, *mp.args)
            record("mlp", formulas.mlp_macs(rows, d, hidden, mp.num_groups, self.num_heads))
        return model.head(tokens, c)

    def _logits_eager(self, layer: int, x: Tensor) -> Tensor | None:
        if self._token_logits is not None:
            return self._token_logits(layer, x)
        block = self.model.blocks[layer]
        return block.token_logits(x) if hasattr(block, "token_logits") else None

    def _kept_rows(
        self, logits: Tensor | None, gate: Tensor, n: int
    ) -> tuple[Tensor | None, Tensor | None, Tensor, int]:
        """(idx, sample, gate, rows) for the MLP: rows of kept tokens in the flattened batch (§4.3)."""
        if logits is None:  # no token router: every token runs the MLP
            return None, None, gate, gate.shape[0] * n
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


# ``model.execution = "sliced"`` -------------------------------------------------------------------------
def _weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Storage and in-place version of every parameter: changes on load, optimiser step, .to(), ..."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _execution_forward(model: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """The ``"sliced"`` execution mode of DyDiT: a cached engine, rebuilt when the weights change."""
    if model.training:
        raise DyditError("execution 'sliced' is inference-only: call model.eval() first")
    engine, version = model.__dict__.get("_sliced_engine", (None, None))
    current = _weights_version(model)
    if engine is None or version != current:
        engine = SlicedDyDiT(model)
        # Kept outside the module tree (not a submodule), so state_dict() and .to() ignore it.
        model.__dict__["_sliced_engine"] = (engine, current)
    return engine(x, t, y)


def _register() -> None:
    from dydit.models.dydit import register_execution

    register_execution("sliced", _execution_forward)


_register()
