"""Training defaults that fit the documented use, and what a run tells its user (issue 22).

A fine-tune of any length reaches its FLOPs target with the default options, its EMA follows the
weights, and the run says where it ended: the ρ reached, the EMA file, numbered checkpoints, a log
line per window, how to resume after Ctrl-C.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dydit.cli import main
from dydit.cli.train import summary
from dydit.errors import DyditError
from dydit.train import loop
from dydit.train import state as ckpt
from dydit.train.config import TrainConfig, auto_target_schedule
from dydit.train.ema import ema_decay
from dydit.train.loop import train
from dydit.train.targets import target_schedule

TINY = dict(depth=1, hidden_size=32, num_heads=2)
RUN = ["--data", "digits", "--batch-size", "8", "--device", "cpu"]
TINY_OPTS = ["--model-option", "depth=1", "--model-option", "hidden_size=32", "--model-option", "num_heads=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / name), model="DiT-Ti/2", model_overrides=TINY, data="digits", batch_size=8,
        steps=4, ckpt_every=2, log_every=2, progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return train(tiny_run(out, "dit", steps=2)).export


# Defaults -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [20, 200, 1200])
def test_a_short_fine_tune_reaches_its_target_by_mid_run_with_the_defaults(steps):
    cfg = TrainConfig(model="DyDiT-Ti/2", target=0.5, steps=steps).resolved()
    lam = [target_schedule(k, 0.5, cfg.target_warmup_steps, cfg.target_hold_steps) for k in range(steps)]
    assert lam[0] == 1.0 and lam[steps // 2] == 0.5 and lam[-1] == 0.5
    assert cfg.ema_warmup


def test_long_runs_keep_the_papers_schedule():
    assert auto_target_schedule(2000) == {"target_hold_steps": 100, "target_warmup_steps": 1000}
    assert auto_target_schedule(200_000) == {"target_hold_steps": 100, "target_warmup_steps": 1000}
    explicit = TrainConfig(model="DyDiT-Ti/2", target=0.5, steps=200, target_warmup_steps=1000).resolved()
    assert explicit.target_warmup_steps == 1000 and explicit.target_hold_steps == 10


def test_the_default_ema_forgets_the_initial_weights():
    # Weight of the initial weights in the EMA after the default 1000 steps: prod of the decays.
    cfg = TrainConfig().resolved()
    kept = math.prod(ema_decay(k, cfg.ema_decay, cfg.ema_warmup) for k in range(cfg.steps))
    assert kept < 1e-3  # without the warm-up, 0.9999^1000 = 0.905


def test_a_resumed_run_keeps_the_schedule_it_started_with(tmp_path, dit_export):
    # A run recorded before the defaults became automatic (stored 1000 / 100 and no EMA warm-up)
    # resumes with the same command and keeps those values, whatever --steps says now.
    cfg = tiny_run(tmp_path, model="DyDiT-Ti/2", init_from=str(dit_export), target=0.5, steps=2)
    old = cfg.replace(target_warmup_steps=1000, target_hold_steps=100, ema_warmup=False)
    train(old)
    res = train(cfg.replace(steps=4))
    stored = torch.load(res.state, weights_only=True)["config"]["train"]
    assert res.step == 4
    kept = (stored["target_warmup_steps"], stored["target_hold_steps"], stored["ema_warmup"])
    assert kept == (1000, 100, False)
    with pytest.raises(DyditError, match="different configuration.*target_warmup_steps"):
        train(cfg.replace(steps=6, target_warmup_steps=3))


def test_dry_run_shows_the_resolved_schedule(capsys, tmp_path, dit_export):
    assert main(["finetune", *RUN, "--init-from", str(dit_export), "--target", "0.5", "--steps", "200",
                 "--out-dir", str(tmp_path / "ft"), "--dry-run"]) == 0  # fmt: skip
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["target_warmup_steps"], cfg["target_hold_steps"], cfg["ema_warmup"]) == (100, 10, True)


# What the end of a run says -------------------------------------------------------------------------
def test_finetune_ends_with_the_rho_reached_and_warns_when_far_from_the_target(capsys, tmp_path, dit_export):
    out = tmp_path / "ft"
    assert main(["finetune", *RUN, "--init-from", str(dit_export), "--target", "0.3", "--steps", "2",
                 "--no-progress", "--out-dir", str(out)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    rho = float(last.split("FLOPs ratio of the EMA weights ")[1].split()[0])
    assert rho > 0.8  # two steps: the fresh routers still keep (almost) everything
    assert f"EMA weights: {out / 'ema.safetensors'}" in last
    assert "warning: the fine-tuned model's FLOPs ratio" in captured.err
    assert "warning: the fine-tuned" in (out / "log.txt").read_text()


def test_no_warning_when_the_target_is_reached(tmp_path, dit_export):
    res = train(tiny_run(tmp_path, model="DyDiT-Ti/2", init_from=str(dit_export), target=1.0, steps=2))
    assert res.flops_ratio == pytest.approx(1.0, abs=0.05)
    log = (res.run_dir / "log.txt").read_text()
    assert "FLOPs ratio of the EMA weights on the last batch" in log and "warning:" not in log


def test_summary_says_how_to_continue_a_stopped_run(tmp_path):
    cfg = tiny_run(tmp_path)
    res = train(cfg, stop_at=2)
    line = summary(res, cfg)
    assert line.startswith("step 2/4") and "rerun the same command to continue" in line
    assert "continue" not in summary(train(cfg), cfg)


def test_a_run_already_past_its_steps_says_so(tmp_path):
    train(tiny_run(tmp_path, steps=4))
    res = train(tiny_run(tmp_path, steps=2))
    log = (res.run_dir / "log.txt").read_text()
    assert res.step == 4 and "already at step 4 (--steps 2): nothing to do" in log
    assert "of 2" not in log


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path, monkeypatch):
    real = loop.update_ema
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "update_ema", interrupted)
    cfg = tiny_run(tmp_path, steps=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "interrupted at step 2; the checkpoint of step 2 is kept; rerun the same command to resume" in log


# Checkpoints and logs ------------------------------------------------------------------------------
def test_numbered_checkpoints_with_a_keep_limit(tmp_path):
    res = train(tiny_run(tmp_path, steps=5, ckpt_every=1, keep_checkpoints=2))
    names = [p.name for p in ckpt.numbered_states(res.run_dir)]
    assert names == ["0000004.pt", "0000005.pt"]
    for p in ckpt.numbered_states(res.run_dir):
        assert ckpt.load_state(p)["step"] == int(p.stem)
    assert (res.run_dir / "checkpoints" / "0000005.pt").read_bytes() == res.state.read_bytes()
    everything = train(tiny_run(tmp_path, "all", steps=3, ckpt_every=1, keep_checkpoints=0))
    assert len(ckpt.numbered_states(everything.run_dir)) == 3


def test_numbered_checkpoints_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    res = train(tiny_run(tmp_path, steps=2, ckpt_every=1))
    assert [p.name for p in ckpt.numbered_states(res.run_dir)] == ["0000001.pt", "0000002.pt"]
    assert not [p for p in (res.run_dir / "checkpoints").iterdir() if ".tmp" in p.name]


def test_a_log_line_every_window_in_log_txt_and_on_stderr_without_a_bar(capsys, tmp_path):
    assert main(["train", *RUN, *TINY_OPTS, "--steps", "4", "--log-every", "2", "--no-progress",
                 "--out-dir", str(tmp_path / "a")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    log = (tmp_path / "a" / "log.txt").read_text()
    for text in (err, log):
        assert "step 2/4, loss " in text and "step 4/4, loss " in text
    # With a progress bar the bar shows the numbers: the lines go to log.txt only.
    assert main(["train", *RUN, *TINY_OPTS, "--steps", "2", "--log-every", "1",
                 "--out-dir", str(tmp_path / "b")]) == 0  # fmt: skip
    assert "step 1/2, loss" not in capsys.readouterr().err
    assert "step 1/2, loss" in (tmp_path / "b" / "log.txt").read_text()


def test_tensorboard_scalars_when_installed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(tiny_run(tmp_path, steps=4, log_every=2))
    events = EventAccumulator(str(res.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
