"""U-ViT (docs/METHOD.md §16): official configs and parameter counts, the forward against a hand-written
reference of the official ``libs/uvit.py`` forward, strict loading of official raw state dicts, and
the DyDiT method on it (all kept == dense, masked == sliced, analytic == counted FLOPs, fine-tuning).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import dydit
from dydit.checkpoint import open_checkpoint
from dydit.errors import CheckpointError, DyditError
from dydit.flops import count_flops
from dydit.flops.analytic import flops_loss, flops_ratio, per_sample_macs
from dydit.models.dydit import DyDiT, execution
from dydit.models.sliced import SlicedDyDiT
from dydit.models.uvit import UViT
from dydit.presets import UViTConfig, get_uvit_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "METHOD.md"

# The ``config.nnet`` of each official config file (baofff/U-ViT, configs/*.py), copied by hand.
OFFICIAL = {
    "U-ViT-S/2": dict(img_size=32, patch_size=2, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                      qkv_bias=False, mlp_time_embed=False, num_classes=-1),  # cifar10_uvit_small
    "U-ViT-S/4": dict(img_size=64, patch_size=4, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                      qkv_bias=False, mlp_time_embed=False, num_classes=-1),  # celeba64_uvit_small
    "U-ViT-M/4": dict(img_size=64, patch_size=4, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
                      qkv_bias=False, mlp_time_embed=False, num_classes=1000, use_checkpoint=True),
    "U-ViT-L/2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001,
                      use_checkpoint=True),  # imagenet256_uvit_large
    "U-ViT-H/2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001,
                      use_checkpoint=True, conv=False),  # imagenet256_uvit_huge
    "U-ViT-H/4": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                      mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001,
                      use_checkpoint=True, conv=False),  # imagenet512_uvit_huge
}  # fmt: skip
# libs/uvit.py defaults for what a config file leaves out.
DEFAULTS = dict(in_chans=3, use_checkpoint=False, conv=True, skip=True)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_are_the_official_configs(name):
    assert get_uvit_config(name).nnet_kwargs() == {**DEFAULTS, **OFFICIAL[name]}
    assert get_uvit_config(name).process == ("sd" if name.startswith("U-ViT-H") else "vpsde")


def _documented_counts() -> dict[str, int]:
    """The parameter table of docs/METHOD.md §16.1: ``| U-ViT-S/2 | ... | 44,255,328 |``."""
    rows = re.findall(r"^\| `(U-ViT-[^`]+)` \|.*\| ([\d,]+) \|$", DOCS.read_text(), re.M)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_official_presets_build_with_the_documented_parameter_counts():
    documented = _documented_counts()
    assert set(OFFICIAL) <= set(documented)
    for name, count in documented.items():
        with torch.device("meta"):
            net = dydit.create_model(name)
        built = sum(p.numel() for p in net.state_dict().values())  # pos_embed included, as U-ViT counts
        assert built == count == get_uvit_config(name).num_parameters, name
    # The paper's sizes (Table 1 of Bao et al.): S 44 M, M 131 M, L 287 M, H 501 M.
    for name, millions in {"U-ViT-S/2": 44, "U-ViT-M/4": 131, "U-ViT-L/2": 287, "U-ViT-H/2": 501}.items():
        assert round(documented[name] / 1e6) == millions


# A hand-written reference of the official forward (libs/uvit.py), on a state dict ------------------
def reference_forward(sd: dict[str, Tensor], cfg: UViTConfig, x: Tensor, timesteps: Tensor, y=None) -> Tensor:
    d, p, c, heads = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_heads

    def lin(v, name):
        return F.linear(v, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def ln(v, name):
        return F.layer_norm(v, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2)  # B L D
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    time = torch.cat([torch.cos(args), torch.sin(args)], -1).to(x.dtype)
    if cfg.mlp_time_embed:
        time = lin(F.silu(lin(time, "time_embed.0")), "time_embed.2")
    h = torch.cat([time[:, None], h], 1)
    if y is not None:
        h = torch.cat([sd["label_emb.weight"][y][:, None], h], 1)
    h = h + sd["pos_embed"]

    def block(name, v, skip=None):
        if skip is not None:
            v = lin(torch.cat([v, skip], -1), f"{name}.skip_linear")
        b, n, _ = v.shape
        qkv = lin(ln(v, f"{name}.norm1"), f"{name}.attn.qkv").reshape(b, n, 3, heads, d // heads)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)  # B H L D, the official 'math' attention
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        v = v + lin((attn @ val).transpose(1, 2).reshape(b, n, d), f"{name}.attn.proj")
        return v + lin(F.gelu(lin(ln(v, f"{name}.norm2"), f"{name}.mlp.fc1")), f"{name}.mlp.fc2")

    skips = []
    for i in range(cfg.depth // 2):
        h = block(f"in_blocks.{i}", h)
        skips.append(h)
    h = block("mid_block", h)
    for i in range(cfg.depth // 2):
        h = block(f"out_blocks.{i}", h, skips.pop())
    h = lin(ln(h, "norm"), "decoder_pred")[:, cfg.extras :]
    g = int(h.shape[1] ** 0.5)  # 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
    img = h.reshape(h.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(h.shape[0], c, g * p, g * p)
    if cfg.conv:
        img = F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
    return img


SMALL = dict(depth=4, hidden_size=32, num_heads=4, input_size=8)
# An unconditional pixel model (S/2's flags) and a class-conditional latent one (H/2's: no conv, a
# null class row), the latter also with a time MLP and a qkv bias.
CASES = {
    "uncond": get_uvit_config("U-ViT-S/2").replace(**SMALL),
    "cond": get_uvit_config("U-ViT-H/2").replace(**SMALL, num_classes=7),
    "cond-variants": get_uvit_config("U-ViT-M/4").replace(**SMALL, patch_size=2, num_classes=5, qkv_bias=True,
                                                          mlp_time_embed=True, conv=True),
}  # fmt: skip


def random_uvit(cfg: UViTConfig, seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    net = UViT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def batch(cfg: UViTConfig, b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([1.0, 499.5, 999.0, 250.0][:b])
    y = torch.randint(0, cfg.num_classes + 1, (b,), generator=g) if cfg.num_classes else None
    return x, t, y


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_the_official_forward(case):
    cfg = CASES[case]
    net = random_uvit(cfg).double()
    x, t, y = batch(cfg)
    ref = reference_forward(net.state_dict(), cfg, x.double(), t, y)
    out = net(x.double(), t, y)
    assert out.shape == x.shape and ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_official_state_dicts_load_strictly(tmp_path):
    cfg = get_uvit_config("U-ViT-Ti/4")
    net = random_uvit(cfg)
    path = tmp_path / "nnet.pth"
    torch.save(net.state_dict(), path)  # what the official scripts save
    assert open_checkpoint(path).format == "uvit_state_dict"
    x, t, y = batch(cfg)
    for model in ("U-ViT-Ti/4", None):  # named, or told by its shapes
        loaded = dydit.load_model(path, model=model)
        assert isinstance(loaded, UViT) and loaded.config == cfg
        torch.testing.assert_close(loaded(x, t, y), net(x, t, y), atol=0, rtol=0)
    dy = dydit.load_model(path, model="DyDiT-U-ViT-Ti/4")  # the file's weights and fresh routers
    with execution(dy, "dense"):
        torch.testing.assert_close(dy(x, t, y), net(x, t, y), atol=0, rtol=0)
    fresh = set(dy.state_dict()) - set(net.state_dict())
    assert fresh and all("_rate." in k or ".token_selection." in k for k in fresh)
    with pytest.raises(CheckpointError, match=r"^checkpoint does not fit the model: patch_size 2 [^\n]*$"):
        dydit.load_model(path, model="U-ViT-Ti/2")
    sd = net.state_dict()
    sd["in_blocks.0.attn.qkv.bias"] = torch.zeros(3 * cfg.hidden_size)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="qkv_bias false in the config"):
        dydit.load_model(path, model="U-ViT-Ti/4")


def test_unknown_preset_names_say_what_exists():
    with pytest.raises(DyditError, match=r"Did you mean U-ViT-S/4, U-ViT-S/2"):
        dydit.create_model("U-ViT-S/3")


# DyDiT on U-ViT ---------------------------------------------------------------------------------
def random_routers(model: DyDiT) -> DyDiT:
    """Random width routers (block 0 switched fully off) and token routers keeping about half."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.copy_(torch.randn(router.weight.shape, generator=g))
                router.bias.fill_(-100.0 if i == 0 else 0.0)
            for lin in (block.token_selection.hidden_layer, block.token_selection.output_layer):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            block.token_selection.output_layer.bias.fill_(0.0)
    return model.eval()


