"""One writer per directory (issue 14): real processes racing for a run or sample directory.

A first command is paused by a preamble right after one of its writes (it prints "paused" and
waits on stdin), so the test knows it holds its directory; a second command on the same directory
must stop at once with one line naming the directory and the first one's pid, and leave every
file as it was. A SIGKILLed holder leaves its lock file behind, but the kernel has released the
lock: the rerun goes ahead. Each row is in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from faultkit import (
    ENV,
    HANG_GUARD_S,
    PAUSE_AFTER,
    assert_same_state,
    error_line,
    run_cli,
    sample_args,
    save_tiny,
    start_cli,
    train_args,
    tree_snapshot,
    wait_paused,
)

from dydit.apps.demo import DemoConfig, run_demo
from dydit.cli import main
from dydit.data.latents import encode_dataset
from dydit.errors import DyditError
from dydit.io import LOCK_FILE, locked_dir
from dydit.log import read_stats
from dydit.train import state as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

# Pause training once it has written config.json (no checkpoint yet: a second run with other options
# would not be refused as a resume) or after its 2nd checkpoint; sampling after its 4th PNG.
PAUSE_TRAIN_START = PAUSE_AFTER.format(call="dydit.train.state.write_config", count=1)
PAUSE_TRAIN = PAUSE_AFTER.format(call="dydit.train.state.export_weights", count=2)
PAUSE_SAMPLE = PAUSE_AFTER.format(call="dydit.sample.save_png", count=4)


def _refused(args: list[str], directory, holder: subprocess.Popen, command: str) -> None:
    """``dydit ARGS`` in a fresh process stops with one line naming ``directory`` and the holder's pid."""
    r = run_cli(args)
    assert r.returncode == 1, r.stderr[-2000:]
    line = error_line(r.stderr, command)
    assert f"{directory} is in use by another dydit process (pid {holder.pid})" in line, line


def test_two_train_runs_on_one_directory_the_second_stops_and_the_first_finishes_intact(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(train_args(ref, 4)) == 0  # what the first run alone produces
    first = start_cli(train_args(run, 4), PAUSE_TRAIN_START)
    try:
        wait_paused(first)
        before = tree_snapshot(run)
        assert "config.json" in before
        _refused(train_args(run, 4, "--seed", "7"), run, first, "train")  # another run, the same dir
        assert tree_snapshot(run) == before, "the refused run touched the directory"
        first.stdin.write("\n")
        first.stdin.close()
        assert first.wait(timeout=HANG_GUARD_S) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    config = json.loads((run / ckpt.CONFIG_FILE).read_text())
    assert config["train"]["seed"] == 0, "config.json is the first run's"
    assert [r["step"] for r in read_stats(run)] == [1, 2, 3, 4], "one stats record per step"
    assert_same_state(ckpt.state_path(ref), ckpt.state_path(run))  # as if it had run alone
    assert "stopped at step 4" in (run / "log.txt").read_text()
    assert not (run / LOCK_FILE).exists(), "a finished run removes its lock file"


def test_sigkilled_train_leaves_no_lock_that_blocks_the_rerun(tmp_path, capsys):
    run = tmp_path / "run"
    first = start_cli(train_args(run, 4), PAUSE_TRAIN)
    wait_paused(first)
    first.kill()  # SIGKILL while it holds the directory
    first.wait(timeout=HANG_GUARD_S)
    assert (run / LOCK_FILE).read_text().split()[0] == str(first.pid), "the dead holder's file is left"
    assert main(train_args(run, 4)) == 0  # the kernel released the lock with the process
    assert f"resuming {run} from step 2" in capsys.readouterr().err
    assert torch.load(ckpt.state_path(run), weights_only=True)["step"] == 4


def test_second_sampler_on_one_directory_stops_and_a_sigkilled_one_leaves_no_lock(tmp_path, capsys):
    ck = save_tiny(tmp_path / "tiny.safetensors")
    out, n = tmp_path / "samples", 12
    first = start_cli(sample_args(ck, out, n), PAUSE_SAMPLE)
    wait_paused(first)
    before = tree_snapshot(tmp_path)
    _refused(sample_args(ck, out, n), out, first, "sample")  # even the same command
    assert tree_snapshot(tmp_path) == before, "the refused sampler wrote something (PNG, grid or npz)"
    first.kill()
    first.wait(timeout=HANG_GUARD_S)
    assert (out / LOCK_FILE).exists()
    assert main(sample_args(ck, out, n)) == 0
    assert "(4 already there)" in capsys.readouterr().err
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (n, 8, 8, 3)
    assert not (out / LOCK_FILE).exists()


def test_demo_and_latent_cache_directories_are_locked_too(tmp_path):
    """In-process: a directory held by this process is refused to the demo and the latent cache."""
    from test_data import fake_encode, toy_dataset

    for name in ("demo", "cache"):
        with locked_dir(tmp_path / name):
            with pytest.raises(DyditError, match=rf"{name} is in use by another dydit process \(pid "):
                if name == "demo":
                    run_demo(DemoConfig.smoke(out_dir=str(tmp_path / name), progress=False))
                else:
                    encode_dataset(
                        toy_dataset(n=4), fake_encode, tmp_path / name, codec="fake", progress=False
                    )
            assert [p.name for p in (tmp_path / name).iterdir()] == [LOCK_FILE]  # nothing written
        assert not (tmp_path / name).exists(), "a directory nobody wrote is removed with its lock"


WAITER = """
import sys
from dydit.io import locked_dir
with locked_dir(sys.argv[1], wait=True):
    print("got it", flush=True)
"""


def test_a_shared_cache_waits_for_its_holder_instead_of_failing(tmp_path):
    """Caches (reference statistics, the classifier) are shared: a second user waits, then reuses."""
    cache = tmp_path / "cache"
    with locked_dir(cache, wait=True):
        (cache / "entry").write_text("written by the holder")
        waiter = subprocess.Popen(
            [sys.executable, "-c", WAITER, str(cache)], env=ENV, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = waiter.stderr.readline()  # printed just before it blocks on the lock
        assert line.strip() == f"dydit: waiting for pid {os.getpid()}, which is writing {cache}"
        assert waiter.poll() is None
    out, _ = waiter.communicate(timeout=HANG_GUARD_S)
    assert waiter.returncode == 0 and out.strip() == "got it"
    assert (cache / "entry").exists() and not (cache / LOCK_FILE).exists()
