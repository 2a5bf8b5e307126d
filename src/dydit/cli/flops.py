"""``dydit flops``: MACs of one forward pass for one image, in GFLOPs (1 FLOP = 1 MAC).

Without ``--checkpoint``: the static per-component table of a preset (METHOD.md §1.1). With a DyDiT
checkpoint: the realised FLOPs per sampling timestep and their average over a sampler's schedule
(METHOD.md §7.3). Width masks come from the routers at each original timestep; token keep rates
are measured on real forward passes along a sampling trajectory. A plain DiT checkpoint gets the
static table of its architecture.
"""

from __future__ import annotations

import argparse

from dydit.cli._common import add_model_options, non_negative_float, positive_int, resolve_device, seed_int
from dydit.errors import DyditError

DEFAULT_MODEL = "DiT-XL/2"
_SAMPLER_NAMES = "ddpm, ddim, dpm++2m"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="print a per-component FLOPs table (MAC convention: DiT-XL/2 @256 = 118.6 G)",
        description="Print the per-component FLOPs (multiply-accumulates) of one forward pass for one image. "
        "With a DyDiT --checkpoint, report its FLOPs per sampling timestep and averaged over the schedule.",
    )
    add_model_options(p, default_model=None)
    p.add_argument(
        "--router-layout",
        choices=("forced_first", "all"),
        default=None,
        help="router layout of the DyDiT checkpoint (default: read from the router shapes)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampling steps: N evenly spaced original timesteps (DyDiT checkpoints; default 250)",
    )
    p.add_argument(
        "--sampler",
        default="ddpm",
        help=f"sampler that drives the measured trajectory: {_SAMPLER_NAMES} (default ddpm)",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=4,
        help="images sampled to measure the token keep rates (default 4)",
    )
    p.add_argument(
        "--cfg-scale",
        type=non_negative_float,
        default=1.5,
        help="classifier-free guidance scale of the measured trajectory (default 1.5; 1 = none)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampled images and labels")
    p.add_argument("--device", default="auto", help="device for the measured forward passes: auto, cpu, cuda")
    p.add_argument(
        "--per-timestep",
        action="store_true",
        help="also print one row per sampling timestep (DyDiT checkpoints)",
    )
    p.set_defaults(func=run)


def size_overrides(base, image_size: int | None, num_classes: int | None) -> dict[str, int]:
    """ModelConfig overrides for ``--image-size`` and ``--num-classes`` on top of ``base``."""
    overrides = {}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if image_size is not None:
        # Latent models (4 channels) see an 8x smaller latent; pixel models see the image itself.
        latent = base.in_channels == 4
        if latent and image_size % 8:
            raise DyditError(f"image size {image_size} must be divisible by 8 for a latent model")
        overrides["input_size"] = image_size // 8 if latent else image_size
    return overrides


def model_config_from_args(args: argparse.Namespace):
    from dydit.presets import get_model_config

    name = args.model or DEFAULT_MODEL
    return get_model_config(name, **size_overrides(get_model_config(name), args.image_size, args.num_classes))


def static_table(cfg) -> dict[str, int]:
    from dydit.flops.formulas import dit_macs_table

    return dit_macs_table(
        depth=cfg.depth,
        width=cfg.hidden_size,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        input_size=cfg.input_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        mlp_ratio=cfg.mlp_ratio,
    )


def print_static(title: str, cfg) -> None:
    table = static_table(cfg)
    total = sum(table.values())
    print(f"{title}: input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens")
    print("| component | GFLOPs | share |")
    print("|---|---:|---:|")
    for name, macs in table.items():
        print(f"| {name} | {macs / 1e9:.4f} | {100 * macs / total:.2f}% |")
    print(f"| **total** | **{total / 1e9:.2f}** | 100% |")


def run(args: argparse.Namespace) -> int:
    dynamic_opts = [
        o
        for o, v in (
            ("--steps", args.steps),
            ("--per-timestep", args.per_timestep),
            ("--router-layout", args.router_layout),
        )
        if v
    ]
    if args.checkpoint is None:
        if dynamic_opts:
            raise DyditError(f"{', '.join(dynamic_opts)} describe a DyDiT checkpoint; pass --checkpoint")
        print_static(args.model or DEFAULT_MODEL, model_config_from_args(args))
        return 0
    if args.image_size is not None or args.num_classes is not None:
        raise DyditError(
            "with --checkpoint, the image size and classes come from the checkpoint; "
            "drop --image-size/--num-classes"
        )

    from dydit.checkpoint import build_loaded, has_routers, model_config, open_checkpoint
    from dydit.presets import preset_name

    ckpt = open_checkpoint(args.checkpoint)
    layout = {"router_layout": args.router_layout} if args.router_layout else {}
    cfg = model_config(ckpt, args.model, **layout)
    if not has_routers(ckpt.state_dict):
        if dynamic_opts:
            raise DyditError(
                f"{args.checkpoint} is a plain DiT checkpoint (no router weights); "
                f"{', '.join(dynamic_opts)} apply to DyDiT checkpoints only"
            )
        print_static(preset_name(cfg.replace(dynamic=False)) or str(args.checkpoint), cfg)
        return 0
    model = build_loaded(ckpt, cfg)
    rows = measure_schedule(model, args)
    print_dynamic(model, rows, args)
    return 0


