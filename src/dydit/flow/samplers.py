"""Samplers for flow-matching models: Euler and Heun ODE, an adaptive ODE solver, Euler–Maruyama SDE.

They share the signature of the diffusion samplers (:mod:`dydit.diffusion.samplers`) with a
:class:`~dydit.flow.Transport` in place of the diffusion::

    sampler(model_fn, noise, transport, steps, *, model_kwargs=None, generators=None,
            progress=False, **options) -> x_data

- ``model_fn(x, t, **model_kwargs)``: the network (or a guidance wrapper); it receives the flow time
  t ∈ [0, 1] as a (B,) float tensor, every image of a call at the same t.
- ``noise``: (B, C, H, W), the sample at t = 0. The samplers integrate forward to t = 1 (data).
- ``steps``: an int N, the number of steps of the uniform grid on ``transport.interval``.
- ``generators``: one ``torch.Generator`` per image for the SDE's noise (ignored by the ODEs).

Network evaluations (NFE, what the compute of a run is proportional to; :func:`evaluations`):
Euler N, Heun 2N, Euler–Maruyama N (N − 1 stochastic steps on [t0, t1 − δ] and a last deterministic
Euler step of length δ, SiT's ``last_step="Euler"``), adaptive: as many as the solver needs (count
them with a wrapper). Fixed-step samplers give each image the same result whatever its batch; the
adaptive solver controls its step size on the whole batch, so there an image depends on its batch
neighbours up to the tolerance.

Conventions against the official SiT code (``transport/transport.py``, ``integrators.py``;
docs/METHOD.md §3.6):

- ODE step counts: SiT's ``sample_ode(num_steps=M)`` builds ``linspace(t0, t1, M)``, M grid
  *points*, so its fixed-grid solvers take M − 1 steps: SiT's M = N + 1 is dydit's N. (For dopri5,
  SiT's ``num_steps`` only sets the output points; the solver picks its own steps, as here.)
- SDE step counts agree: SiT's ``sample_sde(num_steps=N)`` also makes N − 1 Euler–Maruyama steps
  on ``linspace(t0, 1 − δ, N)`` and one last step, N evaluations.
- The SDE's last step: dydit takes SiT's ``last_step="Euler"`` (x + δ·v, the probability-flow
  velocity only), not SiT's default ``"Mean"`` (x + δ·(v + w_t ∇log p_t), the SDE drift without
  noise); ``last_step=δ`` here is SiT's ``last_step_size``.
- The SDE's end point: SiT ends every SDE at t = 1 (its grid stops at 1 − δ whatever the
  prediction); dydit ends at ``transport.interval[1]``, which is 1 for velocity models and
  1 − eps = 0.999 for noise and score models (the grid stops at 0.999 − δ). Both start at
  ``interval[0]``: 0, or eps = 10⁻³ for noise and score.
- The ODEs use ``transport.interval`` as SiT's ``sample_ode`` does: [0, 1] for velocity, [eps, 1 − eps]
  for noise and score.

Each sampler walks a grid built by one function (:func:`ode_grid`, :func:`sde_grid`), and its
registry entry (:class:`~dydit.diffusion.samplers.RegisteredSampler`) derives from the same grid
``times(transport, steps, **options)``: the float32 time of each network evaluation, in order,
what a DyDiT's width plan is keyed by (tests/test_sampler_times.py checks each against a run).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dydit.diffusion.samplers import SAMPLERS, RegisteredSampler, randn_per_image
from dydit.errors import DyditError
from dydit.flow.transport import Transport

DEFAULT_LAST_STEP = 0.04  # δ, the deterministic last step of the SDE sampler (SiT's default)
VP_LAST_STEP = 1e-3  # ... and on the VP path (U-ViT's euler_maruyama: eps = 1e-3)
VP_DPM_EPS = 1e-4  # where DPM-Solver++ ends on the VP path, s = 1e-4 (U-ViT's DPM-Solver)


class FlowSampler(Protocol):
    def __call__(
        self,
        model_fn: Any,
        noise: Tensor,
        transport: Transport,
        steps: int,
        *,
        model_kwargs: dict[str, Any] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
    ) -> Tensor: ...


def _check(transport: Any, steps: Any, minimum: int = 1) -> int:
    if not isinstance(transport, Transport):
        raise DyditError(
            f"flow samplers need a flow-matching model (a Transport), got {type(transport).__name__}: "
            f"use a DDPM sampler ({', '.join(SAMPLERS)}) for this model"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise DyditError(f"flow samplers take a number of steps >= {minimum}, got {steps!r}")
    return steps


def _velocity(
    model_fn, transport: Transport, x: Tensor, t: float, model_kwargs, net_dtype: torch.dtype | None = None
) -> Tensor:
    """The velocity at (x, t) in the dtype of x. The network gets x in ``net_dtype`` (default: x's
    own) and float32 times; its output is turned into a velocity in float32, or float64 for a
    float64 x."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)  # (B,)
    x_net = x if net_dtype is None else x.to(net_dtype)
    out = model_fn(x_net, transport.original_timesteps(tt), **(model_kwargs or {}))
    work = torch.promote_types(x.dtype, torch.float32)
    return transport.velocity(out.to(work), x.to(work), tt).to(x.dtype)


