"""The parts of U-ViT (models/uvit.py, docs/METHOD.md §16): its MLP as a function of its weights
(exact GELU), the modules named as the official ones (``attn.qkv``/``attn.proj``, ``mlp.fc1``/``.fc2``,
``patch_embed.proj``), class dropout, and what flows between blocks on the backbone seam.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.flops import formulas
from dydit.flops.counter import record


def uvit_mlp(
    x: Tensor,
    fc1_weight: Tensor | None,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor | None,
    fc2_bias: Tensor,
    group_mask: Tensor | None = None,
) -> Tensor:
    """fc1 -> GELU (exact, timm's ``Mlp``) -> fc2, (..., D) -> (..., D); ``group_mask`` (B, G) as in
    :func:`dydit.models.layers.mlp` (x is then (B, N, D)); no weights: ``fc2_bias`` for every row."""
    if fc1_weight is None:
        return fc2_bias.expand(*x.shape[:-1], fc2_bias.shape[0])
    a = F.linear(x, fc1_weight, fc1_bias)
    if group_mask is not None:
        b, n, hidden = a.shape
        m = group_mask.to(a.dtype)[:, None, :, None]
        a = (a.view(b, n, m.shape[2], -1) * m).view(b, n, hidden)
    return F.linear(F.gelu(a), fc2_weight, fc2_bias)


class UViTState(NamedTuple):
    """What flows between U-ViT blocks: the stream (B, E + N, D), the in-blocks' outputs not yet
    taken by an out-block (a stack), and the number E of time/class tokens."""

    tokens: Tensor
    skips: tuple[Tensor, ...]
    extras: int


class UViTMod(NamedTuple):
    """A block's fixed tensors, what its halves take in place of an adaLN modulation."""

    skip_weight: Tensor | None
    skip_bias: Tensor | None
    norm1: tuple[Tensor, Tensor]
    norm2: tuple[Tensor, Tensor]
    gate: Tensor  # (B, 1) ones: U-ViT's MLP update is not gated


class Attention(nn.Module):
    """Self-attention with a fused qkv (no bias in the official configs) and an output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class NoModulation(NamedTuple):
    """U-ViT has no adaLN: an empty "modulation linear" (0 outputs) for the engine's fused matmul."""

    weight: Tensor
    bias: Tensor
    out_features: int = 0


class LabelDropout:
    """Class dropout in training (the official scripts draw it in the dataset, with ``p_uncond``):
    labels become the null class ``num_classes`` with probability ``dropout_prob``. A plain object,
    not a module (no state-dict keys), with the attributes the training loop reads (``y_embedder``)."""

    def __init__(self, num_classes: int, dropout_prob: float):
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def __call__(self, labels: Tensor, train: bool) -> Tensor:
        if not (train and self.dropout_prob > 0):
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with a stride-p convolution (key ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        b, d, h, w = x.shape
        record("patch_embed", b * formulas.linear_macs(h * w, self.proj.in_channels * self.patch_size**2, d))
        return x.flatten(2).transpose(1, 2)
