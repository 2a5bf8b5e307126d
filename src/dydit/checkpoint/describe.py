"""``dydit inspect``: one screen saying what a checkpoint is and which model it loads into."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping
from typing import Any

import torch

from dydit.checkpoint.flux_load import describe_flux
from dydit.checkpoint.formats import Checkpoint, open_checkpoint
from dydit.checkpoint.load import fit_problem, model_config
from dydit.checkpoint.uvit import uvit_architecture, uvit_process_text
from dydit.errors import CheckpointError
from dydit.models.fitting import ROUTER_KEY_MARKERS, has_routers
from dydit.presets import FluxConfig, ModelConfig, UViTConfig, preset_name

_WIDTH = 100
_SHIFT_NAMES = {0: "official DiT", 1: "diffusers"}


def _row(label: str, text: str) -> str:
    return textwrap.fill(text, _WIDTH, initial_indent=f"{label:<12}", subsequent_indent=" " * 12)


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


def inspect_checkpoint(
    path: str | os.PathLike, model: str | None = None, weights: str = "ema", config: object = None
) -> tuple[list[str], str | None]:
    """(the lines of :func:`describe_checkpoint`, why the weights do not load, or None if they load
    strictly into the model dydit builds for them)."""
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
