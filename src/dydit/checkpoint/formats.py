"""What a checkpoint path holds: one :class:`Checkpoint` record for every accepted format.

:func:`open_checkpoint` reads a path once and says what it is; the weights come back in dydit's
(the official DiT's) key layout whatever the format, with the model config the file stores (ours,
or a diffusers ``config.json``), the training ``args`` of official scripts and the training step.
A stored config is checked against the weights' shapes here (and is bounded by
:data:`~dydit.presets.SIZE_LIMITS`): one that lies about its weights never reaches a model build.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from dydit.checkpoint.diffusers import find_diffusers_dir, folder_problem, read_diffusers
from dydit.checkpoint.files import (
    config_from_object,
    read_file,
    state_dict_from_object,
    stored_run_config,
    weights_entry,
)
from dydit.checkpoint.flux import find_flux_dir, flux_folder_problem, read_flux_folder
from dydit.errors import CheckpointError
from dydit.models.fitting import size_mismatches
from dydit.models.uvit_fit import looks_like_uvit, uvit_size_mismatches
from dydit.presets import FluxConfig, ModelConfig, UViTConfig

# Format name -> what ``dydit inspect`` calls it.
FORMATS: dict[str, str] = {
    "state_dict": "raw state dict (torch.save of model.state_dict(); official DiT/SiT releases)",
    "uvit_state_dict": "raw U-ViT state dict (torch.save of nnet.state_dict(); official U-ViT releases)",
    "training_dict": "training dict with 'model'/'ema' entries (official DiT, DyDiT and SiT train.py)",
    "module_dict": "dict with a 'module' entry and the step (DeepSpeed-style: the released DyFLUX)",
    "dydit_state": "dydit training state (checkpoints/state.pt)",
    "dydit_export": "dydit .safetensors export with its config",
    "safetensors": ".safetensors state dict without a config",
    "diffusers": "diffusers DiTTransformer2DModel folder",
    "flux_diffusers": "diffusers FluxTransformer2DModel folder (a DyFLUX adds dydit_routers.safetensors)",
    "memory": "state dict in memory",
}
DYDIT_STATE_FORMAT = "dydit-train-state"  # the ``format`` entry of dydit's training states


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint, read: weights in dydit's key layout plus what the file says about them.

    Attributes:
        source: the path (or ``"state dict"``).
        format: a key of :data:`FORMATS`.
        state_dict: the weights, ``module.``/``_orig_mod.`` prefixes removed.
        config: the model config the file stores (dydit's, or read from diffusers' ``config.json``).
        args: the pickled ``argparse.Namespace`` of official training scripts, as a dict.
        step: the training step, if the file (or its ``{step:07d}.pt`` name) says.
        entry: which entry of a training dict holds the weights (``"ema"`` or ``"model"``).
        run_config: the full run configuration dydit stored (model, data, train), if any.
    """

    source: str
    format: str
    state_dict: dict[str, Tensor] = field(repr=False)
    config: ModelConfig | UViTConfig | FluxConfig | None = None
    args: dict[str, Any] | None = None
    step: int | None = None
    entry: str | None = None
    run_config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        return FORMATS[self.format]


def _args_dict(args: Any) -> dict[str, Any] | None:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else None


