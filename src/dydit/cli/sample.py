"""``dydit sample``: class-conditional samples from a checkpoint or preset (docs/METHOD.md §1.3, §7.1, §7.2).

A thin layer over :mod:`dydit.sample`. Writes a class-labelled grid PNG; with ``--out-dir`` also one
file per image (resumable: rerun the command) and, with ``--npz``, an ADM-format ``.npz`` for FID.
A DyDiT runs the sliced engine unless ``--execution`` says otherwise (the execution is printed and
recorded in the sample directory); ``--compile``, ``--token-bucket`` and ``--pack-budget`` are the
engine's options (:func:`dydit.models.sliced.engine`). Without ``--checkpoint`` the weights would
be random: that needs ``--random-weights``.
Image i has seed ``--seed + i``, so results do not depend on ``--batch-size`` or on the number of
processes; the same command runs under ``torchrun --nproc_per_node=N`` (gloo on CPU).

A text-to-image model that owns its text encoder (``FLUX-t2i``, docs/METHOD.md §17.6) samples
``--prompt`` / ``--prompts FILE`` instead of classes (cycled over the images; unknown words are a
one-line error naming them) and writes ``prompts.txt`` beside the PNGs of ``--out-dir``, one prompt a
line in image order, so that ``dydit evaluate --geneval OUT_DIR`` scores the folder. Sampler, steps
and guidance default to the model's own recipe (its config's ``recipe_*`` fields).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dydit.cli._common import engine_options, resolve_device
from dydit.cli._sample_args import (  # noqa: F401  (DEFAULT_*, _steps, _add_model_group: cli.cache)
    DEFAULT_CFG_SCALE,
    DEFAULT_DYDIT_EXECUTION,
    DEFAULT_GRID,
    DEFAULT_NUM_SAMPLES,
    GRID_MAX,
    MAX_NUM_SAMPLES,
    _add_model_group,
    _add_output_group,
    _add_sampling_group,
    _steps,
    cache_settings,
)
from dydit.errors import DyditError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images: a labelled grid, optionally per-image PNGs and an FID .npz",
        description="Sample class-conditional images with DDPM, DDIM or DPM-Solver++(2M) and classifier-free "
        "guidance. Weights come from --checkpoint, any format `dydit inspect` reads (its stored config, "
        "else --model, else its training args, else the preset its shapes match) or, without a "
        "checkpoint, are the random initialisation of --model (only with --random-weights). A DyDiT "
        "runs the sliced engine by default.",
    )
    _add_model_group(p)
    _add_sampling_group(p)
    _add_output_group(p)
    p.set_defaults(func=run)


def _model_config(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(ModelConfig, opened Checkpoint or None, description of the weights)."""
    from dydit.cli._common import model_config_from_args, size_overrides

    if getattr(args, "lora", None):
        return _lora_model_config(args)
    if args.checkpoint is None:
        if args.model is None:
            raise DyditError("give --checkpoint or --model")
        cfg = model_config_from_args(args)  # an unknown --model is named first
        if not args.random_weights:
            raise DyditError(
                f"no --checkpoint: --model {args.model} alone has random weights; give --checkpoint, "
                "or --random-weights to sample the random initialisation"
            )
        return cfg, None, f"random initialisation of {args.model}"
    if args.random_weights:
        raise DyditError("--random-weights samples without a checkpoint: drop it or --checkpoint, not both")
    from dydit.checkpoint import model_config, open_checkpoint

    ckpt = open_checkpoint(args.checkpoint)
    cfg = model_config(ckpt, args.model)
    sizes = size_overrides(cfg, args.image_size, args.num_classes)
    return (cfg.replace(**sizes) if sizes else cfg), ckpt, str(Path(args.checkpoint).resolve())


