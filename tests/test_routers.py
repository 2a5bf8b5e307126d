"""Routers and Gumbel-sigmoid binarisation (docs/METHOD.md §3.1, §3.2, §4.1)."""

from __future__ import annotations

import pytest
import torch

from dydit.constants import GUMBEL_TAU
from dydit.models.routers import TokenRouter, WidthRouter, _gumbel, gumbel_sigmoid


def test_eval_is_exact_threshold_at_zero():
    z = torch.tensor([-3.0, -1e-6, 0.0, 1e-6, 0.2, 40.0])
    out = gumbel_sigmoid(z, training=False)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert torch.equal(out, gumbel_sigmoid(z, training=False))  # no noise


def test_training_forward_is_hard_and_gradient_is_soft():
    z = torch.linspace(-8, 8, 200, requires_grad=True)
    torch.manual_seed(3)
    out = gumbel_sigmoid(z, training=True)
    torch.manual_seed(3)
    g1, g2 = _gumbel(z), _gumbel(z)
    soft = torch.sigmoid((z.detach() + g1 - g2) / GUMBEL_TAU)
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.detach(), (soft > 0.5).float())
    out.sum().backward()
    torch.testing.assert_close(z.grad, soft * (1 - soft) / GUMBEL_TAU)


def test_bf16_autocast_keeps_the_straight_through_gradient_of_a_saturated_router():
    # A token router starts at bias 35: sigmoid(35 / 5) = 0.99909, which bfloat16 rounds to 1, so a
    # sigmoid taken in bf16 has gradient s(1 - s) = 0 and the FLOPs loss can never move the router.
    z = torch.full((64,), 35.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(z[:, None], torch.ones(1, 1)).squeeze(-1)  # bf16 logits
        assert logits.dtype == torch.bfloat16
        out = gumbel_sigmoid(logits, training=True)
    assert out.dtype == torch.bfloat16 and set(out.detach().unique().tolist()) <= {0.0, 1.0}
    out.float().sum().backward()
    assert z.grad is not None and float(z.grad.min()) > 0  # float32: about 1.8e-4 each
    assert float(z.grad.max()) < 1e-2


def test_training_noise_is_logistic_per_element():
    # 1[z + g1 - g2 > 0] with two Gumbels is Bernoulli(sigmoid(z)), whatever the temperature.
    torch.manual_seed(0)
    z = torch.full((200_000,), 0.5)
    rate = gumbel_sigmoid(z, training=True).mean().item()
    assert abs(rate - torch.sigmoid(torch.tensor(0.5)).item()) < 0.01


@pytest.mark.parametrize("layout,outputs", [("forced_first", 3), ("all", 4)])
def test_width_router_layouts(layout, outputs):
    r = WidthRouter(16, 4, layout)
    assert r.router.out_features == outputs
    torch.nn.init.zeros_(r.router.weight)
    torch.nn.init.constant_(r.router.bias, -5.0)  # router switches everything off
    e = torch.randn(3, 16)
    for training in (True, False):
        r.train(training)
        torch.manual_seed(1)
        m = r(e)
        assert m.shape == (3, 4)
        expected_first = 1.0 if layout == "forced_first" else 0.0
        assert torch.all(m[:, 0] == expected_first)
        assert torch.all(m[:, 1:] == 0.0)
    assert r.hard_mask(e).dtype == torch.bool
    assert r.hard_mask(e)[:, 0].all() == (layout == "forced_first")


def test_hard_mask_matches_eval_forward():
    r = WidthRouter(16, 6, "forced_first").eval()
    torch.nn.init.normal_(r.router.weight, std=2.0)
    e = torch.randn(64, 16)
    hard = r.hard_mask(e)
    assert torch.equal(hard.float(), r(e))
    assert 0 < hard[:, 1:].float().mean() < 1  # the test exercises both outcomes


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match="router layout"):
        WidthRouter(16, 4, "first")


def test_token_router_shape_and_keys():
    r = TokenRouter(64)
    assert sorted(r.state_dict()) == [
        "mlp_head.0.bias",
        "mlp_head.0.weight",
        "mlp_head.2.bias",
        "mlp_head.2.weight",
    ]
    assert r.mlp_head[0].weight.shape == (4, 64) and r.mlp_head[2].weight.shape == (1, 4)
    x = torch.randn(2, 5, 64)
    assert r.logits(x).shape == (2, 5)
    r.eval()
    assert torch.equal(r(x), (r.logits(x) > 0).float())
