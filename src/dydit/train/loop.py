"""The training loop: DiT pre-training and DyDiT fine-tuning are one loop (METHOD.md §6.3).

``train(cfg)`` builds the data stream, the model (from scratch, from ``init_from``, or resumed),
its EMA and AdamW, then repeats :func:`~dydit.train.step.compute_loss` and one guarded optimizer
step. Rerunning the same command resumes from ``checkpoints/state.pt`` exactly: the data position,
the optimizer and EMA are restored, and every random draw of step k comes from generators seeded
by ``(seed, rank, k)`` (DESIGN.md §3 rule 9), so k + k steps equal 2k steps.

Under ``torchrun`` the same call runs data-parallel (DDP; NCCL on GPU, gloo on CPU): the global
batch is split over the ranks, logged scalars are averaged across them, and rank 0 alone logs and
writes checkpoints.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit import distributed
from dydit.checkpoint import file_sha256, fit_state_dict, load_checkpoint
from dydit.data import DataStream, derive_seed, make_dataset
from dydit.errors import DyditError
from dydit.factory import build_model
from dydit.flops.formulas import layer_costs
from dydit.flow import create_process
from dydit.io import locked_dir
from dydit.log import RunLogger, get_logger, report, truncate_stats
from dydit.models.dydit import ROUTER_KEY_MARKERS
from dydit.presets import ModelConfig
from dydit.train import checkpoint as ckpt
from dydit.train.config import TrainConfig
from dydit.train.ema import create_ema, ema_decay, update_ema
from dydit.train.step import (
    TrainForward,
    compute_loss,
    enable_grad_checkpointing,
    guarded_step,
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
    """Where a run ended: its directory, step, files, last logged scalars, and the trained networks."""

    run_dir: Path
    step: int
    state: Path
    export: Path
    last: dict[str, float]
    model: nn.Module = field(repr=False)
    ema: nn.Module = field(repr=False)


def configure_torch(tf32: bool = True) -> None:
    """Process-wide torch flags, set once by an entry point (never at import): TF32 matmuls on GPU."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def resolve_model_config(cfg: TrainConfig, channels: int, image_size: int, num_classes: int) -> ModelConfig:
    """The model config for data of this shape: preset <- data shape <- the run's overrides."""
    mc = cfg.model_config(in_channels=channels, input_size=image_size, num_classes=num_classes)
    if (mc.in_channels, mc.input_size) != (channels, image_size):
        raise DyditError(
            f"model expects {mc.in_channels}x{mc.input_size}x{mc.input_size} inputs but the data "
            f"{cfg.data!r} gives {channels}x{image_size}x{image_size}"
        )
    if mc.num_classes < num_classes:
        raise DyditError(f"model has {mc.num_classes} classes but the data {cfg.data!r} has {num_classes}")
    return mc


def _agree(ok: bool, device: str) -> bool:
    """True on every rank iff ``ok`` holds on every rank (one collective)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return bool(distributed.all_reduce_mean(flag).item() == 0.0)


def _prepare_run_dir(run_dir: Path, config: dict, device: str) -> None:
    """Create the run directory and write ``config.json`` on rank 0; fail clearly on every rank."""
    error: DyditError | None = None
    if distributed.is_main():
        try:
            try:
                (run_dir / ckpt.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DyditError(f"cannot create output directory {run_dir}: {e.strerror or e}") from None
            ckpt.write_config(run_dir, config)
        except DyditError as e:
            error = e
    if not _agree(error is None, device):
        raise error or DyditError(f"rank 0 could not prepare the output directory {run_dir}")


def _load_init(model: nn.Module, path: str, dynamic: bool) -> list[str]:
    """Load ``init_from`` weights; a DyDiT may start from a DiT (router keys keep their init, §12)."""
    sd = load_checkpoint(path)
    return fit_state_dict(model, sd, allow_missing=ROUTER_KEY_MARKERS if dynamic else ())


def _load_teacher(path: str, mc: ModelConfig, device: str) -> nn.Module:
    """The frozen distillation teacher: any accepted checkpoint, run complete (a DyDiT runs dense).

    It may be another architecture (a larger DiT, say) as long as it maps the same inputs to the
    same outputs as the student.
    """
    from dydit.checkpoint import load_model

    teacher = load_model(path)
    tc = teacher.config
    fields = ("in_channels", "input_size", "out_channels", "num_classes", "objective")
    if any(getattr(tc, f) != getattr(mc, f) for f in fields):
        mine, theirs = ([f"{f}={getattr(c, f)}" for f in fields] for c in (mc, tc))
        raise DyditError(
            f"the teacher {path} ({', '.join(theirs)}) does not fit the model ({', '.join(mine)})"
        )
    if tc.dynamic:
        teacher.execution = "dense"
    return teacher.requires_grad_(False).to(device).eval()


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group, or two when ``cfg.router_lr`` gives the DyDiT routers their own rate."""
    from dydit.models.dydit import ROUTER_KEY_MARKERS

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.router_lr is None:
        return [{"params": [p for _, p in named]}]
    is_router = [any(m in f".{n}" for m in ROUTER_KEY_MARKERS) for n, _ in named]
    return [
        {"params": [p for (_, p), r in zip(named, is_router) if not r]},
        {"params": [p for (_, p), r in zip(named, is_router) if r], "lr": cfg.router_lr},
    ]


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


