"""The options of ``dydit sample`` (and of ``dydit cache-calibrate``, which shares the model and
sampling groups): their parsers, defaults and help. The run itself is :mod:`dydit.cli.sample`.
"""

from __future__ import annotations

import argparse
from typing import Any

from dydit.cli._common import (
    add_engine_options,
    add_model_options,
    non_negative_float,
    positive_int,
    sampler_help,
    sampler_names,
    seed_int,
)
from dydit.diffusion import GUIDANCE_CHANNELS
from dydit.errors import DyditError

DEFAULT_CFG_SCALE = 1.5  # DiT's and DyDiT's FID setting (docs/METHOD.md §7.1)
DEFAULT_NUM_SAMPLES = 16
DEFAULT_DYDIT_EXECUTION = "sliced"  # the engine that really skips work; masked is no faster than dense
DEFAULT_GRID = "sample.png"  # without --out-dir
GRID_MAX = 64  # the grid shows at most this many images; the rest go to --out-dir
MAX_NUM_SAMPLES = 10_000_000  # 200x FID-50K; far more is a typo that would exhaust memory


def _class_list(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.replace(" ", "").split(",") if c]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError("expected at least one class index")
    return classes


def _steps(text: str) -> int | str:
    """A positive step count, or ``ddimN`` for DDIM striding of the original timesteps."""
    if text.startswith("ddim"):
        positive_int(text[len("ddim") :])
        return text
    return positive_int(text)


def _add_model_group(p: argparse.ArgumentParser) -> None:
    """Weights, architecture, execution mode and VAE."""
    g = p.add_argument_group("model")
    add_model_options(g, default_model=None)
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="without --checkpoint, sample the random initialisation of --model (smoke tests and "
        "timing only; refused otherwise, so a forgotten --checkpoint is an error)",
    )
    g.add_argument(
        "--execution",
        default=None,
        help="DyDiT execution: sliced (default; really skips the switched-off heads, groups and "
        "tokens), masked (the training computation: the same images, no faster than dense) or "
        "dense (the full DiT inside, routers ignored: other images). Printed on stderr and recorded",
    )
    add_engine_options(g)
    g.add_argument(
        "--lora",
        default=None,
        metavar="FILE",
        help="a TD-LoRA file (lora.safetensors of dydit finetune --lora) applied onto the base "
        "weights: --checkpoint, else the base the file names (docs/METHOD.md §18)",
    )
    g.add_argument(
        "--vae",
        default=None,
        help="AutoencoderKL (diffusers directory or hub id) that decodes a latent model's samples",
    )


def _add_sampling_group(p: argparse.ArgumentParser) -> None:
    """Sampler, steps, guidance, labels, seeds, batch and device."""
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--sampler",
        choices=sampler_names(),
        default=None,
        help=f"{sampler_help()}. Default: ddpm, or euler for a flow model (the checkpoint's config "
        "says which it is)",
    )
    g.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help="DDPM: network evaluations on evenly spaced original timesteps, or ddimN for DDIM "
        "striding; flow: steps of the uniform time grid, N + 1 points (SiT's num_steps counts the "
        "points: its N + 1 is N here; default 250, or a text-to-image model's own recipe)",
    )
    g.add_argument(
        "--eta", type=non_negative_float, default=None, help="DDIM noise scale eta (ddim only; default 0)"
    )
    g.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=None,
        help=f"classifier-free guidance scale; 1 disables guidance (default {DEFAULT_CFG_SCALE}, or a "
        "text-to-image model's own recipe)",
    )
    g.add_argument(
        "--guidance-channels",
        choices=GUIDANCE_CHANNELS,
        default="all",
        help="guide all eps (or velocity) channels (default) or only the first 3, as the official "
        "DiT, DyDiT and SiT code",
    )
    g.add_argument(
        "--clip-denoised", action="store_true", help="clamp predicted x0 to [-1, 1] (pixel models)"
    )
    g.add_argument(
        "--classes",
        type=_class_list,
        default=None,
        help="comma-separated class labels, cycled over the samples (default: drawn from each seed)",
    )
    g.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help=f"number of images (default: the number of --classes, else {DEFAULT_NUM_SAMPLES})",
    )
    add_prompt_options(g)
    g.add_argument("--seed", type=seed_int, default=0, help="image i uses seed SEED + i (default 0)")
    add_cache_options(g)
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass and process")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")


def add_prompt_options(g: Any, default: str = "") -> None:
    """``--prompt TEXT`` (repeatable) and ``--prompts FILE``: a text-to-image model's condition
    (read by :func:`dydit.cli.sample._prompts`); ``default`` ends the help with what is used without
    either."""
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text-to-image models: a prompt (repeat the flag for several; cycled over the images)" + default,
    )
    g.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="text-to-image models: prompts, one a line" + default,
    )


def add_cache_options(g: Any) -> None:
    """``--cache METHOD:THRESHOLD`` and ``--cache-coefficients FILE`` (docs/METHOD.md §19)."""
    g.add_argument(
        "--cache",
        default=None,
        metavar="METHOD:THRESHOLD",
        help="step caching: teacache:T (reuse the blocks' residual while the first block's modulated "
        "input changes little) or fbcache:T (while the first block's residual does); e.g. "
        "teacache:0.15. Computed and reused evaluations are printed on stderr",
    )
    g.add_argument(
        "--cache-coefficients",
        default=None,
        metavar="FILE",
        help="TeaCache's rescaling polynomial, the JSON of `dydit cache-calibrate` (default: identity)",
    )


def cache_settings(args: argparse.Namespace) -> Any:
    """The CacheSettings of ``--cache`` (None without it); one-line errors for bad values."""
    from dydit.models.cache import CacheSettings, load_coefficients

    if args.cache is None:
        if args.cache_coefficients is not None:
            raise DyditError("--cache-coefficients goes with --cache teacache:THRESHOLD")
        return None
    coeffs = None if args.cache_coefficients is None else load_coefficients(args.cache_coefficients)
    settings = CacheSettings.parse(args.cache, coeffs)
    if coeffs is not None and settings.method != "teacache":
        raise DyditError("--cache-coefficients is TeaCache's polynomial: use it with --cache teacache:T")
    return settings


def _add_output_group(p: argparse.ArgumentParser) -> None:
    """The grid, per-image files, the .npz, raw samples."""
    g = p.add_argument_group("output")
    g.add_argument(
        "--grid",
        default=None,
        help=f"grid PNG of the first {GRID_MAX} images, labelled by class (default: OUT_DIR.png beside "
        f"--out-dir, else {DEFAULT_GRID} in the current folder)",
    )
    g.add_argument(
        "--out-dir",
        default=None,
        help="also write one file per image here (000000.png, ...); rerunning resumes",
    )
    g.add_argument(
        "--npz",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="pack the --out-dir images into an ADM-format .npz (default PATH: OUT_DIR.npz)",
    )
    g.add_argument(
        "--save-raw",
        action="store_true",
        help="also save raw model-space samples (.npy; always for latent models without --vae)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
