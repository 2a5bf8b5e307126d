"""``dydit demo``: the whole story on the embedded Fashion-MNIST default (see :mod:`dydit.apps.demo`)."""

from __future__ import annotations

import argparse

from dydit.cli._common import (
    non_negative_float,
    positive_int,
    resolve_device,
    sampler_help,
    seed_int,
    unit_interval,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="DiT vs DyDiT on Fashion-MNIST: quality, FLOPs, speed, and the dense DiT at equal compute",
        description="Load the shipped Fashion-MNIST DiT and the shipped DyDiT (lambda 0.5), run a short "
        "live fine-tune of the DiT into a DyDiT, sample all of them with the same seeds (dense DiT vs "
        "sliced DyDiT, timed side by side), and the dense DiT at round(rho*N) steps, the free alternative "
        "with the same compute; evaluate FID and the classifier distance, say which wins at equal "
        "compute, and write OUT_DIR/report.md with pictures. Rerunning resumes the fine-tune.",
    )
    p.add_argument(
        "which",
        nargs="?",
        choices=("t2i",),
        default=None,
        help="t2i: the text-to-image demo instead (FLUX on captioned compositions: dense, DyDiT, equal "
        "compute, GenEval-style scores; --checkpoint / --dydit-checkpoint name its models)",
    )
    p.add_argument(
        "--out-dir", default=None, help="where the report, samples and fine-tune go (default runs/demo)"
    )
    p.add_argument(
        "--dydit-checkpoint", default=None,
        help="DyDiT to evaluate (default: the shipped one, for the shipped base at lambda 0.5; "
        "otherwise the live fine-tune)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", default=None, help="base DiT (.safetensors export); default: the shipped one"
    )
    p.add_argument(
        "--target", type=unit_interval, default=None, help="FLOPs target lambda in (0, 1] (default 0.5)"
    )
    p.add_argument(
        "--finetune-steps",
        type=positive_int,
        default=None,
        help="iterations of the live fine-tune (default 150)",
    )
    p.add_argument("--num-samples", type=positive_int, default=None, help="images per model (default 1000)")
    p.add_argument("--sampler", default=None, help=f"{sampler_help()} (default dpm++2m)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default 20)")
    p.add_argument(
        "--cfg-scale", type=non_negative_float, default=None, help="guidance scale (default 1: none)"
    )
    p.add_argument("--no-inception", action="store_true", help="skip FID (classifier distance only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument(
        "--seed", type=seed_int, default=None, help="seed of the fine-tune and of the sample seeds"
    )
    p.add_argument("--fast", action="store_true", help="a ~2-minute smoke run of the same path (tiny counts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    from dataclasses import asdict

    from dydit.apps.demo import DemoConfig, run_demo, with_overrides

    if args.which == "t2i":
        return _run_t2i(args)
    args.out_dir = args.out_dir or "runs/demo"
    base = DemoConfig.smoke() if args.fast else DemoConfig()
    cfg = with_overrides(
        base, out_dir=args.out_dir, checkpoint=args.checkpoint, dydit_checkpoint=args.dydit_checkpoint,
        target=args.target,
        finetune_steps=args.finetune_steps, num_samples=args.num_samples, sampler=args.sampler,
        steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, device=resolve_device(args.device),
        inception=False if args.no_inception else None, progress=False if args.no_progress else None,
    )  # fmt: skip
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    report = run_demo(cfg)
    print(report.read_text())
    print(f"report written to {report}")
    return 0


def _run_t2i(args: argparse.Namespace) -> int:
    """``dydit demo t2i`` (:mod:`dydit.apps.demo_t2i`)."""
    import json
    import logging
    from dataclasses import asdict

    from dydit.apps.demo import with_overrides
    from dydit.apps.demo_t2i import T2IDemoConfig, run_t2i_demo
    from dydit.errors import DyditError

    for flag, value in (("--target", args.target), ("--finetune-steps", args.finetune_steps),
                        ("--sampler", args.sampler)):  # fmt: skip
        if value is not None:
            raise DyditError(f"{flag} does not apply to the text-to-image demo")
    base = T2IDemoConfig.smoke() if args.fast else T2IDemoConfig()
    cfg = with_overrides(
        base, out_dir=args.out_dir, checkpoint=args.checkpoint, dydit_checkpoint=args.dydit_checkpoint,
        per_category=args.num_samples, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
        device=resolve_device(args.device), fid=False if args.no_inception else None,
        progress=False if args.no_progress else None,
    )  # fmt: skip
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    report = run_t2i_demo(cfg)
    print(report.read_text())
    print(f"report written to {report}")
    return 0
