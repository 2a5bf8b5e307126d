"""Training: config, loss composition, guarded step, EMA, checkpoints, the loop and its errors."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dydit.checkpoint import checkpoint_config, load_checkpoint
from dydit.diffusion import create_diffusion
from dydit.errors import DyditError
from dydit.factory import build_model
from dydit.flops.analytic import flops_loss, flops_ratio
from dydit.log import read_stats
from dydit.presets import get_model_config
from dydit.train import state as ckpt
from dydit.train.config import TrainConfig, model_spec
from dydit.train.ema import create_ema, ema_decay, update_ema
from dydit.train.loop import train
from dydit.train.step import (
    TrainForward,
    compute_loss,
    enable_grad_checkpointing,
    guarded_step,
    route_buckets,
    router_report,
)

TINY = dict(depth=1, hidden_size=32, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / name), model="DiT-Ti/2", model_overrides=TINY, data="digits", batch_size=8,
        steps=4, ckpt_every=2, log_every=2, progress=False, ema_warmup=True,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def tiny_model(dynamic: bool = False):
    return build_model(get_model_config("DiT-Ti/2", input_size=8, num_classes=10, dynamic=dynamic, **TINY))


# Config -----------------------------------------------------------------------------------------
def test_config_validation_and_round_trip():
    cfg = TrainConfig(model="DyDiT-Ti/2", target=0.5)
    assert cfg.dynamic and cfg.use_stratified_t
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(DyditError, match=r"\(0, 1\]"):
            TrainConfig(model="DyDiT-Ti/2", target=bad)
    with pytest.raises(DyditError, match="set the FLOPs target"):
        TrainConfig(model="DyDiT-Ti/2")
    with pytest.raises(DyditError, match="static DiT"):
        TrainConfig(model="DiT-Ti/2", target=0.5)
    with pytest.raises(DyditError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(DyditError, match="grad_guard"):
        TrainConfig(grad_guard="maybe")
    assert not TrainConfig().use_stratified_t
    conflicts = cfg.replace(steps=10, lr=1.0).resume_conflicts(cfg.to_dict())
    assert conflicts == ["lr: 0.0001 -> 1.0"]


def test_model_spec_reproduces_a_config():
    mc = get_model_config("DiT-Ti/2", input_size=8, num_classes=10, **TINY)
    name, overrides = model_spec(mc, dynamic=True)
    assert name.startswith("DyDiT-") and get_model_config(name, **overrides) == mc.replace(dynamic=True)


@pytest.mark.parametrize("preset, changes", [("FLUX-t2i", {}), ("FLUX-t2i", {"num_single_layers": 1}),
                                             ("FLUX-tiny", {"num_layers": 1})])  # fmt: skip
def test_model_spec_reproduces_a_flux_config(preset, changes):
    """A fine-tune of a FLUX file without --model: the DyFLUX twin of its preset, plus what differs."""
    from dydit.presets_flux import get_flux_config

    cfg = get_flux_config(preset, **changes)
    name, overrides = model_spec(cfg, dynamic=True)
    assert get_flux_config(name, **overrides) == cfg.replace(dynamic=True)
    if not changes:  # a preset's own config: named by its twin, nothing to override
        assert name.startswith("DyFLUX") and set(overrides) <= {"dynamic"}
        assert model_spec(cfg, dynamic=False) == (preset, {})


# Step ------------------------------------------------------------------------------------------
def _batch(b=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 8, 8, generator=g), torch.arange(b) % 10, torch.tensor([0, 300, 600, 999])[:b]


def test_compute_loss_composition_for_dydit():
    """loss = L_diff(masked) + L_diff(dense) + w (rho - lambda)^2, from the same x_t, t, noise."""
    model = tiny_model(dynamic=True).train()
    with torch.no_grad():  # let the routers actually drop work
        for block in model.blocks:
            block.attn_rate.router.bias.fill_(-1.0)
            block.token_selection.mlp_head[-1].bias.fill_(0.0)
    diffusion = create_diffusion()
    x0, y, t = _batch()
    noise = torch.randn_like(x0)
    net = TrainForward(model)
    costs = (3.0, 5.0)
    torch.manual_seed(1)
    loss, parts, routing = compute_loss(
        net, diffusion, x0, y, t, noise, lambda_t=0.7, complete=True, flops_weight=2.0, layer_costs=costs
    )
    torch.manual_seed(1)
    x_t = diffusion.q_sample(x0, t, noise)
    out, stats = model.forward_with_routing(x_t, t, y)
    masked = diffusion.loss_terms(out, x0, x_t, t, noise)["loss"].mean()
    assert torch.equal(stats.heads, routing.heads)
    from dydit.models.dydit import execution

    with execution(model, "dense"):
        dense = diffusion.loss_terms(model(x_t, t, y), x0, x_t, t, noise)["loss"].mean()
    rho = flops_ratio(stats, *costs)
    assert rho < 1
    expected = masked + dense + flops_loss(rho, 0.7, 2.0)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(parts["loss_complete"], dense, atol=1e-6) and parts["flops_ratio"] == rho.detach()


def test_compute_loss_static_dit_has_only_the_diffusion_term():
    model = tiny_model().train()
    diffusion = create_diffusion()
    x0, y, t = _batch()
    noise = torch.randn_like(x0)
    model.y_embedder.dropout_prob = 0.0
    loss, parts, routing = compute_loss(TrainForward(model), diffusion, x0, y, t, noise)
    ref = diffusion.training_losses(model, x0, t, dict(y=y), noise)["loss"].mean()
    assert (
        routing is None
        and torch.allclose(loss, ref)
        and set(parts) == {"loss", "loss_diffusion", "mse", "vb"}
    )


def test_bf16_autocast_on_cpu():
    model = tiny_model(dynamic=True).train()
    x0, y, t = _batch()
    loss, _, _ = compute_loss(TrainForward(model), create_diffusion(), x0, y, t, torch.randn_like(x0),
                              lambda_t=1.0, bf16=True)  # fmt: skip
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_bf16_flops_ratio_is_computed_in_float32():
    """The router masks come out of autocast in bfloat16; the logged and penalised rho must not (issue 14)."""
    mc = get_model_config(
        "DiT-Ti/2", input_size=16, num_classes=4, dynamic=True, depth=4, hidden_size=64, num_heads=4
    )
    model = build_model(mc).train()
    with torch.no_grad():  # routers on the fence: many masks are off, rho far from the bf16 grid
        for block in model.blocks:
            block.attn_rate.router.bias.fill_(0.0)
            block.token_selection.mlp_head[-1].bias.fill_(0.0)
    x0, y, t = torch.randn(16, 1, 16, 16), torch.arange(16) % 4, torch.arange(16) * 61
    costs = (3.0, 7.0)
    _, parts, routing = compute_loss(TrainForward(model), create_diffusion(), x0, y, t, torch.randn_like(x0),
                                     lambda_t=0.5, layer_costs=costs, bf16=True)  # fmt: skip
    masks = {k: getattr(routing, k).double() for k in ("heads", "groups", "tokens")}
    exact = flops_ratio(SimpleNamespace(**masks), *costs)
    assert parts["flops_ratio"].dtype == torch.float32
    assert abs(parts["flops_ratio"].item() - exact.item()) < 1e-6


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = tiny_model(dynamic=True).train()
        if checkpointed:
            enable_grad_checkpointing(model)
        x0, y, t = _batch()
        torch.manual_seed(3)  # Gumbel noise: recomputation must replay it
        loss, _, _ = compute_loss(TrainForward(model), create_diffusion(), x0, y, t, torch.ones_like(x0),
                                  lambda_t=0.5, complete=True)  # fmt: skip
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _params_with_grad(value: float):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), value)
    return p


@pytest.mark.parametrize("guard", ["clip", "skip", "none"])
def test_guarded_step_takes_at_most_one_step(guard):
    p = _params_with_grad(10.0)  # norm 20
    opt = torch.optim.SGD([p], lr=1.0)
    norm, stepped = guarded_step(opt, [p], guard, threshold=5.0)
    assert norm == pytest.approx(20.0)
    if guard == "skip":
        assert not stepped and torch.equal(p.detach(), torch.zeros(4))
    elif guard == "clip":
        assert stepped and torch.allclose(p.detach().norm(), torch.tensor(5.0), atol=1e-4)
    else:
        assert stepped and torch.allclose(p.detach(), torch.full((4,), -10.0))
    q = _params_with_grad(float("nan"))
    assert guarded_step(torch.optim.SGD([q], lr=1.0), [q], guard, 5.0)[1] is False


def test_skip_guard_is_the_released_rule_at_the_threshold():
    """Released stage 2 steps only if norm < max_norm: a norm equal to the threshold skips (issue 14)."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])  # norm exactly 5
    assert guarded_step(torch.optim.SGD([p], lr=1.0), [p], "skip", threshold=5.0) == (5.0, False)
    assert torch.equal(p.detach(), torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert guarded_step(torch.optim.SGD([p], lr=1.0), [p], "clip", threshold=5.0) == (5.0, True)
    assert torch.allclose(p.detach(), torch.tensor([-3.0, -4.0]), atol=1e-5)  # min(1, 5/5): unscaled


def test_route_buckets():
    class Stats:
        heads = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[1.0, 0.0]]])  # (B=3, L=1, H=2)
        groups = torch.ones(3, 1, 2)
        tokens = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[1.0] * 4], [[0.0] * 4]])

    sums = route_buckets(Stats, torch.tensor([0, 999, 10]))
    report = router_report(sums)
    assert report["router/t0/heads"] == 0.5 and report["router/t3/heads"] == 1.0
    assert report["router/t0/tokens"] == 0.125 and "router/t1/heads" not in report


