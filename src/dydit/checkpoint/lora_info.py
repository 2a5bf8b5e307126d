"""What a TD-LoRA file is, as data: the facts ``dydit inspect`` prints for one (docs/METHOD.md §18).

A TD-LoRA file (:mod:`dydit.checkpoint.lora`) holds the adapters, their timestep routers and the
DyDiT routers of a fine-tune, and names the base it was trained on. :func:`lora_facts` reads one
and reports its rank and groups, which blocks and linears carry adapters, the base it expects
(path, sha256, whether that file is there and still the same), the parameter counts (the file's,
and the base's and the trainable fraction, from a model of the stored config built on the meta
device, so nothing of the base is read), whether the tensors fit that model, and the commands that
use the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dydit.checkpoint.files import _read_safetensors, file_sha256
from dydit.checkpoint.lora import LORA_FILE, LORA_FILE_FORMAT, is_trained_key
from dydit.errors import CheckpointError, DyditError
from dydit.models.fitting import ROUTER_KEY_MARKERS
from dydit.models.lora import LORA_ATTR, LoraConfig, add_lora, is_lora_key
from dydit.presets import config_from_dict

# A base up to this size is hashed to check it is the file the adapters were trained on.
HASH_LIMIT_BYTES = 2 << 30


def lora_file_of(path: str | os.PathLike) -> Path | None:
    """The TD-LoRA file ``path`` is (a ``.safetensors`` file whose metadata says so), or the one a
    run directory holds (``lora.safetensors``); None otherwise. Reads the header only."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
        if not path.is_file():
            return None
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not readable as safetensors: the general path reports it
        return None
    return path if meta.get("dydit_format") == LORA_FILE_FORMAT else None


def _kind(name: str) -> str:
    if is_lora_key(name):
        return "adapter_routers" if ".lora.router." in f".{name}" else "adapters"
    return "dydit_routers" if any(m in f".{name}" for m in ROUTER_KEY_MARKERS) else "other"


def _meta_model(model_cfg: dict[str, Any], lc: LoraConfig) -> torch.nn.Module:
    """The fine-tuned network the file describes (base + DyDiT routers + adapters), on the meta device."""
    from dydit.factory import build_model
    from dydit.models.dydit import DyDiT

    with torch.device("meta"):
        model = build_model(config_from_dict(model_cfg))
        if not isinstance(model, DyDiT):
            raise DyditError("the stored model config is not a DyDiT")
        return add_lora(model, lc)


def _base_facts(config: dict[str, Any]) -> dict[str, Any]:
    base, digest = config.get("base"), config.get("base_sha256")
    facts: dict[str, Any] = {"path": base, "sha256": digest, "exists": None, "matches": None}
    if not base:
        return facts
    p = Path(base)
    facts["exists"] = p.exists()
    if p.is_file() and digest and p.stat().st_size <= HASH_LIMIT_BYTES:
        facts["matches"] = file_sha256(p) == digest
    return facts


