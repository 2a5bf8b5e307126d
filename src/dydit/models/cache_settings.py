"""What a step cache is set to and what it did (docs/METHOD.md §19): the method and threshold
(:class:`CacheSettings`), the computed/reused counts (:class:`CacheStats`), and TeaCache's rescaling
polynomial, fitted on recorded (input change, output change) pairs and kept in a small JSON file.
The cached network itself is :mod:`dydit.models.cache`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dydit.errors import DyditError

METHODS: tuple[str, ...] = ("teacache", "fbcache")
IDENTITY: tuple[float, ...] = (1.0, 0.0)  # the rescaling polynomial when none was fitted: P(x) = x
DEFAULT_DEGREE = 4  # TeaCache fits a degree-4 polynomial
CALIBRATION_IMAGES = 8  # images a calibration samples by default (dydit cache-calibrate, frontier auto)
CALIBRATION_BATCH = 8  # images per forward pass of a calibration (each change is one number per batch)


@dataclass(frozen=True)
class CacheSettings:
    """A caching method and its threshold; ``coefficients`` (TeaCache's rescaling polynomial, highest
    power first as ``numpy.polyval``) default to the identity."""

    method: str
    threshold: float
    coefficients: tuple[float, ...] = IDENTITY

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DyditError(f"unknown cache method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise DyditError(f"the cache threshold must be a finite number >= 0, got {self.threshold}")
        coeffs = tuple(float(c) for c in self.coefficients)
        if not coeffs or not all(math.isfinite(c) for c in coeffs):
            raise DyditError("the cache coefficients must be finite numbers (highest power first)")
        object.__setattr__(self, "coefficients", coeffs)

    @classmethod
    def parse(cls, spec: str, coefficients: Sequence[float] | None = None) -> CacheSettings:
        """``"teacache:0.15"`` or ``"fbcache:0.1"`` (method, colon, threshold)."""
        method, sep, value = spec.partition(":")
        if not sep:
            raise DyditError(f"a cache is METHOD:THRESHOLD (e.g. teacache:0.15 or fbcache:0.1), got {spec!r}")
        try:
            threshold = float(value)
        except ValueError:
            raise DyditError(f"the cache threshold must be a number, got {value!r}") from None
        return cls(
            method.strip().lower(), threshold, IDENTITY if coefficients is None else tuple(coefficients)
        )

    @property
    def spec(self) -> str:
        return f"{self.method}:{self.threshold:g}"

    def rescale(self, change: float) -> float:
        """The polynomial at ``change``, never below 0 (a change estimate cannot be negative)."""
        return max(0.0, float(np.polyval(self.coefficients, change)))


@dataclass
class CacheStats:
    """Network evaluations computed and reused, summed over runs (and over the batches of a run)."""

    computed: int = 0
    reused: int = 0
    runs: int = 0

    def summary(self) -> str:
        total = self.computed + self.reused
        runs = f"{self.runs} run{'s' if self.runs != 1 else ''}"
        return f"{self.computed} of {total} network evaluations computed, {self.reused} reused ({runs})"


def fit_coefficients(pairs: Sequence[tuple[float, float]], degree: int = DEFAULT_DEGREE) -> tuple[float, ...]:
    """Least-squares polynomial (highest power first) from input changes to output changes."""
    finite = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    if len(finite) <= degree:
        raise DyditError(
            f"fitting a degree-{degree} polynomial needs more than {degree} pairs, got {len(finite)}"
        )
    x, y = np.array(finite, dtype=np.float64).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def save_coefficients(path: str | Path, coefficients: Sequence[float], **meta: Any) -> None:
    """Write ``{"method": "teacache", "coefficients": [...], ...meta}`` (atomically)."""
    from dydit.io import atomic_write

    text = json.dumps({"method": "teacache", "coefficients": list(coefficients), **meta}, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def load_coefficients(path: str | Path) -> tuple[float, ...]:
    """The polynomial a calibration file holds (one-line errors for anything else)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DyditError(f"cannot read cache coefficients from {path}: {e}") from None
    coeffs = data.get("coefficients") if isinstance(data, dict) else None
    if not isinstance(coeffs, list) or not coeffs or not all(isinstance(c, int | float) for c in coeffs):
        raise DyditError(
            f"{path} holds no 'coefficients' list of numbers (write it with dydit cache-calibrate)"
        )
    return tuple(float(c) for c in coeffs)
