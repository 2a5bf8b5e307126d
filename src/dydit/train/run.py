"""A training run's set-up and its checkpoints: what :func:`dydit.train.loop.train` does around the loop.

- :func:`set_up` reads the resume state (checked against the config, the ``init_from`` file pinned
  by its sha256), builds the model (from scratch, from ``init_from``, or resumed), prepares the run
  directory and restores EMA, optimizer and RNG; nothing is written before all inputs have loaded.
- :func:`save` writes the training state and the EMA export on rank 0 (docs/METHOD.md §6.2), and every
  rank learns whether that worked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit import distributed
from dydit.checkpoint import file_sha256, fit_state_dict, load_checkpoint
from dydit.checkpoint.lora import LORA_FILE, is_trained_key, save_lora
from dydit.data import DataInfo, DataStream, make_dataset
from dydit.errors import CheckpointError, DyditError
from dydit.factory import build_model
from dydit.log import get_logger, truncate_stats
from dydit.models.dydit import ROUTER_KEY_MARKERS
from dydit.models.fitting import size_mismatches
from dydit.models.lora import LoraConfig, add_lora, freeze_base
from dydit.presets import FluxConfig, ModelConfig, UViTConfig, is_flux_name
from dydit.train import fsdp
from dydit.train import state as ckpt
from dydit.train.config import TrainConfig
from dydit.train.ema import create_ema
from dydit.train.step import enable_grad_checkpointing


@dataclass
class Run:
    """What :func:`set_up` built: everything the loop and :func:`save` read, made once."""

    cfg: TrainConfig
    device: str
    run_dir: Path
    state_file: Path
    start: int  # steps already done (0, or the resumed state's step)
    info: DataInfo
    model_config: ModelConfig
    stream: DataStream
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    init_digest: str | None  # sha256 of the init_from file the run started from
    logger: logging.Logger


def set_up(cfg: TrainConfig, device: str) -> Run:
    """Resume state, data, model, run directory, EMA and optimizer, in the order failures must stop
    them: nothing is written before the state, the data and the init weights all load. The data's
    image size defaults to the one the model fixes (:func:`requested_image_size`)."""
    rank, world = distributed.rank(), distributed.world_size()
    run_dir = Path(cfg.out_dir)
    state_file = ckpt.state_path(run_dir)
    cfg, state, init_digest = _read_resume_state(cfg, state_file)
    size = requested_image_size(cfg, state["config"]["model"] if state is not None else None)
    dataset = make_dataset(cfg.data, size, cfg.fit, progress=cfg.progress and distributed.is_main())
    info = dataset.info
    mc = resolve_model_config(
        cfg, info.channels, info.image_size, info.num_classes, getattr(dataset, "tokenizer", None)
    )
    start = int(state["step"]) if state is not None else 0
    position = dict(state["data"]) if state is not None else {"epoch": 0, "batch": 0}
    stream = DataStream(
        dataset, cfg.batch_size // world, seed=cfg.seed, rank=rank, world_size=world,
        flip=info.flip if cfg.flip is None else cfg.flip, num_workers=cfg.num_workers,
        null_class=mc.num_classes, **position,
    )  # fmt: skip
    init = _init_weights(cfg.init_from, mc) if state is None and cfg.init_from else None
    # Model, EMA, optimizer: built identically on every rank; DDP also broadcasts rank 0's weights.
    torch.manual_seed(cfg.seed)
    model = build_model(mc)
    tolerated = None
    if init is not None:
        tolerated = fit_state_dict(model, init, allow_missing=ROUTER_KEY_MARKERS if mc.dynamic else ())
    if state is None and cfg.reorder:
        from dydit.models.reorder import reorder_by_importance

        reorder_by_importance(model)  # before the EMA copy; a resumed state is already reordered
    if cfg.lora_rank:  # TD-LoRA (docs/METHOD.md §18): adapters added, the base frozen
        add_lora(model, LoraConfig(cfg.lora_rank, cfg.lora_groups))
        freeze_base(model, ROUTER_KEY_MARKERS)

    run_config = {"train": cfg.to_dict(), "model": mc.to_dict(), "data": info.to_dict(), "world_size": world}
    run_config["init_sha256"] = init_digest
    _prepare_run_dir(run_dir, run_config, device)
    logger = get_logger(run_dir)
    if tolerated is not None:
        new = f" ({len(tolerated)} router tensors newly initialised)" if tolerated else ""
        logger.info(f"initialised from {cfg.init_from}{new}")
    model.to(device).train()
    # A frozen TD-LoRA base is shared with the EMA, not copied (sharded runs shard both instead).
    ema = create_ema(model, share_frozen=bool(cfg.lora_rank) and not cfg.fsdp)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)  # after the EMA copy, which must stay a plain model
    if cfg.fsdp:  # FSDP2: blocks and root sharded, model and EMA alike (train/fsdp.py)
        fsdp.shard(model, cfg.fsdp_mixed_precision)
        fsdp.shard(ema, cfg.fsdp_mixed_precision)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        if "sharded" in state:
            fsdp.load_sharded(run_dir, state["sharded"], model, ema, optimizer)
        else:
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
    return Run(
        cfg, device, run_dir, state_file, start, info, mc, stream, model, ema, optimizer, init_digest, logger
    )


def _read_resume_state(
    cfg: TrainConfig, state_file: Path
) -> tuple[TrainConfig, dict[str, Any] | None, str | None]:
    """``cfg`` resolved (its automatic fields from the resumed run, else scaled to its steps), the
    run's saved training state (None for a fresh run), checked against it, and the sha256 of the
    ``init_from`` file the run started from (None where there is none to pin)."""
    run_dir = Path(cfg.out_dir)
    state = ckpt.load_state(state_file) if state_file.exists() else None
    cfg = cfg.resolved(state["config"]["train"] if state is not None else None)
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
    return cfg, state, init_digest


def model_input_size(cfg: TrainConfig, resumed_model: dict[str, Any] | None = None) -> int | None:
    """The input size the model fixes before any data is read, or None: the resumed run's model
    (``resumed_model``, its stored config), an ``input_size`` model option, else the ``init_from``
    weights' (their stored config, or their shapes)."""
    if resumed_model is not None:  # a FLUX config stores its pixel side as sample_size
        return int(resumed_model.get("input_size", resumed_model.get("sample_size")))
    if "input_size" in cfg.model_overrides:
        return cfg.model_config().input_size
    if cfg.init_from:
        from dydit.checkpoint import model_config

        try:
            return model_config(cfg.init_from).input_size
        except DyditError:
            return None  # loading the weights names the problem
    return None


