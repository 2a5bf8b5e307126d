"""Flow matching for SiT-style models: the transport (path, parameterisation, loss) and its samplers.

The network enters only as a callable ``model_fn(x, t, y=...) -> Tensor`` that receives the flow time
t ∈ [0, 1] (0 = noise, 1 = data); nothing here imports a model class. Typical use::

    transport = Transport("linear", "velocity")                      # SiT's default
    terms = transport.loss_terms(model(x_t, t, y), x0, x_t, t, noise)  # {"loss", "mse"}, each (B,)
    x0 = FLOW_SAMPLERS["heun"](guided(model, 1.5, 1000), noise, transport, 25, model_kwargs=dict(y=y))
    FLOW_SAMPLERS["heun"].times(transport, 25)                         # the 50 times the network sees

:func:`create_process` picks the process a model was trained with from its config (``objective``,
``flow_path``, ``flow_prediction``), so sampling and training never guess it.
"""

from __future__ import annotations

import math
from typing import Any

from dydit.diffusion import GaussianDiffusion, create_diffusion
from dydit.errors import DyditError
from dydit.flow.samplers import (
    FLOW_SAMPLERS,
    FlowSampler,
    evaluations,
    flow_times,
    ode_grid,
    sample_adaptive,
    sample_euler,
    sample_heun,
    sample_sde,
    sde_grid,
)
from dydit.flow.transport import PATHS, PREDICTIONS, Transport

__all__ = [
    "FLOW_SAMPLERS",
    "PATHS",
    "PREDICTIONS",
    "FlowSampler",
    "Transport",
    "create_process",
    "evaluations",
    "flow_times",
    "ode_grid",
    "sample_adaptive",
    "sample_euler",
    "sample_heun",
    "sample_sde",
    "sde_grid",
]


def create_process(config: Any) -> GaussianDiffusion | Transport:
    """The generative process of a model config: DDPM (T = 1000) or its flow-matching transport.

    A U-ViT config (docs/METHOD.md §16.2) names its own: ``process="sd"``, Stable Diffusion's
    scaled-linear betas with t = 1..1000; ``"vpsde"``, the VP path with the network seeing 999·(1 − t).
    """
    if getattr(config, "family", None) == "FLUX":  # FLUX's clock and time shift (docs/METHOD.md §17.6)
        return Transport("linear", "velocity", clock="flux", shift=math.exp(config.time_shift_mu))
    process = getattr(config, "process", None)  # a U-ViT's; DiT/SiT configs have none
    if config.objective == "ddpm":
        if process == "sd":
            return create_diffusion(learn_sigma=False, schedule="scaled_linear", first_timestep=1)
        return create_diffusion(learn_sigma=config.learn_sigma)
    if config.objective == "flow":
        clock = "sde999" if process == "vpsde" else "flow"
        return Transport(config.flow_path, config.flow_prediction, clock=clock)
    raise DyditError(f"unknown objective {config.objective!r}")
