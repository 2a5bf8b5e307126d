"""``dydit export --to diffusers``: any checkpoint dydit loads -> a diffusers DiT (or FLUX) folder."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit.checkpoint.diffusers import DIFFUSERS_FREQ_SHIFT, ROUTERS_FILE, write_diffusers
from dydit.checkpoint.files import check_finite
from dydit.checkpoint.flux import write_flux_folder
from dydit.checkpoint.formats import open_checkpoint
from dydit.checkpoint.load import load_model, model_config
from dydit.presets import FluxConfig, ModelConfig


@torch.no_grad()
def convention_gap(model: nn.Module) -> float:
    """Max relative output difference of ``model`` under diffusers' timestep features vs its own.

    Measured on a fixed random batch (t = 999 and 250) with the complete network.
    """
    cfg: ModelConfig = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.tensor([999, 250]), torch.tensor([0, cfg.num_classes - 1])
    embedder, previous = model.t_embedder, model.t_embedder.freq_shift
    execution = getattr(model, "execution", None)
    try:
        if execution is not None:
            model.execution = "dense"
        ours = model(x, t, y)
        embedder.freq_shift = DIFFUSERS_FREQ_SHIFT
        theirs = model(x, t, y)
    finally:
        embedder.freq_shift = previous
        if execution is not None:
            model.execution = execution
    scale, gap = ours.abs().max().item(), (ours - theirs).abs().max().item()
    if not (math.isfinite(scale) and math.isfinite(gap)):
        return math.nan  # non-finite outputs: no difference can be claimed
    return gap / scale if scale > 0 else 0.0


def export_diffusers(
    source: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike,
    *,
    model: str | ModelConfig | None = None,
    weights: str = "ema",
    config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> tuple[Path, list[str]]:
    """Write a ``DiTTransformer2DModel`` (or, for a FLUX, ``FluxTransformer2DModel``) folder for any
    checkpoint dydit loads (``config``: a FLUX file's diffusers config.json, when it stores none).

    The checkpoint is first loaded strictly into its dydit model (:func:`~dydit.load_model`), so
    only weights that fit a DiT or DyDiT are exported; weights holding NaN or inf are refused
    (CheckpointError naming the tensor). Returns (folder, notes for the user):
    for a DyDiT, diffusers runs the complete (dense) network and ``dydit_routers.safetensors``
    carries the routers; for a model with the official DiT's timestep features, diffusers'
    outputs differ from dydit's by the measured amount (diffusers hard-codes its own features).
    """
    ckpt = open_checkpoint(source, weights)
    check_finite(ckpt.state_dict, ckpt.source)
    cfg = model_config(ckpt, model, config=config)
    loaded = load_model(ckpt, cfg)
    if isinstance(cfg, FluxConfig):  # FLUX: a FluxTransformer2DModel folder (docs/METHOD.md §15)
        path = write_flux_folder(out, loaded.state_dict(), cfg)
        notes = []
        if cfg.dynamic:
            notes.append(
                "DyFLUX: diffusers loads the complete (dense) FLUX; the routers are in "
                f"{path / ROUTERS_FILE}, which dydit.load_model reads back as the DyFLUX"
            )
        return path, notes
    path = write_diffusers(out, loaded.state_dict(), cfg)
    notes = []
    if cfg.dynamic:
        notes.append(
            f"DyDiT: diffusers loads the complete (dense) network; the routers (layout {cfg.router_layout}) "
            f"are in {path / ROUTERS_FILE}, which dydit.load_model reads back as the DyDiT"
        )
    if cfg.timestep_freq_shift != DIFFUSERS_FREQ_SHIFT:
        notes.append(
            "diffusers computes timestep features with downscale_freq_shift=1 where this model uses the "
            f"official DiT's 0, so diffusers' outputs differ from dydit's (max relative difference "
            f"{convention_gap(loaded):.2g} on a test batch); dydit reads the folder back with "
            "diffusers' numerics"
        )
    return path, notes