def _check_last_step(transport: Transport, last_step: float) -> None:
    t0, t1 = transport.interval
    if not 0 < last_step < t1 - t0:
        raise DyditError(f"last_step must be in (0, {t1 - t0}), got {last_step}")


def _uniform(t0: float, t1: float, n: int) -> list[float]:
    """The n + 1 points of the uniform grid of n steps on [t0, t1], in float64."""
    return torch.linspace(t0, t1, n + 1, dtype=torch.float64).tolist()


def ode_grid(transport: Transport, steps: int) -> list[float]:
    """The N + 1 points Euler and Heun step through: N uniform steps on ``transport.ode_interval``."""
    n = _check(transport, steps)
    return transport.warp(_uniform(*transport.ode_interval, n))  # FLUX's time shift (transport.py)


def sde_grid(transport: Transport, steps: int, last_step: float = DEFAULT_LAST_STEP) -> list[float]:
    """The N points of the SDE sampler's N − 1 stochastic steps on [t0, t1 − δ] (δ = ``last_step``);
    its last, deterministic step goes from the final point, t1 − δ, to t1."""
    n = _check(transport, steps, minimum=2)
    _check_last_step(transport, last_step)
    t0, t1 = transport.interval
    return _uniform(t0, t1 - last_step, n - 1)


def _pairs(grid: list[float], progress: bool, name: str) -> Iterator[tuple[float, float]]:
    """Consecutive (t, t_next) points of ``grid``."""
    for i in tqdm(range(len(grid) - 1), desc=name, disable=not progress, leave=False):
        yield grid[i], grid[i + 1]


def _network_times(times: list[float], transport: Transport) -> list[float]:
    """The times as the network receives them: the samplers hand it float32 (:func:`_velocity`),
    through the transport's clock (t itself, or U-ViT's 999·(1 − t))."""
    return transport.original_timesteps(torch.tensor(times, dtype=torch.float32)).tolist()


def euler_times(transport: Transport, steps: int, **_options: Any) -> list[float]:
    """Euler evaluates at each grid point but the last: N times."""
    return _network_times(ode_grid(transport, steps)[:-1], transport)


def heun_times(transport: Transport, steps: int, **_options: Any) -> list[float]:
    """Heun evaluates at both ends of each step: 2N times (inner points twice)."""
    grid = ode_grid(transport, steps)
    return _network_times([t for pair in zip(grid[:-1], grid[1:]) for t in pair], transport)


def sde_times(
    transport: Transport, steps: int, *, last_step: float | None = None, **_options: Any
) -> list[float]:
    """Euler–Maruyama evaluates at each point of its grid, the last (t1 − δ) for the final step: N times."""
    return _network_times(sde_grid(transport, steps, _last_step(transport, last_step)), transport)


def dpm_times(transport: Transport, steps: int, **_options: Any) -> list[float]:
    """DPM-Solver++(2M) evaluates at each of its N grid points."""
    return _network_times(dpm_grid(transport, steps), transport)


def adaptive_times(transport: Transport, steps: int = 0, **_options: Any) -> list[float]:
    """Not known in advance (the solver picks them): empty. A sliced engine plans each on first use."""
    _check(transport, max(int(steps), 1))
    return []


@torch.no_grad()
def sample_euler(
    model_fn, noise: Tensor, transport: Transport, steps: int = 50, *, model_kwargs=None,
    generators=None, progress: bool = False,
) -> Tensor:  # fmt: skip
    """Explicit Euler on dx/dt = v(x, t): first order, N evaluations."""
    x = noise
    for t, t_next in _pairs(ode_grid(transport, steps), progress, "euler"):
        x = x + (t_next - t) * _velocity(model_fn, transport, x, t, model_kwargs)
    return x


@torch.no_grad()
def sample_heun(
    model_fn, noise: Tensor, transport: Transport, steps: int = 50, *, model_kwargs=None,
    generators=None, progress: bool = False,
) -> Tensor:  # fmt: skip
    """Heun's method (explicit trapezoid): second order, 2N evaluations."""
    x = noise
    for t, t_next in _pairs(ode_grid(transport, steps), progress, "heun"):
        h = t_next - t
        v = _velocity(model_fn, transport, x, t, model_kwargs)
        v_next = _velocity(model_fn, transport, x + h * v, t_next, model_kwargs)
        x = x + 0.5 * h * (v + v_next)
    return x


