"""DyDiT model: parity with DiT, masked semantics vs a hand-written reference, STE, modes, plans.

docs/METHOD.md §2, §3, §4, §13 items 2-4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from dydit.errors import CheckpointError, DyditError
from dydit.factory import create_model
from dydit.flops.analytic import flops_loss, flops_ratio
from dydit.flops.formulas import layer_costs
from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT, RoutingStats, execution
from dydit.models.fitting import ROUTER_KEY_MARKERS
from dydit.models.layers import modulate

T = torch.tensor([0, 300, 600, 999])
Y = torch.tensor([0, 1, 2, 3])


def random_dit(seed: int = 0, dtype=torch.float32, **overrides) -> DiT:
    """A tiny DiT with every weight random (a fresh DiT's adaLN-Zero blocks are the identity)."""
    torch.manual_seed(seed)
    dit = DiT(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return dit


def randomize_routers(model: DyDiT, seed: int = 1, token_std: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for rate in (block.attn_rate, block.mlp_rate):
                rate.router.weight.copy_(torch.randn(rate.router.weight.shape, generator=g))
                rate.router.bias.copy_(torch.randn(rate.router.bias.shape, generator=g))
            for i in (0, 2):
                lin = block.token_selection.mlp_head[i]
                lin.weight.copy_(token_std * torch.randn(lin.weight.shape, generator=g))
                lin.bias.zero_()


def inputs(batch: int = 4, dtype=torch.float32, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g).to(dtype), T[:batch], Y[:batch]


# Hand-written reference: explicit per-head softmax attention and explicit masks. -------------
def reference_block(block, x, c, heads, groups, tokens):
    """docs/METHOD.md §2/§3.3/§4.2 written out: heads (B,H), groups (B,H), tokens (B,N) or None."""
    b, n, d = x.shape
    h_count = block.attn.num_heads
    hd = d // h_count
    ada = block.adaLN_modulation[1]
    shift1, scale1, gate1, shift2, scale2, gate2 = (F.silu(c) @ ada.weight.T + ada.bias).chunk(6, 1)
    h = modulate(F.layer_norm(x, (d,), eps=1e-6), shift1, scale1)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(d, dim=-1)
    outs = []
    for i in range(h_count):
        s = slice(i * hd, (i + 1) * hd)
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)
        outs.append((att @ v[..., s]) * heads[:, i, None, None])  # zero masked head channels
    attn = torch.cat(outs, -1) @ block.attn.proj.weight.T + block.attn.proj.bias  # proj.bias always added
    x = x + gate1[:, None] * attn
    if tokens is None:
        tokens = (block.token_logits(x) > 0).to(x.dtype)
    h = modulate(F.layer_norm(x, (d,), eps=1e-6), shift2, scale2)
    a = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    a = a * groups.repeat_interleave(a.shape[-1] // h_count, dim=1)[:, None, :]  # zero before GELU
    mlp = F.gelu(a, approximate="tanh") @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return x + tokens[..., None] * gate2[:, None] * mlp, tokens


def reference_forward(model: DyDiT, x, t, y):
    tokens, c, t_emb = model.embed(x, t, y)
    heads_all, groups_all, keep_all = [], [], []
    for block in model.blocks:
        masks = []
        for rate in (block.attn_rate, block.mlp_rate):
            m = ((t_emb @ rate.router.weight.T + rate.router.bias) > 0).to(x.dtype)
            if model.router_layout == "forced_first":
                m = torch.cat([torch.ones_like(m[:, :1]), m], 1)
            masks.append(m)
        tokens, keep = reference_block(block, tokens, c, masks[0], masks[1], None)
        heads_all.append(masks[0])
        groups_all.append(masks[1])
        keep_all.append(keep)
    stacked = [torch.stack(m, 1) for m in (heads_all, groups_all, keep_all)]
    return model.head(tokens, c), *stacked


# Parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["forced_first", "all"])
@pytest.mark.parametrize("mode", ["dense", "masked"])
@pytest.mark.parametrize("training", [False, True])
def test_fresh_dydit_equals_its_dit(layout, mode, training):
    dit = random_dit()
    model = DyDiT.from_dit(dit, router_layout=layout)
    model.execution = mode
    dit.train(training)
    model.train(training)
    x, t, y = inputs()
    with torch.no_grad():
        torch.manual_seed(5)  # same class dropout in both models
        ref = dit(x, t, y)
        torch.manual_seed(5)
        out = model(x, t, y)
    assert ref.abs().max() > 1e-2  # the comparison is not between two zero outputs
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_dense_equals_dit_for_any_router_weights(training):
    dit = random_dit()
    model = DyDiT.from_dit(dit)
    randomize_routers(model)
    with torch.no_grad():
        for block in model.blocks:
            block.token_selection.mlp_head[2].bias.fill_(-100.0)  # masked mode would skip every token
    dit.train(training)
    model.train(training)
    x, t, y = inputs()
    with torch.no_grad(), execution(model, "dense"):
        torch.manual_seed(5)
        ref = dit(x, t, y)
        torch.manual_seed(5)
        out = model(x, t, y)
        assert not torch.allclose(model.forward_with_routing(x, t, y)[0], ref, atol=1e-3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_from_weights_keeps_the_source_and_adds_only_routers():
    dit = random_dit(dtype=torch.float64).eval()
    cfg = dit.config.replace(dynamic=True, router_layout="all")
    model = DyDiT.from_weights(cfg, dit)
    assert model.router_layout == "all" and not model.training
    assert next(model.parameters()).dtype == torch.float64
    sd, own = dit.state_dict(), model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    added = set(own) - set(sd)
    assert added and all(any(m in k for m in ROUTER_KEY_MARKERS) for k in added)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        DyDiT.from_weights(cfg.replace(depth=3), dit)


# Masked semantics ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["forced_first", "all"])
def test_masked_forward_matches_reference(layout):
    model = DyDiT.from_dit(random_dit(dtype=torch.float64), router_layout=layout).eval()
    randomize_routers(model)
    x, t, y = inputs(dtype=torch.float64)
    with torch.no_grad():
        out, stats = model.forward_with_routing(x, t, y)
        ref, heads, groups, tokens = reference_forward(model, x, t, y)
    for got, want in ((stats.heads, heads), (stats.groups, groups), (stats.tokens, tokens)):
        assert 0 < want.mean() < 1  # both decisions occur, so the masks are really exercised
        assert torch.equal(got, want)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_block_with_hand_set_masks_matches_reference():
    model = DyDiT.from_dit(random_dit(dtype=torch.float64), router_layout="all")
    block = model.blocks[1]
    x = torch.randn(3, 16, 32, dtype=torch.float64)
    c = torch.randn(3, 32, dtype=torch.float64)
    heads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # sample 1: no head
    groups = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # sample 2: no group
    tokens = (torch.rand(3, 16) > 0.5).double()
    tokens[1] = 0.0  # a sample that keeps no token
    with torch.no_grad():
        out, keep = block.forward_masked(x, c, heads, groups, tokens)
        ref, _ = reference_block(block, x, c, heads, groups, tokens)
    assert torch.equal(keep, tokens)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # With no head, the attention branch is gate_msa * proj.bias, not zero (docs/METHOD.md §3.5).
    shift1, scale1, gate1, *_ = block.modulation(c)
    with torch.no_grad():
        after_attn = x + gate1[:, None] * block.attn(torch.randn_like(x), head_mask=heads)
    torch.testing.assert_close(after_attn[1], x[1] + gate1[1] * block.attn.proj.bias)
    # A skipped token gets no MLP update at all (fc2.bias included): out = x after attention.
    skipped = tokens[0] == 0
    attn_only, _ = block.forward_masked(x, c, heads, groups, torch.zeros_like(tokens))
    torch.testing.assert_close(out[0, skipped], attn_only[0, skipped].detach())


def test_straight_through_gradients_reach_every_router():
    model = DyDiT.from_dit(random_dit()).train()
    x, t, y = inputs()
    out, stats = model.forward_with_routing(x, t, y)
    assert isinstance(stats, RoutingStats)
    assert stats.heads.shape == (4, 2, 2) and stats.tokens.shape == (4, 2, 16)
    a, m = layer_costs(16, 32)
    loss = out.pow(2).mean() + flops_loss(flops_ratio(stats, a, m), 0.5)
    loss.backward()
    for i, block in enumerate(model.blocks):
        for name, p in [
            ("attn_rate", block.attn_rate.router.weight),
            ("mlp_rate", block.mlp_rate.router.weight),
            ("token.0", block.token_selection.mlp_head[0].weight),
            ("token.2", block.token_selection.mlp_head[2].weight),
            ("token.bias", block.token_selection.mlp_head[2].bias),
        ]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"block {i} {name}"
            assert p.grad.abs().sum() > 0, f"no gradient reached block {i} {name}"


def test_flops_loss_alone_pushes_router_biases_down():
    model = DyDiT.from_dit(random_dit()).train()
    _, stats = model.forward_with_routing(*inputs())
    assert torch.all(stats.heads == 1)  # rho = 1 > target: the loss wants fewer heads/groups/tokens
    flops_loss(flops_ratio(stats, *layer_costs(16, 32)), 0.5).backward()
    for block in model.blocks:
        assert (block.attn_rate.router.bias.grad > 0).all() and (block.mlp_rate.router.bias.grad > 0).all()
        assert (block.token_selection.mlp_head[2].bias.grad > 0).all()


# Determinism, CFG halves, per-sample noise ------------------------------------------------------
def test_eval_masks_are_deterministic_and_equal_for_cfg_halves():
    model = DyDiT.from_dit(random_dit()).eval()
    randomize_routers(model)
    x, t, y = inputs()
    null = torch.full_like(y, model.config.num_classes)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    with torch.no_grad():
        _, s1 = model.forward_with_routing(x2, t2, y2)
        _, s2 = model.forward_with_routing(x2, t2, y2)
        heads, groups = model.width_masks(t)
    for a, b in ((s1.heads, s2.heads), (s1.groups, s2.groups), (s1.tokens, s2.tokens)):
        assert torch.equal(a, b)
    assert torch.equal(s1.heads[:4], s1.heads[4:]) and torch.equal(s1.groups[:4], s1.groups[4:])
    assert torch.equal(heads, s1.heads[:4].bool()) and torch.equal(groups, s1.groups[:4].bool())
    assert heads.dtype == torch.bool and heads.shape == (4, 2, 2)
    assert 0 < heads[:, :, 1:].float().mean() < 1


def test_training_width_noise_is_per_sample():
    model = DyDiT.from_dit(random_dit(), router_layout="all").train()
    with torch.no_grad():
        for block in model.blocks:
            block.attn_rate.router.weight.zero_()
            block.attn_rate.router.bias.zero_()
        x, t, y = torch.randn(32, 4, 8, 8), torch.full((32,), 500), torch.zeros(32).long()
        _, stats = model.forward_with_routing(x, t, y)
    assert len({tuple(h.flatten().tolist()) for h in stats.heads}) > 1


# Modes, plans, construction -------------------------------------------------------------------
def test_execution_modes():
    model = DyDiT(tiny_config(dynamic=True))
    assert model.execution == "masked"
    with execution(model, "dense"):
        assert model.execution == "dense"
        assert isinstance(model(*inputs()), torch.Tensor)
    assert model.execution == "masked"
    with pytest.raises(DyditError, match="unknown execution mode 'fast'.*dense"):
        model.execution = "fast"
    with pytest.raises(RuntimeError), execution(model, "dense"):
        raise RuntimeError("boom")
    assert model.execution == "masked"


def test_width_plan_lookup():
    model = DyDiT.from_dit(random_dit())
    randomize_routers(model)
    plan = model.width_plan([999, 500, 0])
    assert plan.timesteps.dtype == torch.long and plan.heads.shape == (3, 2, 2)
    heads, groups = model.width_masks(torch.tensor([500]))
    assert torch.equal(plan.lookup(500)[0], heads[0]) and torch.equal(plan.lookup(500)[1], groups[0])
    with pytest.raises(DyditError, match="timestep 7 is not in this width plan"):
        plan.lookup(7)


@pytest.mark.parametrize("layout,k", [("forced_first", 5), ("all", 6)])
def test_release_key_names_and_shapes(layout, k):
    dit_keys = create_model("DiT-S/8").state_dict()
    sd = create_model("DyDiT-S/8", router_layout=layout).state_dict()
    extra = {key: tuple(v.shape) for key, v in sd.items() if key not in dit_keys}
    expected = {}
    for i in range(12):
        for rate in ("attn_rate", "mlp_rate"):
            expected[f"blocks.{i}.{rate}.router.weight"] = (k, 384)
            expected[f"blocks.{i}.{rate}.router.bias"] = (k,)
        expected[f"blocks.{i}.token_selection.mlp_head.0.weight"] = (24, 384)
        expected[f"blocks.{i}.token_selection.mlp_head.0.bias"] = (24,)
        expected[f"blocks.{i}.token_selection.mlp_head.2.weight"] = (1, 24)
        expected[f"blocks.{i}.token_selection.mlp_head.2.bias"] = (1,)
    assert extra == expected
    assert all(sd[key].shape == v.shape for key, v in dit_keys.items())
    if layout == "forced_first":  # docs/METHOD.md §2: DiT-S/2 router overhead about 0.16 M parameters
        assert round(sum(math.prod(s) for s in extra.values()) / 1e6, 2) == 0.16


def test_initial_router_biases():
    model = create_model("DyDiT-Ti/4")
    for block in model.blocks:
        assert torch.all(block.attn_rate.router.bias == 15) and torch.all(block.mlp_rate.router.bias == 15)
        assert torch.all(block.token_selection.mlp_head[2].bias == 35)
        assert torch.all(block.token_selection.mlp_head[0].bias == 0)
