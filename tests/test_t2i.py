"""The text-to-image FLUX trained here (docs/METHOD.md §17.6): its own text encoder, the 4x4 pixel
packing, FLUX's clock and time shift, ``dydit train`` on the captioned compositions, ``dydit sample
--prompt`` (resumable, prompts.txt for ``--geneval``), and its DyDiT (sliced == masked)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dydit.checkpoint import load_model
from dydit.cli import main
from dydit.data import compose_grammar as G
from dydit.errors import DyditError
from dydit.evaluate import classifier as clf
from dydit.factory import build_model
from dydit.flow import FLOW_SAMPLERS, Transport, create_process
from dydit.models.dydit import DyDiT
from dydit.models.flux_layers import pack_latents, unpack_latents
from dydit.models.sliced import SlicedDyDiT
from dydit.presets import config_from_dict, get_model_config

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed"
)


def t2i_config(name: str = "FLUX-t2i-tiny", **overrides):
    """The preset with the grammar's vocabulary, as a training run on fmnist-compose fills it in."""
    cfg = get_model_config(name, **overrides)
    tok = G.tokenizer()
    return cfg.replace(
        text_encoder={**cfg.text_encoder, "vocab": list(tok.words), "max_length": tok.max_length}
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_pack_4x4_round_trips_and_orders_channels_like_the_2x2_packing() -> None:
    x = torch.randn(2, 3, 64, 64)
    tokens = pack_latents(x, 4)
    assert tokens.shape == (2, 256, 48)
    torch.testing.assert_close(unpack_latents(tokens, 64, 64, 4), x, rtol=0, atol=0)
    # token (r, c) holds the 4x4 patch at rows 4r.., columns 4c.., channel-major (as FLUX's 2x2 packing)
    r, c = 3, 5
    patch = x[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(2, 48)
    torch.testing.assert_close(tokens[:, r * 16 + c], patch)
    torch.testing.assert_close(pack_latents(x, 2), pack_latents(x))  # FLUX's own default


def test_flux_clock_regresses_noise_minus_data_at_sigma_and_samples_on_the_shifted_grid() -> None:
    cfg = t2i_config("FLUX-t2i")
    assert cfg.num_tokens == 256 and cfg.latent_channels == 3 and math.isclose(cfg.time_shift_mu, 0.5)
    process = create_process(cfg)
    assert isinstance(process, Transport) and process.clock == "flux"
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.8])  # dydit's flow time (1 = data); FLUX's sigma = 1 - t
    sigma = process.original_timesteps(t)
    torch.testing.assert_close(sigma, 1 - t)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(process.q_sample(x0, t, noise), (1 - s) * x0 + s * noise)  # FLUX's x_sigma
    v = noise - x0  # FLUX's velocity target
    assert float(process.loss_terms(v, x0, None, t, noise)["loss"].max()) < 1e-10
    torch.testing.assert_close(process.velocity(v, x0, t), x0 - noise)  # d x / d t in dydit's direction
    # FluxPipeline's sigmas: time_shift(mu, 1, s) = e^mu / (e^mu + 1/s - 1) on linspace(1, 1/N, N)
    n, mu = 4, cfg.time_shift_mu
    grid = FLOW_SAMPLERS["euler"].times(process, n)
    sig = np.linspace(1.0, 1.0 / n, n)
    want = math.exp(mu) / (math.exp(mu) + 1 / sig - 1)
    np.testing.assert_allclose(grid, want, rtol=1e-6)


def test_euler_on_the_flux_clock_carries_noise_to_the_data_the_exact_velocity_points_at() -> None:
    process = create_process(t2i_config("FLUX-t2i"))
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def exact(x, sigma, y=None):  # FLUX's velocity noise - data for the one data point x0
        s = sigma.view(-1, 1, 1, 1)
        return (x - (1 - s) * x0) / s - x0

    torch.testing.assert_close(FLOW_SAMPLERS["euler"](exact, noise, process, 7), x0, rtol=0, atol=1e-5)


