"""One call from any checkpoint to the right model: :func:`load_model`.

The model config comes from, in this order: a :class:`~dydit.presets.ModelConfig` passed in; the
config the file stores (dydit's, or a diffusers ``config.json``), checked against a preset name
passed in; else a preset, named by the caller, by the training ``args`` of official scripts
(``args.model``, e.g. ``"SiT-XL/2"``) or by the shapes, with the input size, channels, classes and
``learn_sigma`` read from the shapes. Router weights make it a DyDiT with the router layout their
shapes say. Keyword overrides replace config fields last; the weights then load strictly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from dydit.checkpoint import flux_load as _flux
from dydit.checkpoint import uvit as _uvit
from dydit.checkpoint.formats import Checkpoint, open_checkpoint
from dydit.checkpoint.layout import (
    load_dydit_state_dict,
    with_router_layout,
)
from dydit.errors import CheckpointError, DyditError
from dydit.factory import build_model
from dydit.models.dit import KEYS
from dydit.models.dydit import DyDiT
from dydit.models.fitting import (
    ROUTER_KEY_MARKERS,
    fit_state_dict,
    guess_preset,
    has_routers,
    mismatch_message,
    size_mismatches,
)
from dydit.presets import (
    MODEL_NAMES,
    FluxConfig,
    ModelConfig,
    UViTConfig,
    get_model_config,
    is_sit_name,
    preset_name,
)

_log = logging.getLogger(__name__)

CheckpointSource = str | os.PathLike | Mapping[str, Any] | Checkpoint


def _as_checkpoint(source: CheckpointSource, weights: str = "ema") -> Checkpoint:
    return source if isinstance(source, Checkpoint) else open_checkpoint(source, weights)


def _args_preset(args: Mapping[str, Any] | None) -> tuple[str | None, bool]:
    """(preset named by official training args, whether they name a SiT)."""
    name = args.get("model") if args else None
    if not isinstance(name, str):
        return None, False
    return (name if name in MODEL_NAMES else None), is_sit_name(name)


def _sizes_from_shapes(
    base: ModelConfig, sd: Mapping[str, Tensor], args: Mapping[str, Any] | None
) -> ModelConfig:
    """``base`` with input size, channels, classes and learn_sigma read from the weights' shapes.

    The number of classes given in ``args`` tells whether the label table has a null-class row.
    """
    try:
        proj = sd[KEYS["patch"]]
        tokens = sd[KEYS["positions"]].shape[1]
        rows = sd[KEYS["labels"]].shape[0]
        outputs = sd[KEYS["output"]].shape[0]
    except (KeyError, IndexError):
        return base  # strict loading names what is missing
    p, in_ch = base.patch_size, proj.shape[1]
    classes = args.get("num_classes") if args else None
    dropout = base.class_dropout_prob
    if isinstance(classes, int) and not isinstance(classes, bool) and rows in (classes, classes + 1):
        num_classes, dropout = classes, (dropout or 0.1) if rows == classes + 1 else 0.0
    else:
        num_classes = rows - 1 if dropout > 0 else rows
    try:
        return base.replace(
            input_size=math.isqrt(tokens) * p,
            in_channels=in_ch,
            num_classes=num_classes,
            class_dropout_prob=dropout,
            learn_sigma=outputs == 2 * in_ch * p * p,
        )
    except DyditError:
        return base  # shapes that fit no config of this preset: strict loading names the mismatch


def _agree(name: str, stored: ModelConfig, source: str) -> ModelConfig:
    """``stored``, after checking that the preset ``name`` describes the same network."""
    want = get_model_config(name)
    arch = ("depth", "hidden_size", "num_heads", "patch_size", "objective")
    if any(getattr(want, f) != getattr(stored, f) for f in arch):
        mine = preset_name(stored.replace(dynamic=False)) or "a custom architecture"
        raise CheckpointError(
            f"checkpoint does not fit the model {name}: {source} stores the config of {mine} "
            f"(depth {stored.depth}, width {stored.hidden_size}, {stored.num_heads} heads, patch "
            f"{stored.patch_size}, objective {stored.objective})"
        )
    return stored.replace(dynamic=True) if want.dynamic else stored


def model_config(
    source: CheckpointSource,
    model: str | ModelConfig | None = None,
    *,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> ModelConfig:
    """The :class:`ModelConfig` :func:`load_model` builds for a checkpoint (see the module docstring).

    Args:
        source: a path, an in-memory state dict, or a :class:`Checkpoint` already opened.
        model: a preset name (``"SiT-XL/2"``, ``"DyDiT-S/2"``) or a full ModelConfig.
        config: a diffusers ``config.json`` (path, folder or dict) describing a FLUX file that
            stores none, as the released DyFLUX checkpoint (docs/METHOD.md §15).
        overrides: ModelConfig fields; ``router_layout`` must agree with the router shapes.
    """
    ckpt = _as_checkpoint(source)
    if _flux.wants_flux(ckpt, model, config):  # FLUX (docs/METHOD.md §15): checkpoint/flux_load.py
        return _flux.flux_model_config(ckpt, model, config, **overrides)
    if _uvit.wants_uvit(ckpt, model):  # U-ViT (docs/METHOD.md §16): checkpoint/uvit.py
        return _uvit.uvit_model_config(ckpt, model, **overrides)
    sd = ckpt.state_dict
    if isinstance(model, ModelConfig):
        cfg = model
    elif ckpt.config is not None:
        cfg = _agree(model, ckpt.config, ckpt.source) if model else ckpt.config
    else:
        named_sit = False
        if model is None:
            model, named_sit = _args_preset(ckpt.args)
        name = model or guess_preset(sd)
        if name is None:
            raise CheckpointError(
                f"cannot tell which model {ckpt.source} holds: it stores no config or training args and "
                "its shapes match no preset; name the model (--model, or model= of dydit.load_model)"
            )
        base = get_model_config(name)
        cfg = _sizes_from_shapes(base.replace(objective="flow") if named_sit else base, sd, ckpt.args)
    return with_router_layout(cfg, sd, ckpt.source, overrides)


# ModelConfig fields that the weights fix beyond their shapes: what they were trained for, and how.
WEIGHT_FIELDS: tuple[str, ...] = (
    "objective",
    "flow_path",
    "flow_prediction",
    "timestep_freq_shift",
    "mlp_norm_eps",
)


def weight_conventions(source: CheckpointSource) -> dict[str, Any]:
    """The :data:`WEIGHT_FIELDS` a checkpoint says (stored config, or SiT training args) where they
    differ from the defaults: overrides for a model named by preset that starts from these weights."""
    ckpt = _as_checkpoint(source)
    if ckpt.config is None:
        return {"objective": "flow"} if _args_preset(ckpt.args)[1] else {}
    if isinstance(ckpt.config, FluxConfig):  # a FLUX's conventions are its preset's (METHOD §17.6)
        return {}
    default = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {f: getattr(ckpt.config, f) for f in WEIGHT_FIELDS if getattr(ckpt.config, f) != default[f]}


def fit_problem(cfg: ModelConfig, sd: Mapping[str, Tensor]) -> str | None:
    """Why ``sd`` does not load strictly into ``cfg``'s model (None when it does), from shapes alone.

    The sizes of ``cfg`` are first checked against a few shapes of ``sd``, naming each field they
    contradict; only a config that passes is built, on the meta device (no memory for weights), to
    check every key. A DyDiT may lack exactly its router keys (it then starts with fresh routers).
    """
    if isinstance(cfg, UViTConfig):
        return _uvit.uvit_fit_problem(cfg, sd)
    if isinstance(cfg, FluxConfig):
        return _flux.flux_fit_problem(cfg, sd)
    sizes = size_mismatches(cfg, sd)
    if sizes:
        guess = guess_preset(sd)
        hint = f"; the checkpoint looks like {guess}" if guess else ""
        return "checkpoint does not fit the model: " + "; ".join(sizes) + hint
    with torch.device("meta"):
        probe = build_model(cfg)
    fresh_ok = ROUTER_KEY_MARKERS if cfg.dynamic and not has_routers(sd) else ()
    return mismatch_message(probe, sd, fresh_ok)


def build_loaded(ckpt: Checkpoint, cfg: ModelConfig) -> nn.Module:
    """Build ``cfg``'s model and load ``ckpt``'s weights strictly; eval mode, on the CPU.

    A DyDiT may come from a plain DiT's weights: its routers keep their initialisation (logged).
    """
    if isinstance(cfg, UViTConfig):
        return _uvit.load_uvit(ckpt, cfg)
    if isinstance(cfg, FluxConfig):
        return _flux.load_flux(ckpt, cfg)
    problem = fit_problem(cfg, ckpt.state_dict)
    if problem:
        raise CheckpointError(problem)
    model = build_model(cfg)
    if isinstance(model, DyDiT):
        fresh = load_dydit_state_dict(model, ckpt.state_dict)
        if fresh:
            _log.info("initialised %d router tensors that %s lacks", len(fresh), ckpt.source)
    else:
        fit_state_dict(model, ckpt.state_dict)
    return model.eval()


def load_model(
    source: CheckpointSource,
    model: str | ModelConfig | None = None,
    *,
    weights: str = "ema",
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the right DiT or DyDiT for any accepted checkpoint and load it strictly, in eval mode.

    Args:
        source: a checkpoint file, a diffusers folder or an in-memory state dict (every format
            of :func:`dydit.load_checkpoint`), or a :class:`Checkpoint` already opened.
        model: a preset name where the file cannot say (``"SiT-XL/2"`` for a raw SiT state dict:
            shapes cannot tell SiT from DiT; ``"U-ViT-H/2"`` for an official U-ViT ``.pth``), or a
            full ModelConfig (or UViTConfig, FluxConfig); ``"FLUX.1-dev"``-style names for FLUX files.
        weights: ``"ema"`` (default) or ``"model"`` entry of a training dict.
        config: for a FLUX file that stores no config (the released DyFLUX ``{"module", "step"}``
            checkpoint), the diffusers ``config.json`` of its architecture (path, folder or dict).
        overrides: ModelConfig fields, e.g. ``router_layout="all"`` (must agree with the file).
    Returns:
        A :class:`~dydit.models.dit.DiT` or :class:`~dydit.models.dydit.DyDiT` on the CPU.
    """
    ckpt = _as_checkpoint(source, weights)
    return build_loaded(ckpt, model_config(ckpt, model, config=config, **overrides))


def load_dydit_checkpoint(
    source: str | os.PathLike | Mapping[str, Tensor],
    config: ModelConfig | str | None = None,
    layout: str | None = None,
) -> DyDiT:
    """:func:`load_model` for a DyDiT: a DiT checkpoint gets fresh routers (docs/METHOD.md §12).

    ``layout`` forces a router layout and must agree with the checkpoint's router shapes.
    """
    extra = {"router_layout": layout} if layout else {}
    return cast(DyDiT, load_model(source, config, dynamic=True, **extra))
