"""A GenEval-style score of text-to-image samples on the captioned compositions (docs/METHOD.md §17.4).

GenEval (Ghosh et al. 2023) checks generated images against the objects, counts, colours and
positions their prompts ask for, with an object detector, and reports the fraction of correct
images per task category and their mean. On the 2x2 compositions of :mod:`dydit.data.compose`
the detector is the project's Fashion-MNIST classifier, run on each cell:

1. each 64x64 image is cut into its four 32x32 cells;
2. a cell is **empty** when at most :data:`EMPTY_MAX_BRIGHT` of its pixels are brighter than
   :data:`NEAR_BLACK` in their brightest channel (all pixels near black, a few stray ones forgiven);
3. an occupied cell's grey image is its brightest channel (exactly the item's grey level for each
   of the six pure colours), classified by :func:`~dydit.evaluate.classifier.load_classifier`'s
   CNN on the centre 28x28;
4. its **colour** is the nearest of the six to its mean tint: the mean RGB of its bright pixels
   divided by their mean grey level.

A prompt is correct only when every requirement holds: exactly as many occupied cells as the
caption names items (items not named do not appear), each named item in as many cells as its count,
in its colour where the caption names one, and for position prompts the grid relation between the
two cells. The report gives the accuracy per category (single_object, two_object, counting, colors,
position, color_attr), ``overall`` as GenEval's mean of the categories, and optionally a per-cell
Fréchet distance in the classifier's feature space against real compositions of the same prompts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

from dydit.data.compose import CANVAS, CELL, GRID, NUM_CELLS, relation_holds
from dydit.data.compose_grammar import CATEGORIES, COLOUR_RGB, Prompt, parse_caption, read_prompts
from dydit.errors import DyditError
from dydit.evaluate.classifier import FEATURE_DIM, NUM_CLASSES, ClassifierFeatures
from dydit.evaluate.features import softmax_np
from dydit.evaluate.fid import GaussianStats, frechet_distance
from dydit.io import save_text

NEAR_BLACK = 48  # uint8 brightness (about 0.19) at or below which a pixel counts as black
EMPTY_MAX_BRIGHT = 4  # a cell with at most this many brighter pixels (of 1024) is empty
# A cell shows an item when the classifier gives it at least this probability (GenEval keeps a
# detector's boxes of every class above a confidence threshold, 0.3: docs/METHOD.md §17.4).
DETECT_THRESHOLD = 0.2
PROMPTS_FILE = "prompts.txt"  # a sample folder's prompts, one a line in the order of its sorted images
_COLOURS = np.asarray(COLOUR_RGB, dtype=np.float64)


@dataclass
class CellReadout:
    """What the scorer sees in N images: per cell ``occupied`` (N, 4), class ``probs`` (N, 4, 10),
    ``colour`` (N, 4), and ``features`` (M, 128) of the M occupied cells (for the Fréchet distance)."""

    occupied: np.ndarray
    probs: np.ndarray
    colour: np.ndarray
    features: np.ndarray

    @property
    def item(self) -> np.ndarray:
        """The classifier's top class per cell (N, 4)."""
        return self.probs.argmax(axis=-1)