def test_the_model_owns_its_text_encoder_and_drops_captions_only_in_training() -> None:
    cfg = t2i_config(caption_dropout=0.5)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert any(k.startswith("text_encoder.") for k in model.state_dict())
    ids = model.text_encoder.tokenizer(["a red sneaker left of a bag"] * 64)
    x, t = torch.randn(64, 3, 64, 64), torch.full((64,), 0.5)
    with torch.no_grad():
        model.eval()
        inputs = model.condition(ids)
        torch.testing.assert_close(inputs.embeddings, model.text_encoder(ids.ids)[0])
        model.train()
        dropped = model.condition(ids).embeddings
    null = model.text_encoder.null_text().embeddings
    is_null = [(dropped[i] - null).abs().max() < 1e-6 for i in range(64)]
    assert 10 < sum(is_null) < 54  # about half replaced by the empty caption
    model.eval()
    with torch.no_grad():
        out = model(x, t, ids)
    assert out.shape == x.shape
    with pytest.raises(DyditError, match="no text encoder"):
        build_model(get_model_config("FLUX-tiny")).condition(ids)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # a stored config reads back


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("recipe_sampler", 5, "recipe_sampler must be a string, got 5"),
        ("recipe_sampler", "", "recipe_sampler must name a sampler"),
        ("recipe_guidance", 0.5, "recipe_guidance must be >= 1, got 0.5"),
        ("recipe_steps", 0, "recipe_steps"),
    ],
)
def test_a_stored_sampling_recipe_of_the_wrong_kind_is_a_one_line_error(field, value, message) -> None:
    stored = t2i_config("FLUX-t2i").to_dict()
    with pytest.raises(DyditError, match=message):
        config_from_dict({**stored, field: value})


def test_dydit_of_the_t2i_model_sliced_equals_masked() -> None:
    torch.manual_seed(1)
    dense = build_model(t2i_config())
    with torch.no_grad():
        for p in dense.parameters():  # the adaLN-zero initialisation would make every block the identity
            p.add_(0.2 * torch.randn_like(p))
    model = DyDiT(backbone=dense).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.copy_(torch.randn(router.weight.shape, generator=g))
                router.bias.fill_(0.0)
            token = block.token_selection
            for lin in (token.linear_t, token.router):
                lin.weight.copy_(0.3 * torch.randn(lin.weight.shape, generator=g))
                lin.bias.zero_()
    ids = dense.text_encoder.tokenizer(["two bags", "a blue shirt and a yellow trouser", "a coat", "a bag"])
    x = torch.randn(4, 3, 64, 64, generator=g)
    engine = SlicedDyDiT(model)
    for t in (torch.full((4,), 0.3), torch.tensor([0.9, 0.1, 0.5, 0.1])):
        with torch.no_grad():
            masked, stats = model.forward_with_routing(x, t, ids)
            sliced = engine(x, t, ids)
        assert 0 < stats.tokens.float().mean() < 1
        assert rel_err(sliced, masked) < 1e-5


