"""TD-LoRA files: the adapters and routers of a fine-tune, apart from its base (docs/METHOD.md §18).

A TD-LoRA file is a ``.safetensors`` file holding only what a TD-LoRA fine-tune trained: the
adapters and their timestep routers (``<block>.lora.*``, the block named as the backbone names it:
``blocks.i`` of a DiT, ``in_blocks.i``/``mid_block``/``out_blocks.i`` of a U-ViT,
``transformer_blocks.i``/``single_transformer_blocks.i`` of a FLUX) and the DyDiT routers
(``attn_rate``, ``mlp_rate``, ``token_selection``). Its metadata: ``dydit_format`` = ``"td-lora"``,
``lora`` (the :class:`~dydit.models.lora.LoraConfig` as JSON) and ``config`` (JSON: ``model``, the
fine-tuned DyDiT's model config; ``base``, the path of the base weights and ``base_sha256``; the
run's ``train`` config and ``step`` when a run wrote it). The model config is any family's (DiT/SiT,
U-ViT, FLUX: a ``"family"`` field says which), read as the rest of the checkpoint code reads stored
configs (:func:`~dydit.presets.config_from_dict`).

- :func:`save_lora` writes one from a model with adapters;
- :func:`apply_lora` puts a file onto a loaded base (a plain base becomes the file's DyDiT first);
- :func:`load_with_lora` loads the base (named by the file, or given) and applies the file;
- :func:`merged_export` writes plain weights with the adapters merged, when they do not depend on t.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dydit.checkpoint.files import _read_safetensors, check_finite
from dydit.errors import CheckpointError, DyditError
from dydit.io import atomic_write
from dydit.models.dydit import DyDiT
from dydit.models.fitting import ROUTER_KEY_MARKERS
from dydit.models.lora import LoraConfig, add_lora, is_lora_key, lora_config, merge_lora
from dydit.presets import FluxConfig, ModelConfig, UViTConfig, config_from_dict

AnyConfig = ModelConfig | UViTConfig | FluxConfig

LORA_FILE_FORMAT = "td-lora"
LORA_FILE = "lora.safetensors"


def is_trained_key(name: str) -> bool:
    """Whether a TD-LoRA fine-tune trains this state-dict entry: an adapter or a router."""
    return is_lora_key(name) or any(m in f".{name}" for m in ROUTER_KEY_MARKERS)


def lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries a TD-LoRA file holds: adapters, their routers and the DyDiT routers."""
    sd = model.state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if is_trained_key(k)}


def save_lora(
    path: str | os.PathLike,
    model: nn.Module,
    config: dict[str, Any],
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Atomically write ``model``'s TD-LoRA file; ``config`` must hold ``model`` (ModelConfig dict).
    ``tensors``: the entries to write, already gathered (a sharded model's), else the model's own."""
    from safetensors.torch import save_file

    lc = lora_config(model)
    if lc is None:
        raise DyditError("this model has no TD-LoRA adapters to save")
    tensors = lora_tensors(model) if tensors is None else {k: v.contiguous() for k, v in tensors.items()}
    metadata = {
        "format": "pt",
        "dydit_format": LORA_FILE_FORMAT,
        "lora": json.dumps(lc.to_dict()),
        "config": json.dumps(config),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], LoraConfig, dict[str, Any]]:
    """(tensors, LoRA config, stored config) of a TD-LoRA file; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"TD-LoRA file not found: {path}")
    tensors, meta = _read_safetensors(path)
    if meta.get("dydit_format") != LORA_FILE_FORMAT:
        raise CheckpointError(f"{path} is not a TD-LoRA file (no dydit_format={LORA_FILE_FORMAT!r} metadata)")
    try:
        lc = LoraConfig(**json.loads(meta["lora"]))
        config = json.loads(meta["config"])
        stored_model_config(config)
    except (KeyError, ValueError, TypeError, DyditError) as e:
        raise CheckpointError(f"{path}: unreadable TD-LoRA metadata ({e})") from None
    check_finite(tensors, path)
    return tensors, lc, config


def stored_model_config(config: dict[str, Any]) -> AnyConfig:
    """The fine-tuned DyDiT's config a TD-LoRA file stores (``config["model"]``), of any family."""
    model = config["model"]
    if not isinstance(model, dict):
        raise TypeError("the stored model config is not a JSON object")
    cfg = config_from_dict(model)
    if not cfg.dynamic:
        raise DyditError("the stored model config is not a DyDiT's")
    return cfg


def _as_dydit(base: nn.Module, cfg: AnyConfig) -> DyDiT:
    """The file's DyDiT (``cfg``) with ``base``'s weights and fresh routers, as a fine-tune starts
    from its ``--init-from`` weights; same device, dtype and guidance scale (a FLUX's) as ``base``."""
    if not cfg.dynamic:
        raise DyditError("the stored model config is not a DyDiT's")
    try:
        return DyDiT.from_weights(cfg, base)
    except CheckpointError as e:
        raise CheckpointError(f"the base does not fit the TD-LoRA file's model: {e}") from None


def apply_lora(model: nn.Module, path: str | os.PathLike) -> DyDiT:
    """The base ``model`` (a plain network of any family, or a DyDiT whose routers the file replaces)
    with the file's adapters and routers, strictly: every tensor of the file is used and every
    adapter/router is in it."""
    tensors, lc, config = read_lora(path)
    if not isinstance(model, DyDiT):
        model = _as_dydit(model, stored_model_config(config))
    if lora_config(model) is None:
        add_lora(model, lc)
    own = model.state_dict()
    expected = {k for k in own if is_trained_key(k)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        shown = (missing or unexpected or wrong)[:3]
        raise CheckpointError(
            f"{path} does not fit this base ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} of another shape: {', '.join(shown)})"
        )
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def load_with_lora(path: str | os.PathLike, base: str | os.PathLike | None = None) -> DyDiT:
    """Load the base (``base``, else the one the file names) as the file's DyDiT, then apply the file."""
    from dydit.checkpoint.load import load_model

    _, _, config = read_lora(path)
    base = base or config.get("base")
    if not base:
        raise DyditError(f"{path} names no base weights: give them (--checkpoint)")
    model = load_model(str(base), stored_model_config(config))
    return apply_lora(model, path)


def merge_times(config: AnyConfig) -> Tensor:
    """The time values a merge is checked at, as the network receives them from its process: every
    DDPM step (DiT: 0..999; a U-ViT's ``sd`` process: 1..1000), or a flow's 1001-point grid of
    t in [0, 1] on its clock (t itself, FLUX's sigma = 1 - t, a U-ViT's VP-SDE 999 (1 - t))."""
    from dydit.flow import Transport, create_process

    process = create_process(config)
    if isinstance(process, Transport):
        return process.original_timesteps(torch.linspace(0.0, 1.0, 1001))
    return process.original_timesteps(torch.arange(process.num_timesteps))


def merged_export(
    path: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None
) -> Path:
    """Plain DyDiT weights with the file's adapters merged (DyditError when the gates depend on t)."""
    from safetensors.torch import save_file

    model = load_with_lora(path, base)
    _, lc, config = read_lora(path)
    merge_lora(model, merge_times(model.config))
    stored = {**config, "merged_lora": lc.to_dict()}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"config": json.dumps(stored), "format": "pt"}  # a dydit export: load_model reads it
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
