"""The sliced engine equals masked DyDiT (docs/METHOD.md §3.5, §4.3, §13 item 5), and router calibration."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dydit.diffusion import create_diffusion, guided, sample_ddim, sample_ddpm
from dydit.errors import DyditError
from dydit.flops import count_flops, formulas
from dydit.models.calibrate import (
    calibrate_routers,
    fractions_for_rho,
    masked_forward,
    segment_counts,
)
from dydit.models.dydit import DyDiT, execution
from dydit.models.sliced import SlicedDyDiT, engine

HEADS_AND_WIDTH = [(2, 32), (3, 48), (4, 32)]  # (heads, width): width divisible by heads and by 16
LAYOUTS = ["forced_first", "all"]


def random_dydit(heads: int, width: int, layout: str, depth: int = 3, seed: int = 0) -> DyDiT:
    """A tiny DyDiT with random weights everywhere (adaLN included) and random routers, in eval mode.

    Layer 0's width routers are switched fully off, so it keeps one head/group ("forced_first")
    or none ("all"); the token routers keep roughly half of the tokens.
    """
    torch.manual_seed(seed)
    model = DyDiT(tiny_config(num_heads=heads, hidden_size=width, depth=depth, router_layout=layout))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for i, block in enumerate(model.blocks):
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.normal_(0, 1.0)
                router.bias.fill_(-100.0 if i == 0 else 0.0)
            block.token_selection.mlp_head[-1].bias.fill_(0.0)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def inputs(model: DyDiT, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return x, y


@pytest.mark.parametrize("heads,width", HEADS_AND_WIDTH)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliced_equals_masked_with_cfg_batch(heads, width, layout):
    model = random_dydit(heads, width, layout)
    engine = SlicedDyDiT(model)
    x, y = inputs(model, 3)
    x2, y2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.config.num_classes)])  # CFG halves
    for t_value in (0, 250, 999):
        t = torch.full((6,), t_value)
        ref = model(x2, t, y2)  # masked execution is the default
        assert rel_err(engine(x2, t, y2), ref) < 1e-5
    # Layer 0 runs one head/group (forced_first) or none (all); the plans are not trivial elsewhere.
    h, g = model.width_masks(torch.tensor([0, 250, 999]))
    assert (h[:, 0].sum(-1) == (1 if layout == "forced_first" else 0)).all()
    assert (g[:, 0].sum(-1) == (1 if layout == "forced_first" else 0)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_timesteps_are_grouped(layout):
    model = random_dydit(4, 32, layout)
    x, y = inputs(model, 5)
    t = torch.tensor([999, 10, 500, 10, 999])
    assert rel_err(engine(model)(x, t, y), model(x, t, y)) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_samples_that_keep_no_tokens_or_all_tokens(layout):
    """Sample 0 keeps no token in any layer, sample 1 keeps all, sample 2 follows the router."""
    model = random_dydit(3, 48, layout)

    def logits_fn(block):
        def fn(x):
            z = block.token_selection.mlp_head(x).squeeze(-1).clone()  # (B, N)
            z[0], z[1] = -1.0, 1.0
            return z

        return fn

    for block in model.blocks:  # masked execution reads token_selection.logits
        block.token_selection.logits = logits_fn(block)
    engine = SlicedDyDiT(model, token_logits=lambda i, x: logits_fn(model.blocks[i])(x))
    x, y = inputs(model, 3)
    t = torch.full((3,), 400)
    ref = model(x, t, y)
    assert rel_err(engine(x, t, y), ref) < 1e-5
    with torch.no_grad():  # and sample 0's output really had no MLP update anywhere
        for block in model.blocks:
            block.mlp.fc2.bias.add_(1.0)
    assert torch.equal(model(x, t, y)[0], ref[0])


def test_all_tokens_skipped_and_all_heads_off():
    model = random_dydit(2, 32, "all")
    with torch.no_grad():
        for block in model.blocks:
            block.attn_rate.router.bias.fill_(-100.0)
            block.mlp_rate.router.bias.fill_(-100.0)
            block.token_selection.mlp_head[-1].bias.fill_(-100.0)
    x, y = inputs(model, 2)
    t = torch.full((2,), 100)
    assert rel_err(SlicedDyDiT(model)(x, t, y), model(x, t, y)) < 1e-5


def test_engine_matches_hand_written_masked_reference():
    model = random_dydit(4, 32, "forced_first")
    x, y = inputs(model, 4)
    t = torch.tensor([3, 3, 700, 700])
    ref = masked_forward(model, x, t, y)
    assert torch.allclose(ref, model(x, t, y), atol=1e-6)
    assert rel_err(SlicedDyDiT(model)(x, t, y), ref) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_samplers_with_cfg_agree_for_a_fixed_seed(layout):
    """DDIM and stochastic DDPM (per-image seeds), 6 steps with CFG: masked and sliced agree."""
    model = random_dydit(4, 32, layout, depth=2)
    x, y = inputs(model, 2)
    diffusion = create_diffusion()
    null = model.config.num_classes
    out = {}
    for mode in ("masked", "sliced"):
        model.execution = mode
        fn = guided(model, 1.5, null)
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        out[mode] = (
            sample_ddim(fn, x, diffusion, 6, model_kwargs=dict(y=y)),
            sample_ddpm(fn, x, diffusion, 6, model_kwargs=dict(y=y), generators=gens),
        )
    for fast, ref in zip(out["sliced"], out["masked"]):
        assert rel_err(fast, ref) < 2e-5


def test_token_bucket_padding_changes_nothing():
    model = random_dydit(3, 48, "forced_first")
    x, y = inputs(model, 3)
    t = torch.full((3,), 600)
    ref = model(x, t, y)
    assert rel_err(SlicedDyDiT(model, token_bucket=7)(x, t, y), ref) < 1e-5
    with pytest.raises(DyditError):
        SlicedDyDiT(model, token_bucket=0)


def test_packs_are_cached_per_pattern_and_shared_when_full():
    model = random_dydit(4, 32, "forced_first")
    engine = SlicedDyDiT(model, plan_timesteps=range(0, 1000, 50))
    heads, groups = model.width_masks(torch.arange(0, 1000, 50))
    info = engine.cache_info()
    assert info["plans"] == 20
    distinct_heads = sum(len({tuple(r.tolist()) for r in heads[:, layer]}) for layer in range(3))
    distinct_groups = sum(len({tuple(r.tolist()) for r in groups[:, layer]}) for layer in range(3))
    assert (info["attn_packs"], info["mlp_packs"]) == (distinct_heads, distinct_groups)
    # A full-width pack shares the model's tensors instead of copying them.
    full = SlicedDyDiT(DyDiT(tiny_config(num_heads=4)).eval(), plan_timesteps=[5])
    assert full.cache_info()["pack_bytes"] == 0
    qkv_weight = full.plan(5).attn[0].weights["attn.qkv"][0]
    assert qkv_weight.data_ptr() == full.model.blocks[0].attn.qkv.weight.data_ptr()


def test_counted_flops_are_the_work_of_the_plan():
    model = random_dydit(4, 32, "forced_first", depth=2)
    engine = SlicedDyDiT(model)
    x, y = inputs(model, 3)
    t = torch.full((3,), 300)
    kept = []
    hooks = [(i, b) for i, b in enumerate(model.blocks)]
    masked_forward(model, x, t, y, token_hook=lambda i, z: kept.append(int((z > 0).sum())) or z)
    with count_flops() as fc:
        engine(x, t, y)
    heads, groups = model.width_masks(torch.tensor([300]))
    cfg, n = model.config, model.config.num_tokens
    attn = sum(3 * formulas.attention_macs(n, cfg.hidden_size, int(heads[0, i].sum()), 4) for i, _ in hooks)
    mlp = sum(
        formulas.mlp_macs(kept[i], cfg.hidden_size, cfg.mlp_hidden, int(groups[0, i].sum()), 4)
        for i, _ in hooks
    )
    assert fc.by_component["attention"] == attn
    assert fc.by_component["mlp"] == mlp


def test_execution_mode_rebuilds_after_weight_change_and_refuses_training():
    model = random_dydit(2, 32, "forced_first")
    x, y = inputs(model, 2)
    t = torch.full((2,), 10)
    model.execution = "sliced"
    first = model(x, t, y)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias.add_(0.5)
    model.execution = "masked"
    ref = model(x, t, y)
    model.execution = "sliced"
    assert not torch.allclose(first, ref)
    assert rel_err(model(x, t, y), ref) < 1e-5
    model.train()
    with pytest.raises(DyditError, match="inference-only"):
        model(x, t, y)


def test_user_errors():
    model = random_dydit(2, 32, "forced_first")
    engine = SlicedDyDiT(model)
    x, y = inputs(model, 2)
    with pytest.raises(DyditError, match="batch sizes differ"):
        engine(x, torch.zeros(3, dtype=torch.long), y)
    with pytest.raises(DyditError, match="inference-only"):
        engine.train()


# Calibration -----------------------------------------------------------------------------------------
def test_segment_counts_average_and_order():
    counts = segment_counts(0.5, 6, 4, 0.5, minimum=1)
    assert sum(counts) == 12 and counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert segment_counts(0.0, 4, 4, 0.5, minimum=1) == [1, 1, 1, 1]
    assert segment_counts(1.0, 4, 4, 0.5, minimum=0) == [4, 4, 4, 4]


def test_fractions_for_rho_hit_the_target():
    a, m = formulas.layer_costs(256, 384)
    h, g, k = fractions_for_rho(0.5, 256, 384, keep=0.75)
    assert h == g and abs((h * a + g * k * m) / (a + m) - 0.5) < 1e-12
    assert fractions_for_rho(1.0, 256, 384)[0] == 1.0
    with pytest.raises(DyditError):
        fractions_for_rho(0.0, 256, 384)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_calibration_reaches_the_fractions_and_plans_vary_with_t(layout):
    model = DyDiT(tiny_config(num_heads=4, hidden_size=32, depth=3, router_layout=layout)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    cal = calibrate_routers(model, heads=0.5, groups=0.75, tokens=0.6, batch=8)
    assert abs(cal.heads - 0.5) < 0.02 and abs(cal.groups - 0.75) < 0.02
    assert abs(cal.tokens - 0.6) < 0.05
    heads, _ = model.width_masks(torch.arange(1000))
    assert len({tuple(r.flatten().tolist()) for r in heads}) > 2  # width changes across t
    if layout == "forced_first":
        assert heads[:, :, 0].all()
    x, y = inputs(model, 2)
    t = torch.full((2,), 900)
    assert rel_err(SlicedDyDiT(model)(x, t, y), model(x, t, y)) < 1e-5


def fixed_token_logits(model: DyDiT, batch: int, seed: int = 5) -> list[torch.Tensor]:
    """A fixed random keep pattern per layer, independent of x (so low precision cannot flip it)."""
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_tokens
    return [torch.randn(batch, n, generator=g) for _ in model.blocks]


def use_fixed_tokens(model: DyDiT, logits: list[torch.Tensor]):
    for i, block in enumerate(model.blocks):
        block.token_selection.logits = lambda x, z=logits[i]: z.to(x.device, x.dtype)
    return lambda i, x: logits[i].to(x.device, x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sliced_is_as_accurate_as_masked(dtype):
    model = random_dydit(4, 32, "forced_first")
    x, y = inputs(model, 3)
    t = torch.full((3,), 600)
    override = use_fixed_tokens(model, fixed_token_logits(model, 3))
    ref = model(x, t, y)  # float32 masked
    model.to(dtype)
    engine = SlicedDyDiT(model, token_logits=override)
    masked = model(x.to(dtype), t, y)
    fast = engine(x.to(dtype), t, y)
    assert fast.dtype == dtype
    assert rel_err(fast.float(), ref) <= 2 * rel_err(masked.float(), ref) + 1e-3


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_sliced_equals_masked(compiled, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_dydit(4, 32, "all")
    x, y = inputs(model, 4)
    override = use_fixed_tokens(model, fixed_token_logits(model, 4))
    t = torch.full((4,), 300)
    ref = model(x, t, y)
    model.to("cuda", dtype)
    engine = SlicedDyDiT(model, token_logits=override, compile=compiled)
    masked = model(x.to("cuda", dtype), t.cuda(), y.cuda())
    fast = engine(x.to("cuda", dtype), t.cuda(), y.cuda())
    if dtype == torch.float32:
        assert rel_err(fast, masked) < 1e-5
    else:
        assert rel_err(fast.float().cpu(), ref) <= 2 * rel_err(masked.float().cpu(), ref) + 1e-3


def test_engine_cache_follows_load_and_to_survives_train_and_stays_out_of_the_state_dict():
    model = random_dydit(2, 32, "forced_first")
    keys = set(model.state_dict())
    x, y = inputs(model, 2)
    t = torch.full((2,), 10)
    model.execution = "sliced"
    model(x, t, y)
    assert model.sliced_engine().cache_info()["plans"] == 1
    assert set(model.state_dict()) == keys  # the engine is not a submodule
    sd = {k: v + 0.1 if k.endswith("adaLN_modulation.1.bias") else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)  # copies in place: the fused adaLN weights must not survive
    assert model.sliced_engine().cache_info()["plans"] == 0
    with execution(model, "masked"):
        ref = model(x, t, y)
    assert rel_err(model(x, t, y), ref) < 1e-5
    model.to(torch.float64)
    assert model.sliced_engine().cache_info()["plans"] == 0
    assert model(x.double(), t, y).dtype == torch.float64
    model(x.double(), t, y)
    model.train()
    model.eval()  # the weights did not change: the plans stay, and are right
    assert model.sliced_engine().cache_info()["plans"] == 1
    with execution(model, "masked"):
        ref = model(x.double(), t, y)
    assert rel_err(model(x.double(), t, y), ref) < 1e-12


def test_float_time_values_are_planned_by_their_exact_value():
    """Flow-matching models receive t in [0, 1]: plans are keyed by the float value as given."""
    model = random_dydit(4, 32, "all")
    plan = model.width_plan(torch.tensor([0.25, 0.75]))
    assert plan.timesteps.dtype == torch.float32 and len(plan) == 2
    assert [t for t, _, _ in plan.steps()] == [0.25, 0.75]
    assert torch.equal(plan.lookup(0.75)[0], model.width_masks(torch.tensor([0.75]))[0][0])
    with pytest.raises(DyditError, match="timestep 0.5 is not in this width plan"):
        plan.lookup(0.5)
    x, y = inputs(model, 3)
    t = torch.tensor([0.1, 0.1, 0.7])  # float32 values that Python floats do not equal exactly
    engine = SlicedDyDiT(model)
    assert rel_err(engine(x, t, y), model(x, t, y)) < 1e-5
    assert engine.cache_info()["plans"] == 2
    engine.prepare([0.5, 0.5])  # Python floats: float64 keys
    assert engine.cache_info()["plans"] == 3 and engine.plan(0.5) is engine.plan(torch.tensor(0.5))


def test_in_place_weight_updates_of_ema_and_reordering_drop_the_engine_cache() -> None:
    from dydit.models.reorder import reorder_by_importance
    from dydit.train.ema import update_ema

    cfg = tiny_config(depth=1, num_heads=4, dynamic=True)
    model, ema = DyDiT(cfg).eval(), DyDiT(cfg).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([900, 900]), torch.tensor([0, 1])
    for m in (model, ema):
        m.execution = "sliced"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ema(x, t, y)  # builds the engine's packs from the old weights
        update_ema(ema, model, 0.5)
        after_ema = ema(x, t, y)
        ema.execution = "masked"
        assert torch.allclose(after_ema, ema(x, t, y), atol=1e-5)  # the packs followed the update
        model(x, t, y)
        reorder_by_importance(model)
        after = model(x, t, y)
        model.execution = "masked"
        assert torch.allclose(after, model(x, t, y), atol=1e-5)
