"""``dydit flops``: MACs of one forward pass for one image, in GFLOPs (1 FLOP = 1 MAC).

Without ``--checkpoint``: the static per-component table of a preset (docs/METHOD.md §1.1). With a DyDiT
checkpoint: the realised FLOPs per sampling timestep and their average over a sampler's schedule
(docs/METHOD.md §7.3). Width masks come from the routers at each original timestep; token keep rates
are measured on real forward passes along a sampling trajectory. A plain DiT checkpoint gets the
static table of its architecture.
"""

from __future__ import annotations

import argparse

from dydit.cli._common import (
    add_model_options,
    model_config_from_args,
    non_negative_float,
    positive_int,
    resolve_device,
    sampler_help,
    seed_int,
)
from dydit.errors import DyditError
from dydit.presets import ROUTER_LAYOUTS

DEFAULT_MODEL = "DiT-XL/2"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="print a per-component FLOPs table (MAC convention: DiT-XL/2 @256 = 118.6 G)",
        description="Print the per-component FLOPs (multiply-accumulates) of one forward pass for one image. "
        "With a DyDiT --checkpoint, report its FLOPs per sampling timestep and averaged over the schedule.",
    )
    add_model_options(p, default_model=None)
    p.add_argument(
        "--router-layout",
        choices=ROUTER_LAYOUTS,
        default=None,
        help="router layout of the DyDiT checkpoint (default: read from the router shapes)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampling steps: N evenly spaced original timesteps (DyDiT checkpoints; default 250)",
    )
    p.add_argument(
        "--sampler",
        default=None,
        help=f"sampler that drives the measured trajectory; {sampler_help()} (default ddpm, or euler "
        "for a flow-matching model)",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=4,
        help="images sampled to measure the token keep rates (default 4)",
    )
    p.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance scale of the measured trajectory (default 1.5, a FLUX its "
        "recipe's; 1 = none)",
    )
    p.add_argument(
        "--text-length",
        type=positive_int,
        default=None,
        help="FLUX models: text tokens of the table (default: the preset's max_text_length)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampled images and labels")
    p.add_argument("--device", default="auto", help="device for the measured forward passes: auto, cpu, cuda")
    p.add_argument(
        "--per-timestep",
        action="store_true",
        help="also print one row per sampling timestep (DyDiT checkpoints)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dynamic_opts = [
        o
        for o, v in (
            ("--steps", args.steps),
            ("--per-timestep", args.per_timestep),
            ("--router-layout", args.router_layout),
        )
        if v
    ]
    if args.checkpoint is None:
        if dynamic_opts:
            raise DyditError(f"{', '.join(dynamic_opts)} describe a DyDiT checkpoint; pass --checkpoint")
        from dydit.evaluate.routing import static_flops_markdown

        cfg = model_config_from_args(args, DEFAULT_MODEL)
        if args.text_length is not None:
            if not hasattr(cfg, "max_text_length"):
                raise DyditError("--text-length applies to FLUX models")
            cfg = cfg.replace(max_text_length=args.text_length)
        print(static_flops_markdown(args.model or DEFAULT_MODEL, cfg))
        return 0
    if args.image_size is not None or args.num_classes is not None:
        raise DyditError(
            "with --checkpoint, the image size and classes come from the checkpoint; "
            "drop --image-size/--num-classes"
        )

    from dydit.checkpoint import fit_problem, has_routers, load_model, model_config, open_checkpoint
    from dydit.errors import CheckpointError
    from dydit.evaluate.routing import schedule_flops, schedule_flops_markdown, static_flops_markdown
    from dydit.presets import preset_name

    ckpt = open_checkpoint(args.checkpoint)
    layout = {"router_layout": args.router_layout} if args.router_layout else {}
    cfg = model_config(ckpt, args.model, **layout)
    if not has_routers(ckpt.state_dict):
        if dynamic_opts:
            raise DyditError(
                f"{args.checkpoint} is a plain DiT checkpoint (no router weights); "
                f"{', '.join(dynamic_opts)} apply to DyDiT checkpoints only"
            )
        problem = fit_problem(cfg, ckpt.state_dict)  # the table must describe these weights
        if problem:
            raise CheckpointError(problem)
        print(static_flops_markdown(preset_name(cfg.replace(dynamic=False)) or str(args.checkpoint), cfg))
        return 0
    model = load_model(ckpt, cfg)
    default = "euler" if cfg.objective == "flow" else "ddpm"
    sampler = args.sampler or getattr(cfg, "default_sampler", default)  # a U-ViT names its own
    scale = args.cfg_scale if args.cfg_scale is not None else getattr(cfg, "recipe_guidance", 1.5)
    settings = dict(sampler=sampler, samples=args.samples, cfg_scale=scale, seed=args.seed)
    rows = schedule_flops(model, steps=args.steps, device=resolve_device(args.device), **settings)
    name = args.model or preset_name(cfg) or "DyDiT"
    title = f"{name} checkpoint {args.checkpoint}"
    print(schedule_flops_markdown(cfg, rows, title=title, per_timestep=args.per_timestep, **settings))
    return 0
