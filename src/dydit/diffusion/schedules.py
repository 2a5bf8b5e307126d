"""Noise schedules and timestep respacing (docs/METHOD.md §1.4).

DiT uses T = 1000 steps and a linear beta schedule from 1e-4 to 0.02, with both endpoints scaled by
1000 / T so that other lengths keep the same overall noise level. Sampling with fewer steps keeps a
subset of the original timesteps ("respacing"): ``"250"`` keeps 250 evenly spaced ones, ``"ddim50"``
keeps every k-th one such that exactly 50 remain, and ``"10,20"`` splits [0, T) into two equal sections
with 10 and 20 evenly spaced steps. All arrays here are float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dydit.constants import BETA_END, BETA_START, NUM_TIMESTEPS, SD_BETA_END, SD_BETA_START
from dydit.errors import DyditError

# The linear schedule's endpoints are defined for this reference length (docs/METHOD.md §1.4).
_REFERENCE_LENGTH = 1000

Steps = int | str | Sequence[int]


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """β_1..β_T, linear from BETA_START to BETA_END, both scaled by 1000 / T. Shape (T,), float64."""
    if num_timesteps < 1:
        raise DyditError(f"the diffusion needs at least one timestep, got {num_timesteps}")
    scale = _REFERENCE_LENGTH / num_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """Stable Diffusion's "scaled linear" β_1..β_T: √β linear from √SD_BETA_START to √SD_BETA_END,
    squared (docs/METHOD.md §16.2; U-ViT's H models). Shape (T,), float64."""
    if num_timesteps < 1:
        raise DyditError(f"the diffusion needs at least one timestep, got {num_timesteps}")
    return np.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, num_timesteps, dtype=np.float64) ** 2


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas}


def _evenly_spaced(size: int, count: int) -> list[int]:
    """``count`` integers in [0, size) spaced evenly, including both ends when count > 1."""
    if count > size:
        raise DyditError(f"cannot take {count} steps from a section of {size} timesteps")
    if count == 1:
        return [0]
    stride = (size - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


def space_timesteps(num_timesteps: int, spacing: Steps) -> list[int]:
    """The original timesteps kept by a respacing, sorted ascending.

    Args:
        num_timesteps: length T of the original process.
        spacing: an int N or ``"N"`` (N evenly spaced steps including 0 and T-1), ``"ddimN"``
            (the integer stride k with ``len(range(0, T, k)) == N``), ``"N1,N2,..."`` (equal
            sections of [0, T) with N_i evenly spaced steps each), or an explicit sequence of
            original timesteps.
    Returns:
        sorted list of distinct timesteps in [0, T).
    """
    if isinstance(spacing, int | np.integer):
        spacing = str(int(spacing))
    if not isinstance(spacing, str):
        kept = sorted({int(s) for s in spacing})
        if not kept or kept[0] < 0 or kept[-1] >= num_timesteps:
            raise DyditError(f"explicit timesteps must be a non-empty subset of [0, {num_timesteps})")
        return kept
    text = spacing.strip()
    if text.startswith("ddim"):
        try:
            want = int(text[len("ddim") :])
        except ValueError:
            raise DyditError(f"bad respacing {spacing!r}; expected e.g. 'ddim50'") from None
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise DyditError(f"no integer stride gives exactly {want} DDIM steps out of {num_timesteps}")
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise DyditError(f"bad respacing {spacing!r}; expected e.g. '250', 'ddim50' or '10,20'") from None
    if any(c < 1 for c in counts):
        raise DyditError(f"every step count must be positive, got {spacing!r}")
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        kept += [start + k for k in _evenly_spaced(size, count)]
        start += size
    return kept


def respaced_betas(alphas_cumprod: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the process restricted to ``kept`` timesteps: β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}}.

    With ᾱ_{k_{-1}} = 1. The respaced process has the same marginals q(x_{k_i} | x_0) as the original.
    """
    abar = alphas_cumprod[np.asarray(kept)]
    prev = np.concatenate([[1.0], abar[:-1]])
    return 1.0 - abar / prev
