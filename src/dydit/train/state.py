"""Training states and EMA exports (docs/METHOD.md §6.2, §12; docs/ARCHITECTURE.md §6.3).

Two kinds of files, as in k-diffusion and EDM2:

- the **training state** ``checkpoints/state.pt``: model, EMA, optimizer, step, data position,
  RNG states (as tensors), the config as a plain dict and the package version. Only dicts,
  lists, numbers, strings and tensors, so it loads with ``torch.load(weights_only=True)``.
- **numbered states** ``checkpoints/NNNNNNN.pt`` (the step, seven digits, as the official DiT
  names its checkpoints): each saved state is also kept under its step, as a hard link to the
  bytes of ``state.pt`` (a copy where links are not supported), the newest ``keep`` of them.
- the **EMA export** ``ema.safetensors``: the EMA weights, with the configuration as JSON under
  the metadata key ``"config"`` (``{"model": ModelConfig.to_dict(), "data": ..., "train": ...}``),
  which is what sampling and evaluation load (:func:`dydit.checkpoint.checkpoint_config`).

Every write goes through :func:`dydit.io.atomic_write`: a temporary file in the same directory,
flushed to disk, then ``os.replace``-d over the old file, so the previous checkpoint stays intact
until the new one is complete and a failed write (full disk, no permission) loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dydit.checkpoint.files import check_finite, read_file
from dydit.checkpoint.formats import DYDIT_STATE_FORMAT
from dydit.errors import CheckpointError, DyditError
from dydit.io import atomic_write

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
EXPORT_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FORMAT = DYDIT_STATE_FORMAT
STATE_VERSION = 1
_NUMBERED = re.compile(r"\d{7,}\.pt")


def state_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / STATE_FILE


def export_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EXPORT_FILE


def numbered_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{step:07d}.pt"


def numbered_states(run_dir: str | os.PathLike) -> list[Path]:
    """The run's numbered training states, oldest first."""
    found = (Path(run_dir) / CHECKPOINT_DIR).glob("*.pt")
    return sorted((p for p in found if _NUMBERED.fullmatch(p.name)), key=lambda p: int(p.stem))


def keep_numbered(state_file: str | os.PathLike, step: int, keep: int) -> Path:
    """Keep the state just written to ``state_file`` as ``NNNNNNN.pt`` beside it, then delete all
    but the newest ``keep`` numbered states (0: keep every one). Returns the numbered file."""
    state_file = Path(state_file)
    target = numbered_path(state_file.parent.parent, step)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(state_file, tmp)  # the same bytes under a second name: no second copy on disk
        os.replace(tmp, target)
    except OSError:  # a file system without hard links: a real (atomic) copy
        with contextlib.suppress(OSError):
            tmp.unlink()
        atomic_write(target, lambda t: shutil.copyfile(state_file, t))
    if keep > 0:
        for old in numbered_states(state_file.parent.parent)[:-keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return target


# RNG states as tensors ------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The torch CPU and CUDA generator states, as uint8 tensors."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# Training state -------------------------------------------------------------------------------
def _cpu_state_dict(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def make_state(
    *,
    model: nn.Module | None,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    data: dict[str, int],
    config: dict[str, Any],
    model_config: dict[str, Any],
    data_info: dict[str, Any],
    init_sha256: str | None = None,
    sharded: str | None = None,
) -> dict[str, Any]:
    """The training state as plain containers and tensors (``weights_only``-loadable).

    ``init_sha256`` pins the ``init_from`` file a fine-tune started from (checked on resume).
    ``sharded``: model, EMA and optimizer are in that distributed checkpoint beside the state
    (``checkpoints/NAME``, train/fsdp.py); the state holds none of their tensors.
    """
    from dydit.version import __version__

    tensors: dict[str, Any] = {"sharded": sharded, "model": {}, "ema": {}, "optimizer": {}}
    if sharded is None:
        tensors = {
            "model": _cpu_state_dict(model),
            "ema": _cpu_state_dict(ema),
            "optimizer": optimizer.state_dict(),
        }
    return {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "version": __version__,
        "step": int(step),
        **tensors,
        "data": dict(data),
        "rng": capture_rng(),
        "config": {"model": model_config, "data": data_info, "train": config, "init_sha256": init_sha256},
    }


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write a training state made by :func:`make_state`."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``; CheckpointError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"training state not found: {path}")
    state, _ = read_file(path)  # weights_only; corrupt or code-carrying files raise CheckpointError
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a dydit training state")
    return state


# EMA export -----------------------------------------------------------------------------------
def export_weights(
    path: str | os.PathLike,
    module: nn.Module,
    config: dict[str, Any],
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Atomically write ``module``'s weights as safetensors with ``config`` (JSON) under "config"."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    return export_tensors(path, tensors, config, extra_metadata)


def export_tensors(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """:func:`export_weights` of a state dict already at hand (a sharded model's, gathered)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"config": json.dumps(config), "format": "pt", **(extra_metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def export_state(state_file: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """Write the ``ema`` (or ``model``) weights of a training state as a safetensors export.

    Weights holding NaN or inf are refused (CheckpointError naming the tensor), nothing written."""
    from safetensors.torch import save_file

    if which not in ("ema", "model"):
        raise DyditError(f"export 'ema' or 'model' weights, not {which!r}")
    state = load_state(state_file)
    if state.get("sharded"):  # an FSDP run: the tensors are in its distributed checkpoint
        from dydit.train.fsdp import read_sharded

        state[which] = read_sharded(Path(state_file).parent / state["sharded"], which)
    tensors = {k: v.contiguous() for k, v in state[which].items()}
    check_finite(tensors, f"{state_file} ({which} weights)")
    config = {**state["config"], "step": state["step"], "version": state["version"], "weights": which}
    metadata = {"config": json.dumps(config), "format": "pt"}
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def export_run(source: str | os.PathLike, out: str | os.PathLike | None = None, which: str = "ema") -> Path:
    """:func:`export_state` of a state file or a run directory (its ``checkpoints/state.pt``).

    ``out`` defaults to ``<which>.safetensors`` next to the state file and must be a ``.safetensors``.
    """
    src = Path(source)
    if src.is_dir():
        src = state_path(src)
    target = Path(out) if out else src.parent / f"{which}.safetensors"
    if target.suffix != ".safetensors":
        raise DyditError(f"the export must be a .safetensors file, got {target}")
    return export_state(src, target, which=which)


def write_config(run_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Atomically write the resolved run config as ``config.json``."""
    text = json.dumps(config, indent=2) + "\n"
    return atomic_write(Path(run_dir) / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
