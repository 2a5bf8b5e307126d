"""DyDiT on FLUX (issue 24): the released DyFLUX's token routing, checked against a hand-written
reference of its inference rule on diffusers' own FLUX modules, plus the width routing dydit adds,
sliced == masked, FLOPs (analytic == counted, FLUX-lite near 30.0 T) and the FLOPs loss.

The reference (:func:`official_dyflux`) follows docs/METHOD.md §15.2: in a double-stream block the
router reads both streams after the attention residual and a dropped image token gets no image-FFN
update; in a single-stream block the router reads the block input and a dropped image token gets no
fused-projection update; text tokens are never routed; keep iff logit > 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dydit import create_model
from dydit.conditioning import TextCondition
from dydit.flops import count_flops
from dydit.flops.analytic import flops_ratio, per_sample_macs
from dydit.flow.transport import Transport
from dydit.models.dydit import DyDiT, execution
from dydit.models.sliced import SlicedDyDiT
from dydit.presets import get_model_config
from dydit.train.step import TrainForward, compute_loss

diffusers = pytest.importorskip("diffusers")

ROUTER_KEYS = ("linear_t.weight", "linear_t.bias", "norm.weight", "norm.bias", "router.weight", "router.bias")


def random_flux(name: str = "FLUX-tiny", seed: int = 0):
    cfg = get_model_config(name)
    torch.manual_seed(seed)
    ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return cfg, ref.eval()


def token_router_weights(cfg, seed: int = 7, bias: float = 0.0) -> dict[str, torch.Tensor]:
    """Random DyFLUX token routers for every block (official key names), keeping about half."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.inner_dim
    out = {}
    prefixes = [f"transformer_blocks.{i}" for i in range(cfg.num_layers)]
    prefixes += [f"single_transformer_blocks.{i}" for i in range(cfg.num_single_layers)]
    for p in prefixes:
        shapes = {"linear_t.weight": (4 * d, d), "linear_t.bias": (4 * d,), "norm.weight": (d,)}
        shapes |= {"norm.bias": (d,), "router.weight": (1, d), "router.bias": (1,)}
        for k in ROUTER_KEYS:
            w = 0.2 * torch.randn(shapes[k], generator=g)
            out[f"{p}.token_selection.{k}"] = w + 1 if k == "norm.weight" else w
        out[f"{p}.token_selection.router.bias"] = torch.full((1,), bias)
    return out


def call(cfg, batch: int = 3, n: int = 16, length: int = 5, seed: int = 1, t=None):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, n, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, length, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g) if t is None else t,
        img_ids=torch.randint(0, 4, (n, 3), generator=g).float(),
        txt_ids=torch.zeros(length, 3),
        guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None,
        return_dict=False,
    )


def router_rule(w: dict, prefix: str, x, temb, text):
    """The released token router's logits (B, N): separate adaLN of image and text through one LayerNorm."""
    p = {k: w[f"{prefix}.token_selection.{k}"] for k in ROUTER_KEYS}
    shift, scale, t_shift, t_scale = F.linear(F.silu(temb), p["linear_t.weight"], p["linear_t.bias"]).chunk(
        4, 1
    )

    def norm(z):
        return F.layer_norm(z, (z.shape[-1],), p["norm.weight"], p["norm.bias"], 1e-5)

    xi = norm(x) * (1 + scale[:, None]) + shift[:, None]
    xt = (norm(text) * (1 + t_scale[:, None]) + t_shift[:, None]).mean(1, keepdim=True)
    return F.linear(xi + xt, p["router.weight"], p["router.bias"]).squeeze(-1)