# EMA -------------------------------------------------------------------------------------------
def test_ema_update_and_warmup():
    model = torch.nn.Linear(2, 2)
    ema = create_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.weight.clone()
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    assert (
        ema_decay(0, 0.9999, warmup=True) == pytest.approx(0.1) and ema_decay(10**6, 0.9999, True) == 0.9999
    )
    assert ema_decay(0, 0.9999) == 0.9999


# Checkpoint files ------------------------------------------------------------------------------
def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    ckpt.atomic_write(target, lambda p: Path(p).write_bytes(b"old"))

    def full_disk(path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DyditError, match="no space left on device; the previous f.bin is kept"):
        ckpt.atomic_write(target, full_disk)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# The loop --------------------------------------------------------------------------------------
def test_train_then_finetune_end_to_end(tmp_path):
    res = train(tiny_run(tmp_path, "dit"))
    assert res.step == 4 and res.export.is_file()
    state = torch.load(res.state, weights_only=True)  # plain containers and tensors only
    assert {"model", "ema", "optimizer", "step", "data", "rng", "config", "version"} <= set(state)
    assert state["step"] == 4 and state["data"] == {"epoch": 0, "batch": 4}
    assert isinstance(state["rng"]["cpu"], torch.Tensor)
    cfg = checkpoint_config(res.export)
    assert cfg.depth == 1 and cfg.in_channels == 1 and cfg.input_size == 8 and not cfg.dynamic
    json_cfg = json.loads((res.run_dir / "config.json").read_text())
    assert json_cfg["train"]["steps"] == 4 and json_cfg["data"]["name"] == "digits"
    stats = read_stats(res.run_dir)
    assert [r["step"] for r in stats] == [2, 4] and all("loss" in r and "steps_per_s" in r for r in stats)

    ft = tiny_run(tmp_path, "dydit", model="DyDiT-Ti/2", init_from=str(res.export), target=0.5,
                  complete_steps=2, target_hold_steps=1, target_warmup_steps=2)  # fmt: skip
    out = train(ft)
    stats = read_stats(out.run_dir)
    assert {"flops_ratio", "loss_flops", "flops_target", "router/t0/heads", "router/t3/tokens"} <= set(
        stats[-1]
    )
    assert "loss_complete" in stats[0] and "loss_complete" not in stats[-1]
    assert stats[-1]["flops_target"] == 0.5
    dydit_cfg = checkpoint_config(out.export)
    assert dydit_cfg.dynamic
    model = build_model(dydit_cfg)
    model.load_state_dict(load_checkpoint(out.export))  # strict
    # The routers were new; the backbone came from the DiT export.
    dit_sd = load_checkpoint(res.export)
    ft_state = torch.load(out.state, weights_only=True)
    assert ft_state["config"]["train"]["init_from"] == str(res.export)
    assert set(dit_sd) < set(ft_state["model"])


