"""``dydit export``: a training state -> an EMA (or raw) ``.safetensors`` file with its config, or
any checkpoint -> a diffusers ``DiTTransformer2DModel`` folder.

Training already writes ``ema.safetensors`` at every checkpoint; this re-exports a given state,
e.g. the raw model weights instead of the EMA (docs/METHOD.md §12; docs/ARCHITECTURE.md §6.3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a training state's EMA weights as .safetensors, or any checkpoint as a diffusers folder",
        description="Export the EMA (or raw model) weights of a training state, with the run's "
        "configuration as JSON under the safetensors metadata key 'config'. With --to diffusers, write "
        "any checkpoint dydit loads as a DiTTransformer2DModel (or FluxTransformer2DModel) folder "
        "(config.json + diffusion_pytorch_model.safetensors); a DyDiT's routers go beside it in "
        "dydit_routers.safetensors.",
    )
    p.add_argument(
        "state",
        help="a training state (checkpoints/state.pt) or a run directory; with --to diffusers, any "
        "checkpoint `dydit inspect` reads",
    )
    p.add_argument(
        "--to",
        choices=("safetensors", "diffusers"),
        default="safetensors",
        help="output format: a dydit .safetensors export (default) or a diffusers folder",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output .safetensors file, or folder for --to diffusers (default: next to the state, "
        "ema.safetensors or ema-diffusers/)",
    )
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to export")
    p.add_argument(
        "--model",
        default=None,
        help="--to diffusers: the preset of a file that stores no config and no training args; a U-ViT "
        "preset (U-ViT-H/2, ...) exports an official U-ViT .pth as a .safetensors with its config",
    )
    p.add_argument(
        "--config",
        default=None,
        help="--to diffusers: the diffusers config.json (FluxTransformer2DModel) of a FLUX file that "
        "stores none, e.g. the released DyFLUX checkpoint",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="the source is a TD-LoRA file (or a run directory holding lora.safetensors): write plain "
        "DyDiT weights with the adapters merged (refused when the adapters' gates depend on t)",
    )
    p.add_argument(
        "--base", default=None, help="--merge-lora: the base weights (default: the base the file names)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dydit.checkpoint import find_diffusers_dir
    from dydit.errors import DyditError
    from dydit.train.state import export_run, state_path

    src = Path(args.state)
    if args.merge_lora:
        from dydit.checkpoint.lora import LORA_FILE, merged_export

        if args.to != "safetensors" or args.model is not None or args.config is not None:
            raise DyditError("--merge-lora writes a .safetensors export; drop --to, --model and --config")
        lora = src / LORA_FILE if src.is_dir() else src
        out = Path(args.out) if args.out else lora.with_name("merged.safetensors")
        print(merged_export(lora, out, args.base))
        return 0
    if args.base is not None:
        raise DyditError("--base applies to --merge-lora")
    if _uvit_export(args, src):  # U-ViT (docs/METHOD.md §16): an official .pth or a U-ViT file
        return 0
    if args.to == "diffusers":
        from dydit.checkpoint.export import export_diffusers

        if src.is_dir() and find_diffusers_dir(src) is None and state_path(src).is_file():
            src = state_path(src)  # a run directory

        out = Path(args.out) if args.out else src.parent / f"{args.weights}-diffusers"
        path, notes = export_diffusers(src, out, model=args.model, weights=args.weights, config=args.config)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(path)
        return 0
    if args.model is not None or args.config is not None:
        raise DyditError("--model and --config apply to --to diffusers; a training state stores its config")
    print(export_run(src, args.out, which=args.weights))
    return 0


def _uvit_export(args: argparse.Namespace, src: Path) -> bool:
    """Export a U-ViT checkpoint as a dydit .safetensors with its config; False for other models."""
    from dydit.checkpoint.uvit import export_uvit, is_uvit_source
    from dydit.errors import DyditError

    if not is_uvit_source(src, args.model):
        return False
    if args.to == "diffusers":
        raise DyditError(
            "diffusers has no U-ViT transformer class: export U-ViT models with --to safetensors"
        )
    print(export_uvit(src, args.out, model=args.model, weights=args.weights))
    return True
