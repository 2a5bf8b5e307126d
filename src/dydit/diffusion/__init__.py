"""Gaussian diffusion, respacing, samplers and classifier-free guidance (docs/METHOD.md §1.3, §1.4, §7.2).

The network enters only as a callable ``model_fn(x, t, y=...) -> Tensor`` that receives original
timesteps; nothing here imports a model class. Typical use::

    diffusion = create_diffusion()                                  # training: all 1000 steps
    terms = diffusion.training_losses(model, x0, t, dict(y=y))      # {"loss", "mse", "vb"}, each (B,)
    fn = guided(model, scale=1.5, null_class=1000)                  # CFG in one batched forward
    x0 = SAMPLERS["ddpm"](fn, noise, diffusion, 250, model_kwargs=dict(y=y))
"""

from dydit.diffusion.gaussian import GaussianDiffusion, ModelFn
from dydit.diffusion.guidance import GUIDANCE_CHANNELS, guided
from dydit.diffusion.respace import create_diffusion, respace
from dydit.diffusion.samplers import (
    SAMPLERS,
    RegisteredSampler,
    Sampler,
    respaced_times,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from dydit.diffusion.schedules import linear_betas, scaled_linear_betas, space_timesteps

__all__ = [
    "GUIDANCE_CHANNELS",
    "SAMPLERS",
    "GaussianDiffusion",
    "ModelFn",
    "RegisteredSampler",
    "Sampler",
    "create_diffusion",
    "guided",
    "linear_betas",
    "respace",
    "respaced_times",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "scaled_linear_betas",
    "space_timesteps",
]