def test_rerunning_a_finished_run_is_a_no_op(tmp_path):
    cfg = tiny_run(tmp_path, steps=2)
    train(cfg)
    before = torch.load(ckpt.state_path(cfg.out_dir), weights_only=True)["model"]
    res = train(cfg)
    after = torch.load(ckpt.state_path(cfg.out_dir), weights_only=True)["model"]
    assert res.step == 2 and all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny_run(tmp_path, steps=2))
    with pytest.raises(DyditError, match="different configuration.*lr"):
        train(tiny_run(tmp_path, steps=2, lr=1e-3))


def test_resume_refuses_an_init_file_whose_contents_changed(tmp_path):
    """A fine-tune pins its base weights by content: same path, new bytes -> a clear error."""
    import shutil

    first = train(tiny_run(tmp_path, "a", steps=2))
    other = train(tiny_run(tmp_path, "b", steps=2, seed=1))
    base = tmp_path / "base.safetensors"
    shutil.copy(first.export, base)
    ft = tiny_run(tmp_path, "ft", init_from=str(base), steps=4)
    train(ft, stop_at=2)
    assert torch.load(ckpt.state_path(ft.out_dir), weights_only=True)["config"]["init_sha256"]
    shutil.copy(other.export, base)  # a new base at the old path
    with pytest.raises(DyditError, match="not the file .* started from"):
        train(ft)
    shutil.copy(first.export, base)  # the original bytes again: resumes
    assert train(ft).step == 4


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch):
    import dydit.train.loop as loop

    monkeypatch.setattr(loop.distributed, "world_size", lambda: 3)
    with pytest.raises(DyditError, match="not divisible by the number of processes"):
        train(tiny_run(tmp_path))
    assert not (tmp_path / "run").exists()


