"""Gaussian feature statistics and the Fréchet distance (FID, sFID; Heusel et al. 2017).

FID between two image sets is the Fréchet (2-Wasserstein) distance between Gaussians fitted to
their Inception pool features:

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)

The statistics stream: :class:`RunningGaussian` keeps float64 running sums of the features and of
their outer products, so a set of any size needs O(D²) memory. The matrix square root is
``scipy.linalg.sqrtm``; like the ADM evaluator, a product that is numerically singular is
retried with ``eps·I`` added to both covariances, and a tiny imaginary part from round-off is
dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
from torch import Tensor

from dydit.errors import DyditError
from dydit.io import npz_name, save_npz

# Offset added to both covariances when Σ₁Σ₂ is singular (the ADM evaluator's choice).
SQRTM_EPS = 1e-6
# Imaginary parts of tr(sqrtm) larger than this are reported, not silently dropped.
IMAG_TOLERANCE = 1e-3


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of ``count`` feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray | Tensor) -> GaussianStats:
        """Statistics of a (N, D) feature matrix in one go (the non-streaming reference)."""
        running = RunningGaussian()
        running.update(features)
        return running.finalize()


class RunningGaussian:
    """Streaming mean and covariance with float64 running sums.

    Sums are taken of ``x − shift``, where ``shift`` is the mean of the first batch: the covariance
    does not depend on the shift, and centring keeps Σxxᵀ − nμμᵀ from cancelling catastrophically
    when features have a large common offset.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray | Tensor) -> None:
        """Add a batch of feature vectors, (B, D)."""
        if isinstance(features, Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (B, D), got shape {x.shape}")
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self._shift.shape[0]} to {x.shape[1]}")
        x = x - self._shift
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        self.count += len(x)

    def finalize(self) -> GaussianStats:
        """Mean and unbiased covariance (divided by N − 1, as ``np.cov``) of everything seen."""
        if self.count < 2:
            raise DyditError(
                f"a covariance needs at least 2 feature vectors, got {self.count}; evaluate more images"
            )
        mean_shifted = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_shifted, mean_shifted)) / (self.count - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry despite round-off
        return GaussianStats(mu=mean_shifted + self._shift, sigma=sigma, count=self.count)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ₁ Σ₂)^½) via ``scipy.linalg.sqrtm``, with the ADM evaluator's safeguards.

    Covariances of fewer vectors than dimensions are singular; scipy then warns that the root may
    be inaccurate. That is the normal case for small sets, so the warning is silenced and only a
    non-finite result triggers the ``eps·I`` retry.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: Σ₁Σ₂ is singular; adding {SQRTM_EPS}·I to both covariances", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    trace = np.trace(covmean)
    if np.iscomplexobj(trace):
        if abs(trace.imag) > IMAG_TOLERANCE * max(1.0, abs(trace.real)):
            warnings.warn(
                f"Fréchet distance: tr sqrtm has imaginary part {trace.imag:.3g}; using the real part",
                stacklevel=2,
            )
        trace = trace.real
    return float(trace)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½); raises DyditError on mismatched dimensions."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise DyditError(
            f"cannot compare statistics of {a.dim}-d and {b.dim}-d features; were they computed with "
            "different feature networks?"
        )
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a.sigma, b.sigma)
    # Round-off can make the distance of a set to itself a tiny negative number.
    return float(max(value, 0.0))


def save_stats(path: str | Path, stats: dict[str, GaussianStats]) -> None:
    """Write statistics in the ADM reference-batch keys: ``mu``/``sigma`` for ``"pool"`` features,
    ``mu_s``/``sigma_s`` for ``"spatial"`` features. Written atomically; like ``np.savez``, a name
    without the ``.npz`` suffix gets it appended."""
    arrays: dict[str, np.ndarray] = {}
    for kind, suffix in (("pool", ""), ("spatial", "_s")):
        if kind in stats:
            arrays[f"mu{suffix}"] = stats[kind].mu
            arrays[f"sigma{suffix}"] = stats[kind].sigma
    save_npz(npz_name(path), arrays)
