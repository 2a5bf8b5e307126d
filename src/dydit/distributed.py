"""Process-group helpers that degrade to one process when torch.distributed is not initialised.

Launch under ``torchrun --nproc_per_node=N``: :func:`init` reads the environment, picks NCCL on
GPU and gloo on CPU. Every helper works uninitialised (rank 0 of a world of 1).

A process of a distributed run ends with :func:`exit_now` (after :func:`destroy` when it succeeded),
not with the interpreter's own teardown, which gloo can turn into an abort (see there).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from dydit.errors import DyditError


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


_DEVICE = re.compile(r"cuda(:\d+)?")


def check_device(device: str) -> str:
    """``device`` as torch names it, refused unless this machine has it: ``auto`` (CUDA if
    available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, or ``mps`` where the MPS backend is
    available. Anything else (``tpu``, ``gpu``, ...) is a one-line error naming the value."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if _DEVICE.fullmatch(device):
        if not torch.cuda.is_available():
            raise DyditError(f"device {device!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if ":" in device and int(device.partition(":")[2]) >= count:
            raise DyditError(f"device {device!r} requested but this machine has {count} CUDA device(s)")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DyditError("device 'mps' requested but the MPS backend is not available on this machine")
        return device
    raise DyditError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps")


def init(device: str = "auto", timeout_s: float = 600.0) -> str:
    """Join the process group if launched by torchrun; returns the device string for this rank.

    ``device``: "auto" (CUDA if available), "cpu", "cuda", "cuda:N" or "mps" (:func:`check_device`:
    anything else is a DyditError). Under torchrun each CUDA rank takes ``cuda:LOCAL_RANK``; the
    backend is NCCL on CUDA and gloo otherwise.
    """
    device = check_device(device)
    use_cuda = device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if use_cuda and is_initialized():
        return f"cuda:{local_rank()}"
    return device


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
    """End this process with exit status ``code``, skipping the interpreter's own teardown.

    gloo's teardown can kill a process that has done its work: its C++ worker threads and pending
    work objects are destroyed in an order that sometimes calls ``std::terminate`` (SIGABRT, exit
    status -6). Seen in this project's tests: on a failed training rank in CI, and, with
    "terminate called without an active exception", after a successful torchrun sampling run on a
    busy machine. So a distributed process ends here instead. After a success, call :func:`destroy` first
    (every rank has finished, so the group closes in order). After a failure, do not: a peer may
    be inside a collective this rank never joined, or already gone, and tearing the group down
    races it; the operating system closes this process's sockets, which is exactly how the peers
    learn that it failed. Standard streams and log files are flushed before the end.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
