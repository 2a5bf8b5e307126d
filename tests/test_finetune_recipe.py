"""Fine-tuning options for quality: distillation from a frozen dense teacher, importance reordering
(docs/TRAINING.md, "Distillation and reordering")."""

from __future__ import annotations

import copy

import pytest
import torch

from dydit.diffusion import create_diffusion
from dydit.errors import DyditError
from dydit.factory import build_model
from dydit.log import read_stats
from dydit.models.dydit import DyDiT
from dydit.presets import get_model_config
from dydit.train import state as ckpt
from dydit.train.config import TrainConfig
from dydit.train.loop import train
from dydit.train.step import TrainForward, compute_loss

TINY = dict(depth=1, hidden_size=32, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(class_dropout_prob: float = 0.1):
    cfg = get_model_config(
        "DiT-Ti/2", input_size=8, num_classes=10, class_dropout_prob=class_dropout_prob, **TINY
    )
    model = build_model(cfg)
    # adaLN-Zero makes a fresh DiT output 0 for every input; give it a real function of x, t and y.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 1, 8, 8, generator=g)
    return x0, torch.randint(0, 10, (n,), generator=g), torch.randint(0, 1000, (n,), generator=g)


def loss_parts(student, teacher, weight=1.0, seed=0):
    x0, y, t = batch()
    torch.manual_seed(seed)
    kw = dict(lambda_t=0.5) if isinstance(student, DyDiT) else {}
    return compute_loss(
        TrainForward(student), create_diffusion(), x0, y, t, torch.randn_like(x0),
        teacher=teacher, distill_weight=weight, **kw,
    )  # fmt: skip


def test_distill_loss_is_zero_when_student_and_teacher_are_the_same_function():
    # Half the labels are dropped: zero only if student and teacher see the same dropped labels.
    teacher = tiny_dit(class_dropout_prob=0.5).eval()
    student = copy.deepcopy(teacher).train()
    _, parts, _ = loss_parts(student, teacher)
    assert parts["loss_distill"].item() == 0.0
    # A DyDiT straight from its DiT computes the same function (routers start fully on).
    dy = DyDiT.from_dit(teacher).train()
    _, parts, _ = loss_parts(dy, teacher)
    assert parts["loss_distill"].item() < 1e-10


def test_distill_loss_measures_the_difference_and_its_gradients_reach_only_the_student():
    teacher = tiny_dit().eval().requires_grad_(False)
    student = DyDiT.from_dit(tiny_dit()).train()
    grads = []
    for weight in (0.0, 1.0):
        student.zero_grad(set_to_none=True)
        loss, parts, _ = loss_parts(student, teacher, weight=weight)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert parts["loss_distill"].item() > 1e-6
    assert not torch.allclose(grads[0], grads[1])  # the distillation term moves the student
    assert all(p.grad is None for p in teacher.parameters())
    # Off by default and with weight 0: no teacher pass, no logged term.
    _, parts, _ = loss_parts(student, teacher, weight=0.0)
    assert "loss_distill" not in parts


def test_distill_config_needs_a_teacher_and_a_non_negative_weight():
    with pytest.raises(DyditError, match="needs a teacher"):
        TrainConfig(model="DyDiT-Ti/2", target=0.5, distill_weight=1.0)
    with pytest.raises(DyditError, match="distillation weight"):
        TrainConfig(model="DyDiT-Ti/2", target=0.5, init_from="x", distill_weight=-1.0)
    cfg = TrainConfig(model="DyDiT-Ti/2", target=0.5, init_from="base.pt", distill_weight=1.0)
    assert cfg.teacher_path == "base.pt"
    assert cfg.replace(distill_from="t.pt").teacher_path == "t.pt"


def test_a_run_recorded_before_a_field_existed_resumes_with_its_default():
    cfg = TrainConfig(model="DyDiT-Ti/2", target=0.5, init_from="base.pt")
    old = cfg.to_dict()
    del old["distill_weight"], old["distill_from"]
    assert cfg.resume_conflicts(old) == []
    assert cfg.replace(distill_weight=1.0).resume_conflicts(old) == ["distill_weight: 0.0 -> 1.0"]


def test_an_automatic_stratified_t_resumes_as_what_it_resolves_to():
    # A Python-API run stores stratified_t None (on for a DyDiT); the CLI resumes it saying True.
    api = TrainConfig(model="DyDiT-Ti/2", target=0.5, init_from="base.pt")
    cli = api.replace(stratified_t=True)
    assert cli.resume_conflicts(api.to_dict()) == [] and api.resume_conflicts(cli.to_dict()) == []
    off = api.replace(stratified_t=False)
    assert off.resume_conflicts(api.to_dict()) == ["stratified_t: True -> False"]
    assert api.resume_conflicts(off.to_dict()) == ["stratified_t: False -> True"]
    dense = TrainConfig(model="DiT-Ti/2", init_from="base.pt")  # None is off for a static DiT
    assert dense.replace(stratified_t=False).resume_conflicts(dense.to_dict()) == []
    on = dense.replace(stratified_t=True)
    assert on.resume_conflicts(dense.to_dict()) == ["stratified_t: False -> True"]


def test_finetune_with_distillation_logs_the_term_and_resumes(tmp_path):
    base = TrainConfig(
        out_dir=str(tmp_path / "dit"), model="DiT-Ti/2", model_overrides=TINY, data="digits",
        batch_size=8, steps=2, ckpt_every=2, log_every=1, progress=False,
    )  # fmt: skip
    export = train(base).export
    ft = base.replace(
        out_dir=str(tmp_path / "ft"), model="DyDiT-Ti/2", init_from=str(export), target=0.5,
        target_warmup_steps=2, steps=3, distill_weight=0.5,
    )  # fmt: skip
    train(ft, stop_at=2)
    result = train(ft)
    assert result.step == 3
    stats = read_stats(tmp_path / "ft")
    assert [s["step"] for s in stats] == [1, 2, 3]
    assert all(s["loss_distill"] >= 0 for s in stats)
    assert ckpt.state_path(tmp_path / "ft").exists()
    # A teacher for other inputs is refused before the first step, naming what differs.
    other = train(
        base.replace(out_dir=str(tmp_path / "other"), model_overrides=dict(TINY, learn_sigma=False))
    )
    with pytest.raises(DyditError, match="teacher .* does not fit the model .*out_channels=2"):
        train(ft.replace(out_dir=str(tmp_path / "ft2"), distill_from=str(other.export)))


def test_reorder_sorts_the_fine_tune_start_by_importance_and_preserves_the_function(tmp_path):
    from dydit.checkpoint import has_routers, load_dydit_checkpoint
    from dydit.models.reorder import reorder_by_importance

    base = TrainConfig(
        out_dir=str(tmp_path / "dit"), model="DiT-Ti/2", model_overrides=dict(TINY, num_heads=4),
        data="digits", batch_size=8, steps=3, ckpt_every=3, log_every=3, progress=False,
    )  # fmt: skip
    export = train(base).export
    expected = load_dydit_checkpoint(export)
    reorder_by_importance(expected)
    ft = base.replace(out_dir=str(tmp_path / "ft"), model="DyDiT-Ti/2", init_from=str(export), target=0.5,
                      steps=1, lr=1e-30, reorder=True)  # fmt: skip
    got = train(ft).model.state_dict()  # one step at a negligible learning rate: the start
    backbone = {k: v for k, v in expected.state_dict().items() if not has_routers({k: v})}
    assert len(backbone) > 10  # routers start from their own random init; the backbone is compared
    for k, v in backbone.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    with pytest.raises(DyditError, match="static DiT"):
        base.replace(reorder=True)
