"""``dydit finetune``: turn a DiT checkpoint into a DyDiT at a FLOPs target λ (docs/METHOD.md §5, §6).

The same training loop as ``dydit train``, with routers added to the loaded DiT, the FLOPs loss,
the λ_t schedule, stratified timesteps and an optional complete-model warm-up. Rerun to resume.
"""

from __future__ import annotations

import argparse

from dydit.cli.train import add_run_options, execute


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a DiT checkpoint into a DyDiT at a FLOPs target (rerun to resume)",
        description="Fine-tune a DiT checkpoint into a DyDiT (docs/METHOD.md §5-§6): diffusion loss of the "
        "routed network + complete-model loss for --complete-steps + 2*(rho - lambda_t)^2. "
        "Example: dydit finetune --init-from runs/dit/ema.safetensors --target 0.5 --out-dir runs/dydit",
    )
    add_run_options(p, finetune=True)
    p.set_defaults(func=lambda args: execute(args, finetune=True))