@torch.no_grad()
def official_dyflux(ref, w: dict, kw: dict):
    """DyFLUX inference on diffusers' FLUX modules, written from the rule of docs/METHOD.md §15.2.
    Returns (output tokens, kept fraction per block)."""
    hidden = ref.x_embedder(kw["hidden_states"])
    t = kw["timestep"] * 1000
    g = kw["guidance"]
    pooled = kw["pooled_projections"]
    temb = ref.time_text_embed(t, pooled) if g is None else ref.time_text_embed(t, g * 1000, pooled)
    enc = ref.context_embedder(kw["encoder_hidden_states"])
    rope = ref.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    kept = []
    for i, blk in enumerate(ref.transformer_blocks):
        nh, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.norm1(hidden, emb=temb)
        ne, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = blk.norm1_context(enc, emb=temb)
        a, ca = blk.attn(hidden_states=nh, encoder_hidden_states=ne, image_rotary_emb=rope)
        hidden = hidden + gate_msa[:, None] * a
        enc = enc + c_gate_msa[:, None] * ca
        keep = router_rule(w, f"transformer_blocks.{i}", hidden, temb, enc) > 0
        kept.append(float(keep.float().mean()))
        n2 = blk.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff = torch.zeros_like(hidden)
        ff[keep] = blk.ff(n2[keep])  # only kept image tokens run the image FFN
        hidden = hidden + gate_mlp[:, None] * ff
        n2c = blk.norm2_context(enc) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        enc = enc + c_gate_mlp[:, None] * blk.ff_context(n2c)
    for j, blk in enumerate(ref.single_transformer_blocks):
        n_txt = enc.shape[1]
        keep = router_rule(w, f"single_transformer_blocks.{j}", hidden, temb, enc) > 0  # the block input
        kept.append(float(keep.float().mean()))
        joint = torch.cat([enc, hidden], 1)
        nh, gate = blk.norm(joint, emb=temb)
        fused = torch.cat(
            [blk.attn(hidden_states=nh, image_rotary_emb=rope), blk.act_mlp(blk.proj_mlp(nh))], 2
        )
        update = blk.proj_out(fused)
        update[:, n_txt:][~keep] = 0  # a dropped image token skips the whole fused projection
        joint = joint + gate[:, None] * update
        enc, hidden = joint[:, :n_txt], joint[:, n_txt:]
    return ref.proj_out(ref.norm_out(hidden, temb)), kept


def token_only_dyflux(cfg, ref, routers: dict) -> DyDiT:
    model = create_model("DyFLUX-tiny", width_routing=False).eval()
    state = {**ref.state_dict(), **routers}  # the released checkpoint's keys: diffusers' + token_selection.*
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)
    return model


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_all_tokens_kept_equals_dense_flux():
    cfg, ref = random_flux()
    routers = token_router_weights(cfg, bias=1e3)
    model = token_only_dyflux(cfg, ref, routers)
    kw = call(cfg)
    with torch.no_grad():
        expected = ref(**kw)[0]
        out = model(**kw)[0]
        with execution(model, "sliced"):
            sliced = model(**kw)[0]
    assert rel_err(out, expected) < 1e-5 and rel_err(sliced, expected) < 1e-5
    assert official_dyflux(ref, routers, kw)[1] == [1.0] * cfg.depth


@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_mixed_token_routing_follows_the_released_rule(mode):
    cfg, ref = random_flux()
    routers = token_router_weights(cfg)
    model = token_only_dyflux(cfg, ref, routers)
    kw = call(cfg)
    expected, kept = official_dyflux(ref, routers, kw)
    assert 0.1 < sum(kept) / len(kept) < 0.9 and min(kept) < 1
    with torch.no_grad(), execution(model, mode):
        out = model(**kw)[0]
    assert rel_err(out, expected) < 1e-5
    with torch.no_grad():
        dense = ref(**kw)[0]
    assert rel_err(out, dense) > 1e-3  # the routing did change the output


def test_width_routers_added_to_a_token_only_dyflux_preserve_its_function():
    cfg, ref = random_flux()
    model = token_only_dyflux(cfg, ref, token_router_weights(cfg))
    wide = DyDiT.with_width_routers(model).eval()
    assert wide.width_routing and not model.width_routing
    added = set(wide.state_dict()) - set(model.state_dict())
    assert added and all(".attn_rate." in k or ".mlp_rate." in k for k in added)
    kw = call(cfg)
    with torch.no_grad():
        torch.testing.assert_close(wide(**kw)[0], model(**kw)[0], rtol=0, atol=1e-6)


def random_width_routers(model: DyDiT, seed: int = 3) -> DyDiT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.copy_(torch.randn(router.weight.shape, generator=g))
                router.bias.fill_(-100.0 if i == 1 else 0.0)  # block 1: no head and no group
    return model.eval()


def mixed_dyflux(name: str = "FLUX-tiny"):
    cfg, ref = random_flux(name)
    model = create_model("DyFLUX-" + name.removeprefix("FLUX-")).eval()
    model.load_state_dict({**ref.state_dict(), **token_router_weights(cfg)}, strict=False)
    return cfg, random_width_routers(model)


