"""``dydit cache-calibrate``: fit TeaCache's rescaling polynomial on a model's own trajectories
(docs/METHOD.md §19).

Samples a few images uncached with the sampler, steps and guidance the model will be used with,
records per consecutive pair of network evaluations the relative L1 change of the first block's
modulated input and of the network output (:class:`dydit.models.cache.ChangeRecorder`), fits a
polynomial from the first to the second (``numpy.polyfit``) and writes it as JSON, which
``dydit sample --cache teacache:T --cache-coefficients FILE`` and ``dydit.cached(...,
coefficients=FILE)`` read.

A text-to-image model (``FLUX-t2i``, docs/METHOD.md §17.6) samples ``--prompt`` / ``--prompts FILE``
as ``dydit sample`` does (cycled over the images), by default one held-in evaluation prompt per
category (:func:`dydit.data.compose_grammar.evaluation_prompts`), with its own recipe's sampler,
steps and guidance unless given; the file records the prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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

DEFAULT_STEPS = 50  # a class-conditional model's; a text-to-image model's recipe names its own


def register(sub: argparse._SubParsersAction) -> None:
    from dydit.cli._sample_args import DEFAULT_CFG_SCALE, _add_model_group, _steps, add_prompt_options

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
    g.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help=f"sampling steps (default {DEFAULT_STEPS}, or a text-to-image model's own recipe)",
    )
    g.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=None,
        help=f"guidance (default {DEFAULT_CFG_SCALE}, or a text-to-image model's own recipe)",
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
    add_prompt_options(g, ". Default: one held-in evaluation prompt per category")
    g.add_argument("--seed", type=seed_int, default=0, help="image i uses seed SEED + i (default 0)")
    g.add_argument(
        "--batch-size", type=positive_int, default=CALIBRATION_BATCH, help="images per forward pass"
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=run)


def _calibration_prompts(args: argparse.Namespace, cfg: Any) -> list[str] | None:
    """The prompts of ``--prompt`` / ``--prompts`` (read as ``dydit sample`` reads them: a one-line
    error for a class-conditional model), else for a text-to-image model one held-in evaluation
    prompt per category: captions of the kind it was trained on, each category's trajectories."""
    from dydit.cli.sample import _prompts, _tokenizer, is_text_model

    if not is_text_model(cfg) or args.prompt is not None or args.prompts is not None:
        return _prompts(args, cfg)
    from dydit.data.compose_grammar import evaluation_prompts

    tokenizer = _tokenizer(cfg)  # a model of another vocabulary: a one-line error naming the words
    return [" ".join(tokenizer.check(p.text)) for p in evaluation_prompts("train", per_category=1)]


def run(args: argparse.Namespace) -> int:
    from dydit.cli._common import engine_options
    from dydit.cli.sample import (
        _build_model,
        _check_guidance,
        _execution,
        _label_classes,
        _model_config,
        _sample_shape,
        _settings,
        _tokenizer,
    )
    from dydit.flow import create_process
    from dydit.io import output_target
    from dydit.models.sliced import engine
    from dydit.sample import calibrate_teacache

    device = resolve_device(args.device)
    output_target(args.out)
    cfg, ckpt, source = _model_config(args)
    execution = _execution(args.execution, cfg)
    options = engine_options(args, execution)
    if getattr(args, "lora", None):
        raise DyditError("cache-calibrate takes a checkpoint without --lora")
    settings = _settings(args, cfg, default_steps=DEFAULT_STEPS)
    prompts = _calibration_prompts(args, cfg)
    _check_guidance(cfg, settings)
    seeds = list(range(args.seed, args.seed + args.num_samples))
    condition, meta = None, {}
    if prompts is not None:  # cycled over the images, as dydit sample does
        condition = _tokenizer(cfg)([prompts[i % len(prompts)] for i in range(len(seeds))])
        meta["prompts"] = prompts
    model = _build_model(cfg, ckpt, execution).to(device)
    if execution == "sliced" and options:
        model = engine(model, **options)
    _, pairs = calibrate_teacache(
        model, create_process(cfg), [settings], out=args.out, seeds=seeds, shape=_sample_shape(cfg),
        num_classes=_label_classes(cfg), condition=condition, degree=args.degree,
        batch_size=args.batch_size, device=device, weights=source, execution=execution, **meta,
    )  # fmt: skip
    shown = "" if prompts is None else f", {len(prompts)} prompt(s)"
    print(
        f"wrote {Path(args.out)}: degree-{args.degree} polynomial from {pairs} pairs "
        f"({args.num_samples} images{shown}, {settings.sampler} {settings.steps} steps)",
        file=sys.stderr,
    )
    return 0
