"""Respaced diffusion: sampling on a subset of the original timesteps (docs/METHOD.md §1.4, §7.2).

A respaced process keeps timesteps k_0 < k_1 < ... < k_{N-1} of the original one and uses the betas
β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}}, so its marginals q(x_{k_i} | x_0) are unchanged. Its
``timestep_map`` sends step i back to k_i, and the network is always called with k_i: a model (or a
DyDiT router) trained on t ∈ [0, 1000) never sees a respaced index.
"""

from __future__ import annotations

import numpy as np

from dydit.constants import NUM_TIMESTEPS
from dydit.diffusion.gaussian import GaussianDiffusion
from dydit.diffusion.schedules import BETA_SCHEDULES, Steps, respaced_betas, space_timesteps
from dydit.errors import DyditError


def respace(diffusion: GaussianDiffusion, steps: Steps) -> GaussianDiffusion:
    """The process restricted to the timesteps selected by ``steps`` (see :func:`space_timesteps`).

    Respacing an already respaced process composes the maps, so the network still sees original
    timesteps.
    """
    kept = space_timesteps(diffusion.num_timesteps, steps)
    if kept == list(range(diffusion.num_timesteps)):
        return diffusion
    betas = respaced_betas(diffusion.alphas_cumprod.numpy(), kept)
    tmap = diffusion.timestep_map.numpy()[np.asarray(kept)]
    return GaussianDiffusion(betas, learn_sigma=diffusion.learn_sigma, timestep_map=tmap)


def create_diffusion(
    timestep_respacing: Steps | None = None,
    *,
    learn_sigma: bool = True,
    num_timesteps: int = NUM_TIMESTEPS,
    schedule: str = "linear",
    first_timestep: int = 0,
) -> GaussianDiffusion:
    """DiT's diffusion: linear betas, T = 1000, ε-prediction, learned-range variance, hybrid loss.

    Args:
        timestep_respacing: None or "" for all T steps (training); ``250``/``"250"``, ``"ddim50"``,
            ``"10,20"`` or an explicit list of original timesteps for sampling.
        learn_sigma: whether the network predicts the variance interpolation (2C output channels).
        num_timesteps: T of the original process.
        schedule: ``"linear"`` (DiT) or ``"scaled_linear"`` (Stable Diffusion's, U-ViT's H models).
        first_timestep: what the network sees at step 0: 0 (DiT: t = 0..T-1) or 1 (U-ViT's discrete
            models: t = 1..T, step i with ᾱ of the i+1-th beta; docs/METHOD.md §16.2).
    """
    if schedule not in BETA_SCHEDULES:
        raise DyditError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    tmap = None if first_timestep == 0 else np.arange(num_timesteps) + first_timestep
    base = GaussianDiffusion(
        BETA_SCHEDULES[schedule](num_timesteps), learn_sigma=learn_sigma, timestep_map=tmap
    )
    if timestep_respacing is None or timestep_respacing == "":
        return base
    return respace(base, timestep_respacing)
