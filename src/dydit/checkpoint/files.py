"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` or safetensors, nothing else.

The one object besides tensors and plain containers that is let through is ``argparse.Namespace``:
the official DiT, DyDiT and SiT training scripts pickle their command-line ``args`` into every
checkpoint. A Namespace is a bag of attributes (its unpickling sets ``__dict__`` and runs no code),
and it is allowed only for the duration of one ``torch.load`` call; a file naming any other
global is refused as before.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dydit.errors import CheckpointError, DyditError
from dydit.presets import ModelConfig, UViTConfig, config_from_dict

_PREFIXES = ("module.", "_orig_mod.")
# The globals official training dicts need beyond what weights_only loading allows by default.
TRAINING_DICT_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
# Entries of a training dict that hold weights, in order of preference (EMA first, as DiT's find_model).
WEIGHT_ENTRIES: tuple[str, ...] = ("ema", "model", "state_dict", "module")


def _strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError, ...
        first = str(e).strip().split("\n")[0] or type(e).__name__
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first}") from None


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(TRAINING_DICT_GLOBALS)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
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


def read_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read one checkpoint file as (object, safetensors metadata). Raises CheckpointError on any failure.

    ``.safetensors`` files go through safetensors; anything else through
    ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed for this call only.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj, {}


def weights_entry(obj: Mapping[str, Any], prefer: str = "ema") -> str | None:
    """The entry of a training dict that holds the weights (``prefer`` first), or None for a raw dict."""
    order = (prefer, *(k for k in WEIGHT_ENTRIES if k != prefer))
    return next((k for k in order if isinstance(obj.get(k), dict) and obj[k]), None)


def state_dict_from_object(
    obj: Mapping[str, Any], source: str = "checkpoint", prefer: str = "ema"
) -> dict[str, Tensor]:
    """Pick the weights out of a loaded object: ``ema`` preferred, then ``model``, else the dict itself.

    ``module.`` and ``_orig_mod.`` key prefixes (DDP, torch.compile) are removed.
    """
    entry = weights_entry(obj, prefer)
    if entry is not None:
        obj = obj[entry]
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} contains no tensors")
    return _strip_prefixes(tensors)


def parse_json(text: str | bytes, source: str) -> Any:
    """``json.loads(text)``, or a one-line CheckpointError naming ``source``: where the JSON is invalid,
    or that it nests too deeply or holds a number too long for Python to parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{source} is not usable JSON: it nests deeper than Python parses") from None
    except ValueError as e:  # a number of more than 4300 digits; undecodable bytes
        raise CheckpointError(f"{source} is not usable JSON ({str(e).splitlines()[0]})") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in a file (CheckpointError, naming the file, if it cannot be read or parsed)."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_json(text, str(path))


def stored_run_config(
    obj: Mapping[str, Any], meta: Mapping[str, str], source: str = "the checkpoint"
) -> dict[str, Any] | None:
    """The run configuration stored by dydit: safetensors metadata ``config`` or a dict's ``config``."""
    if "config" in meta:
        raw: Any = parse_json(meta["config"], f"the config stored in {source}")
    else:
        raw = obj.get("config")
    return raw if isinstance(raw, dict) else None


def config_from_object(
    obj: Mapping[str, Any], meta: Mapping[str, str], source: str = "the checkpoint"
) -> ModelConfig | UViTConfig | None:
    """The model config stored in safetensors metadata ``config`` or a training dict's ``config``."""
    raw: Any = stored_run_config(obj, meta, source)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict):
        return None
    try:
        return config_from_dict(raw)  # a DiT's, or a U-ViT's (``"family": "U-ViT"``)
    except DyditError as e:
        raise CheckpointError(f"the model config stored in {source} is invalid: {e}") from None


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


def check_finite(sd: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """CheckpointError naming the first floating-point tensor of ``sd`` that holds NaN or inf: such
    weights produce no images, and a file that passes them on hides the damage (``dydit export``)."""
    for name, value in sd.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise CheckpointError(
                f"{source}: tensor {name} holds {bad} values; refusing to export broken weights"
            )
