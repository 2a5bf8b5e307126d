"""Safe checkpoint reading and model-fitting (METHOD.md §1.5, §12).

Only two loaders ever touch a file: ``torch.load(..., weights_only=True)`` and safetensors. Nothing
is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dydit.errors import CheckpointError, DyditError
from dydit.presets import MODEL_PRESETS, ModelConfig

_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def read_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a checkpoint file as (object, safetensors metadata). Raises CheckpointError on any failure."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError, ...
            first = str(e).strip().split("\n")[0] or type(e).__name__
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling arbitrary bytes raises nearly any exception type
        # torch's message starts with advice to retry unsafely; keep the line that names the problem.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if isinstance(e, pickle.UnpicklingError) and any("GLOBAL" in line for line in lines):
            named = next(line for line in lines if "GLOBAL" in line)
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects that weights_only loading does not "
                f"allow ({named}). Re-save it as a plain state dict or .safetensors."
            ) from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        if not isinstance(e, RuntimeError | pickle.UnpicklingError | OSError):
            detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({detail or type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj, {}


def state_dict_from_object(obj: dict[str, Any], source: str = "checkpoint") -> dict[str, Tensor]:
    """Pick the weights out of a loaded object: ``ema`` preferred, then ``model``, else the dict itself."""
    for key in ("ema", "model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} contains no tensors")
    return _strip_prefixes(tensors)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a normalised state dict from a raw state dict, a training dict, or a ``.safetensors`` file.

    Training dicts yield their ``ema`` entry (else ``model``); ``module.`` and ``_orig_mod.`` key
    prefixes (DDP, torch.compile) are removed.
    """
    obj, _ = read_file(path)
    return state_dict_from_object(obj, str(path))


def config_from_object(obj: dict[str, Any], meta: dict[str, str]) -> ModelConfig | None:
    """The model config stored in safetensors metadata ``config`` or a training dict's ``config``."""
    try:
        raw: Any = json.loads(meta["config"]) if "config" in meta else obj.get("config")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the checkpoint's stored config is not valid JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict):
        return None
    try:
        return ModelConfig.from_dict(raw)
    except DyditError as e:
        raise CheckpointError(f"the checkpoint's stored model config is invalid: {e}") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], ModelConfig | None]:
    """(normalised state dict, stored model config or None) of a checkpoint file, reading it once."""
    obj, meta = read_file(path)
    return state_dict_from_object(obj, str(path)), config_from_object(obj, meta)


def checkpoint_config(path: str | os.PathLike) -> ModelConfig | None:
    """The model config stored with a checkpoint (safetensors metadata or a training dict), if any."""
    return read_checkpoint(path)[1]


def guess_preset(sd: dict[str, Tensor]) -> str | None:
    """Name the preset whose shapes match a state dict (depth, width, patch size), if one does."""
    try:
        width = sd["pos_embed"].shape[-1]
        patch = sd["x_embedder.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except (KeyError, ValueError, IndexError):
        return None
    dynamic = any(".attn_rate." in k or ".token_selection." in k for k in sd)
    for name, cfg in MODEL_PRESETS.items():
        if (cfg.depth, cfg.hidden_size, cfg.patch_size) == (depth, width, patch):
            return ("DyDiT" + name[3:]) if dynamic else name
    return None


def describe_mismatch(model: nn.Module, sd: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``sd`` relative to ``model``'s state dict."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    misshaped = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    )
    return missing, unexpected, misshaped


def _abbrev(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def fit_state_dict(model: nn.Module, sd: dict[str, Tensor], allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Load ``sd`` into ``model`` strictly, or raise a CheckpointError naming every mismatch.

    Keys of the model that contain one of ``allow_missing`` substrings may be absent from ``sd``
    (they keep their initialisation); those keys are returned.
    """
    missing, unexpected, misshaped = describe_mismatch(model, sd)
    tolerated = [k for k in missing if any(s in k for s in allow_missing)]
    missing = [k for k in missing if k not in tolerated]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_abbrev(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_abbrev(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys: {_abbrev(misshaped, 3)}")
        guess = guess_preset(sd)
        hint = f"; the checkpoint looks like {guess}" if guess else ""
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts) + hint)
    model.load_state_dict(sd, strict=False)
    return tolerated


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
