"""Gaussian diffusion with ε-prediction and a learned-range variance (docs/METHOD.md §1.4, §5.1).

Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) (DDPM eq. 4), posterior
q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) with (DDPM eqs. 6-7)

    μ̃_t = β_t √ᾱ_{t-1} / (1 - ᾱ_t) · x_0 + (1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t) · x_t,
    β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t).

The reverse process p_θ(x_{t-1} | x_t) has the posterior mean evaluated at the predicted x_0 and, with
``learn_sigma``, a log-variance interpolated between log β̃_t and log β_t by the extra output channels
v ∈ [-1, 1] (iDDPM eq. 15, "learned range"); without it the variance is fixed to β_t ("fixed large").
The hybrid training loss (iDDPM §3.1) is MSE(ε, ε̂) + L_vb, where L_vb is the KL of eq. 8 of DDPM
(the decoder NLL at t = 0) in bits/dim, evaluated with ε̂ detached so that it trains only v.

Timesteps ``t`` passed to the methods below index *this* process. A respaced process
(:mod:`dydit.diffusion.respace`) keeps a ``timestep_map`` and hands the network the original timestep,
so the network (and DyDiT's routers) always sees t ∈ [0, T).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dydit.errors import DyditError

# model_fn(x, t_original, **model_kwargs) -> (B, C or 2C, H, W); e.g. a DiT called as model(x, t, y=y).
ModelFn = Callable[..., Tensor]

# Half-width of a uint8 bin after mapping [0, 255] to [-1, 1] (discretised decoder, DDPM §3.3).
_BIN_HALF_WIDTH = 1.0 / 255.0
# Data at or beyond these values falls in the first/last bin, which extends to ±infinity.
_EDGE = 0.999
_LOG_EPS = 1e-12


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability of data x ∈ [-1, 1] under N(mean, e^{2·log_scale}) discretised to
    256 uint8 bins (DDPM §3.3); the edge bins extend to ±infinity."""
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + _BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - _BIN_HALF_WIDTH)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log(1 - Φ(lower))
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=_LOG_EPS))
    return torch.where(x < -_EDGE, log_cdf_upper, torch.where(x > _EDGE, log_sf_lower, log_bin))


