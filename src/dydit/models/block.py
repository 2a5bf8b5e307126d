"""The DyDiT block: its dynamic computation, defined once (arXiv 2410.03456; docs/METHOD.md §2, §3.3, §4.2).

Per block, with the six adaLN vectors of c = E_t + E_y:

    x      <- x + gate_msa * Attn_I(modulate(LN1 x))      # active heads I (TDW)
    logits <- token_router(x)                             # post-attention residual stream (SDT)
    h      <- modulate(LN2 x)
    x      <- x + keep ⊙ (gate_mlp * MLP_J(h))            # active groups J; skipped tokens: no update

:func:`attention_half` (the first three lines) and :func:`token_skip` (the last) are functions of
tensors. :class:`DyDiTBlock` runs them with its full weights and 0/1 masks (the masked block: static
shapes, differentiable, used in training). The sliced engine (models/sliced.py) runs the same
:func:`attention_half` with the weights of the active heads only and computes the last line on the
gathered kept tokens with the weights of the active groups, which changes the work, not the result.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from dydit.constants import LAYERNORM_EPS
from dydit.errors import DyditError
from dydit.models.backbone import full_weights
from dydit.models.dit import DiTBlock
from dydit.models.routers import TokenRouter, WidthRouter, gumbel_sigmoid


def token_skip(x: Tensor, tokens: Tensor, gate_mlp: Tensor, update: Tensor) -> Tensor:
    """x + tokens ⊙ (gate_mlp · update): a skipped token gets no MLP update at all, fc2.bias
    included (docs/METHOD.md §4.2). x, update (B, N, D); tokens (B, N) 0/1; gate_mlp (B, D)."""
    update = gate_mlp.unsqueeze(1) * update
    return x + tokens.to(update.dtype).unsqueeze(-1) * update


class DyDiTBlock(DiTBlock):
    """A DiT block with a head router, an MLP-group router and a token router (docs/METHOD.md §2).

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

    def hard_width_masks(self, t_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation head and group masks, each bool (B, H), whatever the module's mode."""
        return self.attn_rate.hard_mask(t_emb), self.mlp_rate.hard_mask(t_emb)

    def token_logits(self, x: Tensor) -> Tensor:
        """Token-router logits (B, N) on the post-attention residual stream x (B, N, D)."""
        return self.token_selection.logits(x)

    def masked_attention(self, h: Tensor, heads: Tensor) -> Tensor:
        """Attention whose masked heads are zeroed before ``proj`` (proj.bias still added)."""
        return self.attn(h, head_mask=heads)  # (B, N, D)

    def masked_mlp(self, h: Tensor, groups: Tensor) -> Tensor:
        """MLP whose masked channel groups are zeroed before GELU (fc2.bias still added)."""
        return self.mlp(h, group_mask=groups)  # (B, N, D)

    def forward_masked(
        self,
        x: Tensor,
        c: Tensor,
        heads: Tensor,
        groups: Tensor,
        tokens: Tensor | None = None,
        token_logits: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Dynamic block. x (B, N, D), c (B, D), heads/groups (B, H) 0/1.

        ``tokens`` (B, N) overrides the token decisions; ``token_logits`` (x (B, N, D) -> (B, N))
        replaces the token router's logits. Returns the new x (B, N, D) and the token mask (B, N).
        """
        mod = self.modulation(c)
        self.attn.record_macs(x)
        weights = full_weights(self, self.head_units)
        x, _, h = self.attention_half(x, mod, weights, self.num_heads, self.static, heads)
        if tokens is None:
            logits = self.token_logits(x) if token_logits is None else token_logits(x)
            tokens = gumbel_sigmoid(logits, self.token_selection.training)  # (B, N)
        return token_skip(x, tokens, mod[5], self.masked_mlp(h, groups)), tokens
