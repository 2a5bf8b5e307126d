"""Rank-0 logging: text through ``logging`` handlers, scalars to ``stats.jsonl`` (and TensorBoard).

docs/ARCHITECTURE.md §6.4: only the main process writes; other ranks get a logger with a
``NullHandler``, and ``print`` is never patched. Scalars go through one function,
:func:`report`, which anything (the training step, a router, an evaluator) may call; they are
collected until the active :class:`RunLogger` flushes them as one JSON line per step::

    with RunLogger(run_dir) as log:
        report("loss", 0.12)
        report("flops/ratio", 0.51)
        log.flush(step=100)       # {"step": 100, "loss": 0.12, "flops/ratio": 0.51, "time": ...}

TensorBoard event files are written too when the ``tensorboard`` package is installed (an
optional dependency, imported lazily).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from dydit import distributed
from dydit.errors import DyditError
from dydit.io import save_text

LOGGER_NAME = "dydit"
STATS_FILE = "stats.jsonl"
LOG_FILE = "log.txt"
TENSORBOARD_DIR = "tensorboard"

# ``logger.info(msg, extra={FILE_ONLY: True})`` writes to ``log.txt`` only (a progress bar shows it).
FILE_ONLY = "dydit_file_only"

_active: RunLogger | None = None


def get_logger(run_dir: str | os.PathLike | None = None, *, console: bool = True) -> logging.Logger:
    """The ``dydit`` logger: on rank 0 it writes to stderr and ``run_dir/log.txt``; elsewhere nowhere."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not distributed.is_main():
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        stream.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
        logger.addHandler(stream)
    if run_dir is not None:
        file = _QuietFileHandler(Path(run_dir) / LOG_FILE)
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class _QuietFileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk) print one warning line, not a traceback per message.

    A lost log line is not worth stopping a run for; the checkpoint writes report a full disk clearly.
    """

    _warned = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self._warned:
            self._warned = True
            err = sys.exc_info()[1]
            reason = getattr(err, "strerror", None) or err
            print(f"dydit: warning: cannot write {self.baseFilename}: {reason}", file=sys.stderr)
        # Drop the stream with the unwritable bytes (closing it fails the same way, but closes it);
        # the next record reopens the file in append mode and tries again.
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def report(name: str, value: float) -> None:
    """Record scalar ``name`` for the current step; a no-op when no :class:`RunLogger` is active."""
    if _active is not None:
        _active.pending[name] = float(value)


class RunLogger:
    """Writes ``stats.jsonl`` (one JSON object per flushed step) and TensorBoard scalars on rank 0.

    Use as a context manager; while open it is the target of :func:`report`.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = distributed.is_main()
        self.pending: dict[str, float] = {}
        self._start = time.time()
        self._stats = None
        self._tb = None
        if self.enabled:
            self._stats = open(self.run_dir / STATS_FILE, "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                self._tb = _tensorboard_writer(self.run_dir / TENSORBOARD_DIR)

    def __enter__(self) -> RunLogger:
        global _active
        _active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def flush(self, step: int, scalars: dict[str, float] | None = None) -> dict[str, float]:
        """Write the reported scalars (plus ``scalars``) for ``step``; returns what was written."""
        values = {**self.pending, **(scalars or {})}
        self.pending = {}
        if self.enabled and values:
            record = {"step": int(step), "time": round(time.time() - self._start, 3)}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
            assert self._stats is not None
            try:
                self._stats.write(json.dumps(record) + "\n")
                self._stats.flush()
            except OSError as e:
                raise DyditError(f"cannot write {self.run_dir / STATS_FILE}: {e.strerror or e}") from None
            if self._tb is not None:
                for k, v in values.items():
                    self._tb.add_scalar(k, v, step)
                self._tb.flush()
        return values

    def close(self) -> None:
        global _active
        if _active is self:
            _active = None
        if self._stats is not None:
            # Every record was flushed when written; a close can only fail on a write already reported.
            with contextlib.suppress(OSError):
                self._stats.close()
            self._stats = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(path: Path):
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path))


def truncate_stats(run_dir: str | os.PathLike, step: int) -> None:
    """Drop records after ``step`` (a resumed run logs those steps again)."""
    path = Path(run_dir) / STATS_FILE
    if not path.is_file():  # absent, or not a regular file (e.g. a link to /dev/full): nothing to drop
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [line for line in lines if (r := _record(line)) is not None and r.get("step", 0) <= step]
    if len(keep) != len(lines):  # rewritten atomically: a kill while rewriting must not lose the log
        save_text(path, "".join(line + "\n" for line in keep))


def _record(line: str) -> dict[str, Any] | None:
    """One stats record, or None for a blank or torn line (a write cut short by a kill or a full disk)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_stats(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's ``stats.jsonl`` (for tests, benchmarks and plots)."""
    path = Path(run_dir) / STATS_FILE
    if not path.exists():
        return []
    records = (_record(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [r for r in records if r is not None]


# The machine and numbers in reports ---------------------------------------------------------------
def device_name(device: str) -> str:
    """A readable name of the CPU (``/proc/cpuinfo``) or GPU behind ``device``."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_description(device: str = "cpu") -> str:
    """The CPU or GPU name and the torch thread count, for reports."""
    import torch

    n = torch.get_num_threads()
    return f"{device_name(device)}, {n} torch thread{'' if n == 1 else 's'}"


def format_number(value: Any, spec: str = ".3f") -> str:
    """``format(value, spec)``, or a dash for a missing value (None or NaN) in a report table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)
