"""FLUX's building blocks: rotary positions, q/k RMSNorm + joint attention, embedders, packing.

docs/METHOD.md §15 (FLUX and DyFLUX), docs/ARCHITECTURE.md §7.2. Written from diffusers'
``FluxTransformer2DModel`` numerics (0.42): 3-axis RoPE with per-axis frequencies
theta^(-2k/d_axis) (theta 10000, computed in float64) applied to interleaved (real, imaginary)
pairs; q/k RMSNorm (eps 1e-6) per head before RoPE; the text tokens come first in the joint
sequence; sinusoidal time features [cos, sin] of 256 channels with frequencies
exp(-ln(10000)·k/128); ``time_text_embed`` sums time (+ guidance) and pooled-text projections.
Module and key names are diffusers' so that state dicts load strictly both ways.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dydit.errors import DyditError
from dydit.flops import formulas
from dydit.flops.counter import record

FLUX_EPS = 1e-6  # every LayerNorm and RMSNorm of FLUX
ROPE_THETA = 10000
TIME_CHANNELS = 256  # sinusoidal features of the time and guidance embedders
TIME_SCALE = 1000.0  # diffusers multiplies timestep and guidance by 1000 inside the forward


class FluxState(NamedTuple):
    """What FLUX's blocks update: image tokens (B, N, D), text tokens (B, L, D), the RoPE table
    (cos, sin) of the joint sequence (L + N, d), the text rows a single block's halves left for
    ``finish`` (its MLP input and attention contribution, (B, L, 2D); None between blocks), and the
    latent grid of the image path."""

    img: Tensor
    txt: Tensor
    rope: tuple[Tensor, Tensor]
    pending: Tensor | None = None
    grid: tuple[int, int] | None = None  # (H, W) of latents given as images: the head unpacks to them


@dataclass(frozen=True)
class FluxInputs:
    """The condition of one FLUX call: what diffusers' signature passes beside the latents.

    embeddings (B, L, joint_attention_dim) (T5), pooled (B, pooled_projection_dim) (CLIP),
    img_ids (N, 3) and txt_ids (L, 3) or None (made from the latent grid / zeros), guidance (B,)
    or None (the model's ``guidance``). ``len`` and ``select`` let the sliced engine split a batch by t.
    """

    embeddings: Tensor
    pooled: Tensor
    img_ids: Tensor | None = None
    txt_ids: Tensor | None = None
    guidance: Tensor | None = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def select(self, rows: Tensor) -> FluxInputs:
        g = None if self.guidance is None else self.guidance[rows]
        return FluxInputs(self.embeddings[rows], self.pooled[rows], self.img_ids, self.txt_ids, g)


def check_ids(ids: Tensor, length: int, name: str) -> Tensor:
    """Position ids as (length, 3): 2-D as given, 3-D (B, length, 3) by their first row (as diffusers
    does, without its deprecation warning)."""
    if not isinstance(ids, Tensor):
        raise DyditError(f"{name} must be a tensor ({length}, 3), got {type(ids).__name__}")
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[0] != length or ids.shape[1] != 3:
        raise DyditError(f"{name} must be ({length}, 3) or (B, {length}, 3), got {tuple(ids.shape)}")
    return ids


def image_ids(height: int, width: int, device=None) -> Tensor:
    """(height·width, 3) ids [0, row, col] of a packed latent grid (FluxPipeline's convention)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def pack_latents(x: Tensor, p: int = 2) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p·W/p, p²C) tokens of p x p patches (FluxPipeline._pack_latents
    for p = 2; the pixel-space text-to-image model packs p = 4, docs/METHOD.md §17.6)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise DyditError(f"FLUX latents need a height and width divisible by {p}, got {h}x{w}")
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: Tensor, height: int, width: int, p: int = 2) -> Tensor:
    """Inverse of :func:`pack_latents`: (B, H/p·W/p, p²C) -> (B, C, H, W)."""
    b, _, ch = tokens.shape
    x = tokens.view(b, height // p, width // p, ch // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // (p * p), height, width)


def rope_table(ids: Tensor, axes: Sequence[int], theta: int = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (S, sum(axes)): per axis i, angles pos_i·theta^(-2k/axes[i]), each repeated
    twice (interleaved pairs), computed in float64 and returned in float32."""
    pos = ids.to(torch.float64)
    cos, sin = [], []
    for i, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(pos[:, i], freqs)  # (S, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, -1).float(), torch.cat(sin, -1).float()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate interleaved pairs of x (B, H, S, d) by the table (cos, sin) (S, d)."""
    cos, sin = rope
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def project_heads(x: Tensor, weight: Tensor, bias: Tensor | None, norm: Tensor, eps: float) -> Tensor:
    """Linear -> (B, S, K, d) per head -> RMSNorm over d with weight ``norm`` -> (B, K, S, d)."""
    d = norm.shape[0]
    y = F.linear(x, weight, bias).unflatten(-1, (-1, d))
    return F.rms_norm(y, (d,), norm, eps).transpose(1, 2)


def joint_attention(q: Tensor, k: Tensor, v: Tensor, rope, head_mask: Tensor | None) -> Tensor:
    """RoPE on q and k (B, K, S, d), SDPA, optional per-head 0/1 mask (B, K) -> (B, S, K·d)."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    o = F.scaled_dot_product_attention(q, k, v)
    if head_mask is not None:
        o = o * head_mask.to(o.dtype)[:, :, None, None]
    return o.transpose(1, 2).flatten(2)


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=FLUX_EPS)


def gelu_mlp(
    x: Tensor, w1: Tensor | None, b1: Tensor | None, group_mask: Tensor | None = None
) -> Tensor | None:
    """GELU(tanh)(x·w1ᵀ + b1) with G groups of hidden channels scaled by ``group_mask`` (B, G)
    (x is then (B, N, D)); None without weights (no active group)."""
    if w1 is None:
        return None
    a = F.gelu(F.linear(x, w1, b1), approximate="tanh")
    if group_mask is not None:
        b, n, hidden = a.shape
        m = group_mask.to(a.dtype)[:, None, :, None]
        a = (a.view(b, n, m.shape[2], -1) * m).view(b, n, hidden)
    return a


class StackedLinear:
    """Several Linears on the same input read as one (the sliced engine fuses every block's
    modulation into one matmul): ``weight``, ``bias`` and ``out_features`` of their concatenation."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears

    @property
    def weight(self) -> Tensor:
        return torch.cat([lin.weight for lin in self.linears])

    @property
    def bias(self) -> Tensor:
        return torch.cat([lin.bias for lin in self.linears])

    @property
    def out_features(self) -> int:
        return sum(lin.out_features for lin in self.linears)


class AdaNorm(nn.Module):
    """diffusers' AdaLayerNormZero(/Single/Continuous) parameters: ``linear`` on SiLU(temb) (key
    ``norm1.linear``, ``norm.linear``, ``norm_out.linear``); the norm itself has no parameters."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)


class FeedForward(nn.Module):
    """diffusers' FeedForward(gelu-approximate) keys: ``net.0.proj`` (D -> 4D) and ``net.2`` (4D -> D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(hidden, dim)])


class TimestepEmbedding(nn.Module):
    """Sinusoidal features (256) -> ``linear_1`` -> SiLU -> ``linear_2`` (diffusers' key names)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        d_in, d = self.linear_1.in_features, self.linear_1.out_features
        record("time_text_embed", x.shape[0] * (formulas.linear_macs(1, d_in, d) + d * d))
        return self.linear_2(F.silu(self.linear_1(x)))


def time_features(t: Tensor, dim: int = TIME_CHANNELS) -> Tensor:
    """[cos(t·f), sin(t·f)] with f_k = exp(-ln(10000)·k/(dim/2)), (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeTextEmbed(nn.Module):
    """``time_text_embed``: temb = E(1000·t) [+ E_g(1000·g)] + text_embedder(pooled) (B, D).

    ``text_embedder`` is linear_1 -> SiLU -> linear_2 like the time embedder (PixArt's projection).
    """

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def time_guidance(self, t: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """E(1000·t) (+ E_g(1000·g) with a guidance embedder): what stays fixed for a sampling step."""
        e = self.timestep_embedder(time_features(t.to(dtype) * TIME_SCALE).to(dtype))
        if hasattr(self, "guidance_embedder"):
            if guidance is None:
                raise DyditError("this FLUX model embeds a guidance scale: pass guidance (B,)")
            e = e + self.guidance_embedder(time_features(guidance.to(dtype) * TIME_SCALE).to(dtype))
        return e

    def forward(self, t: Tensor, guidance: Tensor | None, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """(temb, the time + guidance part of it)."""
        e = self.time_guidance(t, guidance, pooled.dtype)
        return e + self.text_embedder(pooled), e


class FluxTokenRouter(nn.Module):
    """DyFLUX's token router (docs/METHOD.md §15.2), keys ``linear_t``, ``norm``, ``router``.

    ``linear_t(SiLU(temb))`` gives (shift, scale, text shift, text scale); one affine LayerNorm
    (eps 1e-5) modulates the image tokens x (B, N, D) and the text tokens (B, L, D) separately;
    the logit of an image token is ``router(x' + mean over text of text')``. It reads the block's
    state (the text stream) and temb besides x: ``reads_state``.
    """

    reads_state = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_t = nn.Linear(dim, 4 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.router = nn.Linear(dim, 1)

    @property
    def output_layer(self) -> nn.Linear:
        """The last Linear; its bias sets how many tokens are kept."""
        return self.router

    def reset_keep_all(self, bias: float) -> None:
        """Initial weights that keep every token: linear_t zero (plain LayerNorm), router bias ``bias``."""
        nn.init.zeros_(self.linear_t.weight)
        nn.init.zeros_(self.linear_t.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.xavier_uniform_(self.router.weight)
        nn.init.constant_(self.router.bias, bias)

    def logits(self, x: Tensor, txt: Tensor, temb: Tensor) -> Tensor:
        """(B, N) logits of the image tokens x (B, N, D), given the text (B, L, D) and temb (B, D)."""
        b, n, d = x.shape
        record("token_router", b * (formulas.linear_macs(1, d, 4 * d) + formulas.linear_macs(n, d, 1)))
        shift, scale, t_shift, t_scale = self.linear_t(F.silu(temb)).chunk(4, dim=1)
        xi = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        xt = self.norm(txt) * (1 + t_scale[:, None]) + t_shift[:, None]
        return self.router(xi + xt.mean(1, keepdim=True)).squeeze(-1)
