"""The CLI: --help on every subcommand, one-line errors and non-zero exits on bad input."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from faultkit import HANG_GUARD_S, cli_error, save_tiny, train_args

from dydit import distributed
from dydit.cli import _subcommand_modules, build_parser, main
from dydit.errors import DyditError


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_module_registers_a_subcommand() -> None:
    assert set(_subcommands()) >= {"flops"}
    assert len(_subcommands()) == len(_subcommand_modules())


@pytest.mark.parametrize("command", _subcommands())
def test_help_on_every_subcommand(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dydit " + command)
    # Every option documents itself.
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    undocumented = [a.dest for a in sub._actions if a.help is None]
    assert not undocumented, f"options without help text: {undocumented}"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dydit", *args], capture_output=True, text=True, timeout=HANG_GUARD_S
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["flops", "--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
        (["flops", "--model", "DiT-S/8", "--image-size", "200"], "not divisible by the patch size"),
        (["flops", "--model", "DiT-S/2", "--image-size", "250"], "divisible by 8"),
        (["flops", "--model", "DiT-S/2", "--image-size", "0"], "must be positive"),
    ],
)
def test_bad_input_is_one_line(args: list[str], needle: str) -> None:
    r = _run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    # The message is one line (argparse may print its usage lines above it).
    assert needle in r.stderr.strip().splitlines()[-1]


def test_debug_shows_traceback() -> None:
    r = _run("--debug", "flops", "--model", "DiT-Q/2")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_a_closed_output_pipe_ends_quietly(tmp_path) -> None:
    """``dydit inspect X | head`` ended with "error: Broken pipe"; a reader that stops early ends
    dydit as it ends ``cat``: no message, the status of SIGPIPE (141)."""
    ck = save_tiny(tmp_path / "tiny.safetensors")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dydit", "inspect", str(ck)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before dydit writes its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGPIPE, err
    assert "error" not in err and "Broken pipe" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "CPU", "mps"])
def test_devices_are_resolved_strictly(device, tmp_path, capsys) -> None:
    """``--device tpu`` / ``mps`` ran on the CPU without a word; now anything but auto, cpu, cuda,
    cuda:N (with CUDA) and mps (where available) is a one-line error naming the value."""
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and mps is not None and mps.is_available():
        pytest.skip("this machine has MPS")
    commands = {
        "sample": ["sample", "--model", "DiT-Ti/4", "--num-samples", "1", "--dry-run"],
        "bench": ["bench", "--dry-run"],
        "train": [*train_args(tmp_path / "run", 1), "--dry-run"],
        "evaluate": ["evaluate", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz")],
    }
    for command, args in commands.items():
        assert repr(device) in cli_error([*args, "--device", device], capsys, command)
    with pytest.raises(DyditError, match=repr(device)):
        distributed.init(device)
    assert distributed.check_device("cpu") == "cpu" and distributed.init("cpu") == "cpu"
    assert distributed.check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
