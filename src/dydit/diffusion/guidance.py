"""Classifier-free guidance as a sampler-side wrapper (docs/METHOD.md §1.3).

``guided(model_fn, scale, null_class)`` returns a callable with the model's own signature
``(x, t, y) -> Tensor``. It evaluates the conditional and the unconditional halves in one forward
pass on the concatenated batch [x; x] with conditions [y; null] and combines the ε outputs as

    ε̂ = ε_u + s · (ε_c - ε_u).

``y`` is a :class:`~dydit.conditioning.Condition` (class labels or text), which brings its own null
condition and is passed on doubled as a condition (wrap the network with
:func:`~dydit.conditioning.conditioned`, as :func:`dydit.sample.generate` does), or a label tensor
(B,), whose null is ``null_class`` and which is passed on doubled as a tensor.

``channels="all"`` (the project default) guides every ε channel, i.e. the first C = in_channels outputs;
``channels="dit_compat"`` guides only the first three, reproducing the official DiT/DyDiT code (needed
to match their reported FIDs). Channels that are not guided, including the learned-variance channels,
are taken from the conditional half.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from dydit.conditioning import Condition, as_condition
from dydit.constants import DIT_COMPAT_GUIDANCE_CHANNELS
from dydit.diffusion.gaussian import ModelFn
from dydit.errors import DyditError

GuidanceChannels = Literal["all", "dit_compat"]
GUIDANCE_CHANNELS: tuple[str, ...] = ("all", "dit_compat")


def guided(
    model_fn: ModelFn,
    scale: float,
    null_class: int | None = None,
    channels: GuidanceChannels = "all",
) -> ModelFn:
    """Wrap ``model_fn`` with classifier-free guidance of strength ``scale``.

    Args:
        model_fn: ``(x, t, y, **kwargs) -> (B, C_out, H, W)`` with C_out = C or 2C; ``y`` comes
            as it came to the guided callable (a condition, or a label tensor), with 2B rows.
        scale: guidance scale s >= 0; s = 1 is the conditional model (one plain forward),
            s = 0 the unconditional one.
        null_class: label of the "no class" embedding (``num_classes`` for DiT) when ``y`` is a
            label tensor; a :class:`~dydit.conditioning.Condition` knows its own null.
        channels: ``"all"`` or ``"dit_compat"`` (see the module docstring).
    Returns:
        a callable ``(x, t, y, **kwargs) -> (B, C_out, H, W)``.
    """
    if not scale >= 0 or scale == float("inf"):
        raise DyditError(f"guidance scale must be a finite number >= 0, got {scale}")
    if channels not in GUIDANCE_CHANNELS:
        raise DyditError(f"guidance channels must be one of {GUIDANCE_CHANNELS}, got {channels!r}")
    if scale == 1.0:
        return model_fn

    def guided_fn(x: Tensor, t: Tensor, y: Condition | Tensor, **kwargs: Any) -> Tensor:
        b = x.shape[0]
        both = as_condition(y, null_class).with_null()  # [y; null], 2B rows
        y2 = both if isinstance(y, Condition) else both.network_input()
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), y2, **kwargs)  # (2B, C_out, H, W)
        cond, uncond = out[:b], out[b:]
        k = x.shape[1] if channels == "all" else min(DIT_COMPAT_GUIDANCE_CHANNELS, x.shape[1])
        eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([eps, cond[:, k:]], dim=1)

    return guided_fn