def test_empty_or_small_dataset_fails_before_writing(tmp_path):
    with pytest.raises(DyditError, match="fewer than one global batch"):
        train(tiny_run(tmp_path, batch_size=4096))
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DyditError, match="cannot create output directory"):
        train(tiny_run(tmp_path, name="file/run"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import dydit.train.loop as loop

    calls = {"n": 0}
    real = loop.compute_loss

    def poisoned(*args, **kwargs):
        loss, parts, routing = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
            parts["loss"] = loss.detach()
        return loss, parts, routing

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    cfg = tiny_run(tmp_path)
    with pytest.raises(DyditError, match=r"non-finite loss \(nan\) at step 3.*step 2\) is kept"):
        train(cfg)
    assert torch.load(ckpt.state_path(cfg.out_dir), weights_only=True)["step"] == 2


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path, steps=2)
    train(cfg)
    good = torch.load(ckpt.state_path(cfg.out_dir), weights_only=True)

    def no_space(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(DyditError, match="no space left on device; the previous state.pt is kept"):
        train(cfg.replace(steps=4))
    kept = torch.load(ckpt.state_path(cfg.out_dir), weights_only=True)
    assert kept["step"] == 2 and all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


def test_distillation_keeps_the_class_dropout():
    # The dropout was once read inside the block that sets it to 0: with a teacher, no label was
    # ever dropped, so the null class (what guidance needs) stopped being trained.
    model = tiny_model(dynamic=True).train()
    null = model.y_embedder.num_classes
    seen = []

    def teacher(x, t, y):
        seen.append(y.clone())
        return torch.zeros(x.shape[0], model.config.out_channels, *x.shape[2:])

    x0, y, _ = _batch(64)
    t = torch.arange(64) * 15
    compute_loss(TrainForward(model), create_diffusion(), x0, y, t, torch.randn_like(x0), lambda_t=1.0,
                 teacher=teacher, distill_weight=1.0)  # fmt: skip
    dropped = (seen[0] == null).float().mean().item()
    assert 0.02 < dropped < 0.3  # DiT's class dropout is 0.1
    assert model.y_embedder.dropout_prob == 0.1  # restored
