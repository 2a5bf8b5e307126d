"""The training loop: DiT pre-training and DyDiT fine-tuning are one loop (docs/METHOD.md §6.3).

``train(cfg)`` sets the run up (:func:`dydit.train.run.set_up`: the data stream, the model from
scratch, from ``init_from`` or resumed, its EMA and AdamW), then repeats
:func:`~dydit.train.step.compute_loss` and one guarded optimizer step, logging the means of each
window of ``log_every`` steps and saving every ``ckpt_every`` steps (:func:`dydit.train.run.save`).
Rerunning the same command resumes from ``checkpoints/state.pt`` exactly: the data position, the
optimizer and EMA are restored, and every random draw of step k comes from generators seeded by
``(seed, rank, k)`` (docs/ARCHITECTURE.md §6.2), so k + k steps equal 2k steps.

Under ``torchrun`` the same call runs data-parallel (DDP; NCCL on GPU, gloo on CPU): the global
batch is split over the ranks, logged scalars are averaged across them, and rank 0 alone logs and
writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit import distributed
from dydit.data import derive_seed
from dydit.errors import DyditError
from dydit.flow import create_process
from dydit.io import locked_dir
from dydit.log import FILE_ONLY, RunLogger, report
from dydit.models.dydit import RoutingStats
from dydit.train.config import TrainConfig, run_model
from dydit.train.ema import ema_decay, update_ema
from dydit.train.run import Run, export_file, load_teacher, save, set_up
from dydit.train.step import (
    TrainForward,
    compute_loss,
    guarded_step,
    measured_flops_ratio,
    noise_level,
    route_buckets,
    router_report,
)
from dydit.train.targets import draw_timesteps, target_schedule

# Second component of the per-step seed that drives the model's own randomness (class dropout,
# Gumbel noise); the first (0) drives t, ε and nothing else.
_MODEL_RNG_STREAM = 1


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: its directory, step, files, last logged scalars, the trained networks and,
    for a DyDiT, the FLOPs ratio ρ its EMA weights spend (:func:`~dydit.train.step.measured_flops_ratio`)."""

    run_dir: Path
    step: int
    state: Path
    export: Path
    last: dict[str, float]
    model: nn.Module = field(repr=False)
    ema: nn.Module = field(repr=False)
    flops_ratio: float | None = None  # a DyDiT's EMA weights, measured at the end (None: not measured)


def configure_torch(tf32: bool = True) -> None:
    """Process-wide torch flags, set once by an entry point (never at import): TF32 matmuls on GPU."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def train(cfg: TrainConfig, *, stop_at: int | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes, until ``cfg.steps`` or ``stop_at`` steps.

    Args:
        cfg: the run.
        stop_at: end this invocation once this many steps are done (a checkpoint is written), as
            if interrupted; rerunning resumes. Does not change the run's configuration.
    Returns:
        A :class:`TrainResult`. Raises DyditError on bad input, unwritable output and non-finite losses,
        and when another process is writing ``cfg.out_dir`` (:func:`dydit.io.locked_dir`).
    """
    device = distributed.init(cfg.device)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise DyditError(f"batch size {cfg.batch_size} is not divisible by the number of processes ({world})")
    with locked_dir(cfg.out_dir):  # one writer per run directory; rank 0 holds it for the job
        return _train(cfg, device, stop_at)


def finetune(init_from: str | Path, target: float, **options: Any) -> TrainResult:
    """Fine-tune the DiT (or SiT) at ``init_from`` into a DyDiT at FLOPs target λ = ``target``.

    The model is the DyDiT version of the checkpoint's own model (its stored config, else the
    preset its shapes match), with fresh routers; ``options`` are further :class:`TrainConfig`
    fields (``steps``, ``out_dir``, ``complete_steps``, ``distill_weight``, ...); ``model`` names a
    preset instead, as ``--model`` does. Equivalent to ``dydit finetune --init-from PATH --target λ``
    (both ask :func:`~dydit.train.config.run_model`); rerunning resumes.
    """
    path = str(init_from)
    user = options.pop("model", None), options.pop("model_overrides", {})
    model, overrides = run_model(path, *user, finetune=True)
    return train(
        TrainConfig(model=model, model_overrides=overrides, init_from=path, target=target, **options)
    )


