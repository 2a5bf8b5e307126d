"""Step caching (docs/METHOD.md §19): TeaCache and FirstBlockCache over the backbone seam.

Threshold 0 computes every evaluation and equals uncached sampling bitwise (DiT, DyDiT in every
execution, U-ViT, FLUX and DyFLUX); reused evaluations record only the work that ran (counted MACs
against the MAC table); nothing leaks across batches or prompts; a reused call with an unchanged
input returns the computed output (residual structures of every family); large thresholds skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

import dydit
from dydit.conditioning import TextCondition
from dydit.errors import DyditError
from dydit.flops import count_flops
from dydit.models.cache import (
    CacheSettings,
    ChangeRecorder,
    StepCache,
    cached,
    fit_coefficients,
    load_coefficients,
    save_coefficients,
)
from dydit.models.dydit import DyDiT
from dydit.models.sliced import SlicedDyDiT
from dydit.models.uvit import UViT
from dydit.presets import get_model_config, get_uvit_config

METHODS = ["teacache", "fbcache"]


def random_dit(depth: int = 3, seed: int = 0) -> dydit.DiT:
    torch.manual_seed(seed)
    model = dydit.DiT(tiny_config(depth=depth))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def random_dydit(seed: int = 0) -> DyDiT:
    """A DyDiT whose routers switch heads, groups and tokens off (varying with t)."""
    torch.manual_seed(seed)
    model = DyDiT(tiny_config(depth=3, num_heads=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for block in model.blocks:
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.normal_(0, 1.0)
                router.bias.fill_(0.0)
            block.token_selection.mlp_head[-1].bias.fill_(0.0)
    return model.eval()


def random_uvit(seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    cfg = get_uvit_config("U-ViT-H/2").replace(
        depth=4, hidden_size=32, num_heads=4, input_size=8, num_classes=7
    )
    model = UViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def sample(fn, model, settings, seeds=range(3), batch_size=2, num_classes=4, labels=None) -> torch.Tensor:
    cfg = model.config
    process = dydit.create_process(cfg)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out = dydit.generate(
        fn, process, settings, seeds=list(seeds), shape=shape, num_classes=num_classes,
        labels=labels, batch_size=batch_size, progress=False,
    )  # fmt: skip
    return torch.cat([b.samples for b in out])


DPM = dydit.SamplingSettings(sampler="dpm++2m", steps=6, cfg_scale=1.5)


@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_equals_uncached_dit(method):
    model = random_dit()
    want = sample(model, model, DPM)
    cache = cached(model, method, 0.0)
    assert torch.equal(sample(cache, model, DPM), want)
    assert cache.stats.reused == 0 and cache.stats.computed == 2 * 6  # two batches of six evaluations


@pytest.mark.parametrize("execution", ["sliced", "masked", "dense"])
def test_threshold_zero_equals_uncached_dydit(execution):
    model = random_dydit()
    model.execution = execution
    want = sample(model, model, DPM)
    for method in METHODS:
        assert torch.equal(sample(cached(model, method, 0.0), model, DPM), want), method
    if execution == "sliced":  # an engine with options is cached the same way
        engine = SlicedDyDiT(model)
        assert torch.equal(sample(cached(engine, "fbcache", 0.0), model, DPM), want)


def test_threshold_zero_equals_uncached_uvit():
    model = random_uvit()
    settings = dydit.SamplingSettings(sampler="dpm++2m", steps=5, cfg_scale=1.5)
    want = sample(model, model, settings, num_classes=7)
    for method in METHODS:
        assert torch.equal(sample(cached(model, method, 0.0), model, settings, num_classes=7), want)


def test_threshold_zero_equals_uncached_dydit_on_uvit():
    model = DyDiT.from_dit(random_uvit()).eval()
    with torch.no_grad():
        for block in model.blocks:
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.normal_(0, 1.0)
                router.bias.fill_(0.0)
            for p in block.token_selection.parameters():
                p.normal_(0, 0.3)
    settings = dydit.SamplingSettings(sampler="dpm++2m", steps=5, cfg_scale=1.5)
    for execution in ("sliced", "masked"):
        model.execution = execution
        want = sample(model, model, settings, num_classes=7)
        for method in METHODS:
            got = sample(cached(model, method, 0.0), model, settings, num_classes=7)
            assert torch.equal(got, want), (execution, method)


def flux_inputs(cfg, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, 8, 8, generator=g)
    text = torch.randn(batch, 5, cfg.joint_attention_dim, generator=g)
    return x, TextCondition(text, torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def euler(fn, x, y, steps: int = 4) -> torch.Tensor:
    """A plain Euler loop over t in [1, 0] (FLUX's sampling direction), calling ``fn(x, t, y)``."""
    times = torch.linspace(1.0, 0.0, steps + 1)
    if isinstance(fn, StepCache):
        fn.start_run(times[:-1].tolist())
    for t0, t1 in zip(times[:-1], times[1:]):
        with torch.no_grad():
            x = x + (t1 - t0) * fn(x, t0.expand(x.shape[0]), y)
    return x


@pytest.mark.parametrize("name", ["FLUX-tiny", "DyFLUX-tiny"])
def test_threshold_zero_equals_uncached_flux(name):
    torch.manual_seed(0)
    model = dydit.create_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    if name.startswith("Dy"):
        model.execution = "sliced"
    cfg = get_model_config(name)
    x, y = flux_inputs(cfg)
    want = euler(model, x, y)
    for method in METHODS:
        assert torch.equal(euler(cached(model, method, 0.0), x, y), want), method


FAMILIES = {
    "dit": lambda: (random_dit(), None),
    "dydit-sliced": lambda: (random_dydit(), "sliced"),
    "dydit-masked": lambda: (random_dydit(), "masked"),
    "uvit": lambda: (random_uvit(), None),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_a_reused_call_on_an_unchanged_input_returns_the_computed_output(family, method):
    """The residual's structure (U-ViT's stream and skip stack included) is put back exactly."""
    model, execution = FAMILIES[family]()
    if execution:
        model.execution = execution
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.full((2,), 400), torch.tensor([1, 2])
    cache = cached(model, method, 0.5)
    cache.start_run([999, 400, 400, 0])
    first, second = cache(x, t, y), cache(x, t, y)
    assert cache.last_run == [True, False]
    assert torch.allclose(second, first, rtol=1e-5, atol=1e-6)


def test_a_reused_flux_call_returns_the_computed_output():
    torch.manual_seed(0)
    model = dydit.create_model("FLUX-tiny").eval()
    x, y = flux_inputs(get_model_config("FLUX-tiny"))
    t = torch.full((2,), 0.5)
    for method in METHODS:
        cache = cached(model, method, 0.5)
        cache.start_run([1.0, 0.5, 0.5, 0.0])
        first, second = cache(x, t, y), cache(x, t, y)
        assert cache.last_run == [True, False]
        assert torch.allclose(second, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_reused_steps_count_only_the_work_that_ran(method):
    model = random_dit(depth=3)
    table, depth = model.macs_table(), 3
    full = sum(table.values())
    ends = table["patch_embed"] + table["t_embedder"] + table["final_layer"]
    layer = (table["adaLN"] + table["attention"] + table["mlp"]) // depth
    if method == "teacache":  # the indicator: the first block's modulation, on every call
        computed, reused = full + table["adaLN"] // depth, ends + table["adaLN"] // depth
    else:  # the first block always runs
        computed, reused = full, ends + layer
    cache = cached(model, method, 2.0)
    with count_flops() as fc:
        sample(cache, model, DPM, seeds=range(2), batch_size=2)
    stats = cache.stats
    assert stats.reused > 0 and stats.computed >= 2  # first and last always computed
    rows = 4  # two images, guidance doubles them
    assert fc.total == rows * (stats.computed * computed + stats.reused * reused)
    blocks_run = stats.computed * depth + (stats.reused if method == "fbcache" else 0)
    assert fc.by_component["attention"] == rows * blocks_run * table["attention"] // depth


def test_dydit_sliced_calls_cost_the_plan_when_computed_and_the_ends_when_reused():
    model = random_dydit()
    model.execution = "sliced"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 3])
    times = [900, 700, 700, 100]
    cache = cached(model, "teacache", 10.0)
    cache.start_run(times)
    engine = model.sliced_engine()
    engine.prepare(times)  # the width plans (made once per t) are not part of a call's cost
    for t in times:
        tt = torch.full((2,), t)
        with count_flops() as uncached:
            want = model(x, tt, y)
        with count_flops() as fc:
            got = cache(x, tt, y)
        if cache.last_run[-1]:  # computed: the plan's work, the same output
            assert torch.equal(got, want) and fc.total == uncached.total
        else:  # embedding, the fused adaLN the engine makes first, head
            skipped = {"attention", "mlp", "token_router", "adaLN"}
            ends = sum(v for k, v in uncached.by_component.items() if k not in skipped)
            assert fc.total == ends + uncached.by_component["adaLN"]
            assert "attention" not in fc.by_component
    assert cache.last_run == [True, False, False, True]
    assert engine is model.sliced_engine()


def test_large_thresholds_skip_steps_and_stay_finite():
    model = random_dit()
    want = sample(model, model, DPM)
    for method in METHODS:
        cache = cached(model, method, 5.0)
        got = sample(cache, model, DPM)
        assert cache.stats.reused > 0 and torch.isfinite(got).all()
        assert not torch.equal(got, want)
        assert cache.last_run[0] and cache.last_run[-1]  # first and last evaluations computed


@pytest.mark.parametrize("method", METHODS)
def test_no_state_leaks_across_batches_or_labels(method):
    model = random_dit()
    cache = cached(model, method, 0.3)
    a = sample(cache, model, DPM, seeds=[5, 6], labels=[0, 1], batch_size=2)
    b_after_a = sample(cache, model, DPM, seeds=[7, 8], labels=[2, 3], batch_size=2)
    b_alone = sample(cached(model, method, 0.3), model, DPM, seeds=[7, 8], labels=[2, 3], batch_size=2)
    assert torch.equal(b_after_a, b_alone)
    both = sample(
        cached(model, method, 0.3), model, DPM, seeds=[5, 6, 7, 8], labels=[0, 1, 2, 3], batch_size=2
    )
    assert torch.equal(both, torch.cat([a, b_alone]))  # the second batch of a run: as if alone
    # A call with another batch size starts a new run by itself (no residual of the wrong shape).
    cache.start_run([999, 500, 0])
    cache(torch.randn(2, 4, 8, 8), torch.full((2,), 999), torch.tensor([0, 1]))
    cache(torch.randn(3, 4, 8, 8), torch.full((3,), 500), torch.tensor([0, 1, 2]))
    assert cache.last_run == [True]


def test_settings_and_user_errors():
    assert CacheSettings.parse("teacache:0.15").threshold == 0.15
    assert CacheSettings.parse("FBCache:0.1").spec == "fbcache:0.1"
    for bad in ("teacache", "teacache:x", "nocache:0.1", "fbcache:-1", "fbcache:inf"):
        with pytest.raises(DyditError):
            CacheSettings.parse(bad)
    assert CacheSettings("teacache", 0.1, (1.0, -0.5)).rescale(0.1) == 0.0  # clamped at 0
    model = random_dit()
    model.train()
    with pytest.raises(DyditError, match="eval"):
        cached(model, "fbcache", 0.1)(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(DyditError, match="backbone seam"):
        cached(torch.nn.Linear(2, 2), "fbcache", 0.1)


def test_calibration_fit_follows_its_pairs(tmp_path):
    x = np.linspace(0.01, 0.5, 40)
    y = 0.3 + 2.0 * x - 1.5 * x**2
    coeffs = fit_coefficients(list(zip(x, y)), degree=2)
    assert np.allclose(coeffs, [-1.5, 2.0, 0.3], atol=1e-8)
    with pytest.raises(DyditError):
        fit_coefficients([(0.1, 0.2)] * 3, degree=4)
    # Pairs recorded on a model's own trajectories: one per consecutive pair of evaluations.
    model = random_dit()
    recorder = ChangeRecorder(model)
    got = sample(recorder, model, DPM, seeds=range(4), batch_size=2)
    assert torch.equal(got, sample(model, model, DPM, seeds=range(4), batch_size=2))  # uncached
    assert len(recorder.pairs) == 2 * (6 - 1)
    assert all(a > 0 and b > 0 for a, b in recorder.pairs)
    coeffs = fit_coefficients(recorder.pairs, degree=1)
    xs, ys = np.array(recorder.pairs).T
    fitted = np.polyval(coeffs, xs)
    assert np.mean((ys - fitted) ** 2) < np.var(ys)  # the fit explains part of the trend
    path = tmp_path / "teacache.json"
    save_coefficients(path, coeffs, pairs=len(recorder.pairs))
    assert load_coefficients(path) == coeffs and json.loads(path.read_text())["method"] == "teacache"
    assert cached(model, "teacache", 0.1, coefficients=path).settings.coefficients == coeffs
    path.write_text("{}")
    with pytest.raises(DyditError, match="coefficients"):
        load_coefficients(path)


def test_cli_calibrates_and_samples_with_a_cache(tmp_path, capsys):
    from safetensors.torch import save_file

    from dydit.cli import main

    model = dydit.DyDiT.from_dit(random_dit(depth=3))
    meta = {"config": json.dumps({"model": model.config.to_dict()})}
    ckpt = tmp_path / "dy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata=meta)
    fast = ["--checkpoint", str(ckpt), "--sampler", "dpm++2m", "--steps", "6", "--device", "cpu"]
    coeffs = tmp_path / "tc.json"
    assert main(["cache-calibrate", *fast, "--num-samples", "2", "--degree", "2", "--out", str(coeffs)]) == 0
    assert len(load_coefficients(coeffs)) == 3
    out = tmp_path / "s"
    args = [*fast, "--num-samples", "2", "--no-progress", "--out-dir", str(out), "--save-raw"]
    assert main(["sample", *args, "--cache", "teacache:100", "--cache-coefficients", str(coeffs)]) == 0
    err = capsys.readouterr().err
    assert "cache: teacache:100" in err and "2 of 6 network evaluations computed, 4 reused" in err
    assert json.loads((out / "sampling.json").read_text())["cache"]["spec"] == "teacache:100"
    assert main(["sample", *args, "--cache", "fbcache"]) == 1
    assert "METHOD:THRESHOLD" in capsys.readouterr().err
    assert main(["sample", *args, "--cache-coefficients", str(coeffs)]) == 1
    assert main(["sample", *args, "--cache", "fbcache:0.1", "--cache-coefficients", str(coeffs)]) == 1


def test_cli_calibrates_a_text_to_image_flux_on_prompts_and_samples_with_the_file(tmp_path, capsys):
    """``dydit cache-calibrate`` on a FLUX-t2i: its own recipe, ``--prompt`` (or held-in evaluation
    prompts by default) as the condition; ``dydit sample --prompt ... --cache-coefficients`` reads it."""
    from dydit.apps.demo_t2i import untrained_t2i
    from dydit.cli import main
    from dydit.data.compose_grammar import evaluation_prompts
    from dydit.train.state import export_weights

    model = untrained_t2i(0)
    ckpt = tmp_path / "t2i.safetensors"
    export_weights(ckpt, model, {"model": model.config.to_dict()})
    base = ["cache-calibrate", "--checkpoint", str(ckpt), "--device", "cpu", "--num-samples", "2"]
    base += ["--degree", "2"]
    coeffs, default = tmp_path / "tc.json", tmp_path / "tc-default.json"
    prompts = ["two bags", "a red sneaker left of a bag"]
    assert main([*base, "--prompt", prompts[0], "--prompt", prompts[1], "--out", str(coeffs)]) == 0
    stored = json.loads(coeffs.read_text())
    assert len(stored["coefficients"]) == 3 and stored["prompts"] == prompts
    sampling, recipe = stored["sampling"], model.config
    assert (sampling["sampler"], sampling["steps"]) == (recipe.recipe_sampler, recipe.recipe_steps)
    assert sampling["cfg_scale"] == recipe.recipe_guidance
    assert main([*base, "--out", str(default)]) == 0  # no prompts: held-in evaluation prompts
    held_in = [p.text for p in evaluation_prompts("train", per_category=1)]
    assert json.loads(default.read_text())["prompts"] == held_in
    file = tmp_path / "prompts.txt"
    file.write_text("two bags\n")
    assert main([*base, "--prompts", str(file), "--steps", "5", "--out", str(default)]) == 0
    assert json.loads(default.read_text())["sampling"]["steps"] == 5
    capsys.readouterr()

    args = [
        "sample",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        prompts[0],
        "--num-samples",
        "2",
        "--no-progress",
    ]
    args += ["--device", "cpu", "--grid", str(tmp_path / "grid.png")]
    assert main([*args, "--cache", "teacache:0.1", "--cache-coefficients", str(coeffs)]) == 0
    assert "cache: teacache:0.1" in capsys.readouterr().err and (tmp_path / "grid.png").is_file()

    dit = random_dit(depth=2)
    dit_ckpt = tmp_path / "dit.safetensors"
    export_weights(dit_ckpt, dit, {"model": dit.config.to_dict()})
    argv = ["cache-calibrate", "--checkpoint", str(dit_ckpt), "--prompt", "two bags", "--out", str(default)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "text-to-image model" in err and len(err.splitlines()) == 1


def test_a_wrapped_cache_told_its_times_restarts_after_each_run():
    """A caller that hides the cache from generate (a counting wrapper) gives the run's times."""
    model = random_dit()
    times = DPM.function.times(dydit.create_process(model.config), DPM.steps)
    want = sample(cached(model, "teacache", 0.3), model, DPM, seeds=range(4))
    cache = cached(model, "teacache", 0.3, times=times)
    assert torch.equal(sample(lambda x, t, y: cache(x, t, y), model, DPM, seeds=range(4)), want)
    assert cache.stats.runs == 1 and cache.last_run[0] and cache.last_run[-1]  # one auto-restart
