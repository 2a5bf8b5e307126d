"""The embedded default, end to end: a DiT for Fashion-MNIST, its DyDiT fine-tune, and the evidence.

``dydit demo`` (the README's main command) runs :func:`run_demo`:

1. loads the shipped base DiT (``assets/dit-ti4-fmnist.safetensors``, trained by ``dydit train``;
   see ``assets/README.md`` for the exact command and log);
2. fine-tunes it into a DyDiT at FLOPs target λ (docs/METHOD.md §5) for a few percent of the base
   model's iterations (resumable: rerunning continues the fine-tune);
3. samples the same seeds and labels from the dense DiT and from the DyDiT run by the sliced
   engine, timing both side by side and counting the multiply-accumulates really performed;
4. evaluates both sample sets against the Fashion-MNIST training set (FID with the offline
   Inception network, and the Fréchet distance in a small Fashion-MNIST classifier's features);
5. draws the pictures (grids, per-timestep FLOPs profile, router map, token-keep overlays) and
   writes ``report.md`` and ``results.json``.

``fast=True`` is a smoke run of the same path with tiny counts (the test suite runs it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dydit.checkpoint import has_routers, load_dydit_checkpoint, load_model, open_checkpoint, read_checkpoint
from dydit.data.fashion_mnist import CLASS_NAMES
from dydit.diffusion import SAMPLERS, create_diffusion
from dydit.errors import DyditError
from dydit.flops.counter import count_flops
from dydit.flow import FLOW_SAMPLERS, Transport, create_process
from dydit.io import locked_dir, save_text
from dydit.models.dydit import DyDiT, execution
from dydit.sample import SamplingSettings, sample_images

if TYPE_CHECKING:
    from dydit.train import TrainConfig

_log = logging.getLogger("dydit.apps.demo")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BASE_CHECKPOINT = ASSETS / "dit-ti4-fmnist.safetensors"
# The best DyDiT fine-tune of that base at λ = 0.5 (assets/README.md has its command and log).
SHIPPED_DYDIT = ASSETS / "dydit-ti4-fmnist-0.5.safetensors"
SHIPPED_DYDIT_TARGET = 0.5
# How it was fine-tuned: the demo's settings (DemoConfig) with these fields changed. 2400 steps, the
# complete-model loss in the first 1200 (docs/BENCHMARKS.md, "Moving DyDiT's curve": the 1200-step
# recipe shipped until 2026-12-07 scored 91.5 FID at 20 steps, this one 83.3).
SHIPPED_RECIPE: dict[str, Any] = {"finetune_steps": 2400, "complete_steps": 1200, "distill_weight": 1.0}
REFERENCE = "fashion-mnist-train"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run; ``fast`` shrinks every count for a smoke run."""

    out_dir: str = "runs/demo"
    checkpoint: str | None = None  # None: the shipped base DiT
    dydit_checkpoint: str | None = None  # None: the shipped DyDiT (shipped base and λ only)
    target: float = 0.5
    # The live fine-tune only shows training at work (150 steps keep the demo under 15 minutes on a
    # 2-core CPU); the model under test is the shipped DyDiT (SHIPPED_RECIPE: 2400 steps). Measured
    # choices (docs/BENCHMARKS.md, "What was tried"): more steps recover more; lr 1e-4 recovers less
    # than the base model's 3e-4; the EMA decay (0.95 vs 0.99) made no difference.
    finetune_steps: int = 150
    finetune_batch: int = 64
    lr: float = 3e-4
    router_lr: float = 1e-2
    ema_decay: float = 0.99
    target_hold_steps: int = 10
    target_warmup_steps: int = 100
    complete_steps: int = 300  # iterations with the complete-model loss (docs/METHOD.md §5.2)
    distill_weight: float = 0.0  # distillation from the frozen base (docs/TRAINING.md)
    reorder: bool = False  # importance reordering before fine-tuning
    num_samples: int = 1000
    sampler: str = "dpm++2m"
    steps: int = 20
    cfg_scale: float = 1.0
    sample_batch: int = 250
    seed: int = 0
    inception: bool = True
    ref_limit: int | None = None
    device: str = "cpu"
    progress: bool = True
    fast: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise DyditError(f"the FLOPs target lambda must be in (0, 1], got {self.target}")
        for name in ("finetune_steps", "finetune_batch", "num_samples", "steps", "sample_batch"):
            if getattr(self, name) <= 0:
                raise DyditError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS and self.sampler not in FLOW_SAMPLERS:
            valid = ", ".join([*SAMPLERS, *FLOW_SAMPLERS])
            raise DyditError(f"unknown sampler {self.sampler!r}; valid: {valid}")
        if self.cfg_scale < 0:
            raise DyditError(f"guidance scale must be >= 0, got {self.cfg_scale}")

    @classmethod
    def smoke(cls, **overrides: Any) -> DemoConfig:
        """The ``--fast`` settings: the whole path in about two minutes on a 2-core CPU."""
        fast = dict(
            finetune_steps=4, finetune_batch=16, target_hold_steps=0, target_warmup_steps=2,
            num_samples=40, steps=5, sample_batch=40, ref_limit=100, fast=True,
        )  # fmt: skip
        return cls(**{**fast, **overrides})


