"""DiT: official key names and shapes, strict loading, DiT initialisation (docs/METHOD.md §1.2, §1.5)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import dydit
from dydit.models.dit import DiT
from dydit.models.layers import sincos_pos_embed_2d
from dydit.presets import DIT_NAMES, MODEL_PRESETS, get_model_config

OFFICIAL = ["S", "B", "L", "XL"]


def official_shapes(depth: int, d: int, p: int, n: int, in_ch: int = 4, classes: int = 1000) -> dict:
    """The key -> shape table of docs/METHOD.md §1.5, written out independently of the model code."""
    c_out = 2 * in_ch
    shapes = {
        "pos_embed": (1, n, d),
        "x_embedder.proj.weight": (d, in_ch, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d),
            b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d),
            b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d),
            b + "adaLN_modulation.1.bias": (6 * d,),
        }
    return shapes


@pytest.mark.parametrize("name", [n for n in DIT_NAMES if n.split("-")[1].split("/")[0] in OFFICIAL])
def test_official_key_names_and_shapes(name: str) -> None:
    cfg = get_model_config(name)
    # Build on the meta device: the twelve configurations include 675M-parameter models.
    with torch.device("meta"):
        model = DiT(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n = (32 // cfg.patch_size) ** 2
    assert got == official_shapes(cfg.depth, cfg.hidden_size, cfg.patch_size, n)


def test_xl2_parameter_count() -> None:
    with torch.device("meta"):
        model = dydit.create_model("DiT-XL/2")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # docs/METHOD.md §1.1: 675.13 M


def test_strict_load_of_official_layout_state_dict(tmp_path) -> None:
    cfg = tiny_config()
    n = (cfg.input_size // cfg.patch_size) ** 2
    shapes = official_shapes(cfg.depth, cfg.hidden_size, cfg.patch_size, n, cfg.in_channels, cfg.num_classes)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    torch.save(sd, tmp_path / "official.pt")
    model = DiT(cfg)
    model.load_state_dict(dydit.load_checkpoint(tmp_path / "official.pt"), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_output_is_zero_at_initialisation() -> None:
    model = DiT(tiny_config())
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 3]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_blocks_are_identity_at_init_but_not_after_perturbation() -> None:
    model = DiT(tiny_config()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    tokens, c, _ = model.embed(x, t, y)
    assert torch.equal(model.blocks[0](tokens, c), tokens)
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight)
    assert not torch.allclose(model.blocks[0](tokens, c), tokens)


def test_pos_embed_is_frozen_sincos_table() -> None:
    cfg = tiny_config(hidden_size=16)
    model = DiT(cfg)
    assert not model.pos_embed.requires_grad
    table = model.pos_embed[0]
    grid = cfg.input_size // cfg.patch_size
    # Token index = row * grid + col; the first half encodes the column, the second the row.
    col, row = 3, 1
    tok = table[row * grid + col]
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expect_col = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
    expect_row = torch.cat([torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(tok.double(), torch.cat([expect_col, expect_row]), atol=1e-6, rtol=0)
    assert sincos_pos_embed_2d(16, grid).shape == (grid * grid, 16)


def test_timestep_embedding_is_cos_first() -> None:
    from dydit.models.layers import TimestepEmbedder

    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(10.0)))
    torch.testing.assert_close(emb[1, 4], torch.sin(torch.tensor(10.0)))


def test_unpatchify_inverts_patchify_layout() -> None:
    model = DiT(tiny_config(learn_sigma=False))
    p, c = model.patch_size, model.out_channels
    img = torch.randn(2, c, 8, 8)
    # Patchify by hand: (B, C, h, p, w, p) -> (B, h, w, p, p, C) -> (B, N, p*p*C).
    x = img.reshape(2, c, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * c)
    assert torch.equal(model.unpatchify(x), img)


def test_learned_sigma_and_overrides() -> None:
    m = dydit.create_model("DiT-Ti/2", learn_sigma=False, num_classes=3)
    assert m.out_channels == 1 and m.y_embedder.embedding_table.num_embeddings == 4
    out = m(torch.randn(1, 1, 32, 32), torch.tensor([5]), torch.tensor([2]))
    assert out.shape == (1, 1, 32, 32)


def test_small_presets_accept_28_pixels() -> None:
    m = dydit.create_model("DiT-Ti/4", input_size=28)
    assert m(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.tensor([0, 9])).shape == (2, 2, 28, 28)


def test_class_dropout_only_in_training() -> None:
    m = DiT(tiny_config(class_dropout_prob=0.5))
    y = torch.zeros(1000, dtype=torch.long)
    assert torch.equal(m.y_embedder.token_drop(y).eq(4).float().mean().round(decimals=1), torch.tensor(0.5))
    emb = m.y_embedder(y, train=False)
    assert torch.equal(emb, m.y_embedder.embedding_table.weight[0].expand_as(emb))


def test_bad_configs_raise_clear_errors() -> None:
    with pytest.raises(dydit.DyditError, match="not divisible by the patch size"):
        dydit.create_model("DiT-S/8", input_size=20)
    with pytest.raises(dydit.DyditError, match="unknown model 'DiT-XXL/2'.*Valid models"):
        dydit.create_model("DiT-XXL/2")
    with pytest.raises(dydit.DyditError, match="unknown model option"):
        dydit.create_model("DiT-S/2", widht=3)
    assert set(MODEL_PRESETS) >= {f"DiT-{s}/{p}" for s in OFFICIAL for p in (2, 4, 8)}


VARIANTS = [{}, {"learn_sigma": False, "class_dropout_prob": 0.0}, {"mlp_ratio": 2.5, "in_channels": 3}]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_estimate_is_the_built_count(overrides) -> None:
    """``ModelConfig.num_parameters`` (what the size limit checks before building) is exact for a DiT;
    a DyDiT's routers add under 1 %."""
    for name in ("DiT-S/2", "DiT-XL/8", "DiT-Ti/4"):
        cfg = get_model_config(name, **overrides)
        with torch.device("meta"):
            count, dynamic = (
                sum(v.numel() for v in dydit.build_model(c).state_dict().values())
                for c in (cfg, cfg.replace(dynamic=True))
            )
        assert cfg.num_parameters == count, name
        assert count < dynamic < 1.01 * count, name
