"""Training states and EMA exports (METHOD.md §6.2, §12; DESIGN.md §3 rule 7).

Two kinds of files, as in k-diffusion and EDM2:

- the **training state** ``checkpoints/state.pt``: model, EMA, optimizer, step, data position,
  RNG states (as tensors), the config as a plain dict and the package version. Only dicts,
  lists, numbers, strings and tensors, so it loads with ``torch.load(weights_only=True)``.
- the **EMA export** ``ema.safetensors``: the EMA weights, with the configuration as JSON under
  the metadata key ``"config"`` (``{"model": ModelConfig.to_dict(), "data": ..., "train": ...}``),
  which is what sampling and evaluation load (:func:`dydit.checkpoint.checkpoint_config`).

Every write goes to a temporary file in the same directory, is flushed to disk, and then
``os.replace``-d over the old file: the previous checkpoint stays intact until the new one is
complete, and a failed write (full disk, no permission) loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from dydit.checkpoint.files import read_file
from dydit.checkpoint.formats import DYDIT_STATE_FORMAT
from dydit.errors import CheckpointError, DyditError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
EXPORT_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FORMAT = DYDIT_STATE_FORMAT
STATE_VERSION = 1


def state_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / STATE_FILE


def export_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EXPORT_FILE


_FILE_MODE = 0o666


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` left by writers killed mid-write (their process is gone).

    A SIGKILL during :func:`atomic_write` leaves ``.NAME.tmp-PID`` behind; for a large model that is
    gigabytes per interruption, so the next write of the same file clears them first.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _disk_full(directory: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then ``os.replace`` onto ``path``; raise DyditError on failure.

    The temporary file is removed when anything fails, and ``path`` keeps its previous content.
    Temporary files of ``path`` left by killed processes are removed first (:func:`remove_stale_temps`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE & ~_umask())  # some writers create private (0600) files
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        # torch.save reports a full disk as a short write ("unexpected pos"), without errno: a short
        # write fills the disk, so look at the free space before the partial file is removed.
        full = _disk_full(path.parent)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else f"{e}".strip().split("\n")[0]
        if full or (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e):
            reason = "no space left on device"
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise DyditError(f"cannot write {path}: {reason}{kept}") from None
    return path


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
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    data: dict[str, int],
    config: dict[str, Any],
    model_config: dict[str, Any],
    data_info: dict[str, Any],
    init_sha256: str | None = None,
) -> dict[str, Any]:
    """The training state as plain containers and tensors (``weights_only``-loadable).

    ``init_sha256`` pins the ``init_from`` file a fine-tune started from (checked on resume).
    """
    from dydit import __version__

    return {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "version": __version__,
        "step": int(step),
        "model": _cpu_state_dict(model),
        "ema": _cpu_state_dict(ema),
        "optimizer": optimizer.state_dict(),
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
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    metadata = {"config": json.dumps(config), "format": "pt", **(extra_metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def export_state(state_file: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """Write the ``ema`` (or ``model``) weights of a training state as a safetensors export."""
    from safetensors.torch import save_file

    if which not in ("ema", "model"):
        raise DyditError(f"export 'ema' or 'model' weights, not {which!r}")
    state = load_state(state_file)
    tensors = {k: v.contiguous() for k, v in state[which].items()}
    config = {**state["config"], "step": state["step"], "version": state["version"], "weights": which}
    metadata = {"config": json.dumps(config), "format": "pt"}
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_config(run_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Atomically write the resolved run config as ``config.json``."""
    text = json.dumps(config, indent=2) + "\n"
    return atomic_write(Path(run_dir) / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