@pytest.mark.parametrize("layout", ["forced_first", "all"])
@pytest.mark.parametrize("case", ["uncond", "cond"])
def test_from_dit_keeps_the_function_and_adds_only_routers(case, layout):
    cfg = CASES[case]
    net = random_uvit(cfg)
    x, t, y = batch(cfg)
    with torch.no_grad():
        ref = net(x, t, y)
        dy = DyDiT.from_dit(net, router_layout=layout)
        out, stats = dy.forward_with_routing(x, t, y)
        with execution(dy, "dense"):
            dense = dy(x, t, y)
    assert dy.config.dynamic and dy.router_layout == layout and not net.config.dynamic
    added = set(dy.state_dict()) - set(net.state_dict())
    assert set(net.state_dict()) < set(dy.state_dict())
    assert {re.sub(r"^(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.", "", k).split(".")[0] for k in added} == {
        "attn_rate", "mlp_rate", "token_selection"}  # fmt: skip
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in dy.state_dict().items() if k not in added)
    assert bool(stats.heads.all() and stats.groups.all() and stats.tokens.all())
    blocks = cfg.depth + 1
    assert stats.tokens.shape == (3, blocks, cfg.num_tokens)  # image tokens only: never time/class
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, ref, atol=0, rtol=0)
    assert isinstance(dydit.create_model("DyDiT-U-ViT-Ti/2"), DyDiT)
    built = DyDiT(get_uvit_config("U-ViT-Ti/2"), router_layout="all")  # from a config, as for DiT
    assert isinstance(built.backbone, UViT) and built.config.dynamic and built.router_layout == "all"


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_masked_equals_sliced_with_mixed_routing(case):
    cfg = CASES[case]
    model = random_routers(DyDiT.from_dit(random_uvit(cfg)))
    seen, router = [], model.blocks[1].token_selection
    logits = router.logits
    router.logits = lambda x: (seen.append(x.shape), logits(x))[1]  # what the token router reads
    x, t, y = batch(cfg, 4)
    engine = SlicedDyDiT(model, token_bucket=3)
    for tt in (torch.full((4,), 20.0), torch.full((4,), 700.0), torch.tensor([999.0, 10.0, 500.0, 10.0])):
        assert rel_err(engine(x, tt, y), model(x, tt, y)) < 1e-5
    assert seen and all(s[1:] == (cfg.num_tokens, cfg.hidden_size) for s in seen)  # the router's input
    heads, groups = model.width_masks(torch.tensor([20.0, 700.0, 999.0]))
    assert 0 < heads[:, 1:].float().mean() < 1 and 0 < groups[:, 1:].float().mean() < 1
    _, stats = model.forward_with_routing(x, torch.full((4,), 700.0), y)
    assert 0 < stats.tokens.float().mean() < 1
    assert engine.cache_info()["pack_bytes"] > 0


