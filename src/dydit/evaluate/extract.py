"""One streaming pass of an image set through feature networks, and the reference cache.

:func:`extract` reads each batch once and feeds it to every network, keeping float64 running
sums for the Gaussian statistics (pool and spatial features) and, when asked, the pool features
(precision/recall) and logits (Inception Score). :func:`reference_features` does the same for a
reference set but first looks in the on-disk cache, keyed by a hash of the images, the network's
weights and the preprocessing version, so a reference is featurised once per network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dydit.evaluate.features import FeatureNet
from dydit.evaluate.fid import GaussianStats, RunningGaussian
from dydit.evaluate.images import ImageSource
from dydit.io import locked_dir, save_npz, save_text

# Bump when preprocessing or cached content changes, so stale cache entries are not reused.
CACHE_VERSION = 1
CACHE_ENV = "DYDIT_CACHE_DIR"
GAUSSIAN_OUTPUTS = ("pool", "spatial")


def default_cache_dir() -> Path:
    """``$DYDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/dydit``, else ``~/.cache/dydit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dydit"


@dataclass
class Extracted:
    """What one network saw of one image set: statistics, and optionally features and logits."""

    count: int
    stats: dict[str, GaussianStats] = field(default_factory=dict)
    features: np.ndarray | None = None  # (N, D) float32 pool features
    logits: np.ndarray | None = None  # (N, K) float32


def extract(
    source: ImageSource,
    nets: Sequence[FeatureNet],
    *,
    batch_size: int = 50,
    keep_features: bool = False,
    keep_logits: bool = False,
    progress: bool = True,
    desc: str = "features",
) -> list[Extracted]:
    """Run every network over ``source`` in one pass; one :class:`Extracted` per network."""
    running = [{k: RunningGaussian() for k in GAUSSIAN_OUTPUTS if k in net.outputs} for net in nets]
    kept: list[dict[str, list[np.ndarray]]] = [{"pool": [], "logits": []} for _ in nets]
    count = 0
    with tqdm(total=len(source), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in source.batches(batch_size):
            images = torch.from_numpy(np.require(batch, requirements=("C", "W")))  # copies read-only views
            for net, stats, keep in zip(nets, running, kept):
                out = net(images)
                for kind, acc in stats.items():
                    acc.update(out[kind])
                if keep_features:
                    keep["pool"].append(out["pool"].cpu().numpy().astype(np.float32))
                if keep_logits and "logits" in out:
                    keep["logits"].append(out["logits"].cpu().numpy().astype(np.float32))
            count += len(batch)
            bar.update(len(batch))
    results = []
    for stats, keep in zip(running, kept):
        results.append(
            Extracted(
                count=count,
                stats={kind: acc.finalize() for kind, acc in stats.items()},
                features=np.concatenate(keep["pool"]) if keep["pool"] else None,
                logits=np.concatenate(keep["logits"]) if keep["logits"] else None,
            )
        )
    return results


def cache_key(source: ImageSource, net: FeatureNet) -> str:
    text = f"v{CACHE_VERSION}|{net.name}|{source.fingerprint()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reference_features(
    source: ImageSource,
    nets: Sequence[FeatureNet],
    *,
    cache_dir: Path | None,
    batch_size: int = 50,
    progress: bool = True,
) -> list[Extracted]:
    """Statistics and pool features of a reference set per network, from the cache when possible.

    ``cache_dir=None`` disables the cache. Entries are ``<cache_dir>/refs/<key>.npz`` with a
    ``.json`` note naming the source and network. The cache is shared by every command: missing
    entries are computed and written under the cache's lock, so a second process that needs them
    waits for the first and reuses its entries instead of computing them again
    (:func:`dydit.io.locked_dir` with ``wait=True``).
    """
    results: list[Extracted | None] = [None] * len(nets)
    keys = [cache_key(source, net) for net in nets] if cache_dir is not None else [None] * len(nets)

    def fill() -> None:
        for i, key in enumerate(keys):
            if key is not None and results[i] is None:
                results[i] = _load_entry(cache_dir / "refs" / f"{key}.npz")

    fill()
    if any(r is None for r in results):
        with locked_dir(cache_dir, wait=True) if cache_dir is not None else contextlib.nullcontext():
            fill()  # written by the process we may have waited for
            missing = [i for i, r in enumerate(results) if r is None]
            fresh = extract(
                source,
                [nets[i] for i in missing],
                batch_size=batch_size,
                keep_features=True,
                progress=progress,
                desc=f"reference {source.name}",
            ) if missing else []  # fmt: skip
            for i, entry in zip(missing, fresh):
                results[i] = entry
                if keys[i] is not None:
                    note = {"source": source.name, "images": entry.count, "network": nets[i].name}
                    _save_entry(cache_dir / "refs" / f"{keys[i]}.npz", entry, note)
    return results  # type: ignore[return-value]


def _save_entry(path: Path, entry: Extracted, note: dict) -> None:
    """Write a cache entry and its note atomically (a concurrent reader never sees half a file)."""
    arrays: dict[str, np.ndarray] = {"count": np.array(entry.count)}
    for kind, stats in entry.stats.items():
        arrays[f"{kind}_mu"], arrays[f"{kind}_sigma"] = stats.mu, stats.sigma
    if entry.features is not None:
        arrays["features"] = entry.features
    save_npz(path, arrays, parents=True)  # the cache's refs/ folder
    save_text(path.with_suffix(".json"), json.dumps(note, indent=1) + "\n")


def _load_entry(path: Path) -> Extracted | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            count = int(data["count"])
            stats = {
                kind: GaussianStats(data[f"{kind}_mu"], data[f"{kind}_sigma"], count)
                for kind in GAUSSIAN_OUTPUTS
                if f"{kind}_mu" in data.files
            }
            features = data["features"] if "features" in data.files else None
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is recomputed and overwritten
    return Extracted(count=count, stats=stats, features=features)
