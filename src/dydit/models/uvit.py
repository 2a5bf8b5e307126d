"""U-ViT (Bao et al., CVPR 2023, "All are Worth Words"; docs/METHOD.md §16), on the backbone seam.

Time and class enter as tokens: the stream is [class token,] time token, image tokens (official
order), plus a learned position table over all of them. Blocks are pre-norm (affine LayerNorms, no
adaLN) with long skips: ``depth // 2`` in-blocks, a mid-block and ``depth // 2`` out-blocks, the i-th
out-block first mapping [x; output of the matching in-block] (2D) to D with ``skip_linear``. The
head is a LayerNorm, ``decoder_pred`` on every token, unpatchify of the image tokens and an optional
3×3 convolution. Module and parameter names are the official ones (``patch_embed.proj``,
``time_embed.0``/``.2``, ``label_emb``, ``pos_embed``, ``in_blocks.i``, ``mid_block``,
``out_blocks.i.skip_linear``, ``norm``, ``decoder_pred``, ``final_layer``), so the released
``.pth`` files load strictly; ``forward(x, timesteps, y)`` is the official one.

The backbone contract (models/backbone.py, docs/ARCHITECTURE.md §7): ``blocks`` is every block in
forward order (not registered: the official keys stay); the state is (stream, skips, extras' MLP
input); a block's "modulation" is its own fixed tensors (the norms' affine parameters and the skip
linear; there is no adaLN, so ``modulation_linear`` has no outputs); the routed stream x is the image
tokens only, so the token router never sees the time and class tokens, whose MLP runs complete in
``finish`` (like the text stream of an MMDiT); the width routers read the time token's embedding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import record
from dydit.models.backbone import UnitPart, Units, Weights
from dydit.models.layers import TimestepEmbedder, attention
from dydit.models.uvit_layers import (
    Attention,
    LabelDropout,
    Mlp,
    NoModulation,
    PatchEmbed,
    UViTMod,
    UViTState,
    uvit_mlp,
)
from dydit.presets import UViTConfig

# Checkpoint key names the loaders read shapes from (official U-ViT files).
UVIT_KEYS = {
    "patch": "patch_embed.proj.weight",
    "positions": "pos_embed",
    "labels": "label_emb.weight",
    "output": "decoder_pred.weight",
    "mlp_in": "in_blocks.0.mlp.fc1.weight",
    "in_block": "in_blocks.",
    "skip": "out_blocks.0.skip_linear.weight",
    "time_mlp": "time_embed.0.weight",
    "conv": "final_layer.weight",
}
LN_EPS = 1e-5  # nn.LayerNorm's default, as the official blocks use


class UViTBlock(nn.Module):
    """Pre-norm block; an out-block first merges its long skip: x <- skip_linear([x; skip])."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, skip: bool, extras: int, tokens: int
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.pushes = False  # an in-block: its output is kept for an out-block (set by UViT)
        self.use_checkpoint = False
        self.extras, self.tokens = extras, tokens  # E and E + N, for the MACs it records

    # The dense block: the official computation --------------------------------------------------
    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        b, n, d = x.shape
        if self.skip_linear is not None:
            record("skip_linear", b * formulas.linear_macs(n, 2 * d, d))
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        q, p = self.attn.qkv, self.attn.proj
        record("attention", self.attention_macs(x, self.attn.num_heads))
        x = x + attention(self.norm1(x), q.weight, q.bias, p.weight, p.bias, self.attn.num_heads)
        record("mlp", self.mlp_macs(b * (n - self.extras), self.attn.num_heads))
        record("mlp_extras", self.mlp_macs(b * self.extras, self.attn.num_heads))
        f1, f2 = self.mlp.fc1, self.mlp.fc2
        return x + uvit_mlp(self.norm2(x), f1.weight, f1.bias, f2.weight, f2.bias)

    # The backbone contract (models/backbone.py) ---------------------------------------------------
    @functools.cached_property
    def head_units(self) -> Units:
        """Head h: rows h·d..(h+1)·d-1 of each of the q, k, v blocks of ``qkv``, columns of ``proj``."""
        d, width = self.attn.head_dim, self.attn.proj.out_features
        parts = (*(UnitPart("attn.qkv", 0, i * width) for i in range(3)), UnitPart("attn.proj", 1))
        return Units(self.attn.num_heads, d, parts)

    @functools.cached_property
    def group_units(self) -> Units:
        """H MLP groups: rows of ``fc1`` and the same columns of ``fc2``, hidden/H each."""
        hidden, groups = self.mlp.fc1.out_features, self.attn.num_heads
        if hidden % groups:
            raise DyditError(f"MLP hidden size {hidden} is not divisible into {groups} groups")
        return Units(groups, hidden // groups, (UnitPart("mlp.fc1", 0), UnitPart("mlp.fc2", 1)))

    static = (LN_EPS,)

    @property
    def routed_dim(self) -> int:
        return self.attn.proj.out_features

    @property
    def modulation_linear(self) -> NoModulation:
        w = self.norm1.weight
        return NoModulation(w.new_empty(0, w.shape[0]), w.new_empty(0))

    def split_modulation(self, raw: Tensor) -> UViTMod:
        """The block's own tensors; ``raw`` (B, 0) only gives the batch. Records the skip's MACs."""
        skip = self.skip_linear
        if skip is not None:
            d = skip.out_features
            record("skip_linear", raw.shape[0] * formulas.linear_macs(self.tokens, 2 * d, d))
        return UViTMod(
            None if skip is None else skip.weight,
            None if skip is None else skip.bias,
            (self.norm1.weight, self.norm1.bias),
            (self.norm2.weight, self.norm2.bias),
            raw.new_ones(raw.shape[0], 1),
        )

    def modulation(self, c: Tensor) -> UViTMod:
        return self.split_modulation(c[:, :0])

    @staticmethod
    def attention_half(
        state: UViTState,
        mod: UViTMod,
        weights: Weights,
        count: int,
        static: tuple[float],
        head_mask: Tensor | None = None,
    ) -> tuple[UViTState, Tensor, Tensor]:
        """Skip merge and attention with ``count`` heads' weights over every token; returns the state
        (whose stream holds the time/class tokens' values and their MLP input), the image tokens x
        (B, N, D) and their MLP input h (B, N, D)."""
        (eps,) = static
        x, skips, e = state
        d = x.shape[-1]
        if mod.skip_weight is not None:
            x = F.linear(torch.cat([x, skips[-1]], dim=-1), mod.skip_weight, mod.skip_bias)
            skips = skips[:-1]
        h = F.layer_norm(x, (d,), *mod.norm1, eps)
        x = x + attention(h, *weights["attn.qkv"], *weights["attn.proj"], count, head_mask)
        h = F.layer_norm(x, (d,), *mod.norm2, eps)
        # The extras' MLP input rides in the state's stream beside their values (finish uses both).
        return UViTState(torch.cat([x[:, :e], h[:, :e]], 1), skips, e), x[:, e:], h[:, e:]

    @staticmethod
    def modulated_input(state: UViTState, mod: UViTMod, static: tuple[float]) -> Tensor:
        """The normalised input of an in-block's attention (B, E + N, D): TeaCache's indicator
        (docs/METHOD.md §19; read from the first block, which merges no skip)."""
        return F.layer_norm(state.tokens, (state.tokens.shape[-1],), *mod.norm1, static[0])

    @staticmethod
    def mlp_half(h: Tensor, weights: Weights, group_mask: Tensor | None = None) -> Tensor:
        return uvit_mlp(h, *weights["mlp.fc1"], *weights["mlp.fc2"], group_mask)

    @staticmethod
    def mlp_gate(mod: UViTMod) -> Tensor:
        return mod.gate

    finish_uses_complete_mlp = True  # the sliced engine passes the TD-LoRA-merged MLP (METHOD §18)

    def finish(self, state: UViTState, x: Tensor, mod: UViTMod, weights: Weights | None = None) -> UViTState:
        """The time/class tokens' MLP (complete, never routed), then the stream is whole again; an
        in-block's output is pushed for its out-block. ``weights``: the complete MLP's weights to use
        instead of the block's own (the sliced engine's, with a TD-LoRA adapter merged)."""
        head, skips, e = state
        extras, h = head[:, :e], head[:, e:]
        record("mlp_extras", formulas.mlp_macs(h.shape[0] * e, h.shape[-1], self.mlp.fc1.out_features))
        if weights is None:
            f1, f2 = self.mlp.fc1, self.mlp.fc2
            weights = {"mlp.fc1": (f1.weight, f1.bias), "mlp.fc2": (f2.weight, f2.bias)}
        extras = extras + uvit_mlp(h, *weights["mlp.fc1"], *weights["mlp.fc2"])
        tokens = torch.cat([extras, x], dim=1)
        return UViTState(tokens, (*skips, tokens) if self.pushes else skips, e)

    def attention_macs(self, state: UViTState | Tensor, count: int) -> int:
        x = state.tokens if isinstance(state, UViTState) else state
        b, n, d = x.shape
        return b * formulas.attention_macs(n, d, count, self.attn.num_heads)

    def mlp_macs(self, rows: int, count: int) -> int:
        fc1 = self.mlp.fc1
        return formulas.mlp_macs(rows, fc1.in_features, fc1.out_features, count, self.attn.num_heads)


class UViT(nn.Module):
    """``forward(x, timesteps, y=None)``: x (B, C, H, W), timesteps (B,) as the process hands them
    (999·t or 1..1000), y (B,) labels or None -> ε̂ (B, C, H, W). An unconditional model ignores y;
    in training mode a conditional one drops labels to the null class with ``class_dropout_prob``."""

    def __init__(self, config: UViTConfig, on_block: Callable[[nn.Module], None] | None = None):
        super().__init__()
        self.config = c = config
        d = c.hidden_size
        self.num_heads, self.patch_size, self.in_channels = c.num_heads, c.patch_size, c.in_channels
        self.out_channels, self.extras = c.in_channels, c.extras
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, d)
        if c.mlp_time_embed:
            self.time_embed = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        else:
            self.time_embed = nn.Identity()
        if c.label_rows:
            self.label_emb = nn.Embedding(c.label_rows, d)
        self.__dict__["y_embedder"] = LabelDropout(c.num_classes, c.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.extras + c.num_tokens, d))
        half = c.depth // 2
        self.in_blocks = nn.ModuleList(self._block(False, on_block) for _ in range(half))
        self.mid_block = self._block(False, on_block)
        self.out_blocks = nn.ModuleList(self._block(c.skip, on_block) for _ in range(half))
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, c.patch_size**2 * c.in_channels)
        self.final_layer = nn.Conv2d(c.in_channels, c.in_channels, 3, padding=1) if c.conv else nn.Identity()
        for block in self.in_blocks:
            block.pushes = c.skip
        # Every block in forward order, for the method; kept out of the registry (official keys only).
        self.__dict__["blocks"] = nn.ModuleList([*self.in_blocks, self.mid_block, *self.out_blocks])
        self.initialize_weights()

    def _block(self, skip: bool, on_block: Callable[[nn.Module], None] | None) -> UViTBlock:
        c = self.config
        block = UViTBlock(
            c.hidden_size, c.num_heads, c.mlp_hidden, c.qkv_bias, skip, c.extras, c.extras + c.num_tokens
        )
        block.use_checkpoint = c.use_checkpoint
        if on_block is not None:
            on_block(block)
        return block

    def initialize_weights(self) -> None:
        """The official initialisation: truncated normal (std 0.02) linears and positions, zero
        biases, unit LayerNorms (convolutions and the label table keep PyTorch's defaults)."""

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init)

    # The forward pass: embed, blocks, head ---------------------------------------------------------
    def time_token(self, t: Tensor) -> Tensor:
        """The time token's embedding (B, D): sinusoidal features of t (width D), then ``time_embed``."""
        d = self.config.hidden_size
        freq = TimestepEmbedder.timestep_embedding(t, d).to(self.pos_embed.dtype)
        if isinstance(self.time_embed, nn.Sequential):
            record(
                "time_embed",
                t.shape[0] * (formulas.linear_macs(1, d, 4 * d) + formulas.linear_macs(1, 4 * d, d)),
            )
        return self.time_embed(freq)

    def embed(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[UViTState, Tensor, Tensor]:
        """(state, c, e): c = e = the time token's embedding (B, D), what the width routers read."""
        size = self.config.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            raise ValueError(f"expected inputs of size {size}x{size}, got {tuple(x.shape)}")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        patches = self.patch_embed(x)
        e = self.time_token(t)
        tokens = [e.unsqueeze(1), patches]
        if self.config.label_rows:
            if y is None:
                raise DyditError("this U-ViT is class-conditional: give labels y")
            tokens.insert(0, self.label_emb(self.y_embedder(y, self.training)).unsqueeze(1))
        stream = torch.cat(tokens, dim=1) + self.pos_embed
        return UViTState(stream, (), self.extras), e, e

    def head(self, state: UViTState | Tensor, c: Tensor | None = None) -> Tensor:
        """LayerNorm, ``decoder_pred`` on every token, unpatchify the image tokens, final conv."""
        x = state.tokens if isinstance(state, UViTState) else state
        b, n, d = x.shape
        out = self.decoder_pred(self.norm(x))[:, self.extras :]
        record("decoder_pred", b * formulas.linear_macs(n, d, self.decoder_pred.out_features))
        img = self.unpatchify(out)
        if self.config.conv:
            ch, side = self.in_channels, img.shape[-1]
            record("final_layer", b * formulas.linear_macs(side * side, 9 * ch, ch))
        return self.final_layer(img)

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        state, _, _ = self.embed(x, timesteps, y)
        h, skips = state.tokens, []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop() if block.skip_linear is not None else None)
        return self.head(h)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p·p·C) with the official channel order (p1 p2 C) -> (B, C, H, W)."""
        p, ch = self.patch_size, self.in_channels
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, ch)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], ch, g * p, g * p)

    # The backbone contract (models/backbone.py) ---------------------------------------------------
    def width_embedding(self, t: Tensor) -> Tensor:
        """The time token's embedding (T, D), from t alone: width plans are per step."""
        return self.time_token(t)

    @property
    def width_dim(self) -> int:
        return self.config.hidden_size

    @property
    def routed_tokens(self) -> int:
        return self.config.num_tokens

    def layer_costs(self) -> tuple[int, int]:
        """(A, M) of one layer: attention over every token, the MLP of the routed image tokens."""
        c = self.config
        return (
            formulas.attention_macs(c.extras + c.num_tokens, c.hidden_size),
            formulas.mlp_macs(c.num_tokens, c.hidden_size, c.mlp_hidden),
        )

    def macs_table(self) -> dict[str, int]:
        """Per-sample MACs of the complete forward by component (docs/METHOD.md §16.3)."""
        return formulas.uvit_macs_table(self.config)


__all__ = ["UVIT_KEYS", "UViT", "UViTBlock", "UViTMod", "UViTState", "uvit_mlp"]