def _adapter_keys(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{block prefix: adapted linears (key form, ``attn_qkv``)} from ``<prefix>.lora.adapters.<linear>.down``
    keys; the prefix is the block's name in the backbone (``blocks.3``, ``mid_block``,
    ``single_transformer_blocks.0``)."""
    marker = f".{LORA_ATTR}.adapters."
    per_prefix: dict[str, list[str]] = {}
    for k in tensors:
        prefix, found, rest = k.partition(marker)
        parts = rest.split(".")
        if found and prefix and len(parts) == 2 and parts[1] == "down":
            per_prefix.setdefault(prefix, []).append(parts[0])
    return per_prefix


def _block_index(model: torch.nn.Module) -> dict[str, int]:
    """{a block's module name in the model: its index in ``model.blocks``} (the backbone's order)."""
    index = {id(b): i for i, b in enumerate(model.blocks)}
    return {n: index[id(m)] for n, m in model.named_modules(remove_duplicate=False) if id(m) in index}


def _natural(prefix: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in prefix.split("."))


def _layers(tensors: dict[str, torch.Tensor], model: torch.nn.Module | None) -> dict[str, Any]:
    """Blocks carrying adapters (indices in ``model.blocks``, the backbone contract's order) and the
    linears adapted in each (dotted paths when the model is known). Without a model, a DiT's
    ``blocks.i`` give i; another family's blocks are numbered in the order of their names.
    ``same_in_every_block``: with the model, every block adapts exactly the linears its units name
    (a FLUX's double and single blocks name different ones); without, all blocks the same ones."""
    per_prefix = _adapter_keys(tensors)
    index = _block_index(model) if model is not None else {}
    if not index:
        dit = all(len(p.split(".")) == 2 and p.startswith("blocks.") and p[7:].isdigit() for p in per_prefix)
        order = sorted(per_prefix, key=_natural)
        index = {p: int(p[7:]) if dit else i for i, p in enumerate(order)}
    per_block: dict[int, list[str]] = {}
    for prefix, keys in per_prefix.items():
        i = index.get(prefix, -1)  # -1: a prefix that names no block of the model (a misfit file)
        per_block.setdefault(i, []).extend(keys)
    if model is not None:
        for i, keys in per_block.items():
            paths = getattr(model.blocks[i], LORA_ATTR).paths if 0 <= i < len(model.blocks) else ()
            known = [p for p in paths if p.replace(".", "_") in keys]  # in the block's own order
            per_block[i] = known + sorted(set(keys) - {p.replace(".", "_") for p in known})
    blocks = sorted(i for i in per_block if i >= 0)
    linears = list(dict.fromkeys(name for i in sorted(per_block) for name in per_block[i]))
    if model is not None:  # every block adapts the linears its own units name (FLUX: two kinds)
        own = [tuple(getattr(b, LORA_ATTR).paths) for b in model.blocks]
        same = -1 not in per_block and all(tuple(per_block.get(i, ())) == p for i, p in enumerate(own))
    else:
        same = all(sorted(per_block[i]) == sorted(linears) for i in per_block)
    return {
        "blocks": blocks,
        "linears": linears,
        "same_in_every_block": same,
        "adapted_linears": sum(len(v) for v in per_block.values()),
        "depth": len(model.blocks) if model is not None else None,
    }


def _fit_problem(tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> str | None:
    """As :func:`dydit.checkpoint.lora.apply_lora` checks: every trained entry, nothing else, same shapes."""
    own = model.state_dict()
    expected = {k for k in own if is_trained_key(k)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = sorted(k for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape))
    if not (missing or unexpected or wrong):
        return None
    shown = ", ".join((missing or unexpected or wrong)[:3])
    return (
        f"the tensors do not fit the stored model config ({len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(wrong)} of another shape: {shown})"
    )


def usage(path: str | os.PathLike, base: dict[str, Any], model_cfg: Any = None) -> dict[str, str]:
    """The commands that use the file; ``--checkpoint``/``--base`` shown when the named base is gone;
    ``--prompt`` for a text-to-image model (it samples prompts, not classes) and ``--vae`` for a
    latent one (the images need its decoder), from the stored model config when it is readable."""
    given = "" if base.get("exists") else " --checkpoint BASE"
    merge_base = "" if base.get("exists") else " --base BASE"
    try:
        cfg = config_from_dict(model_cfg) if isinstance(model_cfg, dict) else None
    except (DyditError, TypeError):
        cfg = None
    notes = ["the sliced engine merges the adapters per step"]
    if cfg is not None and getattr(cfg, "text_encoder", None) is not None:
        given += ' --prompt "TEXT"'
        notes.insert(0, "or --prompts FILE, one prompt a line")
    channels = getattr(cfg, "latent_channels", getattr(cfg, "in_channels", None))
    if channels is not None and channels not in (1, 3):
        given += " --vae VAE"
    return {
        "sample": f"dydit sample --lora {path}{given} ({'; '.join(notes)})",
        "merge": f"dydit export {path} --merge-lora{merge_base} (plain weights in merged.safetensors "
        "beside it, or --out; refused when the adapters' gates change with t)",
    }


def lora_facts(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``dydit inspect`` says about a TD-LoRA file (CheckpointError if it is not one).
    ``problem`` is None when the tensors fit the model the stored config describes."""
    found = lora_file_of(path)
    if found is None:
        raise CheckpointError(f"{path} is not a TD-LoRA file (no dydit_format={LORA_FILE_FORMAT!r} metadata)")
    tensors, meta = _read_safetensors(found)
    try:
        lc = LoraConfig(**json.loads(meta["lora"]))
        config = json.loads(meta["config"])
        model_cfg = config["model"]
    except (KeyError, ValueError, TypeError, DyditError) as e:
        raise CheckpointError(f"{found}: unreadable TD-LoRA metadata ({e})") from None
    model, problem = None, None
    try:
        model = _meta_model(model_cfg, lc)
    except (DyditError, KeyError, ValueError, TypeError) as e:
        problem = f"no model can be built from the stored config ({e})"
    if model is not None:
        problem = _fit_problem(tensors, model)
    counts = {"adapters": 0, "adapter_routers": 0, "dydit_routers": 0, "other": 0}
    for k, v in tensors.items():
        counts[_kind(k)] += v.numel()
    in_file = sum(counts.values())
    params: dict[str, Any] = {"file": in_file, **counts}
    params.update(base=None, model=None, trainable_fraction=None)
    if model is not None:
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for n, p in model.named_parameters() if is_trained_key(n))
        params.update(base=total - trained, model=total, trainable_fraction=trained / total)
    base = _base_facts(config)
    return {
        "file": str(found),
        "format": LORA_FILE_FORMAT,
        "lora": {**lc.to_dict(), "scale": lc.scale, "rank_per_group": lc.rank // lc.groups},
        "model": model_cfg,
        "layers": _layers(tensors, model),
        "base": base,
        "parameters": params,
        "step": config.get("step"),
        "train": config.get("train"),
        "problem": problem,
        "usage": usage(found, base, model_cfg),
    }