def inputs(cfg, batch: int = 4, length: int = 6, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, 8, 8, generator=g)
    text = torch.randn(batch, length, cfg.joint_attention_dim, generator=g)
    return x, TextCondition(text, torch.randn(batch, cfg.pooled_projection_dim, generator=g))


@pytest.mark.parametrize("name", ["FLUX-tiny", "FLUX-tiny-schnell"])
def test_sliced_equals_masked_with_width_and_token_routing(name):
    cfg, model = mixed_dyflux(name)
    x, y = inputs(cfg)
    engine = SlicedDyDiT(model, token_bucket=5)  # padded kept-row counts add nothing
    for t in (torch.full((4,), 0.3), torch.tensor([0.9, 0.1, 0.5, 0.1])):
        with torch.no_grad():
            masked, stats = model.forward_with_routing(x, t, y)
        assert 0 < stats.heads[:, [0, 2, 3]].float().mean() < 1 and 0 < stats.tokens.float().mean() < 1
        assert rel_err(engine(x, t, y), masked) < 1e-5
    assert engine.cache_info()["pack_bytes"] > 0


def test_the_diffusers_call_of_a_dyflux_follows_its_guidance():
    cfg, model = mixed_dyflux()
    kw = call(cfg, batch=2, n=16, t=torch.tensor([0.4, 0.4]))
    for g in (3.5, 1.5):
        kw["guidance"] = torch.full((2,), g)
        with torch.no_grad():
            masked = model(**kw)[0]
            with execution(model, "sliced"):
                sliced = model(**kw)[0]
        assert model.backbone.guidance == g
        assert rel_err(sliced, masked) < 1e-5
    # Rows with their own guidance scales: temb reads them, the width routers read model.guidance.
    from dydit.models.flux_layers import FluxInputs

    text, pooled, guidance = kw["encoder_hidden_states"], kw["pooled_projections"], torch.tensor([1.0, 6.0])
    rows = FluxInputs(text, pooled, kw["img_ids"], kw["txt_ids"], guidance)
    with torch.no_grad():
        masked = model(kw["hidden_states"], kw["timestep"], rows)
        assert rel_err(SlicedDyDiT(model)(kw["hidden_states"], kw["timestep"], rows), masked) < 1e-5


def test_analytic_flops_equal_counted_flops():
    cfg, model = mixed_dyflux()
    x, y = inputs(cfg, length=cfg.max_text_length)
    x = torch.randn(2, cfg.latent_channels, cfg.sample_size, cfg.sample_size)
    y = TextCondition(y.embeddings[:2], y.pooled[:2])
    t = torch.full((2,), 0.6)
    with count_flops() as dense, execution(model, "dense"):
        model(x, t, y)
    assert dict(dense.by_component) == {k: 2 * v for k, v in model.backbone.macs_table().items()}
    with torch.no_grad():
        _, stats = model.forward_with_routing(x, t, y)
    with count_flops() as fast:
        SlicedDyDiT(model)(x, t, y)
    a, m = model.layer_costs()
    analytic = per_sample_macs(stats.heads, stats.groups, stats.tokens, a, m).sum()
    counted = fast.by_component["attention"] + fast.by_component["mlp"]
    assert counted < dense.by_component["attention"] + dense.by_component["mlp"]
    assert counted == pytest.approx(float(analytic), rel=1e-9)


def test_flux_lite_flops_match_the_released_30_tflops():
    from dydit.models.flux import Flux

    with torch.device("meta"):
        lite = Flux(get_model_config("FLUX.1-lite-8B"))
    total = sum(lite.macs_table().values())  # 1024 px (4096 image tokens), 512 text tokens, MACs
    assert abs(total / 1e12 - 30.0) < 0.1


