"""``dydit inspect PATH``: what a checkpoint is, on one screen.

Format (raw state dict, training dict with ``args``, dydit state or export, bare safetensors,
diffusers folder), the model and preset it loads into, DiT or DyDiT and the router layout, the
training objective and numerical conventions, whether it loads strictly, the parameter count,
and the stored config, training step and ``args`` when the file has them. Weights that do not load
strictly are described all the same, then reported as an error (exit status 1).

A TD-LoRA file (``lora.safetensors`` of ``dydit finetune --lora``, or a run directory holding one;
docs/METHOD.md §18) is described as such: rank and groups, the adapted blocks and linears, the base
it expects (and whether that file is there, unchanged), parameter counts and the trainable
fraction, and the sample / merge commands that use it.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="say what a checkpoint is: format, model, routers, parameters, stored config, step",
        description="Describe a checkpoint file or diffusers folder on one screen, and check that it "
        "loads strictly into the model dydit would build for it.",
    )
    p.add_argument(
        "path",
        help="a .pt/.pth/.bin/.safetensors checkpoint, a diffusers DiT or FLUX folder, or a TD-LoRA "
        "file (lora.safetensors, or the run directory holding it)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="preset for a file that cannot say (e.g. SiT-XL/2 for a raw SiT state dict)",
    )
    p.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="which entry of a training dict to describe",
    )
    p.add_argument(
        "--config",
        default=None,
        help="the diffusers config.json (FluxTransformer2DModel) of a FLUX file that stores none, "
        "e.g. the released DyFLUX checkpoint",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dydit.checkpoint.describe import inspect_checkpoint
    from dydit.errors import DyditError

    lines, problem = inspect_checkpoint(args.path, args.model, args.weights, args.config)
    print("\n".join(lines), flush=True)
    if problem is not None:  # described, but it does not load: a failure for scripts (exit 1)
        raise DyditError(f"{args.path} does not load: {problem}")
    return 0