def requested_image_size(cfg: TrainConfig, resumed_model: dict[str, Any] | None = None) -> int | None:
    """The pixel size to ask the data for: ``--image-size``, else the size the model fixes (pixel
    data only: a latent cache has its own), else None (the dataset's default)."""
    if cfg.image_size is not None or cfg.data.startswith("latents:"):
        return cfg.image_size
    return model_input_size(cfg, resumed_model)


def data_image_size(cfg: TrainConfig) -> int | None:
    """The image size a run of ``cfg`` trains at, told without loading the data or the training state
    (``--dry-run``): a resumed run's model config is read from the run directory's config.json, a
    folder's image sizes from their headers. None for a latent cache not built yet."""
    from dydit.data import dataset_image_size

    resumed = None
    run_dir = Path(cfg.out_dir)
    if ckpt.state_path(run_dir).exists():
        try:
            stored = json.loads((run_dir / ckpt.CONFIG_FILE).read_text())
            resumed = {"input_size": int(stored["model"]["input_size"])}
        except (OSError, ValueError, KeyError, TypeError):
            resumed = None  # the run itself reads the training state
    return dataset_image_size(cfg.data, requested_image_size(cfg, resumed), progress=cfg.progress)


def resolve_model_config(
    cfg: TrainConfig, channels: int, image_size: int, num_classes: int, tokenizer: Any = None
) -> ModelConfig:
    """The model config for data of this shape: preset <- data shape <- the run's overrides. A FLUX
    trained here (docs/METHOD.md §17.6) fixes its own shape and takes its text encoder's vocabulary
    from the data's ``tokenizer``."""
    if is_flux_name(cfg.model):
        return _flux_for_data(cfg, channels, image_size, tokenizer)
    mc = cfg.model_config(in_channels=channels, input_size=image_size, num_classes=num_classes)
    if (mc.in_channels, mc.input_size) != (channels, image_size):
        raise DyditError(
            f"model expects {mc.in_channels}x{mc.input_size}x{mc.input_size} inputs but the data "
            f"{cfg.data!r} gives {channels}x{image_size}x{image_size}"
        )
    if mc.num_classes < num_classes:
        raise DyditError(f"model has {mc.num_classes} classes but the data {cfg.data!r} has {num_classes}")
    return mc


def _flux_for_data(cfg: TrainConfig, channels: int, image_size: int, tokenizer: Any) -> FluxConfig:
    fc = cfg.model_config()
    if (fc.latent_channels, fc.sample_size) != (channels, image_size):
        raise DyditError(
            f"{cfg.model} expects {fc.latent_channels}x{fc.sample_size}x{fc.sample_size} inputs but the "
            f"data {cfg.data!r} gives {channels}x{image_size}x{image_size}"
        )
    if fc.text_encoder is None:
        raise DyditError(f"{cfg.model} has no text encoder: it cannot train on captions here")
    if "vocab" not in fc.text_encoder:
        if tokenizer is None:
            raise DyditError(f"the data {cfg.data!r} has no captions for {cfg.model}'s text encoder")
        words = {"vocab": list(tokenizer.words), "max_length": tokenizer.max_length}
        fc = fc.replace(text_encoder={**fc.text_encoder, **words})
    return fc


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


