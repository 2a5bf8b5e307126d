"""DiT: the static Diffusion Transformer (Peebles & Xie, arXiv 2212.09748; docs/METHOD.md §1).

State-dict compatible with the official checkpoints (``DiT-XL-2-256x256.pt``): same key names,
same shapes, strict loading. The network satisfies the project's one model contract,
``model(x, t, y) -> Tensor``, and knows nothing about diffusion or guidance. It also implements
the backbone contract of models/backbone.py, through which the DyDiT method reaches it: its
units (heads, MLP groups), functional halves, modulation, FLOPs table and checkpoint key names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.constants import LAYERNORM_EPS
from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.models.backbone import UnitPart, Units, Weights
from dydit.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    mlp,
    modulate,
    sincos_pos_embed_2d,
)
from dydit.presets import ModelConfig

# Checkpoint key names the loaders read shapes from (official DiT / DyDiT / SiT files).
KEYS = {
    "patch": "x_embedder.proj.weight",
    "positions": "pos_embed",
    "labels": "y_embedder.embedding_table.weight",
    "output": "final_layer.linear.weight",
    "mlp_in": "blocks.0.mlp.fc1.weight",
    "block": "blocks.",
}


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (docs/METHOD.md §1.2 item 6)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_hidden: int, mlp_norm_eps: float = LAYERNORM_EPS
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYERNORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        # Official DiT: 1e-6 like norm1; diffusers' DiT uses its config's norm_eps here (ModelConfig).
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        # Index 1 of the Sequential is the Linear: official key ``adaLN_modulation.1.*``.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    @property
    def modulation_linear(self) -> nn.Linear:
        """The Linear(D, 6D) that maps SiLU(c) to the six adaLN vectors (key ``adaLN_modulation.1``)."""
        return self.adaLN_modulation[-1]

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, D)."""
        d = c.shape[1]
        record("adaLN", c.shape[0] * formulas.linear_macs(1, d, 6 * d))
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x

    # The backbone contract (models/backbone.py); sizes never change, so units are made once. -------
    dense_forward = True  # forward(state, c) is the dense layer on the seam's state (step caching)

    @staticmethod
    def modulated_input(x: Tensor, mod: Sequence[Tensor], static: tuple[float, float]) -> Tensor:
        """What attention reads: LayerNorm(x) modulated by (shift_msa, scale_msa), (B, N, D) (TeaCache's
        indicator, docs/METHOD.md §19)."""
        return modulate(F.layer_norm(x, (x.shape[-1],), eps=static[0]), mod[0], mod[1])

    @functools.cached_property
    def head_units(self) -> Units:
        """Head h: rows h·d..(h+1)·d-1 of each of the q, k, v blocks of ``qkv``, columns of ``proj``."""
        d, width = self.attn.head_dim, self.attn.proj.out_features
        parts = (*(UnitPart("attn.qkv", 0, i * width) for i in range(3)), UnitPart("attn.proj", 1))
        return Units(self.attn.num_heads, d, parts)

    @functools.cached_property
    def group_units(self) -> Units:
        """H MLP groups: group j is ``fc1`` rows j·g..(j+1)·g-1 and the same ``fc2`` columns, g = hidden/H."""
        hidden, groups = self.mlp.fc1.out_features, self.attn.num_heads
        if hidden % groups:
            raise DyditError(f"MLP hidden size {hidden} is not divisible into {groups} groups")
        return Units(groups, hidden // groups, (UnitPart("mlp.fc1", 0), UnitPart("mlp.fc2", 1)))

    @functools.cached_property
    def static(self) -> tuple[float, float]:
        """(eps before attention, eps before the MLP): the plain numbers the halves take."""
        return float(self.norm1.eps), float(self.norm2.eps)

    @property
    def routed_dim(self) -> int:
        return self.attn.proj.out_features

    @staticmethod
    def split_modulation(raw: Tensor) -> tuple[Tensor, ...]:
        """The output (B, 6D) of :attr:`modulation_linear` as the six adaLN vectors, each (B, D)."""
        return raw.chunk(6, dim=-1)

    @staticmethod
    def attention_half(
        x: Tensor,
        mod: Sequence[Tensor],
        weights: Weights,
        count: int,
        static: tuple[float, float],
        head_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The block up to the MLP with ``count`` heads' weights: (x after attention, x, MLP input h).

        x (B, N, D); ``head_mask`` (B, H) when the weights hold all heads. With no head the branch
        is gate_msa·proj.bias (docs/METHOD.md §3.5 item 2).
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, _ = mod
        eps, mlp_eps = static
        d = x.shape[-1]
        h = modulate(F.layer_norm(x, (d,), eps=eps), shift_msa, scale_msa)
        a = attention(h, *weights["attn.qkv"], *weights["attn.proj"], count, head_mask)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), a)  # (B, N, D)
        return x, x, modulate(F.layer_norm(x, (d,), eps=mlp_eps), shift_mlp, scale_mlp)

    @staticmethod
    def mlp_half(h: Tensor, weights: Weights, group_mask: Tensor | None = None) -> Tensor:
        """The MLP update (before its gate) of rows h (..., D) with the given groups' weights."""
        return mlp(h, *weights["mlp.fc1"], *weights["mlp.fc2"], group_mask)

    @staticmethod
    def mlp_gate(mod: Sequence[Tensor]) -> Tensor:
        return mod[5]

    def finish(self, state: Tensor, x: Tensor, mod: Sequence[Tensor]) -> Tensor:
        """Nothing of a DiT block is left after its routed MLP."""
        return x

    def attention_macs(self, x: Tensor, count: int) -> int:
        b, n, d = x.shape
        return b * formulas.attention_macs(n, d, count, self.attn.num_heads)

    def mlp_macs(self, rows: int, count: int) -> int:
        fc1 = self.mlp.fc1
        return formulas.mlp_macs(rows, fc1.in_features, fc1.out_features, count, self.attn.num_heads)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map to p·p·C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYERNORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, d = x.shape
        record(
            "final_layer",
            b * (formulas.linear_macs(1, d, 2 * d) + formulas.linear_macs(n, d, self.linear.out_features)),
        )
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p·p·C_out)


