"""``dydit flops``: per-component MACs of a model, in GFLOPs (1 FLOP = 1 MAC)."""

from __future__ import annotations

import argparse

from dydit.cli._common import add_model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="print a per-component FLOPs table (MAC convention: DiT-XL/2 @256 = 118.6 G)",
        description="Print the per-component FLOPs (multiply-accumulates) of one forward pass for one image.",
    )
    add_model_options(p)
    p.set_defaults(func=run)


def model_config_from_args(args: argparse.Namespace):
    from dydit.presets import get_model_config

    overrides = {}
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    base = get_model_config(args.model)
    if args.image_size is not None:
        # Latent models (4 channels) see an 8x smaller latent; pixel models see the image itself.
        latent = base.in_channels == 4
        if latent and args.image_size % 8:
            from dydit.errors import DyditError

            raise DyditError(f"image size {args.image_size} must be divisible by 8 for a latent model")
        overrides["input_size"] = args.image_size // 8 if latent else args.image_size
    return get_model_config(args.model, **overrides)


def run(args: argparse.Namespace) -> int:
    from dydit.flops.formulas import dit_macs_table

    cfg = model_config_from_args(args)
    table = dit_macs_table(
        depth=cfg.depth,
        width=cfg.hidden_size,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        input_size=cfg.input_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        mlp_ratio=cfg.mlp_ratio,
    )
    total = sum(table.values())
    print(f"{args.model}: input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens")
    print("| component | GFLOPs | share |")
    print("|---|---:|---:|")
    for name, macs in table.items():
        print(f"| {name} | {macs / 1e9:.4f} | {100 * macs / total:.2f}% |")
    print(f"| **total** | **{total / 1e9:.2f}** | 100% |")
    return 0
