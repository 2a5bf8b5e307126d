"""The MAC formulas of DiT and DyDiT, in one place (docs/METHOD.md §1.1, §5.3, §7.3).

Convention: one multiply-accumulate counts as one FLOP, as in the DiT paper, so DiT-XL/2 at
256 px costs about 118.6 G. Elementwise work (norms, modulation, activations, softmax) is not
counted. All functions are plain arithmetic on ints and take no model object, so ``models`` can
call into this module without a reverse import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dydit.constants import TIMESTEP_FREQ_DIM, TOKEN_ROUTER_REDUCTION

if TYPE_CHECKING:
    from dydit.presets import ModelConfig, UViTConfig


def linear_macs(tokens: int, d_in: int, d_out: int) -> int:
    """A dense layer applied to ``tokens`` rows: tokens * d_in * d_out MACs."""
    return tokens * d_in * d_out


def attention_macs(tokens: int, width: int, active_heads: int | None = None, num_heads: int = 1) -> int:
    """Multi-head self-attention: qkv N·D·3D + QKᵀ N²·D + AV N²·D + proj N·D·D = 4ND² + 2N²D.

    With ``active_heads`` of ``num_heads`` heads running (TDW), every term scales by
    active_heads / num_heads: qkv and QKᵀ/AV shrink with the active head dimension, and so
    does the input dimension of ``proj``.
    """
    active = num_heads if active_heads is None else active_heads
    d_active = width * active // num_heads
    return (
        linear_macs(tokens, width, 3 * d_active)  # q, k, v of the active heads
        + 2 * tokens * tokens * d_active  # QKᵀ and AV
        + linear_macs(tokens, d_active, width)  # proj
    )


def mlp_macs(
    tokens: int, width: int, hidden: int, active_groups: int | None = None, num_groups: int = 1
) -> int:
    """Two-layer MLP D -> hidden -> D: 2·N·D·hidden (8ND² for ratio 4), scaled by active groups."""
    active = num_groups if active_groups is None else active_groups
    h_active = hidden * active // num_groups
    return linear_macs(tokens, width, h_active) + linear_macs(tokens, h_active, width)


def token_router_macs(tokens: int, width: int, reduction: int = TOKEN_ROUTER_REDUCTION) -> int:
    """One SDT token router on ``tokens`` rows: Linear(D, D/r) then Linear(D/r, 1) (docs/METHOD.md §4.1)."""
    hidden = max(1, width // reduction)
    return linear_macs(tokens, width, hidden) + linear_macs(tokens, hidden, 1)


def layer_costs(tokens: int, width: int, mlp_ratio: float = 4.0) -> tuple[int, int]:
    """Per-layer static costs (A, M) of attention and MLP: the constants of the FLOPs loss (§5.3)."""
    return attention_macs(tokens, width), mlp_macs(tokens, width, int(width * mlp_ratio))


def dit_macs_table(
    *,
    depth: int,
    width: int,
    num_heads: int,
    patch_size: int,
    input_size: int,
    in_channels: int,
    out_channels: int,
    mlp_ratio: float = 4.0,
) -> dict[str, int]:
    """Per-component MACs of one DiT forward for one sample, in forward order.

    Returns a dict of component name -> MACs; the total is ``sum(table.values())``.
    """
    n = (input_size // patch_size) ** 2
    attn, mlp = layer_costs(n, width, mlp_ratio)
    return {
        "patch_embed": linear_macs(n, in_channels * patch_size**2, width),
        "t_embedder": linear_macs(1, TIMESTEP_FREQ_DIM, width) + linear_macs(1, width, width),
        "adaLN": depth * linear_macs(1, width, 6 * width),
        "attention": depth * attn,
        "mlp": depth * mlp,
        "final_layer": linear_macs(1, width, 2 * width) + linear_macs(n, width, patch_size**2 * out_channels),
    }


def config_macs_table(cfg: ModelConfig | UViTConfig) -> dict[str, int]:
    """:func:`dit_macs_table` of a model config: the static cost of its complete (dense) forward
    (:func:`uvit_macs_table` for a U-ViT's)."""
    if getattr(cfg, "family", None) == "U-ViT":
        return uvit_macs_table(cfg)
    return dit_macs_table(
        depth=cfg.depth,
        width=cfg.hidden_size,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        input_size=cfg.input_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        mlp_ratio=cfg.mlp_ratio,
    )


# The FLUX family (docs/METHOD.md §15.4) -------------------------------------------------------------
def flux_layer_costs(image_tokens: int, text_tokens: int, width: int) -> tuple[int, int]:
    """Per-block (A, M) of FLUX, the same for double- and single-stream blocks: attention over the
    joint sequence (q/k/v, QKᵀ, AV and the output projections of both streams; the single block's
    attention columns of proj_out) and the MLP of the image tokens (D -> 4D -> D)."""
    return attention_macs(image_tokens + text_tokens, width), mlp_macs(image_tokens, width, 4 * width)


def flux_macs_table(
    *,
    num_layers: int,
    num_single_layers: int,
    width: int,
    image_tokens: int,
    text_tokens: int,
    in_channels: int,
    out_features: int,
    text_dim: int,
    pooled_dim: int,
    guidance: bool,
) -> dict[str, int]:
    """Per-component MACs of one FLUX forward for one sample (1 MAC = 1 FLOP): FLUX.1-lite-8B at
    1024 px (4096 image tokens) with 512 text tokens is 30.0 T, the figure DyFLUX reports."""
    d, depth = width, num_layers + num_single_layers
    attn, mlp = flux_layer_costs(image_tokens, text_tokens, width)
    time = (linear_macs(1, TIMESTEP_FREQ_DIM, d) + d * d) * (2 if guidance else 1)
    return {
        "x_embedder": linear_macs(image_tokens, in_channels, d),
        "time_text_embed": time + linear_macs(1, pooled_dim, d) + d * d,
        "context_embedder": linear_macs(text_tokens, text_dim, d),
        "adaLN": num_layers * 12 * d * d + num_single_layers * 3 * d * d,
        "attention": depth * attn,
        "mlp": depth * mlp,
        "mlp_text": depth * mlp_macs(text_tokens, d, 4 * d),
        "final_layer": linear_macs(1, d, 2 * d) + linear_macs(image_tokens, d, out_features),
    }


def uvit_macs_table(c: UViTConfig) -> dict[str, int]:
    """Per-sample MACs of a U-ViT forward by component, in forward order (docs/METHOD.md §16.3): the
    patch convolution, the time MLP (if any), the long-skip linears, attention over the E + N tokens
    of the depth + 1 blocks, the MLP of the N image tokens (routed) and of the E time/class tokens
    (never routed), ``decoder_pred`` on every token and the 3×3 convolution (if any)."""
    d, n, e, pp = c.hidden_size, c.num_tokens, c.extras, c.patch_size**2
    blocks, half = c.depth + 1, c.depth // 2
    table = {"patch_embed": linear_macs(n, c.in_channels * pp, d)}
    if c.mlp_time_embed:
        table["time_embed"] = linear_macs(1, d, 4 * d) + linear_macs(1, 4 * d, d)
    if c.skip:
        table["skip_linear"] = half * linear_macs(e + n, 2 * d, d)
    table["attention"] = blocks * attention_macs(e + n, d)
    table["mlp"] = blocks * mlp_macs(n, d, c.mlp_hidden)
    table["mlp_extras"] = blocks * mlp_macs(e, d, c.mlp_hidden)
    table["decoder_pred"] = linear_macs(e + n, d, pp * c.in_channels)
    if c.conv:
        table["final_layer"] = linear_macs(c.input_size**2, 9 * c.in_channels, c.in_channels)
    return table
