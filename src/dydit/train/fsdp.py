"""Sharded training: FSDP2 (``fully_shard``) and distributed checkpoints (docs/TRAINING.md, "FSDP").

``--fsdp`` under torchrun shards every parameter, its gradient and its AdamW state over the
processes (docs/ARCHITECTURE.md §6.4): each block is one ``fully_shard`` unit (its units' linears,
token router and TD-LoRA adapters together: all-gathered for the block's pass, freed after it),
each width router and TD-LoRA router a small unit of its own (they are called on e, outside the
block's pass), and the model itself the root unit (embedders and final layer). The DyDiT's
entry points that are not ``forward`` (``forward_with_routing``, each block's ``forward_masked``)
are registered with FSDP so that they gather their parameters too. The EMA copy is sharded the
same way. Activation checkpointing (``grad_checkpointing``) wraps the blocks' methods first, so
FSDP gathers outside the checkpointed region.

``fsdp_mixed_precision="bf16"``: parameters are gathered in bfloat16 for compute; gradients are
reduced and kept in float32, as are the sharded master weights and the optimizer state.

Checkpoints: the model, EMA and optimizer shards go to a distributed checkpoint
(``torch.distributed.checkpoint``) in ``checkpoints/sharded-NNNNNNN/``, written by every rank;
rank 0 then writes ``checkpoints/state.pt`` as for any run, with everything else (step, data
position, RNG, config) and ``"sharded"``: the folder's name instead of the tensors. A kill before
state.pt is replaced leaves the previous state and its folder as they were. :func:`read_sharded`
reads such a folder in one process, unsharded (``dydit export``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dydit.errors import CheckpointError, DyditError

SHARDED_PREFIX = "sharded-"


def _fsdp():
    try:
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )
    except ImportError as e:  # pragma: no cover - torch without FSDP2
        raise DyditError(f"--fsdp needs torch.distributed.fsdp.fully_shard (FSDP2): {e}") from None
    return MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def shard(model: nn.Module, mixed_precision: str = "none") -> nn.Module:
    """Shard ``model`` (in place) over the default process group: each block, then the root."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise DyditError("--fsdp shards over the processes of a torchrun launch: run it under torchrun")
    policy_cls, fully_shard, register = _fsdp()
    policy = (
        policy_cls(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else policy_cls()
    )
    for block in model.blocks:
        # The width routers (and TD-LoRA's) run on e before or beside the block's pass: each is a
        # unit of its own, gathered when it is called (a few hundred numbers).
        for name in ("attn_rate", "mlp_rate", "lora"):
            router = getattr(getattr(block, name, None), "router", None)
            if isinstance(router, nn.Module):
                fully_shard(router, mp_policy=policy)
        fully_shard(block, mp_policy=policy)
        if hasattr(block, "forward_masked"):
            register(block, "forward_masked")
    fully_shard(model, mp_policy=policy)
    if hasattr(model, "forward_with_routing"):
        register(model, "forward_with_routing")
    return model


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a shard (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def full_state_dict(module: nn.Module, keep=None) -> dict[str, Tensor]:
    """The module's state dict gathered one tensor at a time (every rank calls it; all get it, on
    the CPU). ``keep(name)`` picks the entries (a TD-LoRA export gathers adapters and routers only)."""
    out = {}
    for k, v in module.state_dict().items():
        if keep is None or keep(k):
            out[k] = full_tensor(v).detach().cpu().clone()
    return out


# Distributed checkpoints -------------------------------------------------------------------------
def _state_dicts(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "ema": get_model_state_dict(ema), "optimizer": osd}


def sharded_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{SHARDED_PREFIX}{step:07d}"


def save_sharded(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, optimizer) -> str:
    """Every rank writes its shards of model, EMA and optimizer for ``step``; returns the folder name
    (relative to ``checkpoints/``), for state.pt to point at."""
    import torch.distributed.checkpoint as dcp

    target = sharded_dir(run_dir, step)
    dcp.save(_state_dicts(model, ema, optimizer), checkpoint_id=str(target))
    return target.name


def load_sharded(run_dir: Path, name: str, model: nn.Module, ema: nn.Module, optimizer) -> None:
    """Load a distributed checkpoint into the sharded model, EMA and optimizer (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    folder = Path(run_dir) / "checkpoints" / name
    if not folder.is_dir():
        raise CheckpointError(f"the sharded checkpoint {folder} that state.pt names is missing")
    sd = _state_dicts(model, ema, optimizer)
    dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    set_model_state_dict(ema, sd["ema"])


def prune_sharded(run_dir: Path, keep: set[str]) -> None:
    """Delete the sharded folders that no kept state (state.pt, numbered states) names."""
    for folder in (Path(run_dir) / "checkpoints").glob(f"{SHARDED_PREFIX}*"):
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def read_sharded(folder: str | Path, which: str = "ema") -> dict[str, Tensor]:
    """One entry (``ema`` or ``model``) of a distributed checkpoint, unsharded, in this process."""
    # A private helper of torch.distributed.checkpoint (torch 2.13): load the named entries whole,
    # with no process group and no template to load into.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"sharded checkpoint not found: {folder}")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            sd = _load_state_dict_from_keys(keys={which}, checkpoint_id=str(folder))
    except Exception as e:  # noqa: BLE001 - CheckpointException and the reader's errors
        first = str(e).strip().split("\n")[0] or type(e).__name__
        raise CheckpointError(f"cannot read the sharded checkpoint {folder}: {first}") from None
    return {k: v for k, v in sd[which].items() if isinstance(v, Tensor)}