def _last_step(transport: Transport, last_step: float | None) -> float:
    """δ of the SDE's last step: SiT's 0.04, or for the VP path the 10⁻³ of U-ViT's sampler."""
    if last_step is not None:
        return last_step
    return VP_LAST_STEP if transport.path == "vp" else DEFAULT_LAST_STEP


@torch.no_grad()
def sample_sde(
    model_fn, noise: Tensor, transport: Transport, steps: int = 250, *, model_kwargs=None,
    generators: Sequence[torch.Generator] | None = None, progress: bool = False,
    diffusion_norm: float = 1.0, last_step: float | None = None,
) -> Tensor:  # fmt: skip
    """Euler–Maruyama on dx = [v + w_t ∇log p_t] dt + √(2 w_t) dW with w_t = norm·σ_t (SiT's default
    ``sigma`` diffusion form) on [t0, t1 − δ], then a last deterministic Euler step of length
    δ = ``last_step`` into t1 with the velocity alone: no noise and no score term (SiT's
    ``last_step="Euler"``; SiT's default ``"Mean"`` would add δ·w_t ∇log p_t). [t0, t1] is
    ``transport.interval``: noise and score models end at 1 − eps where SiT ends at 1 (module docstring).

    The VP path takes w_t = norm·½β(s) (:meth:`~dydit.flow.Transport.sde_weight`), which with norm 1
    is the reverse-time VP SDE that U-ViT's ``euler_maruyama`` integrates, with U-ViT's grid (N = 1000:
    s = 1, ..., 10⁻³ evenly, δ = 10⁻³) and its last step, the SDE drift without noise (SiT's "Mean").

    The SDE has the marginals of the probability-flow ODE dx = v dt; N ≥ 2 evaluations.
    """
    last_step = _last_step(transport, last_step)
    grid = sde_grid(transport, steps, last_step)
    if not diffusion_norm >= 0:
        raise DyditError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    x = noise

    def drift_and_weight(x: Tensor, t: float) -> tuple[Tensor, float]:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        v = _velocity(model_fn, transport, x, t, model_kwargs)
        w = diffusion_norm * float(transport.sde_weight(tt[:1]))
        if transport.path != "vp":  # w_t ∇log p = norm · σ_t ∇log p
            return v + diffusion_norm * transport.sigma_score(v, x, tt), w
        sigma = float(transport.coefficients(tt[:1])[1])
        return v + (w / sigma) * transport.sigma_score(v, x, tt), w

    for t, t_next in _pairs(grid, progress, "sde"):
        h = t_next - t
        drift, w = drift_and_weight(x, t)
        x = x + h * drift + (2 * w * h) ** 0.5 * randn_per_image(x, generators)
    if transport.path == "vp":
        return x + last_step * drift_and_weight(x, grid[-1])[0]
    return x + last_step * _velocity(model_fn, transport, x, grid[-1], model_kwargs)


def dpm_grid(transport: Transport, steps: int) -> list[float]:
    """The N points DPM-Solver++(2M) evaluates: N − 1 steps uniform in the half log-SNR λ_t (DPM-Solver's
    ``logSNR`` spacing) over ``transport.ode_interval``, kept within [eps, 1 − eps] where the path is pure
    noise or pure data at an end; the VP path ends at s = 10⁻⁴, as U-ViT's DPM-Solver does."""
    n = _check(transport, steps, minimum=2)
    t0, t1 = transport.ode_interval
    if transport.path == "vp" and transport.prediction != "velocity":
        t1 = 1 - VP_DPM_EPS
    ends = transport.coefficients(torch.tensor([t0, t1], dtype=torch.float64))
    t0 = max(t0, transport.eps) if float(ends[0][0]) <= 0 else t0
    t1 = min(t1, 1 - transport.eps) if float(ends[1][1]) <= 0 else t1
    lo, hi = _half_log_snr(transport, torch.tensor([t0, t1], dtype=torch.float64)).tolist()
    target = torch.linspace(lo, hi, n, dtype=torch.float64)
    a, b = torch.full_like(target, t0), torch.full_like(target, t1)
    for _ in range(60):  # bisection: λ_t increases with t (toward the data)
        mid = (a + b) / 2
        below = _half_log_snr(transport, mid) < target
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    grid = ((a + b) / 2).tolist()
    grid[0], grid[-1] = t0, t1
    return grid


def _half_log_snr(transport: Transport, t: Tensor) -> Tensor:
    alpha, sigma, _, _ = transport.coefficients(t)
    return torch.log(alpha) - torch.log(sigma)


