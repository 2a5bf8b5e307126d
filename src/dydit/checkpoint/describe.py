"""``dydit inspect``: one screen saying what a checkpoint is and which model it loads into."""

from __future__ import annotations

import functools
import json
import os
import textwrap
from collections.abc import Mapping
from typing import Any

import torch

from dydit.checkpoint.flux_load import describe_flux
from dydit.checkpoint.formats import Checkpoint, open_checkpoint
from dydit.checkpoint.load import fit_problem, model_config
from dydit.checkpoint.lora_info import lora_facts, lora_file_of
from dydit.checkpoint.uvit import uvit_architecture, uvit_process_text
from dydit.errors import CheckpointError, DyditError
from dydit.models.fitting import ROUTER_KEY_MARKERS, has_routers
from dydit.presets import FluxConfig, ModelConfig, UViTConfig, config_from_dict, preset_name

_WIDTH = 100
_SHIFT_NAMES = {0: "official DiT", 1: "diffusers"}


def _row(label: str, text: str, hyphens: bool = True) -> str:
    """One labelled row, wrapped; ``hyphens=False`` keeps words such as --merge-lora whole."""
    return textwrap.fill(
        text, _WIDTH, initial_indent=f"{label:<12}", subsequent_indent=" " * 12, break_on_hyphens=hyphens
    )


def _config_origin(ckpt: Checkpoint, model: str | None) -> str:
    if ckpt.config is not None:
        return (
            "read from diffusers' config.json"
            if ckpt.format == "diffusers"
            else "stored in the file by dydit"
        )
    if model:
        return f"preset {model} (given), sizes from the shapes"
    if ckpt.args and isinstance(ckpt.args.get("model"), str):
        return f"training args (model {ckpt.args['model']}) and the shapes"
    return "the preset the shapes match, sizes from the shapes"


def _architecture(cfg: ModelConfig | UViTConfig) -> str:
    if isinstance(cfg, UViTConfig):  # docs/METHOD.md §16
        return uvit_architecture(cfg)
    sigma = ", learn_sigma" if cfg.learn_sigma else ""
    return (
        f"{preset_name(cfg) or 'no preset (custom architecture)'}: "
        f"{'DyDiT' if cfg.dynamic else 'DiT'}, {cfg.depth} blocks, width {cfg.hidden_size}, "
        f"{cfg.num_heads} heads, patch {cfg.patch_size}, input {cfg.in_channels}x{cfg.input_size}x"
        f"{cfg.input_size}, {cfg.num_classes} classes, {cfg.out_channels} output channels{sigma}"
    )


def _objective(cfg: ModelConfig | UViTConfig) -> str:
    if isinstance(cfg, UViTConfig):
        return uvit_process_text(cfg)
    if cfg.objective == "ddpm":
        return "ddpm (epsilon prediction; the DDPM/DDIM/DPM-Solver samplers apply)"
    return (
        f"flow (SiT flow matching, {cfg.flow_path} path, {cfg.flow_prediction} prediction; "
        "the euler/heun/sde/adaptive samplers apply)"
    )


