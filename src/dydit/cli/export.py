"""``dydit export``: a training state -> an EMA (or raw) ``.safetensors`` file with its config.

Training already writes ``ema.safetensors`` at every checkpoint; this re-exports a given state,
e.g. the raw model weights instead of the EMA (METHOD.md §12; DESIGN.md §3 rule 7).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the EMA weights of a training state as .safetensors (with the config)",
        description="Export the EMA (or raw model) weights of a training state, with the run's "
        "configuration as JSON under the safetensors metadata key 'config'.",
    )
    p.add_argument("state", help="a training state (checkpoints/state.pt) or a run directory")
    p.add_argument(
        "--out", default=None, help="output .safetensors (default: next to the state, ema.safetensors)"
    )
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dydit.errors import DyditError
    from dydit.train.checkpoint import export_state, state_path

    src = Path(args.state)
    if src.is_dir():
        src = state_path(src)
    out = Path(args.out) if args.out else src.parent / f"{args.weights}.safetensors"
    if out.suffix != ".safetensors":
        raise DyditError(f"the export must be a .safetensors file, got {out}")
    print(export_state(src, out, which=args.weights))
    return 0
