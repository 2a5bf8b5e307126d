"""Sampling with per-image seeds, rank striding and resumable output directories (docs/METHOD.md §7.1, §7.2).

Reproducibility is structural (docs/ARCHITECTURE.md §6.2, the EDM2 recipe): image i is defined by
``(seeds[i], labels[i])`` alone. Its initial noise and every per-step noise come from its own
``torch.Generator`` seeded with ``seeds[i]``, so an image does not depend on the batch size, on its
batch neighbours or on the number of processes. Ranks stride the list (image i goes to rank
i % world_size). Labels not given are drawn per image from a separate stream derived from the same seed.

- :func:`generate` yields batches of samples in model space (pixels or latents).
- :func:`sample_images` decodes them to uint8 and gathers all images on every rank (small runs).
- :func:`sample_to_dir` writes one file per image (``000123.png`` and/or ``.npy``) atomically, skips
  images already written when rerun (resume = rerun), then packs an ADM-format ``.npz`` on rank 0
  (the files themselves: :mod:`dydit.sample_io`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dydit import distributed
from dydit.conditioning import ClassLabels, Condition, conditioned
from dydit.data.codec import Codec
from dydit.diffusion import GaussianDiffusion, ModelFn, guided
from dydit.errors import DyditError
from dydit.io import locked_dir
from dydit.models.cache import (
    CALIBRATION_BATCH,
    DEFAULT_DEGREE,
    ChangeRecorder,
    StepCache,
    fit_coefficients,
    save_coefficients,
)
from dydit.models.dydit import DyDiT
from dydit.models.sliced import SlicedDyDiT
from dydit.presets import ModelConfig
from dydit.sample_io import (  # noqa: F401  (MANIFEST, load_png, save_grid: public here too)
    MANIFEST,
    check_manifest,
    clean_directory,
    digest,
    image_name,
    load_png,
    pack_npz,
    save_grid,
    save_npy,
    save_png,
)
from dydit.sample_settings import SamplingSettings, check_process  # noqa: F401  (public here too)
from dydit.seeds import check_generator_seeds

_LABEL_STREAM = 1  # second entropy word of the per-image label generator


@dataclass
class SampleBatch:
    """One batch of a rank's share: global indices, seeds, labels (B,) and samples (B, C, H, W).

    ``condition`` holds the batch's rows of the condition (on the sampling device); ``labels`` are
    its class labels on the CPU, None for another kind of condition (text)."""

    indices: list[int]
    seeds: list[int]
    labels: Tensor | None
    samples: Tensor
    condition: Condition | None = None


def resolve_labels(seeds: Sequence[int], labels: Sequence[int] | Tensor | None, num_classes: int) -> Tensor:
    """Labels (N,) int64 for every seed: checked if given, else drawn from each seed's label stream."""
    check_generator_seeds(seeds)
    if labels is None:
        # A stream of its own (SeedSequence mixing), so a label is independent of its image's noise.
        drawn = [int(np.random.default_rng([int(s), _LABEL_STREAM]).integers(num_classes)) for s in seeds]
        return torch.tensor(drawn, dtype=torch.long)
    out = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(out) != len(seeds):
        raise DyditError(f"got {len(out)} labels for {len(seeds)} seeds")
    bad = out[(out < 0) | (out >= num_classes)]
    if len(bad):
        raise DyditError(f"class {int(bad[0])} is out of range for a model with {num_classes} classes")
    return out


def resolve_condition(
    seeds: Sequence[int],
    labels: Sequence[int] | Tensor | None,
    condition: Condition | None,
    num_classes: int | None,
) -> Condition:
    """One row of condition per seed: ``condition`` (checked), or the class labels of
    :func:`resolve_labels` with the null class ``num_classes``."""
    if condition is None:
        if num_classes is None:
            raise DyditError("class-conditional sampling needs num_classes (or give a condition)")
        return ClassLabels(resolve_labels(seeds, labels, num_classes), num_classes)
    check_generator_seeds(seeds)
    if labels is not None:
        raise DyditError("give labels or a condition, not both")
    if len(condition) != len(seeds):
        raise DyditError(f"got a condition of {len(condition)} rows for {len(seeds)} seeds")
    return condition


