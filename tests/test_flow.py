"""Flow matching: the transport and its samplers against closed-form answers on Gaussian data.

For data x_data ~ N(μ, s² I) and the path x_t = α_t x_data + σ_t ε, x_t is Gaussian with mean
m_t = α_t μ and variance v_t = α_t² s² + σ_t², and the exact velocity field is affine in x:

    E[u_t | x_t = x] = α'_t μ + (α_t α'_t s² + σ_t σ'_t) / v_t · (x − m_t).

Its ODE carries x_0 = z to x_1 = μ + s z exactly, which gives the samplers an analytic target.
"""

from __future__ import annotations

import math

import pytest
import torch

from dydit.diffusion import create_diffusion
from dydit.errors import DyditError
from dydit.flow import FLOW_SAMPLERS, Transport, create_process, evaluations, flow_times
from dydit.presets import SMALL_SIT_NAMES, get_model_config, preset_name

MU, S = 0.7, 0.4


def exact_velocity(tr: Transport, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s, da, ds = (c.to(x.dtype).reshape(-1, 1, 1, 1) for c in tr.coefficients(t))
    v = a * a * S * S + s * s
    return da * MU + (a * da * S * S + s * ds) / v * (x - a * MU)


def exact_noise(tr: Transport, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s, _, _ = (c.to(x.dtype).reshape(-1, 1, 1, 1) for c in tr.coefficients(t))
    return s / (a * a * S * S + s * s) * (x - a * MU)  # E[ε | x] = Cov(ε, x) / Var(x) · (x − m)


def analytic_model(tr: Transport):
    """A 'network' that outputs the exact prediction of ``tr.prediction`` (and 2C channels, like DiT)."""

    def model_fn(x, t, y=None):
        t = t.to(torch.float64)
        if tr.prediction == "velocity":
            out = exact_velocity(tr, x, t)
        else:
            eps = exact_noise(tr, x, t)
            sigma = tr.coefficients(t)[1].to(x.dtype).reshape(-1, 1, 1, 1)
            out = eps if tr.prediction == "noise" else -eps / sigma
        return torch.cat([out, torch.full_like(out, 123.0)], dim=1)  # the second half is ignored

    return model_fn


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_the_loss_minimiser_is_the_exact_velocity(path: str) -> None:
    # The MSE minimiser over affine functions of x_t at a fixed t is the regression of the target
    # on x_t; for Gaussian data it must equal the closed-form E[u_t | x_t].
    tr = Transport(path)
    g = torch.Generator().manual_seed(0)
    n = 1_000_000
    x0 = MU + S * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((n,), tv, dtype=torch.float64)
        x_t = tr.q_sample(x0, t, noise)
        target = tr.target(x0, t, noise)
        design = torch.cat([x_t.reshape(n, 1), torch.ones(n, 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(design, target.reshape(n, 1)).solution.flatten()
        # probes within one standard deviation of x_t, where the regression is well determined
        probe = x_t.mean() + x_t.std() * torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        probe = probe.reshape(3, 1, 1, 1)
        fitted = coef[0] * probe + coef[1]
        exact = exact_velocity(tr, probe, torch.full((3,), tv, dtype=torch.float64))
        assert torch.allclose(fitted, exact, atol=0.01), (tv, fitted.flatten(), exact.flatten())
        # ... and the loss of the exact field is below that of a perturbed one
        best = tr.loss_terms(exact_velocity(tr, x_t, t), x0, x_t, t, noise)["loss"].mean()
        worse = tr.loss_terms(exact_velocity(tr, x_t, t) + 0.05, x0, x_t, t, noise)["loss"].mean()
        assert best < worse


@pytest.mark.parametrize("prediction", ["noise", "score"])
@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_noise_and_score_predictions_give_the_exact_velocity(path: str, prediction: str) -> None:
    tr = Transport(path, prediction)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64).reshape(5, 1, 1, 1)
    for tv in (0.05, 0.5, 0.95):
        t = torch.full((5,), tv, dtype=torch.float64)
        v = tr.velocity(analytic_model(tr)(x, t), x, t)
        assert torch.allclose(v, exact_velocity(tr, x, t), atol=1e-10)


def _solve(name: str, tr: Transport, steps: int, z: torch.Tensor, **kw) -> torch.Tensor:
    return FLOW_SAMPLERS[name](analytic_model(tr), z, tr, steps, **kw)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_euler_converges_at_first_order_and_heun_at_second(path: str) -> None:
    tr = Transport(path)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1, 1, 1)
    exact = MU + S * z
    for name, order in (("euler", 1), ("heun", 2)):
        errors = [(_solve(name, tr, n, z) - exact).abs().max().item() for n in (8, 16, 32)]
        rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.3 for r in rates), (name, errors, rates)
    assert (_solve("heun", tr, 64, z) - exact).abs().max() < 1e-3


def test_noise_prediction_samples_with_its_end_margin() -> None:
    tr = Transport("linear", "noise")
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1, 1, 1)
    out = _solve("heun", tr, 64, z)
    # the interval stops eps short of both ends, so the answer is the exact flow on [eps, 1 - eps]
    assert tr.interval == (tr.eps, 1 - tr.eps)
    assert (out - (MU + S * z)).abs().max() < 0.01


def test_adaptive_solver_matches_the_exact_flow() -> None:
    pytest.importorskip("torchdiffeq", reason="the adaptive sampler is optional (dydit[flow])")
    tr = Transport("gvp")
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1, 1, 1)
    out = _solve("adaptive", tr, 0, z, atol=1e-8, rtol=1e-8)
    assert (out - (MU + S * z)).abs().max() < 1e-5


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sde_sampler_reaches_the_data_distribution(path: str) -> None:
    tr = Transport(path)
    z = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(z.shape[0])]
    out = _solve("sde", tr, 200, z, generators=gens).flatten()
    assert abs(out.mean().item() - MU) < 0.03 and abs(out.std().item() - S) < 0.03
    # not the ODE: the noise moved the samples off the deterministic map of z
    assert (out - (MU + S * z).flatten()).abs().mean() > 0.05