def _init_weights(path: str, mc: ModelConfig) -> dict[str, torch.Tensor]:
    """The ``init_from`` weights, their sizes checked against ``mc`` before a model of its size is built.

    Loading them strictly follows the build; a DyDiT may start from a DiT (router keys keep their
    init, §12).
    """
    sd = load_checkpoint(path)
    if isinstance(mc, UViTConfig):  # docs/METHOD.md §16
        from dydit.models.uvit_fit import uvit_size_mismatches

        wrong = uvit_size_mismatches(mc, sd)
    elif isinstance(mc, FluxConfig):  # FLUX (docs/METHOD.md §17.6): fit_state_dict checks the fit
        wrong = []
    else:
        wrong = size_mismatches(mc, sd)
    if wrong:
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(wrong)}")
    return sd


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
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


def load_teacher(path: str, mc: ModelConfig, device: str) -> nn.Module:
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


# Checkpoints --------------------------------------------------------------------------------------
def save(run: Run, step: int) -> None:
    """Rank 0 writes the training state and the EMA export; every rank learns whether it worked."""
    cfg, mc, info = run.cfg, run.model_config, run.info
    if cfg.fsdp:
        _save_sharded(run, step)
        return
    error: DyditError | None = None
    if distributed.is_main():
        try:
            state = ckpt.make_state(
                model=run.model, ema=run.ema, optimizer=run.optimizer, step=step, data=run.stream.state(),
                config=cfg.to_dict(), model_config=mc.to_dict(), data_info=info.to_dict(),
                init_sha256=run.init_digest,
            )  # fmt: skip
            ckpt.save_state(run.state_file, state)
            ckpt.keep_numbered(run.state_file, step, cfg.keep_checkpoints)
            export_cfg = {"model": mc.to_dict(), "data": info.to_dict(), "train": cfg.to_dict(), "step": step}
            if cfg.lora_rank:  # the adapters and routers alone, beside the base they fit
                base = {"base": cfg.init_from, "base_sha256": run.init_digest}
                save_lora(export_file(run.run_dir, cfg), run.ema, {**export_cfg, **base})
            else:
                ckpt.export_weights(ckpt.export_path(run.run_dir), run.ema, export_cfg)
        except DyditError as e:
            error = e
    if not _agree(error is None, run.device):
        raise error or DyditError("rank 0 could not write the checkpoint")


def _save_sharded(run: Run, step: int) -> None:
    """FSDP: every rank writes its shards, the export is gathered, then rank 0 writes state.pt
    (pointing at the shards) and the export; every rank learns whether that worked."""
    cfg, mc, info = run.cfg, run.model_config, run.info
    name = fsdp.save_sharded(run.run_dir, step, run.model, run.ema, run.optimizer)
    full = fsdp.full_state_dict(run.ema, is_trained_key if cfg.lora_rank else None)
    error: DyditError | None = None
    if distributed.is_main():
        try:
            state = ckpt.make_state(
                model=None, ema=None, optimizer=None, step=step, data=run.stream.state(),
                config=cfg.to_dict(), model_config=mc.to_dict(), data_info=info.to_dict(),
                init_sha256=run.init_digest, sharded=name,
            )  # fmt: skip
            ckpt.save_state(run.state_file, state)
            ckpt.keep_numbered(run.state_file, step, cfg.keep_checkpoints)
            kept = {f"{fsdp.SHARDED_PREFIX}{p.stem}" for p in ckpt.numbered_states(run.run_dir)}
            fsdp.prune_sharded(run.run_dir, kept | {name})
            export_cfg = {"model": mc.to_dict(), "data": info.to_dict(), "train": cfg.to_dict(), "step": step}
            if cfg.lora_rank:
                base = {"base": cfg.init_from, "base_sha256": run.init_digest}
                save_lora(export_file(run.run_dir, cfg), run.ema, {**export_cfg, **base}, tensors=full)
            else:
                ckpt.export_tensors(ckpt.export_path(run.run_dir), full, export_cfg)
        except DyditError as e:
            error = e
    if not _agree(error is None, run.device):
        raise error or DyditError("rank 0 could not write the checkpoint")


def export_file(run_dir: Path, cfg: TrainConfig) -> Path:
    """The run's export: ``ema.safetensors``, or ``lora.safetensors`` for a TD-LoRA run."""
    return run_dir / LORA_FILE if cfg.lora_rank else ckpt.export_path(run_dir)


def _agree(ok: bool, device: str) -> bool:
    """True on every rank iff ``ok`` holds on every rank (one collective)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return bool(distributed.all_reduce_mean(flag).item() == 0.0)
