"""The processes U-ViT was trained with (docs/METHOD.md §16.2): the continuous VP-SDE (linear β from
0.1 to 20, the network sees 999·s) sampled with Euler–Maruyama (checked step for step against a
hand-written reference of U-ViT's ``sde.euler_maruyama``) or DPM-Solver++, and Stable Diffusion's
discrete scaled-linear betas with t = 1..1000; classifier-free guidance in U-ViT's convention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dydit.diffusion import SAMPLERS, GaussianDiffusion, guided
from dydit.flow import FLOW_SAMPLERS, Transport, create_process
from dydit.presets import get_uvit_config

VP = Transport("vp", "noise", clock="sde999")
DATA_STD = 0.5  # the analytic model's data: N(0, DATA_STD² I)


def cum_alpha(s: torch.Tensor) -> torch.Tensor:
    """U-ViT's VPSDE.cum_alpha: exp(−∫_0^s β), β linear from 0.1 to 20."""
    return torch.exp(-(0.1 * s + (20 - 0.1) * s**2 / 2))


def test_vp_path_is_the_continuous_vp_sde():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = VP.coefficients(t)
    torch.testing.assert_close(alpha**2, cum_alpha(1 - t))
    torch.testing.assert_close(sigma**2, 1 - cum_alpha(1 - t))
    inner, h = t[1:-1], 1e-6  # the derivatives, by central differences
    for k, d in ((0, d_alpha), (1, d_sigma)):
        fd = (VP.coefficients(inner + h)[k] - VP.coefficients(inner - h)[k]) / (2 * h)
        torch.testing.assert_close(d[1:-1], fd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        VP.original_timesteps(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([999.0, 749.25, 0.0])
    )


def analytic_eps(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[ε | x_s] for data N(0, c²): σ x / (α² c² + σ²)."""
    a2 = cum_alpha(s).view(-1, 1, 1, 1)
    return (1 - a2).sqrt() * x / (a2 * DATA_STD**2 + 1 - a2)


def reference_euler_maruyama(x: torch.Tensor, steps: int, gens) -> torch.Tensor:
    """U-ViT's sde.euler_maruyama(ReverseSDE(ScoreModel(nnet, 'noise_pred', VPSDE())), x, steps)."""
    times = torch.tensor(np.append(0.0, np.linspace(1e-3, 1, steps))).to(x)
    for s, t in list(zip(times, times[1:]))[::-1]:
        tt = t.expand(x.shape[0])
        eps = analytic_eps(x, tt)  # the network, called at 999·t (ScoreModel.predict)
        beta = 0.1 + t * (20 - 0.1)
        score = -eps / (1 - cum_alpha(t)).sqrt()
        drift = -0.5 * beta * x - beta * score  # f − g² ∇log p
        dt = s - t
        mean = x + drift * dt
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        x = mean + (beta * -dt).sqrt() * noise if s != 0 else mean
    return x


def test_sde_sampler_on_the_vp_path_is_u_vits_euler_maruyama():
    seen = []

    def model(x, t_net, y=None):
        seen.append(float(t_net[0]))
        return analytic_eps(x, t_net / 999)

    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = 30
    ours = FLOW_SAMPLERS["sde"](
        model, x, VP, steps, generators=[torch.Generator().manual_seed(i) for i in (1, 2)]
    )
    ref = reference_euler_maruyama(x, steps, [torch.Generator().manual_seed(i) for i in (1, 2)])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert seen == pytest.approx(FLOW_SAMPLERS["sde"].times(VP, steps), abs=1e-3)
    assert seen[0] == pytest.approx(999.0) and seen[-1] == pytest.approx(0.999, abs=1e-4)


@pytest.mark.parametrize("sampler,steps", [("dpm++", 50), ("heun", 25), ("euler", 400)])
def test_ode_samplers_on_the_vp_path_reach_the_exact_solution(sampler, steps):
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = (
        x
        * DATA_STD
        / math.sqrt(
            float(cum_alpha(torch.tensor(1.0))) * DATA_STD**2 + 1 - float(cum_alpha(torch.tensor(1.0)))
        )
    )
    out = FLOW_SAMPLERS[sampler](lambda x, t, y=None: analytic_eps(x, t.double() / 999), x, VP, steps)
    assert float((out - exact).abs().max() / exact.abs().max()) < 0.005


def test_stable_diffusion_process_has_scaled_linear_betas_and_one_based_t():
    cfg = get_uvit_config("U-ViT-H/2")
    process = create_process(cfg)
    assert isinstance(process, GaussianDiffusion) and not process.learn_sigma
    betas = (
        np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    )  # eval_ldm_discrete.stable_diffusion_beta_schedule
    np.testing.assert_allclose(process.betas.numpy(), betas, rtol=1e-12)
    seen = []
    process.training_losses(
        lambda x, t, y=None: (seen.append(t), x)[1], torch.zeros(3, 4, 2, 2), torch.tensor([0, 499, 999])
    )
    assert seen[0].tolist() == [1, 500, 1000]  # LSimple: n in 1..1000 with ᾱ_n the n-th product
    times = SAMPLERS["dpm++2m"].times(process, 50)
    assert len(times) == 50 and times[0] == 1000 and times[-1] == 1


def test_create_process_pairs_each_preset_with_its_process():
    for name in ("U-ViT-S/2", "U-ViT-S/4", "U-ViT-M/4", "U-ViT-L/2", "U-ViT-Ti/4"):
        process = create_process(get_uvit_config(name))
        assert process == Transport("vp", "noise", clock="sde999"), name
    assert create_process(get_uvit_config("U-ViT-H/4")).timestep_map[0] == 1


def test_u_vit_guidance_scale_is_dydits_plus_one():
    """U-ViT: ε_c + s(ε_c − ε_u); dydit (DiT): ε_u + w(ε_c − ε_u): the same at w = 1 + s."""

    def net(x, t, y):
        return x * (1.0 + (y != 1000).float()).view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1) / 100

    x, t, y = torch.randn(2, 4, 2, 2), torch.tensor([5, 5]), torch.tensor([3, 7])
    s = 0.4  # U-ViT-L/2's scale
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 1000))
    torch.testing.assert_close(guided(net, 1 + s, null_class=1000)(x, t, y), cond + s * (cond - uncond))
