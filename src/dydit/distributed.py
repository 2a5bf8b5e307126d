"""Process-group helpers that degrade to one process when torch.distributed is not initialised.

Launch under ``torchrun --nproc_per_node=N``: :func:`init` reads the environment, picks NCCL on
GPU and gloo on CPU. Every helper works uninitialised (rank 0 of a world of 1).

A run that succeeds tears the group down with :func:`destroy`; a run that fails ends with
:func:`exit_now`, which leaves it alone (see there why).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto", timeout_s: float = 600.0) -> str:
    """Join the process group if launched by torchrun; returns the device string for this rank.

    ``device``: "auto" (CUDA if available), "cpu" or "cuda". Under torchrun each rank takes
    ``cuda:LOCAL_RANK``; the backend is NCCL on CUDA and gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if use_cuda:
        return f"cuda:{local_rank()}" if is_initialized() else (device if device != "auto" else "cuda")
    return "cpu"


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` across ranks (a copy; ``x`` itself is unchanged). Identity in one process."""
    if not is_initialized():
        return x.detach().clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (a collective). Identity in one process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` after a failure, without tearing the process group down.

    Teardown after a failure races the peers: one may be inside a collective this rank never
    joined, another may already be gone. gloo can then throw on one of its own threads, and an
    uncaught C++ exception aborts the process (SIGABRT, exit status -6) after the one-line error
    was printed, so a scheduler sees a crash instead of exit ``code``. Leaving the group alone
    avoids that: the operating system closes this process's sockets, which is exactly how the
    peers learn that it failed. Standard streams and log files are flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