def test_sde_noise_is_per_image() -> None:
    tr = Transport()
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = _solve("sde", tr, 10, z, generators=[torch.Generator().manual_seed(i) for i in range(4)])
    part = _solve("sde", tr, 10, z[2:], generators=[torch.Generator().manual_seed(i) for i in (2, 3)])
    assert torch.equal(full[2:], part)


def test_evaluations_and_times() -> None:
    tr = Transport()
    assert evaluations("euler", 10) == 10 and evaluations("heun", 10) == 20 and evaluations("sde", 10) == 10
    assert evaluations("adaptive", 10) is None
    calls = []

    def counting(x, t, y=None):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    for name in ("euler", "heun", "sde"):
        calls.clear()
        FLOW_SAMPLERS[name](counting, torch.zeros(1, 1, 2, 2), tr, 6)
        assert len(calls) == evaluations(name, 6)
        assert sorted(set(calls)) == sorted(set(flow_times(name, 6, tr)))  # what a width plan must cover


@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_sde_times_follow_a_custom_last_step(prediction: str) -> None:
    tr = Transport("linear", prediction)
    t1 = tr.interval[1]  # 1, or 1 - eps: where the SDE ends (SiT ends at 1 for every prediction)
    calls = []

    def counting(x, t, y=None):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    for last_step in (0.04, 0.1, 0.3):
        calls.clear()
        FLOW_SAMPLERS["sde"](counting, torch.zeros(1, 1, 2, 2), tr, 5, last_step=last_step)
        times = flow_times("sde", 5, tr, last_step=last_step)
        assert calls == times and len(times) == 5
        assert times[0] == pytest.approx(tr.interval[0]) and times[-1] == pytest.approx(t1 - last_step)
    with pytest.raises(DyditError, match="last_step"):
        flow_times("sde", 5, tr, last_step=1.5)


def test_mismatched_process_and_bad_inputs_fail_in_one_line() -> None:
    ddpm = create_diffusion()
    with pytest.raises(DyditError, match="DDPM sampler"):
        FLOW_SAMPLERS["euler"](lambda x, t, y=None: x, torch.zeros(1, 1, 2, 2), ddpm, 4)
    with pytest.raises(DyditError, match="number of steps"):
        FLOW_SAMPLERS["heun"](lambda x, t, y=None: x, torch.zeros(1, 1, 2, 2), Transport(), "ddim4")
    with pytest.raises(DyditError, match="steps >= 2"):
        FLOW_SAMPLERS["sde"](lambda x, t, y=None: x, torch.zeros(1, 1, 2, 2), Transport(), 1)
    for bad in (dict(path="cosine"), dict(prediction="x0"), dict(eps=0.7)):
        with pytest.raises(DyditError):
            Transport(**bad)


def test_create_process_follows_the_config() -> None:
    assert isinstance(create_process(get_model_config("DiT-Ti/4")), type(create_diffusion()))
    tr = create_process(get_model_config("SiT-Ti/4", flow_path="gvp", flow_prediction="noise"))
    assert tr == Transport("gvp", "noise")
    with pytest.raises(DyditError, match="apply to flow-matching"):
        get_model_config("DiT-Ti/4", flow_path="gvp")
    for name in SMALL_SIT_NAMES:  # the small SiTs are the small DiTs with the flow objective
        assert get_model_config(name) == get_model_config("DiT-" + name[4:]).replace(objective="flow")
        assert preset_name(get_model_config(name)) == name
