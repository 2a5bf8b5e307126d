"""Loading FLUX checkpoints (docs/METHOD.md §15): :func:`dydit.load_model` comes here for a FLUX
preset name, a :class:`~dydit.presets.FluxConfig`, a diffusers FLUX folder, or any file given with
``config=`` (a diffusers ``config.json``, e.g. for the released DyFLUX ``.pt``). The folders
themselves are read and written by :mod:`dydit.checkpoint.flux`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dydit.checkpoint.flux import flux_config, is_router_key, looks_like_flux
from dydit.checkpoint.formats import Checkpoint
from dydit.errors import CheckpointError
from dydit.factory import build_model
from dydit.models.fitting import ROUTER_KEY_MARKERS, fit_state_dict, mismatch_message
from dydit.presets import FluxConfig, flux_preset_name, get_flux_config, is_flux_name

_log = logging.getLogger(__name__)


def wants_flux(ckpt: Checkpoint, model: object, config: object) -> bool:
    """Whether :func:`dydit.load_model` builds a FLUX for ``ckpt``, ``model`` (a name or config) and
    ``config`` (a diffusers config.json for files that store none)."""
    if config is not None or isinstance(model, FluxConfig) or isinstance(ckpt.config, FluxConfig):
        return True
    if isinstance(model, str):
        return is_flux_name(model)
    return model is None and ckpt.config is None and looks_like_flux(ckpt.state_dict)


def flux_model_config(
    ckpt: Checkpoint,
    model: str | FluxConfig | None = None,
    config: str | os.PathLike | Mapping[str, Any] | FluxConfig | None = None,
    **overrides: Any,
) -> FluxConfig:
    """The FLUX config to build for ``ckpt``: from ``config`` (a diffusers config.json), the config
    given as ``model``, the one the file stores (a preset name given must describe the same
    network), or the named preset. Router tensors make it a DyFLUX: token routing always (the
    released DyFLUX's routers), width routing when the file has width routers. Overrides last."""
    sd = ckpt.state_dict
    named = get_flux_config(model) if isinstance(model, str) else model
    cfg = flux_config(config) if config is not None else (named or ckpt.config)
    if cfg is None:
        raise CheckpointError(
            f"{ckpt.source} stores no FLUX config: pass the diffusers config.json of its architecture "
            "(config= of dydit.load_model, --config) or a FLUX preset name"
        )
    if named is not None and cfg is not named:
        if cfg.to_diffusers() != named.to_diffusers():
            raise CheckpointError(
                f"{ckpt.source}: the config given describes another FLUX network than {model}"
            )
        cfg = cfg.replace(dynamic=cfg.dynamic or named.dynamic)
    token = any("token_selection." in k for k in sd)
    width = any(".attn_rate." in k or ".mlp_rate." in k for k in sd)
    if token or width:
        if overrides.get("dynamic") is False:
            raise CheckpointError(f"{ckpt.source} holds DyFLUX router weights; it loads as a DyFLUX only")
        cfg = cfg.replace(dynamic=True, width_routing=width or overrides.pop("width_routing", False))
    return cfg.replace(**overrides) if overrides else cfg


def flux_fit_problem(cfg: FluxConfig, sd: Mapping[str, Tensor]) -> str | None:
    """Why ``sd`` does not load strictly into ``cfg``'s network (built on the meta device), or None.
    A DyFLUX may lack exactly its router tensors (they then start keeping everything)."""
    with torch.device("meta"):
        probe = build_model(cfg)
    fresh_ok = ROUTER_KEY_MARKERS if cfg.dynamic and not any(is_router_key(k) for k in sd) else ()
    problem = mismatch_message(probe, sd, fresh_ok)
    if problem is None:
        return None
    return f"checkpoint does not fit the FLUX config ({describe_flux(cfg)}): {problem}"


def describe_flux(cfg: FluxConfig) -> str:
    name = flux_preset_name(cfg)
    kind = (
        ("DyFLUX, width + token routing" if cfg.width_routing else "DyFLUX, token routing")
        if cfg.dynamic
        else "FLUX"
    )
    return (
        f"{name or 'custom'}: {kind}, {cfg.num_layers} double + {cfg.num_single_layers} single blocks, "
        f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}, {cfg.in_channels} input channels, "
        f"text width {cfg.joint_attention_dim}, pooled {cfg.pooled_projection_dim}, "
        f"guidance embedding {'yes' if cfg.guidance_embeds else 'no'}"
    )


def load_flux(ckpt: Checkpoint, cfg: FluxConfig) -> nn.Module:
    """Build ``cfg``'s FLUX (or DyFLUX) and load ``ckpt``'s weights strictly; eval mode, on the CPU."""
    sd = ckpt.state_dict
    problem = flux_fit_problem(cfg, sd)
    if problem:
        raise CheckpointError(problem)
    model = build_model(cfg)
    fresh = fit_state_dict(model, sd, ROUTER_KEY_MARKERS if cfg.dynamic else ())
    if fresh:
        _log.info("initialised %d router tensors that %s lacks", len(fresh), ckpt.source)
    return model.eval()
