"""``dydit cache-calibrate``: fit TeaCache's rescaling polynomial on a model's own trajectories
(docs/METHOD.md §19).

Samples a few images uncached with the sampler, steps and guidance the model will be used with,
records per consecutive pair of network evaluations the relative L1 change of the first block's
modulated input and of the network output (:class:`dydit.models.cache.ChangeRecorder`), fits a
polynomial from the first to the second (``numpy.polyfit``) and writes it as JSON, which
``dydit sample --cache teacache:T --cache-coefficients FILE`` and ``dydit.cached(...,
coefficients=FILE)`` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dydit.cli._common import (
    non_negative_float,
    positive_int,
    resolve_device,
    sampler_help,
    sampler_names,
    seed_int,
)
from dydit.diffusion import GUIDANCE_CHANNELS
from dydit.errors import DyditError
from dydit.models.cache_settings import CALIBRATION_BATCH, CALIBRATION_IMAGES, DEFAULT_DEGREE


def register(sub: argparse._SubParsersAction) -> None:
    from dydit.cli._sample_args import DEFAULT_CFG_SCALE, _add_model_group, _steps

    p = sub.add_parser(
        "cache-calibrate",
        help="fit TeaCache's rescaling polynomial for `dydit sample --cache teacache:T`",
        description="Sample a few images uncached, record how much the first block's modulated input "
        "and the network output change between consecutive evaluations, and fit a polynomial from "
        "the one to the other (TeaCache's calibration). Use the sampler, steps and guidance you will "
        "sample with.",
    )
    _add_model_group(p)
    g = p.add_argument_group("calibration")
    g.add_argument("--out", required=True, help="the JSON file to write (coefficients, highest power first)")
    g.add_argument(
        "--degree",
        type=positive_int,
        default=DEFAULT_DEGREE,
        help="polynomial degree (default %(default)s, as TeaCache)",
    )
    g.add_argument("--sampler", choices=sampler_names(), default=None, help=sampler_help())
    g.add_argument("--steps", type=_steps, default=50, help="sampling steps (default 50)")
    g.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=DEFAULT_CFG_SCALE,
        help="guidance (default %(default)s)",
    )
    g.add_argument(
        "--guidance-channels",
        choices=GUIDANCE_CHANNELS,
        default="all",
        help="guide all channels (default) or only the first 3, as in dydit sample",
    )
    g.add_argument(
        "--num-samples", type=positive_int, default=CALIBRATION_IMAGES, help="images (default %(default)s)"
    )
    g.add_argument("--seed", type=seed_int, default=0, help="image i uses seed SEED + i (default 0)")
    g.add_argument(
        "--batch-size", type=positive_int, default=CALIBRATION_BATCH, help="images per forward pass"
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dydit.cli._common import engine_options
    from dydit.cli.sample import _build_model, _execution, _label_classes, _model_config
    from dydit.flow import create_process
    from dydit.io import output_target
    from dydit.models.sliced import engine
    from dydit.sample import SamplingSettings, calibrate_teacache

    device = resolve_device(args.device)
    output_target(args.out)
    cfg, ckpt, source = _model_config(args)
    execution = _execution(args.execution, cfg)
    options = engine_options(args, execution)
    if getattr(args, "lora", None):
        raise DyditError("cache-calibrate takes a checkpoint without --lora")
    sampler = args.sampler or getattr(cfg, "default_sampler", "euler" if cfg.objective == "flow" else "ddpm")
    settings = SamplingSettings(
        sampler=sampler, steps=args.steps, cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels
    )
    if settings.cfg_scale != 1 and cfg.class_dropout_prob == 0:
        raise DyditError("this model has no null-class embedding (class_dropout_prob 0); use --cfg-scale 1")
    model = _build_model(cfg, ckpt, execution).to(device)
    if execution == "sliced" and options:
        model = engine(model, **options)
    seeds = list(range(args.seed, args.seed + args.num_samples))
    _, pairs = calibrate_teacache(
        model, create_process(cfg), [settings], out=args.out, seeds=seeds,
        shape=(cfg.in_channels, cfg.input_size, cfg.input_size), num_classes=_label_classes(cfg),
        degree=args.degree, batch_size=args.batch_size, device=device, weights=source, execution=execution,
    )  # fmt: skip
    print(
        f"wrote {Path(args.out)}: degree-{args.degree} polynomial from {pairs} pairs "
        f"({args.num_samples} images, {settings.sampler} {settings.steps} steps)",
        file=sys.stderr,
    )
    return 0