def measure_schedule(model, args: argparse.Namespace) -> list[dict]:
    """Run a sampler on ``model`` and collect per-timestep MACs (attention, MLP) and keep rates."""
    import torch

    from dydit.diffusion import SAMPLERS, create_diffusion, guided
    from dydit.diffusion.samplers import DEFAULT_STEPS
    from dydit.flops.analytic import per_sample_macs
    from dydit.flops.formulas import layer_costs

    if args.sampler not in SAMPLERS:
        raise DyditError(f"unknown sampler {args.sampler!r}; valid: {', '.join(SAMPLERS)}")
    cfg = model.config
    cfg.require_ddpm("measuring FLOPs along a DDPM sampling trajectory")
    if args.cfg_scale != 1.0 and cfg.class_dropout_prob == 0:
        raise DyditError("this model has no null class, so it cannot use guidance; pass --cfg-scale 1")
    device = torch.device(resolve_device(args.device))
    model.to(device).eval()
    attn_cost, mlp_cost = layer_costs(cfg.num_tokens, cfg.hidden_size, cfg.mlp_ratio)
    seen: dict[int, list] = {}

    def recording_model(x, t, y):
        out, stats = model.forward_with_routing(x, t, y)
        for tv in t.unique().tolist():  # the samplers use one timestep per call; be general anyway
            rows = t == tv
            h, g, k = stats.heads[rows], stats.groups[rows], stats.tokens[rows]
            seen.setdefault(int(tv), []).append(
                (per_sample_macs(h, g, k, attn_cost, 0), per_sample_macs(h, g, k, 0, mlp_cost), h, g, k)
            )
        return out

    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.samples)]
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    y = torch.randint(cfg.num_classes, (args.samples,), generator=torch.Generator().manual_seed(args.seed))
    fn = guided(recording_model, args.cfg_scale, null_class=cfg.num_classes)
    diffusion = create_diffusion(learn_sigma=cfg.learn_sigma)
    with torch.no_grad():
        SAMPLERS[args.sampler](
            fn,
            noise,
            diffusion,
            args.steps or DEFAULT_STEPS,
            model_kwargs=dict(y=y.to(device)),
            generators=gens,
        )
    rows = []
    for t in sorted(seen, reverse=True):
        parts = [torch.cat([p[i] for p in seen[t]]) for i in range(5)]
        attn, mlp, h, g, k = parts
        rows.append(
            dict(
                t=t,
                attn=attn.double().mean().item(),
                mlp=mlp.double().mean().item(),
                heads=h.float().mean().item(),
                groups=g.float().mean().item(),
                tokens=k.float().mean().item(),
            )
        )
    return rows


def print_dynamic(model, rows: list[dict], args: argparse.Namespace) -> None:
    from dydit.flops.formulas import linear_macs
    from dydit.presets import preset_name

    cfg = model.config
    table = static_table(cfg)
    dense = sum(table.values())
    other = dense - table["attention"] - table["mlp"]
    hidden = model.blocks[0].token_selection.hidden_layer.out_features
    # Token routers run on every token of every layer; width routers are precomputed per t (§7.3).
    n_tok = cfg.num_tokens
    router = cfg.depth * (linear_macs(n_tok, cfg.hidden_size, hidden) + linear_macs(n_tok, hidden, 1))
    static_core = table["attention"] + table["mlp"]
    name = args.model or preset_name(cfg) or "DyDiT"
    print(
        f"{name} checkpoint {args.checkpoint}: router layout {cfg.router_layout}, "
        f"input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens"
    )
    print(
        f"token keep rates measured on the {args.sampler} trajectory: {len(rows)} timesteps, "
        f"{args.samples} images, cfg scale {args.cfg_scale:g}, seed {args.seed}"
    )
    if args.per_timestep:
        print("| timestep | heads on | groups on | tokens kept | GFLOPs | attn+MLP ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            total = other + router + r["attn"] + r["mlp"]
            rates = " | ".join(f"{100 * r[k]:.1f}%" for k in ("heads", "groups", "tokens"))
            print(f"| {r['t']} | {rates} | {total / 1e9:.6g} | {(r['attn'] + r['mlp']) / static_core:.4f} |")
    n = len(rows)
    attn = sum(r["attn"] for r in rows) / n
    mlp = sum(r["mlp"] for r in rows) / n
    total = other + router + attn + mlp
    print("| component (mean over the schedule) | GFLOPs | share |")
    print("|---|---:|---:|")
    for label, macs in (
        ("embedders, adaLN, final layer", other),
        ("attention", attn),
        ("mlp", mlp),
        ("token routers", router),
    ):
        print(f"| {label} | {macs / 1e9:.6g} | {100 * macs / total:.2f}% |")
    print(f"| **total** | **{total / 1e9:.6g}** | 100% |")
    print(
        f"attn+MLP ratio {(attn + mlp) / static_core:.4f}; total {100 * total / dense:.2f}% of the dense "
        f"model's {dense / 1e9:.6g} GFLOPs"
    )