class GaussianDiffusion:
    """A discrete Gaussian diffusion process defined by its betas.

    Args:
        betas: (T,) noise schedule, float64 (see :func:`~dydit.diffusion.schedules.linear_betas`).
        learn_sigma: the network outputs 2C channels (ε and the variance interpolation v);
            otherwise C channels (ε) and the variance is fixed to β_t.
        timestep_map: (T,) original timestep of each step of this process (identity if None).
    """

    def __init__(
        self, betas: np.ndarray, *, learn_sigma: bool = True, timestep_map: Sequence[int] | None = None
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise DyditError("betas must be a 1-D array with values in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        tmap = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        if tmap.shape != betas.shape:
            raise DyditError("timestep_map must have one entry per step")
        self.timestep_map = torch.as_tensor(tmap, dtype=torch.long)

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # β̃_0 = 0; clip its log to β̃_1 (the decoder step uses the learned interpolation anyway).
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
        arrays = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "one_minus_alphas_cumprod": 1.0 - abar,
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "log_betas": np.log(betas),
            # "Fixed large" variance: β_t, with β̃_1 at t = 0 (a tighter decoder; iDDPM §3.1 / DDPM §3.2).
            "fixed_large_log_variance": np.log(np.append(post_var[1], betas[1:]))
            if len(betas) > 1
            else np.log(betas),
        }
        for name, arr in arrays.items():
            setattr(self, name, torch.as_tensor(arr, dtype=torch.float64))
        self._on_device: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        t = self.timestep_map
        return (
            f"GaussianDiffusion(steps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
            f"timesteps={int(t[0])}..{int(t[-1])})"
        )

    # Helpers --------------------------------------------------------------------------------
    def _at(self, arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """arr[t] as a (B, 1, ..., 1) tensor with the device and dtype of ``like``.

        Coefficients stay float64 and are indexed on ``t``'s device (copies cached per device), so
        sampling on a GPU needs no host synchronisation.
        """
        key = (id(arr), t.device)
        if key not in self._on_device:  # the entry keeps ``arr`` alive, so its id stays unique
            self._on_device[key] = (arr, arr if t.device.type == "cpu" else arr.to(t.device))
        out = self._on_device[key][1][t.long()].to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Map step indices of this process to the original timesteps the network is trained on."""
        return self.timestep_map.to(t.device)[t.long()]

    def call_model(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None
    ) -> Tensor:
        """Run the network at step indices ``t``, handing it the original timesteps."""
        return model_fn(x, self.original_timesteps(t), **(model_kwargs or {}))

    def split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(ε̂, v) from the network output; v is None without a learned variance."""
        c = x.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if out.shape[1] != expected:
            raise ValueError(
                f"model returned {out.shape[1]} channels, expected {expected} for {c} input channels"
            )
        return (out[:, :c], out[:, c:]) if self.learn_sigma else (out, None)

    # Forward process --------------------------------------------------------------------------
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean √ᾱ_t x_0 and variance 1 - ᾱ_t of q(x_t | x_0)."""
        mean = self._at(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, self._at(self.one_minus_alphas_cumprod, t, x0).expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε. Shapes (B, ...) and t (B,)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean μ̃_t, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, x_t) * x0
            + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = self._at(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t."""
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε = (x_t / √ᾱ_t - x_0) / √(1/ᾱ_t - 1)."""
        num = self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0
        return num / self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # Reverse process ------------------------------------------------------------------------------
    def p_mean_variance(
        self,
        model_fn: ModelFn | None,
        x: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        *,
        clip_denoised: bool = False,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Mean and variance of p_θ(x_{t-1} | x_t), plus the predicted x_0 and ε.

        Args:
            model_fn: the network (called with original timesteps); unused if ``model_output`` is given.
            x: (B, C, H, W) x_t. t: (B,) step indices of this process.
            clip_denoised: clamp x̂_0 to [-1, 1] (pixel models; DiT samples latents unclipped).
            model_output: a precomputed network output (B, C or 2C, H, W).
        Returns:
            dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0``, ``eps`` (all like x).
        """
        out = self.call_model(model_fn, x, t, model_kwargs) if model_output is None else model_output
        eps, v = self.split_output(out, x)
        if v is None:
            log_var = self._at(self.fixed_large_log_variance, t, x).expand_as(x)
        else:
            frac = (v + 1) / 2  # v ∈ [-1, 1] -> [0, 1]
            log_var = frac * self._at(self.log_betas, t, x) + (1 - frac) * self._at(
                self.posterior_log_variance_clipped, t, x
            )
        pred_x0 = self.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_var),
            "log_variance": log_var,
            "pred_x0": pred_x0,
            "eps": eps,
        }

    # Training loss ----------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_vb per sample in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for t > 0, the
        discretised decoder NLL -log p_θ(x_0 | x_1) at t = 0. Shape (B,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(None, x_t, t, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss_terms(
        self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor
    ) -> dict[str, Tensor]:
        """Hybrid loss terms (iDDPM) from a network output at (x_t, t). Each value has shape (B,).

        ``mse`` = mean ‖ε - ε̂‖²; ``vb`` = L_vb in bits/dim with ε̂ detached (zero without a learned
        variance); ``loss`` = mse + vb (not rescaled, as in DiT).
        """
        eps, v = self.split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([eps.detach(), v], dim=1)  # L_vb must not train the ε channels
            vb = self.vb_terms_bpd(frozen, x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Noise x_0 to x_t, run ``model_fn(x_t, t, **model_kwargs)`` and return :meth:`loss_terms`.

        Args:
            model_fn: any callable ``(x, t, **kwargs) -> Tensor`` (a DiT, a DDP wrapper, a lambda).
            x0: (B, C, H, W) clean data (latents or pixels). t: (B,) step indices.
            noise: (B, C, H, W) ε; drawn from the global generator if None.
        Returns:
            dict ``loss``, ``mse``, ``vb``, each (B,).
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = self.call_model(model_fn, x_t, t, model_kwargs)
        return self.loss_terms(out, x0, x_t, t, noise)