@torch.no_grad()
def sample_dpm(
    model_fn, noise: Tensor, transport: Transport, steps: int = 50, *, model_kwargs=None,
    generators=None, progress: bool = False,
) -> Tensor:  # fmt: skip
    """DPM-Solver++(2M) (Lu et al. 2022) on the path's half log-SNR λ_t = log(α_t / σ_t), with the
    data prediction x̂ = (x − σ_t ε̂) / α_t, on :func:`dpm_grid` (uniform in λ); first order on the
    first and the last update, and the last evaluation returns its x̂ (as
    :func:`dydit.diffusion.sample_dpmpp_2m` on the discrete process). N evaluations; deterministic.
    U-ViT samples its VP models with DPM-Solver (third order, "fast", 50 steps, the same spacing)."""
    grid = dpm_grid(transport, steps)
    coeffs = [transport.coefficients(torch.tensor([t], dtype=torch.float64)) for t in grid]
    alpha, sigma = [float(c[0]) for c in coeffs], [float(c[1]) for c in coeffs]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    x, prev_x0, prev_h = noise, None, 0.0
    for i in tqdm(range(len(grid)), desc="dpm++", disable=not progress, leave=False):
        v = _velocity(model_fn, transport, x, grid[i], model_kwargs)
        x0 = (x - sigma[i] * _noise_from_velocity(transport, v, x, grid[i])) / alpha[i]
        if i == len(grid) - 1:
            return x0
        h = lam[i + 1] - lam[i]
        if prev_x0 is None or i == len(grid) - 2:
            denoised = x0
        else:
            r = prev_h / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * denoised
        prev_x0, prev_h = x0, h
    return x


def _noise_from_velocity(transport: Transport, v: Tensor, x: Tensor, t: float) -> Tensor:
    """E[ε | x] from the velocity: −σ_t ∇log p_t (:meth:`~dydit.flow.Transport.sigma_score`)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    return -transport.sigma_score(v, x, tt)


@torch.no_grad()
def sample_adaptive(
    model_fn, noise: Tensor, transport: Transport, steps: int = 0, *, model_kwargs=None,
    generators=None, progress: bool = False, method: str = "dopri5", atol: float = 1e-6,
    rtol: float = 1e-3,
) -> Tensor:  # fmt: skip
    """An adaptive ODE solver from ``torchdiffeq`` (``pip install 'dydit[flow]'``), dopri5 by default
    with SiT's tolerances. ``steps`` is ignored (the solver picks its own); 0 is accepted.

    The solver's state, time and error control stay in float64; the network sees every state cast
    to the dtype of ``noise`` (the model's dtype: float32 weights reject float64 inputs) and its
    velocity is cast back to float64. The result has the dtype of ``noise``.
    """
    _check(transport, max(int(steps), 1))
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise DyditError("the adaptive sampler needs torchdiffeq: pip install 'dydit[flow]'") from None
    t0, t1 = transport.ode_interval
    model_dtype = noise.dtype

    def f(t: Tensor, x: Tensor) -> Tensor:  # x: the solver's float64 state; the network: model_dtype
        return _velocity(model_fn, transport, x, float(t), model_kwargs, net_dtype=model_dtype)

    times = torch.tensor([t0, t1], dtype=torch.float64, device=noise.device)
    return odeint(f, noise.double(), times, method=method, atol=atol, rtol=rtol)[-1].to(noise.dtype)


FLOW_SAMPLERS: dict[str, RegisteredSampler] = {
    "euler": RegisteredSampler(sample_euler, euler_times),
    "heun": RegisteredSampler(sample_heun, heun_times, "2 network evaluations per step"),
    "sde": RegisteredSampler(sample_sde, sde_times, "Euler-Maruyama"),
    "adaptive": RegisteredSampler(sample_adaptive, adaptive_times, "dopri5, needs torchdiffeq"),
    "dpm++": RegisteredSampler(sample_dpm, dpm_times, "DPM-Solver++(2M) on log-SNR"),
}


def evaluations(sampler: str, steps: int) -> int | None:
    """Network evaluations of a fixed-step flow sampler for ``steps`` steps (None: adaptive): the
    length of its declared times."""
    if sampler not in FLOW_SAMPLERS:
        raise DyditError(f"unknown flow sampler {sampler!r}; choose one of {', '.join(FLOW_SAMPLERS)}")
    return len(FLOW_SAMPLERS[sampler].times(Transport(), steps)) or None


def flow_times(
    sampler: str, steps: int, transport: Transport, *, last_step: float | None = None
) -> list[float]:
    """The distinct times (ascending t, from the noise end) a fixed-step sampler evaluates the network
    at: its declared ``times`` without repeats.

    What a DyDiT's width plan must cover. ``last_step`` is the SDE sampler's δ (give the value the
    sampler runs with; ignored by the ODEs). Empty for the adaptive solver (its times are not known
    in advance; the sliced engine then plans each new time on first use).
    """
    evaluations(sampler, steps)
    return list(dict.fromkeys(FLOW_SAMPLERS[sampler].times(transport, steps, last_step=last_step)))
