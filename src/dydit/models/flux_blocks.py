"""FLUX's two block types with the backbone contract (docs/METHOD.md §15, docs/ARCHITECTURE.md §7.2).

Key names are diffusers' (``norm1.linear``, ``attn.to_q``, ``attn.add_q_proj``, ``attn.to_out.0``,
``attn.to_add_out``, ``attn.norm_q``, ``ff.net.0.proj``, ``ff_context.net.2``; ``norm.linear``,
``proj_mlp``, ``proj_out``). Units (models/backbone.py):

- **double-stream block.** Head k: rows k·d..(k+1)·d−1 of to_q/to_k/to_v and add_q/add_k/add_v
  (both streams), the same columns of to_out.0 and to_add_out. MLP group j (G = number of heads, 4D/G
  channels each): rows of ff.net.0.proj and ff_context.net.0.proj, columns of ff.net.2 and
  ff_context.net.2. The routed stream x is the image after the attention residual; its MLP is the
  image FFN (skipped per token); ``finish`` runs the text FFN on every text token (width-routed).
- **single-stream block.** Head k: rows of to_q/to_k/to_v and columns k·d.. of proj_out (its
  attention part); MLP group j: rows of proj_mlp and columns D + j·4D/G.. of proj_out. The
  routed stream x is the image part of the block *input*: the MLP half computes the whole fused
  ``proj_out`` update (the attention contribution travels in h beside the MLP input), so a
  dropped image token keeps its input (DyFLUX's rule); ``finish`` gives the text tokens the full
  update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.models.backbone import UnitPart, Units, Weights, full_weights
from dydit.models.flux_layers import (
    FLUX_EPS,
    AdaNorm,
    FeedForward,
    FluxState,
    FluxTokenRouter,
    StackedLinear,
    gelu_mlp,
    joint_attention,
    layer_norm,
    project_heads,
)
from dydit.models.layers import modulate


class RMSNorm(nn.Module):
    """q/k RMSNorm parameters (key ``weight``, (d,)); applied by :func:`project_heads`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def _attention_module(dim: int, head_dim: int, joint: bool) -> nn.Module:
    attn = nn.Module()
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, nn.Linear(dim, dim))
    attn.norm_q, attn.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
    if joint:
        for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(attn, name, nn.Linear(dim, dim))
        attn.norm_added_q, attn.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        attn.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        attn.to_add_out = nn.Linear(dim, dim)
    return attn


def _values(x: Tensor, weight: Tensor, bias: Tensor | None, head_dim: int) -> Tensor:
    return F.linear(x, weight, bias).unflatten(-1, (-1, head_dim)).transpose(1, 2)


class FluxBlock(nn.Module):
    """What both block types share: the dense forward, FLOPs and the DyFLUX token router."""

    head_units: Units
    group_units: Units
    chunks: int  # modulation vectors per block

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dim = num_heads * head_dim
        self.mlp_hidden = 4 * self.dim
        self.routed_dim = self.dim

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        lin = self.modulation_linear
        record("adaLN", c.shape[0] * formulas.linear_macs(1, self.dim, lin.out_features))
        return self.split_modulation(F.linear(F.silu(c), lin.weight, lin.bias))

    def attention_macs(self, state: FluxState, count: int) -> int:
        s = state.img.shape[1] + state.txt.shape[1]
        return state.img.shape[0] * formulas.attention_macs(s, self.dim, count, self.num_heads)

    def mlp_macs(self, rows: int, count: int) -> int:
        return formulas.mlp_macs(rows, self.dim, self.mlp_hidden, count, self.group_units.count)

    def _record_text_mlp(self, txt: Tensor, weights: Weights, first: str) -> None:
        w = weights[first][0]
        count = 0 if w is None else w.shape[0] // self.group_units.size
        record("mlp_text", self.mlp_macs(txt.shape[0] * txt.shape[1], count))

    def make_token_router(self) -> nn.Module:
        """DyFLUX's token router (keys ``token_selection.linear_t/norm/router``)."""
        return FluxTokenRouter(self.dim)

    def token_context(self, state: FluxState, c: Tensor) -> tuple[Tensor, Tensor]:
        """What the token router reads beside x: the text stream as the state holds it, and temb."""
        return state.txt, c

    def forward(self, state: FluxState, c: Tensor) -> FluxState:
        """The dense block: every head, group and token."""
        mod = self.modulation(c)
        heads, groups = self.head_units, self.group_units
        record("attention", self.attention_macs(state, heads.count))
        state, x, h = self.attention_half(state, mod, full_weights(self, heads), heads.count, self.static)
        record("mlp", self.mlp_macs(h.shape[0] * h.shape[1], groups.count))
        gw = full_weights(self, groups)
        x = x + self.mlp_gate(mod).unsqueeze(1) * self.mlp_half(h, gw)
        return self.finish(state, x, mod, gw, None)

    finish_uses_groups = True  # finish(state, x, mod, group weights, group mask): width-routed text MLP
    dense_forward = True  # forward(state, c) is the dense layer on the seam's state (step caching)

    @staticmethod
    def modulated_input(state: FluxState, mod: Sequence[Tensor], static) -> Tensor:
        """The image stream's normalised, modulated input to attention (B, N, D): TeaCache's indicator
        (docs/METHOD.md §19); both block types modulate it with mod[0], mod[1]."""
        return modulate(layer_norm(state.img), mod[0], mod[1])


