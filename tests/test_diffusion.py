"""Gaussian diffusion (docs/METHOD.md §1.4): schedule, forward process, posterior, respacing, hybrid loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from dydit.diffusion import create_diffusion, guided, linear_betas, respace, space_timesteps
from dydit.errors import DyditError
from dydit.factory import build_model

F64 = torch.float64


def _abar(t: int, T: int = 1000) -> float:
    """ᾱ_t computed independently from the schedule definition."""
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return float(np.prod(1.0 - betas[: t + 1]))


def test_linear_schedule_endpoints_and_scaling() -> None:
    b = linear_betas(1000)
    assert b.shape == (1000,) and b.dtype == np.float64
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b100 = linear_betas(100)
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)
    assert create_diffusion().alphas_cumprod[-1].item() == pytest.approx(_abar(999), rel=1e-12)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_q_sample_moments(t: int) -> None:
    d = create_diffusion()
    a = _abar(t)
    x0 = torch.tensor([[-0.8, 0.0, 0.3, 1.0]], dtype=F64)  # (1, 4)
    n = 100_000
    tt = torch.full((n,), t)
    xt = d.q_sample(x0.expand(n, 4), tt, torch.randn(n, 4, dtype=F64))
    se = np.sqrt((1 - a) / n)
    assert torch.allclose(xt.mean(0), np.sqrt(a) * x0[0], atol=5 * se)
    assert torch.allclose(xt.var(0), torch.full((4,), 1 - a, dtype=F64), rtol=0.03, atol=1e-6)
    # Noise-free and exact forms.
    assert torch.allclose(d.q_sample(x0, tt[:1], torch.zeros_like(x0)), np.sqrt(a) * x0, rtol=1e-12)
    mean, var = d.q_mean_variance(x0, tt[:1])
    assert torch.allclose(mean, np.sqrt(a) * x0, rtol=1e-12)
    assert torch.allclose(var, torch.full_like(x0, 1 - a), rtol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 250, 999])
def test_posterior_matches_gaussian_conditioning(t: int) -> None:
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): combine the two Gaussians by precision."""
    d = create_diffusion()
    a_t, a_prev = _abar(t), _abar(t - 1)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    x0 = torch.randn(3, 2, 4, 4, dtype=F64)
    xt = torch.randn(3, 2, 4, 4, dtype=F64)
    precision = 1 / (1 - a_prev) + alpha_t / beta_t
    var = 1 / precision
    mean = var * (np.sqrt(a_prev) * x0 / (1 - a_prev) + np.sqrt(alpha_t) * xt / beta_t)
    got_mean, got_var, got_log_var = d.q_posterior_mean_variance(x0, xt, torch.full((3,), t))
    assert torch.allclose(got_mean, mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_var, torch.full_like(xt, var), rtol=1e-10)
    assert torch.allclose(got_log_var, torch.full_like(xt, np.log(var)), rtol=1e-10)


def test_posterior_at_t0_returns_x0() -> None:
    d = create_diffusion()
    x0, xt = torch.randn(2, 1, 2, 2, dtype=F64), torch.randn(2, 1, 2, 2, dtype=F64)
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(mean, x0) and (var == 0).all()


def test_eps_x0_roundtrip() -> None:
    d = create_diffusion()
    t = torch.tensor([0, 400, 999])
    x0, eps = torch.randn(3, 4, 2, 2, dtype=F64), torch.randn(3, 4, 2, 2, dtype=F64)
    xt = d.q_sample(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_eps(xt, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=1e-9)


def test_space_timesteps() -> None:
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "250") == kept
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == list(range(1000))
    two = space_timesteps(1000, "2,3")
    assert two == [0, 499, 500, 750, 999]
    assert space_timesteps(1000, [999, 0, 500]) == [0, 500, 999]
    for bad in ("ddimx", "abc", "0", "2000", "ddim999"):
        with pytest.raises(DyditError):
            space_timesteps(1000, bad)