def open_checkpoint(source: str | os.PathLike | Mapping[str, Any], weights: str = "ema") -> Checkpoint:
    """Read a checkpoint file, diffusers folder or in-memory state dict (see :data:`FORMATS`).

    ``weights`` picks the entry of a training dict: ``"ema"`` (default, as DiT's ``find_model``)
    or ``"model"``; the other is used when the preferred one is absent. Raises CheckpointError.
    """
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}")
    if isinstance(source, Mapping):
        return Checkpoint("state dict", "memory", state_dict_from_object(source, "state dict", weights))
    path = Path(source)
    if path.is_dir():
        flux = find_flux_dir(path)
        if flux is not None:
            sd, flux_cfg = read_flux_folder(flux)
            return Checkpoint(str(path), "flux_diffusers", sd, flux_cfg)
        folder = find_diffusers_dir(path)
        if folder is None:
            problem = flux_folder_problem(path) or folder_problem(path)
            raise CheckpointError(
                f"{path} is a directory, not a checkpoint file nor a diffusers DiT folder: {problem}"
            )
        sd, cfg = read_diffusers(folder)
        return Checkpoint(str(path), "diffusers", sd, cfg)
    obj, meta = read_file(path)
    sd = state_dict_from_object(obj, str(path), weights)
    cfg = config_from_object(obj, meta, str(path))
    run = stored_run_config(obj, meta, str(path))
    wrong = _stored_size_mismatches(cfg, sd) if cfg is not None else []
    if wrong:
        raise CheckpointError(f"the config stored in {path} does not fit its weights: {'; '.join(wrong)}")
    if path.suffix == ".safetensors":
        fmt = "dydit_export" if cfg is not None else "safetensors"
        step = run.get("step") if run else None
        return Checkpoint(
            str(path), fmt, sd, cfg, step=step if isinstance(step, int) else None, run_config=run
        )
    entry = weights_entry(obj, weights)
    if obj.get("format") == DYDIT_STATE_FORMAT:
        step = obj.get("step")
        return Checkpoint(
            str(path), "dydit_state", sd, cfg, None, step if isinstance(step, int) else None, entry, run
        )
    if entry == "module" and not {"model", "ema"} & set(obj):
        step = obj.get("step")
        return Checkpoint(
            str(path), "module_dict", sd, cfg, None, step if isinstance(step, int) else None, entry, run
        )
    if entry is not None:
        args = _args_dict(obj.get("args"))
        # DiT, DyDiT and SiT name their training checkpoints by step: 0400000.pt.
        step = int(path.stem) if re.fullmatch(r"\d{7}", path.stem) else None
        return Checkpoint(str(path), "training_dict", sd, cfg, args, step, entry, run)
    raw = "uvit_state_dict" if looks_like_uvit(sd) else "state_dict"
    return Checkpoint(str(path), raw, sd, cfg, run_config=run)


def _stored_size_mismatches(cfg: ModelConfig | UViTConfig, sd: dict[str, Tensor]) -> list[str]:
    """:func:`size_mismatches` of a stored config, U-ViT's (docs/METHOD.md §16) included; a FLUX's
    fit is checked when it is built (:func:`dydit.checkpoint.flux_load.flux_fit_problem`)."""
    if isinstance(cfg, FluxConfig):
        return []
    return uvit_size_mismatches(cfg, sd) if isinstance(cfg, UViTConfig) else size_mismatches(cfg, sd)


def load_checkpoint(path: str | os.PathLike, weights: str = "ema") -> dict[str, Tensor]:
    """Load a state dict, in dydit's (the official DiT's) key layout, from any accepted checkpoint.

    Accepted formats (only ``torch.load(weights_only=True)`` and safetensors ever read a file):

    =================================  ==========================================================
    raw state dict (``.pt``/``.pth``)  ``torch.save(model.state_dict())``: official DiT/SiT releases
    training dict                      ``{"model", "ema", "opt", "args"}`` of the official DiT, DyDiT
                                       and SiT ``train.py``: ``ema`` is used (``weights="model"``
                                       for the raw weights); the pickled ``argparse.Namespace`` is the
                                       one non-tensor object allowed, for that load only
    dydit training state               ``checkpoints/state.pt``
    ``.safetensors``                   dydit exports (config in the metadata) or bare state dicts
    diffusers folder                   ``config.json`` + ``diffusion_pytorch_model.safetensors``
                                       (``DiTTransformer2DModel``), or a pipeline folder with
                                       ``transformer/``; keys are converted, per-block embedder copies
                                       must agree; ``dydit_routers.safetensors`` beside it adds routers
    =================================  ==========================================================

    ``module.`` and ``_orig_mod.`` key prefixes (DDP, torch.compile) are removed. A file naming any
    other Python global than ``argparse.Namespace`` is refused (CheckpointError); nothing is ever
    fully unpickled. To build the matching model as well, use :func:`dydit.load_model`.
    """
    return open_checkpoint(path, weights).state_dict


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], ModelConfig | None]:
    """(state dict, stored model config or None) of a checkpoint, reading it once."""
    ckpt = open_checkpoint(path)
    return ckpt.state_dict, ckpt.config


def checkpoint_config(path: str | os.PathLike) -> ModelConfig | None:
    """The model config stored with a checkpoint (dydit's, or a diffusers ``config.json``), if any."""
    return open_checkpoint(path).config