def _lora_model_config(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(the DyDiT config a TD-LoRA file stores, of any family, its base opened, a description) for
    ``--lora``."""
    from dydit.checkpoint import open_checkpoint
    from dydit.checkpoint.lora import read_lora, stored_model_config

    if args.random_weights:
        raise DyditError("--lora applies adapters to real base weights, not to --random-weights")
    _, _, stored = read_lora(args.lora)
    base = args.checkpoint or stored.get("base")
    if not base:
        raise DyditError(f"{args.lora} names no base weights: give --checkpoint")
    cfg = stored_model_config(stored)
    return cfg, open_checkpoint(base), f"{Path(base).resolve()} + TD-LoRA {Path(args.lora).resolve()}"


def _execution(requested: str | None, cfg: Any) -> str:
    """The execution a model runs: a DyDiT's (default sliced) or ``dense`` for a DiT."""
    from dydit.models.dydit import EXECUTION_MODES

    if not cfg.dynamic:
        if requested is not None:
            raise DyditError("--execution applies to DyDiT models only")
        return "dense"
    mode = DEFAULT_DYDIT_EXECUTION if requested is None else requested
    if mode not in EXECUTION_MODES:
        raise DyditError(f"--execution {mode!r}: choose one of {', '.join(EXECUTION_MODES)}")
    return mode


def _build_model(cfg: Any, ckpt: Any, execution: str) -> Any:
    from dydit.checkpoint import load_model
    from dydit.factory import build_model

    model = build_model(cfg) if ckpt is None else load_model(ckpt, cfg)
    if model.config.dynamic:
        model.execution = execution
    return model.eval()


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the run needs, validated; what --dry-run prints."""
    from dydit import distributed
    from dydit.flow import create_process
    from dydit.sample import resolve_labels

    cfg, ckpt, source = _model_config(args)
    execution = _execution(args.execution, cfg)
    options = engine_options(args, execution)
    text = is_text_model(cfg)
    settings = _settings(args, cfg, default_steps=250)
    prompts = _prompts(args, cfg)
    _check_guidance(cfg, settings)
    if text and args.classes is not None:
        raise DyditError("a text-to-image model takes --prompt or --prompts, not --classes")
    n = args.num_samples or len(prompts or args.classes or [None] * DEFAULT_NUM_SAMPLES)
    if n > MAX_NUM_SAMPLES:
        raise DyditError(f"--num-samples {n} is more than {MAX_NUM_SAMPLES:,} images; split the run")
    seeds = list(range(args.seed, args.seed + n))
    if text:
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        labels = None
    else:
        labels = None if args.classes is None else [args.classes[i % len(args.classes)] for i in range(n)]
        labels = resolve_labels(seeds, labels, _label_classes(cfg))
    diffusion = create_process(cfg)  # the process the checkpoint's config names: DDPM or flow
    timesteps = settings.network_times(diffusion)  # the sampler must fit the process
    if args.vae is not None:
        codec = args.vae
    elif _sample_shape(cfg)[0] in (1, 3):
        codec = "pixel"
    else:
        codec = None
        if args.out_dir is None:
            raise DyditError(
                f"a {_sample_shape(cfg)[0]}-channel latent model needs --vae to make images; "
                "or pass --out-dir to save raw latents"
            )
    if args.out_dir is None and n > GRID_MAX:
        raise DyditError(
            f"without --out-dir only a grid of at most {GRID_MAX} images is made; got {n} samples"
        )
    if args.npz is not None and (args.out_dir is None or codec is None):
        raise DyditError("--npz packs the PNGs of --out-dir; give --out-dir (and --vae for a latent model)")
    npz = (args.npz or str(Path(args.out_dir).with_suffix(".npz"))) if args.npz is not None else None
    cache = cache_settings(args)
    grid = args.grid or (_beside(args.out_dir, ".png") if args.out_dir is not None else DEFAULT_GRID)
    return {
        "weights": source,
        "model": cfg.to_dict(),
        "sampling": settings.to_dict(),
        "timesteps": _describe_times(timesteps, settings),
        "num_samples": n,
        "seeds": f"{seeds[0]}..{seeds[-1]}",
        "labels": None if labels is None else labels.tolist()[:GRID_MAX] + (["..."] if n > GRID_MAX else []),
        "prompts": None if prompts is None else prompts[:GRID_MAX] + (["..."] if n > GRID_MAX else []),
        "codec": codec,
        "execution": execution,
        "engine": options if execution == "sliced" else None,
        "cache": None if cache is None else {"spec": cache.spec, "coefficients": list(cache.coefficients)},
        "batch_size": args.batch_size,
        "device": args.device,
        "world_size": distributed.world_size(),
        "grid": grid if codec is not None else None,
        "out_dir": args.out_dir,
        "npz": npz,
        "_objects": (cfg, ckpt, settings, seeds, labels, diffusion, cache, prompts),
    }


def _settings(args: argparse.Namespace, cfg: Any, default_steps: int) -> Any:
    """The SamplingSettings of the sampling options; what they leave out is a text-to-image model's
    own recipe (its config's ``recipe_*`` fields), else the family's sampler, ``default_steps`` and
    DEFAULT_CFG_SCALE. ``dydit cache-calibrate`` resolves through here too: its fit must follow the
    trajectories ``dydit sample`` will run."""
    from dydit.sample import SamplingSettings

    if is_text_model(cfg):
        recipe = (cfg.recipe_sampler, cfg.recipe_steps, cfg.recipe_guidance)
    else:
        sampler = getattr(cfg, "default_sampler", "euler" if cfg.objective == "flow" else "ddpm")  # U-ViT
        recipe = (sampler, default_steps, DEFAULT_CFG_SCALE)
    return SamplingSettings(
        sampler=args.sampler or recipe[0],
        steps=recipe[1] if args.steps is None else args.steps,
        cfg_scale=recipe[2] if args.cfg_scale is None else args.cfg_scale,
        guidance_channels=args.guidance_channels,
        eta=getattr(args, "eta", None),
        clip_denoised=getattr(args, "clip_denoised", False),
    )


def _check_guidance(cfg: Any, settings: Any) -> None:
    """Guidance needs the unconditional branch the model was trained with: a null class or caption."""
    if settings.cfg_scale == 1:
        return
    if not is_text_model(cfg) and cfg.class_dropout_prob == 0:
        raise DyditError("this model has no null-class embedding (class_dropout_prob 0); use --cfg-scale 1")
    if is_text_model(cfg) and cfg.caption_dropout == 0:
        raise DyditError(
            "this model was trained without caption dropout (no null caption); use --cfg-scale 1"
        )


def is_text_model(cfg: Any) -> bool:
    """Whether ``cfg`` is a text-to-image model that owns its text encoder (docs/METHOD.md §17.6)."""
    return getattr(cfg, "text_encoder", None) is not None


def _tokenizer(cfg: Any) -> Any:
    from dydit.models.flux import text_encoder_config
    from dydit.text import WordTokenizer

    tc = text_encoder_config(cfg)
    return WordTokenizer(tc.vocab, tc.max_length)


def _prompts(args: argparse.Namespace, cfg: Any) -> list[str] | None:
    """The prompts of ``--prompt`` and ``--prompts FILE`` (checked against the model's vocabulary)."""
    if args.prompt is None and args.prompts is None:
        if is_text_model(cfg):
            raise DyditError("a text-to-image model needs --prompt TEXT or --prompts FILE")
        return None
    if not is_text_model(cfg):
        raise DyditError("--prompt and --prompts need a text-to-image model (one with its own text encoder)")
    from dydit.data.compose_grammar import read_prompts

    tokenizer = _tokenizer(cfg)
    prompts = [" ".join(tokenizer.check(p)) for p in args.prompt or []]
    if args.prompts is not None:
        prompts += read_prompts(args.prompts, tokenizer)
    if not prompts:
        raise DyditError("--prompt needs a non-empty prompt")
    return prompts


def _sample_shape(cfg: Any) -> tuple[int, int, int]:
    """(C, H, W) of one sample in model space (a FLUX's before its packing)."""
    if hasattr(cfg, "latent_channels"):
        return (cfg.latent_channels, cfg.sample_size, cfg.sample_size)
    return (cfg.in_channels, cfg.input_size, cfg.input_size)


def _label_classes(cfg: Any) -> int:
    """Classes to draw labels from: an unconditional U-ViT (``num_classes`` 0) ignores them (all 0)."""
    return max(cfg.num_classes, 1)


def _beside(directory: str, suffix: str) -> str:
    """``runs/samples`` -> ``runs/samples.png``: a file next to a directory, named after it (not
    inside it, where `dydit evaluate DIR` would count it as a sample)."""
    path = Path(directory)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if not path.name:  # the root directory
        raise DyditError(f"give --grid: no default grid file beside {directory}")
    return str(path.with_name(path.name + suffix))


def _describe_times(times: list[float], settings: Any) -> str:
    if settings.flow:
        if not times:
            return "flow times chosen by the adaptive solver"
        if max(times) > 1:  # a U-ViT's VP-SDE: the network sees 999 (1 - t) (docs/METHOD.md §16.2)
            return f"{len(times)} network times {times[0]:g}..{times[-1]:g} (999 s: 999 noise, 0 data)"
        return f"{len(times)} flow times {times[0]:g}..{times[-1]:g} (t = 0 noise, 1 data)"
    return f"{len(times)} original timesteps {int(times[0])}..{int(times[-1])}"


def run(args: argparse.Namespace) -> int:
    from dydit import distributed
    from dydit.io import output_target

    resolve_device(args.device)  # a clear error for cuda without CUDA
    plan = _resolve(args)
    cfg, ckpt, settings, seeds, labels, diffusion, cache, prompts = plan.pop("_objects")
    for path in (plan["grid"], plan["npz"]):  # a device, a folder, a missing folder: refused up front
        if path is not None:
            output_target(path, tree=args.out_dir)
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    device = distributed.init(args.device)
    _sample(args, plan, cfg, ckpt, settings, seeds, labels, diffusion, device, cache, prompts)
    return 0


def _sample(
    args, plan, cfg, ckpt, settings, seeds, labels, diffusion, device, cache=None, prompts=None
) -> None:
    import numpy as np

    from dydit import distributed
    from dydit.data.codec import make_codec
    from dydit.sample import image_name, load_png, sample_images, sample_to_dir, save_grid
    from dydit.train import configure_torch

    if device.startswith("cuda"):
        configure_torch(tf32=True)  # as DiT's sampling scripts
    model = _build_model(cfg, ckpt, plan["execution"])
    if getattr(args, "lora", None):  # adapters and routers onto the base (docs/METHOD.md §18)
        from dydit.checkpoint.lora import apply_lora

        execution = model.execution
        model = apply_lora(model, args.lora)
        model.execution = execution
    model = model.to(device)
    if plan["execution"] == "sliced":  # options: an engine of its own instead of the model's default one
        from dydit.models.sliced import engine

        model = engine(model, **plan["engine"]) if plan["engine"] else model  # generate plans its times
    codec = make_codec(plan["codec"], device) if plan["codec"] is not None else None
    shape = _sample_shape(cfg)
    condition = None if prompts is None else _tokenizer(cfg)(prompts)
    common = dict(
        seeds=seeds,
        labels=labels,
        condition=condition,
        shape=shape,
        num_classes=_label_classes(cfg),
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    say = print if distributed.is_main() else (lambda *a, **k: None)
    say(_execution_line(cfg, plan["execution"]), file=sys.stderr)
    if cache is not None:  # step caching around the network (docs/METHOD.md §19)
        from dydit.models.cache import StepCache

        model = StepCache(model, cache)
        say(f"cache: {cache.spec} (one decision per batch of <= {args.batch_size} images)", file=sys.stderr)
    if args.out_dir is not None:
        meta = {"weights": plan["weights"], "model": plan["model"]}
        if cfg.dynamic:  # dense computes other images than masked/sliced: never mix them in one directory
            meta["execution"] = plan["execution"]
        if cache is not None:  # cached images differ too, and depend on the batch size
            meta["cache"] = {**plan["cache"], "batch_size": args.batch_size}
        res = sample_to_dir(
            model,
            diffusion,
            settings,
            args.out_dir,
            codec=codec,
            save_raw=args.save_raw,
            npz_path=plan["npz"],
            meta=meta,
            **common,
        )
        if prompts is not None and distributed.is_main():  # after the manifest check: never clobbered
            _write_prompts(args.out_dir, prompts)
        say(f"{args.out_dir}: {len(seeds)} images ({res.skipped} already there)", file=sys.stderr)
        _cache_line(model, say)
        if res.npz is not None:
            say(f"wrote {res.npz}", file=sys.stderr)
        if codec is None or not distributed.is_main():
            return
        n = min(len(seeds), GRID_MAX)
        images = np.stack([load_png(Path(args.out_dir) / image_name(i, ".png")) for i in range(n)])
        grid_labels = None if labels is None else labels[:n].numpy()
    else:
        common.update(seeds=seeds[:GRID_MAX], labels=None if labels is None else labels[:GRID_MAX])
        if condition is not None:
            common.update(condition=condition.select(list(range(min(len(seeds), GRID_MAX)))))
        images, grid_labels = sample_images(model, diffusion, settings, codec, **common)
        grid_labels = None if labels is None else grid_labels
        _cache_line(model, say)
    if distributed.is_main():
        save_grid(plan["grid"], images, grid_labels)
        say(f"wrote {plan['grid']}", file=sys.stderr)


def _write_prompts(out_dir: str, prompts: list[str]) -> None:
    """``prompts.txt`` in ``out_dir``: image i's prompt on line i (what ``--geneval`` reads)."""
    from dydit.evaluate.geneval import PROMPTS_FILE
    from dydit.io import save_text

    save_text(Path(out_dir) / PROMPTS_FILE, "".join(p + "\n" for p in prompts), parents=True)


def _execution_line(cfg: Any, execution: str) -> str:
    if not cfg.dynamic:
        return f"execution: dense (a {getattr(cfg, 'family', 'DiT')})"
    note = {"sliced": "switched-off work skipped", "masked": "masks, no faster than dense",
            "dense": "the full network, routers ignored"}[execution]  # fmt: skip
    return f"execution: {execution} (DyDiT: {note}; --execution sliced|masked|dense)"


def _cache_line(model: Any, say: Any) -> None:
    stats = getattr(model, "stats", None)
    if stats is not None:
        say(f"cache: {stats.summary()}", file=sys.stderr)
