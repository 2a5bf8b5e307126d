"""Every registered sampler evaluates the network exactly at the times it declares, in one place.

A DyDiT's width plan, ``dydit sample --dry-run``, ``dydit flops`` and the demo ask a sampler's
``times(process, steps, **options)`` (:class:`dydit.diffusion.samplers.RegisteredSampler`) where the
network will be evaluated. These tests run each sampler with a recording model and compare.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dydit.diffusion import (
    SAMPLERS,
    RegisteredSampler,
    create_diffusion,
    respace,
    respaced_times,
    space_timesteps,
)
from dydit.diffusion.samplers import sample_ddpm
from dydit.flow import FLOW_SAMPLERS, Transport, evaluations, flow_times
from dydit.flow.samplers import heun_times, sample_euler, sample_sde, sde_times
from dydit.sample import SamplingSettings

DDPM = create_diffusion()
RESPACED = respace(DDPM, 100)  # a process already respaced: the network still sees original timesteps
VELOCITY = Transport("linear", "velocity")
NOISE = Transport("gvp", "noise")  # interval [eps, 1 - eps]
VP = Transport("vp", "noise", clock="sde999")  # U-ViT's VP-SDE: the network sees 999 (1 - t)

# Every registered sampler with the processes, step specs and options it is checked with.
_DDPM_CASES = [(DDPM, 7, {}), (DDPM, "ddim10", {"clip_denoised": True}), (DDPM, [999, 0, 500], {}),
               (DDPM, "3,4", {}), (RESPACED, 6, {})]  # fmt: skip
_ODE_CASES = [(VELOCITY, 1, {}), (VELOCITY, 5, {}), (NOISE, 4, {}), (VP, 3, {})]
CASES: dict[str, list[tuple]] = {
    "ddpm": _DDPM_CASES,
    "ddim": [*_DDPM_CASES, (DDPM, 5, {"eta": 0.7})],
    "dpm++2m": _DDPM_CASES,
    "euler": _ODE_CASES,
    "heun": _ODE_CASES,
    "sde": [
        (VELOCITY, 2, {}),
        (VELOCITY, 5, {"last_step": 0.3, "diffusion_norm": 0.5}),
        (NOISE, 4, {"last_step": 0.1}),
        (NOISE, 6, {"diffusion_norm": 0.0}),
        (VP, 5, {}),
    ],  # fmt: skip
    "dpm++": [(VELOCITY, 2, {}), (NOISE, 4, {}), (VP, 5, {})],
    "adaptive": [(VELOCITY, 0, {}), (NOISE, 3, {"rtol": 1e-2})],
}
ALL = [*SAMPLERS, *FLOW_SAMPLERS]


def _model(process):
    """A smooth network: ε = 0.1·x (and variance 0) for DDPM, v = −x for flow."""

    def model(x, t, y=None):
        if isinstance(process, Transport):
            return -x
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1)

    return model


def evaluated_times(entry: RegisteredSampler, process, steps, options: dict) -> list:
    """The time of each network evaluation of a real run of ``entry``, in order."""
    calls: list[list] = []
    model = _model(process)

    def recording(x, t, y=None):
        calls.append(t.tolist())
        return model(x, t, y)

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    entry(recording, torch.randn(2, 1, 2, 2), process, steps, generators=gens, **options)
    assert all(len(set(c)) == 1 for c in calls), "one time per call"
    return [c[0] for c in calls]


def test_every_registered_sampler_is_checked() -> None:
    assert set(CASES) == set(ALL)  # a new sampler gets cases here, or this fails


@pytest.mark.parametrize("name", ALL)
def test_a_sampler_evaluates_exactly_the_times_it_declares(name: str) -> None:
    entry = SAMPLERS.get(name) or FLOW_SAMPLERS[name]
    for process, steps, options in CASES[name]:
        seen = evaluated_times(entry, process, steps, options)
        declared = entry.times(process, steps, **options)
        if name == "adaptive":  # the solver picks its times: none declared, some evaluated
            assert declared == [] and len(seen) > 2
            continue
        assert seen == declared, (name, steps, options)
        if isinstance(process, Transport):
            assert len(declared) == evaluations(name, steps)
            last = options.get("last_step")
            kw = {} if last is None else {"last_step": last}
            assert flow_times(name, steps, process, **kw) == list(dict.fromkeys(declared))
        else:  # original timesteps, largest first
            assert declared == sorted(declared, reverse=True) and declared[0] <= 999


def test_the_check_fails_when_a_grid_and_its_declared_times_diverge() -> None:
    diverging = [
        (RegisteredSampler(sample_euler, heun_times), VELOCITY, 4, {}),
        (RegisteredSampler(sample_sde, partial(sde_times, last_step=0.1)), VELOCITY, 4, {}),
        (RegisteredSampler(sample_sde, lambda tr, s, **o: sde_times(tr, s)), VELOCITY, 4, {"last_step": 0.1}),
        (RegisteredSampler(sample_ddpm, lambda d, s, **o: respaced_times(d, s)[::-1]), DDPM, 5, {}),
        (RegisteredSampler(sample_ddpm, lambda d, s, **o: respaced_times(DDPM, s)), RESPACED, 5, {}),
    ]
    for entry, process, steps, options in diverging:
        assert evaluated_times(entry, process, steps, options) != entry.times(process, steps, **options)


@pytest.mark.parametrize("name", ALL)
def test_settings_network_times_are_the_declared_times(name: str) -> None:
    process, steps, _ = CASES[name][-1]
    settings = SamplingSettings(sampler=name, steps=steps)
    times = settings.network_times(process)
    if name == "adaptive":
        assert times == []
        return
    assert times == list(dict.fromkeys(evaluated_times(settings.function, process, steps, {})))


def test_a_respaced_process_declares_original_timesteps() -> None:
    times = SamplingSettings(sampler="ddim", steps=5).network_times(RESPACED)
    kept = RESPACED.timestep_map.tolist()  # the 100 original timesteps the process keeps
    assert times == [kept[i] for i in reversed(space_timesteps(100, 5))]
    assert max(times) == 999  # original timesteps, not indices of the respaced process