def test_respaced_process_keeps_marginals_and_composes() -> None:
    d = create_diffusion()
    r = respace(d, 250)
    kept = space_timesteps(1000, 250)
    assert r.num_timesteps == 250
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12)
    assert r.timestep_map.tolist() == kept
    rr = respace(r, 10)  # respacing a respaced process still maps to original timesteps
    assert rr.timestep_map.tolist() == [kept[i] for i in space_timesteps(250, 10)]
    assert torch.allclose(rr.alphas_cumprod, d.alphas_cumprod[rr.timestep_map], rtol=1e-12)
    assert respace(d, 1000) is d


def test_training_losses_on_respaced_process_pass_original_timesteps() -> None:
    r = create_diffusion(10)
    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    r.training_losses(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 5, 9]), {"y": torch.zeros(3)})
    assert seen[0].tolist() == [0, r.timestep_map[5].item(), 999]


def _model_with_output(out: torch.Tensor):
    return lambda x, t, y=None: out


def test_hybrid_loss_terms_and_gradients() -> None:
    torch.manual_seed(1)
    d = create_diffusion()
    b, c = 6, 4
    x0 = torch.rand(b, c, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 2, 100, 500, 999])
    out = torch.randn(b, 2 * c, 8, 8).mul_(0.5).requires_grad_(True)
    terms = d.training_losses(_model_with_output(out), x0, t, {"y": torch.zeros(b)})
    assert set(terms) == {"loss", "mse", "vb"}
    for v in terms.values():
        assert v.shape == (b,) and torch.isfinite(v).all()
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"] > 0).all()
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert (g_vb[:, :c] == 0).all(), "vb must not train the ε channels"
    assert g_vb[:, c:].abs().sum() > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert (g_mse[:, c:] == 0).all() and g_mse[:, :c].abs().sum() > 0


def test_vb_vanishes_for_the_true_posterior() -> None:
    """Exact ε and v = -1 (variance β̃_t) give p_θ = q(x_{t-1}|x_t,x_0): KL = 0 for t >= 1."""
    d = create_diffusion()
    x0 = (torch.rand(3, 2, 4, 4, dtype=F64) * 2 - 1).double()
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 300, 999])
    out = torch.cat([noise, -torch.ones_like(noise)], 1)
    terms = d.training_losses(_model_with_output(out), x0, t, {"y": None}, noise=noise)
    assert torch.allclose(terms["vb"], torch.zeros(3, dtype=F64), atol=1e-9)
    assert torch.allclose(terms["mse"], torch.zeros(3, dtype=F64))
    # At t = 0, vb is the discretised decoder NLL in bits/dim. With an exact mean, interior data and
    # std σ = √β̃_1 it is -log2 P(|N(0, σ²)| < 1/255) for every element.
    x0 = x0.clamp(-0.99, 0.99)
    t0 = torch.zeros(3, dtype=torch.long)
    vb0 = d.training_losses(_model_with_output(out), x0, t0, {"y": None}, noise=noise)["vb"]
    sigma = d.posterior_variance[1].sqrt().item()
    half_bin = torch.tensor(1 / 255 / sigma, dtype=F64)
    expected = -torch.log2(2 * torch.special.ndtr(half_bin) - 1)
    assert torch.allclose(vb0, expected.expand(3), rtol=1e-9)


def test_fixed_variance_diffusion_has_mse_only() -> None:
    d = create_diffusion(learn_sigma=False)
    out, x0, t = torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([0, 9])
    terms = d.training_losses(_model_with_output(out), x0, t, {"y": None})
    assert (terms["vb"] == 0).all() and torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="channels"):
        create_diffusion().training_losses(_model_with_output(out), x0, t)


def test_training_losses_with_a_real_dit_and_guided_callable() -> None:
    cfg = tiny_config()
    model = build_model(cfg)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    d = create_diffusion()
    x0 = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.tensor([0, 1, 2, 3])
    terms = d.training_losses(model, x0, torch.tensor([0, 10, 500, 999]), {"y": y})
    assert all(torch.isfinite(v).all() for v in terms.values())
    terms["loss"].mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    # Any callable with the model signature works, e.g. a guided wrapper.
    with torch.no_grad():
        fn = guided(model.eval(), 2.0, cfg.num_classes)
        terms = d.training_losses(fn, x0, torch.tensor([0, 10, 500, 999]), {"y": y})
    assert all(torch.isfinite(v).all() for v in terms.values())
