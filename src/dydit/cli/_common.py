"""Option types and helpers shared by subcommands."""

from __future__ import annotations

import argparse

from dydit.errors import DyditError
from dydit.seeds import parse_seed


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


MAX_THREADS = 4096


def thread_count(text: str) -> int:
    """A number of CPU threads in [1, MAX_THREADS]."""
    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {v}")
    return v


def seed_int(text: str) -> int:
    """A seed: an integer in [0, 2**63), leaving room for the per-image offsets added to it."""
    return parse_seed(text)


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def unit_interval(text: str) -> float:
    """A number in (0, 1], e.g. a FLOPs target lambda."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def resolve_device(name: str) -> str:
    """``--device``: auto, cpu, cuda, cuda:N, or mps where available; else a one-line error."""
    from dydit.distributed import check_device

    return check_device(name)


def sampler_names() -> tuple[str, ...]:
    """Every registered sampler, DDPM ones first: the choices of ``--sampler``, read from the registries."""
    from dydit.diffusion import SAMPLERS
    from dydit.flow import FLOW_SAMPLERS

    return (*SAMPLERS, *FLOW_SAMPLERS)


def sampler_help() -> str:
    """``--sampler`` help naming every registered sampler by the models it fits, with its summary."""
    from dydit.diffusion import SAMPLERS
    from dydit.flow import FLOW_SAMPLERS

    def names(registry: dict) -> str:
        return ", ".join(f"{k} ({v.summary})" if v.summary else k for k, v in registry.items())

    return f"DDPM models: {names(SAMPLERS)}; flow-matching (SiT) models: {names(FLOW_SAMPLERS)}"


def add_model_options(p: argparse.ArgumentParser, default_model: str | None = "DiT-XL/2") -> None:
    p.add_argument("--model", default=default_model, help="model preset, e.g. DiT-XL/2, DyDiT-S/2, DiT-Ti/2")
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="input size in pixels; latent models use image_size/8 latents (default: preset)",
    )
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="number of classes (default: preset)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="weights: a .pt/.pth state dict or training dict (official DiT/DyDiT/SiT or dydit), "
        ".safetensors, or a diffusers DiT folder (see `dydit inspect`)",
    )


def size_overrides(base, image_size: int | None, num_classes: int | None) -> dict[str, int]:
    """ModelConfig overrides for ``--image-size`` and ``--num-classes`` on top of ``base``."""
    overrides = {}
    if hasattr(base, "max_text_length"):  # a FluxConfig (FLUX family): latents 8x smaller, no classes
        if num_classes is not None:
            raise DyditError("FLUX models are conditioned on text: --num-classes does not apply")
        if image_size is not None and base.latent_channels in (1, 3):  # pixel space (§17.6)
            overrides["sample_size"] = image_size
        elif image_size is not None:
            if image_size % 16:
                raise DyditError(f"image size {image_size} must be divisible by 16 for a FLUX model")
            overrides["sample_size"] = image_size // 8
        return overrides
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if image_size is not None:
        # Latent models (4 channels) see an 8x smaller latent; pixel models see the image itself.
        latent = base.in_channels == 4
        if latent and image_size % 8:
            raise DyditError(f"image size {image_size} must be divisible by 8 for a latent model")
        overrides["input_size"] = image_size // 8 if latent else image_size
    return overrides


def model_config_from_args(args: argparse.Namespace, default_model: str | None = None):
    """The preset ``--model`` (else ``default_model``) with the options of :func:`add_model_options`."""
    from dydit.presets import get_model_config, get_uvit_config, is_uvit_name

    name = args.model or default_model
    get = get_uvit_config if is_uvit_name(name) else get_model_config  # U-ViT: docs/METHOD.md §16
    return get(name, **size_overrides(get(name), args.image_size, args.num_classes))


ENGINE_FLAGS = {"compile": "--compile", "compile_mode": "--compile-mode", "token_bucket": "--token-bucket",
                "pack_budget": "--pack-budget"}  # fmt: skip


def add_engine_options(g) -> None:
    """The sliced engine's options (:func:`dydit.models.sliced.engine`) as flags."""
    g.add_argument(
        "--compile",
        action="store_true",
        help="sliced execution: torch.compile the engine's two per-layer regions (dynamic shapes)",
    )
    g.add_argument(
        "--compile-mode",
        default=None,
        help="with --compile: the torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead",
    )
    g.add_argument(
        "--token-bucket",
        type=positive_int,
        default=None,
        help="sliced execution: pad kept-token counts to a multiple of this (bounded shapes for static "
        "compile modes; the images do not change)",
    )
    g.add_argument(
        "--pack-budget",
        type=non_negative_float,
        default=None,
        help="sliced execution: hold weight packs up to this fraction of the blocks' attention+MLP "
        "weight bytes and gather the rest at each use (default 0.5)",
    )


def engine_options(args: argparse.Namespace, execution: str) -> dict:
    """The engine options the flags set (only those given); one-line errors for another execution."""
    given = {k: v for k in ENGINE_FLAGS if (v := getattr(args, k)) is not None and v is not False}
    if given and execution != "sliced":
        flags = ", ".join(ENGINE_FLAGS[k] for k in given)
        raise DyditError(f"{flags}: options of the sliced engine; this run's execution is {execution}")
    if "compile_mode" in given and "compile" not in given:
        raise DyditError("--compile-mode applies only with --compile")
    return given
