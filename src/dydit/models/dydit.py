"""DyDiT: DiT with timestep-wise dynamic width and spatial-wise dynamic tokens (arXiv 2410.03456).

METHOD.md §2 (overview), §3 (TDW), §4 (SDT), §12 (checkpoint format). Per block:

    heads  (B, H) <- attn_rate(E_t)                      # timestep only, never the class
    x      <- x + gate_msa * proj(heads ⊙ Attn_heads(modulate(LN1 x)))
    tokens (B, N) <- token_selection(x)                  # post-attention residual stream
    groups (B, H) <- mlp_rate(E_t)
    x      <- x + tokens ⊙ (gate_mlp * fc2(GELU(groups ⊙ fc1(modulate(LN2 x)))))

Execution is a named mode (``model.execution``): ``"dense"`` runs the complete DiT (routers
bypassed), ``"masked"`` (default) multiplies by 0/1 masks with static shapes (training and
reference inference). Further engines (``"sliced"``, models/sliced.py) register themselves with
:func:`register_execution`. ``forward`` always returns a Tensor; the routing statistics the FLOPs
loss needs come from :meth:`DyDiT.forward_with_routing`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dydit.constants import LAYERNORM_EPS, TOKEN_ROUTER_INIT_BIAS, WIDTH_ROUTER_INIT_BIAS
from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.models.dit import DiT, DiTBlock
from dydit.models.fitting import ROUTER_KEY_MARKERS, fit_state_dict
from dydit.models.layers import modulate
from dydit.models.routers import TokenRouter, WidthRouter
from dydit.presets import ModelConfig

# Built-in execution modes; other engines register a forward function under their own name.
BUILTIN_EXECUTIONS: tuple[str, ...] = ("dense", "masked")
_ENGINES: dict[str, Callable[[DyDiT, Tensor, Tensor, Tensor], Tensor]] = {}
_ENGINE_MODULES = {"sliced": "dydit.models.sliced"}  # imported on first use


def register_execution(name: str, forward: Callable[[DyDiT, Tensor, Tensor, Tensor], Tensor]) -> None:
    """Make ``model.execution = name`` run ``forward(model, x, t, y) -> Tensor``."""
    if name in BUILTIN_EXECUTIONS:
        raise ValueError(f"execution mode {name!r} is built in")
    _ENGINES[name] = forward


def execution_modes() -> tuple[str, ...]:
    """Names accepted by ``model.execution`` (built-in, registered and importable on demand)."""
    return BUILTIN_EXECUTIONS + tuple(sorted(set(_ENGINES) | set(_ENGINE_MODULES)))


@dataclass(frozen=True)
class RoutingStats:
    """Router decisions of one forward pass, 0/1 values (straight-through gradients in training).

    heads (B, L, H) and groups (B, L, H) include a forced index 0 as constant 1; tokens (B, L, N).
    """

    heads: Tensor
    groups: Tensor
    tokens: Tensor

    def detach(self) -> RoutingStats:
        return RoutingStats(self.heads.detach(), self.groups.detach(), self.tokens.detach())


@dataclass(frozen=True)
class WidthPlan:
    """Evaluation width masks for the timesteps a sampler uses (METHOD.md §3.5 step 1).

    timesteps (T,) long original timestep values; heads (T, L, H) and groups (T, L, H) bool.
    """

    timesteps: Tensor
    heads: Tensor
    groups: Tensor

    def lookup(self, t: int) -> tuple[Tensor, Tensor]:
        """(heads (L, H), groups (L, H)) for the original timestep value ``t``."""
        hits = (self.timesteps == int(t)).nonzero()
        if hits.numel() == 0:
            shown = self.timesteps.tolist()
            shown = shown if len(shown) <= 8 else [*shown[:4], "...", *shown[-4:]]
            raise DyditError(f"timestep {int(t)} is not in this width plan (planned: {shown})")
        i = int(hits[0, 0])
        return self.heads[i], self.groups[i]


class DyDiTBlock(DiTBlock):
    """A DiT block with a head router, an MLP-group router and a token router (METHOD.md §2).

    ``forward(x, c)`` is inherited: the dense, complete block. :meth:`forward_masked` is the
    dynamic block. Head h covers channels h·d..(h+1)·d-1 before ``proj``; MLP group j covers
    ``fc1`` outputs j·g..(j+1)·g-1 with g = mlp_hidden / H.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_hidden: int,
        layout: str = "forced_first",
        mlp_norm_eps: float = LAYERNORM_EPS,
    ):
        super().__init__(hidden_size, num_heads, mlp_hidden, mlp_norm_eps)
        if mlp_hidden % num_heads:
            raise DyditError(f"MLP hidden size {mlp_hidden} is not divisible into {num_heads} groups")
        self.num_heads = num_heads
        self.attn_rate = WidthRouter(hidden_size, num_heads, layout)  # TDW heads
        self.mlp_rate = WidthRouter(hidden_size, num_heads, layout)  # TDW MLP groups
        self.token_selection = TokenRouter(hidden_size)  # SDT

    def width_masks(self, t_emb: Tensor) -> tuple[Tensor, Tensor]:
        """0/1 head and group masks, each (B, H), for E_t (B, D); Gumbel + STE in training mode."""
        return self.attn_rate(t_emb), self.mlp_rate(t_emb)

    def token_logits(self, x: Tensor) -> Tensor:
        """Token-router logits (B, N) on the post-attention residual stream x (B, N, D)."""
        return self.token_selection.logits(x)

    def masked_attention(self, h: Tensor, heads: Tensor) -> Tensor:
        """Attention whose masked heads are zeroed before ``proj`` (proj.bias still added)."""
        o = self.attn.heads(h)  # (B, N, D), head-major
        b, n, d = o.shape
        m = heads.to(o.dtype)[:, None, :, None]  # (B, 1, H, 1)
        return self.attn.proj((o.reshape(b, n, self.num_heads, -1) * m).reshape(b, n, d))

    def masked_mlp(self, h: Tensor, groups: Tensor) -> Tensor:
        """MLP whose masked channel groups are zeroed before GELU (fc2.bias still added)."""
        b, n, d = h.shape
        a = self.mlp.fc1(h)  # (B, N, hidden)
        m = groups.to(a.dtype)[:, None, :, None]  # (B, 1, H, 1)
        a = (a.reshape(b, n, self.num_heads, -1) * m).reshape(b, n, -1)
        record("mlp", formulas.mlp_macs(b * n, d, a.shape[-1]))
        return self.mlp.fc2(self.mlp.act(a))  # (B, N, D)

    def forward_masked(
        self, x: Tensor, c: Tensor, heads: Tensor, groups: Tensor, tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Dynamic block. x (B, N, D), c (B, D), heads/groups (B, H); ``tokens`` (B, N) overrides
        the token router. Returns the new x (B, N, D) and the token mask (B, N)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        attn = self.masked_attention(modulate(self.norm1(x), shift_msa, scale_msa), heads)  # (B, N, D)
        x = x + gate_msa.unsqueeze(1) * attn
        if tokens is None:
            tokens = self.token_selection(x)  # (B, N)
        mlp = self.masked_mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), groups)  # (B, N, D)
        update = gate_mlp.unsqueeze(1) * mlp
        # A skipped token gets no MLP update at all, fc2.bias included (METHOD.md §4.2).
        return x + tokens.to(update.dtype).unsqueeze(-1) * update, tokens


