"""Samplers: DDPM ancestral, DDIM and DPM-Solver++(2M), with one signature (docs/METHOD.md §1.4, §7.2).

Every sampler is a plain ``@torch.no_grad()`` function::

    sampler(model_fn, noise, diffusion, steps, *, model_kwargs=None, generators=None,
            progress=False, clip_denoised=False, **options) -> x_0

- ``model_fn(x, t, **model_kwargs)``: the network (or a :func:`~dydit.diffusion.guidance.guided`
  wrapper); it always receives *original* timesteps in [0, T).
- ``noise``: (B, C, H, W) the initial x_T. ``diffusion``: the full process (usually T = 1000).
- ``steps``: how many network evaluations and where: an int N (N evenly spaced original timesteps,
  including 0 and T-1), ``"ddimN"`` (DDIM striding), ``"10,20"`` or an explicit list of timesteps.
- ``generators``: one ``torch.Generator`` per image; every per-step noise of image b comes from
  ``generators[b]`` (so an image does not depend on its batch neighbours). None: the global RNG.

Swapping samplers is a one-word edit of the ``SAMPLERS`` registry key. All three use N network
evaluations for N steps and end with the prediction of x_0 at the last (smallest) timestep.

**Which times a sampler evaluates** is declared once, beside the sampler: each registry entry is a
:class:`RegisteredSampler` whose ``times(process, steps, **options)`` lists the time the network
receives at each evaluation, in order (one entry per evaluation). Here every sampler walks the
respaced process ``respace(diffusion, steps)`` from its last step down, so its times are that
process's ``timestep_map`` reversed. A DyDiT's width plan, ``dydit flops`` and ``dydit sample
--dry-run`` ask these functions (through :meth:`dydit.sample.SamplingSettings.network_times`);
tests/test_sampler_times.py runs every registered sampler and checks they agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dydit.diffusion.gaussian import GaussianDiffusion, ModelFn
from dydit.diffusion.respace import respace
from dydit.diffusion.schedules import Steps

DEFAULT_STEPS = 250  # DiT's and DyDiT's reported FIDs use 250 respaced DDPM steps (docs/METHOD.md §7.2)


class Sampler(Protocol):
    def __call__(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        diffusion: GaussianDiffusion,
        steps: Steps = DEFAULT_STEPS,
        *,
        model_kwargs: dict[str, Any] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
    ) -> Tensor: ...


@dataclass(frozen=True)
class RegisteredSampler:
    """A sampler and the times it evaluates the network at, declared together.

    ``entry(model_fn, noise, process, steps, **options)`` runs ``entry.run``; ``entry.times(process,
    steps, **options)`` is the time the network receives at each of its evaluations, in order (an
    empty list when they are not known in advance: the adaptive flow solver). ``times`` takes the
    sampler's own options too (those that do not move the grid are ignored), so one set of options
    serves both. ``summary``: a few words for ``--help`` (empty: the name says it).
    """

    run: Callable[..., Tensor]
    times: Callable[..., list[Any]]
    summary: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.run(*args, **kwargs)


def randn_per_image(like: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like ``like``; row b drawn from ``generators[b]`` if given.

    Noise is drawn in float32 on each generator's device, then moved to ``like``'s device and dtype,
    so a seed gives the same noise whatever the batch, device or compute dtype.
    """
    if generators is None:
        return torch.randn_like(like)
    if len(generators) != like.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {like.shape[0]}")
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def respaced_times(diffusion: GaussianDiffusion, steps: Steps = DEFAULT_STEPS, **_options: Any) -> list[int]:
    """The original timesteps the DDPM samplers evaluate with ``steps``, in order (largest first):
    the ``timestep_map`` of ``respace(diffusion, steps)``, walked from its last step down as
    :func:`_steps_desc` does. The samplers' other options do not move the grid."""
    return respace(diffusion, steps).timestep_map.flip(0).tolist()