def _train(cfg: TrainConfig, device: str, stop_at: int | None) -> TrainResult:
    """The loop of :func:`train`, run while the run directory is locked."""
    run = set_up(cfg, device)
    cfg = run.cfg  # resolved: automatic fields from the resumed run or scaled to its length
    model, ema, optimizer, stream, mc = run.model, run.ema, run.optimizer, run.stream, run.model_config
    rank, local_batch, dynamic = distributed.rank(), stream.batch_size, mc.dynamic
    # FSDP shards the model itself (set_up); otherwise DDP wraps the forward under torchrun.
    net = TrainForward(model) if cfg.fsdp else _distribute(TrainForward(model), device)
    teacher = load_teacher(cfg.teacher_path, mc, device) if cfg.distill_weight > 0 else None
    diffusion = create_process(mc)  # DDPM (T = 1000) or the flow-matching transport
    costs = model.layer_costs()  # the backbone's per-layer (A, M), whatever its family
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = run.start
    end = max(step, cfg.steps if stop_at is None else min(cfg.steps, stop_at))
    _log_start(run, end)
    saved = step if run.state_file.exists() else None  # step of the last good checkpoint on disk
    window = _LogWindow(device)
    last: dict[str, float] = {}
    bar = _progress_bar(cfg, step)
    batches = iter(stream)
    with RunLogger(run.run_dir) as log, _interruption(run, lambda: (step, saved)):
        while step < end:
            x0, cond = next(batches)  # images (B, C, H, W) and their Condition (class labels)
            x0, cond = x0.to(device, non_blocking=True), cond.to(device, non_blocking=True)
            # All randomness of this step derives from (seed, rank, step): resume is exact.
            g = torch.Generator(device).manual_seed(derive_seed(cfg.seed, rank, step))
            torch.manual_seed(derive_seed(cfg.seed, rank, step, _MODEL_RNG_STREAM))
            t = draw_timesteps(
                diffusion, local_batch, stratified=cfg.use_stratified_t, generator=g, device=device
            )
            noise = torch.randn(x0.shape, generator=g, device=device)
            lambda_t = (
                target_schedule(step, cfg.target, cfg.target_warmup_steps, cfg.target_hold_steps)
                if dynamic
                else None
            )
            complete = dynamic and step < cfg.complete_steps
            loss, parts, routing = compute_loss(
                net, diffusion, x0, cond, t, noise, lambda_t=lambda_t, complete=complete,
                flops_weight=cfg.flops_weight, layer_costs=costs, bf16=cfg.bf16,
                teacher=teacher, distill_weight=cfg.distill_weight,
            )  # fmt: skip
            means = _mean_over_ranks(parts)
            _stop_unless_finite(means["loss"], step, run.state_file, saved)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm, stepped = guarded_step(optimizer, params, cfg.grad_guard, cfg.grad_threshold)
            update_ema(ema, model, ema_decay(step, cfg.ema_decay, cfg.ema_warmup))
            step += 1

            window.add(means, norm, stepped, lambda_t, routing, noise_level(diffusion, t))
            bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                last = window.flush(log, step, cfg.batch_size, optimizer, dynamic)
                bar.set_postfix(_postfix(last, dynamic), refresh=False)
                _log_line(run, step, last, dynamic, console=bar.disable)
            if step % cfg.ckpt_every == 0 or step == end:
                with window.paused():  # checkpoint time is not training throughput
                    save(run, step)
                saved = step
    bar.close()
    if saved != step:
        save(run, step)  # nothing was left to do, but the export must exist
    export = export_file(run.run_dir, cfg)
    rho = None
    if dynamic and run.start < step:  # the batch of the last step is at hand
        rho = measured_flops_ratio(ema, diffusion, x0, cond, t, noise, costs)
        rho = distributed.all_reduce_mean(torch.tensor([rho], device=device)).item()  # the global batch
        _check_reached(run, step, rho)
    if run.start >= cfg.steps:
        run.logger.info(f"{run.run_dir} is already at step {run.start} (--steps {cfg.steps}): nothing to do")
    else:
        run.logger.info(f"stopped at step {step} of {cfg.steps}; EMA weights: {export}")
    return TrainResult(run.run_dir, step, run.state_file, export, last, model, ema, rho)


def _distribute(net: nn.Module, device: str) -> nn.Module:
    """``net`` wrapped in DistributedDataParallel under torchrun; ``net`` itself in one process."""
    if distributed.world_size() == 1:
        return net
    return nn.parallel.DistributedDataParallel(
        net, device_ids=[distributed.local_rank()] if device != "cpu" else None
    )


def _log_start(run: Run, end: int) -> None:
    cfg, info = run.cfg, run.info
    n_params = sum(p.numel() for p in run.model.parameters())
    run.logger.info(
        f"{cfg.model} ({n_params / 1e6:.2f} M parameters) on {cfg.data} ({len(run.stream.dataset)} items, "
        f"{info.channels}x{info.image_size}x{info.image_size}); {distributed.world_size()} process(es) x "
        f"batch {run.stream.batch_size} on {run.device}; "
        + (f"steps {run.start} -> {end} of {cfg.steps}" if end > run.start else f"at step {run.start}")
    )


# How a run ends ----------------------------------------------------------------------------------
# A fine-tune whose EMA weights end further than this from λ gets a warning (the README's promise).
RHO_TOLERANCE = 0.05


@contextlib.contextmanager
def _interruption(run: Run, where: Any) -> Iterator[None]:
    """On Ctrl-C, log where the run stopped, what is on disk and how to continue, then re-raise."""
    try:
        yield
    except KeyboardInterrupt:
        step, saved = where()
        kept = f"the checkpoint of step {saved} is kept" if saved is not None else "no checkpoint was written"
        run.logger.info(f"interrupted at step {step}; {kept}; rerun the same command to resume")
        raise