def _routers(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> str:
    if not cfg.dynamic:
        return f"none (a plain {getattr(cfg, 'family', 'DiT')}; `dydit finetune` adds fresh routers)"
    if not has_routers(sd):
        return "none in the file: a DyDiT built from these weights starts with fresh routers"
    h = cfg.num_heads
    if cfg.router_layout == "forced_first":
        return (
            f"layout forced_first: width routers with H-1 = {h - 1} outputs, head and MLP group 0 always on"
        )
    return f"layout all: width routers with H = {h} outputs, no index forced (Dec-2024 release)"


def _args_text(args: Mapping[str, Any]) -> str:
    first = ("model", "image_size", "num_classes")
    keys = [k for k in first if k in args] + sorted(k for k in args if k not in first)
    return " ".join(f"{k}={args[k]!r}" if isinstance(args[k], str) else f"{k}={args[k]}" for k in keys)


def describe_checkpoint(path: str | os.PathLike, model: str | None = None, weights: str = "ema") -> list[str]:
    """The lines ``dydit inspect`` prints for ``path`` (CheckpointError if it cannot be read)."""
    return inspect_checkpoint(path, model, weights)[0]


def _flux_rows(ckpt: Checkpoint, cfg: FluxConfig, config: object) -> list[str]:
    """The model rows of a FLUX (docs/METHOD.md §15)."""
    sd = ckpt.state_dict
    origin = (
        "the config.json given"
        if config is not None
        else "read from diffusers' config.json"
        if ckpt.format == "flux_diffusers"
        else "stored in the file by dydit"
        if ckpt.config is not None
        else "the preset named"
    )
    token = any("token_selection." in k for k in sd)
    if not cfg.dynamic:
        routers = "none (a plain FLUX)"
    elif not (token or any(".attn_rate." in k for k in sd)):
        routers = "none in the file: a DyFLUX built from these weights starts with routers keeping everything"
    else:
        routers = "token routers (the released DyFLUX's) in every double and single block" + (
            "; width routers over heads and MLP groups" if cfg.width_routing else "; no width routers"
        )
    return [
        _row("model", describe_flux(cfg)),
        _row("config", origin),
        _row("routers", routers),
        _row("objective", "flow matching (FLUX: rectified flow, velocity prediction, t in [0, 1])"),
    ]


def _blocks_text(blocks: list[int], depth: int | None) -> str:
    if not blocks:
        return "no block"
    run = blocks == list(range(blocks[0], blocks[-1] + 1))
    listed = f"{blocks[0]}-{blocks[-1]}" if run and len(blocks) > 1 else ", ".join(map(str, blocks))
    of = f" (all {depth})" if depth == len(blocks) else f" ({len(blocks)} of {depth})" if depth else ""
    return f"block{'s' if len(blocks) > 1 else ''} {listed}{of}"


def _lora_rows(facts: dict[str, Any]) -> list[str]:
    """The lines of a TD-LoRA file (docs/METHOD.md §18): what it is, its adapters, the base it fits."""
    row = functools.partial(_row, hyphens=False)  # commands and paths stay whole
    lc, layers, base, n = facts["lora"], facts["layers"], facts["base"], facts["parameters"]
    alpha = "alpha = rank" if lc["alpha"] is None else f"alpha {lc['alpha']:g}"
    linears = ", ".join(layers["linears"])
    if not layers["same_in_every_block"]:
        linears += " (not in every block)"
    try:
        cfg = config_from_dict(facts["model"])
        model = describe_flux(cfg) if isinstance(cfg, FluxConfig) else _architecture(cfg)
    except (DyditError, TypeError):
        model = "unreadable stored config"
    if not base["path"]:
        expects = "none named: give the base weights (--checkpoint / --base)"
    else:
        state = (
            "missing: give the base weights (--checkpoint / --base)"
            if not base["exists"]
            else "present, sha256 matches"
            if base["matches"]
            else "present but CHANGED since the fine-tune: sha256 differs"
            if base["matches"] is False
            else "present (not hashed)"
        )
        expects = f"{base['path']} ({state}); sha256 {base['sha256'] or 'not recorded'}"
    what = "the adapters and routers of a dydit finetune --lora run, saved apart from the base weights"
    groups = f"rank {lc['rank']} in {lc['groups']} group(s) of {lc['rank_per_group']}"
    adapted = f"{linears} ({layers['adapted_linears']} adapted linears)"
    rows = [
        row("format", f"TD-LoRA adapter file: {what} (docs/METHOD.md §18)"),
        row("adapters", f"{groups} switched by a timestep router per block; {alpha} (scale {lc['scale']:g})"),
        row("layers", f"{_blocks_text(layers['blocks'], layers['depth'])}: {adapted}"),
        row("model", model),
        row("base", expects),
    ]
    parts = [f"{n['adapters']:,} adapters", f"{n['adapter_routers']:,} adapter routers"]
    parts.append(f"{n['dydit_routers']:,} DyDiT routers")
    text = f"{n['file']:,} in the file ({', '.join(parts)})"
    if n["trainable_fraction"] is not None:
        text += f"; base {n['base']:,}; trainable {100 * n['trainable_fraction']:.3g}% of {n['model']:,}"
    rows.append(row("parameters", text))
    problem = facts["problem"]
    fits = "onto the base: every adapter and router, shapes as the stored config"
    rows.append(row("loads", fits if problem is None else f"NO: {problem}"))
    if facts["step"] is not None:
        rows.append(row("step", f"{facts['step']:,}"))
    train = facts["train"]
    if isinstance(train, dict):
        keys = ("model", "data", "steps", "batch_size", "lr", "target", "lora_rank", "lora_groups")
        rows.append(row("run", " ".join(f"{k}={json.dumps(train[k])}" for k in keys if k in train)))
    rows += [row("sample", facts["usage"]["sample"]), row("merge", facts["usage"]["merge"])]
    return rows


def inspect_checkpoint(
    path: str | os.PathLike, model: str | None = None, weights: str = "ema", config: object = None
) -> tuple[list[str], str | None]:
    """(the lines of :func:`describe_checkpoint`, why the weights do not load, or None if they load
    strictly into the model dydit builds for them). A TD-LoRA file is described as one
    (:func:`dydit.checkpoint.lora_info.lora_facts`); it "loads" when it fits its stored config."""
    if lora_file_of(path) is not None:
        facts = lora_facts(path)
        return [_row("file", facts["file"]), *_lora_rows(facts)], facts["problem"]
    ckpt = open_checkpoint(path, weights)
    sd = ckpt.state_dict
    lines = [_row("file", ckpt.source), _row("format", ckpt.description)]
    if ckpt.entry is not None:
        lines.append(_row("weights", f"the '{ckpt.entry}' entry"))
    problem: str | None = None
    try:
        cfg: ModelConfig | FluxConfig | None = model_config(ckpt, model, config=config)
    except CheckpointError as e:
        cfg = None
        problem = f"no model found for it: {e}"
        lines.append(_row("model", f"unknown: {e}"))
    if isinstance(cfg, FluxConfig):
        lines += _flux_rows(ckpt, cfg, config)
        problem = fit_problem(cfg, sd)
        lines.append(_row("loads", "strictly, every key and shape" if problem is None else f"NO: {problem}"))
    elif cfg is not None:
        shift = cfg.timestep_freq_shift
        lines += [
            _row("model", _architecture(cfg)),
            _row("config", _config_origin(ckpt, model)),
            _row("routers", _routers(cfg, sd)),
            _row("objective", _objective(cfg)),
            _row(
                "numerics",
                f"timestep features of the {_SHIFT_NAMES[shift]} code (frequency shift {shift}); "
                f"LayerNorm eps before the MLP {cfg.mlp_norm_eps:g}",
            ),
        ]
        problem = fit_problem(cfg, sd)
        lines.append(_row("loads", "strictly, every key and shape" if problem is None else f"NO: {problem}"))
    total = sum(v.numel() for v in sd.values())
    routers = sum(v.numel() for k, v in sd.items() if any(m in k for m in ROUTER_KEY_MARKERS))
    lines.append(
        _row(
            "parameters",
            f"{total:,} in {len(sd)} tensors" + (f" ({routers:,} in routers)" if routers else ""),
        )
    )
    if ckpt.step is not None:
        named = ckpt.format == "training_dict"
        lines.append(_row("step", f"{ckpt.step:,}" + (" (from the file name)" if named else "")))
    if ckpt.config is not None and ckpt.format not in ("diffusers", "flux_diffusers"):
        run = ckpt.run_config or {}
        stored = run["model"] if isinstance(run.get("model"), dict) else run
        lines.append(_row("stored", " ".join(f"{k}={json.dumps(v)}" for k, v in stored.items())))
        train = run.get("train")
        if isinstance(train, dict):
            keys = ("model", "data", "steps", "batch_size", "lr", "target", "init_from")
            lines.append(_row("run", " ".join(f"{k}={json.dumps(train[k])}" for k in keys if k in train)))
    if ckpt.args:
        lines.append(_row("args", _args_text(ckpt.args)))
    return lines, problem
