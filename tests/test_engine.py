"""The sliced engine as a backend with options: ``dydit.engine``, weight following, pack memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_sliced import inputs, random_dydit, rel_err

import dydit
from dydit.errors import DyditError
from dydit.models.dydit import DyDiT, execution
from dydit.models.dynamic import WidthPlan
from dydit.models.kernels import BACKENDS
from dydit.presets import get_model_config

EMBEDDED = Path(dydit.__file__).parent / "assets" / "dydit-ti4-fmnist-0.5.safetensors"


def masked(model: DyDiT, x, t, y):
    with execution(model, "masked"), torch.no_grad():
        return model(x, t, y)


def test_engine_options_and_errors():
    model = random_dydit(4, 32, "forced_first")
    x, y = inputs(model, 3)
    t = torch.full((3,), 600)
    fast = dydit.engine(model, token_bucket=5, pack_budget=None)
    assert fast.kernels.backend == "torch" and not fast.kernels.compiled and fast.config is model.config
    assert rel_err(fast(x, t, y), masked(model, x, t, y)) < 1e-5
    assert set(BACKENDS) == {"torch"}
    with pytest.raises(DyditError, match="unknown engine backend 'triton'; choose one of torch"):
        dydit.engine(model, backend="triton")
    with pytest.raises(DyditError, match="compile_mode applies only with compile=True"):
        dydit.engine(model, compile_mode="reduce-overhead")
    with pytest.raises(DyditError, match="pack_budget"):
        dydit.engine(model, pack_budget=-1)


@pytest.mark.parametrize(
    "edit",
    ["copy_", "optimizer", "load_state_dict", "assign", "to_float64"],
)
def test_engine_follows_weight_edits_without_clear_cache(edit):
    model = random_dydit(4, 32, "forced_first", depth=2)
    x, y = inputs(model, 2)
    t = torch.full((2,), 300)
    fast = dydit.engine(model, pack_budget=None)
    model.execution = "sliced"
    before = fast(x, t, y)
    model(x, t, y)  # the default engine of the model packs the old weights too
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    if edit == "copy_":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(new[next(k for k, q in model.named_parameters() if q is p)])
    elif edit == "optimizer":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.execution = "masked"
        model(x, t, y).square().mean().backward()
        opt.step()
        model.eval().execution = "sliced"
    elif edit == "load_state_dict":
        model.load_state_dict(new)
    elif edit == "assign":
        model.load_state_dict(new, assign=True)  # new Parameter objects
    else:
        model.to(torch.float64)
        x = x.double()
    ref = masked(model, x, t, y)
    assert not torch.allclose(before.to(ref.dtype), ref)
    assert rel_err(fast(x, t, y), ref) < 1e-5
    assert rel_err(model(x, t, y), ref) < 1e-5


def test_edits_through_data_need_clear_cache():
    """The one documented blind spot: ``p.data`` has its own version counter."""
    model = random_dydit(2, 32, "forced_first")
    x, y = inputs(model, 2)
    t = torch.full((2,), 10)
    model.execution = "sliced"
    model(x, t, y)
    for block in model.blocks:
        block.mlp.fc2.bias.data.add_(0.5)
    model.clear_cache()
    assert rel_err(model(x, t, y), masked(model, x, t, y)) < 1e-5


def _attn_pack_bytes(k: int, d: int, width: int) -> tuple[int, int]:
    """(copy, index) bytes of a float32 DiT head pack of k heads: qkv rows + bias, proj columns."""
    return 4 * (3 * k * d * width + 3 * k * d + width * k * d), 8 * (3 * k * d + k * d)


def _mlp_pack_bytes(k: int, g: int, width: int) -> tuple[int, int]:
    """(copy, index) bytes of an MLP pack of k groups of g channels: fc1 rows + bias, fc2 columns."""
    return 4 * (k * g * width + k * g + width * k * g), 8 * (2 * k * g)


def test_pack_memory_counts_copies_once_and_views_as_zero():
    width, heads, depth = 32, 4, 2
    model = DyDiT(tiny_config(num_heads=heads, hidden_size=width, depth=depth)).eval()
    d, g = width // heads, model.config.mlp_hidden // heads
    on = torch.tensor([True, True, False, False])
    full, none = torch.ones(heads, dtype=torch.bool), torch.zeros(heads, dtype=torch.bool)
    # Two timesteps share layer 0's sliced pattern; layer 1 is full at one and empty at the other.
    heads_mask = torch.stack([torch.stack([on, full]), torch.stack([on, none])])  # (T, L, H)
    plan = WidthPlan(torch.tensor([100, 200]), heads_mask, heads_mask.clone())
    fast = dydit.engine(model, pack_budget=None)
    fast.load_plan(plan)
    mem = fast.memory()
    ac, ai = _attn_pack_bytes(2, d, width)
    mc, mi = _mlp_pack_bytes(2, g, width)
    assert (mem["copy_bytes"], mem["index_bytes"]) == (ac + mc, ai + mi)
    assert mem["pack_bytes"] == ac + mc + ai + mi and mem["held_packs"] == 2
    weights = sum(
        4 * p.numel()
        for b in model.blocks
        for n, p in b.named_parameters()
        if n.startswith(("attn.", "mlp."))
    )
    assert mem["weight_bytes"] == weights and mem["ratio"] == mem["pack_bytes"] / weights
    # The full pattern is the block's own tensors (a view costs 0): same storage.
    step = fast.plan(100)
    assert step.attn[1].weights["attn.qkv"][0].data_ptr() == model.blocks[1].attn.qkv.weight.data_ptr()
    assert step.attn[0] is fast.plan(200).attn[0]  # one pack for one pattern across timesteps
    # Nothing held: only the indices count, and the gathered weights are fresh copies each time.
    lean = dydit.engine(model, pack_budget=0.0)
    lean.load_plan(plan)
    assert lean.memory()["pack_bytes"] == ai + mi and lean.memory()["held_packs"] == 0
    assert lean.memory()["gathered_packs"] == 2


def test_budget_holds_the_most_used_packs_and_gathered_packs_compute_the_same():
    model = random_dydit(4, 32, "forced_first", depth=3)
    ts = torch.arange(0, 1000, 25)
    x, y = inputs(model, 3)
    ref = {int(v): masked(model, x, torch.full((3,), int(v)), y) for v in ts[::13]}
    for budget in (None, 0.2, 0.0):
        fast = dydit.engine(model, pack_budget=budget, plan_timesteps=ts)
        mem = fast.memory()
        if budget is not None:
            assert mem["ratio"] <= budget or mem["copy_bytes"] == 0
        else:
            assert mem["gathered_packs"] == 0
        for v, out in ref.items():
            assert rel_err(fast(x, torch.full((3,), v), y), out) < 1e-5
    # The packs used by more steps are held first; a gathered one did not fit beside them.
    fast = dydit.engine(model, pack_budget=0.3)
    plan = model.width_plan(ts)
    fast.load_plan(plan)
    uses = {}
    for t, _, _ in plan.steps():
        for pack in fast.plan(t).attn + fast.plan(t).mlp:
            uses[pack] = uses.get(pack, 0) + 1
    held = [(n, p) for p, n in uses.items() if p.held]
    gathered = [(n, p) for p, n in uses.items() if p.sliced and not p.held]
    mem = fast.memory()
    assert held and gathered and max(n for n, _ in held) >= max(n for n, _ in gathered)
    budget = 0.3 * mem["weight_bytes"] - mem["index_bytes"]
    for n, pack in gathered:
        before = sum(p.copy_bytes() for m, p in held if m > n)
        assert before + pack.copy_bytes() > budget


def test_embedded_dydit_250_step_plan_holds_at_most_half_its_weights():
    model = dydit.load_model(EMBEDDED).eval()
    settings = dydit.SamplingSettings(steps=250)
    times = settings.network_times(dydit.create_process(model.config))
    fast = dydit.engine(model, plan_timesteps=times)
    mem = fast.memory()
    assert len(times) == 250 and fast.cache_info()["plans"] == 250
    assert mem["copy_bytes"] > 0 and mem["ratio"] <= 0.5
    unlimited = dydit.engine(model, pack_budget=None, plan_timesteps=times).memory()
    assert unlimited["ratio"] > 1.0  # what holding every pack would cost
    x = torch.randn(2, 1, 32, 32)
    y = torch.tensor([3, 10])
    for t in (times[0], times[100], times[-1]):
        tt = torch.full((2,), t)
        assert rel_err(fast(x, tt, y), masked(model, x, tt, y)) < 1e-5


def xl_plan(model: DyDiT, steps: int = 250, seed: int = 0) -> WidthPlan:
    """A DiT-XL/2-like mask profile: 30-100% of heads and groups active, varying with t and layer,
    unit 0 always on (forced_first), patterns drawn from per-layer scores plus per-step noise."""
    g = torch.Generator().manual_seed(seed)
    depth, heads = len(model.blocks), model.blocks[0].head_units.count
    t = torch.linspace(999, 0, steps)

    def masks() -> torch.Tensor:
        score = torch.rand(depth, heads, generator=g)
        out = torch.zeros(steps, depth, heads, dtype=torch.bool)
        for i in range(steps):
            frac = (0.3 + 0.7 * t[i] / 999 + 0.1 * torch.sin(torch.arange(depth) / 3.0)).clamp(0.3, 1.0)
            noisy = score + 0.15 * torch.rand(depth, heads, generator=g)
            noisy[:, 0] = 2.0
            k = (frac * heads).round().clamp(1, heads).long()
            rank = noisy.argsort(dim=1, descending=True).argsort(dim=1)  # (L, H): 0 = highest score
            out[i] = rank < k[:, None]
        return out

    return WidthPlan(t, masks(), masks())


def test_dit_xl_shaped_dydit_packs_stay_within_half_its_weights():
    with torch.device("meta"):
        model = DyDiT(get_model_config("DiT-XL/2")).eval()
    plan = xl_plan(model, steps=100)
    active = plan.heads.float().mean(2)  # (T, L)
    assert float(active.min()) >= 0.3 and float(active.mean(1).min()) < 0.4 < 0.9 < float(active.max())
    fast = dydit.engine(model)
    fast.load_plan(plan)
    mem = fast.memory()
    unlimited = dydit.engine(model, pack_budget=None)
    unlimited.load_plan(plan)
    assert mem["weight_bytes"] > 1.7e9 and mem["ratio"] <= 0.5 < unlimited.memory()["ratio"]
    assert mem["held_packs"] > 0


def test_generate_takes_an_engine_in_place_of_the_model():
    model = random_dydit(4, 32, "forced_first", depth=2)
    settings = dydit.SamplingSettings(sampler="ddim", steps=4, cfg_scale=1.5)
    process = dydit.create_process(model.config)
    common = dict(seeds=[1, 2], shape=(4, 8, 8), num_classes=model.config.num_classes, progress=False)
    (ref,) = [b.samples for b in dydit.generate(model, process, settings, **common)]  # masked
    fast = dydit.engine(model, token_bucket=3, pack_budget=0.0)
    (out,) = [b.samples for b in dydit.generate(fast, process, settings, **common)]
    assert rel_err(out, ref) < 1e-4
    with pytest.raises(DyditError, match="flow-matching sampler"):  # engine.config pairs the process
        next(dydit.generate(fast, process, dydit.SamplingSettings(sampler="euler", steps=2), **common))


def test_budget_holds_when_a_sampler_plans_one_time_at_a_time():
    """Packs made on first use (as in a sampler run) and their indices never exceed the budget."""
    model = dydit.load_model(EMBEDDED).eval()
    times = dydit.SamplingSettings(steps=250).network_times(dydit.create_process(model.config))
    fast = dydit.engine(model)
    for t in times:
        fast.plan(t)
        assert fast.memory()["ratio"] <= 0.5
    assert fast.memory()["held_packs"] > 0


@pytest.mark.parametrize("how", ["engine", "execution"])
def test_generate_plans_every_time_of_the_run_before_sampling(how, monkeypatch):
    """``generate`` plans the sampler's times at once (as ``dydit sample`` did), so the packs the
    run uses most are the ones held: one width_plan call covering every network time."""
    model = random_dydit(4, 32, "forced_first", depth=2).eval()
    settings = dydit.SamplingSettings(sampler="ddim", steps=5, cfg_scale=1.0)
    process = dydit.create_process(model.config)
    calls: list[list[float]] = []
    real = DyDiT.width_plan

    def recording(self, t):
        calls.append([float(v) for v in t])
        return real(self, t)

    monkeypatch.setattr(DyDiT, "width_plan", recording)
    if how == "engine":
        fn = dydit.engine(model)
    else:
        model.execution, fn = "sliced", model
    common = dict(seeds=[1, 2], shape=(4, 8, 8), num_classes=model.config.num_classes, progress=False)
    list(dydit.generate(fn, process, settings, **common))
    assert len(calls) == 1 and sorted(calls[0]) == sorted(map(float, settings.network_times(process)))
