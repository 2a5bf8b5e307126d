"""The CLI: --help on every subcommand, one-line errors and non-zero exits on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from faultkit import HANG_GUARD_S

from dydit.cli import _subcommand_modules, build_parser, main


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
