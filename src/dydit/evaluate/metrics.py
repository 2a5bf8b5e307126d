"""Inception Score and k-NN precision/recall, with the ADM evaluator's definitions.

- **Inception Score** (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)), computed on consecutive
  splits of ``split_size`` = 5000 samples (one split when there are fewer) and averaged over splits.
- **Precision and recall** (Kynkäänniemi et al. 2019): each feature set defines a manifold, the
  union of balls around its points with radius the distance to the point's k-th nearest neighbour
  (k = 3, the point itself excluded). Precision is the fraction of samples inside the reference
  manifold; recall the fraction of reference points inside the sample manifold. Distances are
  squared Euclidean distances between Inception pool features, computed in row blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dydit.errors import DyditError

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
# Rows of the pairwise-distance matrix computed at once (block x N floats in memory).
DISTANCE_BLOCK = 1024


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score of class probabilities (N, K) (rows sum to one); mean over splits."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < 1:
        raise DyditError(f"the Inception Score needs class probabilities (N, K), got shape {probs.shape}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        log_p = np.log(np.clip(part, 1e-30, None))
        log_marginal = np.log(np.clip(part.mean(axis=0, keepdims=True), 1e-30, None))
        kl = (part * (log_p - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances (Na, Nb) of rows of a (Na, D) and b (Nb, D)."""
    d = a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]
    return d.clamp_min_(0)


def knn_radii(features: Tensor, k: int = PR_NEIGHBOURS, block: int = DISTANCE_BLOCK) -> Tensor:
    """Squared distance (N,) from each point to its k-th nearest neighbour in the same set."""
    if len(features) <= k:
        raise DyditError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(features)}"
        )
    radii = [
        squared_distances(features[i : i + block], features)
        .kthvalue(k + 1, dim=1)
        .values  # +1: the point itself
        for i in range(0, len(features), block)
    ]
    return torch.cat(radii)


def inside_manifold(queries: Tensor, support: Tensor, radii: Tensor, block: int = DISTANCE_BLOCK) -> Tensor:
    """Bool (Nq,): whether each query lies within radius of at least one support point."""
    hits = [
        (squared_distances(queries[i : i + block], support) <= radii[None]).any(dim=1)
        for i in range(0, len(queries), block)
    ]
    return torch.cat(hits)


def precision_recall(
    reference: np.ndarray | Tensor,
    samples: np.ndarray | Tensor,
    k: int = PR_NEIGHBOURS,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of sample features (Ns, D) against reference features (Nr, D)."""
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)
    gen = torch.as_tensor(samples, dtype=torch.float32, device=device)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise DyditError(
            f"precision/recall needs two (N, D) feature sets, got {tuple(ref.shape)} and {tuple(gen.shape)}"
        )
    ref_radii, gen_radii = knn_radii(ref, k), knn_radii(gen, k)
    precision = inside_manifold(gen, ref, ref_radii).float().mean().item()
    recall = inside_manifold(ref, gen, gen_radii).float().mean().item()
    return precision, recall


def label_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the class they were generated for."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())