class DyDiT(DiT):
    """Dynamic DiT; same official DiT key names plus router keys (METHOD.md §12).

    ``forward(x, t, y) -> Tensor`` in the mode ``self.execution``; build with
    ``create_model("DyDiT-S/2")`` or :meth:`from_dit`.
    """

    blocks: nn.ModuleList

    def __init__(self, config: ModelConfig):
        if not config.dynamic:
            config = config.replace(dynamic=True)
        super().__init__(config)
        self._execution = "masked"

    @property
    def router_layout(self) -> str:
        return self.config.router_layout

    def make_block(self, index: int) -> nn.Module:
        c = self.config
        return DyDiTBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.router_layout, c.mlp_norm_eps)

    def initialize_weights(self) -> None:
        """DiT init (Xavier router weights included), then router biases that keep everything on:
        sigmoid(15) and sigmoid(35) are 1 to float precision, so a fresh DyDiT computes its DiT."""
        super().initialize_weights()
        for block in self.blocks:
            nn.init.constant_(block.attn_rate.router.bias, WIDTH_ROUTER_INIT_BIAS)
            nn.init.constant_(block.mlp_rate.router.bias, WIDTH_ROUTER_INIT_BIAS)
            nn.init.constant_(block.token_selection.mlp_head[-1].bias, TOKEN_ROUTER_INIT_BIAS)

    @classmethod
    def from_dit(cls, dit: DiT, router_layout: str | None = None) -> DyDiT:
        """A DyDiT with ``dit``'s weights and freshly initialised routers (same device/dtype/mode)."""
        cfg = dit.config.replace(dynamic=True, router_layout=router_layout or dit.config.router_layout)
        model = cls(cfg)
        ref = next(dit.parameters())
        model.to(device=ref.device, dtype=ref.dtype)
        fit_state_dict(model, dit.state_dict(), allow_missing=ROUTER_KEY_MARKERS)
        return model.train(dit.training)

    # Execution modes -----------------------------------------------------------------------
    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in BUILTIN_EXECUTIONS and mode not in _ENGINES and mode in _ENGINE_MODULES:
            try:
                importlib.import_module(_ENGINE_MODULES[mode])
            except ImportError as e:
                raise DyditError(f"execution mode {mode!r} is not available ({e})") from None
        if mode not in BUILTIN_EXECUTIONS and mode not in _ENGINES:
            raise DyditError(f"unknown execution mode {mode!r}; valid modes: {', '.join(execution_modes())}")
        self._execution = mode

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) original timesteps, y (B,) labels -> (B, C_out, H, W)."""
        if self._execution == "dense":
            return super().forward(x, t, y)  # DyDiTBlock.forward is the complete DiT block
        if self._execution == "masked":
            return self.forward_with_routing(x, t, y)[0]
        return _ENGINES[self._execution](self, x, t, y)

    def forward_with_routing(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, RoutingStats]:
        """Masked forward pass plus the router decisions the FLOPs loss needs (METHOD.md §5.3)."""
        tokens, c, t_emb = self.embed(x, t, y)  # (B, N, D), (B, D), (B, D)
        heads, groups, keep = [], [], []
        for block in self.blocks:
            h, g = block.width_masks(t_emb)  # (B, H) each: width depends on E_t only
            tokens, k = block.forward_masked(tokens, c, h, g)  # (B, N, D), (B, N)
            heads.append(h)
            groups.append(g)
            keep.append(k)
        out = self.head(tokens, c)
        return out, RoutingStats(torch.stack(heads, 1), torch.stack(groups, 1), torch.stack(keep, 1))

    # Per-timestep width decisions (inference) ------------------------------------------------
    @torch.no_grad()
    def width_masks(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation head and group masks, each bool (T, L, H), for timesteps t (T,)."""
        t = torch.as_tensor(t, device=self.pos_embed.device).reshape(-1)
        t_emb = self.t_embedder(t)  # (T, D)
        heads = torch.stack([b.attn_rate.hard_mask(t_emb) for b in self.blocks], 1)
        groups = torch.stack([b.mlp_rate.hard_mask(t_emb) for b in self.blocks], 1)
        return heads, groups

    def width_plan(self, timesteps: Sequence[int] | Tensor) -> WidthPlan:
        """Width masks for every (original) timestep value a sampler will use."""
        ts = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).cpu()
        if ts.numel() == 0:
            raise DyditError("a width plan needs at least one timestep")
        heads, groups = self.width_masks(ts.to(self.pos_embed.device))
        return WidthPlan(ts, heads, groups)


@contextmanager
def execution(model: DyDiT, mode: str) -> Iterator[DyDiT]:
    """Run ``model`` in execution ``mode`` inside the block, restoring the previous mode after."""
    previous = model.execution
    model.execution = mode
    try:
        yield model
    finally:
        model.execution = previous
