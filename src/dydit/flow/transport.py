"""Flow matching (stochastic interpolants, SiT; docs/METHOD.md §3.6, §10): the path, the parameterisation
and the training loss.

**Time convention (the SiT one).** t ∈ [0, 1]; t = 0 is pure noise and t = 1 is data:

    x_t = α_t · x_data + σ_t · ε,        ε ~ N(0, I)

- ``linear`` (rectified flow, SiT's default): α_t = t, σ_t = 1 − t.
- ``gvp`` (generalised variance preserving): α_t = sin(πt/2), σ_t = cos(πt/2), so α² + σ² = 1.

The velocity of the path is u_t = α'_t x_data + σ'_t ε; the network predicts (``prediction``):

- ``velocity`` (the default): v_θ(x_t, t) ≈ E[u_t | x_t]; loss ‖v_θ − u_t‖².
- ``noise``: ε_θ(x_t, t) ≈ E[ε | x_t]; loss ‖ε_θ − ε‖².
- ``score``: s_θ(x_t, t) ≈ ∇ log p_t(x_t) = −E[ε | x_t] / σ_t; trained as ‖σ_t s_θ + ε‖², the
  σ_t²-weighted score loss (unweighted, its target −ε/σ_t is unbounded as t → 1).

Each is turned into a velocity for sampling by :meth:`Transport.velocity`. Noise and score predictions
cannot give the velocity at t = 0 (α_0 = 0) nor the noise at t = 1 (σ_1 = 0), so they train and
sample on [eps, 1 − eps] (``Transport.interval``); velocity uses the whole [0, 1].

**What the network sees.** The model receives t itself, a float in [0, 1], through DiT's sinusoidal
timestep embedder (built for integer steps 0…999). This is what SiT does, and it is what the released
SiT checkpoints were trained with, so it is what loads them faithfully; the MLP after the sinusoidal
features learns the scale. The routers of a DyDiT on a flow model therefore see the flow-time
embedding, and its width plans are keyed by the float times of the sampler's grid.

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

Path = Literal["linear", "gvp"]
Prediction = Literal["velocity", "noise", "score"]
PATHS: tuple[str, ...] = FLOW_PATHS  # the registry a model config is checked against (dydit.presets)
PREDICTIONS: tuple[str, ...] = FLOW_PREDICTIONS
DEFAULT_EPS = 1e-3  # the end-point margin of noise/score predictions (SiT's train/sample eps)


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

    def __post_init__(self) -> None:
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
        half_pi = math.pi / 2
        return (
            torch.sin(half_pi * t),
            torch.cos(half_pi * t),
            half_pi * torch.cos(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
        )

    @property
    def interval(self) -> tuple[float, float]:
        """The times [t0, t1] the network is trained on and sampled between."""
        return (0.0, 1.0) if self.prediction == "velocity" else (self.eps, 1.0 - self.eps)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α_t x0 + σ_t ε; ``x0`` is the data (the DDPM name), t (B,) in [0, 1]."""
        alpha, sigma, _, _ = self.coefficients(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    def original_timesteps(self, t: Tensor) -> Tensor:
        """The time the network receives: t itself (see the module docstring)."""
        return t

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network is regressed on at (x0, t, ε) for this ``prediction``."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        if self.prediction == "velocity":
            return _expand(d_alpha, x0) * x0 + _expand(d_sigma, x0) * noise
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
            return pred
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