class DiT(nn.Module):
    """Diffusion Transformer. ``forward(x, t, y)``: x (B, C, H, W), t (B,), y (B,) -> (B, C_out, H, W)."""

    def __init__(self, config: ModelConfig, on_block: Callable[[nn.Module], None] | None = None):
        """``on_block`` is called on each new block before the next is built (DyDiT adds its routers)."""
        super().__init__()
        self.config = config
        c = config
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.num_heads = c.num_heads

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, freq_shift=c.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        # Frozen sin-cos table; a Parameter (not a buffer) so that the official key ``pos_embed`` exists.
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(self.make_block(i, on_block) for i in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.initialize_weights()

    def make_block(self, index: int, on_block: Callable[[nn.Module], None] | None = None) -> DiTBlock:
        """The block at depth ``index``, passed to ``on_block`` first."""
        c = self.config
        block = DiTBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.mlp_norm_eps)
        if on_block is not None:
            on_block(block)
        return block

    def initialize_weights(self) -> None:
        """DiT initialisation (docs/METHOD.md §1.2): Xavier linears, frozen sin-cos table, adaLN-Zero."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = self.config.input_size // self.config.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid).unsqueeze(0))
        # Patch embedding initialised like a linear layer on the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation_linear.weight)
            nn.init.zeros_(block.modulation_linear.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # The forward pass, split in three so that DyDiT and the sliced engine reuse the ends. -----
    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns tokens (B, N, D), conditioning c = E_t + E_y (B, D) and E_t (B, D)."""
        if x.shape[-1] != self.config.input_size or x.shape[-2] != self.config.input_size:
            size = self.config.input_size
            raise ValueError(f"expected inputs of size {size}x{size}, got {tuple(x.shape)}")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        # Row-major (B, N, D): the patch embedding's transposed layout would slow every matmul after it.
        tokens = (self.x_embedder(x) + self.pos_embed).contiguous()  # (B, N, D)
        t_emb = self.t_embedder(t)  # (B, D)
        c = t_emb + self.y_embedder(y, self.training)  # (B, D)
        return tokens, c, t_emb

    def head(self, tokens: Tensor, c: Tensor) -> Tensor:
        """Final layer and unpatchify: (B, N, D) -> (B, C_out, H, W)."""
        return self.unpatchify(self.final_layer(tokens, c))

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        tokens, c, _ = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens, c)

    # The backbone contract (models/backbone.py) ---------------------------------------------------
    def width_embedding(self, t: Tensor) -> Tensor:
        """What the width routers read, from t (T,) alone: E_t (T, D) (docs/METHOD.md §3.1)."""
        return self.t_embedder(t)

    @property
    def width_dim(self) -> int:
        return self.config.hidden_size

    @property
    def routed_tokens(self) -> int:
        return self.config.num_tokens

    def macs_table(self) -> dict[str, int]:
        """Per-sample MACs of the complete forward by component (docs/METHOD.md §1.1)."""
        return formulas.config_macs_table(self.config)

    def layer_costs(self) -> tuple[int, int]:
        """Per-layer (A, M): attention and MLP MACs of the complete layer (docs/METHOD.md §5.3)."""
        c = self.config
        return formulas.layer_costs(c.num_tokens, c.hidden_size, c.mlp_ratio)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p·p·C) -> (B, C, H, W)."""
        p, ch = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, ch)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], ch, h * p, w * p)
