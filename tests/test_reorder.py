"""Importance reordering of heads and MLP groups is function-preserving (docs/METHOD.md §3.4)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dydit.models.dit import DiT
from dydit.models.dydit import DyDiT
from dydit.models.reorder import group_importance, head_importance, permute_heads, reorder_by_importance


def random_dit(**overrides) -> DiT:
    dit = DiT(tiny_config(num_heads=4, **overrides))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return dit.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([3, 400, 900]), torch.tensor([0, 1, 2])


def test_reordering_a_dit_preserves_outputs_and_sorts_importance():
    dit = random_dit()
    x, t, y = inputs()
    with torch.no_grad():
        before = dit(x, t, y)
    orders = reorder_by_importance(dit)
    with torch.no_grad():
        after = dit(x, t, y)
    assert any(not torch.equal(o, torch.arange(4)) for pair in orders for o in pair)  # a real permutation
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for block in dit.blocks:
        h, g = head_importance(block), group_importance(block, 4)
        assert torch.all(h[:-1] >= h[1:]) and torch.all(g[:-1] >= g[1:])
    again = reorder_by_importance(dit)
    assert all(torch.equal(o, torch.arange(4)) for pair in again for o in pair)


def test_permute_heads_moves_rows_and_columns():
    dit = random_dit()
    block = dit.blocks[0]
    d = block.attn.head_dim
    w = block.attn.qkv.weight.detach().clone()
    proj = block.attn.proj.weight.detach().clone()
    order = torch.tensor([2, 0, 3, 1])
    permute_heads(block, order)
    for part in range(3):  # q, k and v blocks
        base = part * 32
        new_rows = block.attn.qkv.weight[base : base + d]
        assert torch.equal(new_rows, w[base + 2 * d : base + 3 * d])
    assert torch.equal(block.attn.proj.weight[:, d : 2 * d], proj[:, 0:d])


@pytest.mark.parametrize("layout", ["forced_first", "all"])
@pytest.mark.parametrize("training", [False, True])
def test_reordering_a_fresh_dydit_preserves_outputs(layout, training):
    model = DyDiT.from_dit(random_dit(), router_layout=layout).train(training)
    x, t, y = inputs()
    with torch.no_grad():
        torch.manual_seed(0)
        before = model(x, t, y)
        reorder_by_importance(model)
        torch.manual_seed(0)
        after = model(x, t, y)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_router_rows_follow_their_heads():
    # With the "all" layout, permuting router rows with the heads preserves any routing exactly.
    model = DyDiT.from_dit(random_dit(), router_layout="all").eval()
    with torch.no_grad():
        for block in model.blocks:
            for rate in (block.attn_rate, block.mlp_rate):
                rate.router.weight.normal_(0, 1)
                rate.router.bias.normal_(0, 1)
    x, t, y = inputs()
    with torch.no_grad():
        before, stats = model.forward_with_routing(x, t, y)
        assert 0 < stats.heads.mean() < 1
        reorder_by_importance(model)
        after = model(x, t, y)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