class FluxDoubleBlock(FluxBlock):
    """diffusers' FluxTransformerBlock (double-stream), with the backbone contract."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__(num_heads, head_dim)
        d = self.dim
        self.norm1, self.norm1_context = AdaNorm(d, 6), AdaNorm(d, 6)
        self.attn = _attention_module(d, head_dim, joint=True)
        self.ff, self.ff_context = FeedForward(d, self.mlp_hidden), FeedForward(d, self.mlp_hidden)
        qkv = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        self.head_units = Units(
            num_heads,
            head_dim,
            (
                *(UnitPart(f"attn.{n}", 0) for n in qkv),
                UnitPart("attn.to_out.0", 1),
                UnitPart("attn.to_add_out", 1),
            ),
        )
        parts = [(f"{s}.net.0.proj", 0) for s in ("ff", "ff_context")] + [
            (f"{s}.net.2", 1) for s in ("ff", "ff_context")
        ]
        self.group_units = Units(
            num_heads, self.mlp_hidden // num_heads, tuple(UnitPart(p, dim) for p, dim in parts)
        )

    @property
    def modulation_linear(self) -> StackedLinear:
        """norm1.linear and norm1_context.linear read as one Linear(D, 12D)."""
        return StackedLinear(self.norm1.linear, self.norm1_context.linear)

    @staticmethod
    def split_modulation(raw: Tensor) -> tuple[Tensor, ...]:
        """Image: shift, scale, gate (attention), shift, scale, gate (MLP); then the same for text."""
        return raw.chunk(12, dim=-1)

    @property
    def static(self) -> tuple[Tensor, ...]:
        a = self.attn
        return (a.norm_q.weight, a.norm_k.weight, a.norm_added_q.weight, a.norm_added_k.weight)

    @staticmethod
    def attention_half(
        state: FluxState, mod: Sequence[Tensor], w: Weights, count: int, static, head_mask=None
    ):
        """Joint attention (text first) of ``count`` heads and both attention residuals; x is the
        image stream after them and h its modulated norm2 (the image FFN's input)."""
        img, txt = state.img, state.txt
        nq, nk, naq, nak = static
        hi = modulate(layer_norm(img), mod[0], mod[1])
        ht = modulate(layer_norm(txt), mod[6], mod[7])
        if w["attn.to_q"][0] is None:  # no head: each stream's branch is its projection's bias
            ai = w["attn.to_out.0"][1].expand_as(img)
            at = w["attn.to_add_out"][1].expand_as(txt)
        else:
            d = nq.shape[0]
            q = torch.cat(
                [
                    project_heads(ht, *w["attn.add_q_proj"], naq, FLUX_EPS),
                    project_heads(hi, *w["attn.to_q"], nq, FLUX_EPS),
                ],
                2,
            )
            k = torch.cat(
                [
                    project_heads(ht, *w["attn.add_k_proj"], nak, FLUX_EPS),
                    project_heads(hi, *w["attn.to_k"], nk, FLUX_EPS),
                ],
                2,
            )
            v = torch.cat([_values(ht, *w["attn.add_v_proj"], d), _values(hi, *w["attn.to_v"], d)], 2)
            o = joint_attention(q, k, v, state.rope, head_mask)
            n_txt = txt.shape[1]
            at = F.linear(o[:, :n_txt], *w["attn.to_add_out"])
            ai = F.linear(o[:, n_txt:], *w["attn.to_out.0"])
        img = img + mod[2].unsqueeze(1) * ai
        txt = txt + mod[8].unsqueeze(1) * at
        return state._replace(img=img, txt=txt), img, modulate(layer_norm(img), mod[3], mod[4])

    @staticmethod
    def mlp_half(h: Tensor, w: Weights, group_mask: Tensor | None = None) -> Tensor:
        """The image FFN on rows of h."""
        u = gelu_mlp(h, *w["ff.net.0.proj"], group_mask)
        w2, b2 = w["ff.net.2"]
        return b2.expand(*h.shape[:-1], b2.shape[0]) if u is None else F.linear(u, w2, b2)

    @staticmethod
    def mlp_gate(mod: Sequence[Tensor]) -> Tensor:
        return mod[5]

    def finish(self, state: FluxState, x: Tensor, mod: Sequence[Tensor], weights: Weights, group_mask=None):
        """x (the image after its token skip) back into the state; the text FFN runs on every text token."""
        txt = state.txt
        self._record_text_mlp(txt, weights, "ff_context.net.0.proj")
        u = gelu_mlp(
            modulate(layer_norm(txt), mod[9], mod[10]), *weights["ff_context.net.0.proj"], group_mask
        )
        w2, b2 = weights["ff_context.net.2"]
        update = b2.expand_as(txt) if u is None else F.linear(u, w2, b2)
        return state._replace(img=x, txt=txt + mod[11].unsqueeze(1) * update)


class FluxSingleBlock(FluxBlock):
    """diffusers' FluxSingleTransformerBlock (single-stream), with the backbone contract."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__(num_heads, head_dim)
        d = self.dim
        self.norm = AdaNorm(d, 3)
        self.proj_mlp = nn.Linear(d, self.mlp_hidden)
        self.proj_out = nn.Linear(d + self.mlp_hidden, d)
        self.attn = _attention_module(d, head_dim, joint=False)
        qkv = (UnitPart(f"attn.{n}", 0) for n in ("to_q", "to_k", "to_v"))
        self.head_units = Units(num_heads, head_dim, (*qkv, UnitPart("proj_out", 1)))
        self.group_units = Units(
            num_heads, self.mlp_hidden // num_heads, (UnitPart("proj_mlp", 0), UnitPart("proj_out", 1, d))
        )

    @property
    def modulation_linear(self) -> nn.Linear:
        return self.norm.linear

    @staticmethod
    def split_modulation(raw: Tensor) -> tuple[Tensor, ...]:
        """shift, scale, gate."""
        return raw.chunk(3, dim=-1)

    @property
    def static(self) -> tuple[Tensor, ...]:
        return (self.attn.norm_q.weight, self.attn.norm_k.weight)

    @staticmethod
    def attention_half(
        state: FluxState, mod: Sequence[Tensor], w: Weights, count: int, static, head_mask=None
    ):
        """Attention of ``count`` heads over the joint sequence and its part of proj_out (no bias).

        Returns x = the image tokens as they came in (a dropped token keeps them), h = [modulated
        norm, attention contribution] (B, N, 2D) of the image tokens, and the text rows of the same
        in ``state.pending`` for ``finish``.
        """
        img, txt = state.img, state.txt
        nq, nk = static
        joint = torch.cat([txt, img], 1)
        hj = modulate(layer_norm(joint), mod[0], mod[1])
        if w["attn.to_q"][0] is None:
            a = torch.zeros_like(joint)
        else:
            d = nq.shape[0]
            q = project_heads(hj, *w["attn.to_q"], nq, FLUX_EPS)
            k = project_heads(hj, *w["attn.to_k"], nk, FLUX_EPS)
            o = joint_attention(q, k, _values(hj, *w["attn.to_v"], d), state.rope, head_mask)
            a = F.linear(o, w["proj_out"][0][:, : o.shape[-1]])
        h = torch.cat([hj, a], -1)
        n_txt = txt.shape[1]
        return state._replace(pending=h[:, :n_txt]), img, h[:, n_txt:]

    @staticmethod
    def mlp_half(h: Tensor, w: Weights, group_mask: Tensor | None = None) -> Tensor:
        """The fused output projection on rows of h = [MLP input, attention contribution]:
        proj_out's MLP columns over GELU(proj_mlp(.)), its bias, plus the attention part."""
        d = h.shape[-1] // 2
        hn, a = h[..., :d], h[..., d:]
        u = gelu_mlp(hn, *w["proj_mlp"], group_mask)
        wo, bo = w["proj_out"]
        if u is None:
            return a + bo
        return F.linear(u, wo[:, wo.shape[1] - u.shape[-1] :], bo) + a

    @staticmethod
    def mlp_gate(mod: Sequence[Tensor]) -> Tensor:
        return mod[2]

    def finish(self, state: FluxState, x: Tensor, mod: Sequence[Tensor], weights: Weights, group_mask=None):
        """x back into the state; the text tokens get their full fused update."""
        txt = state.txt
        self._record_text_mlp(txt, weights, "proj_mlp")
        update = self.mlp_half(state.pending, weights, group_mask)
        return state._replace(img=x, txt=txt + mod[2].unsqueeze(1) * update, pending=None)