def _steps_desc(d: GaussianDiffusion, noise: Tensor, progress: bool, name: str):
    """(index, t) pairs from the last step of the respaced process ``d`` down to step 0."""
    for i in tqdm(range(d.num_timesteps - 1, -1, -1), desc=name, disable=not progress, leave=False):
        yield i, torch.full((noise.shape[0],), i, device=noise.device, dtype=torch.long)


def _predict_x0(d: GaussianDiffusion, model_fn, x, t, model_kwargs, clip_denoised) -> Tensor:
    eps, _ = d.split_output(d.call_model(model_fn, x, t, model_kwargs), x)
    x0 = d.predict_x0_from_eps(x, t, eps)
    return x0.clamp(-1, 1) if clip_denoised else x0


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    steps: Steps = DEFAULT_STEPS,
    *,
    model_kwargs: dict[str, Any] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> Tensor:
    """Ancestral sampling x_{t-1} ~ p_θ(x_{t-1} | x_t) on the respaced process (DDPM Alg. 2, with the
    learned variance of iDDPM). No noise is added at the last step."""
    d = respace(diffusion, steps)
    x = noise
    for i, t in _steps_desc(d, noise, progress, "ddpm"):
        out = d.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised=clip_denoised)
        x = out["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * out["log_variance"]) * randn_per_image(x, generators)
    return x


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    steps: Steps = DEFAULT_STEPS,
    *,
    model_kwargs: dict[str, Any] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ²) ε̂ + σ z with
    σ = η √((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_{t-1}). η = 0 is deterministic."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    d = respace(diffusion, steps)
    x = noise
    for i, t in _steps_desc(d, noise, progress, "ddim"):
        x0 = _predict_x0(d, model_fn, x, t, model_kwargs, clip_denoised)
        eps = d.predict_eps_from_x0(x, t, x0)
        abar, abar_prev = float(d.alphas_cumprod[i]), float(d.alphas_cumprod_prev[i])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if i > 0 and sigma > 0:
            x = x + sigma * randn_per_image(x, generators)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    noise: Tensor,
    diffusion: GaussianDiffusion,
    steps: Steps = DEFAULT_STEPS,
    *,
    model_kwargs: dict[str, Any] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, data prediction, on the discrete schedule.

    With α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t), λ_t = log(α_t / σ_t), h_i = λ_{t_i} - λ_{t_{i-1}} and
    r_i = h_{i-1} / h_i:
        D_i = (1 + 1/(2 r_i)) x̂_0(t_{i-1}) - 1/(2 r_i) x̂_0(t_{i-2})   (D_1 = x̂_0(t_0))
        x_{t_i} = (σ_{t_i} / σ_{t_{i-1}}) x_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) D_i.
    The update into the smallest timestep is first order, like DPM-Solver's ``lower_order_final``: on
    evenly spaced timesteps that update spans by far the largest λ gap (λ jumps from about 1.7 to 4.6
    at 20 steps), where extrapolating x̂_0 from the previous step overshoots; with it the solver beats
    DDIM at equal steps on an analytic model (tests/test_samplers.py). The last evaluation, at the
    smallest timestep, returns its x̂_0. Deterministic (``generators`` is accepted for the common
    signature and unused).
    """
    d = respace(diffusion, steps)
    alpha = d.sqrt_alphas_cumprod.tolist()
    sigma = d.sqrt_one_minus_alphas_cumprod.tolist()
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    x = noise
    prev_x0: Tensor | None = None
    prev_h = 0.0
    for i, t in _steps_desc(d, noise, progress, "dpm++2m"):
        x0 = _predict_x0(d, model_fn, x, t, model_kwargs, clip_denoised)
        if i == 0:
            return x0
        h = lam[i - 1] - lam[i]
        if prev_x0 is None or i == 1:
            denoised = x0  # first order on the first and the last update (see the docstring)
        else:
            r = prev_h / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * denoised
        prev_x0, prev_h = x0, h
    return x


SAMPLERS: dict[str, RegisteredSampler] = {
    "ddpm": RegisteredSampler(sample_ddpm, respaced_times),
    "ddim": RegisteredSampler(sample_ddim, respaced_times),
    "dpm++2m": RegisteredSampler(sample_dpmpp_2m, respaced_times),
}