@dataclass
class ModelResult:
    """What one model (dense DiT or sliced DyDiT) produced and cost."""

    name: str
    seconds: float
    macs_attn_mlp: int
    macs_total: int
    forwards: int
    images: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.images)


def load_dit(path: Path, device: str) -> torch.nn.Module:
    """A plain DiT export (a file that stores its config), in eval mode on ``device``."""
    ckpt = open_checkpoint(path)
    if ckpt.config is None:
        raise DyditError(f"{path} carries no model config; export it with `dydit export` or `dydit train`")
    if ckpt.config.dynamic or has_routers(ckpt.state_dict):
        raise DyditError(f"{path} is a DyDiT checkpoint; the demo starts from a plain DiT")
    return load_model(ckpt).to(device).eval()


def finetune(cfg: DemoConfig, base: Path, out: Path, dynamic: bool = True) -> Path:
    """Fine-tune the base DiT into a DyDiT at ``cfg.target``; returns the EMA export.

    ``dynamic=False`` fine-tunes the static DiT with the same data, steps, batch, learning rate and
    EMA instead: the control that separates DyDiT's effect from that of extra training.
    """
    return finetune_run(cfg, base, out, dynamic).export


def finetune_run(cfg: DemoConfig, base: Path, out: Path, dynamic: bool = True, **options: Any) -> Any:
    """:func:`finetune`'s run, returning its :class:`~dydit.train.loop.TrainResult`; ``options``
    are further TrainConfig fields (e.g. ``lora_rank``/``lora_groups`` for TD-LoRA, docs/METHOD.md
    §18, or ``lr``), given on top of the recipe's."""
    from dydit.train import train

    return train(finetune_config(cfg, base, out, dynamic, **options))


def finetune_config(
    cfg: DemoConfig, base: Path, out: Path, dynamic: bool = True, **options: Any
) -> TrainConfig:
    """The :class:`~dydit.train.config.TrainConfig` of :func:`finetune_run` (built apart so that a
    caller can run it under its own measurements, e.g. ``benchmarks/lora_compare.py``)."""
    from dydit.train import TrainConfig
    from dydit.train.config import model_spec

    _, stored = read_checkpoint(base)
    name, overrides = model_spec(stored, dynamic=dynamic)
    dyn = dict(
        router_lr=cfg.router_lr, target=cfg.target, target_hold_steps=cfg.target_hold_steps,
        target_warmup_steps=cfg.target_warmup_steps, complete_steps=cfg.complete_steps,
        distill_weight=cfg.distill_weight, reorder=cfg.reorder,
    ) if dynamic else {}  # fmt: skip
    fields = dict(
        out_dir=str(out), model=name, model_overrides=overrides, init_from=str(base),
        data="fashion-mnist", batch_size=cfg.finetune_batch, lr=cfg.lr, steps=cfg.finetune_steps,
        seed=cfg.seed, ema_decay=cfg.ema_decay, ema_warmup=True, device=cfg.device,
        progress=cfg.progress, **run_cadence(cfg.finetune_steps), **dyn,
    )  # fmt: skip
    return TrainConfig(**{**fields, **options})