def _check_reached(run: Run, step: int, rho: float) -> None:
    """Log the EMA weights' ρ; warn when a run that reached its end misses the target λ."""
    cfg = run.cfg
    assert cfg.target is not None
    run.logger.info(f"FLOPs ratio of the EMA weights on the last batch: {rho:.3f} (target {cfg.target:g})")
    if step < cfg.steps or abs(rho - cfg.target) <= RHO_TOLERANCE:
        return
    lam = target_schedule(step - 1, cfg.target, cfg.target_warmup_steps, cfg.target_hold_steps)
    hint = (
        f"lambda_t was still {lam:.3f} at the last step: shorten --target-warmup-steps "
        f"({cfg.target_warmup_steps}) or raise --steps"
        if lam > cfg.target + 1e-9
        else "train longer (--steps), raise --router-lr or --flops-weight"
    )
    run.logger.warning(
        f"warning: the fine-tuned model's FLOPs ratio {rho:.3f} is more than {RHO_TOLERANCE} from the "
        f"target {cfg.target:g}; {hint}"
    )


def _log_line(run: Run, step: int, last: dict[str, float], dynamic: bool, *, console: bool) -> None:
    """The window's numbers as one line of ``log.txt``, and of stderr when no progress bar shows them."""
    parts = [f"step {step}/{run.cfg.steps}", f"loss {last['loss']:.4f}"]
    if dynamic:
        parts.append(f"flops ratio {last['flops_ratio']:.3f} (target now {last['flops_target']:.3f})")
    parts.append(f"{last['steps_per_s']:.2f} steps/s")
    run.logger.info(", ".join(parts), extra={} if console else {FILE_ONLY: True})


# One step's numbers ------------------------------------------------------------------------------
def _mean_over_ranks(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged loss terms, averaged across ranks (one collective)."""
    names = sorted(parts)
    return dict(zip(names, distributed.all_reduce_mean(torch.stack([parts[k] for k in names])).tolist()))


def _stop_unless_finite(loss: float, step: int, state_file: Path, saved: int | None) -> None:
    """A non-finite loss stops the run before the optimizer step, keeping the last good checkpoint."""
    if math.isfinite(loss):
        return
    kept = (
        f"the last good checkpoint ({state_file}, step {saved}) is kept"
        if saved is not None
        else "no checkpoint had been written yet"
    )
    raise DyditError(f"non-finite loss ({loss}) at step {step + 1}; training stopped; {kept}")


# The logging window: sums between two log lines ------------------------------------------------------
class _LogWindow:
    """Scalars summed over the steps since the last log line, and the wall time they took."""

    def __init__(self, device: str):
        self.sums: dict[str, float] = defaultdict(float)
        self.buckets = torch.zeros(4, 4, device=device)  # router usage per (timestep bucket, kind)
        self.steps, self.skipped = 0, 0
        self.tic = time.perf_counter()

    def add(
        self,
        means: dict[str, float],
        grad_norm: float,
        stepped: bool,
        lambda_t: float | None,
        routing: RoutingStats | None,
        level: torch.Tensor,
    ) -> None:
        """``level`` (B,): each sample's noise level in [0, 1] (:func:`~dydit.train.step.noise_level`)."""
        for k, v in means.items():
            self.sums[k] += v
        self.sums["grad_norm"] += grad_norm
        if lambda_t is not None:
            self.sums["flops_target"] += lambda_t
        if routing is not None:
            self.buckets += route_buckets(routing, level, 1)
        self.steps += 1
        self.skipped += not stepped

    def flush(
        self, log: RunLogger, step: int, batch_size: int, optimizer: torch.optim.Optimizer, dynamic: bool
    ) -> dict[str, float]:
        """Report the window's means and rates as the record of ``step``; start a new window."""
        elapsed = time.perf_counter() - self.tic
        for k, v in self.sums.items():
            report(k, v / self.steps)
        report("steps_per_s", self.steps / elapsed)
        report("images_per_s", self.steps * batch_size / elapsed)
        report("skipped_steps", self.skipped)
        report("lr", optimizer.param_groups[0]["lr"])
        if dynamic:
            for k, v in router_report(_sum_ranks(self.buckets)).items():
                report(k, v)
        last = log.flush(step)
        self.sums.clear()
        self.buckets.zero_()
        self.steps, self.skipped = 0, 0
        self.tic = time.perf_counter()
        return last

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's wall time out of the window's rates."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.tic += time.perf_counter() - start


def _sum_ranks(x: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce_mean(x) * distributed.world_size()


# Progress -------------------------------------------------------------------------------
def _progress_bar(cfg: TrainConfig, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps, initial=start, unit="step", disable=not (cfg.progress and distributed.is_main())
    )


def _postfix(last: dict[str, float], dynamic: bool) -> dict[str, str]:
    postfix = {"loss": f"{last['loss']:.4f}", "it/s": f"{last['steps_per_s']:.2f}"}
    if dynamic:
        postfix["flops"] = f"{last['flops_ratio']:.3f}"
    return postfix
