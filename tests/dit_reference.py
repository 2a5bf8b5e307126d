"""An independent DiT/SiT forward pass in plain tensor ops, written from docs/METHOD.md §1.2 for tests.

It reads a state dict in the official key layout and shares no code with ``dydit.models``
(explicit softmax attention instead of SDPA), so a test that compares ``dydit`` against it checks
the key mapping and the numerics of a converted checkpoint, not the model against itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return h * (1 + scale[:, None]) + shift[:, None]


@torch.no_grad()
def reference_forward(
    sd: dict[str, Tensor],
    x: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    num_heads: int,
    freq_shift: int = 0,
    mlp_norm_eps: float = 1e-6,
    sit: bool = False,
) -> Tensor:
    """DiT's forward (x (B, C, H, W), t (B,), y (B,) -> (B, C_out, H, W)); ``sit`` drops the sigma half.

    ``freq_shift`` 0 is the official DiT's timestep features, 1 diffusers'; ``mlp_norm_eps`` is the
    epsilon of the LayerNorm before the MLP (official 1e-6, diffusers' config norm_eps).
    """
    w = {k: v.float() for k, v in sd.items()}  # fp32, as the official code runs
    x = x.float()
    p = w["x_embedder.proj.weight"].shape[-1]
    d = w["pos_embed"].shape[-1]
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + w["pos_embed"]  # (B, N, D)
    b, n, _ = h.shape
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # cos first (DiT and diffusers)
    e_t = F.linear(F.silu(F.linear(features, w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])),
                   w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])  # fmt: skip
    c = e_t + w["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    hd = d // num_heads
    for i in range(depth):

        def g(name: str, i: int = i) -> tuple[Tensor, Tensor]:
            return w[f"blocks.{i}.{name}.weight"], w[f"blocks.{i}.{name}.bias"]

        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = F.linear(F.silu(c), *g("adaLN_modulation.1")).chunk(6, 1)
        a = _modulate(F.layer_norm(h, (d,), eps=1e-6), s_msa, sc_msa)
        q, k, v = F.linear(a, *g("attn.qkv")).reshape(b, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v  # (B, H, N, d)
        h = h + g_msa[:, None] * F.linear(att.transpose(1, 2).reshape(b, n, d), *g("attn.proj"))
        m = _modulate(F.layer_norm(h, (d,), eps=mlp_norm_eps), s_mlp, sc_mlp)
        h = h + g_mlp[:, None] * F.linear(
            F.gelu(F.linear(m, *g("mlp.fc1")), approximate="tanh"), *g("mlp.fc2")
        )
    shift, scale = F.linear(F.silu(c), w["final_layer.adaLN_modulation.1.weight"],
                            w["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)  # fmt: skip
    out = F.linear(_modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale),
                   w["final_layer.linear.weight"], w["final_layer.linear.bias"])  # fmt: skip
    grid = int(math.isqrt(n))
    c_out = out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(b, grid, grid, p, p, c_out))
    out = out.reshape(b, c_out, grid * p, grid * p)
    if sit and c_out == 2 * x.shape[1]:  # SiT.forward: ``x, _ = x.chunk(2, dim=1)``
        out = out[:, : x.shape[1]]
    return out


def relative_error(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()
