"""FLOPs-ratio loss (docs/METHOD.md §5.3), target schedule (§5.4), stratified timesteps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dydit.constants import FLOPS_LOSS_WEIGHT
from dydit.errors import DyditError
from dydit.flops.analytic import flops_loss, flops_ratio, per_sample_flops_ratio, per_sample_macs
from dydit.flops.formulas import layer_costs
from dydit.train.targets import stratified_timesteps, target_schedule

XL_A, XL_M = layer_costs(256, 1152)  # DiT-XL/2 at 256 px


def test_xl_constants_match_the_reference_table():
    assert (XL_A, XL_M) == (1_509_949_440, 2_717_908_992)


def loop_ratio(heads, groups, tokens, a, m):
    """§5.3 written with Python loops, per sample."""
    out = []
    for b in range(heads.shape[0]):
        f_dyn = 0.0
        for layer in range(heads.shape[1]):
            r_h = sum(heads[b, layer].tolist()) / heads.shape[2]
            r_g = sum(groups[b, layer].tolist()) / groups.shape[2]
            r_t = sum(tokens[b, layer].tolist()) / tokens.shape[2]
            f_dyn += a * r_h + m * r_g * r_t
        out.append(f_dyn / (heads.shape[1] * (a + m)))
    return torch.tensor(out, dtype=torch.float64)


def test_ratio_matches_formula_on_hand_made_masks():
    g = torch.Generator().manual_seed(0)
    heads = (torch.rand(3, 4, 16, generator=g) > 0.4).float()
    heads[:, :, 0] = 1.0  # forced head
    groups = (torch.rand(3, 4, 16, generator=g) > 0.6).float()
    tokens = (torch.rand(3, 4, 256, generator=g) > 0.3).float()
    got = per_sample_flops_ratio(heads, groups, tokens, XL_A, XL_M)
    torch.testing.assert_close(got.double(), loop_ratio(heads, groups, tokens, XL_A, XL_M), atol=1e-6, rtol=0)
    rho = flops_ratio(SimpleNamespace(heads=heads, groups=groups, tokens=tokens), XL_A, XL_M)
    torch.testing.assert_close(rho, got.mean())


def test_small_worked_example():
    # One layer, 2 heads, 4 tokens: head 0 only, both groups, half the tokens; A = 1, M = 3.
    heads = torch.tensor([[[1.0, 0.0]]])
    groups = torch.tensor([[[1.0, 1.0]]])
    tokens = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    assert per_sample_flops_ratio(heads, groups, tokens, 1, 3).item() == pytest.approx((0.5 + 3 * 0.5) / 4)
    assert per_sample_macs(heads, groups, tokens, 1, 3).item() == pytest.approx(2.0)


def test_all_on_is_one_and_method_anchors():
    ones = torch.ones(2, 28, 16), torch.ones(2, 28, 16), torch.ones(2, 28, 256)
    assert torch.all(per_sample_flops_ratio(*ones, XL_A, XL_M) == 1.0)
    half = torch.zeros(1, 28, 16)
    half[..., :8] = 1
    all_tokens, half_tokens = torch.ones(1, 28, 256), torch.zeros(1, 28, 256)
    half_tokens[..., :128] = 1
    # docs/METHOD.md §8: 0.50 with half heads and groups; 0.34 when half the tokens are skipped too.
    assert per_sample_flops_ratio(half, half, all_tokens, XL_A, XL_M).item() == pytest.approx(0.5)
    rho = per_sample_flops_ratio(half, half, half_tokens, XL_A, XL_M).item()
    assert rho == pytest.approx(0.34, abs=0.005)


def test_ratio_accepts_bool_masks_and_rejects_bad_shapes():
    h = torch.ones(2, 3, 4, dtype=torch.bool)
    assert per_sample_flops_ratio(h, h, torch.ones(2, 3, 5, dtype=torch.bool), 1, 1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="disagree"):
        per_sample_flops_ratio(h, h, torch.ones(2, 4, 5), 1, 1)


def test_ratio_is_float32_for_bfloat16_masks_and_under_autocast():
    """Under --bf16 the masks leave the network in bfloat16; rho is still summed in float32 (issue 14)."""
    g = torch.Generator().manual_seed(0)
    heads, groups = ((torch.rand(16, 12, 6, generator=g) < 0.6).double() for _ in range(2))
    tokens = (torch.rand(16, 12, 64, generator=g) < 0.7).double()
    ref = flops_ratio(SimpleNamespace(heads=heads, groups=groups, tokens=tokens), XL_A, XL_M)
    bf16 = SimpleNamespace(
        **{k: v.bfloat16() for k, v in dict(heads=heads, groups=groups, tokens=tokens).items()}
    )
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            rho = flops_ratio(bf16, XL_A, XL_M)
        assert rho.dtype == torch.float32 and abs(rho.item() - ref.item()) < 1e-6, (autocast, rho.item())


def test_loss_value_weight_and_gradient():
    z = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    heads = torch.sigmoid(z).expand(2, 3).unsqueeze(0)  # (1, 2, 3)
    stats = SimpleNamespace(heads=heads, groups=torch.ones(1, 2, 3), tokens=torch.ones(1, 2, 4))
    rho = flops_ratio(stats, 1.0, 1.0)
    loss = flops_loss(rho, 0.3)
    assert FLOPS_LOSS_WEIGHT == 2.0
    torch.testing.assert_close(loss, 2.0 * (rho - 0.3) ** 2)
    torch.testing.assert_close(flops_loss(rho, 0.3, weight=0.5), 0.5 * (rho - 0.3) ** 2)
    loss.backward()
    assert torch.all(z.grad > 0)  # rho > target: the loss lowers every logit
    assert flops_loss(torch.tensor(0.7), 0.7).item() == 0.0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), "x"])
def test_target_outside_unit_interval_is_a_user_error(bad):
    with pytest.raises(DyditError, match=r"\(0, 1\]"):
        flops_loss(torch.tensor(0.5), bad)
    with pytest.raises(DyditError, match=r"\(0, 1\]"):
        target_schedule(10, bad, warmup_steps=100)


def test_target_schedule():
    assert [target_schedule(s, 0.5, warmup_steps=1000) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert target_schedule(100, 0.5, warmup_steps=1000) == pytest.approx(0.95)
    assert target_schedule(500, 0.5, warmup_steps=1000) == pytest.approx(0.75)
    assert target_schedule(999, 0.5, warmup_steps=1000) == pytest.approx(0.5005)
    assert target_schedule(1000, 0.5, warmup_steps=1000) == 0.5
    assert target_schedule(30_000, 0.7, warmup_steps=5000) == 0.7  # stage 2 resumes past the warm-up
    assert target_schedule(100, 0.5, warmup_steps=0) == 0.5  # no warm-up: lambda right after the hold
    assert target_schedule(5, 0.5, warmup_steps=0, hold_steps=0) == 0.5
    assert target_schedule(1, 1.0, warmup_steps=10) == 1.0
    with pytest.raises(DyditError, match="step"):
        target_schedule(-1, 0.5, warmup_steps=10)


def test_stratified_timesteps_cover_their_strata():
    t = stratified_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4000,)
    for s in range(4):
        ts = t[s::4]
        assert ts.min() >= 250 * s and ts.max() <= 250 * s + 249
        assert ts.min() <= 250 * s + 5 and ts.max() >= 250 * s + 244  # uniform over the stratum
    # Uneven strata of [0, 10) into 3: [0, 3), [3, 6), [6, 10).
    small = stratified_timesteps(300, num_timesteps=10, strata=3, generator=torch.Generator().manual_seed(1))
    for s, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 10)]):
        assert set(small[s::3].tolist()) == set(range(lo, hi))


def test_stratified_timesteps_reproducible_and_device():
    a = stratified_timesteps(8, generator=torch.Generator().manual_seed(3), device="cpu")
    b = stratified_timesteps(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.device.type == "cpu"
    assert not torch.equal(a, stratified_timesteps(8, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(DyditError, match="batch"):
        stratified_timesteps(0)
    with pytest.raises(DyditError, match="strata"):
        stratified_timesteps(4, strata=0)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 6])
def test_stratified_timesteps_balanced_for_any_per_process_batch(batch):
    """Every stratum is drawn equally often over steps, whatever the per-process batch (issue 14).

    With strata assigned by i mod 4 alone, a batch of 2 never saw t >= 500 and a batch of 5 drew
    the first stratum twice as often as the others.
    """
    steps = 4000 // batch
    t = torch.cat(
        [stratified_timesteps(batch, generator=torch.Generator().manual_seed(k)) for k in range(steps)]
    )
    share = torch.bincount(t // 250, minlength=4).double() / len(t)
    assert torch.all((share - 0.25).abs() < 0.03), share.tolist()
    if batch > 1:  # still stratified: no two samples of one batch share a stratum unless B > 4
        batches = (t // 250).view(steps, batch)
        assert all(len(set(row.tolist())) == min(batch, 4) for row in batches)


def test_stratified_timesteps_draw_no_offset_when_strata_divide_the_batch():
    """A batch that is a multiple of 4 keeps its i mod 4 strata and random stream (runs stay reproducible)."""
    u = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = (torch.arange(8) % 4) * 250 + (u * 250).long()
    assert torch.equal(stratified_timesteps(8, generator=torch.Generator().manual_seed(3)), expected)