def run_cadence(steps: int) -> dict[str, int]:
    """Checkpoint and log intervals of a short fine-tune of ``steps`` steps: a checkpoint halfway (an
    interruption loses at most half the run) and ten log records (the speed is read from them)."""
    return {"ckpt_every": max(1, steps // 2), "log_every": max(1, steps // 10)}


def sample_timed(
    name: str, model_fn: Callable, cfg: DemoConfig, shape: tuple[int, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray, ModelResult]:
    """Sample ``cfg.num_samples`` images (seeds 0.., balanced labels), timed and FLOPs-counted after
    an untimed warm-up pass over the first batch (same sampler, steps and batch size)."""
    from dydit.data.codec import PixelCodec

    config = getattr(model_fn, "config", None)
    process = create_process(config) if config is not None else create_diffusion()
    settings = sampling_settings(cfg, process)
    seeds = [cfg.seed * 1_000_003 + i for i in range(cfg.num_samples)]
    labels = [i % num_classes for i in range(cfg.num_samples)]
    calls = 0

    def counted(x, t, y):
        nonlocal calls
        calls += x.shape[0]
        return model_fn(x, t, y)

    def run(fn: Callable, count: int) -> tuple[np.ndarray, np.ndarray]:
        return sample_images(
            fn, process, settings, PixelCodec(), seeds=seeds[:count], shape=shape, num_classes=num_classes,
            labels=labels[:count], batch_size=cfg.sample_batch, device=cfg.device,
            progress=cfg.progress and count == cfg.num_samples,
        )  # fmt: skip

    # Warm-up, untimed and uncounted: the whole sampling path once on the first batch, at the batch
    # size and on every time step the timed run uses (first-call allocations, kernel selection, the
    # sampler's and decoder's first calls, the sliced engine's plans for each step). Without it the
    # first model timed paid these, and the per-step cost of one model depended on its place in line.
    run(model_fn, min(cfg.sample_batch, cfg.num_samples))
    with count_flops() as fc:
        start = time.perf_counter()
        images, labs = run(counted, cfg.num_samples)
        seconds = time.perf_counter() - start
    core = fc.by_component.get("attention", 0) + fc.by_component.get("mlp", 0)
    return images, labs, ModelResult(name, seconds, core, fc.total, calls, len(images))


def sampling_settings(cfg: DemoConfig, process: Any) -> SamplingSettings:
    """How the demo samples with ``process``: ``cfg``'s sampler, steps and guidance; a DDPM sampler
    clips the predicted x0 to the data range at every step (the models are pixel-space)."""
    flow = isinstance(process, Transport)
    return SamplingSettings(
        sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, clip_denoised=not flow
    )


def load_sliced_dydit(path: Path, device: str) -> DyDiT:
    """A fine-tuned DyDiT export, ready to sample through the sliced engine."""
    model = load_dydit_checkpoint(path).to(device).eval()
    model.execution = "sliced"
    return model


def measure(name: str, model: torch.nn.Module, cfg: DemoConfig, npz: Path) -> ModelResult:
    """Sample ``model`` (timed, FLOPs-counted) into ``npz`` and evaluate it; metrics on the result."""
    from dydit.evaluate.images import write_npz

    mc = model.config
    with torch.inference_mode():
        images, labels, result = sample_timed(
            name, model, cfg, (mc.in_channels, mc.input_size, mc.input_size), mc.num_classes
        )
    write_npz(npz, images, labels)
    result.metrics = evaluate_samples(npz, cfg)
    return result


def evaluate_samples(npz: Path, cfg: DemoConfig) -> dict[str, float]:
    from dydit.evaluate.run import evaluate

    report = evaluate(
        npz, REFERENCE, metrics=("fid",), use_inception=cfg.inception, classifier="fashion-mnist",
        ref_limit=cfg.ref_limit, device=cfg.device, progress=cfg.progress,
    )  # fmt: skip
    return dict(report.metrics)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo; returns the path of ``report.md``. Another process writing ``cfg.out_dir`` is a
    DyditError before anything is written (:func:`dydit.io.locked_dir`)."""
    base = Path(cfg.checkpoint) if cfg.checkpoint else BASE_CHECKPOINT
    if not base.is_file():
        raise DyditError(f"base checkpoint not found: {base}")
    shipped = shipped_dydit(cfg)
    with locked_dir(cfg.out_dir) as out:
        return _run_demo(cfg, base, shipped, out)


def _run_demo(cfg: DemoConfig, base: Path, shipped: Path | None, out: Path) -> Path:
    from dydit.apps.demo_report import report_markdown, results_dict
    from dydit.evaluate.images import write_npz
    from dydit.log import machine_description

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    _log.info("[1/5] live fine-tune: DyDiT at lambda=%s for %d steps", cfg.target, cfg.finetune_steps)
    t0 = time.perf_counter()
    live_ckpt = finetune(cfg, base, out / "finetune")
    timings["finetune"] = time.perf_counter() - t0

    dit = load_dit(base, cfg.device)
    live = load_sliced_dydit(live_ckpt, cfg.device)
    head = load_sliced_dydit(shipped, cfg.device) if shipped else live
    mc = dit.config
    shape = (mc.in_channels, mc.input_size, mc.input_size)
    n = cfg.steps
    name = f"DyDiT λ={cfg.target:g}, " + ("shipped" if shipped else f"{cfg.finetune_steps}-step fine-tune")

    _log.info("[2/5] sampling %d images per model: dense DiT, sliced DyDiT, and the dense DiT at equal "
              "compute", cfg.num_samples)  # fmt: skip
    samples: dict[str, tuple[np.ndarray, ModelResult]] = {}
    with torch.inference_mode():
        # The same seeds and labels for all; each model samples its first batch untimed before it is timed.
        img, labels, r = sample_timed(f"DiT (dense), {n} steps", dit, cfg, shape, mc.num_classes)
        samples["dit"] = (img, r)
        img, _, r = sample_timed(f"{name} (sliced), {n} steps", head, cfg, shape, mc.num_classes)
        samples["dydit"] = (img, r)
        # The free alternative: the dense DiT with fewer steps, at the DyDiT's measured compute.
        rho = samples["dydit"][1].macs_attn_mlp / max(1, samples["dit"][1].macs_attn_mlp)
        n_eq = max(1, round(rho * n))
        if n_eq == n:  # nothing switched off yet: the equal-compute dense run is the first one
            samples["dit_equal"] = samples["dit"]
        else:
            img, _, r = sample_timed(f"DiT (dense), {n_eq} steps: equal compute", dit,
                                     replace(cfg, steps=n_eq), shape, mc.num_classes)  # fmt: skip
            samples["dit_equal"] = (img, r)
        if shipped:
            img, _, r = sample_timed(f"DyDiT λ={cfg.target:g}, live {cfg.finetune_steps}-step fine-tune "
                                     f"(sliced), {n} steps", live, cfg, shape, mc.num_classes)  # fmt: skip
            samples["live"] = (img, r)
    # The equal-compute row may be the 20-step dense run itself (nothing switched off): one file each.
    distinct = []
    for tag, (images, r) in samples.items():
        if all(r is not seen for _, _, seen in distinct):
            distinct.append((tag, images, r))
    timings["sampling"] = sum(r.seconds for _, _, r in distinct)
    for tag, images, _ in distinct:
        write_npz(out / f"samples_{tag}.npz", images, labels)

    _log.info("[3/5] evaluating %d sample sets against %s", len(distinct), REFERENCE)
    t0 = time.perf_counter()
    for tag, _, r in distinct:
        # Reference statistics are cached. The live fine-tune only shows training at work: the
        # classifier distance judges it, and skipping its Inception pass keeps the demo under 15 minutes.
        eval_cfg = replace(cfg, inception=False) if tag == "live" else cfg
        r.metrics = evaluate_samples(out / f"samples_{tag}.npz", eval_cfg)
    timings["evaluation"] = time.perf_counter() - t0

    _log.info("[4/5] drawing grids, the FLOPs profile, the router map and token-keep maps")
    draw_pictures(head, cfg, samples["dit"][0], samples["dydit"][0], labels, out)

    _log.info("[5/5] writing the report")
    results = results_dict(cfg, base, shipped or live_ckpt, live_ckpt, samples, timings,
                           time.perf_counter() - t_start, machine_description(cfg.device))  # fmt: skip
    save_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    report = out / "report.md"
    save_text(report, report_markdown(results))
    return report


def shipped_dydit(cfg: DemoConfig) -> Path | None:
    """The shipped DyDiT for this run: only for the shipped base at the shipped target λ."""
    if cfg.dydit_checkpoint:
        path = Path(cfg.dydit_checkpoint)
        if not path.is_file():
            raise DyditError(f"DyDiT checkpoint not found: {path}")
        return path
    fits = cfg.checkpoint is None and cfg.target == SHIPPED_DYDIT_TARGET and SHIPPED_DYDIT.is_file()
    return SHIPPED_DYDIT if fits else None


def draw_pictures(
    model: DyDiT, cfg: DemoConfig, img_dit: np.ndarray, img_dyn: np.ndarray, labels: np.ndarray, out: Path
) -> None:
    """Sample grids of both models, the per-step FLOPs profile, the router map, token-keep overlays."""
    from dydit.evaluate.routing import routing_profile
    from dydit.viz import flops_profile, router_heatmap, sample_grid, token_keep_overlay

    mc = model.config
    ts = SamplingSettings(sampler=cfg.sampler, steps=cfg.steps).network_times(create_process(mc))
    with execution(model, "masked"):
        profile = routing_profile(model, img_dyn, labels, ts, seed=cfg.seed, device=cfg.device)
    per_class = min(8, max(1, cfg.num_samples // mc.num_classes))
    pick = np.concatenate([np.where(labels == c)[0][:per_class] for c in range(mc.num_classes)])
    names = list(CLASS_NAMES) if mc.num_classes == len(CLASS_NAMES) else None
    for tag, images in (("dit", img_dit), ("dydit", img_dyn)):
        sample_grid(images[pick], labels[pick], class_names=names, ncols=per_class * 2 if per_class < 5
                    else per_class, title=tag, path=out / f"grid_{tag}.png")  # fmt: skip
    costs = model.layer_costs()
    flops_profile(profile.plan, profile.tokens, costs=costs, title="DyDiT compute per sampling step",
                  path=out / "flops_profile.png")  # fmt: skip
    router_heatmap(profile.plan, title="active heads / MLP groups per layer", path=out / "router_map.png")
    mid = len(profile.timesteps) // 2
    token_keep_overlay(img_dyn[: profile.n], profile.tokens[mid], labels[: profile.n],
                       class_names=names, title=f"tokens kept by SDT at t={profile.timesteps[mid]}",
                       path=out / "token_keep.png")  # fmt: skip


def with_overrides(cfg: DemoConfig, **overrides: Any) -> DemoConfig:
    """``cfg`` with the non-None ``overrides`` applied."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
