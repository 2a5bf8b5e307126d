"""Loading U-ViT checkpoints (docs/METHOD.md §16): the official raw state dicts (``nnet.pth``,
``imagenet256_uvit_huge.pth``, ...) given the preset name, and dydit's exports of a U-ViT or a DyDiT
on one (the config is stored). :func:`dydit.load_model` comes here for a ``U-ViT-*`` /
``DyDiT-U-ViT-*`` name, a :class:`~dydit.presets.UViTConfig` or a file that stores one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dydit.checkpoint.files import check_finite
from dydit.checkpoint.formats import Checkpoint, open_checkpoint
from dydit.checkpoint.layout import (
    load_dydit_state_dict,
    with_router_layout,
)
from dydit.errors import CheckpointError, DyditError
from dydit.factory import build_model
from dydit.io import atomic_write
from dydit.models.dydit import DyDiT
from dydit.models.fitting import ROUTER_KEY_MARKERS, fit_state_dict, has_routers, mismatch_message
from dydit.models.uvit_fit import looks_like_uvit, uvit_size_mismatches
from dydit.presets import UVIT_NAMES, UViTConfig, get_uvit_config, is_uvit_name, uvit_preset_name


def wants_uvit(ckpt: Checkpoint, model: object) -> bool:
    """Whether :func:`dydit.load_model` builds a U-ViT for ``ckpt`` and ``model`` (a name or config)."""
    if isinstance(model, UViTConfig) or is_uvit_name(model):
        return True
    return model is None and (isinstance(ckpt.config, UViTConfig) or looks_like_uvit(ckpt.state_dict))


def guess_uvit_preset(sd: Mapping[str, Tensor]) -> str | None:
    """The U-ViT preset whose sizes the shapes of ``sd`` match exactly, if one does."""
    for name in UVIT_NAMES:
        if not uvit_size_mismatches(get_uvit_config(name), sd):
            return name
    return None


def uvit_model_config(
    ckpt: Checkpoint, model: str | UViTConfig | None = None, **overrides: Any
) -> UViTConfig:
    """The U-ViT config to build for ``ckpt``: the one given, the one the file stores (checked against
    a name given), or the named preset; router weights make it a DyDiT; overrides last."""
    sd = ckpt.state_dict
    if isinstance(model, UViTConfig):
        cfg = model
    elif isinstance(ckpt.config, UViTConfig):
        cfg = ckpt.config
        if model is not None:
            want = get_uvit_config(model)
            if want.replace(dynamic=cfg.dynamic, router_layout=cfg.router_layout) != cfg:
                raise CheckpointError(f"{ckpt.source} stores the config of another U-ViT than {model}")
            cfg = cfg.replace(dynamic=cfg.dynamic or want.dynamic)
    elif model is not None or (model := guess_uvit_preset(sd)) is not None:
        cfg = get_uvit_config(model)
    else:
        raise CheckpointError(
            f"{ckpt.source} is a U-ViT of no preset's size and stores no config: name it "
            f"(--model, or model= of dydit.load_model; presets {', '.join(UVIT_NAMES)})"
        )
    return with_router_layout(cfg, sd, ckpt.source, overrides)


def uvit_fit_problem(cfg: UViTConfig, sd: Mapping[str, Tensor]) -> str | None:
    """Why ``sd`` does not load strictly into ``cfg``'s model, in one line (None when it does): the
    sizes its shapes contradict, else every missing, unexpected or mis-shaped key (built on meta)."""
    if not looks_like_uvit(sd):
        return (
            "checkpoint does not fit the model: it does not have the U-ViT layout (no patch_embed/mid_block)"
        )
    sizes = uvit_size_mismatches(cfg, sd)
    if sizes:
        return "checkpoint does not fit the model: " + "; ".join(sizes)
    with torch.device("meta"):
        probe = build_model(cfg)
    fresh_ok = ROUTER_KEY_MARKERS if cfg.dynamic and not has_routers(sd) else ()
    return mismatch_message(probe, sd, fresh_ok)


def load_uvit(ckpt: Checkpoint, cfg: UViTConfig) -> nn.Module:
    """Build ``cfg``'s U-ViT (or DyDiT on one) and load ``ckpt`` strictly; eval mode, on the CPU."""
    problem = uvit_fit_problem(cfg, ckpt.state_dict)
    if problem:
        raise CheckpointError(problem)
    model = build_model(cfg)
    if isinstance(model, DyDiT):
        load_dydit_state_dict(model, ckpt.state_dict)
    else:
        fit_state_dict(model, ckpt.state_dict)
    return model.eval()


