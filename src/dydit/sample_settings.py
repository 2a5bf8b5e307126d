"""How to sample (docs/METHOD.md §7.2): :class:`SamplingSettings`, the sampler, its steps and
guidance, validated once, and the times the sampler gives the network. Sampling itself is
:mod:`dydit.sample` (which re-exports the class).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dydit.diffusion import GUIDANCE_CHANNELS, SAMPLERS, GaussianDiffusion
from dydit.diffusion.samplers import DEFAULT_STEPS, RegisteredSampler
from dydit.diffusion.schedules import Steps, space_timesteps
from dydit.errors import DyditError
from dydit.flow import FLOW_SAMPLERS, Transport
from dydit.presets import ModelConfig


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: sampler, steps, guidance. ``eta`` applies to DDIM only (None: its default 0).

    ``sampler`` is a DDPM sampler (``ddpm``, ``ddim``, ``dpm++2m``) for DDPM models or a flow sampler
    (``euler``, ``heun``, ``sde``, ``adaptive``) for flow-matching models; ``clip_denoised`` applies
    to DDPM samplers only.
    """

    sampler: str = "ddpm"
    steps: Steps = DEFAULT_STEPS
    cfg_scale: float = 1.0
    guidance_channels: str = "all"
    eta: float | None = None
    clip_denoised: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS and self.sampler not in FLOW_SAMPLERS:
            names = ", ".join([*SAMPLERS, *FLOW_SAMPLERS])
            raise DyditError(f"unknown sampler {self.sampler!r}; choose one of {names}")
        if self.flow and not (isinstance(self.steps, int) and not isinstance(self.steps, bool)):
            raise DyditError(f"the flow sampler {self.sampler} takes a number of steps, got {self.steps!r}")
        if self.flow and self.clip_denoised:
            raise DyditError("clip_denoised applies to DDPM samplers only")
        if isinstance(self.steps, int) and self.steps < 1:
            raise DyditError(f"the number of sampling steps must be positive, got {self.steps}")
        if not self.cfg_scale >= 0 or self.cfg_scale == float("inf"):
            raise DyditError(f"guidance scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.guidance_channels not in GUIDANCE_CHANNELS:
            raise DyditError(f"guidance channels must be one of {GUIDANCE_CHANNELS}")
        if self.eta is not None and (self.sampler != "ddim" or not self.eta >= 0):
            raise DyditError(f"eta must be >= 0 and applies to the ddim sampler only (got {self.eta})")

    def sampler_options(self) -> dict[str, Any]:
        if self.flow:
            return {}
        opts: dict[str, Any] = {"clip_denoised": self.clip_denoised}
        if self.eta is not None:
            opts["eta"] = self.eta
        return opts

    @property
    def flow(self) -> bool:
        """Whether the sampler is a flow-matching one (Euler, Heun, SDE, adaptive)."""
        return self.sampler in FLOW_SAMPLERS

    @property
    def function(self) -> RegisteredSampler:
        """The sampler itself: ``SAMPLERS[sampler]`` or ``FLOW_SAMPLERS[sampler]`` (callable; its
        ``times`` says where it evaluates the network)."""
        return FLOW_SAMPLERS[self.sampler] if self.flow else SAMPLERS[self.sampler]

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The original timesteps of a DDPM process of ``num_timesteps`` steps that ``steps`` keeps,
        ascending (validates ``steps``)."""
        return space_timesteps(num_timesteps, self.steps)

    def network_times(self, process: GaussianDiffusion | Transport) -> list[int | float]:
        """The distinct times the network will see with ``process``, in order of first evaluation
        (DDPM: original timesteps, largest first; flow: t ascending): the sampler's declared
        ``times`` (:class:`~dydit.diffusion.samplers.RegisteredSampler`), what a DyDiT's width plan
        must cover. Validates the pairing of sampler and process. Empty for the adaptive flow
        solver (not known in advance)."""
        check_process(self.sampler, process)
        times = self.function.times(process, self.steps, **self.sampler_options())
        return list(dict.fromkeys(times))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["steps"] = d["steps"] if isinstance(d["steps"], int | str) else list(d["steps"])
        return d


def check_process(sampler: str, process: Any, config: ModelConfig | None = None) -> None:
    """One-line errors for a sampler, a process and a model that do not belong together."""
    flow_sampler = sampler in FLOW_SAMPLERS
    if config is not None and (config.objective == "flow") != isinstance(process, Transport):
        kind = "a flow-matching (SiT)" if config.objective == "flow" else "a DDPM"
        raise DyditError(f"this is {kind} model but the process is {type(process).__name__}")
    if flow_sampler and not isinstance(process, Transport):
        raise DyditError(
            f"{sampler} is a flow-matching sampler and this is a DDPM model: use ddpm, ddim or dpm++2m"
        )
    if not flow_sampler and isinstance(process, Transport):
        raise DyditError(
            f"{sampler} is a DDPM sampler and this is a flow-matching (SiT) model: use "
            f"{', '.join(FLOW_SAMPLERS)}"
        )
