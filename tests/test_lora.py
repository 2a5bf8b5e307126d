"""TD-LoRA on the backbone seam (docs/METHOD.md §18): adapters off = base, the timestep router gates
only the adapters, merged = unmerged (masked and sliced), on DiT, the second family and DyFLUX."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_dyflux import inputs as flux_inputs
from test_dyflux import mixed_dyflux
from test_second_family import inputs as family_inputs
from test_second_family import random_family, random_routers
from test_sliced import inputs, random_dydit

from dydit.errors import DyditError
from dydit.models.dydit import DyDiT, execution
from dydit.models.lora import (
    LoraConfig,
    add_lora,
    freeze_base,
    gate_plan,
    lora_config,
    merge_lora,
    merged_weights,
)

T = torch.tensor([3, 420, 999])


def randomise_adapters(model, seed: int = 5, gate_logits: float | None = None):
    """Nonzero adapters; router weights random (gates vary with t) or all logits ``gate_logits``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for a in block.lora.adapters.values():
                a.down.copy_(torch.randn(a.down.shape, generator=g) * 0.3)
                a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.3)
            r = block.lora.router
            if gate_logits is None:
                r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 3)
                r.bias.zero_()
            else:
                r.weight.zero_()
                r.bias.fill_(gate_logits)
    return model


def dit_model(rank=4, groups=2):
    model = random_dydit(2, 32, "forced_first")
    base = copy.deepcopy(model)
    return add_lora(model, LoraConfig(rank, groups)).eval(), base


def family_model(rank=4, groups=2):
    model = random_routers(DyDiT(backbone=random_family(), router_layout="all"))
    base = copy.deepcopy(model)
    return add_lora(model, LoraConfig(rank, groups)).eval(), base


def flux_model(rank=4, groups=2):
    _, model = mixed_dyflux()
    base = copy.deepcopy(model)
    return add_lora(model, LoraConfig(rank, groups)).eval(), base


FLUX_T = torch.tensor([0.05, 0.4, 0.95])
MODELS = {  # build, inputs, time values
    "dit": (dit_model, lambda m: inputs(m, 3), T),
    "family": (family_model, lambda m: family_inputs(3), T),
    "flux": (flux_model, lambda m: flux_inputs(m.config, 3), FLUX_T),
}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("mode", ["masked", "dense", "sliced"])
def test_zero_or_switched_off_adapters_are_the_base_exactly(family, mode):
    build, make_inputs, T = MODELS[family]
    model, base = build()
    x, y = make_inputs(model)
    with torch.no_grad(), execution(model, mode), execution(base, mode):
        ref = base(x, T, y)
        assert torch.equal(model(x, T, y), ref)  # fresh: B = 0
        randomise_adapters(model, gate_logits=-50.0)  # nonzero adapters, every group off
        model.clear_cache()
        assert torch.equal(model(x, T, y), ref)
        randomise_adapters(model)  # on: the output moves
        model.clear_cache()
        assert (model(x, T, y) - ref).abs().max() > 1e-3


