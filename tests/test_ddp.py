"""Data-parallel training: 2-process torchrun with gloo on CPU (docs/ARCHITECTURE.md §6.9)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from faultkit import HANG_GUARD_S, TORCHRUN

from dydit.log import read_stats

pytestmark = pytest.mark.distributed

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import dydit.train.loop as loop
    from dydit import distributed
    from dydit.train.config import TrainConfig

    out = sys.argv[1]
    local_losses = []
    real = loop.compute_loss

    def recording(*args, **kwargs):
        loss, parts, routing = real(*args, **kwargs)
        local_losses.append(float(parts["loss"]))
        return loss, parts, routing

    loop.compute_loss = recording
    common = dict(model_overrides=dict(depth=1, hidden_size=32, num_heads=2), data="digits", batch_size=8,
                  steps=3, ckpt_every=2, log_every=1, progress=False, device="cpu")
    dit = loop.train(TrainConfig(out_dir=out + "/dit", model="DiT-Ti/2", **common))
    rank = distributed.rank()
    torch.save(dit.model.state_dict(), f"{out}/dit_rank{rank}.pt")
    # Fine-tuning: two DDP forward passes (masked + complete model) before one backward.
    dy = loop.train(TrainConfig(out_dir=out + "/dydit", model="DyDiT-Ti/2", init_from=str(dit.export),
                                target=0.5, complete_steps=2, target_hold_steps=0, target_warmup_steps=2,
                                **common))
    torch.save(dy.model.state_dict(), f"{out}/dydit_rank{rank}.pt")
    with open(f"{out}/losses_rank{rank}.json", "w") as f:
        json.dump(local_losses, f)
    distributed.destroy()
    distributed.exit_now(0)  # as the CLI ends: no interpreter teardown, which gloo can abort
    """
)


def _torchrun(args, tmp_path, timeout=HANG_GUARD_S):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def test_two_processes_keep_identical_parameters(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = _torchrun([str(script), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("dit", "dydit"):
        a = torch.load(tmp_path / f"{kind}_rank0.pt", weights_only=True)
        b = torch.load(tmp_path / f"{kind}_rank1.pt", weights_only=True)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{kind}: {k} differs across ranks"
        state = torch.load(tmp_path / kind / "checkpoints" / "state.pt", weights_only=True)
        assert all(torch.equal(state["model"][k], a[k]) for k in a)  # rank 0 wrote what both ranks hold
    # The ranks saw different data (per-rank seeds and samples), and the log holds their mean.
    losses = [json.loads((tmp_path / f"losses_rank{r}.json").read_text()) for r in range(2)]
    assert losses[0] != losses[1]
    for kind, offset in (("dit", 0), ("dydit", 3)):
        stats = read_stats(tmp_path / kind)
        assert [r["step"] for r in stats] == [1, 2, 3]  # one writer: no duplicated records
        for r, l0, l1 in zip(stats, losses[0][offset:], losses[1][offset:]):
            assert r["loss"] == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert json.loads((tmp_path / "dit" / "config.json").read_text())["world_size"] == 2


def test_batch_size_must_divide_over_processes(tmp_path):
    proc = _torchrun(
        ["-m", "dydit", "train", "--data", "digits", "--batch-size", "7", "--steps", "1", "--device", "cpu",
         "--out-dir", str(tmp_path / "run")],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "batch size 7 is not divisible by the number of processes (2)" in proc.stderr
    assert not (tmp_path / "run").exists()
