"""Samplers and guidance (docs/METHOD.md §1.3, §7.2): original timesteps, per-image noise, determinism,
convergence on an analytic model, and the two classifier-free guidance modes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dydit.diffusion import SAMPLERS, create_diffusion, guided, space_timesteps
from dydit.errors import DyditError
from dydit.factory import build_model

F64 = torch.float64
MU, STD = 0.5, 0.3  # analytic data distribution N(MU, STD²) per element


def _gaussian_eps_model(diffusion):
    """The exact ε-prediction E[ε | x_t] for data ~ N(MU, STD²); variance channels v = -1 (β̃_t)."""
    abar = diffusion.alphas_cumprod

    def model(x, t, y=None):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        eps = torch.sqrt(1 - a) * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)
        return torch.cat([eps, -torch.ones_like(eps)], 1)

    return model


def _exact_ode_solution(diffusion, x_T):
    """The probability-flow ODE keeps (x_t - √ᾱ_t MU)/√(ᾱ_t STD² + 1 - ᾱ_t) constant; the samplers end
    with E[x_0 | x_{t=0}], which shrinks that standardised value by STD √ᾱ_0 / √(ᾱ_0 STD² + 1 - ᾱ_0)."""
    a_T, a_0 = diffusion.alphas_cumprod[-1], diffusion.alphas_cumprod[0]
    z = (x_T - a_T.sqrt() * MU) / torch.sqrt(a_T * STD**2 + 1 - a_T)
    return MU + STD**2 * a_0.sqrt() * z / torch.sqrt(a_0 * STD**2 + 1 - a_0)


def _tiny_dit():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)  # non-zero outputs
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.2)
    return cfg, model


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [10, "ddim10"])
def test_samplers_pass_original_timesteps(name: str, steps) -> None:
    d = create_diffusion()
    seen: list[list[int]] = []

    def model(x, t, y):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    SAMPLERS[name](model, torch.randn(2, 1, 2, 2), d, steps, model_kwargs={"y": torch.zeros(2)})
    expected = space_timesteps(1000, steps)[::-1]
    assert [s[0] for s in seen] == expected and all(s[0] == s[1] for s in seen)
    assert max(expected) == (999 if steps == 10 else 900)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_image_at_any_batch_size(name: str) -> None:
    cfg, model = _tiny_dit()
    model.double()  # float64: x̂_0 = x_t/√ᾱ_t - ... amplifies float32 matmul noise ~150x at t = 999
    d = create_diffusion()
    seeds = [3, 1, 4, 1]
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.tensor([0, 1, 2, 3])
    fn = guided(model, 2.0, cfg.num_classes)

    def run(idx: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).double()
        return SAMPLERS[name](fn, noise, d, 5, model_kwargs={"y": y[idx]}, generators=gens)

    batch = run([0, 1, 2, 3])
    singles = torch.cat([run([i]) for i in range(4)])
    torch.testing.assert_close(batch, singles, rtol=1e-9, atol=1e-9)
    # Seed 1 twice, different labels: different images; the same seed with the same label would agree.
    assert not torch.allclose(batch[1], batch[3])
    assert torch.allclose(run([1])[0], run([1])[0])


def test_ddim_eta0_is_deterministic_and_eta1_is_not() -> None:
    cfg, model = _tiny_dit()
    d = create_diffusion()
    noise = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    kw = {"y": torch.tensor([0, 1])}

    def gens(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + i) for i in range(2)]

    ddim = SAMPLERS["ddim"]
    a = ddim(model, noise, d, 8, model_kwargs=kw, generators=gens(0))
    b = ddim(model, noise, d, 8, model_kwargs=kw, generators=gens(100))
    c = ddim(model, noise, d, 8, model_kwargs=kw)  # global RNG
    assert torch.equal(a, b) and torch.equal(a, c)
    a1 = ddim(model, noise, d, 8, model_kwargs=kw, generators=gens(0), eta=1.0)
    b1 = ddim(model, noise, d, 8, model_kwargs=kw, generators=gens(100), eta=1.0)
    assert not torch.allclose(a1, b1)
    # DDPM draws per-step noise too; DPM-Solver++ never does.
    dp = SAMPLERS["ddpm"]
    assert not torch.allclose(
        dp(model, noise, d, 8, model_kwargs=kw, generators=gens(0)),
        dp(model, noise, d, 8, model_kwargs=kw, generators=gens(100)),
    )
    pp = SAMPLERS["dpm++2m"]
    assert torch.equal(
        pp(model, noise, d, 8, model_kwargs=kw, generators=gens(0)),
        pp(model, noise, d, 8, model_kwargs=kw, generators=gens(100)),
    )


def test_ode_samplers_converge_on_an_analytic_model() -> None:
    d = create_diffusion()
    model = _gaussian_eps_model(d)
    x_T = torch.randn(8, 1, 8, 8, dtype=F64)
    exact = _exact_ode_solution(d, x_T)

    def err(name: str, steps: int) -> float:
        return (SAMPLERS[name](model, x_T, d, steps) - exact).abs().max().item()

    ddim_1000, ddim_50 = err("ddim", 1000), err("ddim", 50)
    dpm_50, dpm_250 = err("dpm++2m", 50), err("dpm++2m", 250)
    assert ddim_1000 < 0.01
    assert dpm_250 < 0.003 and dpm_50 < 0.03
    assert dpm_50 < ddim_50 / 4, "the second-order solver should beat DDIM at equal steps"
    ddim_ref = SAMPLERS["ddim"](model, x_T, d, 1000)
    assert (SAMPLERS["dpm++2m"](model, x_T, d, 250) - ddim_ref).abs().max() < 0.01


def test_ddpm_samples_the_data_distribution() -> None:
    d = create_diffusion()
    torch.manual_seed(0)
    x = SAMPLERS["ddpm"](_gaussian_eps_model(d), torch.randn(8, 1, 32, 32, dtype=F64), d, 250)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - STD) < 0.03


# Classifier-free guidance --------------------------------------------------------------------
def _label_model(calls: list[int]):
    """ε_c = y + 1 on every channel, ε_u (null class 9) = 0, variance channels = 10·(y + 1)."""

    def model(x, t, y):
        calls.append(x.shape[0])
        val = torch.where(y == 9, torch.zeros_like(y), y + 1).float().view(-1, 1, 1, 1)
        eps = val.expand(-1, x.shape[1], *x.shape[2:])
        return torch.cat([eps, 10 * eps + 0.5], 1)

    return model


def test_guidance_modes_differ_only_where_they_should() -> None:
    calls: list[int] = []
    model = _label_model(calls)
    x, t, y = torch.zeros(2, 4, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2])
    s = 3.0
    full = guided(model, s, null_class=9, channels="all")(x, t, y)
    compat = guided(model, s, null_class=9, channels="dit_compat")(x, t, y)
    assert calls == [4, 4], "one forward on the concatenated [cond; uncond] batch"
    cond = model(x, t, y)
    guided_eps = s * cond[:, :4]  # ε_u = 0
    assert torch.equal(full[:, :4], guided_eps)
    assert torch.equal(compat[:, :3], guided_eps[:, :3])
    assert torch.equal(compat[:, 3], cond[:, 3]), "dit_compat leaves the 4th ε channel unguided"
    assert torch.equal(full[:, 4:], cond[:, 4:]) and torch.equal(compat[:, 4:], cond[:, 4:])
    differs = (full != compat).flatten(2).any(-1).any(0)
    assert differs.tolist() == [False, False, False, True, False, False, False, False]


def test_guidance_scale_edge_cases() -> None:
    calls: list[int] = []
    model = _label_model(calls)
    x, t, y = torch.zeros(2, 4, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2])
    assert guided(model, 1.0, 9) is model  # scale 1 skips the unconditional half
    assert torch.equal(guided(model, 0.0, 9)(x, t, y)[:, :4], torch.zeros(2, 4, 2, 2))
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(DyditError):
            guided(model, bad, 9)
    with pytest.raises(DyditError):
        guided(model, 2.0, 9, channels="three")
