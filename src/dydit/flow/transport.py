"""Flow matching (stochastic interpolants, SiT; docs/METHOD.md §3.6, §10): the path, the parameterisation
and the training loss.

**Time convention (the SiT one).** t ∈ [0, 1]; t = 0 is pure noise and t = 1 is data:

    x_t = α_t · x_data + σ_t · ε,        ε ~ N(0, I)

- ``linear`` (rectified flow, SiT's default): α_t = t, σ_t = 1 − t.
- ``gvp`` (generalised variance preserving): α_t = sin(πt/2), σ_t = cos(πt/2), so α² + σ² = 1.
- ``vp``: the variance-preserving SDE of score-based models with a linear β(s) from β_0 = 0.1 to
  β_1 = 20 in the diffusion time s = 1 − t: α_t = exp(−¼ s² (β_1 − β_0) − ½ s β_0), σ_t = √(1 − α_t²)
  (SiT's VP path, and the continuous process of U-ViT's pixel and L models, docs/METHOD.md §16.2).

The velocity of the path is u_t = α'_t x_data + σ'_t ε; the network predicts (``prediction``):

- ``velocity`` (the default): v_θ(x_t, t) ≈ E[u_t | x_t]; loss ‖v_θ − u_t‖².
- ``noise``: ε_θ(x_t, t) ≈ E[ε | x_t]; loss ‖ε_θ − ε‖².
- ``score``: s_θ(x_t, t) ≈ ∇ log p_t(x_t) = −E[ε | x_t] / σ_t; trained as ‖σ_t s_θ + ε‖², the
  σ_t²-weighted score loss (unweighted, its target −ε/σ_t is unbounded as t → 1).

Each is turned into a velocity for sampling by :meth:`Transport.velocity`. Noise and score predictions
cannot give the velocity at t = 0 (α_0 = 0) nor the noise at t = 1 (σ_1 = 0), so they train and
sample on [eps, 1 − eps] (``Transport.interval``); velocity uses the whole [0, 1].

**What the network sees** (``clock``). ``"flow"``: the model receives t itself, a float in [0, 1],
through DiT's sinusoidal timestep embedder (built for integer steps 0…999). This is what SiT does,
and it is what the released SiT checkpoints were trained with, so it is what loads them faithfully;
the MLP after the sinusoidal features learns the scale. The routers of a DyDiT on a flow model
therefore see the flow-time embedding, and its width plans are keyed by the float times of the
sampler's grid. ``"sde999"``: it receives 999·s = 999·(1 − t), as U-ViT's score model hands its
network the diffusion time (width plans are then keyed by those values). ``"flux"``: FLUX's own
convention (docs/METHOD.md §15.1, §17.6): the network receives σ = 1 − t (1 is noise) and predicts
noise − data, the negative of u_t on the linear path; :meth:`Transport.target` and
:meth:`Transport.velocity` flip the sign, so the samplers and the loss are unchanged. ``shift`` s is
FLUX's time shift (``e^μ``, FluxPipeline's resolution-dependent μ): the ODE grids of the samplers are
uniform in σ and then warped σ -> s·σ / (1 + (s − 1)·σ), spending more steps near noise
(:meth:`Transport.warp`); 1 leaves them uniform.

Only the first C output channels are used (C = channels of x): the released SiT-XL/2 keeps DiT's
learned-sigma head of 2C channels and ignores the second half, and so do we.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dydit.errors import DyditError
from dydit.presets import FLOW_PATHS, FLOW_PREDICTIONS

Path = Literal["linear", "gvp", "vp"]
Prediction = Literal["velocity", "noise", "score"]
PATHS: tuple[str, ...] = FLOW_PATHS  # the registry a model config is checked against (dydit.presets)
PREDICTIONS: tuple[str, ...] = FLOW_PREDICTIONS
DEFAULT_EPS = 1e-3  # the end-point margin of noise/score predictions (SiT's train/sample eps)
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0  # β(s) of the VP path (score SDEs, SiT, U-ViT)
CLOCKS: tuple[str, ...] = ("flow", "sde999", "flux")


def _expand(c: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) in the dtype of ``like``, for broadcasting against images."""
    return c.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class Transport:
    """The interpolant path plus what the network predicts (see the module docstring).

    It offers the training seam of :class:`~dydit.diffusion.GaussianDiffusion` (``q_sample``,
    ``original_timesteps``, ``loss_terms``), so the training step calls either one the same way,
    and the conversions the flow samplers need (``velocity``, ``sigma_score``).
    """

    path: Path = "linear"
    prediction: Prediction = "velocity"
    eps: float = DEFAULT_EPS
    clock: str = "flow"
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise DyditError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if not self.shift > 0:
            raise DyditError(f"the time shift must be positive, got {self.shift}")
        if self.path not in PATHS:
            raise DyditError(f"flow path must be one of {PATHS}, got {self.path!r}")
        if self.prediction not in PREDICTIONS:
            raise DyditError(f"flow prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0 <= self.eps < 0.5:
            raise DyditError(f"eps must be in [0, 0.5), got {self.eps}")

    # The path ------------------------------------------------------------------------------
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α_t, σ_t, α'_t, σ'_t), each shaped like ``t``."""
        if self.path == "linear":
            one = torch.ones_like(t)
            return t, 1 - t, one, -one
        if self.path == "vp":
            s = 1 - t
            half_integral = 0.25 * s**2 * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * s * VP_BETA_MIN  # ½∫β
            alpha, sigma = torch.exp(-half_integral), torch.sqrt(-torch.expm1(-2 * half_integral))
            d_alpha = 0.5 * self.beta(t) * alpha  # d/dt = −d/ds
            return alpha, sigma, d_alpha, -alpha * d_alpha / sigma
        half_pi = math.pi / 2
        return (
            torch.sin(half_pi * t),
            torch.cos(half_pi * t),
            half_pi * torch.cos(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
        )

    @staticmethod
    def beta(t: Tensor) -> Tensor:
        """β(s) of the VP path at s = 1 − t: linear from β_0 (data) to β_1 (noise)."""
        return VP_BETA_MIN + (1 - t) * (VP_BETA_MAX - VP_BETA_MIN)

    @property
    def interval(self) -> tuple[float, float]:
        """The times [t0, t1] the network is trained on and the SDE sampler runs between. The VP path
        keeps α_t > 0 everywhere, so it uses all of [0, 1], as U-ViT trains and samples (its last,
        deterministic step reaches the data end, where σ = 0, without evaluating the network there)."""
        if self.prediction == "velocity" or self.path == "vp":
            return (0.0, 1.0)
        return (self.eps, 1.0 - self.eps)

    @property
    def ode_interval(self) -> tuple[float, float]:
        """Where the ODE samplers evaluate the network: :attr:`interval`, stopping at 1 − eps for a
        noise or score prediction (their velocity is infinite where σ = 0)."""
        t0, t1 = self.interval
        return (t0, t1) if self.prediction == "velocity" else (t0, min(t1, 1.0 - self.eps))

    def sde_weight(self, t: Tensor) -> Tensor:
        """w_t of the SDE sampler (drift v + w_t ∇log p, noise √(2 w_t) dW): SiT's σ_t, or for the VP
        path ½β(s), which makes it the reverse-time VP SDE (dx = [f − g² ∇log p] ds + g dW̄, g² = β)."""
        return 0.5 * self.beta(t) if self.path == "vp" else self.coefficients(t)[1]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α_t x0 + σ_t ε; ``x0`` is the data (the DDPM name), t (B,) in [0, 1]."""
        alpha, sigma, _, _ = self.coefficients(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    def original_timesteps(self, t: Tensor) -> Tensor:
        """The time the network receives: t itself, 999·(1 − t) or FLUX's σ = 1 − t (``clock``)."""
        if self.clock == "flux":
            return 1 - t
        return t if self.clock == "flow" else 999 * (1 - t)

    @property
    def sign(self) -> float:
        """−1 where the network predicts noise − data (FLUX's clock), else 1."""
        return -1.0 if self.clock == "flux" else 1.0

    def warp(self, points: list[float]) -> list[float]:
        """A sampler's grid of times under the time shift (module docstring); as is when ``shift`` is 1."""
        if self.shift == 1.0:
            return points
        s = self.shift
        return [1.0 - s * (1.0 - t) / (1.0 + (s - 1.0) * (1.0 - t)) for t in points]

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network is regressed on at (x0, t, ε) for this ``prediction``."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        if self.prediction == "velocity":
            return self.sign * (_expand(d_alpha, x0) * x0 + _expand(d_sigma, x0) * noise)
        return noise if self.prediction == "noise" else -noise / _expand(sigma, x0)

    def loss_terms(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-sample loss (B,): the mean squared error of the prediction (``"loss"`` = ``"mse"``).

        ``out`` is the raw network output (B, C or 2C, H, W); ``x_t`` is unused (the common seam).
        """
        pred = out[:, : x0.shape[1]]
        if self.prediction == "score":  # σ_t² weighting: ‖σ s_θ + ε‖²
            sigma = _expand(self.coefficients(t)[1], x0)
            err = sigma * pred + noise
        else:
            err = pred - self.target(x0, t, noise)
        mse = err.square().flatten(1).mean(1)
        return {"loss": mse, "mse": mse}

    # From the network to the sampler ------------------------------------------------------
    def velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The velocity field at (x, t) implied by the network output ``out`` (first C channels)."""
        pred = out[:, : x.shape[1]]
        if self.prediction == "velocity":
            return pred if self.sign > 0 else -pred
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.coefficients(t))
        noise = pred if self.prediction == "noise" else -sigma * pred
        # x = α x_data + σ ε  =>  x_data = (x − σ ε)/α,  u = α' x_data + σ' ε
        return d_alpha / alpha * (x - sigma * noise) + d_sigma * noise

    def sigma_score(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """σ_t · ∇log p_t(x), written through the velocity v so that it stays finite at σ_t = 0.

        From x = α x_data + σ ε and v = α' x_data + σ' ε: ∇log p = −E[ε|x]/σ, and
        σ ∇log p = (α' x − α v) / (α σ' − α' σ). The SDE sampler's drift is v + w_t ∇log p with the
        diffusion coefficient w_t = norm · σ_t (SiT's ``sigma`` form).
        """
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.coefficients(t))
        return (d_alpha * x - alpha * v) / (alpha * d_sigma - d_alpha * sigma)
