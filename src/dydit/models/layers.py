"""DiT building blocks, written in paper order (DiT, arXiv 2212.09748; docs/METHOD.md §1.2).

Module and parameter names follow the official DiT checkpoints exactly (``x_embedder.proj``,
``t_embedder.mlp.0``/``.2``, ``y_embedder.embedding_table``, ``attn.qkv``/``attn.proj``,
``mlp.fc1``/``mlp.fc2``) so that official state dicts load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.constants import TIMESTEP_FREQ_DIM
from dydit.flops import formulas
from dydit.flops.counter import record


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1 + scale) + shift, broadcast over tokens. x: (B, N, D); shift/scale: (B, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one pass over (B, N, D)


# Attention and MLP as functions of their weights: the DiT modules below, the masked DyDiT block
# and the sliced engine (which passes the weights of the active heads or groups only) all run these.
def attention(
    x: Tensor,
    qkv_weight: Tensor | None,
    qkv_bias: Tensor | None,
    proj_weight: Tensor | None,
    proj_bias: Tensor,
    num_heads: int,
    head_mask: Tensor | None = None,
) -> Tensor:
    """Multi-head self-attention with fused qkv and SDPA. (B, N, D) -> (B, N, D_out).

    ``qkv_weight`` (3·K·d, D) holds the [q; k; v] rows of ``num_heads`` = K heads, head-major, and
    ``proj_weight`` (D_out, K·d) the matching columns. ``head_mask`` (B, K) scales each head's output
    before ``proj`` (0/1 masks switch heads off; docs/METHOD.md §3.3). Without weights (K = 0) the
    result is ``proj_bias`` for every token (docs/METHOD.md §3.5 item 2).
    """
    b, n, _ = x.shape
    if qkv_weight is None:
        return proj_bias.expand(b, n, proj_bias.shape[0])
    qkv = F.linear(x, qkv_weight, qkv_bias).view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, K, N, d)
    if head_mask is not None:
        out = out * head_mask.to(out.dtype)[:, :, None, None]
    return F.linear(out.transpose(1, 2).reshape(b, n, -1), proj_weight, proj_bias)


def mlp(
    x: Tensor,
    fc1_weight: Tensor | None,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor | None,
    fc2_bias: Tensor,
    group_mask: Tensor | None = None,
) -> Tensor:
    """fc1 -> GELU (tanh approximation) -> fc2. (..., D) -> (..., D_out).

    ``group_mask`` (B, G) scales G equal groups of fc1 outputs before the GELU (0/1 masks switch
    groups off; docs/METHOD.md §3.3); x is then (B, N, D). Without weights the result is ``fc2_bias``
    for every row (no active group; docs/METHOD.md §3.5 item 3).
    """
    if fc1_weight is None:
        return fc2_bias.expand(*x.shape[:-1], fc2_bias.shape[0])
    a = F.linear(x, fc1_weight, fc1_bias)  # (..., hidden)
    if group_mask is not None:
        b, n, hidden = a.shape
        m = group_mask.to(a.dtype)[:, None, :, None]  # (B, 1, G, 1)
        a = (a.view(b, n, m.shape[2], -1) * m).view(b, n, hidden)
    return F.linear(F.gelu(a, approximate="tanh"), fc2_weight, fc2_bias)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position table of shape (grid_size², dim), MAE recipe (docs/METHOD.md §1.2 item 2).

    The first half of the channels encodes the column (w) coordinate and the second half the row
    (h) coordinate; each half concatenates [sin(pos·ω), cos(pos·ω)] with ω_k = 10000^(−k/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"position embedding dim must be divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # each (grid, grid), w varies fastest

    def encode_1d(pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim/2)

    return torch.cat([encode_1d(grid_w), encode_1d(grid_h)], dim=1).float()  # (grid², dim)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, N, D) with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        b, d, h, w = x.shape
        record("patch_embed", b * formulas.linear_macs(h * w, self.proj.in_channels * self.patch_size**2, d))
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> E_t (B, D): sinusoidal features, then Linear-SiLU-Linear.

    ``freq_shift`` is 0 for the official DiT and 1 for diffusers' DiT (``downscale_freq_shift``);
    both put cos before sin.
    """

    def __init__(self, hidden_size: int, frequency_dim: int = TIMESTEP_FREQ_DIM, freq_shift: int = 0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, shift: int = 0) -> Tensor:
        """[cos(t·f), sin(t·f)], f_k = exp(−ln(max_period)·k/(half − shift)); t may be fractional.
        (B,) -> (B, dim)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
        )
        args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_dim, shift=self.freq_shift).to(
            self.mlp[0].weight.dtype
        )
        d = self.mlp[2].out_features
        record("t_embedder", t.shape[0] * (formulas.linear_macs(1, self.frequency_dim, d) + d * d))
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> E_y (B, D). Row ``num_classes`` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor) -> Tensor:
        """Replace each label by the null class with probability ``dropout_prob`` (training only)."""
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool) -> Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA (no q/k norm, as in DiT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # rows [q; k; v], each head-major
        self.proj = nn.Linear(dim, dim, bias=True)

    def record_macs(self, x: Tensor) -> None:
        """Report the MACs of all heads on x (B, N, D) to the FLOPs counter."""
        b, n, d = x.shape
        record("attention", b * formulas.attention_macs(n, d))

    def forward(self, x: Tensor, head_mask: Tensor | None = None) -> Tensor:
        """(B, N, D) -> (B, N, D); ``head_mask`` (B, H) scales each head's output before ``proj``."""
        self.record_macs(x)
        q, p = self.qkv, self.proj
        return attention(x, q.weight, q.bias, p.weight, p.bias, self.num_heads, head_mask)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: Tensor, group_mask: Tensor | None = None) -> Tensor:
        """(..., D) -> (..., D); ``group_mask`` (B, G) scales G groups of fc1 outputs (x is (B, N, D))."""
        tokens = x.shape[:-1].numel()
        record("mlp", formulas.mlp_macs(tokens, self.fc1.in_features, self.fc1.out_features))
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, group_mask)
