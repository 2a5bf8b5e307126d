"""The ``dydit`` command line. Each subcommand lives in its own module of this package.

A subcommand module defines ``register(subparsers) -> None``, which adds a parser whose defaults
set ``func`` to a callable taking the parsed arguments. Modules are discovered automatically.
User errors (:class:`~dydit.errors.DyditError`, bad files, bad options) end in a one-line message
and a non-zero exit; ``--debug`` shows the traceback instead. Output piped into a reader that
stops early (``dydit inspect X | head``) ends quietly, as standard tools do (status 141).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import select
import signal
import sys

from dydit.errors import DyditError

# How gloo and NCCL report a collective whose peer process died (the peer prints the real cause).
_PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "remote process exited")

# Subcommands listed first appear first in --help; others follow alphabetically.
_ORDER = ("demo", "train", "finetune", "sample", "evaluate", "flops", "bench", "export", "inspect")


def _subcommand_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    from dydit.version import __version__

    parser = argparse.ArgumentParser(
        prog="dydit",
        description="DyDiT: Dynamic Diffusion Transformers (timestep-wise dynamic width, "
        "spatial-wise dynamic tokens) on top of DiT.",
    )
    parser.add_argument("--version", action="version", version=f"dydit {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _subcommand_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in argv
    try:
        result = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the error boundary
        distributed = _joined_distributed()
        if distributed is not None:
            distributed.barrier()  # no process leaves while another still runs its part of the command
    except KeyboardInterrupt:
        print("dydit: interrupted", file=sys.stderr)
        return _end(130)
    except Exception as e:  # noqa: BLE001 - the CLI's single error boundary
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            return _end(_quiet_broken_pipe())
        if debug:
            raise
        if isinstance(e, DyditError):
            msg = str(e)
        elif isinstance(e, OSError):
            msg = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        elif isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_FAILURES):
            msg = "another process of this distributed run failed (its own error names the cause); stopping"
        else:
            msg = f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback"
        print(
            f"dydit {args.command}: error: {msg.splitlines()[0] if msg else type(e).__name__}",
            file=sys.stderr,
        )
        return _end(1)
    return _end(int(result or 0))


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (``dydit inspect X | head``)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # stdout closed or replaced
        return False


def _quiet_broken_pipe() -> int:
    """End as ``cat`` or ``grep`` do when the reader of their output stops early: no message, and the
    status of a process ended by SIGPIPE (141). Python's exit-time flush of stdout would complain
    too, so stdout is pointed at /dev/null first."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + signal.SIGPIPE


def _joined_distributed():
    """The module ``dydit.distributed`` when this process joined a process group, else None."""
    distributed = sys.modules.get("dydit.distributed")  # never imported: no group (and no torch import)
    return distributed if distributed is not None and distributed.is_initialized() else None


def _end(code: int) -> int:
    """``code`` to return; a process of a distributed run ends here instead, with ``code``, so that
    gloo's teardown cannot abort it (``distributed.exit_now``): after a success its group is closed
    first, after a failure it is left to the operating system."""
    distributed = _joined_distributed()
    if distributed is None:
        return code
    if code == 0:
        distributed.destroy()
    distributed.exit_now(code)


if __name__ == "__main__":
    sys.exit(main())
