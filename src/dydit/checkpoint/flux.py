"""FLUX checkpoints: diffusers' ``FluxTransformer2DModel`` folders both ways, and DyFLUX files.

dydit's FLUX network (``models.flux``) has diffusers' key names, so a folder's weights load as
they are; only the config changes type (:class:`~dydit.presets.FluxConfig`, from and to
``config.json``). What this module reads (docs/METHOD.md §15):

- a **diffusers folder**: ``config.json`` (``_class_name`` ``FluxTransformer2DModel``) with
  ``diffusion_pytorch_model.safetensors`` or its shards (``...safetensors.index.json``, as the real
  FLUX.1 releases), or a pipeline folder (``black-forest-labs/FLUX.1-dev``) keeping it in
  ``transformer/``. A DyFLUX written by dydit adds ``dydit_routers.safetensors`` beside it: its
  router tensors under their own key names, which diffusers ignores.
- the **released DyFLUX checkpoint**: ``{"module": state_dict, "step": int}`` (a ``.pt`` from a
  DeepSpeed-style run) with no config: the architecture comes from a diffusers ``config.json``
  given beside it (``dydit.load_model(PT, config=CONFIG_JSON)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from dydit.checkpoint.diffusers import (
    CONFIG_FILE,
    MODEL_INDEX,
    PIPELINE_SUBFOLDER,
    ROUTERS_FILE,
    check_empty_target,
    publish_folder,
    read_weights,
)
from dydit.checkpoint.files import read_file, read_json
from dydit.errors import CheckpointError, DyditError
from dydit.presets import FluxConfig, shown

CLASS_NAME = "FluxTransformer2DModel"
# What marks a router tensor of a DyFLUX (the released token routers, dydit's width routers).
ROUTER_MARKERS = ("token_selection.", "attn_rate.", "mlp_rate.")
# Written into config.json, as diffusers' save_pretrained does (diffusers reads but does not need it).
DIFFUSERS_VERSION = "0.42.1"


def looks_like_flux(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict has FLUX's keys (a double block's text-stream projections)."""
    return (
        "transformer_blocks.0.attn.add_q_proj.weight" in sd
        or "single_transformer_blocks.0.proj_out.weight" in sd
    )


def is_router_key(key: str) -> bool:
    return any(m in key for m in ROUTER_MARKERS)


def _class_name(path: Path) -> str | None:
    try:
        config = read_json(path)
    except CheckpointError:
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def find_flux_dir(path: str | os.PathLike) -> Path | None:
    """The folder holding a diffusers FLUX transformer's ``config.json`` (``path`` or its
    ``transformer/``), if any."""
    path = Path(path)
    for folder in (path, path / PIPELINE_SUBFOLDER):
        if (folder / CONFIG_FILE).is_file() and _class_name(folder / CONFIG_FILE) == CLASS_NAME:
            return folder
    return None


def flux_config(source: str | os.PathLike | Mapping[str, Any] | FluxConfig) -> FluxConfig:
    """A :class:`FluxConfig` from a diffusers ``config.json`` (its path, its folder, a pipeline
    folder, or the parsed dict), or the config itself. One-line errors for anything else."""
    if isinstance(source, FluxConfig):
        return source
    name = "config"
    if not isinstance(source, Mapping):
        path = Path(source)
        if path.is_dir():
            folder = find_flux_dir(path)
            if folder is None:
                raise CheckpointError(f"{path} holds no config.json of a {CLASS_NAME} (nor in transformer/)")
            path = folder / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"no such config file: {path}")
        name, source = str(path), read_json(path)
        if not isinstance(source, Mapping):
            raise CheckpointError(f"{name} holds a JSON {type(source).__name__}, not a model config")
    kind = source.get("_class_name", CLASS_NAME)
    if kind != CLASS_NAME:
        raise CheckpointError(
            f"{name} is the config of a {shown(kind)}, not of a FLUX transformer ({CLASS_NAME})"
        )
    try:
        return FluxConfig.from_diffusers(dict(source))
    except (DyditError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name} is not a valid FLUX config: {e}") from None


def read_flux_folder(folder: str | os.PathLike) -> tuple[dict[str, Tensor], FluxConfig]:
    """(state dict, config) of a diffusers FLUX folder; a DyFLUX's routers from ``dydit_routers``."""
    folder = Path(folder)
    cfg = flux_config(folder / CONFIG_FILE)
    sd = read_weights(folder, CLASS_NAME)
    if (folder / ROUTERS_FILE).is_file():
        sd |= read_file(folder / ROUTERS_FILE)[0]
    return sd, cfg


def flux_folder_problem(path: str | os.PathLike) -> str | None:
    """Why a folder with a FLUX ``model_index.json`` has no transformer to read, or None."""
    path = Path(path)
    if (path / MODEL_INDEX).is_file() and not (path / PIPELINE_SUBFOLDER / CONFIG_FILE).is_file():
        index = read_json(path / MODEL_INDEX)
        if isinstance(index, dict) and "Flux" in str(index.get("_class_name", "")):
            return f"a FLUX pipeline folder without {PIPELINE_SUBFOLDER}/{CONFIG_FILE}"
    return None


def write_flux_folder(out: str | os.PathLike, sd: Mapping[str, Tensor], cfg: FluxConfig) -> Path:
    """Write a diffusers FLUX folder: the dense network for ``FluxTransformer2DModel.from_pretrained``
    and, for a DyFLUX, its routers in ``dydit_routers.safetensors`` beside it. ``out`` must not exist
    or be empty; it is assembled under a hidden name and renamed into place (complete or absent).
    A text-to-image model's own text encoder (``text_encoder.*``, docs/METHOD.md §17.6) stays out:
    diffusers' FLUX has no such part; a model packing other than 2x2 has no diffusers form at all."""
    if cfg.pack != 2:
        raise DyditError(
            f"this FLUX packs {cfg.pack}x{cfg.pack} pixels per token; diffusers' FluxPipeline packs 2x2, "
            "so it has no diffusers form: keep the dydit checkpoint"
        )
    check_empty_target(out)
    sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    weights = {k: v.contiguous() for k, v in sd.items() if not is_router_key(k)}
    routers = {k: v.contiguous() for k, v in sd.items() if is_router_key(k)}
    config = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **cfg.to_diffusers()}
    return publish_folder(out, config, weights, routers)