def test_the_timestep_router_gates_only_the_adapters():
    model, base = dit_model(rank=4, groups=2)
    randomise_adapters(model)
    x, y = inputs(model, 3)
    # The gates are a function of t alone: the same for any x and y, per sample in a mixed batch.
    plan = gate_plan(model, T)  # (T, L, G)
    assert plan.shape == (3, len(model.blocks), 2) and len({tuple(p.flatten().tolist()) for p in plan}) > 1
    # Hand reference: the base DyDiT with each sample's weights W + s·B_g A_g written in, masked.
    with torch.no_grad():
        expected = []
        for i in range(3):
            ref = copy.deepcopy(base)
            for layer, block in enumerate(model.blocks):
                target = ref.blocks[layer]
                for path, (w, _) in merged_weights(block, plan[i, layer]).items():
                    target.get_submodule(path).weight.copy_(w)
                # merged_weights against a direct sum of the on groups' rank-1 terms
                a = block.lora.adapter("mlp.fc1")
                on = plan[i, layer].repeat_interleave(2)
                direct = sum(torch.outer(a.up[:, k], a.down[k]) for k in range(4) if on[k])
                w_fc1 = merged_weights(block, plan[i, layer])["mlp.fc1"][0]
                torch.testing.assert_close(w_fc1, block.mlp.fc1.weight + direct, atol=1e-6, rtol=0)
            expected.append(ref(x[i : i + 1], T[i : i + 1], y[i : i + 1]))
        out = model(x, T, y)
    torch.testing.assert_close(out, torch.cat(expected), atol=2e-5, rtol=1e-5)
    # The DyDiT width routers are untouched: the same width masks with and without adapters.
    for a, b in zip(model.width_masks(T), base.width_masks(T)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", list(MODELS))
def test_merged_equals_unmerged_masked_and_sliced(family):
    build, make_inputs, T = MODELS[family]
    model, _ = build()
    randomise_adapters(model)
    x, y = make_inputs(model)
    times = torch.linspace(0, 1, 101) if family == "flux" else torch.arange(1000)
    with torch.no_grad():
        masked = model(x, T, y)
        with execution(model, "sliced"):
            sliced = model(x, T, y)
        torch.testing.assert_close(sliced, masked, atol=2e-5, rtol=1e-5)
        assert model.sliced_engine().memory()["merged_bytes"] > 0
        # Constant gates: merge_lora writes plain weights equal to the adapted model.
        randomise_adapters(model, gate_logits=4.0)
        model.clear_cache()
        adapted = model(x, T, y)
        merged = merge_lora(copy.deepcopy(model), times)
        assert not any(".lora." in k for k in merged.state_dict())
        torch.testing.assert_close(merged(x, T, y), adapted, atol=2e-5, rtol=1e-5)
        with execution(merged, "sliced"):
            torch.testing.assert_close(merged(x, T, y), adapted, atol=2e-5, rtol=1e-5)
    randomise_adapters(model)
    with pytest.raises(DyditError, match="change with t"):
        merge_lora(copy.deepcopy(model), times)


def test_training_gates_are_per_sample_and_straight_through():
    model, _ = dit_model(rank=2, groups=2)
    randomise_adapters(model)
    model.train()
    x, y = inputs(model, 3)
    torch.manual_seed(1)
    out, _ = model.forward_with_routing(x, T, y)
    out.square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".lora.router." in n for n in trained)  # the STE reaches the timestep router
    assert any(".lora.adapters." in n for n in trained)


def test_only_adapters_and_routers_train():
    from dydit.models.fitting import ROUTER_KEY_MARKERS

    model, _ = dit_model()
    names = set(freeze_base(model, ROUTER_KEY_MARKERS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == trainable
    assert all(".lora." in n or any(m in f".{n}" for m in ROUTER_KEY_MARKERS) for n in trainable)
    assert any(".attn_rate." in n for n in trainable) and any(".lora.adapters." in n for n in trainable)
    assert lora_config(model) == LoraConfig(4, 2)


def test_config_errors_and_a_half_that_bypasses_f_linear(monkeypatch):
    with pytest.raises(DyditError, match="divisible"):
        LoraConfig(5, 2)
    model, _ = dit_model()
    x, y = inputs(model, 2)
    import dydit.models.layers as layers

    def mm_mlp(x, w1, b1, w2, b2, group_mask=None):  # a family computing fc1 with a matmul
        return F.linear(F.gelu(x @ w1.t() + b1, approximate="tanh"), w2, b2)

    monkeypatch.setattr(layers, "mlp", mm_mlp)
    monkeypatch.setattr("dydit.models.dit.mlp", mm_mlp)
    with pytest.raises(DyditError, match="never called through F.linear"), torch.no_grad():
        model(x, T[:2], y)


def test_tiny_config_has_units_on_every_linear():
    cfg = tiny_config()
    model = add_lora(DyDiT(cfg), LoraConfig(2))
    assert model.blocks[0].lora.paths == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def test_activation_checkpointing_recomputes_with_the_same_adapters():
    from dydit.train.step import enable_grad_checkpointing

    grads = []
    for checkpointed in (False, True):
        model, _ = dit_model()
        randomise_adapters(model)
        model.train()
        if checkpointed:
            enable_grad_checkpointing(model)
        x, y = inputs(model, 3)
        torch.manual_seed(3)
        model.forward_with_routing(x, T, y)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
