"""Kernels of the sliced engine, by backend (docs/ARCHITECTURE.md §4, docs/METHOD.md §4.3, §8).

The sliced engine (models/sliced.py) runs each layer as two regions: the block's attention half
with the active heads' weights followed by the token router's logits (:func:`attention_region`),
and the token skip on the kept rows only (:func:`gathered_mlp_update`: gather -> the block's MLP
half with the active groups' weights -> gate -> scatter-add). A *backend* is the pair of
functions that computes these regions; :data:`BACKENDS` maps its name to a factory
``(compile, compile_mode) -> Kernels``. ``"torch"`` is the reference: plain PyTorch, optionally
``torch.compile``'d (dynamic shapes, so head/group/token counts do not recompile per value).
Fused kernels (e.g. Triton kernels that gather the active rows inside the matmul) are added here
as another backend with the same signatures.

:func:`kept_rows` turns the token router's logits into the gather indices, padded to a multiple of
``token_bucket`` when one is set (bounded shapes for static compile modes such as CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dydit.errors import DyditError
from dydit.models.backbone import Weights
from dydit.models.routers import token_router_logits

RouterWeights = tuple[Tensor, Tensor, Tensor, Tensor]  # (w1, b1, w2, b2) of the SDT router
KeptRows = tuple[Tensor | None, Tensor | None, Tensor, int]  # idx, sample, gate, number of MLP rows


def attention_region(
    attention_half: Callable,
    state,
    mod: Sequence[Tensor],
    weights: Weights,
    count: int,
    static: tuple,
    router: RouterWeights | None,
) -> tuple:
    """The block's attention half with sliced weights, then the token router's logits on x (one
    region for ``torch.compile``). Returns (state, x, h, logits or None)."""
    state, x, h = attention_half(state, mod, weights, count, static, None)
    return state, x, h, None if router is None else token_router_logits(x, *router)


def gathered_mlp_update(
    x: Tensor,  # (B, N, D), updated in place
    h: Tensor,  # (B, N, D) modulated MLP input
    idx: Tensor | None,  # (M,) kept rows of the flattened (B·N) axis; None = all tokens
    sample: Tensor | None,  # (M,) sample index of each kept row (rows into gate)
    gate: Tensor,  # (B, D) gate, or (B+1, D) with a zero last row when idx is padded
    mlp_half: Callable[[Tensor, Weights], Tensor],
    weights: Weights,
) -> Tensor:
    """The token skip (``x + keep ⊙ gate·MLP_J(h)``, models/dynamic.py) computed on the kept rows
    only: gather -> the block's MLP half -> gate -> scatter-add (docs/METHOD.md §4.3)."""
    b, n, d = x.shape
    flat = h.reshape(b * n, -1)  # h may be wider than x (FLUX's single block: [MLP input, attention])
    rows = flat if idx is None else flat.index_select(0, idx)  # (M, D_h)
    u = mlp_half(rows, weights)  # (M, D)
    if idx is None:
        return x.addcmul_(gate[:, None, :], u.view(b, n, d))
    x.view(b * n, d).index_add_(0, idx, u * gate.index_select(0, sample))
    return x


def kept_rows(logits: Tensor, gate: Tensor, n: int, token_bucket: int | None) -> KeptRows:
    """(idx, sample, gate, rows) for the MLP: rows of kept tokens in the flattened batch (§4.3).

    ``idx`` is None when every token is kept. With ``token_bucket``, the count is padded to a
    multiple of it by rows that point at row 0 with a zero gate (they add nothing).
    """
    keep = (logits > 0).flatten()  # (B·N,)
    idx = keep.nonzero().flatten()  # (M,), host sync on CUDA
    m = idx.numel()
    if m == keep.numel():
        return None, None, gate, m
    if m == 0:
        return idx, idx, gate, 0
    sample = torch.div(idx, n, rounding_mode="floor")
    if token_bucket is None:
        return idx, sample, gate, m
    padded = min(-(-m // token_bucket) * token_bucket, keep.numel())
    pad = padded - m
    if pad:
        idx = torch.cat([idx, idx.new_zeros(pad)])
        sample = torch.cat([sample, sample.new_full((pad,), gate.shape[0])])
        gate = torch.cat([gate, gate.new_zeros(1, gate.shape[1])])
    return idx, sample, gate, padded


@dataclass(frozen=True)
class Kernels:
    """A backend's two per-layer regions (signatures of :func:`attention_region` and
    :func:`gathered_mlp_update`)."""

    backend: str
    attention: Callable
    mlp: Callable
    compiled: bool = False


def torch_kernels(compile: bool = False, compile_mode: str | None = None) -> Kernels:
    """The reference kernels; with ``compile``, each region is one ``torch.compile(dynamic=True)``
    function shared by every layer (the block's halves are static methods, passed in)."""
    if not compile:
        return Kernels("torch", attention_region, gathered_mlp_update)
    attention = torch.compile(attention_region, dynamic=True, mode=compile_mode)
    mlp = torch.compile(gathered_mlp_update, dynamic=True, mode=compile_mode)
    return Kernels("torch", attention, mlp, compiled=True)


BACKENDS: dict[str, Callable[..., Kernels]] = {"torch": torch_kernels}


def load_kernels(
    backend: str = "torch", *, compile: bool = False, compile_mode: str | None = None
) -> Kernels:
    """The kernels of ``backend`` (a name of :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise DyditError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if compile_mode is not None and not compile:
        raise DyditError("compile_mode applies only with compile=True")
    return BACKENDS[backend](compile=compile, compile_mode=compile_mode)
