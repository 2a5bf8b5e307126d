"""``dydit train``: DiT training from scratch or from weights; rerun the command to resume.

A thin layer over :func:`dydit.train.loop.train` (docs/METHOD.md §1.6, §6): options overlay a
:class:`~dydit.train.config.TrainConfig`, ``--dry-run`` prints it. The same command runs under
``torchrun --nproc_per_node=N`` for data-parallel training. ``dydit finetune`` shares these options.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from dydit.cli._common import non_negative_float, positive_int, seed_int
from dydit.presets import FLOW_PATHS, FLOW_PREDICTIONS, OBJECTIVES

if TYPE_CHECKING:
    from dydit.train.config import TrainConfig
    from dydit.train.loop import TrainResult


def _model_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except (ValueError, RecursionError):  # not JSON: a plain string (the config's type check names it)
        return key.strip().replace("-", "_"), value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def _decay(text: str) -> float:
    v = non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def add_run_options(p: argparse.ArgumentParser, *, finetune: bool) -> None:
    """The options shared by ``train`` and ``finetune``; defaults come from TrainConfig."""
    from dydit.train.config import TrainConfig

    d = TrainConfig()
    _add_model_group(p, d, finetune=finetune)
    _add_data_group(p, d)
    _add_optimisation_group(p, d, finetune=finetune)
    if finetune:
        _add_finetune_group(p, d)
    _add_run_group(p, d)


def _add_model_group(p: argparse.ArgumentParser, d: TrainConfig, *, finetune: bool) -> None:
    """Preset, config overrides and initial weights."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None if finetune else d.model,
        help="model preset, e.g. DiT-Ti/2, DiT-S/2"
        + (
            " (default: the DyDiT version of the --init-from checkpoint's model)"
            if finetune
            else f" (default {d.model})"
        ),
    )
    g.add_argument(
        "--model-option", action="append", type=_model_option, default=[], metavar="KEY=VALUE",
        help="override a model config field, e.g. depth=4 or learn_sigma=false (repeatable)",
    )  # fmt: skip
    g.add_argument(
        "--objective", choices=OBJECTIVES, default=None,
        help="training objective: ddpm (DiT's epsilon prediction) or flow (flow matching, SiT); "
        "default: the preset's (SiT-* are flow) or the --init-from weights'",
    )  # fmt: skip
    g.add_argument(
        "--flow-path", choices=FLOW_PATHS, default=None,
        help="flow matching: the interpolant path (default linear, SiT's)",
    )  # fmt: skip
    g.add_argument(
        "--flow-prediction", choices=FLOW_PREDICTIONS, default=None,
        help="flow matching: what the network predicts (default velocity, SiT's)",
    )  # fmt: skip
    g.add_argument(
        "--init-from", required=finetune, default=None, metavar="CKPT",
        help="start from these weights: any checkpoint `dydit inspect` reads (state dict, training "
        "dict or state, .safetensors, diffusers folder)"
        + ("; a DiT checkpoint gets fresh routers" if finetune else ""),
    )  # fmt: skip