def _train(cfg: TrainConfig, device: str, stop_at: int | None) -> TrainResult:
    """The body of :func:`train`, run while the run directory is locked."""
    rank, world = distributed.rank(), distributed.world_size()
    local_batch = cfg.batch_size // world
    run_dir = Path(cfg.out_dir)

    dataset = make_dataset(cfg.data, cfg.image_size, cfg.fit)
    info = dataset.info
    flip = info.flip if cfg.flip is None else cfg.flip
    mc = resolve_model_config(cfg, info.channels, info.image_size, info.num_classes)
    dynamic = mc.dynamic

    state_file = ckpt.state_path(run_dir)
    state = ckpt.load_state(state_file) if state_file.exists() else None
    if state is not None:
        conflicts = cfg.resume_conflicts(state["config"]["train"])
        if conflicts:
            raise DyditError(
                f"{run_dir} holds a run with a different configuration ({'; '.join(conflicts)}); "
                "use another --out-dir or the original options"
            )
    # The base weights a fine-tune started from are pinned by content: a resumed run must not
    # silently continue from a different file at the same path. (A file that is gone, or a run
    # recorded before the pin existed, leaves nothing to compare: the resumed state is all we need.)
    current = file_sha256(cfg.init_from) if cfg.init_from and Path(cfg.init_from).is_file() else None
    init_digest = state["config"].get("init_sha256") if state is not None else current
    if state is not None and init_digest and current and current != init_digest:
        raise DyditError(
            f"{cfg.init_from} is not the file {run_dir} started from (its contents changed since); "
            "use another --out-dir to start afresh from the new weights"
        )
    start = int(state["step"]) if state is not None else 0
    position = dict(state["data"]) if state is not None else {"epoch": 0, "batch": 0}
    stream = DataStream(
        dataset, local_batch, seed=cfg.seed, rank=rank, world_size=world, flip=flip,
        num_workers=cfg.num_workers, **position,
    )  # fmt: skip
    # Model, EMA, optimizer: built identically on every rank; DDP also broadcasts rank 0's weights.
    torch.manual_seed(cfg.seed)
    model = build_model(mc)
    tolerated = _load_init(model, cfg.init_from, dynamic) if state is None and cfg.init_from else None
    if state is None and cfg.reorder:
        from dydit.models.reorder import reorder_by_importance

        reorder_by_importance(model)  # before the EMA copy; a resumed state is already reordered

    run_config = {"train": cfg.to_dict(), "model": mc.to_dict(), "data": info.to_dict(), "world_size": world}
    run_config["init_sha256"] = init_digest
    _prepare_run_dir(run_dir, run_config, device)
    logger = get_logger(run_dir)
    if tolerated is not None:
        new = f" ({len(tolerated)} router tensors newly initialised)" if tolerated else ""
        logger.info(f"initialised from {cfg.init_from}{new}")
    model.to(device).train()
    ema = create_ema(model)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"])
        logger.info(f"resuming {run_dir} from step {start}")
        del state
    if distributed.is_main():
        # Steps after ``start`` were logged by a run that died before checkpointing them (or, when
        # no checkpoint exists, by a run killed before its first one): they are logged again.
        truncate_stats(run_dir, start)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)  # after the EMA copy, which must stay a plain model

    net: nn.Module = TrainForward(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[distributed.local_rank()] if device != "cpu" else None
        )
    teacher = _load_teacher(cfg.teacher_path, mc, device) if cfg.distill_weight > 0 else None
    diffusion = create_process(mc)  # DDPM (T = 1000) or the flow-matching transport
    costs = layer_costs(mc.num_tokens, mc.hidden_size, mc.mlp_ratio)
    stratified = cfg.use_stratified_t
    end = cfg.steps if stop_at is None else max(start, min(cfg.steps, stop_at))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        f"{cfg.model} ({n_params / 1e6:.2f} M parameters) on {cfg.data} ({len(dataset)} items, "
        f"{info.channels}x{info.image_size}x{info.image_size}); {world} process(es) x batch {local_batch} "
        f"on {device}; steps {start} -> {end} of {cfg.steps}"
    )

    def save(step: int) -> None:
        error: DyditError | None = None
        if distributed.is_main():
            try:
                ckpt.save_state(
                    state_file,
                    ckpt.make_state(
                        model=model,
                        ema=ema,
                        optimizer=optimizer,
                        step=step,
                        data=stream.state(),
                        config=cfg.to_dict(),
                        model_config=mc.to_dict(),
                        data_info=info.to_dict(),
                        init_sha256=init_digest,
                    ),
                )
                export_cfg = {
                    "model": mc.to_dict(),
                    "data": info.to_dict(),
                    "train": cfg.to_dict(),
                    "step": step,
                }
                ckpt.export_weights(ckpt.export_path(run_dir), ema, export_cfg)
            except DyditError as e:
                error = e
        if not _agree(error is None, device):
            raise error or DyditError("rank 0 could not write the checkpoint")

    step = start
    saved = start if state_file.exists() else None  # step of the last good checkpoint on disk
    last: dict[str, float] = {}
    sums: dict[str, float] = defaultdict(float)
    buckets = torch.zeros(4, 4, device=device)
    counted, skipped = 0, 0
    tic = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps, initial=start, unit="step", disable=not (cfg.progress and distributed.is_main())
    )
    batches = iter(stream)
    with RunLogger(run_dir) as log:
        while step < end:
            x0, y = next(batches)
            x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # All randomness of this step derives from (seed, rank, step): resume is exact.
            g = torch.Generator(device).manual_seed(derive_seed(cfg.seed, rank, step))
            torch.manual_seed(derive_seed(cfg.seed, rank, step, _MODEL_RNG_STREAM))
            t = draw_timesteps(diffusion, local_batch, stratified=stratified, generator=g, device=device)
            noise = torch.randn(x0.shape, generator=g, device=device)
            lambda_t = (
                target_schedule(step, cfg.target, cfg.target_warmup_steps, cfg.target_hold_steps)
                if dynamic
                else None
            )
            complete = dynamic and step < cfg.complete_steps
            loss, parts, routing = compute_loss(
                net, diffusion, x0, y, t, noise, lambda_t=lambda_t, complete=complete,
                flops_weight=cfg.flops_weight, layer_costs=costs, bf16=cfg.bf16,
                teacher=teacher, distill_weight=cfg.distill_weight,
            )  # fmt: skip
            names = sorted(parts)
            means = dict(
                zip(names, distributed.all_reduce_mean(torch.stack([parts[k] for k in names])).tolist())
            )
            if not math.isfinite(means["loss"]):
                kept = (
                    f"the last good checkpoint ({state_file}, step {saved}) is kept"
                    if saved is not None
                    else ("no checkpoint had been written yet")
                )
                raise DyditError(
                    f"non-finite loss ({means['loss']}) at step {step + 1}; training stopped; {kept}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm, stepped = guarded_step(optimizer, params, cfg.grad_guard, cfg.grad_threshold)
            update_ema(ema, model, ema_decay(step, cfg.ema_decay, cfg.ema_warmup))
            step += 1

            for k, v in means.items():
                sums[k] += v
            sums["grad_norm"] += norm
            if lambda_t is not None:
                sums["flops_target"] += lambda_t
            if routing is not None:
                buckets += route_buckets(routing, noise_level(diffusion, t), 1)
            counted += 1
            skipped += not stepped
            bar.update(1)

            if step % cfg.log_every == 0 or step == end:
                elapsed = time.perf_counter() - tic
                for k, v in sums.items():
                    report(k, v / counted)
                report("steps_per_s", counted / elapsed)
                report("images_per_s", counted * cfg.batch_size / elapsed)
                report("skipped_steps", skipped)
                report("lr", optimizer.param_groups[0]["lr"])
                if dynamic:
                    for k, v in router_report(_sum_ranks(buckets)).items():
                        report(k, v)
                last = log.flush(step)
                postfix = {"loss": f"{last['loss']:.4f}", "it/s": f"{last['steps_per_s']:.2f}"}
                if dynamic:
                    postfix["flops"] = f"{last['flops_ratio']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                sums.clear()
                buckets.zero_()
                counted, skipped = 0, 0
                tic = time.perf_counter()
            if step % cfg.ckpt_every == 0 or step == end:
                saving = time.perf_counter()
                save(step)
                saved = step
                tic += time.perf_counter() - saving  # checkpoint time is not training throughput
    bar.close()
    if saved != step:
        save(step)  # nothing was left to do, but the export must exist
    logger.info(f"stopped at step {step} of {cfg.steps}; EMA weights: {ckpt.export_path(run_dir)}")
    return TrainResult(run_dir, step, state_file, ckpt.export_path(run_dir), last, model, ema)


def _sum_ranks(x: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce_mean(x) * distributed.world_size()
