"""A counter of the work really done: layers call :func:`record` with the MACs they perform.

Usage::

    with count_flops() as fc:
        model(x, t, y)
    fc.total   # MACs for the whole batch
    fc.by_component

Recording is a no-op (one list check) when no counter is active, so layers can call it
unconditionally. The counter counts what ran: a masked DyDiT forward records the full dense
work it performs, a sliced forward only the work of its active heads, groups and tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_ACTIVE: list[FlopCounter] = []


class FlopCounter:
    """Accumulates MACs per component name."""

    def __init__(self) -> None:
        self.by_component: dict[str, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    def add(self, component: str, macs: int) -> None:
        self.by_component[component] += int(macs)


def is_counting() -> bool:
    """Whether a counter is active: lets a hot loop skip computing what :func:`record` would drop."""
    return bool(_ACTIVE) and not torch.compiler.is_compiling()


def record(component: str, macs: int) -> None:
    """Add ``macs`` to every active counter under ``component`` (no-op when none is active)."""
    if _ACTIVE and not torch.compiler.is_compiling():
        for c in _ACTIVE:
            c.add(component, macs)


@contextmanager
def count_flops() -> Iterator[FlopCounter]:
    """Activate a :class:`FlopCounter` for the duration of the block."""
    counter = FlopCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)