def cut_cells(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 64, 64, 3) -> (N, 4, 32, 32, 3), cells in row-major order."""
    if images.ndim != 4 or images.shape[1:] != (CANVAS, CANVAS, 3):
        raise DyditError(
            f"GenEval-style scoring needs {CANVAS}x{CANVAS} RGB images, got shape {images.shape[1:]}"
        )
    n = len(images)
    cells = images.reshape(n, GRID, CELL, GRID, CELL, 3).transpose(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, NUM_CELLS, CELL, CELL, 3)


@torch.inference_mode()
def read_cells(images: np.ndarray, classifier: ClassifierFeatures, batch_size: int = 500) -> CellReadout:
    """Empty / item / colour of every cell of uint8 (N, 64, 64, 3) ``images`` (see the module docs)."""
    cells = cut_cells(np.asarray(images, dtype=np.uint8)).reshape(-1, CELL, CELL, 3)
    grey = cells.max(axis=-1)  # (M, 32, 32): the item's grey level under any of the six colours
    bright = grey > NEAR_BLACK
    occupied = bright.sum(axis=(1, 2)) > EMPTY_MAX_BRIGHT
    shown = grey[occupied]  # only occupied cells are classified; empty ones show nothing
    logits, features = [np.zeros((0, NUM_CLASSES))], [np.zeros((0, FEATURE_DIM))]
    for i in range(0, len(shown), batch_size):
        out = classifier(torch.from_numpy(np.ascontiguousarray(shown[i : i + batch_size, :, :, None])))
        logits.append(out["logits"].cpu().numpy())
        features.append(out["pool"].cpu().numpy())
    probs = np.zeros((len(grey), NUM_CLASSES))
    if len(shown):
        probs[occupied] = softmax_np(np.concatenate(logits))
    weight = bright[..., None].astype(np.float64)
    rgb_sum = (cells.astype(np.float64) * weight).sum(axis=(1, 2))  # (M, 3) over bright pixels
    grey_sum = (grey.astype(np.float64) * bright).sum(axis=(1, 2))[:, None]
    tint = rgb_sum / np.maximum(grey_sum, 1.0)  # about the colour's RGB for a tinted item
    colour = ((tint[:, None, :] - _COLOURS[None]) ** 2).sum(axis=-1).argmin(axis=1)
    n = len(images)
    feats = np.concatenate(features)
    return CellReadout(
        occupied.reshape(n, NUM_CELLS), probs.reshape(n, NUM_CELLS, -1), colour.reshape(n, NUM_CELLS), feats
    )


_STAGES = ("count", "object", "colour", "position")


def check_prompt(
    prompt: Prompt,
    occupied: np.ndarray,
    probs: np.ndarray,
    colour: np.ndarray,
    threshold: float = DETECT_THRESHOLD,
) -> str | None:
    """None when one image's cells (``occupied`` (4,), ``probs`` (4, 10), ``colour`` (4,)) satisfy
    ``prompt``, else the requirement that failed: ``"count"`` (not as many objects as named),
    ``"object"``, ``"colour"`` or ``"position"`` (the furthest any assignment of cells got)."""
    wanted = [t for t in prompt.things for _ in range(t.count)]  # one entry per item to find
    cells = [int(c) for c in np.flatnonzero(occupied)]
    if len(cells) != len(wanted):
        return "count"
    reached = 1
    for order in permutations(cells):  # at most 4! = 24 ways to give the named items their cells
        stage = 1
        if all(probs[c, t.item] >= threshold for c, t in zip(order, wanted)):
            stage = 2
            if all(t.colour is None or colour[c] == t.colour for c, t in zip(order, wanted)):
                stage = 3
                if prompt.relation is None or relation_holds(prompt.relation, order[0], order[1]):
                    return None
        reached = max(reached, stage)
    return _STAGES[reached]


@dataclass
class GenevalReport:
    """Per-category accuracy and GenEval's ``overall`` (the mean over the categories present)."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    per_prompt: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> dict[str, float]:
        return {c: self.correct[c] / self.total[c] for c in CATEGORIES if self.total.get(c)}

    @property
    def overall(self) -> float:
        acc = self.accuracy
        return float(np.mean(list(acc.values()))) if acc else 0.0

    def format(self) -> str:
        lines = [f"{'category':<14} {'accuracy':>8}   images"]
        for c, a in self.accuracy.items():
            lines.append(f"{c:<14} {a:8.3f}   {self.correct[c]}/{self.total[c]}")
        lines.append(f"{'overall':<14} {self.overall:8.3f}   (mean of the categories, as GenEval)")
        if self.failures:
            lines.append(
                "first failed requirement: " + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
            )
        lines += [f"{k:<14} {v:8.3f}" for k, v in self.metrics.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "failures": self.failures,
            "metrics": self.metrics,
        }

    def save_json(self, path: str | Path) -> None:
        save_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def score(
    prompts: Sequence[Prompt | str], readout: CellReadout, threshold: float = DETECT_THRESHOLD
) -> GenevalReport:
    """Score each image (row of ``readout``) against its prompt."""
    parsed = [p if isinstance(p, Prompt) else parse_caption(p) for p in prompts]
    if len(parsed) != len(readout.occupied):
        raise DyditError(
            f"{len(parsed)} prompts for {len(readout.occupied)} images; give one prompt per image"
        )
    report = GenevalReport()
    for k, prompt in enumerate(parsed):
        c = prompt.category
        failure = check_prompt(prompt, readout.occupied[k], readout.probs[k], readout.colour[k], threshold)
        report.total[c] = report.total.get(c, 0) + 1
        report.correct[c] = report.correct.get(c, 0) + (failure is None)
        if failure is not None:
            report.failures[failure] = report.failures.get(failure, 0) + 1
        report.per_prompt.append(failure is None)
    return report


