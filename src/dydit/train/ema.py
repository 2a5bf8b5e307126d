"""Exponential moving average of the weights (docs/METHOD.md §1.6, §6.2).

DiT and DyDiT keep θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step with d = 0.9999, the EMA
initialised as a copy of the model (after loading pre-trained weights, for fine-tuning). Sampling
and evaluation use the EMA weights. For short runs (tests, the Fashion-MNIST demo) an optional
warm-up uses d_k = min(d, (1 + k) / (10 + k)) so that the average is not stuck at the initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# d_k = min(d, (1 + k) / (EMA_WARMUP_OFFSET + k)) with the warm-up on.
EMA_WARMUP_OFFSET = 10


def create_ema(model: nn.Module, share_frozen: bool = False) -> nn.Module:
    """A frozen copy of ``model`` in eval mode (no gradients, same device and dtype).

    ``share_frozen``: parameters that do not train (a TD-LoRA run's base) are the model's own
    tensors, not copies: their average is themselves, and a large base is held once.
    """
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad} if share_frozen else {}
    ema = copy.deepcopy(model, memo=dict(frozen))
    ema.requires_grad_(False)
    return ema.eval()


def ema_decay(step: int, decay: float, warmup: bool = False) -> float:
    """The decay used for the update after optimisation step ``step`` (0-based)."""
    if not warmup:
        return decay
    return min(decay, (1 + step) / (EMA_WARMUP_OFFSET + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ for every parameter; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    if ema_params.keys() != model_params.keys():
        raise ValueError("EMA and model have different parameters")
    names = [n for n, p in model_params.items() if p.requires_grad]
    if names:
        torch._foreach_lerp_(
            [ema_params[n] for n in names], [model_params[n].detach() for n in names], 1.0 - decay
        )
    for (_, b_ema), (_, b) in zip(ema.named_buffers(), model.named_buffers()):
        b_ema.copy_(b)