def _add_data_group(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Dataset, image size, augmentation, loader and latent cache."""
    from dydit.train.config import FITS

    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default=d.data,
        help="dataset: fashion-mnist[:DIR], fashion-mnist-test, fmnist-compose[:DIR] (captioned "
        "compositions, text-to-image), digits, folder:PATH, latents:PATH "
        "(default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--image-size", type=positive_int, default=None,
        help="pixel size (default: the model's input size where --init-from, a resumed run or "
        "--model-option input_size fixes it, else the dataset's; a folder: the short side most of its "
        "images share, at most 256)",
    )  # fmt: skip
    g.add_argument(
        "--fit", choices=FITS, default=d.fit,
        help="how images reach --image-size: pad (default: centre an image no larger than the size on "
        "black, centre-crop a larger one) or resize (the ADM centre crop, DiT's pipeline)",
    )  # fmt: skip
    g.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=None,
        help="random horizontal flips (default: on, except for digits)",
    )  # fmt: skip
    g.add_argument(
        "--num-workers", type=_non_negative_int, default=d.num_workers, help="data loader processes"
    )
    g.add_argument(
        "--cache-latents", default=None, metavar="DIR",
        help="encode --data with --vae into a latent cache in DIR once (one process), then train on it",
    )  # fmt: skip
    g.add_argument("--vae", default=None, help="AutoencoderKL for --cache-latents: a local path or hub id")


def _add_optimisation_group(p: argparse.ArgumentParser, d: TrainConfig, *, finetune: bool) -> None:
    """AdamW, the gradient guard, EMA and the seed."""
    from dydit.train.config import GRAD_GUARDS

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help="global batch size (all processes)"
    )
    g.add_argument(
        "--lr", type=non_negative_float, default=d.lr, help="AdamW learning rate (default %(default)g)"
    )
    if finetune:
        g.add_argument(
            "--router-lr", type=non_negative_float, default=None,
            help="learning rate of the routers alone (default: --lr); helps short fine-tunes",
        )  # fmt: skip
    g.add_argument(
        "--weight-decay", type=non_negative_float, default=d.weight_decay, help="AdamW weight decay"
    )
    g.add_argument("--steps", type=positive_int, default=d.steps, help="total optimisation steps of the run")
    g.add_argument(
        "--grad-guard", choices=GRAD_GUARDS, default=d.grad_guard,
        help="gradient-norm guard, one optimizer step at most (default %(default)s): clip scales the "
        "gradients by min(1, threshold/norm); skip drops the update unless norm < threshold, which "
        "reproduces the released DyDiT fine-tuning (docs/TRAINING.md); none always steps",
    )  # fmt: skip
    g.add_argument(
        "--grad-threshold",
        type=non_negative_float,
        default=d.grad_threshold,
        help="gradient-norm threshold of --grad-guard (default %(default)g; the released DyDiT-XL "
        "scripts use 200 at lambda 0.5, 50 at 0.7)",
    )
    g.add_argument(
        "--ema-decay", type=_decay, default=d.ema_decay, help="EMA decay per step (default %(default)g)"
    )
    g.add_argument(
        "--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
        help="EMA decay min(d, (1+k)/(10+k)) at step k, so that the average follows the weights in runs "
        "of any length (default: on; --no-ema-warmup: the constant decay of the DiT paper)",
    )  # fmt: skip
    g.add_argument("--seed", type=seed_int, default=d.seed, help="run seed (data order, noise, init)")


def _add_finetune_group(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The FLOPs target, its schedule and the extra losses of DyDiT fine-tuning."""
    from dydit.cli._common import unit_interval

    g = p.add_argument_group("DyDiT fine-tuning (docs/METHOD.md §5)")
    g.add_argument("--target", type=unit_interval, required=True, help="FLOPs target lambda in (0, 1]")
    g.add_argument(
        "--target-warmup-steps", type=_non_negative_int, default=d.target_warmup_steps,
        help="lambda_t decays linearly from 1 to the target until this step (default: the paper's 1000, "
        "or half of --steps when that is shorter)",
    )  # fmt: skip
    g.add_argument(
        "--target-hold-steps", type=_non_negative_int, default=d.target_hold_steps,
        help="lambda_t stays 1 for this many steps (default: the paper's 100, or --steps/20 when shorter)",
    )  # fmt: skip
    g.add_argument(
        "--complete-steps", type=_non_negative_int, default=d.complete_steps,
        help="add the complete-model loss for this many steps (30000 for DiT-XL in the paper)",
    )  # fmt: skip
    g.add_argument(
        "--flops-weight", type=non_negative_float, default=d.flops_weight, help="weight of the FLOPs loss"
    )
    g.add_argument(
        "--stratified-t", action=argparse.BooleanOptionalAction, default=True,
        help="stratified timesteps: sample i draws t from quarter i mod 4 of [0, 1000)",
    )  # fmt: skip
    g.add_argument(
        "--reorder",
        action="store_true",
        help="sort each block's heads and MLP groups by weight-norm importance before fine-tuning "
        "(function-preserving; the always-on index 0 becomes the most important unit)",
    )
    g.add_argument(
        "--distill-weight", type=non_negative_float, default=d.distill_weight,
        help="weight of a distillation loss: mean squared difference between the DyDiT's output "
        "(all channels: eps and variance) and a frozen dense teacher's on the same x_t, t, y; "
        "costs one teacher forward per step (not in the paper; default 0 = off)",
    )  # fmt: skip
    g.add_argument(
        "--distill-from", default=None, metavar="CKPT",
        help="the teacher's weights (default: --init-from, the dense base)",
    )  # fmt: skip
    g.add_argument(
        "--lora", type=_non_negative_int, default=d.lora_rank, metavar="RANK",
        help="TD-LoRA (docs/METHOD.md §18): freeze the base, train rank-RANK adapters on the attention "
        "and MLP linears with the routers; writes lora.safetensors (default 0 = full fine-tuning)",
    )  # fmt: skip
    g.add_argument(
        "--lora-groups", type=positive_int, default=d.lora_groups, metavar="G",
        help="split the adapters' rank into G groups switched by a timestep router (default %(default)s)",
    )  # fmt: skip


def _add_run_group(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Run directory, checkpoints, logging, device and numerics."""
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=d.out_dir, help="run directory; rerunning with it resumes")
    g.add_argument("--ckpt-every", type=positive_int, default=d.ckpt_every, help="steps between checkpoints")
    g.add_argument(
        "--keep-checkpoints", type=_non_negative_int, default=d.keep_checkpoints, metavar="N",
        help="keep the newest N numbered training states checkpoints/NNNNNNN.pt (0: all; default "
        "%(default)s); checkpoints/state.pt is always the newest",
    )  # fmt: skip
    g.add_argument(
        "--log-every", type=positive_int, default=d.log_every,
        help="steps between logged scalars (stats.jsonl, a line in log.txt, TensorBoard when installed; "
        "on stderr too with --no-progress)",
    )  # fmt: skip
    g.add_argument(
        "--stop-at", type=positive_int, default=None, metavar="STEP",
        help="end this invocation at STEP with a checkpoint (rerun to continue)",
    )  # fmt: skip
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the network (GPU and CPU)")
    g.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute block activations in backward"
    )
    g.add_argument(
        "--no-tf32", action="store_true", help="keep full float32 matmuls on GPU (TF32 is on by default)"
    )
    g.add_argument(
        "--fsdp", action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard); "
        "checkpoints become distributed checkpoints (docs/TRAINING.md, FSDP)",
    )  # fmt: skip
    g.add_argument(
        "--fsdp-mixed-precision", choices=("none", "bf16"), default=d.fsdp_mixed_precision,
        help="with --fsdp: bf16 parameters in compute, float32 gradient reduction and master weights",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")


def config_from_args(args: argparse.Namespace, *, finetune: bool):
    """The :class:`TrainConfig` the parsed options describe."""
    from dydit.train.config import TrainConfig, run_model

    model, overrides = run_model(args.init_from, args.model, dict(args.model_option), finetune=finetune)
    flow = {"objective": args.objective, "flow_path": args.flow_path, "flow_prediction": args.flow_prediction}
    overrides.update({k: v for k, v in flow.items() if v is not None})  # explicit flags win
    data = args.data
    if args.cache_latents:
        data = f"latents:{args.cache_latents}"
    extra: dict[str, Any] = {}
    if finetune:
        extra = dict(
            target=args.target,
            target_warmup_steps=args.target_warmup_steps,
            target_hold_steps=args.target_hold_steps,
            complete_steps=args.complete_steps,
            flops_weight=args.flops_weight,
            stratified_t=args.stratified_t,
            router_lr=args.router_lr,
            reorder=args.reorder,
            distill_weight=args.distill_weight,
            distill_from=args.distill_from,
            lora_rank=args.lora,
            lora_groups=args.lora_groups,
        )
    return TrainConfig(
        out_dir=args.out_dir,
        model=model,
        model_overrides=overrides,
        init_from=args.init_from,
        data=data,
        image_size=None if args.cache_latents else args.image_size,
        fit=args.fit,
        flip=args.flip,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        steps=args.steps,
        ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        seed=args.seed,
        ema_decay=args.ema_decay,
        ema_warmup=args.ema_warmup,
        grad_guard=args.grad_guard,
        grad_threshold=args.grad_threshold,
        bf16=args.bf16,
        grad_checkpointing=args.grad_checkpointing,
        fsdp=args.fsdp,
        fsdp_mixed_precision=args.fsdp_mixed_precision,
        device=args.device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        **extra,
    )


def cache_latents(args: argparse.Namespace) -> None:
    """Encode ``--data`` into ``--cache-latents`` with ``--vae`` unless a complete cache is there."""
    from dydit.cli._common import resolve_device
    from dydit.data.cache import build_latent_cache

    build_latent_cache(
        args.data,
        args.cache_latents,
        vae=args.vae,
        image_size=args.image_size,
        fit=args.fit,
        flip=args.flip,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )


def execute(args: argparse.Namespace, *, finetune: bool) -> int:
    from dydit.cli._common import resolve_device

    resolve_device(args.device)  # an unknown device is an error here, --dry-run included
    cfg = config_from_args(args, finetune=finetune)
    if args.dry_run:
        from dydit.train.run import data_image_size

        # Automatic fields and the image size as a fresh run resolves them.
        print(cfg.resolved().replace(image_size=data_image_size(cfg)).to_json())
        return 0
    from dydit import distributed
    from dydit.train import configure_torch, train

    configure_torch(tf32=not args.no_tf32)
    if args.cache_latents:
        cache_latents(args)
    result = train(cfg, stop_at=args.stop_at)
    if distributed.is_main():
        print(summary(result, cfg))
    return 0


def summary(result: TrainResult, cfg: TrainConfig) -> str:
    """The last line of a run: how far it got, the ρ a DyDiT reached, the EMA file, how to go on."""
    parts = [f"step {result.step}/{cfg.steps}"]
    if result.flops_ratio is not None:
        parts.append(f"FLOPs ratio of the EMA weights {result.flops_ratio:.3f} (target {cfg.target:g})")
    parts.append(f"EMA weights: {result.export}")
    if result.step < cfg.steps:
        parts.append("rerun the same command to continue")
    return "; ".join(parts)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a DiT from scratch or from weights (rerun to resume; works under torchrun)",
        description="Train a DiT (docs/METHOD.md §1.6). Rerunning the same command resumes from the run "
        "directory's checkpoint. Launch with torchrun --nproc_per_node=N for data-parallel training.",
    )
    add_run_options(p, finetune=False)
    p.set_defaults(func=lambda args: execute(args, finetune=False))