def uvit_architecture(cfg: UViTConfig) -> str:
    """What ``dydit inspect`` says of a U-ViT's architecture, in one line."""
    classes = (
        f"{cfg.num_classes} classes" + (" + null" if cfg.class_dropout_prob else "")
        if cfg.num_classes
        else "unconditional"
    )
    extras = [
        n
        for n, on in (("qkv bias", cfg.qkv_bias), ("time MLP", cfg.mlp_time_embed), ("3x3 conv", cfg.conv))
        if on
    ]
    return (
        f"{uvit_preset_name(cfg) or 'no preset (custom U-ViT)'}: {'DyDiT on ' if cfg.dynamic else ''}U-ViT, "
        f"{cfg.num_layers} blocks ({cfg.depth // 2} in, mid, {cfg.depth // 2} out, long skips), width "
        f"{cfg.hidden_size}, {cfg.num_heads} heads, patch {cfg.patch_size}, input {cfg.in_channels}x"
        f"{cfg.input_size}x{cfg.input_size}, {classes}{', ' + ', '.join(extras) if extras else ''}"
    )


def uvit_process_text(cfg: UViTConfig) -> str:
    """The process a U-ViT was trained with, as ``dydit inspect`` says it (docs/METHOD.md §16.2)."""
    if cfg.process == "sd":
        return (
            "Stable Diffusion's discrete scaled-linear betas, t = 1..1000, noise prediction (the "
            "ddpm, ddim and dpm++2m samplers apply; U-ViT samples it with DPM-Solver++, 50 steps)"
        )
    return (
        "continuous VP-SDE (linear beta 0.1 -> 20), the network sees 999 t, noise prediction (the "
        "sde (Euler-Maruyama), dpm++, euler, heun and adaptive samplers apply)"
    )


def is_uvit_source(path: str | os.PathLike, model: str | None) -> bool:
    """Whether ``dydit export`` meets a U-ViT: ``model`` names one, or the file holds one."""
    if is_uvit_name(model):
        return True
    if model is not None or not Path(path).is_file():
        return False
    return wants_uvit(open_checkpoint(path), None)


def export_uvit(
    source: str | os.PathLike,
    out: str | os.PathLike | None = None,
    model: str | None = None,
    weights: str = "ema",
) -> Path:
    """Write a U-ViT checkpoint (an official ``.pth`` given its preset, or any file dydit loads as a
    U-ViT) as a dydit ``.safetensors`` export that stores its config: it then loads without ``--model``.

    ``out`` defaults to the source's name with the suffix ``.safetensors``. Weights holding NaN or
    inf are refused (nothing written).
    """
    from safetensors.torch import save_file

    src = Path(source)
    target = Path(out) if out else src.with_suffix(".safetensors")
    if target.suffix != ".safetensors":
        raise DyditError(f"the export must be a .safetensors file, got {target}")
    if target.resolve() == src.resolve():
        raise DyditError(f"the export would overwrite its source {src}; give --out")
    ckpt = open_checkpoint(src, weights)
    net = load_uvit(ckpt, uvit_model_config(ckpt, model))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    check_finite(tensors, src)
    config = {"model": net.config.to_dict(), "source": str(src), "weights": ckpt.entry or "state_dict"}
    metadata = {"config": json.dumps(config), "format": "pt"}
    return atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))
