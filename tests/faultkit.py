"""Helpers of the fault and hostile-input suites (docs/RELIABILITY.md).

Faults are injected for real: a subprocess runs ``dydit`` after a short *preamble* that patches one
writer to SIGKILL its own process halfway through a file, or a rank to raise; full and read-only
disks are real tmpfs mounts in a private mount namespace (``unshare -rm``) where the kernel allows
one, else a real ``/dev/full`` or a monkeypatched ``OSError``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import tiny_config
from safetensors.torch import save_file

from dydit.cli import main
from dydit.factory import build_model

# Subprocess time limits are guards against a hung command, never a measurement: generous enough
# for a loaded machine (the suite's checks wait on files, pipes and exits instead).
HANG_GUARD_S = 600
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# A 2-process launch on this machine; the script and its arguments follow.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CLI = "import sys\nfrom dydit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
TINY_MODEL = [arg for kv in ("depth=1", "hidden_size=32", "num_heads=2") for arg in ("--model-option", kv)]


def train_args(out_dir: Path | str, steps: int, *extra: str) -> list[str]:
    """``dydit train`` of a 1-block DiT on digits, a checkpoint every step."""
    return [
        "train", "--data", "digits", "--model", "DiT-Ti/2", *TINY_MODEL, "--batch-size", "8",
        "--steps", str(steps), "--ckpt-every", "1", "--log-every", "1", "--no-progress",
        "--device", "cpu", "--out-dir", str(out_dir), *extra,
    ]  # fmt: skip


def sample_args(ckpt: Path, out_dir: Path, n: int, *extra: str) -> list[str]:
    """``dydit sample`` of ``n`` images into ``out_dir`` (PNG per image, an .npz next to it)."""
    return [
        "sample", "--checkpoint", str(ckpt), "--steps", "2", "--device", "cpu", "--no-progress",
        "--num-samples", str(n), "--batch-size", "4", "--out-dir", str(out_dir), "--npz",
        "--grid", str(out_dir.parent / f"{out_dir.name}-grid.png"), *extra,
    ]  # fmt: skip


def cli_command(args: list[str], preamble: str = "") -> list[str]:
    return [sys.executable, "-c", preamble + "\n" + CLI, *args]


def run_cli(
    args: list[str], preamble: str = "", timeout: float = HANG_GUARD_S, **kw
) -> subprocess.CompletedProcess:
    """Run ``dydit ARGS`` in a fresh interpreter after ``preamble``; capture its output."""
    return subprocess.run(
        cli_command(args, preamble), env=ENV, capture_output=True, text=True, timeout=timeout, **kw
    )


def start_cli(args: list[str], preamble: str = "") -> subprocess.Popen:
    """Start ``dydit ARGS`` after ``preamble`` with pipes: stdin to release it, stdout for its markers."""
    return subprocess.Popen(
        cli_command(args, preamble), env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# A preamble that pauses the command inside CALL (a ``module.function`` it calls by module lookup):
# after the COUNT-th call returns, it prints "paused" on stdout and waits for a line on stdin.
PAUSE_AFTER = """
import sys, importlib
_mod, _name = {call!r}.rsplit(".", 1)
_mod = importlib.import_module(_mod)
_real, _calls = getattr(_mod, _name), [0]
def _paused(*args, **kwargs):
    out = _real(*args, **kwargs)
    _calls[0] += 1
    if _calls[0] == {count}:
        print("paused", flush=True)
        sys.stdin.readline()
    return out
setattr(_mod, _name, _paused)
"""


def wait_paused(proc: subprocess.Popen, timeout: float = HANG_GUARD_S) -> None:
    """Block until ``proc`` (started with a PAUSE_AFTER preamble) prints "paused"; fail if it exits first."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "paused":
        proc.kill()
        raise AssertionError(f"the command did not pause (exit {proc.wait()}): {proc.stderr.read()[-3000:]}")


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], poll: float = 0.05) -> bool:
    """Wait until ``condition()`` holds (True) or ``proc`` exits first (False); no deadline.

    The waits are ``proc.wait`` calls, so an exit is seen at once; a hung command is left to the
    caller's own guard (pytest's, or a ``wait(timeout=...)`` after this).
    """
    while not condition():
        try:
            proc.wait(timeout=poll)
        except subprocess.TimeoutExpired:
            continue
        return condition()
    return True


def tree_snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file below ``directory``: equal snapshots, untouched files."""
    snapshot = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            st = p.stat()
            snapshot[str(p.relative_to(directory))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return snapshot


def error_line(stderr: str, command: str | None = None) -> str:
    """The one-line error that ends ``stderr``; fails on a traceback or a second error line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines, "no error message at all"
    errors = [line for line in lines if line.startswith("dydit") and "error:" in line]
    assert errors and errors[-1] == lines[-1] and len(errors) == 1, stderr[-3000:]
    if command is not None:
        assert lines[-1].startswith(f"dydit {command}: error: "), lines[-1]
    return lines[-1]


def cli_error(args: list[str], capsys, command: str | None = None) -> str:
    """Run ``dydit ARGS`` in-process; it must fail with exit status 1 or 2 and one error line."""
    try:
        rc = main(args)
    except SystemExit as e:  # argparse: usage line(s), then one error line
        rc = e.code
    out = capsys.readouterr()
    assert rc in (1, 2), f"expected a failure, got exit status {rc}\n{out.err[-2000:]}"
    line = error_line(out.err, command)
    assert "internal error" not in line, line
    return line


def assert_same_state(a_path: Path, b_path: Path) -> None:
    """Two training states hold bitwise-equal step, data position, weights, EMA and optimizer."""
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert (a["step"], a["data"]) == (b["step"], b["data"])
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"


def temp_files(directory: Path) -> list[Path]:
    """Hidden temporary files (``.NAME.tmp*``) anywhere below ``directory``."""
    return sorted(p for p in directory.rglob(".*") if ".tmp" in p.name)


def save_tiny(path: Path, model=None, **overrides) -> Path:
    """A tiny 3-channel DiT (or ``model``) as safetensors with its config, outputs away from zero."""
    if model is None:
        model = build_model(tiny_config(in_channels=3, **overrides))
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"config": json.dumps({"model": model.config.to_dict()})})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def can_mount_tmpfs() -> bool:
    """Whether ``unshare -rm`` may mount a tmpfs here (unprivileged user namespaces allowed)."""
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && mount -o remount,ro $d"
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def in_tmpfs(script: str, size_kib: int, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Run the shell ``script`` with a fresh ``size_kib`` tmpfs mounted at ``$MNT`` (private namespace).

    ``$DYDIT`` runs the CLI. The mount vanishes with the namespace: copy what the test must inspect
    to a host path inside ``script``.
    """
    dydit = f"{sys.executable} -m dydit"
    body = f'MNT=$(mktemp -d) && mount -t tmpfs -o size={size_kib}k tmpfs "$MNT" && DYDIT="{dydit}"\n{script}'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", body], env=ENV, capture_output=True, text=True, timeout=timeout
    )
