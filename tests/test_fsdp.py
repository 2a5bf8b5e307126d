"""Sharded training (FSDP2, train/fsdp.py): two CPU processes with gloo under torchrun.

FSDP over 2 processes gives the losses and final weights of DDP over 2 processes (the same global
batch, split the same way: per-rank seeds make a run's numbers depend on its process count,
docs/ARCHITECTURE.md §6.2), for a DiT and for a TD-LoRA DyDiT fine-tune; a run killed after a
checkpoint resumes to the same bits as an uninterrupted one; the distributed checkpoint exports
unsharded in one process. The TD-LoRA comparison runs by default (about 20 s); the DiT comparison
(with bf16 mixed precision, export and pruning) and the kill are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from faultkit import HANG_GUARD_S, TORCHRUN, save_tiny

from dydit.checkpoint import load_checkpoint
from dydit.checkpoint.lora import read_lora
from dydit.factory import build_model
from dydit.presets import get_model_config
from dydit.train.state import export_run, load_state

pytestmark = pytest.mark.distributed
TINY = dict(depth=2, hidden_size=32, num_heads=2)

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    import dydit.train.loop as loop
    import dydit.train.run as run
    from dydit import distributed
    from dydit.train.config import TrainConfig
    from dydit.train.fsdp import full_state_dict

    out, mode = sys.argv[1], sys.argv[2]
    rank_losses = []
    real = loop.compute_loss

    def recording(*args, **kwargs):
        loss, parts, routing = real(*args, **kwargs)
        rank_losses.append(float(parts["loss"]))
        return loss, parts, routing

    loop.compute_loss = recording
    common = dict(model_overrides=dict(depth=2, hidden_size=32, num_heads=2), data="digits", batch_size=8,
                  steps=3, ckpt_every=1, keep_checkpoints=2, log_every=1, progress=False, device="cpu",
                  ema_warmup=True, lr=1e-3)

    def weights(result):
        return full_state_dict(result.model)

    def dit(name, **kw):
        return loop.train(TrainConfig(out_dir=f"{out}/{name}", model="DiT-Ti/2", **{**common, **kw}))

    def lora(name, base, **kw):
        options = dict(model="DyDiT-Ti/2", init_from=base, target=0.5, lora_rank=4, lora_groups=2,
                       complete_steps=1, grad_checkpointing=True)
        return loop.train(TrainConfig(out_dir=f"{out}/{name}", **{**common, **options, **kw}))

    if mode in ("compare", "lora"):
        results = {}
        runs = [("ddp", lambda: dit("ddp")), ("fsdp", lambda: dit("fsdp", fsdp=True)),
                ("fsdp-bf16", lambda: dit("fsdp-bf16", fsdp=True, fsdp_mixed_precision="bf16", steps=2))]
        if mode == "lora":
            runs = [(name, lambda name=name, kw=kw: lora(name, sys.argv[3], steps=2, **kw))
                    for name, kw in [("lora-ddp", {}), ("lora-fsdp", dict(fsdp=True))]]
        for name, fn in runs:
            rank_losses.clear()
            res = fn()
            results[name] = (list(rank_losses), res)
        rank = distributed.rank()
        for name, (losses, res) in results.items():
            torch.save(weights(res), f"{out}/{name}_rank{rank}.pt")
            with open(f"{out}/{name}_losses_rank{rank}.json", "w") as f:
                json.dump(losses, f)
    elif mode == "kill":  # SIGKILL every rank right after the step-2 checkpoint
        saves = [0]
        real_save = run.save

        def save_then_die(r, step):
            real_save(r, step)
            saves[0] += 1
            if step == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        loop.save = save_then_die
        dit("killed", fsdp=True)
    elif mode == "resume":
        dit("killed", fsdp=True)
        dit("reference", fsdp=True)
    distributed.destroy()
    distributed.exit_now(0)
    """
)


def _torchrun(tmp_path, mode, *extra):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [*TORCHRUN, str(script), str(tmp_path), mode, *extra]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)