def cell_frechet_distance(generated: CellReadout, real: CellReadout) -> float:
    """Fréchet distance between the classifier features of the occupied cells of two image sets."""
    if len(generated.features) < 2 or len(real.features) < 2:
        raise DyditError("the per-cell Fréchet distance needs at least two occupied cells on each side")
    return frechet_distance(
        GaussianStats.from_features(generated.features), GaussianStats.from_features(real.features)
    )


def load_prompted_images(
    samples: str | Path, prompts_file: str | Path | None = None
) -> tuple[np.ndarray, list[str]]:
    """Images (uint8 (N, 64, 64, 3)) and their prompts: a folder of PNGs (sorted by path) with
    ``prompts.txt`` inside (or ``prompts_file``), or an ``.npz`` (``arr_0``) with ``prompts_file``."""
    from dydit.evaluate.images import open_image_set

    path = Path(samples)
    if prompts_file is None:
        if not path.is_dir():
            raise DyditError(f"{samples}: give --prompts FILE (one prompt per image) for an .npz sample set")
        prompts_file = path / PROMPTS_FILE
    prompts = read_prompts(prompts_file)
    source = open_image_set(path).images
    if source is None:
        raise DyditError(f"{samples}: holds statistics only; GenEval-style scoring needs the images")
    images = np.concatenate(list(source.batches(256)))
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if len(images) != len(prompts):
        raise DyditError(f"{samples} holds {len(images)} images but {prompts_file} {len(prompts)} prompts")
    return images, prompts


def write_prompted_folder(folder: str | Path, images: np.ndarray, prompts: Sequence[Prompt | str]) -> Path:
    """Write uint8 (N, 64, 64, 3) ``images`` as ``000000.png`` ... and their prompts as ``prompts.txt``:
    the layout :func:`load_prompted_images` reads (a text-to-image sample folder, or real compositions
    as a reference folder for ``dydit evaluate SAMPLES --ref FOLDER``)."""
    from dydit.sample_io import image_name, save_png

    if len(images) != len(prompts):
        raise DyditError(f"{len(images)} images but {len(prompts)} prompts")
    texts = [p.text if isinstance(p, Prompt) else parse_caption(p).text for p in prompts]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        save_png(out / image_name(k, ".png"), image)
    save_text(out / PROMPTS_FILE, "".join(t + "\n" for t in texts))
    return out


def evaluate_geneval(
    samples: str | Path,
    prompts_file: str | Path | None = None,
    *,
    classifier: ClassifierFeatures | None = None,
    cache_dir: str | Path | None = None,
    reference_seed: int | None = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GenevalReport:
    """``dydit evaluate --geneval``: the GenEval-style report of a sample folder (or .npz) and its prompts.

    With ``reference_seed`` (default 0) real compositions of the same prompts (Fashion-MNIST test
    images, :func:`~dydit.data.compose.real_compositions`) give ``FD-cells``, the per-cell Fréchet
    distance in the classifier's feature space; None skips it."""
    from dydit.evaluate.classifier import load_classifier
    from dydit.evaluate.extract import default_cache_dir

    images, prompts = load_prompted_images(samples, prompts_file)
    if classifier is None:
        classifier = load_classifier(Path(cache_dir) if cache_dir else default_cache_dir(), device, progress)
    readout = read_cells(images, classifier)
    report = score(prompts, readout)
    if reference_seed is not None:
        from dydit.data.compose import load_item_pool, real_compositions

        pool = load_item_pool(split="test")
        real, _ = real_compositions([parse_caption(p) for p in prompts], *pool, seed=reference_seed)
        with contextlib.suppress(DyditError):  # too few occupied cells (e.g. black images): no distance
            report.metrics["FD-cells"] = cell_frechet_distance(readout, read_cells(real, classifier))
    return report
