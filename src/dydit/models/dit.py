"""DiT: the static Diffusion Transformer (Peebles & Xie, arXiv 2212.09748; docs/METHOD.md §1).

State-dict compatible with the official checkpoints (``DiT-XL-2-256x256.pt``): same key names,
same shapes, strict loading. The network satisfies the project's one model contract,
``model(x, t, y) -> Tensor``, and knows nothing about diffusion or guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dydit.constants import LAYERNORM_EPS
from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
)
from dydit.presets import ModelConfig


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

    def __init__(self, config: ModelConfig):
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
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.initialize_weights()

    def make_block(self, index: int) -> nn.Module:
        """The block at depth ``index``; DyDiT overrides this to add routers."""
        c = self.config
        return DiTBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.mlp_norm_eps)

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

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p·p·C) -> (B, C, H, W)."""
        p, ch = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, ch)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], ch, h * p, w * p)