def _close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def _results(tmp_path):
    load = lambda name, r: torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True)  # noqa: E731
    losses = lambda name, r: json.loads((tmp_path / f"{name}_losses_rank{r}.json").read_text())  # noqa: E731
    return load, losses


def _same_as_ddp(tmp_path, ref: str, sharded: str, steps: int) -> None:
    load, losses = _results(tmp_path)
    for r in (0, 1):
        assert len(losses(sharded, r)) == steps
        assert losses(sharded, r) == pytest.approx(losses(ref, r), rel=1e-5, abs=1e-6)
        _close(load(sharded, r), load(ref, r))
    _close(load(sharded, 0), load(sharded, 1), atol=0)  # every rank gathers the same weights


def test_fsdp_td_lora_gives_the_losses_and_weights_of_ddp(tmp_path):
    """The TD-LoRA fine-tune of a random DiT, DDP and FSDP over the same 2 processes."""
    torch.manual_seed(0)
    cfg = get_model_config("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, **TINY)
    dit = build_model(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    base_file = save_tiny(tmp_path / "base.safetensors", dit)
    proc = _torchrun(tmp_path, "lora", str(base_file))
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_as_ddp(tmp_path, "lora-ddp", "lora-fsdp", steps=2)
    load, _ = _results(tmp_path)
    trained, base = load("lora-fsdp", 0), load_checkpoint(base_file)
    assert all(torch.equal(trained[k], base[k]) for k in base)  # no base tensor changed
    assert any(trained[k].abs().sum() > 0 for k in trained if k.endswith(".up"))  # adapters did
    tensors, _, _ = read_lora(tmp_path / "lora-fsdp" / "lora.safetensors")
    assert tensors and all(".lora." in k or "_rate." in k or "token_selection" in k for k in tensors)


@pytest.mark.slow
def test_fsdp_gives_the_losses_and_weights_of_ddp(tmp_path):
    proc = _torchrun(tmp_path, "compare")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_as_ddp(tmp_path, "ddp", "fsdp", steps=3)
    load, losses = _results(tmp_path)
    # bf16 mixed precision runs (float32 master weights) and stays near the float32 losses.
    bf16 = losses("fsdp-bf16", 0)
    assert len(bf16) == 2 and bf16 == pytest.approx(losses("fsdp", 0)[:2], rel=0.05)
    assert all(v.dtype == torch.float32 for v in load("fsdp-bf16", 0).values())
    # The sharded state exports unsharded in one process, equal to the gathered weights.
    state = load_state(tmp_path / "fsdp" / "checkpoints" / "state.pt")
    assert state["sharded"] == "sharded-0000003" and state["model"] == {}
    out = export_run(tmp_path / "fsdp", tmp_path / "fsdp-model.safetensors", which="model")
    _close(load_checkpoint(out), load("fsdp", 0), atol=0)
    # Only the folders of the kept numbered states remain (--keep-checkpoints 2).
    kept = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").glob("sharded-*"))
    assert kept == ["sharded-0000002", "sharded-0000003"]


@pytest.mark.slow
def test_fsdp_resumes_exactly_after_every_rank_is_killed(tmp_path):
    killed = _torchrun(tmp_path, "kill")  # SIGKILL of both ranks right after the step-2 checkpoint
    assert killed.returncode != 0
    assert load_state(tmp_path / "killed" / "checkpoints" / "state.pt")["step"] == 2
    resumed = _torchrun(tmp_path, "resume")  # reruns it to step 3, then an uninterrupted reference
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for which in ("model", "ema"):
        a = export_run(tmp_path / "killed", tmp_path / f"k-{which}.safetensors", which=which)
        b = export_run(tmp_path / "reference", tmp_path / f"r-{which}.safetensors", which=which)
        _close(load_checkpoint(a), load_checkpoint(b), atol=0)
    a, b = (load_state(tmp_path / d / "checkpoints" / "state.pt") for d in ("killed", "reference"))
    assert (a["step"], a["data"]) == (b["step"], b["data"]) == (3, b["data"])
