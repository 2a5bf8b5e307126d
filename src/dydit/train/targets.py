"""The FLOPs target schedule λ_t and the stratified timestep sampler (docs/METHOD.md §5.3, §5.4).

- :func:`target_schedule`: λ_t = 1 for the first ``hold_steps`` iterations, then the reference
  formula λ_t = 1 − (1 − λ)·step/warmup_steps until ``warmup_steps``, then λ.
- :func:`stratified_timesteps`: sample i of a batch draws t uniformly from stratum (i + o) mod S
  of [0, T), so every batch covers the whole time axis and the batch-mean FLOPs constraint cannot
  be met by skewing the timesteps of a batch. The offset o is drawn per call when the batch is not
  a multiple of S, so every stratum is equally likely for any per-process batch size.
- :func:`draw_timesteps`: the training times of a process, DDPM steps or flow-matching times.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dydit.constants import NUM_TIMESTEPS, TARGET_HOLD_STEPS, TIMESTEP_STRATA
from dydit.errors import DyditError
from dydit.flops.analytic import check_target
from dydit.flow import Transport


def target_schedule(
    step: int, target: float, warmup_steps: int, hold_steps: int = TARGET_HOLD_STEPS
) -> float:
    """The FLOPs target λ_t at optimisation step ``step`` (0-based; docs/METHOD.md §5.4).

    λ_t = 1.0 while step < hold_steps; then, while step < warmup_steps, the linear decay
    1 − (1 − λ)·step/warmup_steps of the reference code (``step`` counts from 0, not from the end
    of the hold, so the decay reaches λ at ``warmup_steps``); afterwards λ. ``warmup_steps = 0``
    switches the decay off (λ right after the hold). A resumed stage-2 run passes its global
    step, which is past the warm-up, and gets λ throughout.
    """
    lam = check_target(target)
    if step < 0:
        raise DyditError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or hold_steps < 0:
        raise DyditError(f"warmup_steps and hold_steps must be >= 0, got {warmup_steps} and {hold_steps}")
    if step < hold_steps:
        return 1.0
    if step < warmup_steps:
        return 1.0 - (1.0 - lam) * step / warmup_steps
    return lam


def stratified_timesteps(
    batch: int,
    num_timesteps: int = NUM_TIMESTEPS,
    strata: int = TIMESTEP_STRATA,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Timesteps (B,) long; sample i is uniform on stratum s = (i + o) mod ``strata`` of [0, T).

    Stratum s covers [⌊s·T/S⌋, ⌊(s+1)·T/S⌋): with T = 1000 and S = 4 these are 0-249, 250-499,
    500-749 and 750-999. The offset o is uniform on {0, ..., S−1}, drawn from ``generator`` only
    when B is not a multiple of S: a batch of 2 then covers strata {o, o+1}, and over steps every
    stratum is drawn B/S times per batch on average (with o = 0 always, a batch of 2 would never
    see t ≥ 500). When S divides B every offset gives the same strata counts, so none is drawn and
    the random stream is the one of the plain i mod S assignment. Random numbers are drawn on the
    generator's device (CPU when None) and moved to ``device``.
    """
    if batch < 1:
        raise DyditError(f"batch must be >= 1, got {batch}")
    if not 1 <= strata <= num_timesteps:
        raise DyditError(f"strata must be in [1, {num_timesteps}], got {strata}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offset = 0
    if batch % strata:  # a partial round of strata: rotate it at random so no stratum is favoured
        offset = int(torch.randint(strata, (1,), generator=generator, device=gen_device))
    s = (torch.arange(batch, device=gen_device) + offset) % strata  # (B,) stratum of each sample
    lo = s * num_timesteps // strata
    hi = (s + 1) * num_timesteps // strata
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    t = lo + (u * (hi - lo)).long().clamp_max(hi - lo - 1)  # clamp guards u·width rounding to width
    return t.to(device) if device is not None else t


def draw_timesteps(
    process: Any,
    batch: int,
    *,
    stratified: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times (B,) for ``process``: DDPM steps in [0, T) (long), or flow times (float) on
    the transport's interval [t0, t1]. ``stratified`` uses the strata of :func:`stratified_timesteps`
    (for flow: the S equal parts of [t0, t1], the same offset rule)."""
    if not isinstance(process, Transport):
        if stratified:
            return stratified_timesteps(batch, process.num_timesteps, generator=generator, device=device)
        return torch.randint(0, process.num_timesteps, (batch,), generator=generator, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if stratified:
        # Stratum index of each sample, then u uniform inside it: the DDPM rule on a continuum.
        s = stratified_timesteps(batch, TIMESTEP_STRATA, generator=generator).to(gen_device)
        u = (s + torch.rand(batch, generator=generator, device=gen_device)) / TIMESTEP_STRATA
    else:
        u = torch.rand(batch, generator=generator, device=gen_device)
    t0, t1 = process.interval
    t = t0 + (t1 - t0) * u
    return t.to(device) if device is not None else t
