"""Seeds: what a valid seed is, checked and parsed in one place (docs/ARCHITECTURE.md §6.2).

A *base seed* (``--seed`` of every command, a run's ``TrainConfig.seed``) is an integer in
[0, 2**63). Image i of a sampling run uses seed ``SEED + i`` for its own ``torch.Generator``, which
takes unsigned 64-bit seeds, so the lower limit of the base seed leaves room for the offsets.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from dydit.errors import DyditError

SEED_LIMIT = 2**63  # base seeds are in [0, SEED_LIMIT)
GENERATOR_LIMIT = 2**64  # torch.Generator seeds are in [0, GENERATOR_LIMIT)


class SeedError(DyditError, argparse.ArgumentTypeError):
    """A bad seed: a one-line DyditError, which argparse also reports as the option's error."""


def parse_seed(text: str | int) -> int:
    """A base seed from ``text``: an integer in [0, 2**63). Raises :class:`SeedError`.

    Usable directly as an argparse ``type=``.
    """
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise SeedError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise SeedError(f"must be in [0, 2**63), got {value}")
    return value


def check_generator_seeds(seeds: Iterable[int]) -> None:
    """Per-image seeds must fit a ``torch.Generator``: integers in [0, 2**64)."""
    if any(not 0 <= int(s) < GENERATOR_LIMIT for s in seeds):
        raise DyditError("seeds must be non-negative integers below 2**64")