@needs_fmnist
def test_train_sample_resume_and_geneval_through_the_cli(tmp_path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    argv = ["train", "--model", "FLUX-t2i-tiny", "--data", "fmnist-compose", "--batch-size", "4"]
    argv += ["--steps", "2", "--log-every", "1", "--ckpt-every", "2", "--out-dir", str(run), "--no-progress"]
    assert main(argv) == 0
    export = run / "ema.safetensors"
    model = load_model(export)
    assert model.config.text_encoder["vocab"] == list(G.VOCAB) and model.config.pack == 4
    assert main([a if a != "2" else "3" for a in argv]) == 0  # --steps 3, --ckpt-every 3: resumes at 2
    assert json.loads((run / "stats.jsonl").read_text().splitlines()[-1])["step"] == 3

    ft = ["finetune", "--model", "DyFLUX-t2i-tiny", "--init-from", str(export), "--target", "0.5"]
    ft += ["--data", "fmnist-compose", "--batch-size", "4", "--steps", "1", "--distill-weight", "1"]
    assert main([*ft, "--out-dir", str(tmp_path / "ft"), "--no-progress"]) == 0  # its DyDiT, distilled
    dy = load_model(tmp_path / "ft" / "ema.safetensors")
    assert isinstance(dy, DyDiT) and dy.config.text_encoder == model.config.text_encoder
    capsys.readouterr()
    assert main(["flops", "--checkpoint", str(export)]) == 0  # a dense FLUX file: its preset's table
    out = capsys.readouterr().out
    assert out.startswith("FLUX-t2i-tiny: 3x64x64 pixels,") and "| **total** |" in out
    assert main(["flops", "--checkpoint", str(tmp_path / "ft" / "ema.safetensors"), "--steps", "2"]) == 0
    out = capsys.readouterr().out  # its DyDiT: routing measured along its recipe's prompted trajectory
    assert "DyFLUX-t2i-tiny" in out and "text-stream MLP" in out and "cfg scale 2," in out
    assert 0 < float(out.split("attn+MLP ratio ")[-1].split(";")[0]) <= 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red sneaker left of a bag\n# a comment\ntwo bags\na blue shirt and a yellow trouser\n"
    )
    out = tmp_path / "samples"
    sample = ["sample", "--checkpoint", str(export), "--prompts", str(prompts), "--num-samples", "4"]
    sample += ["--out-dir", str(out), "--no-progress"]
    assert main([*sample, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    recipe = model.config
    assert plan["sampling"]["steps"] == recipe.recipe_steps and plan["sampling"]["cfg_scale"] == 2.0
    texts = ["a red sneaker left of a bag", "two bags", "a blue shirt and a yellow trouser"]
    assert plan["prompts"] == [*texts, texts[0]]  # cycled over the images
    assert main(sample) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert (out / "prompts.txt").read_text().splitlines()[3] == "a red sneaker left of a bag"
    assert (tmp_path / "samples.png").is_file()
    first = (out / "000001.png").read_bytes()
    (out / "000001.png").unlink()
    capsys.readouterr()
    assert main(sample) == 0  # resumes: only the missing image, with its own seed
    assert "(3 already there)" in capsys.readouterr().err
    assert (out / "000001.png").read_bytes() == first
    assert main([*sample[:3], "--prompt", "a bag", *sample[5:]]) == 1  # other prompts: refused
    assert "another run" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(export), "--prompt", "a pink bag", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "unknown word(s) 'pink'" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setattr(clf, "load_classifier", lambda *a, **k: _UniformClassifier())
    report = tmp_path / "geneval.json"
    assert main(["evaluate", str(out), "--geneval", "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert set(result["accuracy"]) == {"position", "counting", "color_attr"}


@needs_fmnist
def test_fast_t2i_demo_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(clf, "load_classifier", lambda *a, **k: _UniformClassifier())
    out = tmp_path / "demo"
    assert main(["demo", "t2i", "--fast", "--out-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["split"], r["role"]): r for r in results["rows"]}
    assert set(rows) == {(s, r) for s in ("train", "held-out") for r in ("dense", "dydit", "dense_equal")}
    for split in ("train", "held-out"):
        dense, dy, eq = (rows[split, r] for r in ("dense", "dydit", "dense_equal"))
        rho = dy["macs_attn_mlp"] / dense["macs_attn_mlp"]
        assert 0 < rho < 1  # the random routers switch work off, and the sliced engine skips it
        assert eq["steps"] == max(1, round(rho * dense["steps"]))
        assert eq["macs_attn_mlp"] == pytest.approx(dense["macs_attn_mlp"] * eq["steps"] / dense["steps"])
        assert set(dense["accuracy"]) == set(G.CATEGORIES) and 0 <= dense["overall"] <= 1
    for png in ("grid_dense.png", "grid_dydit.png", "grid_dense_equal.png", "token_keep.png"):
        assert (out / png).stat().st_size > 500, png
    report = (out / "report.md").read_text()
    assert "at equal compute" in report and "held-out prompts" in report
    assert "report written to" in capsys.readouterr().out
    assert main(["demo", "t2i", "--target", "0.3", "--fast"]) == 1  # a fine-tune flag of the other demo
    assert (
        main(["demo", "t2i", "--out-dir", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "none")]) == 1
    )
    assert "not found" in capsys.readouterr().err


class _UniformClassifier:
    """Stands in for the project's classifier (trained once, slow): the wiring is what is tested."""

    def __call__(self, x):
        return {"logits": torch.zeros(len(x), 10), "pool": torch.randn(len(x), 128)}


def test_prompts_are_timed_after_an_untimed_warm_up_that_changes_no_image(monkeypatch) -> None:
    """``sample_prompts`` (the t2i demo's and frontier's timing) runs the first batch once untimed,
    uncounted and outside a step cache's stats, as the DiT demo's ``sample_timed``. A simulated clock
    (no wall-clock assertion): a network call costs 1 per row, plus 100 the first time a (batch
    shape, t) pair is met and 1000 on the very first call. The timed seconds must be the warm cost
    alone, and the images those of the same seeds sampled without any warm-up."""
    from dydit.apps import demo_t2i
    from dydit.data.codec import PixelCodec
    from dydit.models.cache import cached
    from dydit.sample import sample_images

    model = demo_t2i.untrained_t2i(0)
    clock, seen = [0.0], set()

    def cost(module, inputs) -> None:
        x, t = inputs[0], inputs[1]
        key = (tuple(x.shape), tuple(t.tolist()))
        clock[0] += x.shape[0] + (0 if key in seen else 100) + (0 if seen else 1000)
        seen.add(key)

    prompts = ["two bags", "a red sneaker left of a bag", "a blue shirt", "three bags"]
    cfg = demo_t2i.T2IDemoConfig(sample_batch=2, seed=3, device="cpu", progress=False)
    settings = demo_t2i.recipe(cfg, model.config)
    mc = model.config
    with torch.inference_mode():  # the same seeds, no warm-up
        want, _ = sample_images(
            model, create_process(mc), settings, PixelCodec(), seeds=[3 * 1_000_003 + i for i in range(4)],
            shape=(mc.latent_channels, mc.sample_size, mc.sample_size), batch_size=2,
            condition=model.text_encoder.tokenizer(prompts), progress=False,
        )  # fmt: skip
    hook = model.register_forward_pre_hook(cost)
    monkeypatch.setattr(demo_t2i.time, "perf_counter", lambda: clock[0])
    images, spent = demo_t2i.sample_prompts(model, prompts, settings, cfg)
    np.testing.assert_array_equal(images, want)
    rows = 2 * 4 * settings.steps  # the timed run: guidance doubles the 4 images' rows at every step
    assert spent["seconds"] == rows  # nothing cold was left for the timed run
    assert clock[0] > spent["seconds"]  # ... because the warm-up paid for it
    hook.remove()
    step_cache = cached(model, "teacache", 0.0)
    images, _ = demo_t2i.sample_prompts(step_cache, prompts, settings, cfg)
    np.testing.assert_array_equal(images, want)
    stats = step_cache.stats  # the timed run's two batches only
    assert (stats.runs, stats.computed, stats.reused) == (2, 2 * settings.steps, 0)


def test_diffusers_export_leaves_the_text_encoder_out_and_refuses_other_packings(tmp_path) -> None:
    from safetensors.torch import load_file

    from dydit.checkpoint.diffusers import WEIGHTS_FILE
    from dydit.checkpoint.flux import write_flux_folder

    vocab = {"vocab": list(G.VOCAB), "depth": 1, "heads": 4}
    cfg = get_model_config("FLUX-tiny", text_encoder=vocab)
    model = build_model(cfg)
    folder = write_flux_folder(tmp_path / "flux", model.state_dict(), cfg)
    keys = set(load_file(str(folder / WEIGHTS_FILE)))
    assert keys == {k for k in model.state_dict() if not k.startswith("text_encoder.")}
    assert len(keys) < len(model.state_dict())
    t2i = t2i_config()
    with pytest.raises(DyditError, match="packs 4x4"):
        write_flux_folder(tmp_path / "t2i", build_model(t2i).state_dict(), t2i)


def test_sampling_with_precomputed_embeddings_equals_sampling_with_prompts() -> None:
    from dydit.data.codec import PixelCodec
    from dydit.sample import SamplingSettings, sample_images

    model = build_model(t2i_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = model.text_encoder.tokenizer(["a red sneaker", "two bags", "a coat above a sandal"])
    settings = SamplingSettings(sampler="euler", steps=2, cfg_scale=3.0)
    kw = dict(seeds=[0, 1, 2], shape=(3, 64, 64), progress=False)
    process = create_process(model.config)
    with torch.no_grad():
        embeddings = model.text_encoder.encode(ids)  # what a user with their own encoders passes
        a, _ = sample_images(model, process, settings, PixelCodec(), condition=ids, **kw)
        b, _ = sample_images(model, process, settings, PixelCodec(), condition=embeddings, **kw)
    np.testing.assert_array_equal(a, b)


@needs_fmnist
@pytest.mark.slow
def test_fast_t2i_demo_reports_inception_fid_against_real_compositions(tmp_path, monkeypatch) -> None:
    from dydit.apps.demo_t2i import T2IDemoConfig, run_t2i_demo

    monkeypatch.setattr(clf, "load_classifier", lambda *a, **k: _UniformClassifier())
    run_t2i_demo(T2IDemoConfig.smoke(fid=True, out_dir=str(tmp_path / "demo"), progress=False))
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    assert len(rows) == 6 and all(math.isfinite(r["FID"]) and r["FID"] > 0 for r in rows)


@pytest.mark.slow
@needs_fmnist
def test_shipped_t2i_model_follows_single_object_prompts_far_above_chance() -> None:
    """The shipped FLUX-t2i (assets/README.md) with its stored recipe draws the named item, in its
    colour, in one cell, for most single-object and colour prompts; noise and black score 0 there."""
    from dydit.apps import demo_t2i
    from dydit.evaluate.extract import default_cache_dir
    from dydit.evaluate.geneval import read_cells, score

    model = load_model(demo_t2i.T2I_CHECKPOINT).eval()
    mc = model.config
    assert (mc.recipe_sampler, mc.recipe_steps, mc.recipe_guidance) == ("euler", 28, 3.0)
    prompts = [
        p for p in G.evaluation_prompts("train", per_category=6) if p.category in ("single_object", "colors")
    ]
    assert len(prompts) == 12
    cfg = demo_t2i.T2IDemoConfig(sample_batch=12, seed=0, device="cpu", progress=False)
    images, cost = demo_t2i.sample_prompts(model, [p.text for p in prompts], demo_t2i.recipe(cfg, mc), cfg)
    assert images.shape == (12, 64, 64, 3) and cost["macs_attn_mlp"] > 0
    net = clf.load_classifier(default_cache_dir(), progress=False)
    got = score(prompts, read_cells(images, net))
    assert got.overall >= 0.25, got.format()  # 0.5 and 0.47 on 15 prompts each (assets/README.md)
    noise = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    assert score(prompts, read_cells(noise, net)).overall == 0.0


def test_shipped_dyflux_routes_both_width_and_tokens() -> None:
    """The shipped DyFLUX (assets/README.md) halves its compute with both kinds of routing: at high
    noise its token routers drop image tokens and its width routers switch heads off. Its predecessor,
    fine-tuned before the bf16 Gumbel-sigmoid fix, kept every token at every t."""
    from dydit.apps import demo_t2i

    model = load_model(demo_t2i.T2I_DYDIT).eval()
    assert isinstance(model, DyDiT)
    prompts = ["a red sneaker", "two bags", "a coat above a sandal", "a blue shirt"]
    ids = model.text_encoder.tokenizer(prompts * 2)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, stats = model.forward_with_routing(x, torch.full((8,), 0.95), ids)  # FLUX clock: t = 1 is noise
    assert 0.5 < stats.tokens.float().mean() < 0.95
    assert 0.25 < stats.heads.float().mean() < 0.75 and stats.groups.float().mean() < 0.75
