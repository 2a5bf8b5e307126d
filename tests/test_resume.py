"""Exact resume: k steps, an interruption, and a rerun equal 2k steps in one go (bitwise on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from faultkit import HANG_GUARD_S, assert_same_state, wait_for

from dydit.log import read_stats
from dydit.train import state as ckpt
from dydit.train.config import TrainConfig
from dydit.train.loop import train

TINY = dict(depth=1, hidden_size=32, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "kind",
    [
        dict(model="DiT-Ti/2"),
        # DyDiT: Gumbel noise, stratified t, the lambda schedule and the complete-model loss cross the cut.
        dict(model="DyDiT-Ti/2", target=0.5, target_hold_steps=1, target_warmup_steps=4, complete_steps=3),
    ],
    ids=["dit", "dydit"],
)
def test_stop_and_rerun_equals_one_go(tmp_path, kind):
    base = dict(
        model_overrides=TINY, data="digits", batch_size=8, steps=6, ckpt_every=100, log_every=1,
        progress=False, flip=True, ema_decay=0.9, grad_guard="clip", grad_threshold=0.5, **kind,
    )  # fmt: skip
    one = TrainConfig(out_dir=str(tmp_path / "one"), **base)
    two = TrainConfig(out_dir=str(tmp_path / "two"), **base)
    train(one)
    first = train(two, stop_at=3)
    assert first.step == 3 and torch.load(first.state, weights_only=True)["step"] == 3
    second = train(two)
    assert second.step == 6
    assert_same_state(ckpt.state_path(one.out_dir), ckpt.state_path(two.out_dir))
    # The resumed run's log has one record per step, like the uninterrupted one, and the same losses.
    a, b = read_stats(one.out_dir), read_stats(two.out_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def _cli(out_dir, steps, extra=()):
    return [
        sys.executable, "-m", "dydit", "train", "--data", "digits", "--model", "DiT-Ti/2",
        "--model-option", "depth=1", "--model-option", "hidden_size=32", "--model-option", "num_heads=2",
        "--batch-size", "8", "--steps", str(steps), "--ckpt-every", "1", "--log-every", "1",
        "--out-dir", str(out_dir), "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_rerun_equals_one_go(tmp_path):
    """A real SIGKILL at an arbitrary moment (possibly mid-checkpoint), then a rerun of the same command."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 40
    subprocess.run(
        _cli(tmp_path / "one", steps), env=env, check=True, capture_output=True, timeout=HANG_GUARD_S
    )
    proc = subprocess.Popen(
        _cli(tmp_path / "two", steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = ckpt.state_path(tmp_path / "two")

    def third_checkpoint_written() -> bool:
        # The state file is replaced atomically, so whatever exists is whole.
        return state.exists() and torch.load(state, weights_only=True)["step"] >= 3

    # Kill it once its third checkpoint is on disk (an event, not a fixed wait: a loaded machine
    # only makes it come later).
    if not wait_for(proc, third_checkpoint_written) or proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 3 <= killed_at < steps
    rerun = subprocess.run(
        _cli(tmp_path / "two", steps), env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {tmp_path / 'two'} from step" in rerun.stderr
    assert_same_state(ckpt.state_path(tmp_path / "one"), state)


def test_restart_without_checkpoint_drops_the_dead_runs_log(tmp_path):
    """A run killed before its first checkpoint restarts from step 0; its log must not keep the
    records of the dead run beside the new ones."""
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), model="DiT-Ti/2", model_overrides=TINY, data="digits", batch_size=8,
        steps=3, ckpt_every=100, log_every=1, progress=False,
    )  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "stats.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    train(cfg)
    records = read_stats(cfg.out_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] != 9.0 for r in records)