def rank_share(num_images: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """Indices of the images this rank produces: i with i % world == rank."""
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    return list(range(rank, num_images, world))


@torch.no_grad()
def generate(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    settings: SamplingSettings,
    *,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    num_classes: int | None = None,
    labels: Sequence[int] | Tensor | None = None,
    condition: Condition | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    indices: Sequence[int] | None = None,
    progress: bool = True,
) -> Iterator[SampleBatch]:
    """Yield batches of samples in model space.

    Args:
        model_fn: ``(x, t, y) -> (B, C_out, H, W)`` on ``device`` (eval mode); guidance is added here.
            ``y`` is the condition's :meth:`~dydit.conditioning.Condition.network_input`: the labels
            (B,) for class labels (the null class for guidance is ``num_classes``).
        diffusion: the model's process: the full diffusion (T = 1000), which ``settings.steps``
            respaces, or the flow-matching transport (:func:`dydit.flow.create_process`).
        seeds: one seed per image; image i is defined by ``seeds[i]`` and its label (condition).
        shape: (C, H, W) of one sample in model space.
        num_classes: classes of the model; the null class for guidance is ``num_classes``.
        labels: one label per seed, or None to draw them from the seeds.
        condition: instead of class labels, any :class:`~dydit.conditioning.Condition` with one row
            per seed (e.g. a :class:`~dydit.conditioning.TextCondition`); its null is its own.
        dtype: dtype of the samples (noise is always drawn in float32, then cast).
        indices: which images to produce (default: this rank's share, :func:`rank_share`).

    A DyDiT runs in its own ``model.execution``, ``"masked"`` unless set: set ``"sliced"`` (eval
    mode) to really skip the switched-off work, as ``dydit sample`` does by default, or pass
    ``dydit.engine(model, compile=..., token_bucket=..., pack_budget=...)`` as ``model_fn`` for the
    sliced engine with options.
    """
    if batch_size < 1:
        raise DyditError(f"batch size must be positive, got {batch_size}")
    config = getattr(model_fn, "config", None)
    if isinstance(config, ModelConfig):  # a flow-matching model must not meet a DDPM sampler
        check_process(settings.sampler, diffusion, config)
    # Fails early on a bad step spec or sampler/process pairing; a sliced engine plans these times.
    plan_engine(model_fn, settings.network_times(diffusion))
    cond = resolve_condition(seeds, labels, condition, num_classes)
    todo = rank_share(len(seeds)) if indices is None else list(indices)
    # The sampler carries the condition as y; guidance doubles it; the network gets its network input.
    fn = guided(conditioned(model_fn), settings.cfg_scale, channels=settings.guidance_channels)
    sampler = settings.function
    # Step caching (docs/METHOD.md §19): a fresh cache run per batch, told the run's evaluation times.
    cache = model_fn if isinstance(model_fn, StepCache | ChangeRecorder) else None
    evaluations = sampler.times(diffusion, settings.steps, **settings.sampler_options()) if cache else None
    bar = tqdm(total=len(todo), unit="img", desc="sampling", disable=not (progress and distributed.is_main()))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        gens = [torch.Generator().manual_seed(int(seeds[i])) for i in chunk]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)  # (B, C, H, W)
        c = cond.select(chunk).to(device, dtype)  # B rows
        if cache is not None:
            cache.start_run(evaluations)
        x = sampler(
            fn,
            noise,
            diffusion,
            settings.steps,
            model_kwargs={"y": c},
            generators=gens,
            **settings.sampler_options(),
        )
        finite = torch.isfinite(x).flatten(1).all(1).tolist()
        if not all(finite):  # never write NaN as black images into an FID set
            bad = [int(seeds[i]) for i, ok in zip(chunk, finite) if not ok]
            raise DyditError(
                f"non-finite samples for seed(s) {bad[:4]}{' ...' if len(bad) > 4 else ''}: the weights "
                "hold NaN/inf or the sampler diverged (try a smaller --cfg-scale or more steps)"
            )
        bar.update(len(chunk))
        labels_cpu = c.labels.cpu() if isinstance(c, ClassLabels) else None
        yield SampleBatch(chunk, [int(seeds[i]) for i in chunk], labels_cpu, x, c)
    bar.close()


def plan_engine(model_fn: ModelFn, times: Sequence[float]) -> None:
    """Plan the times of a sampling run in the sliced engine that ``model_fn`` runs, if any: the
    engine itself, or a DyDiT in eval mode with ``execution = "sliced"`` (its default engine). The
    width plans of all steps are made at once, and the packs the run uses most are the ones held
    within the pack budget (docs/ARCHITECTURE.md §4)."""
    if isinstance(model_fn, StepCache | ChangeRecorder):  # step caching wraps the network (§19)
        model_fn = model_fn.model
    if isinstance(model_fn, SlicedDyDiT):
        model_fn.prepare(times)
    elif isinstance(model_fn, DyDiT) and model_fn.execution == "sliced" and not model_fn.training:
        model_fn.sliced_engine().prepare(times)