def test_fine_tuning_with_the_flops_loss_moves_rho_toward_lambda():
    cfg, ref = random_flux()
    model = DyDiT.from_dit(create_model("FLUX-tiny")).train()
    model.load_state_dict(ref.state_dict(), strict=False)
    with torch.no_grad():  # on but undecided enough for a few steps to matter
        for block in model.blocks:
            for lin in (block.attn_rate.router, block.mlp_rate.router, block.token_selection.router):
                lin.bias.fill_(2.0)
    a, m = model.layer_costs()
    x, y = inputs(cfg)
    noise = torch.randn_like(x)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])

    def mean_rho() -> float:
        torch.manual_seed(11)
        with torch.no_grad():
            return float(
                torch.stack(
                    [flops_ratio(model.forward_with_routing(x, t, y)[1], a, m) for _ in range(4)]
                ).mean()
            )

    before = mean_rho()
    # The training step's loss (dydit.train.step.compute_loss): a flow-matching loss on the
    # project's linear path (a stand-in for FLUX's own, whose t runs the other way) + the FLOPs loss.
    net, transport = TrainForward(model), Transport("linear", "velocity")
    opt = torch.optim.Adam(model.parameters(), lr=0.04)
    for _ in range(8):
        loss, parts, stats = compute_loss(net, transport, x, y, t, noise, lambda_t=0.5, layer_costs=(a, m))
        assert stats is not None and torch.isfinite(loss) and "loss_flops" in parts
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_rho()
    assert before > 0.65 and abs(after - 0.5) < abs(before - 0.5) - 0.05, (before, after)


def test_dydit_flops_prints_the_flux_tables(capsys):
    from dydit.cli import build_parser

    for argv, total in ((["--model", "FLUX.1-lite-8B"], "30015.80"), (["--model", "FLUX.1-dev"], "37192.33")):
        args = build_parser().parse_args(["flops", *argv])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert f"**{total}**" in out and "4096 image tokens + 512 text tokens" in out
    args = build_parser().parse_args(
        ["flops", "--model", "FLUX-tiny", "--image-size", "256", "--text-length", "8"]
    )
    args.func(args)
    assert "256 image tokens + 8 text tokens" in capsys.readouterr().out


def test_bench_times_a_flux_preset_with_calibrated_routers():
    from dydit.apps.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        model="DyFLUX-tiny", batches=(2,), repeats=1, warmup=0, timesteps=(999, 500), cfg_scale=1.0
    )
    rows = {r.mode: r for r in run_bench(cfg)}
    assert set(rows) == {"dense", "masked", "sliced"}
    assert 0.3 < rows["sliced"].flops_ratio < 0.8 and rows["sliced"].max_rel_err < 1e-5
    assert rows["dense"].flops_ratio == 1.0 and rows["masked"].flops_ratio == rows["sliced"].flops_ratio


def test_reordering_units_preserves_the_function():
    from dydit.models.reorder import reorder_by_importance

    cfg, ref = random_flux()
    flux = create_model("FLUX-tiny")
    flux.load_state_dict(ref.state_dict())
    model = DyDiT.from_dit(flux, router_layout="all").eval()
    x, y = inputs(cfg, batch=2)
    t = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        before = model(x, t, y)
        orders = reorder_by_importance(model)
        after = model(x, t, y)
    assert any(not torch.equal(o, torch.arange(len(o))) for pair in orders for o in pair)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["FLUX-tiny", "FLUX-tiny-schnell"])
def test_from_dit_conversion_preserves_the_function(name):
    cfg, ref = random_flux(name)
    flux = create_model(name).eval()
    flux.load_state_dict(ref.state_dict())
    model = DyDiT.from_dit(flux)
    assert model.width_routing and model.config.dynamic and not flux.config.dynamic
    x, y = inputs(cfg, batch=3)
    t = torch.tensor([0.05, 0.5, 1.0])
    with torch.no_grad():
        expected = flux(x, t, y)
        masked, stats = model.forward_with_routing(x, t, y)
        with execution(model, "sliced"):
            sliced = model(x, t, y)
    assert bool(stats.heads.all() and stats.groups.all() and stats.tokens.all())
    assert rel_err(masked, expected) < 1e-6 and rel_err(sliced, expected) < 1e-5


def test_initialize_weights_keeps_a_dyflux_equal_to_its_flux():
    cfg = get_model_config("FLUX-tiny")
    model = create_model("DyFLUX-tiny").eval()
    model.initialize_weights()
    x, y = inputs(cfg, batch=2)
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        out, stats = model.forward_with_routing(x, t, y)
        with execution(model, "dense"):
            dense = model(x, t, y)
    assert bool(stats.tokens.all() and stats.heads.all()) and rel_err(out, dense) < 1e-6
    assert all(bool((b.attn.norm_q.weight == 1).all()) for b in model.blocks)
