"""``dydit bench``: dense DiT, masked DyDiT and sliced DyDiT timed side by side (docs/METHOD.md §7.4, §8)."""

from __future__ import annotations

import argparse
import sys

from dydit.cli._common import (
    non_negative_float,
    positive_int,
    resolve_device,
    seed_int,
    thread_count,
    unit_interval,
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time dense DiT, masked DyDiT and sliced DyDiT on the same weights and inputs",
        description="Time dense DiT, masked DyDiT and the sliced DyDiT engine side by side: ms per "
        "forward and (with --sampler-steps) full-sampler seconds per image, with the FLOPs ratio rho, "
        "the speed-up and the efficiency (speed-up x rho). Routers come from a DyDiT checkpoint, or "
        "are calibrated to --rho for models without trained routers.",
    )
    _add_model_options(p)
    _add_mode_options(p)
    _add_routing_options(p)
    _add_timing_options(p)
    _add_run_options(p)
    p.set_defaults(func=run)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What runs: weights, batch sizes, dtype, device."""
    from dydit.apps.bench import DEFAULT_MODEL, DTYPES

    p.add_argument(
        "--model",
        default=None,
        help=f"model preset of random weights, e.g. DiT-S/2, DiT-XL/2 (default: {DEFAULT_MODEL}); with "
        "--checkpoint, the preset of a file that cannot say (rows name the model loaded)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="DiT or DyDiT weights (.pt/.safetensors); default: random weights. Its path is recorded "
        "in the report and the JSON rows",
    )
    p.add_argument(
        "--batch",
        type=_int_list,
        default=(16,),
        help="comma-separated numbers of images per forward, e.g. 8,64,256 (default: 16)",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype (default: float32)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


def _add_mode_options(p: argparse.ArgumentParser) -> None:
    """Which execution modes are timed, and how they are compiled."""
    from dydit.apps.bench import DEFAULT_MODES, MODES
    from dydit.models.sliced import DEFAULT_PACK_BUDGET

    p.add_argument(
        "--modes",
        type=_str_list,
        default=DEFAULT_MODES,
        help=f"comma-separated modes among {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)})",
    )
    p.add_argument(
        "--compile", action="store_true", help="also time dense-compiled and sliced-compiled (torch.compile)"
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead",
    )
    p.add_argument(
        "--token-bucket",
        type=positive_int,
        default=None,
        help="pad kept-token counts to a multiple of this (bounded shapes for static compile modes)",
    )
    p.add_argument(
        "--pack-budget",
        type=non_negative_float,
        default=DEFAULT_PACK_BUDGET,
        help="sliced engine: hold weight packs up to this fraction of the blocks' attention+MLP weight "
        "bytes, gather the rest at each use (default: %(default)s)",
    )


def _add_routing_options(p: argparse.ArgumentParser) -> None:
    """Router calibration for models without trained routers, and the timesteps planned."""
    p.add_argument(
        "--rho",
        type=unit_interval,
        default=0.5,
        help="target FLOPs ratio for calibrated routers (ignored with trained routers; default 0.5)",
    )
    p.add_argument(
        "--token-keep",
        type=unit_interval,
        default=0.75,
        help="fraction of tokens the calibrated token routers keep (default: 0.75)",
    )
    p.add_argument(
        "--timesteps",
        type=_int_list,
        default=(999, 749, 499, 249),
        help="timesteps cycled through by the forward timing (default: 999,749,499,249)",
    )


def _add_timing_options(p: argparse.ArgumentParser) -> None:
    """How the timing is done: repeats, statistic, warm-up, the full-sampler timing, input size."""
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per mode (default: 5)")
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic of the timed repeats behind ms/forward and the speed-ups; min is the more "
        "robust on a CPU shared with other jobs (default: median; the JSON holds both)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per mode first (default: 1)")
    p.add_argument(
        "--sampler-steps",
        type=int,
        default=0,
        help="also time a full DDIM sampler with this many steps (default: 0 = off)",
    )
    p.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=1.5,
        help="classifier-free guidance scale; != 1 doubles the rows (default: 1.5)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image size in pixels (latent = size/8 for 4-channel models; default: preset)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Threads, seed, output."""
    p.add_argument(
        "--threads", type=thread_count, default=None, help="CPU threads for torch (default: torch's)"
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed for weights, inputs and calibration (default: 0)"
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the rows as JSON to PATH (a regular file; its folder must exist)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")


def config_from_args(args: argparse.Namespace):
    from dydit.apps.bench import DEFAULT_MODEL, BenchConfig
    from dydit.presets import get_model_config, get_uvit_config, is_flux_name, is_uvit_name

    modes = tuple(args.modes)
    if args.compile:
        modes += tuple(m for m in ("dense-compiled", "sliced-compiled") if m not in modes)
    input_size = None
    if args.image_size is not None:
        name = args.model or DEFAULT_MODEL
        base = (get_uvit_config if is_uvit_name(name) else get_model_config)(name)
        latent = base.in_channels == 4 or hasattr(base, "max_text_length")  # a VAE's latents (DiT, FLUX)
        input_size = args.image_size // 8 if latent else args.image_size
    return BenchConfig(
        model=args.model,
        checkpoint=args.checkpoint,
        batches=args.batch,
        dtype=args.dtype,
        device=resolve_device(args.device),
        modes=modes,
        rho=args.rho,
        token_keep=args.token_keep,
        timesteps=args.timesteps,
        repeats=args.repeats,
        warmup=args.warmup,
        sampler_steps=args.sampler_steps,
        cfg_scale=1.0 if is_flux_name(args.model or "") else args.cfg_scale,  # FLUX embeds its guidance
        seed=args.seed,
        compile_mode=args.compile_mode,
        token_bucket=args.token_bucket,
        pack_budget=args.pack_budget,
        stat=args.stat,
        input_size=input_size,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from dydit.apps.bench import run_bench
    from dydit.apps.bench_report import bench_report, write_json
    from dydit.io import output_target

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    if args.json:
        output_target(args.json)  # a device, a folder or a missing folder: refused before the timing
    if args.dry_run:
        print(cfg)
        return 0
    rows = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(bench_report(cfg, rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {len(rows)} rows to {args.json}", file=sys.stderr)
    return 0