def to_uint8(x: Tensor) -> np.ndarray:
    """(B, C, H, W) pixels in [-1, 1] -> (B, H, W, C) uint8 via clamp(127.5·x + 128, 0, 255), as DiT."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def sample_images(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    settings: SamplingSettings,
    codec: Codec,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """All images of a (small) run as uint8 (N, H, W, C) and their labels (N,), on every rank.

    Takes the keyword arguments of :func:`generate`; each rank samples its share and the shares
    are gathered, so the result equals a one-process run.
    """
    parts: list[tuple[list[int], np.ndarray, np.ndarray]] = []
    for b in generate(model_fn, diffusion, settings, **kwargs):
        labels = b.labels.numpy() if b.labels is not None else np.zeros(len(b.indices), dtype=np.int64)
        parts.append((b.indices, to_uint8(codec.decode(b.samples)), labels))
    if distributed.is_initialized():
        gathered: list[Any] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(gathered, parts)
        parts = [p for rank_parts in gathered for p in rank_parts]
    if not parts:
        raise DyditError("no images to sample")
    order = np.argsort(np.concatenate([np.asarray(p[0]) for p in parts]))
    images = np.concatenate([p[1] for p in parts])[order]
    return images, np.concatenate([p[2] for p in parts])[order]


# TeaCache's calibration (docs/METHOD.md §19) -----------------------------------------------------
def calibration_meta(
    runs: Sequence[SamplingSettings],
    num_samples: int,
    batch_size: int = CALIBRATION_BATCH,
    degree: int = DEFAULT_DEGREE,
) -> dict[str, Any]:
    """What a calibration file records about how it was fitted, besides its coefficients and pairs:
    a caller that reuses a stored file compares these with the fit it would make."""
    sampling = [s.to_dict() for s in runs]
    return dict(
        degree=degree, sampling=sampling[0] if len(sampling) == 1 else sampling,
        num_samples=num_samples, batch_size=batch_size,
    )  # fmt: skip


def calibrate_teacache(
    model: ModelFn,
    process: GaussianDiffusion,
    runs: Sequence[SamplingSettings],
    *,
    out: str | Path,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    num_classes: int | None = None,
    condition: Condition | None = None,
    degree: int = DEFAULT_DEGREE,
    batch_size: int = CALIBRATION_BATCH,
    device: str | torch.device = "cpu",
    **meta: Any,
) -> tuple[tuple[float, ...], int]:
    """Fit TeaCache's polynomial on ``model``'s own uncached trajectories and write it to ``out``.

    ``model`` samples ``seeds`` (class labels drawn from the seeds, or ``condition``: one row per
    seed, e.g. prompts) once per :class:`SamplingSettings` of ``runs`` through a
    :class:`~dydit.models.cache.ChangeRecorder`; the pairs of every run are fitted together, so a
    polynomial meant for several step counts sees the changes of each (fewer steps: larger
    changes). ``meta`` is written beside the coefficients, with :func:`calibration_meta` and the
    number of pairs.
    ``dydit cache-calibrate`` (one run) and the frontier benchmarks (``--cache-coefficients
    auto``) fit through here. Returns (coefficients, pairs).
    """
    if not runs:
        raise DyditError("a TeaCache calibration needs at least one sampling run")
    recorder = ChangeRecorder(model)
    for settings in runs:
        batches = generate(
            recorder, process, settings, seeds=seeds, shape=shape, num_classes=num_classes,
            condition=condition, batch_size=batch_size, device=device, progress=False,
        )  # fmt: skip
        for _ in batches:
            pass
    coeffs = fit_coefficients(recorder.pairs, degree)
    fitted = calibration_meta(runs, len(seeds), batch_size, degree)
    save_coefficients(out, coeffs, pairs=len(recorder.pairs), **fitted, **meta)
    return coeffs, len(recorder.pairs)


# Output directories --------------------------------------------------------------------------
@dataclass
class DirResult:
    """What :func:`sample_to_dir` did on this rank."""

    out_dir: Path
    num_images: int
    generated: int
    skipped: int
    npz: Path | None = None
    files: list[str] = field(default_factory=list)


def sample_to_dir(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    settings: SamplingSettings,
    out_dir: str | os.PathLike,
    *,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    num_classes: int,
    codec: Codec | None,
    labels: Sequence[int] | Tensor | None = None,
    condition: Condition | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    save_raw: bool = False,
    npz_path: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> DirResult:
    """Sample every image into ``out_dir``, resuming where an earlier run stopped.

    Files: ``{i:06d}.png`` (decoded by ``codec``) and, with ``save_raw`` or without a codec,
    ``{i:06d}.npy`` (float32 (C, H, W) samples in model space, e.g. latents). An image counts as done
    when all its files exist; files are written atomically, so a rerun never keeps a partial one.
    ``sampling.json`` records the settings; a rerun with other settings is refused. With
    ``npz_path`` (requires a codec), rank 0 packs ``arr_0`` (N, H, W, C) uint8 and ``arr_1`` (N,)
    labels after all ranks finish, written atomically (never a partial npz). ``condition`` (one row per
    seed, e.g. a text model's token ids) replaces the labels; the manifest then records its digest
    (:func:`condition_digest`) and the npz's labels are zeros. Another process
    writing ``out_dir`` is a DyditError before anything is written (:func:`dydit.io.locked_dir`).
    """
    out = Path(out_dir)
    if npz_path is not None and codec is None:
        raise DyditError("an .npz of images needs decoded images; give a codec (e.g. --vae)")
    with locked_dir(out):  # one writer per sample directory; rank 0 holds it for the job
        if condition is None:
            all_labels = resolve_labels(seeds, labels, num_classes)
            label_digest = digest(all_labels.numpy())
        else:
            resolve_condition(seeds, labels, condition, num_classes)  # one row per seed
            all_labels = torch.zeros(len(seeds), dtype=torch.long)
            label_digest = condition_digest(condition)
        suffixes = ([".npy"] if save_raw or codec is None else []) + ([".png"] if codec is not None else [])
        manifest = {
            "settings": settings.to_dict(),
            "num_images": len(seeds),
            "seeds": digest(seeds),
            "labels": label_digest,
            "shape": list(shape),
            "codec": None if codec is None else codec.spec,
            "files": suffixes,
            **(meta or {}),
        }
        check_manifest(out, json.loads(json.dumps(manifest)))
        clean_directory(out)  # temporary files of killed writers
        existing = set(os.listdir(out))
        share = rank_share(len(seeds))
        todo = [i for i in share if not all(image_name(i, s) in existing for s in suffixes)]
        result = DirResult(out, len(seeds), generated=0, skipped=len(share) - len(todo))
        batches = generate(
            model_fn, diffusion, settings, seeds=seeds, shape=shape, num_classes=num_classes,
            labels=all_labels if condition is None else None, condition=condition,
            batch_size=batch_size, device=device, indices=todo, progress=progress,
        )  # fmt: skip
        for b in batches:
            _write_batch(out, b, codec, suffixes)
            result.generated += len(b.indices)

        distributed.barrier()
        if npz_path is not None:
            result.npz = Path(npz_path)
            if distributed.is_main():
                pack_npz(out, len(seeds), all_labels.numpy(), result.npz, progress=progress)
            distributed.barrier()
        return result


def condition_digest(condition: Condition) -> str:
    """A short content hash of a condition's rows: the token ids of a :class:`~dydit.text.TokenIds`,
    the labels of :class:`ClassLabels`, else the bytes of its tensors (for the sample manifest)."""
    import hashlib

    if isinstance(condition, ClassLabels):
        return digest(condition.labels.cpu().numpy())
    h = hashlib.sha256(type(condition).__name__.encode())
    for value in vars(condition).values():
        if isinstance(value, Tensor):
            h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _write_batch(out: Path, batch: SampleBatch, codec: Codec | None, suffixes: list[str]) -> None:
    """Publish each image of ``batch``: ``.npy`` (model space) and/or ``.png`` (decoded)."""
    raw = batch.samples.float().cpu().numpy()
    images = to_uint8(codec.decode(batch.samples)) if codec is not None else None
    for j, i in enumerate(batch.indices):
        if ".npy" in suffixes:
            save_npy(out / image_name(i, ".npy"), raw[j])
        if images is not None:
            save_png(out / image_name(i, ".png"), images[j])