def test_analytic_flops_equal_counted_flops():
    cfg = CASES["cond"]
    model = random_routers(DyDiT.from_dit(random_uvit(cfg)))
    x, t, y = batch(cfg)
    t = torch.full((3,), 300.0)
    with count_flops() as dense, execution(model, "dense"):
        model(x, t, y)
    assert dict(dense.by_component) == {k: 3 * v for k, v in model.backbone.macs_table().items()}
    with count_flops() as masked:
        model(x, t, y)
    with torch.no_grad():
        _, stats = model.forward_with_routing(x, t, y)
    with count_flops() as fast:
        SlicedDyDiT(model)(x, t, y)
    for part in ("skip_linear", "mlp_extras", "decoder_pred", "patch_embed"):  # not routed: as dense
        assert fast.by_component[part] == masked.by_component[part] == dense.by_component[part]
    a, m = model.layer_costs()
    analytic = per_sample_macs(stats.heads, stats.groups, stats.tokens, a, m).sum()
    counted = fast.by_component["attention"] + fast.by_component["mlp"]
    assert counted < dense.by_component["attention"] + dense.by_component["mlp"]
    assert counted == pytest.approx(float(analytic), rel=1e-9)


def test_fine_tuning_with_the_training_loss_moves_rho_toward_lambda():
    from dydit.flow import create_process
    from dydit.train.step import TrainForward, compute_loss

    cfg = CASES["cond"].replace(class_dropout_prob=0.1)
    model = DyDiT.from_dit(random_uvit(cfg)).train()
    with torch.no_grad():  # routers that are on but undecided enough for a few steps to matter
        for block in model.blocks:
            for lin in (block.attn_rate.router, block.mlp_rate.router, block.token_selection.output_layer):
                lin.bias.fill_(2.0)
    process = create_process(cfg)  # Stable Diffusion's discrete process, t = 1..1000
    a, m = model.layer_costs()
    net = TrainForward(model)
    x, _, y = batch(cfg, 4)
    t = torch.arange(4) * 240

    def mean_rho() -> float:
        torch.manual_seed(11)
        with torch.no_grad():
            rhos = [flops_ratio(model.forward_with_routing(x, t + 1, y)[1], a, m) for _ in range(4)]
        return float(torch.stack(rhos).mean())

    before = mean_rho()
    opt = torch.optim.Adam(model.parameters(), lr=0.04)
    for step in range(8):
        noise = torch.randn_like(x)
        loss, parts, _ = compute_loss(net, process, x, y, t, noise, lambda_t=0.5, complete=step < 4,
                                      layer_costs=(a, m))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert "loss_complete" in parts or step >= 4
    after = mean_rho()
    assert before > 0.65 and abs(after - 0.5) < abs(before - 0.5) - 0.05, (before, after)
    assert flops_loss(torch.tensor(after), 0.5) < flops_loss(torch.tensor(before), 0.5)


def test_reordering_units_preserves_the_function():
    from dydit.models.reorder import reorder_by_importance

    cfg = CASES["cond"]
    model = DyDiT.from_dit(random_uvit(cfg), router_layout="all").eval()
    x, t, y = batch(cfg, 2)
    with torch.no_grad():
        before = model(x, t, y)
        orders = reorder_by_importance(model)
        after = model(x, t, y)
    assert any(not torch.equal(o, torch.arange(len(o))) for pair in orders for o in pair)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
